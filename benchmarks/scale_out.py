"""`make bench-scale-out`: a cold refresh of COURSES courses of CHUNKS chunks each, with one and
with two course workers (`make run`'s RAG_COURSE_WORKERS), against one unpartitioned build.

Each refresh is `python -m rag_assets.defs.refresh` in a fresh process on a fresh data directory
and Dagster instance, as a user runs it; each course run analyses with one spaCy process
(RAG_NLP_PROCESSES=1), so two workers use the two cores that one worker with two spaCy processes
would. The unpartitioned build is the project's own functions over the whole corpus at once
(`IndexContent.assemble`, one publish). The indexes are compared by chunk ids and content
hashes and by the hits of 50 questions with their course filter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from refresh import synthetic_corpus

from rag_assets.evaluation import build_index
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.ingest.sources import Fetcher, load_documents
from rag_assets.nlp.analysis import NlpSettings, load_pipeline
from rag_assets.retrieval import Retriever


def course_corpus(source: str, courses: int, chunks_per_course: int, path: Path) -> None:
    """The synthetic corpus of `make bench`, dealt round-robin into `courses` courses."""
    synthetic_corpus(source, courses * chunks_per_course, path)
    entries = json.loads(path.read_text())
    for position, item in enumerate(entries):
        item["course"] = f"course-{position % courses}"
    path.write_text(json.dumps(entries))


def refresh(corpus: Path, workdir: Path, workers: int, nlp_processes: int) -> dict[str, Any]:
    """One cold `make run` in a fresh process; its wall time and its closing lines."""
    (workdir / "dagster").mkdir(parents=True)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(workdir / "dagster"),
        "RAG_DATA_DIR": str(workdir / "data"),
        "DOCUMENTS_URL": str(corpus),
        "RAG_NLP_PROCESSES": str(nlp_processes),
        "RAG_COURSE_WORKERS": str(workers),
    }
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "rag_assets.defs.refresh"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(
            f"refresh with {workers} worker(s) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    summary = [line for line in done.stdout.splitlines() if line.startswith("refresh: ")]
    return {"wall_s": round(wall, 1), "workers": workers, "nlp_processes": nlp_processes, "summary": summary}


def unpartitioned(corpus: Path, workdir: Path) -> float:
    """The whole corpus analysed and published at once, without Dagster."""
    started = time.perf_counter()
    build_index(str(corpus), workdir, load_pipeline(), nlp_settings=NlpSettings(processes=2))
    return round(time.perf_counter() - started, 1)


def searches(data_dir: Path, corpus: Path) -> list[list[str]]:
    retriever = Retriever(EmbeddedIndex(data_dir), load_pipeline())
    probes = load_documents(str(corpus), Fetcher()).frame.sample(50, random_state=7)
    return [
        [hit.chunk_id for hit in retriever.search(question, course=course)]
        for question, course in zip(probes.question, probes.course, strict=True)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", required=True, help="the real snapshot the corpus grows from")
    parser.add_argument("--courses", type=int, default=4)
    parser.add_argument("--chunks-per-course", type=int, default=25_000)
    parser.add_argument("--out", default="scale-out-results.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rag-scale-out-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus.json"
        course_corpus(args.new, args.courses, args.chunks_per_course, corpus)
        runs = {
            "one worker": refresh(corpus, work / "one", workers=1, nlp_processes=1),
            "two workers": refresh(corpus, work / "two", workers=2, nlp_processes=1),
            "one worker, two spaCy processes (the default)": refresh(corpus, work / "default", 1, 2),
        }
        whole_s = unpartitioned(corpus, work / "whole")
        built = {name: EmbeddedIndex(work / key / "data") for name, key in (("one", "one"), ("two", "two"))}
        whole = EmbeddedIndex(work / "whole")
        same = {
            "ids_and_hashes": built["one"].chunk_hashes()
            == whole.chunk_hashes()
            == built["two"].chunk_hashes(),
            "search": searches(work / "one" / "data", corpus)
            == searches(work / "whole", corpus)
            == searches(work / "two" / "data", corpus),
        }
        results = {
            "courses": args.courses,
            "chunks": len(whole.chunk_hashes()),
            "runs": runs,
            "unpartitioned_build_s": whole_s,
            "speed_up_two_workers": round(runs["one worker"]["wall_s"] / runs["two workers"]["wall_s"], 2),
            "same_as_unpartitioned": same,
        }
    Path(args.out).write_text(json.dumps(results, indent=1))
    for name, run in runs.items():
        print(f"{name}: {run['wall_s']} s")
    print(f"speed-up with two workers (target >= 1.8): {results['speed_up_two_workers']}")
    print(f"unpartitioned build, no Dagster: {whole_s} s; {results['chunks']} chunks")
    print(f"same index as the unpartitioned build: {same}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
