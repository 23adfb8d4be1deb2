"""`make bench-scale-out`: a cold refresh of COURSES courses of CHUNKS chunks each, one run with its
steps on Celery workers (RAG_EXECUTOR=celery), with two workers each pinned to a core of its own
against one worker pinned to one core.

Each refresh is `dagster job execute -j faq_index_refresh` in a fresh process on a fresh data
directory and a persistent SQLite Dagster instance (DAGSTER_HOME) that the workers share; Redis is
Debian's `redis-server` on a free port of 127.0.0.1 (installed when missing), started for the
benchmark and stopped after it. Each worker is `celery -A dagster_celery.app worker -Q dagster
--concurrency 1` under `taskset -c N`, analysing with one spaCy process (RAG_NLP_PROCESSES=1).
The orchestrating run process is not pinned: it shares the cores with the workers.

Beside them: `make run` (every step in its process, two spaCy processes), and one unpartitioned
build without Dagster (`IndexContent.assemble`, one publish). The indexes are compared by chunk
ids and content hashes and by the hits of 50 questions with their course filter.

From the run's events: the course steps (every shard step of raw_documents, chunks, lemmas and
embeddings: their span per asset, first start to last end, added up over the four assets, and
their own seconds), the serial steps (the source, the publish, the checks, the splits and joins)
and the run's wall.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dagster as dg
from refresh import COURSE_ASSETS, asset_figures, asset_of_step, step_times, synthetic_corpus

from rag_assets.defs.automation import JOB_NAME
from rag_assets.evaluation import build_index
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.ingest.sources import Fetcher, load_documents
from rag_assets.nlp.analysis import NlpSettings, load_pipeline
from rag_assets.retrieval import Retriever

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def course_corpus(source: str, courses: int, chunks_per_course: int, path: Path) -> None:
    """The synthetic corpus of `make bench`, dealt round-robin into `courses` courses."""
    synthetic_corpus(source, courses * chunks_per_course, path)
    entries = json.loads(path.read_text())
    for position, item in enumerate(entries):
        item["course"] = f"course-{position % courses}"
    path.write_text(json.dumps(entries))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(what: str, ready: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not ready after {timeout_s:.0f} s")
        time.sleep(0.2)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def ensure_redis() -> str:
    """Debian's redis-server, installed when missing."""
    found = shutil.which("redis-server")
    if found:
        return found
    print("[scale-out] installing redis-server (Debian) ...", file=sys.stderr, flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True)
    return shutil.which("redis-server") or "/usr/bin/redis-server"


class Processes:
    """The processes this benchmark starts, each in a session of its own, stopped by its id."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
            )
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
        """SIGTERM to the process's own group (a Celery worker and its pool child: a warm
        shutdown), SIGKILL if it is still there after `timeout_s`."""
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.started.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.started)):
            self.stop(process)


def environment(workdir: Path, corpus: Path, **extra: str) -> dict[str, str]:
    """The refresh's settings, for the run process and the workers alike; nothing of this shell's
    own RAG_ or DAGSTER_ settings."""
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_", "DOCUMENTS_URL"))
    }
    return inherited | {
        "DAGSTER_HOME": str(workdir / "dagster"),
        "RAG_DATA_DIR": str(workdir / "data"),
        "DOCUMENTS_URL": str(corpus),
        "RAG_NLP_PROCESSES": "1",
        **extra,
    }


def new_instance_home(workdir: Path) -> None:
    (workdir / "dagster").mkdir(parents=True)
    shutil.copy(ROOT / "dagster-instance.yaml", workdir / "dagster" / "dagster.yaml")  # as `make run` has it


def celery_refresh(
    processes: Processes, corpus: Path, workdir: Path, broker: str, cores: list[int]
) -> dict[str, Any]:
    """One cold refresh, one run, its steps on one Celery worker per core of `cores`."""
    new_instance_home(workdir)
    env = environment(
        workdir,
        corpus,
        RAG_EXECUTOR="celery",
        DAGSTER_CELERY_BROKER_URL=broker,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "deploy"), os.environ.get("PYTHONPATH")])),
    )
    logs = [workdir / f"worker-{core}.log" for core in cores]
    workers = [
        processes.start(
            [
                "taskset",
                "-c",
                str(core),
                str(VENV_BIN / "celery"),
                "-A",
                "dagster_celery.app",
                "worker",
                "-Q",
                "dagster",
                "--concurrency",
                "1",
                "--hostname",
                f"bench-core{core}@%h",
                "--loglevel",
                "INFO",
            ],
            log,
            env,
        )
        for core, log in zip(cores, logs, strict=True)
    ]

    def ready() -> bool:
        for worker, log in zip(workers, logs, strict=True):
            if worker.poll() is not None:
                raise SystemExit(f"a Celery worker exited ({worker.returncode}); see {log}")
        return all("ready." in log.read_text(errors="replace") for log in logs)

    wait_for("Celery workers", ready, 120)
    print(
        f"[scale-out] {len(cores)} worker(s) ready on core(s) {cores}; the run ...",
        file=sys.stderr,
        flush=True,
    )
    try:
        figures = timed_run(
            [str(VENV_BIN / "dagster"), "job", "execute", "-m", "rag_assets.definitions", "-j", JOB_NAME],
            env,
            workdir,
        )
    finally:
        for worker in workers:
            processes.stop(worker)
    return {**figures, "workers": len(cores), "cores": cores}


def in_process_refresh(corpus: Path, workdir: Path) -> dict[str, Any]:
    """`make run`: every step in the run's process, spaCy with its default processes (2 here)."""
    new_instance_home(workdir)
    env = environment(workdir, corpus)
    del env["RAG_NLP_PROCESSES"]
    return timed_run([sys.executable, "-m", "rag_assets.defs.refresh"], env, workdir)


def timed_run(argv: list[str], env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """The refresh's process, timed from outside; then its run's steps, from the instance."""
    started = time.perf_counter()
    with open(workdir / "run.log", "wb") as out:
        done = subprocess.run(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    if done.returncode:
        tail = (workdir / "run.log").read_text(errors="replace")[-4000:]
        raise SystemExit(f"{' '.join(argv[:3])} failed ({done.returncode}):\n{tail}")
    with dg.DagsterInstance.local_temp(str(workdir / "dagster")) as instance:
        [run] = instance.get_runs(limit=1)
        if run.status != dg.DagsterRunStatus.SUCCESS:
            raise SystemExit(f"run {run.run_id} ended {run.status.value}; see {workdir / 'run.log'}")
        logs = instance.all_logs(run.run_id)
    return {"process_wall_s": round(wall, 1), "run_id": run.run_id, **run_figures(logs)}


def run_figures(logs: list[Any]) -> dict[str, Any]:
    steps = step_times(logs)
    times = [entry.timestamp for entry in logs if entry.dagster_event is not None]
    run_wall = max(times) - min(times)
    figures = asset_figures(steps)
    spans = {}
    for asset in COURSE_ASSETS:
        shards = [step for key, step in steps.items() if asset_of_step(key) == asset and "_of_shard[" in key]
        spans[asset] = round(max(s["end"] for s in shards) - min(s["start"] for s in shards), 2)
    course_keys = [key for key in steps if asset_of_step(key) in COURSE_ASSETS]
    taken: dict[str, int] = {}  # steps per Celery worker, from the workers' own events
    for entry in logs:
        event = entry.dagster_event
        if event is not None and event.is_engine_event and "Executing steps" in (event.message or ""):
            worker = event.event_specific_data.metadata.get("Celery worker")
            if worker is not None:
                taken[str(worker.value)] = taken.get(str(worker.value), 0) + 1
    course_phase = max(steps[k]["end"] for k in course_keys) - min(steps[k]["start"] for k in course_keys)
    return {
        "run_wall_s": round(run_wall, 1),
        "course_steps": {
            "span_s": round(sum(spans.values()), 1),
            "span_per_asset_s": spans,
            "own_seconds": round(sum(figures["shard_seconds"].values()), 1),
            "shards": {asset: figures["steps"][asset] - 2 for asset in COURSE_ASSETS},
        },
        "course_assets_s": round(course_phase, 1),  # from the first split to the last join
        "serial_s": {
            "faq_source": figures["seconds"]["faq_source"],
            "es_index": figures["seconds"]["es_index"],
            "splits_and_joins": round(sum(figures["fan_out_seconds"].values()), 2),
            "checks": figures["checks"]["seconds"],
        },
        "steps_per_worker": taken,
        "seconds": figures["seconds"],
        "step_seconds": {key: round(step["seconds"], 2) for key, step in steps.items()},
    }


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
    parser.add_argument("--no-in-process", action="store_true", help="skip the `make run` refresh")
    parser.add_argument("--no-unpartitioned", action="store_true", help="skip the build without Dagster")
    parser.add_argument("--keep", help="keep the working directories in this folder (for a look at the logs)")
    args = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two cores to pin two workers to")
    redis_server = ensure_redis()
    processes = Processes()
    with tempfile.TemporaryDirectory(prefix="rag-scale-out-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / "corpus.json"
        print("[scale-out] the corpus ...", file=sys.stderr, flush=True)
        course_corpus(str(Path(args.new).resolve()), args.courses, args.chunks_per_course, corpus)
        port = free_port()
        try:
            redis = processes.start(
                [
                    redis_server,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                work / "redis.log",
            )
            wait_for("Redis", lambda: port_open(port) or redis.poll() is not None, 30)
            if redis.poll() is not None:
                raise SystemExit(f"redis-server exited; see {work / 'redis.log'}")
            broker = f"redis://127.0.0.1:{port}"
            runs: dict[str, dict[str, Any]] = {}
            # a Redis database each, so nothing of one refresh is left for the next
            runs["one worker"] = celery_refresh(processes, corpus, work / "one", f"{broker}/0", cores=[0])
            runs["two workers"] = celery_refresh(processes, corpus, work / "two", f"{broker}/1", cores=[0, 1])
        finally:
            processes.stop_all()
        built = {"one worker": work / "one" / "data", "two workers": work / "two" / "data"}
        if not args.no_in_process:
            print("[scale-out] make run (in process) ...", file=sys.stderr, flush=True)
            runs["make run (in process, 2 spaCy processes)"] = in_process_refresh(corpus, work / "in-process")
            built["make run"] = work / "in-process" / "data"
        whole_s = None
        if not args.no_unpartitioned:
            print("[scale-out] unpartitioned build ...", file=sys.stderr, flush=True)
            whole_s = unpartitioned(corpus, work / "whole")
            built["unpartitioned"] = work / "whole"
        hashes = {name: EmbeddedIndex(path).chunk_hashes() for name, path in built.items()}
        hits = {name: searches(path, corpus) for name, path in built.items()}
        reference = "one worker"
        same = {
            name: {
                "ids_and_hashes": hashes[name] == hashes[reference],
                "search": hits[name] == hits[reference],
            }
            for name in built
            if name != reference
        }
        one, two = runs["one worker"], runs["two workers"]
        results = {
            "courses": args.courses,
            "chunks": len(hashes[reference]),
            "runs": runs,
            "unpartitioned_build_s": whole_s,
            "speed_up": {
                "course_steps_span": round(one["course_steps"]["span_s"] / two["course_steps"]["span_s"], 2),
                "course_assets": round(one["course_assets_s"] / two["course_assets_s"], 2),
                "run_wall": round(one["run_wall_s"] / two["run_wall_s"], 2),
                "process_wall": round(one["process_wall_s"] / two["process_wall_s"], 2),
            },
            "same_as_one_worker": same,
        }
    Path(args.out).write_text(json.dumps(results, indent=1))
    report(results)
    print(f"written to {args.out}")


def report(results: dict[str, Any]) -> None:
    print(f"{results['chunks']:,} chunks in {results['courses']} courses, a cold refresh each")
    for name, run in results["runs"].items():
        course = run["course_steps"]
        serial = run["serial_s"]
        print(
            f"{name}: whole refresh {run['process_wall_s']} s (the run {run['run_wall_s']} s); course shard "
            f"steps {course['span_s']} s of wall, {course['own_seconds']} s of their own "
            f"({sum(course['shards'].values())} steps); the four course assets, first split to last join, "
            f"{run['course_assets_s']} s; serial: source {serial['faq_source']} s, publish "
            f"{serial['es_index']} s, splits and joins {serial['splits_and_joins']} s, "
            f"checks {serial['checks']} s; steps per worker {run['steps_per_worker'] or '-'}"
        )
    if results["unpartitioned_build_s"] is not None:
        print(f"unpartitioned build, no Dagster: {results['unpartitioned_build_s']} s")
    speed = results["speed_up"]
    print(
        f"two workers against one: course steps {speed['course_steps_span']}x (target >= 1.8), "
        f"whole refresh {speed['process_wall']}x (the run {speed['run_wall']}x; target >= 1.5); "
        f"the four course assets {speed['course_assets']}x"
    )
    print(f"same index as with one worker: {results['same_as_one_worker']}")


if __name__ == "__main__":
    main()
