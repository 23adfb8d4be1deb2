"""The deployment rehearsal (`make rehearse`): the docker-compose deployment without the containers.

It starts PostgreSQL, Redis, two Celery step workers, `dagster-daemon` and `dagster-webserver` on
127.0.0.1 with the deployment's own instance configuration (deploy/dagster.yaml, byte for byte)
and the environment variables docker-compose sets, serves the FAQ from a local HTTP server, and
then only watches: every observation comes from the webserver's GraphQL API, the files of the
served index and the workers' logs, and a headless Chromium, never from calling the project's
code. It exits 0 only when every observation held, and stops everything it started, by process
id, whatever happened.

The source it serves is the FAQ with copies of its courses added (`<course>-copy-NN`, answers
shortened) until it holds more than a shard's rows, so that each per-course asset fans out over
at least two steps and the two workers can be seen taking them side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
INSTANCE_CONFIG = ROOT / "deploy" / "dagster.yaml"
COMPOSE = ROOT / "docker-compose.yml"
# Names an operator sees in the UI; the rehearsal observes them from outside, as a user would.
ASSETS = ("faq_source", "raw_documents", "chunks", "lemmas", "embeddings", "es_index")
COURSE_ASSETS = ("raw_documents", "chunks", "lemmas", "embeddings")
FRESHNESS_ASSETS = ("faq_source", "es_index")
JOB = "faq_index_refresh"  # the one job: a refresh is one run of it
GROUP = "faq_index"
# rag_assets/defs/courses.py packs whole courses into shards of at most this many rows, one step
# each; the served source holds more, so every per-course asset has two steps or more.
SHARD_ROWS = 10_000
COPY_CHARS = 160  # the answers of the source's copied courses are cut to this length
SENSOR = "initial_index_build"
SCHEDULE = "daily_document_refresh"
INDEX_FILE = "index.sqlite"
POSTGRES_PORT = 5432  # fixed in deploy/dagster.yaml
CHROMIUM = "/usr/bin/chromium"
# Debian package -> a program it installs (psql alone comes with the client package, not initdb).
DEBIAN_PACKAGES = {
    "postgresql": "/usr/lib/postgresql/*/bin/initdb",
    "chromium": CHROMIUM,
    "redis-server": "/usr/bin/redis-server",
}
CELERY_WORKERS = 2  # docker-compose.yml's celery-worker replicas
# dagster_celery's task records, in its run's events, the step it runs and the worker running it.
CELERY_STEP_EVENT = ("] Executing steps ", " in celery worker")  # after "[CeleryExecutor"
CELERY_WORKER_LABEL = "Celery worker"
SHARD_STEP = "_of_shard["  # e.g. lemmas.lemmas_of_shard[shard_0]
# Without the background-networking flags Chromium keeps dialling Google's hosts on a closed network.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TRICKLE_EVERY_S = 2.0
SEARCH_QUESTION = "Can I still join the course after the start date?"
# A run the queue launched: enqueued by the coordinator, started by the queue daemon.
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")  # run statuses that do not change any more
QUEUED_PATH = ["RunEnqueuedEvent", "RunStartingEvent", "RunStartEvent", "RunSuccessEvent"]
LIFECYCLE = {*QUEUED_PATH, "RunDequeuedEvent"}


class ObservationFailed(Exception):
    """An observation did not hold; the message says what was seen instead."""


@dataclass
class Observation:
    name: str
    held: bool
    at_s: float  # since the rehearsal started
    took_s: float
    detail: str


class Report:
    """Prints each observation with its timing as it happens and keeps them for rehearsal.json."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.observations: list[Observation] = []

    def observe(self, name: str, check: Callable[[], str]) -> None:
        began = time.monotonic()
        try:
            detail, held = check(), True
        except Exception as exc:
            detail, held = f"{type(exc).__name__}: {exc}", False
        now = time.monotonic()
        self.observations.append(Observation(name, held, now - self.started, now - began, detail))
        mark = "ok" if held else "FAILED"
        print(f"[{now - self.started:6.1f} s] {mark:6} {name} ({now - began:.1f} s): {detail}", flush=True)
        if not held:
            raise ObservationFailed(name)

    @property
    def held(self) -> bool:
        return bool(self.observations) and all(o.held for o in self.observations)


def wait_for[T](what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 2.0) -> T:
    """The first non-None answer of `probe`, polled until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = probe()
        if answer is not None:
            return answer
        if time.monotonic() > deadline:
            raise ObservationFailed(f"{what}: not seen within {timeout_s:.0f} s")
        time.sleep(every_s)


class Processes:
    """The processes the rehearsal starts, each in a session of its own, so that stopping one also
    stops what it spawned (the daemon's code server and the run workers it launches)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen[bytes], signal.Signals]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        stdin: bytes | None = None,
    ) -> subprocess.Popen[bytes]:
        """`stdin`: written to the process and closed (a configuration holding a secret, which
        then appears in no argument and no file)."""
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.PIPE if stdin is not None else None,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user,
            )
        if stdin is not None and process.stdin is not None:
            process.stdin.write(stdin)
            process.stdin.close()
        self.started.append((name, process, stop_signal))
        return process

    def alive(self, name: str) -> bool:
        return any(n == name and p.poll() is None for n, p, _ in self.started)

    def stop_all(self, grace_s: float = 30.0) -> str:
        """Stops the processes in reverse order of start, by process id: the signal each expects,
        then SIGTERM and at last SIGKILL for whatever of its session is still there."""
        stopped: list[str] = []
        for name, process, stop_signal in reversed(self.started):
            members = set(session_members(process.pid))
            if process.poll() is None:
                process.send_signal(stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace_s)
            forced = []
            for last_signal in (signal.SIGTERM, signal.SIGKILL):
                members |= set(session_members(process.pid))
                left = [pid for pid in members if pid_alive(pid)]
                for pid in left:
                    os.kill(pid, last_signal)
                    forced.append(f"{last_signal.name} to {pid}")
                deadline = time.monotonic() + 10
                while any(pid_alive(pid) for pid in left) and time.monotonic() < deadline:
                    time.sleep(0.2)
            process.wait(timeout=10)
            forced_note = f"; {', '.join(forced)}" if forced else ""
            stopped.append(f"{name} (pid {process.pid}, {len(members)} processes{forced_note})")
        self.started.clear()
        return "; ".join(stopped) or "nothing was running"


def session_members(session_id: int) -> list[int]:
    """Processes of the session `session_id` (a session leader's pid), from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session_id:
                    members.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
    return members


def proc_stat(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state first, then the parent's
    pid), or [] for a process that is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def pid_alive(pid: int) -> bool:
    return proc_stat(pid)[:1] not in ([], ["Z"])


def child_processes() -> list[int]:
    """Live children of this process (the browser's driver, say)."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit()
        and (fields := proc_stat(entry.name))[1:2] == [str(os.getpid())]
        and fields[0] != "Z"
    ]


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def redis_reply(port: int, command: bytes) -> bytes:
    """Redis's first reply line to `command`, sent without authenticating."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(command)
        return connection.recv(256).split(b"\n", 1)[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SourceServer:
    """The FAQ source on 127.0.0.1. In slow mode it trickles a space every 2 s before the JSON,
    as a stalled upstream would, so a run reading it stays busy without hitting a read timeout."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.slow = threading.Event()
        self.closing = threading.Event()
        self.requests: list[tuple[str, str]] = []  # (UTC time, "fast" | "slow")
        self.slow_requests = 0
        source = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/documents.json":
                    self.send_error(404)
                    return
                slow = source.slow.is_set()
                source.slow_requests += slow
                source.requests.append(
                    (datetime.now(UTC).isoformat(timespec="seconds"), "slow" if slow else "fast")
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()  # no Content-Length: the body ends when the connection closes
                # The reader going away (a run stopped mid-read) is expected; nothing to report.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    while slow and source.slow.is_set() and not source.closing.wait(TRICKLE_EVERY_S):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                    self.wfile.write(source.payload)

            def log_message(self, *args: Any) -> None:  # the requests list is the log
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/documents.json"
        self.thread = threading.Thread(target=self.server.serve_forever, name="source-server", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


class Postgres:
    """A PostgreSQL server of Debian's packages in a fresh data directory, on deploy/dagster.yaml's port."""

    def __init__(self, processes: Processes, password: str) -> None:
        self.processes = processes
        self.password = password
        initdb = max(
            Path("/").glob(DEBIAN_PACKAGES["postgresql"].lstrip("/")), key=lambda p: int(p.parts[-3])
        )
        self.bin = initdb.parent
        self.data = Path(tempfile.mkdtemp(prefix="rag-rehearsal-pg-"))
        shutil.chown(self.data, "postgres", "postgres")

    def start(self) -> str:
        if port_open(POSTGRES_PORT):
            raise ObservationFailed(
                f"127.0.0.1:{POSTGRES_PORT} (the port deploy/dagster.yaml names) is taken by another server"
            )
        self._as_postgres(
            self.bin / "initdb",
            "-D",
            self.data,
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        )
        self.processes.start(
            "postgres",
            [
                str(self.bin / "postgres"),
                *("-D", str(self.data), "-p", str(POSTGRES_PORT)),
                *("-c", "listen_addresses=127.0.0.1", "-k", str(self.data)),
            ],
            user="postgres",
            stop_signal=signal.SIGINT,  # fast shutdown
        )
        wait_for(
            "PostgreSQL accepting connections", lambda: True if port_open(POSTGRES_PORT) else None, 60, 0.5
        )
        # The password goes in on stdin, never on a command line.
        sql = (
            f"CREATE ROLE dagster LOGIN PASSWORD '{self.password}';\nCREATE DATABASE dagster OWNER dagster;\n"
        )
        self._as_postgres(
            self.bin / "psql",
            *("-h", self.data, "-p", POSTGRES_PORT, "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-q"),
            stdin=sql,
        )
        version = self._as_postgres(self.bin / "postgres", "--version").strip()
        return (
            f"{version} on 127.0.0.1:{POSTGRES_PORT}, data in {self.data}, database dagster owned by dagster"
        )

    def _as_postgres(self, *argv: object, stdin: str | None = None) -> str:
        done = subprocess.run(
            [str(a) for a in argv],
            input=stdin,
            capture_output=True,
            text=True,
            user="postgres",
            cwd=self.data,
        )
        if done.returncode != 0:
            raise ObservationFailed(f"{Path(str(argv[0])).name} failed: {done.stderr.strip()[-500:]}")
        return done.stdout

    def remove(self) -> None:
        shutil.rmtree(self.data, ignore_errors=True)


class DagsterApi:
    """The webserver's GraphQL API: what the UI itself reads."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = requests.Session()
        self.repository: dict[str, str] = {}

    def query(self, text: str, **variables: Any) -> dict[str, Any]:
        response = self.session.post(
            f"{self.base_url}/graphql", json={"query": text, "variables": variables}, timeout=60
        )
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise ObservationFailed(f"GraphQL error: {body['errors'][0].get('message')}")
        return body["data"]

    def find_repository(self) -> str | None:
        data = self.query(
            "{ repositoriesOrError { __typename ... on RepositoryConnection"
            " { nodes { name location { name } schedules { name } sensors { name } } } } }"
        )
        for node in data["repositoriesOrError"].get("nodes", []):
            if SCHEDULE in {s["name"] for s in node["schedules"]}:
                self.repository = {
                    "repositoryName": node["name"],
                    "repositoryLocationName": node["location"]["name"],
                }
                return f"{node['location']['name']} ({node['name']})"
        return None

    def ticks(self, kind: str, name: str) -> list[dict[str, Any]]:
        """Newest first; kind is "sensor" or "schedule"."""
        state = "sensorState" if kind == "sensor" else "scheduleState"
        field, kind_type = f"{kind}OrError", kind.capitalize()
        selector = self.repository | {f"{kind}Name": name}
        ticks = "ticks(limit: 50) { status timestamp runIds skipReason error { message } }"
        data = self.query(
            f"query($s: {kind_type}Selector!) {{ {field}({kind}Selector: $s) {{ __typename"
            f" ... on {kind_type} {{ {state} {{ {ticks} }} }} ... on PythonError {{ message }} }} }}",
            s=selector,
        )[field]
        if state not in data:
            raise ObservationFailed(f"{kind} {name}: {data}")
        return data[state]["ticks"]

    def wait_tick_with_run(self, kind: str, name: str, timeout_s: float = 150) -> dict[str, Any]:
        """The newest tick of the sensor or schedule that launched a run (a tick comes a minute
        at most after the last, so 150 s covers one skipped tick)."""
        return wait_for(
            f"a {name} tick with a run",
            lambda: next((t for t in self.ticks(kind, name) if t["runIds"]), None),
            timeout_s,
        )

    def run(self, run_id: str) -> dict[str, Any]:
        return self.query(
            "query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { runId status jobName"
            " creationTime startTime endTime tags { key value } } } }",
            id=run_id,
        )["runOrError"]

    def runs_created_after(self, timestamp: float) -> list[dict[str, Any]]:
        return self.query(
            "query($t: Float) { runsOrError(filter: {createdAfter: $t}) { ... on Runs"
            " { results { runId status creationTime tags { key value } } } } }",
            t=timestamp,
        )["runsOrError"]["results"]

    def runs(self, **run_filter: Any) -> list[dict[str, Any]]:
        """Runs matching a RunsFilter (tags as {key: value}), oldest first."""
        if "tags" in run_filter:
            run_filter["tags"] = [{"key": k, "value": v} for k, v in run_filter["tags"].items()]
        return self.query(
            "query($f: RunsFilter) { runsOrError(filter: $f) { ... on Runs { results { runId status jobName"
            " creationTime startTime endTime tags { key value } } } } }",
            f=run_filter,
        )["runsOrError"]["results"][::-1]

    def materializations(self, asset: str, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first, with the JSON and numeric metadata."""
        return self.query(
            "query($k: AssetKeyInput!, $n: Int) { assetOrError(assetKey: $k) { ... on Asset"
            " { assetMaterializations(limit: $n) { runId timestamp metadataEntries { label"
            " ... on JsonMetadataEntry { jsonString } ... on IntMetadataEntry { intValue } } } } } }",
            k={"path": [asset]},
            n=limit,
        )["assetOrError"]["assetMaterializations"]

    def made_by(self, run_id: str) -> dict[str, list[dict[str, Any]]]:
        """Each asset's materializations by the run `run_id`."""
        return {name: [m for m in self.materializations(name) if m["runId"] == run_id] for name in ASSETS}

    def check_results(self, run_id: str) -> list[tuple[str, str, str | None]]:
        """(asset, check, status) of every check of the six assets, as the run `run_id` left it
        (status None: the run did not execute the check)."""
        assets = self.assets()
        results = []
        for name in ASSETS:
            for check in assets[name]["assetChecksOrError"].get("checks", []):
                executions = self.query(
                    "query($k: AssetKeyInput!, $c: String!) { assetCheckExecutions(assetKey: $k,"
                    " checkName: $c, limit: 50) { runId status } }",
                    k={"path": [name]},
                    c=check["name"],
                )["assetCheckExecutions"]
                status = next((e["status"] for e in executions if e["runId"] == run_id), None)
                results.append((name, check["name"], status))
        return results

    def step_stats(self, run_id: str) -> list[dict[str, Any]]:
        return self.query(
            "query($id: ID!) { runOrError(runId: $id) { ... on Run"
            " { stepStats { stepKey status startTime endTime } } } }",
            id=run_id,
        )["runOrError"]["stepStats"]

    def events(self, run_id: str) -> list[dict[str, Any]]:
        """The run's events; engine events with their text metadata (the Celery worker's name)."""
        return self.query(
            "query($id: ID!) { logsForRun(runId: $id, limit: 10000) { __typename ... on EventConnection"
            " { events { __typename ... on MessageEvent { message timestamp stepKey }"
            " ... on EngineEvent { metadataEntries { label ... on TextMetadataEntry { text } } } } } } }",
            id=run_id,
        )["logsForRun"]["events"]

    def assets(self) -> dict[str, dict[str, Any]]:
        nodes = self.query(
            "{ assetNodes { assetKey { path } assetMaterializations(limit: 1) { runId timestamp }"
            " freshnessStatusInfo { freshnessStatus freshnessStatusMetadata { lastMaterializedTimestamp } }"
            " assetChecksOrError { ... on AssetChecks { checks { name"
            " executionForLatestMaterialization { runId status } } } } } }"
        )["assetNodes"]
        return {"/".join(node["assetKey"]["path"]): node for node in nodes}

    def wait_run_finished(self, run_id: str, timeout_s: float) -> dict[str, Any]:
        return wait_for(
            f"run {run_id} finished",
            lambda: run if (run := self.run(run_id))["status"] in FINISHED else None,
            timeout_s,
        )


def tag(run: dict[str, Any], key: str) -> str | None:
    return next((t["value"] for t in run.get("tags", []) if t["key"] == key), None)


def metadata(materialization: dict[str, Any]) -> dict[str, Any]:
    """A materialization's JSON (as text) and numeric metadata by label."""
    return {e["label"]: e.get("jsonString", e.get("intValue")) for e in materialization["metadataEntries"]}


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of these (start, end) spans running at one moment (one ending as another starts:
    not at once)."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = [0]
    for _, step in edges:
        running.append(running[-1] + step)
    return max(running)


def compose_environment(service: str) -> dict[str, str]:
    """The environment docker-compose gives `service` (anchors merged)."""
    return yaml.safe_load(COMPOSE.read_text())["services"][service]["environment"]


def compose_command(service: str, port: int | None = None) -> list[str]:
    """The service's command in docker-compose.yml, run from this virtualenv; a server listens
    on 127.0.0.1:`port` instead of the container's 0.0.0.0."""
    argv = list(yaml.safe_load(COMPOSE.read_text())["services"][service]["command"])
    argv[0] = str(Path(sys.executable).parent / argv[0])
    for flags, value in ((("-h", "--host"), "127.0.0.1"), (("-p", "--port"), str(port))):
        for flag in set(flags) & set(argv):
            argv[argv.index(flag) + 1] = value
    return argv


def index_digest(data_dir: Path) -> str:
    """sha256 over the served index's files (the database and any write-ahead log)."""
    digest = hashlib.sha256()
    for path in sorted(data_dir.glob(f"{INDEX_FILE}*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def index_courses(data_dir: Path, scratch: Path) -> dict[str, dict[str, str]]:
    """course -> {entry id: question} of the served index, read from a copy of its files (a reader
    of the served files would write to their shared-memory file)."""
    scratch.mkdir(parents=True, exist_ok=True)
    for path in data_dir.glob(f"{INDEX_FILE}*"):
        shutil.copyfile(path, scratch / path.name)
    db = sqlite3.connect(f"file:{scratch / INDEX_FILE}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT DISTINCT course, doc_id, question FROM chunks").fetchall()
    finally:
        db.close()
    courses: dict[str, dict[str, str]] = {}
    for course, doc_id, question in rows:
        courses.setdefault(course, {})[doc_id] = question
    return courses


def rehearsal_source(documents: Path) -> tuple[bytes, dict[str, list[str]]]:
    """The FAQ (course groups with 'documents', the shape of ../shared/data) with copies of its
    courses added, `<course>-copy-NN`, until it holds more than SHARD_ROWS entries; and the FAQ's
    own courses with their questions. The copies' answers are cut to COPY_CHARS: as many rows for
    half the NLP time, so that a whole first build stays well within the run limit."""
    faq = json.loads(documents.read_text())
    if not isinstance(faq, list) or not all(isinstance(g, dict) and "documents" in g for g in faq):
        raise ObservationFailed(f"{documents}: expected a list of course groups with 'documents'")
    entries = sum(len(group["documents"]) for group in faq)
    copies = SHARD_ROWS // entries  # with the FAQ itself: more than SHARD_ROWS entries
    served = list(faq) + [
        {
            **group,
            "course": f"{group['course']}-copy-{n:02d}",
            "documents": [{**d, "text": str(d.get("text", ""))[:COPY_CHARS]} for d in group["documents"]],
        }
        for n in range(1, copies + 1)
        for group in faq
    ]
    questions: dict[str, list[str]] = {}
    for group in faq:
        questions.setdefault(group["course"], []).extend(d["question"] for d in group["documents"])
    return json.dumps(served).encode(), questions


def ensure_packages() -> str:
    """Debian's postgresql, chromium and redis-server, installed when missing (CI starts without them)."""
    missing = [
        name for name, program in DEBIAN_PACKAGES.items() if not any(Path("/").glob(program.lstrip("/")))
    ]
    if not missing:
        return f"{', '.join(DEBIAN_PACKAGES)} already installed"
    if os.geteuid() != 0:
        raise ObservationFailed(
            f"missing Debian packages {missing}; run as root or `apt-get install {' '.join(missing)}`"
        )
    began = time.monotonic()
    for argv in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
    ):
        done = subprocess.run(
            argv, capture_output=True, text=True, env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        )
        if done.returncode != 0:
            raise ObservationFailed(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return f"installed {', '.join(missing)} in {time.monotonic() - began:.0f} s"


class Rehearsal:
    def __init__(self, out: Path, documents: Path, max_runtime_s: int) -> None:
        self.out = out
        self.documents = documents
        self.max_runtime_s = max_runtime_s
        self.report = Report()
        self.processes = Processes(out / "logs")
        payload, self.faq_questions = rehearsal_source(documents)
        self.source = SourceServer(payload)
        self.postgres: Postgres | None = None
        self.home = out / "dagster_home"
        self.data = out / "data"
        self.port = free_port()
        self.redis_port = free_port()
        self.api = DagsterApi(f"http://127.0.0.1:{self.port}")
        self.first_run = self.scheduled_run = self.slow_run = self.slow_run_status = ""
        self.first_run_end = self.scheduled_end = 0.0
        self.stray_steps: dict[str, str] = {}
        self.served_digest = self.served_publish = ""
        # Secrets of this rehearsal only: never printed, never written to rehearsal.json.
        self.password = secrets.token_urlsafe(24)
        self.api_key = secrets.token_urlsafe(24)
        self.redis_password = secrets.token_hex(24)  # in the broker URL: no character to escape
        self.search_port = free_port()
        self.search = requests.Session()
        self.search.headers["X-API-Key"] = self.api_key
        self.search_base = f"http://127.0.0.1:{self.search_port}"
        self.answer_before_slow_run: list[str] = []
        self.search_failures: list[str] = []

    def environment(self, service: str) -> dict[str, str]:
        """The variables docker-compose gives `service`, valued for 127.0.0.1, plus the
        rehearsal's two knobs: a schedule every minute and a short run limit."""
        values = {
            "DAGSTER_POSTGRES_HOST": "127.0.0.1",
            "DAGSTER_POSTGRES_USER": "dagster",
            "DAGSTER_POSTGRES_PASSWORD": self.password,
            "DAGSTER_POSTGRES_DB": "dagster",
            "DOCUMENTS_URL": self.source.url,
            "RAG_DATA_DIR": str(self.data),
            "RAG_API_KEY": self.api_key,
            "RAG_RERANKER": "features",  # compose's default
            "RAG_EXECUTOR": "celery",  # compose's: the runs' steps go to the Celery workers
            "DAGSTER_CELERY_BROKER_URL": f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0",
            "PYTHONPATH": str(ROOT / "deploy"),
        }
        compose = compose_environment(service)
        # No cluster can run here: without ELASTICSEARCH_* the same code serves the embedded index,
        # which the search services then find in the data directory.
        wanted = {name for name in compose if not name.startswith("ELASTICSEARCH_")}
        if "ELASTICSEARCH_URL" in compose:
            wanted.add("RAG_DATA_DIR")
        if unknown := wanted - set(values):
            raise ObservationFailed(
                f"docker-compose.yml sets {sorted(unknown)}, which the rehearsal does not"
            )
        if "RAG_EXECUTOR" in compose and compose["RAG_EXECUTOR"] != values["RAG_EXECUTOR"]:
            raise ObservationFailed(f"docker-compose.yml sets RAG_EXECUTOR={compose['RAG_EXECUTOR']}")
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "RAG_", "ELASTICSEARCH_"))
        }
        return (
            inherited
            | {name: values[name] for name in wanted}
            | {
                "DAGSTER_HOME": str(self.home),  # where the Dockerfile puts deploy/dagster.yaml
                "RAG_SCHEDULE_CRON": "* * * * *",
                "RAG_MAX_RUNTIME_S": str(self.max_runtime_s),
            }
        )

    def run(self) -> bool:
        observe = self.report.observe
        try:
            observe("Debian packages", ensure_packages)
            self.postgres = Postgres(self.processes, self.password)
            observe("PostgreSQL started, Dagster database created", self.postgres.start)
            self.source.start()
            observe("webserver started with deploy/dagster.yaml", self.start_webserver)
            observe(
                "Redis (password required) and two Celery step workers started", self.start_celery_workers
            )
            observe("search service up, not ready before the first build", self.start_search_service)
            observe("daemon started at the start of a minute", self.start_daemon)
            observe("initial-build sensor launched the first build", self.sensor_launched_first_build)
            observe(
                "first build went through the run queue and succeeded", self.first_build_queued_and_succeeded
            )
            observe(
                "the first build was that one run: six assets materialized, checks passed",
                self.first_build_one_run,
            )
            observe(
                "its steps ran on the two Celery workers, shards of an asset side by side",
                self.steps_on_celery_workers,
            )
            observe(
                "the served index holds every course of the source, the FAQ's entries", self.index_holds_faq
            )
            observe("search service ready after the first build, answering with its key", self.search_answers)
            observe("schedule ticked and its refresh was one run that succeeded", self.schedule_produced_run)
            observe("freshness of faq_source and es_index passing", self.freshness_passing)
            observe("lineage and asset page rendered in headless Chromium", self.lineage_and_asset_pages)
            observe("schedule launched a run against the slow source", self.slow_run_started)
            observe("schedule tick skipped while the slow run is in progress", self.tick_skipped_for_slow_run)
            observe("slow run failed by run monitoring past dagster/max_runtime", self.slow_run_failed)
            observe("served index unchanged by the failed run", self.index_unchanged)
            observe("search service answered throughout, from the unchanged index", self.search_unchanged)
            observe("failed run's page rendered in headless Chromium", self.failed_run_page)
        except ObservationFailed:
            pass
        except KeyboardInterrupt:
            print("interrupted; stopping what the rehearsal started", flush=True)
        finally:
            self.stop()
        return self.report.held

    # --- starting ---------------------------------------------------------------------------

    def start_webserver(self) -> str:
        self.home.mkdir(parents=True)
        shutil.copyfile(INSTANCE_CONFIG, self.home / "dagster.yaml")
        self.processes.start(
            "dagster-webserver", compose_command("webserver", self.port), self.environment("webserver")
        )
        location = wait_for("code location loaded in the webserver", self._location_loaded, 180)
        return f"{self.api.base_url}, code location {location}, Postgres storage, source {self.source.url}"

    def start_celery_workers(self) -> str:
        # As compose starts it: the password in the configuration on stdin, in no argument or file.
        config = f'bind 127.0.0.1\nport {self.redis_port}\nsave ""\nrequirepass {self.redis_password}\n'
        redis = self.processes.start("redis-server", ["redis-server", "-"], stdin=config.encode())
        wait_for("Redis answering", lambda: port_open(self.redis_port) or None, 30, 0.2)
        refused = redis_reply(self.redis_port, b"PING\r\n")
        if not refused.startswith(b"-NOAUTH"):
            raise ObservationFailed(f"Redis answered a client without the password: {refused!r}")
        pids = []
        for n in range(1, CELERY_WORKERS + 1):
            argv = [*compose_command("celery-worker"), "--hostname", f"worker{n}@%h"]
            worker = self.processes.start(f"celery-worker-{n}", argv, self.environment("celery-worker"))
            pids.append(worker.pid)
        wait_for("Celery workers ready", self._celery_workers_ready, 120)
        return (
            f"redis-server pid {redis.pid} on 127.0.0.1:{self.redis_port}, requirepass set (a client "
            f"without it: {refused.decode().strip()}); worker pids {pids}, the password in their broker URL"
        )

    def _celery_workers_ready(self) -> bool | None:
        logs = [self.out / "logs" / f"celery-worker-{n}.log" for n in range(1, CELERY_WORKERS + 1)]
        for n, log in enumerate(logs, 1):
            if not self.processes.alive(f"celery-worker-{n}"):
                raise ObservationFailed(f"celery-worker-{n} exited; see {log}")
        return all(log.exists() and "ready." in log.read_text(errors="replace") for log in logs) or None

    def steps_on_celery_workers(self) -> str:
        """Every step of the first build ran as a Celery task taken by one of the two workers (the
        worker's name, in the event the task records); each per-course asset fanned out over two
        shards or more, both workers ran shard steps, and the shards of an asset ran side by side."""
        names = {f"worker{n}" for n in range(1, CELERY_WORKERS + 1)}
        ran_by = {step: worker for step, (worker, _) in self.celery_steps(self.first_run).items()}
        stats = self.api.step_stats(self.first_run)
        elsewhere = {
            s["stepKey"]: ran_by.get(s["stepKey"]) for s in stats if ran_by.get(s["stepKey"]) not in names
        }
        if not stats or elsewhere:
            raise ObservationFailed(
                f"steps not run by a Celery worker {sorted(names)}: {elsewhere or 'no steps'}"
            )
        shards = {
            asset: [s for s in stats if s["stepKey"].startswith(f"{asset}.") and SHARD_STEP in s["stepKey"]]
            for asset in COURSE_ASSETS
        }
        if few := {asset: len(steps) for asset, steps in shards.items() if len(steps) < 2}:
            raise ObservationFailed(f"fewer than two shard steps: {few}")
        shard_workers = {ran_by[s["stepKey"]] for steps in shards.values() for s in steps}
        if shard_workers != names:
            raise ObservationFailed(f"the shard steps ran on {sorted(shard_workers)} only")
        side_by_side = [
            asset
            for asset, steps in shards.items()
            if len({ran_by[s["stepKey"]] for s in steps}) > 1
            and most_at_once([(s["startTime"], s["endTime"]) for s in steps]) > 1
        ]
        if not side_by_side:
            raise ObservationFailed(f"no asset's shards ran at once on two workers: {shards}")
        per_worker = {name: sum(w == name for w in ran_by.values()) for name in sorted(names)}
        logged = {
            f"worker{n}": (self.out / "logs" / f"celery-worker-{n}.log")
            .read_text(errors="replace")
            .count("Task execute_plan[")
            for n in range(1, CELERY_WORKERS + 1)
        }
        lemmas = ", ".join(
            f"{s['stepKey'].split('.', 1)[1]} on {ran_by[s['stepKey']]} {s['endTime'] - s['startTime']:.1f} s"
            for s in shards["lemmas"]
        )
        took = ", ".join(f"{name} {count}" for name, count in per_worker.items())
        return (
            f"{len(stats)} steps, each a Celery task: {took}; "
            f"{', '.join(f'{a} {len(s)}' for a, s in shards.items())} shard steps; side by side on both "
            f"workers: {', '.join(side_by_side)} ({lemmas}); task lines in the workers' logs so far: {logged}"
        )

    def _location_loaded(self) -> str | None:
        if not self.processes.alive("dagster-webserver"):
            raise ObservationFailed("dagster-webserver exited; see logs/dagster-webserver.log")
        try:
            return self.api.find_repository()
        except requests.RequestException:
            return None

    def start_search_service(self) -> str:
        self.processes.start(
            "search-api", compose_command("search-api", self.search_port), self.environment("search-api")
        )

        def answering() -> requests.Response | None:
            if not self.processes.alive("search-api"):
                raise ObservationFailed("rag serve exited; see logs/search-api.log")
            try:
                return self.search.get(self.search_base + "/readyz", timeout=10)
            except requests.ConnectionError:
                return None

        readiness = wait_for("the search service answering", answering, 120, 0.5)
        if readiness.status_code != 503:
            raise ObservationFailed(f"/readyz answered {readiness.status_code} with no index published")
        return f"{self.search_base}, /readyz 503: {readiness.json()['reason']}"

    def search_answers(self) -> str:
        ready = wait_for(
            "/readyz 200",
            lambda: r if (r := self.search.get(self.search_base + "/readyz", timeout=10)).ok else None,
            60,
        )
        hits = self.ask()
        refused = requests.get(self.search_base + "/search", params={"query": SEARCH_QUESTION}, timeout=10)
        if not hits or refused.status_code != 401:
            raise ObservationFailed(f"hits {hits}; without the key: {refused.status_code}")
        return f"{ready.json()['chunks']} chunks; top hit {hits[0]!r}; without the key: 401"

    def ask(self) -> list[str]:
        """The search service's answer to one question: its hits' questions."""
        response = self.search.get(
            self.search_base + "/search", params={"query": SEARCH_QUESTION}, timeout=10
        )
        if not response.ok:
            self.search_failures.append(f"{response.status_code} {response.text[:200]}")
            return []
        return [hit["question"] for hit in response.json()["hits"]]

    def search_unchanged(self) -> str:
        after = self.ask()
        if self.search_failures or after != self.answer_before_slow_run:
            raise ObservationFailed(
                f"failures {self.search_failures}; {self.answer_before_slow_run} -> {after}"
            )
        return f"same {len(after)} hits before and after the failed run; no failed request"

    def start_daemon(self) -> str:
        # The schedule's first tick comes at the next minute boundary; starting early in a minute
        # leaves the sensor that minute to launch the first build, as it would on a new deployment.
        waited = 0.0
        if (second := datetime.now(UTC).second) > 20:
            waited = 61 - second
            time.sleep(waited)
        self.processes.start("dagster-daemon", compose_command("daemon"), self.environment("daemon"))
        daemons = wait_for("daemon heartbeats", self._daemons_healthy, 120)
        return f"waited {waited:.0f} s for the minute; healthy: {daemons}"

    def _daemons_healthy(self) -> str | None:
        if not self.processes.alive("dagster-daemon"):
            raise ObservationFailed("dagster-daemon exited; see logs/dagster-daemon.log")
        statuses = self.api.query(
            "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"
        )["instance"]["daemonHealth"]["allDaemonStatuses"]
        required = [s for s in statuses if s["required"]]
        if required and all(s["healthy"] for s in required):
            return ", ".join(s["daemonType"] for s in required)
        return None

    # --- observations ----------------------------------------------------------------------

    def sensor_launched_first_build(self) -> str:
        tick = self.api.wait_tick_with_run("sensor", SENSOR)
        self.first_run = tick["runIds"][0]
        run = self.api.run(self.first_run)
        if tag(run, "dagster/sensor_name") != SENSOR or run["jobName"] != JOB:
            raise ObservationFailed(f"run {self.first_run} of {run['jobName']} has tags {run['tags']}")
        return f"run {self.first_run} ({run['jobName']}), tag rag/trigger={tag(run, 'rag/trigger')}"

    def first_build_queued_and_succeeded(self) -> str:
        run = self.api.wait_run_finished(self.first_run, self.max_runtime_s + 120)
        events = self.api.events(self.first_run)
        lifecycle = [e["__typename"] for e in events if e["__typename"] in LIFECYCLE]
        if any("maximum runtime" in (e.get("message") or "") for e in events):
            raise ObservationFailed(
                f"run monitoring stopped the first build: a whole refresh takes longer here than "
                f"--max-runtime-s {self.max_runtime_s} (REHEARSE_MAX_RUNTIME_S); raise it"
            )
        if run["status"] != "SUCCESS" or [k for k in lifecycle if k != "RunDequeuedEvent"] != QUEUED_PATH:
            raise ObservationFailed(f"status {run['status']}, lifecycle events {lifecycle}")
        self.first_run_end = run["endTime"]
        return (
            f"{' -> '.join(lifecycle)} in {run['endTime'] - run['creationTime']:.1f} s "
            f"({run['endTime'] - run['startTime']:.1f} s running, limit {self.max_runtime_s} s)"
        )

    def one_run(self, run: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The run materialized each of the six assets once, and no other run was created while it
        went; its materializations by asset."""
        made = self.api.made_by(run["runId"])
        if wrong := {name: len(m) for name, m in made.items() if len(m) != 1}:
            raise ObservationFailed(f"materializations by run {run['runId']}: {wrong}")
        others = [
            r["runId"]
            for r in self.api.runs_created_after(run["creationTime"])
            if r["runId"] != run["runId"] and r["creationTime"] < run["endTime"]
        ]
        if others:
            raise ObservationFailed(f"other runs created while run {run['runId']} went: {others}")
        return {name: m[0] for name, m in made.items()}

    def first_build_one_run(self) -> str:
        made = self.one_run(self.api.run(self.first_run))
        checks = self.api.check_results(self.first_run)
        failing = [c for c in checks if c[2] != "SUCCEEDED"]
        if not checks or failing:
            raise ObservationFailed(f"checks not passed: {failing or 'no checks found'}")
        published = metadata(made["es_index"])
        return (
            f"run {self.first_run} materialized {', '.join(ASSETS)}; es_index published "
            f"{published['entries']} entries of {len(json.loads(published['courses']))} courses; "
            f"{len(checks)} checks SUCCEEDED in it ({', '.join(c[1] for c in checks)})"
        )

    def index_holds_faq(self) -> str:
        served = index_courses(self.data, self.out / "index-copy")
        source = json.loads(metadata(self.api.made_by(self.first_run)["faq_source"][0])["courses"])
        counts = {course: len(entries) for course, entries in served.items()}
        if counts != source:
            raise ObservationFailed(f"entries per course: served {counts}, faq_source counted {source}")
        missing = {
            course: sorted(set(questions) - set(served.get(course, {}).values()))[:3]
            for course, questions in self.faq_questions.items()
            if set(questions) - set(served.get(course, {}).values())
        }
        if missing:
            raise ObservationFailed(f"questions of the FAQ not in the served index: {missing}")
        faq = ", ".join(f"{course} {counts[course]}" for course in self.faq_questions)
        return (
            f"{INDEX_FILE}: {len(counts)} courses, {sum(counts.values())} entries, as faq_source counted "
            f"them; the FAQ's own courses with every question of theirs: {faq}"
        )

    def schedule_produced_run(self) -> str:
        tick = self.api.wait_tick_with_run("schedule", SCHEDULE)
        self.scheduled_run = tick["runIds"][0]
        run = self.api.wait_run_finished(self.scheduled_run, self.max_runtime_s + 120)
        if (
            run["status"] != "SUCCESS"
            or tag(run, "dagster/schedule_name") != SCHEDULE
            or run["jobName"] != JOB
        ):
            raise ObservationFailed(
                f"run {self.scheduled_run} of {run['jobName']}: status {run['status']}, tags {run['tags']}"
            )
        made = self.one_run(run)
        self.scheduled_end = run["endTime"]
        remade = ", ".join(f"{name} {metadata(made[name]).get('values_made')}" for name in COURSE_ASSETS)
        skipped = [t["skipReason"] for t in self.api.ticks("schedule", SCHEDULE) if t["status"] == "SKIPPED"]
        ticked = datetime.fromtimestamp(tick["timestamp"], UTC).strftime("%H:%M:%S")
        took = run["endTime"] - run["creationTime"]
        return (
            f"tick at {ticked} UTC -> run {self.scheduled_run}, the six assets in {took:.1f} s, "
            f"values made (the source unchanged): {remade}; ticks skipped so far: {len(skipped)}"
            + (f", the newest: {skipped[0]!r}" if skipped else "")
        )

    def freshness_passing(self) -> str:
        refreshed = self.api.run(self.scheduled_run)["startTime"]  # the publish came after it

        def passing() -> dict[str, str] | None:
            assets = self.api.assets()
            states = {name: assets[name]["freshnessStatusInfo"] or {} for name in FRESHNESS_ASSETS}
            judged = {
                name: state["freshnessStatus"]
                for name, state in states.items()
                if (state.get("freshnessStatusMetadata") or {}).get("lastMaterializedTimestamp", 0)
                >= refreshed
            }
            return judged if len(judged) == len(states) and set(judged.values()) == {"HEALTHY"} else None

        states = wait_for("freshness HEALTHY as of the refresh (evaluated every 30 s)", passing, 120)
        return ", ".join(
            f"{name} {state} as of run {self.scheduled_run[:8]}" for name, state in states.items()
        )

    def slow_run_started(self) -> str:
        self.source.slow.set()
        # The tick that launches it may come just before the source turns slow: any scheduled run
        # after the last refresh counts, once the source is being read slowly.
        wait_for("the source being read slowly", lambda: True if self.source.slow_requests else None, 150)

        def slow_run() -> dict[str, Any] | None:
            scheduled = [
                r for r in self.api.runs_created_after(self.scheduled_end) if tag(r, "dagster/schedule_name")
            ]  # newest first; a refresh scheduled before the slow one may have finished meanwhile
            return next((r for r in scheduled if r["status"] == "STARTED"), None)

        run = wait_for("the scheduled run reading the slow source", slow_run, 60)
        self.slow_run = run["runId"]
        # A tick just before the source turned slow may have started a refresh that read it fast
        # and publishes meanwhile: the served index to keep is the one once every other run is done.
        wait_for(
            "every run but the slow one finished",
            lambda: (
                all(
                    r["status"] in FINISHED or r["runId"] == self.slow_run
                    for r in self.api.runs_created_after(self.scheduled_end)
                )
                or None
            ),
            self.max_runtime_s,
        )
        self.served_digest = index_digest(self.data)
        self.served_publish = self.api.assets()["es_index"]["assetMaterializations"][0]["runId"]
        self.answer_before_slow_run = self.ask()
        return (
            f"run {self.slow_run} started; the source trickles one byte every {TRICKLE_EVERY_S:g} s; "
            f"served: es_index from run {self.served_publish}"
        )

    def tick_skipped_for_slow_run(self) -> str:
        tick = wait_for(
            "a skipped tick naming the slow run",
            lambda: next(
                (
                    t
                    for t in self.api.ticks("schedule", SCHEDULE)
                    if t["status"] == "SKIPPED" and self.slow_run in (t["skipReason"] or "")
                ),
                None,
            ),
            150,
        )
        ticked = datetime.fromtimestamp(tick["timestamp"], UTC).strftime("%H:%M:%S")
        self.ask()  # the search service keeps answering while the run is stuck
        return f"tick at {ticked} UTC skipped: {tick['skipReason']}"

    def slow_run_failed(self) -> str:
        # Run monitoring polls every 60 s (deploy/dagster.yaml): the failure lands within a poll
        # of the limit, plus the time the run takes to stop.
        run = self.api.wait_run_finished(self.slow_run, self.max_runtime_s + 60 + 120)
        events = self.api.events(self.slow_run)
        verdict = next(
            (
                e["message"]
                for e in events
                if e["__typename"] == "RunFailureEvent" and "maximum runtime" in (e.get("message") or "")
            ),
            None,
        )
        # Run monitoring marks the run canceling, stops it, then records the failure; if the run
        # worker's own "canceled" lands after that, Dagster 1.13 leaves the run CANCELED
        # (dagster-io/dagster#23409). Either way the failure event is recorded.
        if run["status"] not in ("FAILURE", "CANCELED") or verdict is None:
            last = [f"{e['__typename']}: {e.get('message')}" for e in events[-5:]]
            raise ObservationFailed(f"status {run['status']}; no run-monitoring failure in {last}")
        self.slow_run_status = run["status"]
        raced = "" if run["status"] == "FAILURE" else " (the worker's own cancellation landed after it)"
        running = run["endTime"] - run["startTime"]
        # The run's process revokes its Celery tasks; a task a worker has started goes on (Celery
        # stops a started task only when revoked with terminate, which dagster_celery does not do).
        self.stray_steps = self.steps_still_going(self.slow_run)
        left = f"; its steps still going in the workers: {self.stray_steps}" if self.stray_steps else ""
        return (
            f"{run['status']}{raced} after {running:.0f} s of running; run monitoring's event: "
            f"{verdict!r}{left}"
        )

    def steps_still_going(self, run_id: str) -> dict[str, str]:
        """step -> worker, for the run's steps a worker started and that recorded no end."""
        ended = {"ExecutionStepSuccessEvent", "ExecutionStepFailureEvent"}
        events = self.api.events(run_id)
        done = {e["stepKey"] for e in events if e["__typename"] in ended}
        return {
            step: worker
            for step, (worker, _) in self.celery_steps(run_id, events).items()
            if step not in done
        }

    def celery_steps(
        self, run_id: str, events: list[dict[str, Any]] | None = None
    ) -> dict[str, tuple[str, float]]:
        """step -> (worker, when), from the event each Celery task records as it takes a step."""
        steps: dict[str, tuple[str, float]] = {}
        for event in self.api.events(run_id) if events is None else events:
            message = event.get("message") or ""
            if CELERY_STEP_EVENT[0] in message and message.endswith(CELERY_STEP_EVENT[1]):
                labels = {e["label"]: e.get("text") for e in event.get("metadataEntries", [])}
                worker = str(labels.get(CELERY_WORKER_LABEL)).split("@")[0]
                steps[event["stepKey"]] = (worker, int(event["timestamp"]) / 1000)
        return steps

    def index_unchanged(self) -> str:
        self.source.slow.clear()
        stray = ""
        if self.stray_steps:
            # The source answers now: a step left going ends, and the index must still be as served.
            wait_for(
                "the failed run's steps left in the workers ending",
                lambda: True if not self.steps_still_going(self.slow_run) else None,
                60,
                1.0,
            )
            failed_at = self.api.run(self.slow_run)["endTime"]
            later = [s for s, (_, at) in self.celery_steps(self.slow_run).items() if at > failed_at]
            if later:
                raise ObservationFailed(f"steps of the failed run started after its failure: {later}")
            made = [name for name, m in self.api.made_by(self.slow_run).items() if m]
            left = ", ".join(f"{step} on {worker}" for step, worker in self.stray_steps.items())
            stray = (
                f"; its steps left going ({left}) ended once the source answered, recording "
                f"{', '.join(made) or 'nothing'} for the failed run; no step started after its failure"
            )
        digest = index_digest(self.data)
        latest = self.api.assets()["es_index"]["assetMaterializations"][0]["runId"]
        if digest != self.served_digest or latest != self.served_publish:
            raise ObservationFailed(
                f"index sha256 {self.served_digest[:12]} -> {digest[:12]}; es_index last from run {latest}"
            )
        return f"{INDEX_FILE} sha256 {digest[:16]}… before and after; es_index still from run {latest}{stray}"

    def lineage_and_asset_pages(self) -> str:
        """The pages and the words the README's UI section sends a user to."""
        location = self.api.repository["repositoryLocationName"]
        return self.render(
            {
                "lineage": (f"/locations/{location}/asset-groups/{GROUP}", ASSETS),
                "catalog": ("/assets", ("Status", *ASSETS)),
                "job": (f"/locations/{location}/jobs/{JOB}", ("Materialize all",)),
                "asset-es_index": (
                    "/assets/es_index",
                    ("es_index", "index_version", "chunks", "Passing", "Checks"),
                ),
            }
        )

    def failed_run_page(self) -> str:
        return self.render(
            {"failed-run": (f"/runs/{self.slow_run}", (self.slow_run_status.capitalize(), "maximum runtime"))}
        )

    def render(self, pages: dict[str, tuple[str, tuple[str, ...]]]) -> str:
        """Screenshots of UI pages in Debian's Chromium, each only once all `expected` texts show
        on it, so a blank or half-loaded page fails."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        from playwright.sync_api import expect, sync_playwright

        shots = self.out / "screenshots"
        shots.mkdir(exist_ok=True)
        seen = []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                for name, (path, expected) in pages.items():
                    page.goto(self.api.base_url + path)
                    for text in expected:
                        page.get_by_text(text).first.wait_for(timeout=60_000)
                    page.wait_for_load_state("networkidle")
                    # A first visit greets with a newsletter dialog that covers the page.
                    with contextlib.suppress(PlaywrightTimeout):
                        page.get_by_role("button", name="Skip").click(timeout=2_000)
                    # Locators, not page scripts: the UI's Content-Security-Policy forbids eval.
                    expect(page.get_by_text("Loading...", exact=True)).to_have_count(0, timeout=60_000)
                    target = shots / f"{name}.png"
                    page.screenshot(path=target)
                    missing = [t for t in expected if t not in page.inner_text("body")]
                    if missing:
                        raise ObservationFailed(f"{path}: {missing} not on the page")
                    size = f"{target.stat().st_size:,} bytes"
                    seen.append(f"{target.relative_to(self.out)} ({size}; shows {', '.join(expected)})")
            finally:
                browser.close()
        return "; ".join(seen)

    # --- stopping ---------------------------------------------------------------------------

    def stop(self) -> None:
        def stop_everything() -> str:
            stopped = self.processes.stop_all()
            self.source.close()
            if self.postgres is not None:
                self.postgres.remove()
            ports = (POSTGRES_PORT, self.port, self.search_port, self.redis_port)
            if left := [p for p in ports if port_open(p)]:
                raise ObservationFailed(f"still listening on {left} after stopping {stopped}")
            if children := child_processes():
                raise ObservationFailed(f"processes {children} of the rehearsal still running")
            return f"stopped {stopped}; ports {', '.join(map(str, ports))} closed"

        with contextlib.suppress(ObservationFailed):
            self.report.observe("everything started was stopped", stop_everything)
        summary = {
            "held": self.report.held,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "max_runtime_s": self.max_runtime_s,
            "documents": str(self.documents),
            "source_requests": self.source.requests,
            "observations": [asdict(o) for o in self.report.observations],
        }
        (self.out / "rehearsal.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".rehearsal", help="output folder (emptied first)")
    parser.add_argument("--documents", type=Path, required=True, help="FAQ JSON the local source serves")
    parser.add_argument(
        "--max-runtime-s",
        type=int,
        default=90,
        help="RAG_MAX_RUNTIME_S for every run: longer than a whole refresh takes (70-85 s here)",
    )
    args = parser.parse_args(argv)
    out = args.out.absolute()
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    rehearsal = Rehearsal(out, args.documents.absolute(), args.max_runtime_s)
    held = rehearsal.run()
    total = time.monotonic() - rehearsal.report.started
    print(
        f"rehearsal {'passed' if held else 'FAILED'} in {total:.0f} s; report, logs and screenshots in {out}"
    )
    return 0 if held else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop what was started on SIGTERM too
    sys.exit(main())
