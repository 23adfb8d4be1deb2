"""Stored step values: found only under the digest they were made for, complete or not at all."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rag_assets.common import stored as stored_module
from rag_assets.common.stored import KEEP_PER_STEP, StoredValueError, ValueStore, digest
from rag_assets.nlp.analysis import VECTOR_DIM
from rag_assets.nlp.features import ChunkVectors


def test_a_value_is_made_once_and_then_found_with_its_facts(tmp_path: Path) -> None:
    store = ValueStore(tmp_path)
    made: list[int] = []

    def make() -> tuple[list[int], dict[str, int]]:
        made.append(1)
        return [1, 2, 3], {"rows": 3}

    first = store.find_or_make("chunks", digest("a"), make)
    second = store.find_or_make("chunks", digest("a"), make)
    assert (first.reused, second.reused, len(made)) == (False, True, 1)
    assert second.load() == [1, 2, 3] and second.facts["rows"] == 3
    other = store.find_or_make("chunks", digest("b"), make)
    assert not other.reused and len(made) == 2


def test_a_truncated_value_is_not_found_and_is_made_again(tmp_path: Path) -> None:
    store = ValueStore(tmp_path)
    stored = store.save("lemmas", "d", list(range(1000)), {})
    Path(stored.path).write_bytes(Path(stored.path).read_bytes()[:100])
    assert store.find("lemmas", "d") is None
    assert store.find_or_make("lemmas", "d", lambda: ([7], {})).load() == [7]


def test_an_unreadable_value_names_its_file(tmp_path: Path) -> None:
    stored = ValueStore(tmp_path).save("chunks", "d", [1], {})
    Path(stored.path).write_bytes(b"not a pickle")
    with pytest.raises(StoredValueError, match=r"stored chunks value .*d\.pkl cannot be read"):
        stored.load()
    Path(stored.path).unlink()
    with pytest.raises(StoredValueError, match=r"no longer kept .*run the whole refresh"):
        stored.load()


def test_a_value_without_its_facts_file_is_incomplete(tmp_path: Path) -> None:
    store = ValueStore(tmp_path)
    store.save("chunks", "d", [1], {})
    (tmp_path / "chunks" / "d.json").unlink()
    assert store.find("chunks", "d") is None


def test_only_the_newest_values_of_a_step_are_kept(tmp_path: Path) -> None:
    store = ValueStore(tmp_path)
    for age, n in enumerate(range(KEEP_PER_STEP)):  # d0 oldest
        stored = store.save("chunks", f"d{n}", [n], {})
        for path in (Path(stored.path), Path(stored.path).with_suffix(".json")):
            os.utime(path, (time.time() - 60 + age, time.time() - 60 + age))
    assert store.find("chunks", "d0") is not None  # reused: newest again, whatever its age
    store.save("chunks", "d9", [9], {})
    kept = sorted(p.stem for p in (tmp_path / "chunks").glob("*.pkl"))
    assert kept == sorted(["d0", "d9", *(f"d{n}" for n in range(2, KEEP_PER_STEP))])
    assert sorted(p.stem for p in (tmp_path / "chunks").glob("*.json")) == kept
    assert not list((tmp_path / "chunks").glob(".*"))  # no partial files left


def test_the_digest_depends_on_every_part_and_their_order() -> None:
    assert digest("a", 1) == digest("a", 1)
    assert len({digest("a", 1), digest("a", 2), digest(1, "a"), digest("a1")}) == 4


def test_frames_and_vectors_are_stored_in_parts_and_read_part_by_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stored_module, "PART_ROWS", 7)
    store = ValueStore(tmp_path)
    frame = pd.DataFrame({"chunk_id": [f"c{i}" for i in range(20)], "n": range(20)})
    saved = store.save("chunks", "f", frame, {})
    assert [len(part) for part in saved.parts()] == [7, 7, 6]
    pd.testing.assert_frame_equal(saved.load(), frame)
    pd.testing.assert_frame_equal(saved.load(columns=["n"]), frame[["n"]])
    matrix = np.random.default_rng(0).random((20, VECTOR_DIM), dtype=np.float32)
    vectors = store.save("embeddings", "v", ChunkVectors(list(frame.chunk_id), matrix), {})
    assert [part.chunk_ids[0] for part in vectors.parts()] == ["c0", "c7", "c14"]
    joined = vectors.load()
    assert joined.chunk_ids == list(frame.chunk_id) and np.array_equal(joined.matrix, matrix)
    empty = store.save("lemmas", "e", frame.head(0), {}).load()
    assert len(empty) == 0 and list(empty.columns) == ["chunk_id", "n"]


def test_a_value_stored_in_an_older_layout_is_made_again(tmp_path: Path) -> None:
    store = ValueStore(tmp_path)
    saved = store.save("chunks", "d", [1], {})
    facts_file = Path(saved.path).with_suffix(".json")
    facts = json.loads(facts_file.read_text())
    del facts["_format"]
    facts_file.write_text(json.dumps(facts))
    assert store.find("chunks", "d") is None
