"""Dagster resources: the outside world the assets talk to (the source, the model, the index)."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field
from spacy.language import Language

from rag_assets import settings
from rag_assets.common.lock import DirectoryBusyError, DirectoryLock
from rag_assets.common.stored import ValueStore, course_folder
from rag_assets.evaluation import read_ground_truth
from rag_assets.index.backend import SearchBackend
from rag_assets.index.elasticsearch import (
    CLIENT_ERRORS,
    ElasticsearchIndex,
    ElasticsearchSettings,
    describe_error,
)
from rag_assets.index.embedded import EmbeddedIndex
from rag_assets.ingest.sources import (
    DEFAULT_DOCUMENTS_URL,
    DEFAULT_MAX_ENTRY_CHARS,
    FetchedSource,
    Fetcher,
    LoadedDocuments,
    fetch_source,
    parse_source,
)
from rag_assets.nlp.analysis import (
    MODEL_NAME,
    NlpSettings,
    default_processes,
    load_pipeline,
    model_fingerprint,
)
from rag_assets.nlp.cache import NlpCache
from rag_assets.quality import RetrievalGate, answer_probes, smoke_probes

ASSET_VALUES = "assets"  # the IO manager's folder in the data directory
KEEP_RUN_OUTPUTS = 2


class DocumentSourceResource(dg.ConfigurableResource):
    """Where the FAQ comes from: http(s)://, file:// or a plain path."""

    url: str = Field(default=DEFAULT_DOCUMENTS_URL, description="Source URL or path (DOCUMENTS_URL)")
    timeout_s: float = Field(default=30.0, description="Per-read timeout in seconds")
    retries: int = Field(default=3, description="Retries for connection errors and HTTP 429/5xx")
    deadline_s: float = Field(default=300.0, description="Longest time one URL may take, retries included")
    max_retry_after_s: float = Field(default=60.0, description="Longest Retry-After wait honoured")
    max_entry_chars: int = Field(
        default=DEFAULT_MAX_ENTRY_CHARS, description="Longer entries are dropped and counted"
    )

    def fetch(self) -> FetchedSource:
        fetcher = Fetcher(
            timeout_s=self.timeout_s,
            retries=self.retries,
            deadline_s=self.deadline_s,
            max_retry_after_s=self.max_retry_after_s,
        )
        return fetch_source(self.url, fetcher)

    def parse(self, fetched: FetchedSource) -> LoadedDocuments:
        return parse_source(fetched, self.max_entry_chars)


class NlpResource(dg.ConfigurableResource):
    """The spaCy pipeline used for chunks and for queries alike."""

    model: str = Field(default=MODEL_NAME, description="spaCy package name or model directory")
    batch_size: int = Field(default=256, description="Texts per nlp.pipe batch")
    processes: int = Field(default_factory=default_processes, description="Worker processes for large inputs")
    min_texts_per_process: int = Field(
        default=NlpSettings.min_texts_per_process, description="Distinct texts each extra process needs"
    )
    cache_dir: str = Field(default=".rag/cache", description="Directory of the NLP cache")
    cache_ttl_days: float = Field(default=7.0, description="Cache entries unused this long are pruned")
    reranker: str = Field(
        default=settings.DEFAULT_RERANKER,
        description="RAG_RERANKER: none, features or semantic (semantic adds sentence vectors to embeddings)",
    )

    def pipeline(self) -> Language:
        return load_pipeline(self.model)

    def settings(self) -> NlpSettings:
        return NlpSettings(
            batch_size=self.batch_size,
            processes=self.processes,
            min_texts_per_process=self.min_texts_per_process,
        )

    def fingerprint(self) -> str:
        return model_fingerprint(self.model)

    def cache(self, course: str, log: Callable[[str], None] | None = None) -> NlpCache:
        """A course's own cache: steps side by side never write to the same file."""
        directory = Path(self.cache_dir) / "courses" / course_folder(course)
        return NlpCache(directory, self.fingerprint(), self.cache_ttl_days, log)


class ElasticsearchResource(dg.ConfigurableResource):
    """An Elasticsearch cluster; credentials come from the environment (dg.EnvVar), never code.

    The fields are those of `ElasticsearchSettings`, which does the work (a test keeps them equal).
    """

    url: str = Field(description="Cluster URL (ELASTICSEARCH_URL)")
    api_key: str | None = Field(default=None, description="API key (ELASTICSEARCH_API_KEY)")
    username: str | None = Field(default=None, description="Basic auth user (ELASTICSEARCH_USERNAME)")
    password: str | None = Field(default=None, description="Basic auth password (ELASTICSEARCH_PASSWORD)")
    verify_certs: bool = Field(default=True, description="Verify TLS certificates")
    ca_certs: str | None = Field(default=None, description="CA bundle for TLS verification")
    request_timeout_s: float = Field(default=30.0, description="Per-request timeout in seconds")
    max_retries: int = Field(default=3, description="Retries of failed requests (connection, 429, 5xx)")
    alias: str = Field(default="faq-chunks", description="Alias the index is served under")
    shards: int = Field(default=1, description="Primary shards of each new index")
    replicas: int = Field(default=0, description="Replicas of each new index")
    keep_previous: int = Field(default=2, description="Previous indices kept for rollback")

    def settings(self) -> ElasticsearchSettings:
        return ElasticsearchSettings(
            **{name: getattr(self, name) for name in ElasticsearchSettings.field_names()}
        )

    def index(self, log: Callable[[str], None] | None = None) -> ElasticsearchIndex:
        return self.settings().open_index(log)


class SearchIndexResource(dg.ConfigurableResource):
    """The search backend: Elasticsearch when configured, else the embedded index on disk."""

    data_dir: str = Field(default=".rag", description="Embedded index directory (RAG_DATA_DIR)")
    elasticsearch: ElasticsearchResource | None = None

    def backend(self, log: Callable[[str], None] | None = None) -> SearchBackend:
        if self.elasticsearch is not None:
            return self.elasticsearch.index(log)
        return EmbeddedIndex(Path(self.data_dir), log)


def naming_cluster_errors[**P, R](step: Callable[P, R]) -> Callable[P, R]:
    """A step that talks to Elasticsearch fails with the cluster's problem in one line that names
    the setting to check (unreachable, credentials refused), not with the client's traceback."""

    @functools.wraps(step)
    def reported(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return step(*args, **kwargs)
        except CLIENT_ERRORS as exc:
            raise dg.Failure(description=describe_error(exc), allow_retries=False) from exc

    return reported


def prune_run_outputs(directory: Path, keep: str) -> None:
    """Drop the step outputs the IO manager keeps per run (`<run id>/`), but those of this run and
    the newest `KEEP_RUN_OUTPUTS` others (a re-execution from failure reads them): they are
    handles, not data, yet at 200 courses a run leaves 5 MB of them."""
    runs = [p for p in directory.glob("*-*-*-*-*") if p.is_dir() and p.name != keep]
    for old in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)[KEEP_RUN_OUTPUTS:]:
        shutil.rmtree(old, ignore_errors=True)


def runs_under_way(instance: dg.DagsterInstance | None) -> Callable[[str], bool | None]:
    """Whether the instance knows a run as under way (True), finished (False), or not (None)."""

    def under_way(run_id: str) -> bool | None:
        run = instance.get_run_by_id(run_id) if instance is not None else None
        return None if run is None else not run.is_finished

    return under_way


class RefreshLockResource(dg.ConfigurableResource):
    """Holds the data directory for the whole run, so two refreshes never mix their data.

    Runs launched through the daemon could be serialised by the run queue, but `dagster asset
    materialize`, `dagster job execute` and `make run` execute in process and bypass it; a lock
    taken when the run's resources are set up covers every entry point. With the in-process
    executor that is once per run, before the first step, released after the last. With steps in
    other processes (multiprocess, Celery), each step takes it as the owner run's, and the run's
    claim stays between its steps (`steps_elsewhere`).
    """

    data_dir: str = Field(default=".rag", description="The data directory to hold (RAG_DATA_DIR)")
    steps_elsewhere: bool = Field(
        default=False, description="Steps run in other processes: keep the run's claim between them"
    )

    @contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext) -> Iterator[RefreshLockResource]:
        lock = DirectoryLock(self.data_dir)
        instance = context.instance
        under_way = runs_under_way(instance)
        run_id = context.run.run_id if context.run else "(no run)"
        try:
            ended = lock.acquire(run_id, under_way)
        except DirectoryBusyError as exc:
            raise dg.Failure(description=str(exc), allow_retries=False) from exc
        prune_run_outputs(Path(self.data_dir) / ASSET_VALUES, keep=run_id)
        if ended is not None and under_way(ended) and instance is not None:
            # its process ended without finishing (killed): say so, so nothing waits for it
            dead = instance.get_run_by_id(ended)
            if dead is not None:
                instance.report_run_failed(
                    dead, f"its process ended without finishing; run {run_id} took over {self.data_dir}"
                )
        try:
            yield self
        finally:
            lock.release(keep_claim=self.steps_elsewhere)

    def stored_values(self, course: str | None = None) -> ValueStore:
        """The steps' outputs, kept in the data directory this lock holds (a course's in its own)."""
        store = ValueStore(Path(self.data_dir) / "values")
        return store if course is None else store.for_course(course)


class QualityResource(dg.ConfigurableResource):
    """Thresholds of the asset checks, and the optional ground truth for retrieval quality."""

    max_entry_drop: float = Field(
        default=0.2, description="Largest allowed drop in entries vs the served index"
    )
    max_course_entry_drop: float = Field(
        default=0.5, description="Largest allowed drop in one course's entries vs the served index"
    )
    max_zero_vector_share: float = Field(default=0.05, description="Largest allowed share of zero vectors")
    max_empty_lemma_share: float = Field(default=0.02, description="Largest share of chunks without lemmas")
    max_blank_answer_share: float = Field(
        default=0.1, description="Largest share of a course's answers that are empty or have no words"
    )
    max_duplicate_share: float = Field(
        default=0.1, description="Largest share of a course's entries repeating another's question or answer"
    )
    max_answer_churn: float = Field(
        default=0.5, description="Largest share of a course's served entries whose answer changes at once"
    )
    ground_truth: str | None = Field(
        default=None, description="CSV question,course,document (RAG_GROUND_TRUTH)"
    )
    min_hit_rate: float = Field(default=0.9, description="Retrieval-quality check: minimum hit rate")
    min_mrr: float = Field(default=0.8, description="Retrieval-quality check: minimum MRR")
    eval_k: int = Field(default=5, description="Retrieval-quality check: hits considered per question")
    max_quality_drop: float = Field(
        default=0.02, description="Publish gate: largest drop in hit rate or MRR against the live index"
    )
    gate_probes: int = Field(default=50, description="Publish gate: entries asked their own question")
    answer_probes: int = Field(
        default=20, description="Publish gate: entries of each changed course asked with their served answer"
    )
    max_answer_probe_drop: float = Field(
        default=0.3, description="Publish gate: largest fall of a course's answer-probe hit rate"
    )

    def gate(
        self,
        nlp: Callable[[], Language],
        chunk_parts: Iterable[pd.DataFrame],
        served_chunk_parts: Iterable[pd.DataFrame],
        reranker: str,
    ) -> RetrievalGate:
        """The publish gate for a new version made of these chunks, searched in `reranker` mode;
        the served chunks of the courses it changes give the answer probes."""
        return RetrievalGate(
            nlp,
            smoke_probes(chunk_parts, self.gate_probes),
            read_ground_truth(self.ground_truth) if self.ground_truth else [],
            eval_k=self.eval_k,
            max_drop=self.max_quality_drop,
            reranker=reranker,
            answers=answer_probes(served_chunk_parts, self.answer_probes),
            max_answer_drop=self.max_answer_probe_drop,
        )


def environment_resources(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Resources configured from the environment (see the README's configuration table).

    Secrets stay `dg.EnvVar`s: Dagster resolves them at run time and shows only the variable's
    name, never its value.
    """
    directory = settings.data_dir(env)
    cluster = None
    if env.get("ELASTICSEARCH_URL"):
        cluster = ElasticsearchResource(
            **{  # pydantic converts "false", "30", ... to the field types
                field: dg.EnvVar(name) if name in settings.SECRETS else env[name]
                for name, field in settings.ELASTICSEARCH_SETTINGS.items()
                if env.get(name)
            }
        )
    return {
        "source": DocumentSourceResource(
            url=env.get("DOCUMENTS_URL") or DEFAULT_DOCUMENTS_URL,
            **settings.present(env, settings.SOURCE_SETTINGS),
        ),
        "nlp": NlpResource(
            cache_dir=str(directory / "cache"),
            reranker=settings.reranker(env),
            **settings.present(env, settings.NLP_SETTINGS),
        ),
        "search_index": SearchIndexResource(data_dir=str(directory), elasticsearch=cluster),
        "quality_settings": QualityResource(**settings.present(env, settings.QUALITY_SETTINGS)),
        "io_manager": dg.FilesystemIOManager(base_dir=str(directory / ASSET_VALUES)),
        "refresh_lock": RefreshLockResource(
            data_dir=str(directory), steps_elsewhere=settings.executor(env) != settings.IN_PROCESS
        ),
    }


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=environment_resources())
