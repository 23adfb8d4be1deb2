"""`make bench-mcp`: `rag mcp --http` beside `rag serve`, in the same run, under the same load.

Four concurrent clients for a fixed time each, asking the evaluation questions in turn (every
other one with its course filter): over Streamable HTTP, the MCP SDK's own `Client` calling
`search_faq`; over plain HTTP, an async httpx client calling `/search`. Both servers run one
process (`rag serve --workers 1`), so the figures compare the protocols, not the process counts;
the clients share this machine's cores with the servers.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from serve import free_port, server_environment  # benchmarks/serve.py, beside this script

from rag_assets.evaluation import build_index
from rag_assets.nlp.analysis import load_pipeline

CLIENTS = 4


@contextmanager
def server(command: list[str], data_dir: Path, probe: str) -> Iterator[None]:
    """`rag COMMAND` over `data_dir`, once `probe` answers."""
    process = subprocess.Popen(
        [sys.executable, "-m", "rag_assets.cli", *command],
        env=server_environment(RAG_DATA_DIR=str(data_dir)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx2.get(probe, timeout=5)
                break
            except httpx2.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"rag {' '.join(command)} did not start")
                time.sleep(0.2)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


Call = Callable[[dict[str, str]], Awaitable[bool]]  # one search; True if it answered without error


async def load(
    open_client: Callable[[], Any],
    make_call: Callable[[Any], Call],
    questions: list[dict[str, str]],
    seconds: float,
) -> dict[str, Any]:
    """CLIENTS clients, each asking questions in turn for `seconds`: calls/s, latency, errors."""
    latencies: list[float] = []
    errors = 0

    async def one_client(offset: int) -> None:
        nonlocal errors
        async with open_client() as client:
            search = make_call(client)
            await search(questions[offset])  # the session is set up before the clock runs
            deadline = time.monotonic() + seconds
            turn = offset
            while time.monotonic() < deadline:
                started = time.perf_counter()
                answered = await search(questions[turn % len(questions)])
                latencies.append(time.perf_counter() - started)
                errors += not answered
                turn += CLIENTS

    async with anyio.create_task_group() as group:
        for offset in range(CLIENTS):
            group.start_soon(one_client, offset)
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(cuts[49] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
        "errors": errors,
    }


def mcp_call(client: Client) -> Call:
    async def search(arguments: dict[str, str]) -> bool:
        result = await client.call_tool("search_faq", arguments)
        return not result.is_error

    return search


def http_call(client: httpx2.AsyncClient) -> Call:
    async def search(arguments: dict[str, str]) -> bool:
        return (await client.get("/search", params=arguments)).status_code == 200

    return search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", required=True, help="the source snapshot served")
    parser.add_argument("--ground-truth", required=True, help="CSV whose questions are asked")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--out", default="bench-mcp-results.json")
    args = parser.parse_args()

    with open(args.ground_truth, newline="") as handle:
        rows = list(csv.DictReader(handle))[:500]
    questions = [
        {"query": r["question"], **({"course": r["course"]} if i % 2 else {})} for i, r in enumerate(rows)
    ]
    workdir = Path(tempfile.mkdtemp(prefix="rag-mcp-bench-"))
    build_index(args.documents, workdir, load_pipeline())

    results: dict[str, Any] = {"clients": CLIENTS, "seconds": args.seconds, "questions": len(questions)}
    port = free_port()
    mcp_url = f"http://127.0.0.1:{port}/mcp"
    with server(["mcp", "--http", "--port", str(port)], workdir, mcp_url):
        opened = lambda: Client(streamable_http_client(mcp_url))  # noqa: E731
        results["mcp"] = anyio.run(load, opened, mcp_call, questions, args.seconds)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with server(["serve", "--port", str(port), "--workers", "1"], workdir, base + "/healthz"):
        opened = lambda: httpx2.AsyncClient(base_url=base, timeout=30)  # noqa: E731
        results["rag_serve"] = anyio.run(load, opened, http_call, questions, args.seconds)

    print(f"{CLIENTS} clients, {args.seconds:g} s each, {len(questions)} questions, one server process")
    print(f"{'':>26}{'calls/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, label in (("mcp", "rag mcp --http (search_faq)"), ("rag_serve", "rag serve (/search)")):
        r = results[name]
        print(f"{label:>26}{r['calls_per_s']:>9}{r['p50_ms']:>9}{r['p99_ms']:>9}{r['errors']:>8}")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
