"""`make bench`: real Dagster runs of the refresh job (one run per refresh), timed per asset,
against spaCy's floor.

A refresh is one run of `faq_index_refresh`; an asset's seconds are the summed durations of its
steps (the step named after it, or, for the four course assets, every step under `<asset>.`:
the split, one step per shard of courses, the join). The asset checks' steps and the time
between steps (the run's wall less every step) are reported beside them.

Scenarios (each in its own process, so peak RSS is its own):
- cold: a fresh data directory, the new snapshot; repeated (`--repeats`) in fresh directories,
  each followed by a warm run there;
- make run: `python -m rag_assets.defs.refresh` in a fresh process on a fresh data directory and
  Dagster instance, as `make run` starts it, wall time from outside;
- floor: in a fresh process of its own, spaCy's tokenizer alone over the cold run's distinct
  chunk field texts (model loaded before the clock starts);
- warm: the cold directory again with the same snapshot (everything cached, nothing to write);
- delta: a fresh directory built from the old snapshot, then refreshed to the new one; its index
  is compared with the cold build's (ids, content hashes and search results);
- courses: the same 800 distinct real entries as 200 courses of 4 and in their 3 real courses,
  a cold refresh and unchanged reruns of each on a persistent SQLite instance, whose growth is
  measured;
- scale: synthetic corpora of N chunks grown from the real one (copies with perturbed words);
- semantic: a cold run with RAG_RERANKER=semantic (sentence vectors made), and the cost of a
  sentence vector per chunk on a sample of each synthetic corpus; queries are timed in every
  reranking mode.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import sqlite3
import statistics
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
from rag_assets.defs.courses import CourseSet
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
COURSE_ASSETS = ["raw_documents", "chunks", "lemmas", "embeddings"]
RESULTS = Path("bench-results.json")
ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its largest child (spaCy workers), in MB."""
    return {
        "process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "largest_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def run_job(
    documents: str, workdir: Path, processes: int, reranker: str = DEFAULT_RERANKER
) -> dict[str, Any]:
    """One real refresh, one run, on the persistent SQLite instance of `workdir/dagster`: seconds
    per asset (all its steps), the checks' steps, the counts from the run's materializations, and
    how much the instance grew."""
    resources = {
        "source": DocumentSourceResource(url=documents),
        "nlp": NlpResource(processes=processes, cache_dir=str(workdir / "cache"), reranker=reranker),
        "search_index": SearchIndexResource(data_dir=str(workdir)),
        "quality_settings": QualityResource(max_entry_drop=1.0, max_course_entry_drop=1.0),
        "io_manager": dg.FilesystemIOManager(base_dir=str(workdir / "assets")),
        "refresh_lock": RefreshLockResource(data_dir=str(workdir)),
    }
    definitions = with_resources(load_definitions(), resources)
    home = workdir / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    size_before = directory_mb(home)
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        started = time.perf_counter()
        done = refresh(instance, definitions)
        wall = time.perf_counter() - started
        assert done.success, done.problems
        logs = instance.all_logs(done.run_id)
    size_after = directory_mb(home)
    steps = step_times(logs)
    totals: dict[str, dict[str, Any]] = {asset: {} for asset in ASSETS}
    peaks = dict.fromkeys(ASSETS, 0.0)
    for entry in logs:
        materialization = entry.asset_materialization
        if materialization is not None:
            asset = materialization.asset_key.to_user_string()
            totals[asset] = {key: value.value for key, value in materialization.metadata.items()}
            peaks[asset] = max(peaks[asset], float(totals[asset]["peak_rss_mb"]))
    figures = asset_figures(steps)
    return {
        **figures,
        "run_wall_s": round(wall, 3),
        "between_steps_s": round(wall - figures["all_steps_s"], 3),
        "instance_mb": {
            "before": size_before,
            "after": size_after,
            "grew": round(size_after - size_before, 3),
        },
        "courses": totals["chunks"].get("courses", 0),
        "chunks": totals["es_index"]["chunks"],  # the join's totals leave out reused values' counts
        "lemmas_computed": totals["lemmas"].get("computed", 0),
        "lemmas_reused": totals["lemmas"].get("reused", 0),
        "embeddings_computed": totals["embeddings"].get("computed", 0),
        "embeddings_reused": totals["embeddings"].get("reused", 0),
        "sentence_computed": totals["embeddings"].get("sentence_computed", 0),
        "sentence_s": round(sentence_seconds(workdir), 3),
        "index_upserted": totals["es_index"]["upserted"],
        "index_deleted": totals["es_index"]["deleted"],
        "peak_rss_mb_after_step": peaks,
    }


def directory_mb(path: Path) -> float:
    """The bytes of every file under `path` (a Dagster instance: its SQLite files, its logs), in MB."""
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 3)


def asset_of_step(step_key: str) -> str | None:
    """The asset a step belongs to (`lemmas`, `lemmas.split_courses`, `lemmas.lemmas_of_shard[shard_0]`,
    ...); None for an asset check's step (`chunks_chunks_well_formed`)."""
    return next((a for a in ASSETS if step_key == a or step_key.startswith(f"{a}.")), None)


def step_times(logs: list[Any]) -> dict[str, dict[str, float]]:
    """Each successful step of a run: its own seconds (Dagster's duration) and when it started and
    ended (event timestamps; with steps on other processes, their spans overlap)."""
    steps: dict[str, dict[str, float]] = {}
    for entry in logs:
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            steps.setdefault(event.step_key, {})["start"] = entry.timestamp
        elif event.is_step_success:
            step = steps.setdefault(event.step_key, {})
            step["end"] = entry.timestamp
            step["seconds"] = event.event_specific_data.duration_ms / 1000
    return {key: step for key, step in steps.items() if "seconds" in step}


def asset_figures(steps: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Seconds and step counts per asset; of the course assets, the shard steps (the work) apart
    from the split and join steps (the fan-out); the checks' steps together."""
    seconds = dict.fromkeys(ASSETS, 0.0)
    counts = dict.fromkeys(ASSETS, 0)
    shards = dict.fromkeys(COURSE_ASSETS, 0.0)
    checks = {"steps": 0, "seconds": 0.0}
    for key, step in steps.items():
        asset = asset_of_step(key)
        if asset is None:
            checks["steps"] += 1
            checks["seconds"] += step["seconds"]
            continue
        seconds[asset] += step["seconds"]
        counts[asset] += 1
        if "_of_shard[" in key:
            shards[asset] += step["seconds"]
    return {
        "seconds": {asset: round(s, 3) for asset, s in seconds.items()},
        "steps": counts,
        "shard_seconds": {asset: round(s, 3) for asset, s in shards.items()},
        "fan_out_seconds": {asset: round(seconds[asset] - shards[asset], 3) for asset in COURSE_ASSETS},
        "checks": {"steps": checks["steps"], "seconds": round(checks["seconds"], 3)},
        "all_steps_s": round(sum(seconds.values()) + checks["seconds"], 3),
    }


def course_set(workdir: Path, asset: str) -> CourseSet:
    """An asset's value as the last run left it (FilesystemIOManager's pickle)."""
    return pd.read_pickle(workdir / "assets" / asset)


def sentence_seconds(workdir: Path) -> float:
    """Seconds spent on sentence vectors by this run: the facts of the embeddings values it made."""
    values = [course["embeddings"] for course in course_set(workdir, "embeddings").values.values()]
    return sum(float(value.facts.get("sentence_s", 0.0)) for value in values if not value.reused)


def field_texts(chunks: pd.DataFrame) -> list[str]:
    return [str(v) for field in LEMMA_FIELDS for v in chunks[field]]


def spacy_floor(workdir: Path) -> dict[str, Any]:
    """spaCy's tokenizer alone, in one process, over the cold run's distinct field texts: what
    `lemmas` cannot go below per worker (it tokenizes each distinct text once, then looks tokens up).

    Runs in a fresh process like the cold run, so neither profits from the other's warm-up; the
    model is loaded before the clock starts."""
    # the handles the chunks asset passed on: one stored value per course
    handles = [course["chunks"] for course in course_set(workdir, "chunks").values.values()]
    chunks = pd.concat([handle.load() for handle in handles], ignore_index=True)
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
    if args.scenario in ("warm", "refresh"):
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


def course_corpora(source: str, root: Path, entries: int = 800, courses: int = 200) -> dict[str, Path]:
    """The same `entries` distinct real entries (no question or answer twice) twice: in their
    real courses, and dealt round-robin into `courses` courses of equal size."""
    frame = load_documents(source, Fetcher()).frame
    frame = frame.drop_duplicates("question").drop_duplicates("answer")
    picked = frame.sample(entries, random_state=17).sort_index()
    real = [
        {"course": e.course, "section": e.section, "question": e.question, "answer": e.answer}
        for e in picked.itertuples(index=False)
    ]
    corpora = {
        f"{len({e['course'] for e in real})} courses": real,
        f"{courses} courses": [{**e, "course": f"course-{n % courses:03d}"} for n, e in enumerate(real)],
    }
    paths = {}
    for name, listed in corpora.items():
        paths[name] = root / f"courses-{name.replace(' ', '-')}.json"
        paths[name].write_text(json.dumps(listed))
    return paths


def courses_point(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Issue 25's bench point: many tiny courses against the same entries in a few courses. Each
    repeat: a fresh directory and instance per corpus, a cold refresh, then unchanged reruns; the
    corpora interleaved refresh by refresh, so a noisy moment hits both."""
    corpora = course_corpora(args.new, root)
    series: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in corpora}
    for repeat in range(args.course_repeats):
        for name in corpora:
            series[name].append([])
        for _ in range(1 + args.course_reruns):
            for name, corpus in corpora.items():
                workdir = root / f"courses-{repeat}-{name.replace(' ', '-')}"
                series[name][repeat].append(run_scenario("refresh", workdir, args, new=str(corpus)))
        for name in corpora:
            shutil.rmtree(root / f"courses-{repeat}-{name.replace(' ', '-')}")
    for corpus in corpora.values():
        corpus.unlink()
    return {"corpora": list(corpora), "refreshes": series}


def make_run(documents: str, workdir: Path) -> dict[str, Any]:
    """`make run` on a fresh data directory and instance: its process's wall time, from outside."""
    home = workdir / "dagster"
    home.mkdir(parents=True)
    shutil.copy(ROOT / "dagster-instance.yaml", home / "dagster.yaml")  # as the Makefile's run target does
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_", "DOCUMENTS_URL"))}
    env |= {
        "DAGSTER_HOME": str(home),
        "RAG_DATA_DIR": str(workdir / "data"),
        "DOCUMENTS_URL": str(Path(documents).resolve()),
    }
    print("[bench] make run ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "rag_assets.defs.refresh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"make run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    summary = [line for line in done.stdout.splitlines() if line.startswith("refresh: ")]
    return {"wall_s": round(wall, 3), "summary": summary}


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
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"scenario {name} failed:\n{done.stderr[-4000:]}")
    return {
        **json.loads(done.stdout.strip().splitlines()[-1]),
        "process_wall_s": round(time.perf_counter() - started, 3),
    }


def report(results: dict[str, Any]) -> None:
    runs = {name: r for name, r in results["scenarios"].items() if isinstance(r, dict) and "seconds" in r}
    if runs:
        print(
            f"{'scenario':<18}"
            + "".join(f"{a:>14}" for a in ASSETS)
            + f"{'checks':>8}{'wall':>8}{'computed':>10}{'reused':>8}"
            + f"{'upserted':>10}{'deleted':>9}{'peak MB':>9}"
        )
        for name, r in runs.items():
            print(
                f"{name:<18}"
                + "".join(f"{r['seconds'][a]:>8.3f} ({r['steps'][a]:>2})" for a in ASSETS)
                + f"{r['checks']['seconds']:>8.3f}{r['run_wall_s']:>8.2f}{r['lemmas_computed']:>10}"
                f"{r['lemmas_reused']:>8}{r['index_upserted']:>10}{r['index_deleted']:>9}{peak_mb(r):>9.0f}"
            )
        print(
            "(an asset's seconds: the sum over its steps, their count in brackets; "
            "checks: every check's step)"
        )
        print()
    for key, value in results["summary"].items():
        print(f"{key}: {value}")
    if results["targets"]:
        print("\nissue 25 targets (median [range] over the repeats):")
        for line in results["targets"]:
            print(f"  {line}")


def peak_mb(run: dict[str, Any]) -> float:
    """The run's peak: its own process or its largest worker, whichever is larger."""
    return max(run["peak_rss_mb"].values())


def spread(values: list[float], digits: int = 3) -> str:
    """Median and range: `2.81 [2.60-3.12] (n=5)`."""
    if not values:
        return "n/a"
    low, middle, high = (round(v, digits) for v in (min(values), statistics.median(values), max(values)))
    return f"{middle} [{low}-{high}] (n={len(values)})"


def verdict(value: float, limit: float, unit: str = "") -> str:
    if value <= limit:
        return "met"
    return f"MISSED by {value - limit:.3g}{unit} ({value / limit:.2f}x the target)"


NLP_AND_PUBLISH = ["lemmas", "embeddings", "es_index"]


def targets(scenarios: dict[str, Any]) -> list[str]:
    """Issue 25's targets, each with its median, range and whether the median meets it."""
    lines = []
    colds = [scenarios["cold"], *scenarios.get("cold_repeats", [])] if "cold" in scenarios else []
    warms = [scenarios["warm"], *scenarios.get("warm_repeats", [])] if "warm" in scenarios else []
    if colds:
        steps = [sum(run["seconds"].values()) for run in colds]
        with_checks = [run["all_steps_s"] for run in colds]
        walls = [run["run_wall_s"] for run in colds]
        median = statistics.median(steps)
        lines += [
            f"(a) 1k cold refresh, the asset steps' own seconds: {spread(steps)} (target <= 3.0): "
            + verdict(median, 3.0, " s"),
            f"    with the checks' steps: {spread(with_checks)}; "
            f"the run's wall in its process: {spread(walls)}",
            "    steps per asset: "
            + ", ".join(f"{a} {colds[0]['steps'][a]}" for a in ASSETS)
            + f"; checks {colds[0]['checks']['steps']}",
            "    per asset, s (median): "
            + ", ".join(f"{a} {statistics.median(r['seconds'][a] for r in colds):.3f}" for a in ASSETS)
            + f"; checks {statistics.median(r['checks']['seconds'] for r in colds):.3f}",
            "    course assets' split+join steps, s (median): "
            + ", ".join(
                f"{a} {statistics.median(r['fan_out_seconds'][a] for r in colds):.3f}" for a in COURSE_ASSETS
            )
            + f"; between steps (run wall less every step): {spread([r['between_steps_s'] for r in colds])}",
        ]
    if "make_run" in scenarios:
        walls = [run["wall_s"] for run in scenarios["make_run"]]
        lines.append(
            f"(b) 1k cold `make run`, process wall s: {spread(walls)} (target <= 8): "
            + verdict(statistics.median(walls), 8.0, " s")
        )
    if colds and warms:
        shares = [
            sum(warm["seconds"][a] for a in NLP_AND_PUBLISH)
            / sum(cold["seconds"][a] for a in NLP_AND_PUBLISH)
            for cold, warm in zip(colds, warms, strict=False)
        ]
        warm_s = [sum(warm["seconds"][a] for a in NLP_AND_PUBLISH) for warm in warms]
        lines += [
            f"(c) 1k warm, lemmas+embeddings+es_index steps' seconds as a share of cold: {spread(shares, 4)}"
            " (target <= 0.05): " + verdict(statistics.median(shares), 0.05),
            f"    warm seconds of those steps: {spread(warm_s)}; warm, every step: "
            f"{spread([w['all_steps_s'] for w in warms])}; "
            f"warm run wall: {spread([w['run_wall_s'] for w in warms])}",
        ]
    if "courses" in scenarios:
        lines += course_targets(scenarios["courses"])
    return lines


def course_targets(point: dict[str, Any]) -> list[str]:
    few, many = point["corpora"]
    runs = point["refreshes"]
    lines = [f"(d) the same 800 entries as {many} against {few}, {len(runs[few])} repeats:"]
    for label, which in (("cold", slice(0, 1)), ("unchanged rerun", slice(1, None))):
        pairs = [
            (a, b)
            for repeat in range(len(runs[few]))
            for a, b in zip(runs[few][repeat][which], runs[many][repeat][which], strict=True)
        ]
        ratios = [b["run_wall_s"] / a["run_wall_s"] for a, b in pairs]
        process = [b["process_wall_s"] / a["process_wall_s"] for a, b in pairs]
        lines += [
            f"    {label}: run wall s, {few} {spread([a['run_wall_s'] for a, _ in pairs])}, "
            f"{many} {spread([b['run_wall_s'] for _, b in pairs])}",
            f"    {label}: wall ratio {many} / {few}: {spread(ratios)} (target <= 1.5): "
            + verdict(statistics.median(ratios), 1.5, "x")
            + f"; whole process's wall ratio {spread(process)}",
            f"    {label}: every step's seconds, {few} {spread([a['all_steps_s'] for a, _ in pairs])}, "
            f"{many} {spread([b['all_steps_s'] for _, b in pairs])}",
        ]
    for name in (few, many):
        first = [series[0]["instance_mb"]["after"] for series in runs[name]]
        grew = [run["instance_mb"]["grew"] for series in runs[name] for run in series[1:]]
        lines.append(
            f"    {name}: instance growth per refresh, MB: {spread(grew)} (target <= 5): "
            + verdict(statistics.median(grew), 5.0, " MB")
            + f"; instance after its first refresh (schema included): {spread(first)}"
        )
    return lines


def summarise(scenarios: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if "floor" in scenarios.get("cold", {}):
        cold, warm, delta = scenarios["cold"], scenarios["warm"], scenarios["delta"]
        nlp = cold["seconds"]["lemmas"] + cold["seconds"]["embeddings"]
        steps = sum(cold["seconds"].values())
        warm_steps = sum(warm["seconds"].values())
        summary |= {
            "cold 1k: NLP ms per chunk (target <= 0.5)": round(1000 * nlp / cold["chunks"], 3),
            "cold 1k: the asset steps' own seconds, the first run (target <= 3; all runs below)": round(
                steps, 3
            ),
            "cold 1k: seconds per asset (all its steps)": cold["seconds"],
            "cold 1k: steps per asset": cold["steps"],
            "cold 1k: the checks' steps, count and seconds": cold["checks"],
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
            "warm 1k: share of cold asset steps": round(warm_steps / steps, 4),
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
            "semantic 1k: the asset steps' own seconds": round(sum(semantic["seconds"].values()), 3),
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
    parser.add_argument(
        "--only",
        choices=["targets", "courses"],
        help="only issue 25's targets (1k cold and warm, make run, the courses point), "
        "or only the courses point",
    )
    parser.add_argument("--repeats", type=int, default=5, help="1k cold refreshes and make runs")
    parser.add_argument(
        "--course-repeats", type=int, default=3, help="fresh instances per corpus, courses point"
    )
    parser.add_argument("--course-reruns", type=int, default=2, help="unchanged reruns after each cold one")
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--compare", help=argparse.SUPPRESS)
    parser.add_argument("--reranker", default=DEFAULT_RERANKER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scale_only:
        args.only = "scale"
    if args.scenario:
        print(json.dumps({**scenario(args), "peak_rss_mb": peak_rss_mb()}))
        return
    with tempfile.TemporaryDirectory(prefix="rag-bench-") as tmp:
        root = Path(tmp)
        scenarios: dict[str, Any] = {}
        if args.only in (None, "targets"):
            scenarios["cold"] = run_scenario("cold", root / "cold", args)
        if args.only is None:
            scenarios["cold"]["floor"] = run_scenario("floor", root / "cold", args)
            scenarios["cold"]["queries"] = run_scenario("queries", root / "cold", args)  # the default mode
            for mode in sorted(set(RERANKER_MODES) - {DEFAULT_RERANKER, SEMANTIC}):  # semantic: below
                found = run_scenario("queries", root / "cold", args, reranker=mode)
                scenarios["cold"][f"queries_{mode}"] = found
            scenarios["semantic"] = run_scenario("semantic", root / "semantic", args)
            scenarios["semantic"]["queries"] = run_scenario(
                "queries", root / "semantic", args, reranker=SEMANTIC
            )
        if args.only in (None, "targets"):
            scenarios["warm"] = run_scenario("warm", root / "cold", args)
        if args.only is None:
            scenarios["delta"] = run_scenario("delta", root / "delta", args, compare=str(root / "cold"))
        if args.only in (None, "targets"):
            # issue 25's (a)-(c): more cold runs, each in a fresh directory followed by a warm one
            scenarios["cold_repeats"], scenarios["warm_repeats"] = [], []
            for repeat in range(1, args.repeats):
                workdir = root / f"cold-{repeat}"
                scenarios["cold_repeats"].append(run_scenario("cold", workdir, args))
                scenarios["warm_repeats"].append(run_scenario("warm", workdir, args))
                shutil.rmtree(workdir)
            scenarios["make_run"] = []
            for repeat in range(args.repeats):
                scenarios["make_run"].append(make_run(args.new, root / f"make-run-{repeat}"))
                shutil.rmtree(root / f"make-run-{repeat}")
        if args.only in (None, "targets", "courses"):
            scenarios["courses"] = courses_point(args, root)
        sizes = [int(s) for s in args.scale.split(",") if s.strip()] if args.only in (None, "scale") else []
        for size in sizes:
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
    results = {
        "processes": args.processes,
        "scenarios": scenarios,
        "summary": summarise(scenarios),
        "targets": targets(scenarios),
    }
    Path(args.out).write_text(json.dumps(results, indent=2))
    report(results)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
