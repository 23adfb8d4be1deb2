# Two commands on a fresh machine: `make run` and `make test`. Both bootstrap .venv first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RAG_DATA_DIR ?= .rag
export RAG_DATA_DIR
# A persistent Dagster instance keeps run history (the schedule and the asset checks use it).
DAGSTER_HOME ?= $(abspath $(RAG_DATA_DIR))/dagster
export DAGSTER_HOME

# `make bench` inputs (paths relative to the project root) and synthetic corpus sizes.
BENCH_NEW ?= ../shared/data/documents-2025.json
BENCH_OLD ?= ../shared/data/documents-2024-06.json
BENCH_SCALE ?= 10000,100000
# 1k cold refreshes and `make run`s timed by `make bench` and `make bench-targets`.
BENCH_REPEATS ?= 5
# `make rehearse`: the FAQ its local source serves, its output folder, the run limit it sets.
REHEARSE_DOCUMENTS ?= ../shared/data/documents-2025.json
REHEARSE_OUT ?= .rehearsal
REHEARSE_MAX_RUNTIME_S ?= 150
# `make fit-reranker`: the ground truth the committed reranker weights are fitted on.
EVAL_DOCUMENTS ?= ../shared/eval/documents-with-ids.json
EVAL_GROUND_TRUTH ?= ../shared/eval/ground-truth-dev.csv
LINTED := rag_assets rag_assets_tests benchmarks deploy

.PHONY: setup lock run test lint dev serve bench bench-targets bench-courses bench-1m bench-scale-out bench-serve bench-mcp bench-no-match rehearse fit-reranker clean

setup: $(STAMP)

# Exact versions from the lock file (hashes checked), then the project itself.
$(STAMP): pyproject.toml .python-version requirements/dev.lock requirements/pip.lock
	@test -x $(PY) || python -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements/pip.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements/dev.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

# Re-resolve the version ranges of pyproject.toml into the lock files (after changing them).
LOCK_FLAGS := --python-version 3.12 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-strip-extras --quiet
lock: setup
	$(VENV)/bin/uv pip compile pyproject.toml $(LOCK_FLAGS) --extra dev --extra deploy -o requirements/dev.lock
	$(VENV)/bin/uv pip compile pyproject.toml $(LOCK_FLAGS) --extra deploy -o requirements/deploy.lock
	$(VENV)/bin/uv pip compile requirements/pip.in $(LOCK_FLAGS) -o requirements/pip.lock

$(DAGSTER_HOME)/dagster.yaml: dagster-instance.yaml
	@mkdir -p $(DAGSTER_HOME)
	cp dagster-instance.yaml $@

# The job the schedule runs (faq_index_refresh), in process, ending with a summary.
run: setup $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m rag_assets.defs.refresh

# The UI and the daemon (the schedule) on http://127.0.0.1:$(PORT); `make dev PORT=3300` for another port.
PORT ?= 3000
dev: setup $(DAGSTER_HOME)/dagster.yaml
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/dg dev --host 127.0.0.1 --port $(PORT)

test: lint
	$(VENV)/bin/pytest

bench: setup
	$(PY) benchmarks/refresh.py --new $(BENCH_NEW) --old $(BENCH_OLD) --scale '$(BENCH_SCALE)' --repeats $(BENCH_REPEATS) --out bench-results.json

# Issue 25's targets alone (about 5 minutes): 1k cold and warm refreshes and `make run`, each
# BENCH_REPEATS times, and the 200-courses point below.
bench-targets: setup
	$(PY) benchmarks/refresh.py --new $(BENCH_NEW) --only targets --repeats $(BENCH_REPEATS) --out bench-targets-results.json

# The same 800 real entries as 200 courses of 4 and in their 3 courses: cold and unchanged
# refreshes, wall ratio and the Dagster instance's growth per refresh (about 3 minutes).
bench-courses: setup
	$(PY) benchmarks/refresh.py --new $(BENCH_NEW) --only courses --out bench-courses-results.json

# The 1M-chunk scale point alone (about 20 minutes on 2 cores): cold, queries, warm.
bench-1m: setup
	$(PY) benchmarks/refresh.py --new $(BENCH_NEW) --scale 1000000 --scale-only --out bench-1m-results.json

# "No entry matches": dev golds lost and unanswerable queries refused at a few relevance floors,
# in the lexical and the cosine scale (about 3 minutes).
bench-no-match: setup
	$(PY) benchmarks/no_match.py --documents $(EVAL_DOCUMENTS) --ground-truth $(EVAL_GROUND_TRUTH) --out bench-no-match-results.json

# Four courses of 25,000 chunks: a cold refresh, one run, its steps on one Celery worker pinned to a
# core against two (each on a core of its own); Redis on 127.0.0.1 for it (about 15 minutes).
bench-scale-out: setup
	$(PY) benchmarks/scale_out.py --new $(BENCH_NEW) --out scale-out-results.json

# The deployment without containers: Postgres, daemon, webserver, Chromium; about 5 minutes.
rehearse: setup
	$(PY) deploy/rehearse.py --documents $(REHEARSE_DOCUMENTS) --out $(REHEARSE_OUT) --max-runtime-s $(REHEARSE_MAX_RUNTIME_S)

# `rag serve` under load (wrk, installed from Debian's packages when missing), and under a publish.
# `BENCH_RERANKER=none` (or semantic): the server in that mode instead of the default.
bench-serve: setup
	$(PY) benchmarks/serve.py --new $(BENCH_NEW) --old $(BENCH_OLD) --ground-truth ../shared/eval/ground-truth-dev.csv $(if $(BENCH_RERANKER),--reranker $(BENCH_RERANKER)) --out serve-bench-results.json

# `rag mcp --http` beside `rag serve`: 4 concurrent clients for 30 s each, one server process (about 2 minutes).
bench-mcp: setup
	$(PY) benchmarks/mcp_load.py --documents $(BENCH_NEW) --ground-truth ../shared/eval/ground-truth-dev.csv --out bench-mcp-results.json

# Grouped cross-validated figures of every RAG_RERANKER mode, and the weights the package ships
# (rag_assets/index/rerankers/); 60-150 s here.
fit-reranker: setup
	$(VENV)/bin/rag fit-reranker --documents $(EVAL_DOCUMENTS) --ground-truth $(EVAL_GROUND_TRUTH) --write

# The retrieval service on http://127.0.0.1:8000 (docs at /docs) over the index `make run` built.
serve: setup
	$(VENV)/bin/rag serve

lint: setup
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
