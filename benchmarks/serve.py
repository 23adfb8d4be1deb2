"""`make bench-serve`: `rag serve` under load from wrk, a C load generator in another process.

- throughput and latency: wrk at 1, 4 and 8 connections for a fixed time, questions of the
  evaluation set in turn (half with a course filter), the server's CPU share from /proc;
- publish under load: 8 connections while the index is republished from another snapshot of the
  source and back (a changed source each time); every non-2xx answer and socket error counts.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import requests

from rag_assets.common.cores import usable_cores
from rag_assets.evaluation import build_index
from rag_assets.index.backend import RERANKER_MODES
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.nlp.analysis import load_pipeline
from rag_assets.settings import DEFAULT_RERANKER

WRK_SCRIPT = """
paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", paths[(counter %% #paths) + 1])
end
"""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
COLUMNS = ("connections", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "server CPU")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_environment(**env: str) -> dict[str, str]:
    """This environment without the project's settings, plus `env`: the server measured is
    configured by the bench alone."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("ELASTICSEARCH_", "RAG_"))}
    return kept | env


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def ensure_wrk() -> str:
    if found := shutil.which("wrk"):
        return found
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)
    return shutil.which("wrk") or sys.exit("wrk did not install (apt-get install wrk)")


def query_paths(ground_truth: Path, limit: int) -> list[str]:
    """/search paths for the evaluation questions, every other one filtered by its course."""
    with open(ground_truth, newline="") as handle:
        rows = list(csv.DictReader(handle))[:limit]
    return [
        "/search?" + urlencode({"query": row["question"], **({"course": row["course"]} if i % 2 else {})})
        for i, row in enumerate(rows)
    ]


def parse_wrk(output: str) -> dict[str, Any]:
    def ms(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
        return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    percentiles = {f"p{p}_ms": ms(v) for p, v in re.findall(r"^\s+(\d+)%\s+(\S+)$", output, re.M)}
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "requests": int(re.search(r"(\d+) requests in", output).group(1)),  # type: ignore[union-attr]
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        **percentiles,
        "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
    }


def run_wrk(wrk: str, script: Path, base: str, connections: int, seconds: float) -> dict[str, Any]:
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), base]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return parse_wrk(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", required=True, help="the source snapshot served")
    parser.add_argument("--old", required=True, help="another snapshot, published under load")
    parser.add_argument("--ground-truth", required=True, help="CSV whose questions are asked")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--workers", type=int, default=usable_cores(), help="`rag serve --workers`")
    parser.add_argument("--reranker", default=DEFAULT_RERANKER, choices=RERANKER_MODES, help="RAG_RERANKER")
    parser.add_argument("--out", default="serve-bench-results.json")
    args = parser.parse_args()

    wrk = ensure_wrk()
    workdir = Path(tempfile.mkdtemp(prefix="rag-serve-bench-"))
    nlp = load_pipeline()
    build_index(args.new, workdir, nlp)
    paths = query_paths(Path(args.ground_truth), 500)
    (workdir / "paths.txt").write_text("\n".join(paths) + "\n")
    script = workdir / "queries.lua"
    script.write_text(WRK_SCRIPT % (workdir / "paths.txt"))

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rag_assets.cli",
            "serve",
            "--port",
            str(port),
            "--workers",
            str(args.workers),
        ],
        env=server_environment(RAG_DATA_DIR=str(workdir), RAG_RERANKER=args.reranker),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    results: dict[str, Any] = {
        "workers": args.workers,
        "reranker": args.reranker,
        "entries_source": args.new,
        "queries": len(paths),
    }
    try:
        started = time.monotonic()
        while True:
            try:
                if requests.get(base + "/readyz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() - started > 120:
                sys.exit("rag serve was not ready within 120 s")
            time.sleep(0.1)
        results["ready_after_s"] = round(time.monotonic() - started, 2)
        server_pids = [server.pid, *map(int, subprocess.run(
            ["pgrep", "-s", str(server.pid)], capture_output=True, text=True).stdout.split())]  # fmt: skip
        server_pids = sorted(set(server_pids))
        run_wrk(wrk, script, base, 4, 3)  # warm-up: every query's vector lists read once

        print(
            f"rag serve ({args.workers} worker(s), RAG_RERANKER={args.reranker}), {len(paths)} questions, "
            f"{args.seconds:g} s per point"
        )
        print(" ".join(f"{name:>11}" for name in COLUMNS))
        points = []
        for connections in (1, 4, 8):
            cpu_before, wall_before = sum(map(cpu_seconds, server_pids)), time.monotonic()
            point = run_wrk(wrk, script, base, connections, args.seconds)
            cpu_share = (sum(map(cpu_seconds, server_pids)) - cpu_before) / (time.monotonic() - wall_before)
            point |= {"connections": connections, "server_cpu_cores": round(cpu_share, 2)}
            points.append(point)
            row = [connections, f"{point['requests_per_s']:.0f}"]
            row += [f"{point[f'p{p}_ms']:.2f}" for p in (50, 90, 99)]
            row += [point["socket_errors"] + point["non_2xx"], f"{cpu_share:.2f} core"]
            print(" ".join(f"{value:>11}" for value in row))
        results["load"] = points

        # Publish under load: a changed source and back, while 8 connections keep asking.
        index = EmbeddedIndex(workdir)
        publishes: list[float] = []

        def republish() -> None:
            time.sleep(2)
            for source in (args.old, args.new, args.old, args.new):
                began = time.monotonic()
                build_index(source, workdir, nlp)
                publishes.append(round(time.monotonic() - began, 2))

        publisher = threading.Thread(target=republish)
        publisher.start()
        under_publish = run_wrk(wrk, script, base, 8, args.seconds)
        publisher.join()
        under_publish |= {"connections": 8, "publishes": len(publishes), "publish_s": publishes}
        results["under_publish"] = under_publish
        results["served_after"] = index.stats().entries
        print(
            f"under publish: {len(publishes)} publishes ({', '.join(f'{s:.1f}' for s in publishes)} s each) "
            f"while 8 connections made {under_publish['requests']} requests: "
            f"{under_publish['non_2xx']} non-2xx, {under_publish['socket_errors']} socket errors, "
            f"p99 {under_publish['p99_ms']:.1f} ms"
        )
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
