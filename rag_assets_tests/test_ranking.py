"""The ranking behaviour that matters, pinned on small corpora and on the evaluation set."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from spacy.language import Language

from rag_assets.evaluation import build_index, evaluate, read_ground_truth
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.index.ranking import FIELD_WEIGHTS, FusionSettings
from rag_assets.nlp.analysis import analyse_query
from rag_assets.retrieval import Retriever

from .conftest import EVAL, index_content

DECOYS = [
    ("How do I install Kafka?", "Download the binaries and start the broker."),
    ("Where is the homework form?", "The link is on the course page."),
    ("Why is my Docker build slow?", "Use a cache mount for pip downloads."),
]


def lexical_ids(retriever: Retriever, nlp: Language, query: str) -> list[str]:
    """The chunk ids of the lexical ranking alone, best first."""
    ranked = retriever.backend.lexical_search(analyse_query(nlp, query).lemmas, None, 5)
    return [chunk_id for chunk_id, _ in ranked]


def corpus(nlp: Language, tmp_path: Path, entries: list[tuple[str, str]]) -> Retriever:
    documents = pd.DataFrame(
        [
            {
                "doc_id": f"d{i}",
                "course": "c",
                "section": "General",
                "question": q,
                "answer": a,
                "content_hash": str(i),
            }
            for i, (q, a) in enumerate(entries)
        ]
    )
    index = EmbeddedIndex(tmp_path)
    index.publish(index_content(nlp, documents))
    return Retriever(index, nlp)


def test_an_answer_sharing_only_lemmas_with_the_question_is_found(nlp: Language, tmp_path: Path) -> None:
    target = ("Classroom rules", "The children were taught by geese.")
    retriever = corpus(nlp, tmp_path, [*DECOYS, target])
    query = "Which child teaches a goose?"
    surface = {w.lower() for w in ["Which", "child", "teaches", "a", "goose"]}
    assert not surface & set(target[1].lower().rstrip(".").split())  # no surface form in common
    assert lexical_ids(retriever, nlp, query) == ["d3-0"]
    assert retriever.search(query)[0].doc_id == "d3"


def test_derived_forms_meet_through_their_stem(nlp: Language, tmp_path: Path) -> None:
    retriever = corpus(nlp, tmp_path, [*DECOYS, ("Sign-up", "Registration closes on Friday.")])
    # found by its word vector ("registr" and "regist" are different stems): below the lexical
    # relevance floor, so only a search that keeps every hit shows it
    assert retriever.search("Until when can I register?", min_relevance=0)[0].doc_id == "d3"


def test_lemmatizer_slips_do_not_split_a_word(nlp: Language, tmp_path: Path) -> None:
    # spaCy lemmatizes "installing" to "instal" but "install" to "install"; both stem to "instal".
    retriever = corpus(nlp, tmp_path, [("Setup", "Installing Kafka takes a minute."), *DECOYS[1:]])
    assert retriever.search("how to install kafka")[0].doc_id == "d0"


def test_a_word_inside_a_compound_token_is_found(nlp: Language, tmp_path: Path) -> None:
    # spaCy keeps a path, a file name or a snake_case name as one token; its words must still meet
    # the query's words in stemmed form ("datasets.md" -> "dataset", "SPARK_HOME" -> "home").
    entries = [
        ("Big data", "See the list in week_7_project/datasets.md on GitHub."),
        ("PySpark import fails", "Point SPARK_HOME at the unpacked folder."),
    ]
    retriever = corpus(nlp, tmp_path, [*DECOYS, *entries])
    for query, chunk_id in [("Which datasets are there?", "d3-0"), ("spark home directory", "d4-0")]:
        assert lexical_ids(retriever, nlp, query) == [chunk_id]


def test_the_question_field_outweighs_the_answer(nlp: Language, tmp_path: Path) -> None:
    retriever = corpus(
        nlp,
        tmp_path,
        [
            ("Airflow scheduler", "Restart it after changing the DAG folder."),
            ("Restarting services", "The airflow scheduler sometimes hangs after an upgrade."),
        ],
    )
    assert FIELD_WEIGHTS["question"] > FIELD_WEIGHTS["text"]
    assert [hit.doc_id for hit in retriever.search("airflow scheduler")] == ["d0", "d1"]


def test_the_vector_side_only_fills_in_when_no_lemma_matches(nlp: Language, tmp_path: Path) -> None:
    retriever = corpus(nlp, tmp_path, [*DECOYS, ("Vehicles", "A truck carries cargo.")])
    assert lexical_ids(retriever, nlp, "automobile lorry") == []
    assert retriever.search("automobile lorry", min_relevance=0)[0].doc_id == "d3"


def test_evaluation_set_figures(nlp: Language, tmp_path: Path) -> None:
    """The `rag eval` figures (docs/benchmarks.md) of the modes that need no sentence vectors (development
    split, 2123 questions; the features model was fitted on all of them)."""
    index = build_index(str(EVAL / "documents-with-ids.json"), tmp_path, nlp)
    ground_truth = read_ground_truth(EVAL / "ground-truth-dev.csv")
    figures = {
        mode: evaluate(Retriever(index, nlp, FusionSettings(), reranker=mode), ground_truth)
        for mode in ("none", "features")
    }
    assert {mode: (r.questions, r.reranker) for mode, r in figures.items()} == {
        "none": (2123, "none"),
        "features": (2123, "features"),
    }
    assert (figures["none"].hit_rate, figures["none"].mrr) == pytest.approx((0.9501, 0.8868), abs=1e-4)
    assert (figures["features"].hit_rate, figures["features"].mrr) == pytest.approx(
        (0.9543, 0.8968), abs=1e-4
    )
