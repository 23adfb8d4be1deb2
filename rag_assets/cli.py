"""The `rag` command: search the published index, show what it holds, evaluate retrieval."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

from rag_assets import settings
from rag_assets.common.cores import usable_cores
from rag_assets.common.errors import RagError
from rag_assets.evaluation import build_index, evaluate, read_ground_truth
from rag_assets.index.elasticsearch import (
    CLIENT_ERRORS,
    PIPELINE_ROLE,
    READER_ROLE,
    ElasticsearchIndex,
    create_users,
    describe_error,
)
from rag_assets.index.reranking import RERANK_DEPTH, SENTENCE_CANDIDATES
from rag_assets.ingest.sources import SourceError
from rag_assets.nlp.analysis import load_pipeline
from rag_assets.retrieval import MIN_RELEVANCE, Hit, Retriever, default_retriever


def _print_json(value: object) -> None:
    """JSON on stdout; the result dataclasses (hits, stats, versions, metrics) become objects."""
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False, default=_dataclass_fields)
    sys.stdout.write("\n")


def _dataclass_fields(value: object) -> dict[str, object]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _print_hits(hits: list[Hit]) -> None:
    if not hits:
        print("no entry matches the query (none relevant enough; --min-relevance 0 shows the closest)")
    for rank, hit in enumerate(hits, start=1):
        print(
            f"{rank}. [{hit.course}] {hit.question}  "
            f"(doc {hit.doc_id}, score {hit.score:.4f}, relevance {hit.relevance:.2f})"
        )
        snippet = " ".join(hit.text.split())
        print(textwrap.indent(textwrap.shorten(snippet, width=300, placeholder=" …"), "   "))


def cmd_search(args: argparse.Namespace) -> None:
    hits = default_retriever().search(
        " ".join(args.query), course=args.course, k=args.k, min_relevance=args.min_relevance
    )
    if args.json:
        _print_json(hits)
    else:
        _print_hits(hits)


def cmd_stats(args: argparse.Namespace) -> None:
    stats = settings.open_backend().stats()
    if args.json:
        _print_json(stats)
        return
    print(f"backend:      {stats.backend}")
    print(f"location:     {stats.location}")
    print(f"changed at:   {stats.published_at}  (content last changed)")
    print(f"confirmed at: {stats.confirmed_at}  (last refresh that found it current)")
    print(f"entries:      {stats.entries}")
    print(f"chunks:       {stats.chunks}")
    print(f"reranker:     {stats.reranker or 'not recorded'}  (the RAG_RERANKER mode it was built for)")
    for course, count in stats.courses.items():
        print(f"  {course}: {count}")


def cmd_eval(args: argparse.Namespace) -> None:
    nlp = load_pipeline()
    ground_truth = read_ground_truth(args.ground_truth)
    reranker = settings.reranker()
    log = None if args.json else print
    with tempfile.TemporaryDirectory(prefix="rag-eval-") as tmp:
        index = build_index(
            args.documents, Path(tmp), nlp, log=log, ground_truth=ground_truth, reranker=reranker
        )
        retriever = Retriever(index, nlp, reranker=reranker)
        result = evaluate(retriever, ground_truth, k=args.k, log=log, min_relevance=args.min_relevance)
        index.close()
    if args.json:
        _print_json(result)
    else:
        print(f"reranker: {result.reranker} (RAG_RERANKER)")
        print(f"questions: {result.questions}")
        print(f"hit rate@{args.k}: {result.hit_rate:.4f}")
        print(f"MRR@{args.k}:      {result.mrr:.4f}")
        print(f"median query: {result.p50_ms:.2f} ms")


def cmd_fit_reranker(args: argparse.Namespace) -> None:
    from rag_assets.fitting import FOLDS, fit_rerankers, save  # scikit-learn: a dev dependency

    ground_truth = read_ground_truth(args.ground_truth)
    results, models = fit_rerankers(args.documents, ground_truth, load_pipeline(), log=print)
    print(
        f"{len(ground_truth)} questions, {FOLDS} folds grouped by gold entry; reranking the fused top "
        f"{RERANK_DEPTH} (semantic: and up to {SENTENCE_CANDIDATES} more of its sentence kNN)"
    )
    print(f"{'mode':<10} {'hit@5':>7} {'MRR@5':>7} {'gold among candidates':>21}")
    for mode, found in results.items():
        print(f"{mode:<10} {found.hit_rate:>7.4f} {found.mrr:>7.4f} {found.ceiling:>21.4f}")
    if args.write:
        for path in save(models):
            print(f"wrote {path}")


def _versioned_backend() -> ElasticsearchIndex:
    backend = settings.open_backend()
    if not isinstance(backend, ElasticsearchIndex):
        raise RagError(
            "the embedded index keeps one version; versions and rollback need Elasticsearch "
            "(set ELASTICSEARCH_URL)"
        )
    return backend


def cmd_versions(args: argparse.Namespace) -> None:
    versions = _versioned_backend().versions()
    if args.json:
        _print_json(versions)
        return
    for v in versions:
        state = "" if v.complete else "  (incomplete: not a rollback target)"
        print(f"{'*' if v.live else ' '} {v.name}  {v.documents} chunks  created {v.created_at}{state}")


def cmd_rollback(args: argparse.Namespace) -> None:
    backend = _versioned_backend()
    target = backend.rollback(args.index)
    print(f"alias {backend.alias} now points at {target}")


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn  # only this command needs the server

    uvicorn.run(
        "rag_assets.server:app_from_environment",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=args.access_log,
        log_level="info",
    )


# The passwords `rag es-users` gives the restricted users; secrets, so only from the environment.
USER_PASSWORDS = {PIPELINE_ROLE: "RAG_ES_PIPELINE_PASSWORD", READER_ROLE: "RAG_ES_READER_PASSWORD"}


def cmd_es_users(args: argparse.Namespace) -> None:
    cluster = settings.elasticsearch()
    if cluster is None:
        raise RagError("rag es-users needs ELASTICSEARCH_URL, and a user that may manage security")
    missing = [variable for variable in USER_PASSWORDS.values() if not os.environ.get(variable)]
    if missing:
        raise RagError(f"set {' and '.join(missing)}: the passwords of the users this creates")
    passwords = {role: os.environ[variable] for role, variable in USER_PASSWORDS.items()}
    for line in create_users(cluster.client(), cluster.alias, passwords):
        print(line)


def cmd_mcp(args: argparse.Namespace) -> None:
    from rag_assets import mcp_server  # only this command needs the SDK

    server = mcp_server.server_from_environment(os.environ)
    if not args.http:
        server.run("stdio")  # the assistant that started this process is the only client
        return
    import uvicorn

    app = mcp_server.http_app(server, args.host, settings.api_key())
    print(f"rag mcp: Streamable HTTP at http://{args.host}:{args.port}/mcp", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rag", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, func: object, json_output: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        if json_output:
            sub.add_argument("--json", action="store_true", help="print JSON")
        sub.set_defaults(func=func)
        return sub

    search = command("search", "search the published index", cmd_search)
    search.add_argument("query", nargs="+", help="the question (words starting with - are words too)")
    search.add_argument("--course", help="only entries of this course")
    search.add_argument("--k", type=int, default=5, help="number of results (default 5)")
    search.add_argument(
        "--min-relevance",
        type=float,
        help=(
            f"drop hits less relevant than this (default: the mode's: {MIN_RELEVANCE['lexical']} "
            f"lexical, {MIN_RELEVANCE['cosine']} semantic; 0: none)"
        ),
    )

    command("stats", "what the published index holds", cmd_stats)

    evaluation = command("eval", "hit rate and MRR on a ground truth", cmd_eval)
    evaluation.add_argument("--documents", required=True, help="source file with entry ids")
    evaluation.add_argument("--ground-truth", required=True, help="CSV: question,course,document")
    evaluation.add_argument("--k", type=int, default=5)
    evaluation.add_argument(
        "--min-relevance", type=float, default=0.0, help="drop hits less relevant than this (default 0: none)"
    )

    fitting = command(
        "fit-reranker", "fit the reranker; grouped cross-validated figures", cmd_fit_reranker, False
    )
    fitting.add_argument("--documents", required=True, help="source file with entry ids")
    fitting.add_argument("--ground-truth", required=True, help="CSV: question,course,document")
    fitting.add_argument("--write", action="store_true", help="write the weights the package ships")

    serve = command("serve", "answer searches over HTTP (docs at /docs)", cmd_serve, False)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--workers",
        type=int,
        default=usable_cores(),
        help="processes, each with its model (default: one per core, at most 4)",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log every request line (off by default: query strings are users' questions)",
    )

    mcp = command("mcp", "the index as tools for assistants (Model Context Protocol)", cmd_mcp, False)
    mcp.add_argument("--http", action="store_true", help="Streamable HTTP at /mcp instead of stdio")
    mcp.add_argument(
        "--host", default="127.0.0.1", help="--http: address to bind (default 127.0.0.1: this machine only)"
    )
    mcp.add_argument("--port", type=int, default=8001, help="--http: port (default 8001)")

    command(
        "es-users",
        "Elasticsearch, once, as a user that may manage security: create the pipeline's and the "
        "readers' restricted users (RAG_ES_PIPELINE_PASSWORD, RAG_ES_READER_PASSWORD)",
        cmd_es_users,
        False,
    )
    command("versions", "Elasticsearch: the indices kept behind the alias", cmd_versions)
    rollback = command("rollback", "Elasticsearch: point the alias at an earlier index", cmd_rollback, False)
    rollback.add_argument("index", nargs="?", help="index to serve (default: the one before the live one)")
    return parser


def query_words_last(argv: Sequence[str], options_with_values: set[str], flags: set[str]) -> list[str]:
    """`search` arguments with every word that is not an option moved behind `--`.

    So a question may start with a dash ("-v flag not working") without the user writing `--`.
    """
    options: list[str] = []
    words: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token == "--":
            words.extend(tokens)
        elif token in flags or (token.split("=", 1)[0] in options_with_values and "=" in token):
            options.append(token)
        elif token in options_with_values:
            options.extend([token, next(tokens, "")])
        else:
            words.append(token)
    return [*options, "--", *words]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["search"]:
        argv = [
            "search",
            *query_words_last(argv[1:], {"--course", "--k", "--min-relevance"}, {"--json", "-h", "--help"}),
        ]
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BrokenPipeError:
        # The reader closed the pipe (`rag search ... | head`): nothing left to say. Point stdout
        # at /dev/null so the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (RagError, SourceError, OSError, *CLIENT_ERRORS) as exc:
        print(f"rag: error: {describe_error(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
