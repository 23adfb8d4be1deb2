"""Every way a Dagster user starts a refresh builds what changed and publishes it, in one run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from rag_assets.index.embedded import EmbeddedIndex

from .conftest import entry, write_json

ROOT = Path(__file__).resolve().parents[1]
DAGSTER, DG = str(Path(sys.executable).parent / "dagster"), str(Path(sys.executable).parent / "dg")
MODULE = ["-m", "rag_assets.definitions"]
ENTRY_POINTS = {
    "make run": [sys.executable, "-m", "rag_assets.defs.refresh"],
    "dagster asset materialize --select '*'": [DAGSTER, "asset", "materialize", "--select", "*", *MODULE],
    "dagster job execute -j faq_index_refresh": [
        DAGSTER,
        "job",
        "execute",
        "-j",
        "faq_index_refresh",
        *MODULE,
    ],
    "dg launch --assets '*'": [DG, "launch", "--assets", "*"],
}  # the UI's Materialize all: test_webserver.py


@pytest.mark.slow
@pytest.mark.parametrize("command", list(ENTRY_POINTS))
def test_each_entry_point_builds_and_publishes_in_one_run(tmp_path: Path, command: str) -> None:
    entries = [
        entry(c, f"How do I fix error {n} in {c}?", f"Restart service {n}.") for c in "ab" for n in range(5)
    ]
    source = write_json(tmp_path / "faq.json", entries)
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "dagster-instance.yaml").read_text())
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "RAG_DATA_DIR": str(data),
        "DOCUMENTS_URL": str(source),
        "RAG_NLP_PROCESSES": "1",
        "RAG_MAX_ANSWER_CHURN": "1",  # every answer changes, deliberately
    }
    for answer in ("Restart service", "Reboot service"):  # a build, then a change to publish
        entries = [
            entry(c, f"How do I fix error {n} in {c}?", f"{answer} {n}.") for c in "ab" for n in range(5)
        ]
        write_json(source, entries)
        done = subprocess.run(
            ENTRY_POINTS[command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        index = EmbeddedIndex(data)
        assert (index.stats().entries, sorted(index.stats().courses)) == (10, ["a", "b"])
    if command == "make run":
        assert (
            done.stdout.strip()
            .splitlines()[-2]
            .startswith("refresh: published 10 entries (10 chunks) of 2 courses")
        )
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 2 and all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
        published = instance.get_latest_materialization_event(dg.AssetKey("es_index"))
        assert published is not None and published.run_id == runs[0].run_id
        metadata = published.asset_materialization.metadata
        assert metadata["courses_refreshed"].value == ["a", "b"] and metadata["upserted"].value == 10


@pytest.mark.slow
def test_make_run_says_when_a_mode_switch_rewrites_every_row(tmp_path: Path) -> None:
    """A plain `make run` after a semantic build rewrites every row without sentence vectors: its
    last lines say so, naming both modes."""
    entries = [
        entry(c, f"How do I fix error {n} in {c}?", f"Restart service {n}.") for c in "ab" for n in range(4)
    ]
    env = {
        **{k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"},
        "RAG_DATA_DIR": str(tmp_path / "data"),
        "DOCUMENTS_URL": str(write_json(tmp_path / "faq.json", entries)),
        "RAG_NLP_PROCESSES": "1",
    }
    outputs = []
    for mode in ("semantic", "none"):
        done = subprocess.run(
            ENTRY_POINTS["make run"],
            cwd=ROOT,
            env={**env, "RAG_RERANKER": mode},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        outputs.append(done.stdout.strip().splitlines())
    assert not any(line.startswith("refresh: warning:") for line in outputs[0])
    assert outputs[1][-2] == (
        f"refresh: warning: RAG_RERANKER=none, but the served index at {tmp_path / 'data' / 'index.sqlite'} "
        "was built for RAG_RERANKER=semantic: this refresh rewrites all of its 8 rows (set "
        "RAG_RERANKER=semantic to keep that mode)"
    )
