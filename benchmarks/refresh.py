"""`make bench`: real Dagster runs of the refresh job, timed per asset, against spaCy's floor.

Scenarios (each in its own process, so peak RSS is its own):
- cold: a fresh data directory, the new snapshot;
- floor: in a fresh process of its own, spaCy's tokenizer alone over the cold run's distinct
  chunk field texts (model loaded before the clock starts);
- warm: the cold directory again with the same snapshot (everything cached, nothing to write);
- delta: a fresh directory built from the old snapshot, then refreshed to the new one; its index
  is compared with the cold build's (ids, content hashes and search results);
- scale: synthetic corpora of N chunks grown from the real one (copies with perturbed words);
- semantic: a cold run with RAG_RERANKER=semantic (sentence vectors made), and the cost of a
  sentence vector per chunk on a sample of each synthetic corpus; queries are timed in every
  reranking mode.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from rag_assets.definitions import load_definitions, with_resources
from rag_assets.defs.refresh import refresh
from rag_assets.defs.resources import (
    DocumentSourceResource,
    NlpResource,
    QualityResource,
    RefreshLockResource,
    SearchIndexResource,
)
from rag_assets.index.backend import RERANKER_MODES, SEMANTIC
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.ingest.chunking import ChunkingConfig, make_chunks
from rag_assets.ingest.sources import Fetcher, load_documents
from rag_assets.nlp.analysis import NlpSettings, analyse_query, default_processes, load_pipeline
from rag_assets.nlp.features import LEMMA_FIELDS
from rag_assets.nlp.sentence import chunk_sentences, sentence_encoder
from rag_assets.retrieval import Retriever
from rag_assets.settings import DEFAULT_RERANKER

ASSETS = ["faq_source", "raw_documents", "chunks", "lemmas", "embeddings", "es_index"]
RESULTS = Path("bench-results.json")


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its largest child (spaCy workers), in MB."""
    return {
        "process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "largest_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def run_job(
    documents: str, workdir: Path, processes: int, reranker: str = DEFAULT_RERANKER
) -> dict[str, Any]:
    """One real refresh (the source run, a run per course, the publish); seconds per asset step,
    summed over the course runs, and the counts from their metadata."""
    resources = {
        "source": DocumentSourceResource(url=documents),
        "nlp": NlpResource(processes=processes, cache_dir=str(workdir / "cache"), reranker=reranker),
        "search_index": SearchIndexResource(data_dir=str(workdir)),
        "quality_settings": QualityResource(max_entry_drop=1.0, max_course_entry_drop=1.0),
        "io_manager": dg.FilesystemIOManager(base_dir=str(workdir / "assets")),
        "refresh_lock": RefreshLockResource(data_dir=str(workdir)),
    }
    definitions = with_resources(load_definitions(), resources)
    (workdir / "dagster").mkdir(parents=True, exist_ok=True)
    with dg.DagsterInstance.local_temp(str(workdir / "dagster")) as instance:
        started = time.perf_counter()
        done = refresh(instance, definitions)
        wall = time.perf_counter() - started
        assert done.success, [run.problems for run in done.runs]
        logs = [entry for run in done.runs for entry in instance.all_logs(run.run_id)]
    seconds = dict.fromkeys(ASSETS, 0.0)
    totals: dict[str, dict[str, Any]] = {asset: {} for asset in ASSETS}
    peaks = dict.fromkeys(ASSETS, 0.0)
    for entry in logs:
        event = entry.dagster_event
        if event is not None and event.is_step_success and event.step_key in ASSETS:
            seconds[event.step_key] += event.event_specific_data.duration_ms / 1000
        materialization = entry.asset_materialization
        if materialization is not None:
            asset = materialization.asset_key.to_user_string()
            for key, value in materialization.metadata.items():
                if isinstance(value.value, int | float) and not isinstance(value.value, bool):
                    totals[asset][key] = totals[asset].get(key, 0) + value.value
            peaks[asset] = max(peaks[asset], float(materialization.metadata["peak_rss_mb"].value))
    return {
        "seconds": {asset: round(seconds[asset], 3) for asset in ASSETS},
        "run_wall_s": round(wall, 3),
        "course_runs": len(done.courses),
        "chunks": totals["chunks"]["chunks"],
        "lemmas_computed": totals["lemmas"]["computed"],
        "lemmas_reused": totals["lemmas"]["reused"],
        "embeddings_computed": totals["embeddings"]["computed"],
        "embeddings_reused": totals["embeddings"]["reused"],
        "sentence_computed": totals["embeddings"].get("sentence_computed", 0),
        "sentence_s": round(totals["embeddings"].get("sentence_s", 0.0), 3),
        "index_upserted": totals["es_index"]["upserted"],
        "index_deleted": totals["es_index"]["deleted"],
        "peak_rss_mb_after_step": peaks,
    }


def field_texts(chunks: pd.DataFrame) -> list[str]:
    return [str(v) for field in LEMMA_FIELDS for v in chunks[field]]


def spacy_floor(workdir: Path) -> dict[str, Any]:
    """spaCy's tokenizer alone, in one process, over the cold run's distinct field texts: what
    `lemmas` cannot go below per worker (it tokenizes each distinct text once, then looks tokens up).

    Runs in a fresh process like the cold run, so neither profits from the other's warm-up; the
    model is loaded before the clock starts."""
    # the handles the course runs passed on, one per course partition
    handles = sorted((workdir / "assets" / "chunks").iterdir())
    chunks = pd.concat([pd.read_pickle(handle).load() for handle in handles], ignore_index=True)
    texts = list(dict.fromkeys(field_texts(chunks)))
    nlp = load_pipeline()
    started = time.perf_counter()
    for _ in nlp.tokenizer.pipe(texts, batch_size=NlpSettings().batch_size):
        pass
    return {"distinct_texts": len(texts), "seconds": round(time.perf_counter() - started, 3)}


def search_snapshot(workdir: Path, documents: pd.DataFrame) -> list[list[str]]:
    retriever = Retriever(EmbeddedIndex(workdir), load_pipeline())
    probes = documents.sample(min(50, len(documents)), random_state=7)
    return [
        [h.chunk_id for h in retriever.search(q, course=c)]
        for q, c in zip(probes.question, probes.course, strict=True)
    ]


def query_latency(
    workdir: Path, documents: pd.DataFrame, reranker: str, queries: int = 300
) -> dict[str, Any]:
    """Median and 95th percentile of `Retriever.search` on the built index, in a fresh process
    with the model loaded, with and without the course filter; questions are the entries' own."""
    started = time.perf_counter()
    retriever = Retriever(EmbeddedIndex(workdir), load_pipeline(), reranker=reranker)
    retriever.search("warm up the caches")
    open_s = time.perf_counter() - started
    probes = documents.sample(min(queries, len(documents)), random_state=11)
    figures: dict[str, Any] = {"queries": len(probes), "first_search_s": round(open_s, 3)}
    latencies: dict[str, list[float]] = {"with_course": [], "without_course": []}
    # Interleaved, so neither set runs on caches the other one warmed.
    for question, course in zip(probes.question, probes.course, strict=True):
        for name, filtered in (("with_course", course), ("without_course", None)):
            begun = time.perf_counter()
            retriever.search(question, course=filtered)
            latencies[name].append((time.perf_counter() - begun) * 1000)
    for name, measured in latencies.items():
        p50, p95 = np.percentile(measured, [50, 95])
        figures[name] = {"p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2)}
    figures["vector_recall_at_50"] = vector_recall(retriever, probes.question.head(100), workdir)
    return figures


def vector_recall(retriever: Retriever, questions: pd.Series, workdir: Path, k: int = 50) -> float:
    """Share of the exact k nearest chunks (a scan of every stored vector) that the vector
    lists' search returns, over the entries' own questions."""
    db = sqlite3.connect(workdir / "index.sqlite")
    rowids, vectors = [], []
    for rowid_blob, vector_blob in db.execute("SELECT rowids, vectors FROM vector_lists"):
        rowids.append(np.frombuffer(rowid_blob, dtype=np.int32))
        vectors.append(np.frombuffer(vector_blob, dtype=np.float32).reshape(len(rowids[-1]), -1))
    ids, matrix = np.concatenate(rowids), np.concatenate(vectors)
    chunk_of = dict(db.execute("SELECT id, chunk_id FROM chunks"))
    shares = []
    for question in questions:
        query = analyse_query(retriever.nlp, question).vector
        exact = {chunk_of[int(r)] for r in ids[np.argsort(-(matrix @ query), kind="stable")[:k]]}
        shares.append(len(exact & set(retriever.backend.vector_search(query, None, k))) / k)
    return round(float(np.mean(shares)), 4)


def scenario(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir)
    if args.scenario == "cold":
        started = time.perf_counter()
        load_pipeline()  # measured on its own: the lemmas step of a new process includes it
        model_load = round(time.perf_counter() - started, 3)
        load_pipeline.cache_clear()
        return {**run_job(args.new, workdir, args.processes), "model_load_s": model_load}
    if args.scenario == "floor":
        return spacy_floor(workdir)
    if args.scenario == "warm":
        return run_job(args.new, workdir, args.processes)
    if args.scenario == "delta":
        setup = run_job(args.old, workdir, args.processes)
        run = run_job(args.new, workdir, args.processes)
        documents = load_documents(args.new, Fetcher()).frame
        same_ids = EmbeddedIndex(workdir).chunk_hashes() == EmbeddedIndex(args.compare).chunk_hashes()
        same_hits = search_snapshot(workdir, documents) == search_snapshot(Path(args.compare), documents)
        return {
            **run,
            "setup_from_old": setup,
            "identical_to_cold": {"ids_and_hashes": same_ids, "search": same_hits},
        }
    if args.scenario == "scale":
        run = run_job(args.new, workdir, args.processes)
        nlp_s = run["seconds"]["lemmas"] + run["seconds"]["embeddings"]
        return {
            **run,
            "nlp_ms_per_chunk": round(1000 * nlp_s / run["chunks"], 3),
            "total_ms_per_chunk": round(1000 * sum(run["seconds"].values()) / run["chunks"], 3),
        }
    if args.scenario == "queries":
        return query_latency(workdir, load_documents(args.new, Fetcher()).frame, args.reranker)
    if args.scenario == "semantic":
        run = run_job(args.new, workdir, args.processes, SEMANTIC)
        return {**run, "sentence_ms_per_chunk": round(1000 * run["sentence_s"] / run["sentence_computed"], 2)}
    if args.scenario == "sentence_sample":
        return sentence_sample(args.new)
    raise ValueError(args.scenario)


def sentence_sample(documents: str, size: int = 2000) -> dict[str, Any]:
    """A sentence vector's cost per chunk on a random sample of a corpus's chunks (the whole of
    a large corpus would take hours), with every usable core, as the embeddings step runs it."""
    chunks = make_chunks(load_documents(documents, Fetcher()).frame, ChunkingConfig())
    sample = chunks.sample(min(size, len(chunks)), random_state=5)
    encoder = sentence_encoder()
    encoder.encode(["warm up"])
    started = time.perf_counter()
    encoder.encode(chunk_sentences(sample))
    seconds = time.perf_counter() - started
    per_chunk = round(1000 * seconds / len(sample), 2)
    return {"chunks": len(chunks), "sampled": len(sample), "ms_per_chunk": per_chunk}


def synthetic_corpus(source: str, chunks_wanted: int, path: Path, seed: int = 13) -> None:
    """Copies of the real entries, each with about one word in six replaced by another word of the
    corpus, so no two chunks share content and nothing is served from the cache."""
    documents = load_documents(source, Fetcher()).frame
    rng = random.Random(seed)
    vocabulary = " ".join(documents.answer).split()
    per_entry = len(make_chunks(documents, ChunkingConfig())) / len(documents)
    entries = []
    for copy in range(int(chunks_wanted / per_entry) // len(documents) + 1):
        for doc in documents.itertuples(index=False):
            words = [rng.choice(vocabulary) if rng.random() < 1 / 6 else w for w in doc.answer.split(" ")]
            entries.append(
                {
                    "course": doc.course,
                    "section": doc.section,
                    "question": f"{doc.question} ({copy})",
                    "answer": " ".join(words),
                }
            )
    entries = entries[: int(chunks_wanted / per_entry)]
    path.write_text(json.dumps(entries))


def run_scenario(name: str, workdir: Path, args: argparse.Namespace, **extra: str) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--scenario",
        name,
        "--workdir",
        str(workdir),
        "--new",
        extra.get("new", args.new),
        "--old",
        args.old,
        "--processes",
        str(args.processes),
    ]
    if "compare" in extra:
        command += ["--compare", extra["compare"]]
    command += ["--reranker", extra.get("reranker", DEFAULT_RERANKER)]
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"scenario {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[str, Any]) -> None:
    print(
        f"{'scenario':<20}" + "".join(f"{a:>14}" for a in ASSETS) + f"{'computed':>10}{'reused':>8}"
        f"{'upserted':>10}{'deleted':>9}{'peak MB':>9}"
    )
    for name, r in results["scenarios"].items():
        print(
            f"{name:<20}"
            + "".join(f"{r['seconds'][a]:>14.3f}" for a in ASSETS)
            + f"{r['lemmas_computed']:>10}{r['lemmas_reused']:>8}{r['index_upserted']:>10}"
            f"{r['index_deleted']:>9}{peak_mb(r):>9.0f}"
        )
    print()
    for key, value in results["summary"].items():
        print(f"{key}: {value}")


def peak_mb(run: dict[str, Any]) -> float:
    """The run's peak: its own process or its largest worker, whichever is larger."""
    return max(run["peak_rss_mb"].values())


def summarise(scenarios: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if "cold" in scenarios:
        cold, warm, delta = scenarios["cold"], scenarios["warm"], scenarios["delta"]
        nlp = cold["seconds"]["lemmas"] + cold["seconds"]["embeddings"]
        steps = sum(cold["seconds"].values())
        warm_steps = sum(warm["seconds"].values())
        summary |= {
            "cold 1k: NLP ms per chunk (target <= 0.5)": round(1000 * nlp / cold["chunks"], 3),
            "cold 1k: the steps' own seconds, all runs of the refresh (target <= 3)": round(steps, 3),
            "cold 1k: run wall seconds, process start-up not included": cold["run_wall_s"],
            "cold 1k: model load seconds (inside lemmas)": cold["model_load_s"],
            "cold 1k: floor, spaCy's tokenizer over the distinct texts in one process, s": cold["floor"][
                "seconds"
            ],
            "query 1k: p50 / p95 ms, course filter, the default mode (target p50 <= 1.5)": cold["queries"][
                "with_course"
            ],
            "query 1k: p50 / p95 ms, no filter": cold["queries"]["without_course"],
            "query 1k: vector search recall@50 against a scan": cold["queries"]["vector_recall_at_50"],
            "warm 1k: computed and written": warm["lemmas_computed"]
            + warm["embeddings_computed"]
            + warm["index_upserted"]
            + warm["index_deleted"],
            "warm 1k: share of cold steps": round(warm_steps / steps, 4),
            "delta: computed, upserted, deleted": [
                delta["lemmas_computed"],
                delta["index_upserted"],
                delta["index_deleted"],
            ],
            "delta: identical to cold": delta["identical_to_cold"],
        }
        summary |= {
            f"query 1k: p50 / p95 ms, course filter, RAG_RERANKER={name[8:]}": figures["with_course"]
            for name, figures in cold.items()
            if name.startswith("queries_")
        }
    if "semantic" in scenarios:
        semantic = scenarios["semantic"]
        queries = semantic["queries"]
        summary |= {
            "semantic 1k: sentence vector ms per chunk, in embeddings": semantic["sentence_ms_per_chunk"],
            "semantic 1k: the steps' own seconds, all runs": round(sum(semantic["seconds"].values()), 3),
            "semantic 1k: query p50 / p95 ms, course filter (target p50 <= 8)": queries["with_course"],
            "semantic 1k: query p50 / p95 ms, no filter": queries["without_course"],
        }
    for name in sorted((k for k in scenarios if re.fullmatch(r"scale_\d+", k)), key=lambda k: int(k[6:])):
        run, warm = scenarios[name], scenarios[f"{name}_warm"]
        size = f"{run['chunks']:,} chunks"
        summary |= {
            f"{size}: seconds per step": run["seconds"],
            f"{size}: whole cold refresh, run wall s (1M target <= 900)": run["run_wall_s"],
            f"{size}: NLP ms per chunk (target <= 0.5)": run["nlp_ms_per_chunk"],
            f"{size}: all steps ms per chunk": run["total_ms_per_chunk"],
            f"{size}: peak RSS MB, run / largest worker (1M target <= 4096)": {
                k: round(v) for k, v in run["peak_rss_mb"].items()
            },
            f"{size}: query p50 / p95 ms, course filter (target <= 50 / 100)": run["queries"]["with_course"],
            f"{size}: query p50 / p95 ms, no filter (target <= 50 / 100)": run["queries"]["without_course"],
            f"{size}: vector search recall@50 against a scan of every vector": run["queries"][
                "vector_recall_at_50"
            ],
            f"{size}: run's peak RSS MB at the end of each step": run["peak_rss_mb_after_step"],
            f"{size}: semantic: sentence vector ms per chunk (a sample of its chunks)": run["sentences"],
            f"{size}: warm refresh wall s, share of cold (target <= 0.05)": [
                warm["run_wall_s"],
                round(warm["run_wall_s"] / run["run_wall_s"], 4),
            ],
        }
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks/refresh.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--new", default="../shared/data/documents-2025.json")
    parser.add_argument("--old", default="../shared/data/documents-2024-06.json")
    parser.add_argument("--scale", default="10000,100000", help="synthetic chunk counts; empty to skip")
    parser.add_argument("--processes", type=int, default=default_processes())
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--scale-only", action="store_true", help="only the synthetic scale points")
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--compare", help=argparse.SUPPRESS)
    parser.add_argument("--reranker", default=DEFAULT_RERANKER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scenario:
        print(json.dumps({**scenario(args), "peak_rss_mb": peak_rss_mb()}))
        return
    with tempfile.TemporaryDirectory(prefix="rag-bench-") as tmp:
        root = Path(tmp)
        scenarios: dict[str, Any] = {}
        if not args.scale_only:
            scenarios["cold"] = run_scenario("cold", root / "cold", args)
            scenarios["cold"]["floor"] = run_scenario("floor", root / "cold", args)
            scenarios["cold"]["queries"] = run_scenario("queries", root / "cold", args)  # the default mode
            for mode in sorted(set(RERANKER_MODES) - {DEFAULT_RERANKER, SEMANTIC}):  # semantic: below
                found = run_scenario("queries", root / "cold", args, reranker=mode)
                scenarios["cold"][f"queries_{mode}"] = found
            scenarios["semantic"] = run_scenario("semantic", root / "semantic", args)
            scenarios["semantic"]["queries"] = run_scenario(
                "queries", root / "semantic", args, reranker=SEMANTIC
            )
            scenarios["warm"] = run_scenario("warm", root / "cold", args)
            scenarios["delta"] = run_scenario("delta", root / "delta", args, compare=str(root / "cold"))
        for size in [int(s) for s in args.scale.split(",") if s.strip()]:
            corpus = root / f"synthetic-{size}.json"
            synthetic_corpus(args.new, size, corpus)
            workdir = root / f"scale-{size}"
            scenarios[f"scale_{size}"] = run_scenario("scale", workdir, args, new=str(corpus))
            scenarios[f"scale_{size}"]["queries"] = run_scenario("queries", workdir, args, new=str(corpus))
            scenarios[f"scale_{size}_warm"] = run_scenario("scale", workdir, args, new=str(corpus))
            scenarios[f"scale_{size}"]["sentences"] = run_scenario(
                "sentence_sample", workdir, args, new=str(corpus)
            )
            corpus.unlink()
    results = {"processes": args.processes, "scenarios": scenarios, "summary": summarise(scenarios)}
    Path(args.out).write_text(json.dumps(results, indent=2))
    report(results)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
