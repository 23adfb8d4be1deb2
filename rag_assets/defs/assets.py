"""The asset graph: raw_documents -> chunks -> lemmas -> embeddings -> es_index.

Each asset is a thin wrapper: the work happens in plain functions, the asset adds logging,
timings and the metadata shown in the Dagster UI.
"""

import time
from datetime import timedelta
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from rag_assets import quality
from rag_assets.common.memory import peak_rss_mb
from rag_assets.common.stored import StoredValue, StoredValueError, code_digest, digest
from rag_assets.defs.resources import (
    DocumentSourceResource,
    NlpResource,
    QualityResource,
    RefreshLockResource,
    SearchIndexResource,
)
from rag_assets.index.backend import (
    SEMANTIC,
    CourseValues,
    IndexContent,
    PublishError,
    PublishRefusedError,
    made_by,
)
from rag_assets.ingest import chunking, sources
from rag_assets.ingest.chunking import ChunkingConfig, make_chunks
from rag_assets.ingest.sources import LoadedDocuments, SourceError
from rag_assets.nlp import analysis, cache, features, sentence
from rag_assets.nlp.analysis import VECTOR_DIM, model_fingerprint
from rag_assets.nlp.cache import cached_lemmas, cached_sentence_vectors, cached_vectors
from rag_assets.nlp.features import LEMMA_FIELDS, ChunkVectors, token_counts
from rag_assets.nlp.sentence import SENTENCE_MODEL, sentence_encoder
from rag_assets.settings import freshness_hours

GROUP = "faq_index"
# The unit of work: every course of the source is a partition of the per-course assets.
COURSES = dg.DynamicPartitionsDefinition(name="course")
PREVIEW_ROWS = 5
# Known at load time without loading the model, so the UI flags the NLP assets as unsynced when
# the model or the analysis rules change.
NLP_CODE_VERSION = model_fingerprint()
# Part of every stored value's digest: editing the code that makes a value makes it anew.
SOURCE_CODE = code_digest(sources)
CHUNKING_CODE = code_digest(chunking)
NLP_CODE = code_digest(analysis, features, cache, sentence)
LOGGED_EXAMPLES = 20
_WARN_HOURS, _FAIL_HOURS = freshness_hours()
# On the source and on what is served: a stale index shows as stale in the UI.
FRESHNESS = dg.FreshnessPolicy.time_window(
    warn_window=timedelta(hours=_WARN_HOURS), fail_window=timedelta(hours=_FAIL_HOURS)
)


def preview(frame: pd.DataFrame, columns: list[str], width: int = 80) -> str:
    """A Markdown table of the first rows, kept in the stored value's facts."""
    shown = (
        frame[columns]
        .head(PREVIEW_ROWS)
        .map(lambda v: (s[: width - 1] + "…") if len(s := str(v).replace("\n", " ")) > width else s)
    )
    return shown.to_markdown(index=False)


def value_metadata(stored: StoredValue, started: float) -> dict[str, Any]:
    """The facts of a step's value as Dagster metadata, and whether this run made or reused it."""
    facts = {key: value for key, value in stored.facts.items() if not key.startswith("_")}
    if stored.reused and "computed" in facts:  # nothing was analysed by this run
        facts.update(computed=0, reused=facts["chunks"], cache_pruned=0, computed_per_s=0.0)
    return {
        **facts,
        "preview": dg.MetadataValue.md(facts["preview"]),
        "stored_value": "reused (inputs unchanged)" if stored.reused else "made",
        "value_digest": stored.digest,
        "duration_s": round(time.perf_counter() - started, 3),
        "peak_rss_mb": peak_rss_mb(),
    }


def per_course(frame: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in frame.groupby("course").size().items()}


@dg.asset(group_name=GROUP, kinds={"python", "pandas"}, freshness_policy=FRESHNESS)
def faq_source(
    context: dg.AssetExecutionContext, refresh_lock: RefreshLockResource, source: DocumentSourceResource
) -> dg.MaterializeResult:
    """Every FAQ entry from DOCUMENTS_URL, whichever of the three source shapes it has, and the
    courses it names: the partitions of the per-course assets.

    The source is read every time; it is parsed only when its bytes changed.
    """
    started = time.perf_counter()
    try:
        fetched = source.fetch()
        stored = refresh_lock.stored_values().find_or_make(
            "faq_source",
            digest(SOURCE_CODE, source.max_entry_chars, fetched.digest),
            lambda: documents_value(source.parse(fetched)),
        )
    except SourceError as exc:
        # A Failure shows the reason itself in the UI instead of a wrapped traceback.
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    facts = stored.facts
    for dropped in facts["dropped_examples"]:
        context.log.warning(f"dropped {dropped}")
    if facts["dropped_entries"] > LOGGED_EXAMPLES:
        context.log.warning(f"... and {facts['dropped_entries'] - LOGGED_EXAMPLES} more dropped entries")
    for doc_id in facts["renamed_examples"]:
        context.log.warning(f"repeated source id, kept as {doc_id}")
    unchanged = " (unchanged since they were last parsed)" if stored.reused else ""
    context.log.info(
        f"{facts['entries']} entries of {len(facts['courses'])} courses from {facts['source_files']} "
        f"file(s), shape {facts['source_shape']}{unchanged}"
    )
    return dg.MaterializeResult(value=stored, metadata=value_metadata(stored, started))


def documents_value(loaded: LoadedDocuments) -> tuple[pd.DataFrame, dict[str, Any]]:
    frame = loaded.frame
    return frame, {
        "entries": len(frame),
        "dropped_entries": len(loaded.dropped),
        "renamed_ids": len(loaded.renamed_ids),
        "courses": per_course(frame),
        "source_shape": loaded.shape,
        "source_files": len(loaded.locations),
        "source": loaded.locations[0],
        "preview": preview(frame, ["doc_id", "course", "section", "question", "answer"]),
        "dropped_examples": [str(d) for d in loaded.dropped[:LOGGED_EXAMPLES]],
        "renamed_examples": loaded.renamed_ids[:LOGGED_EXAMPLES],
    }


@dg.asset(group_name=GROUP, kinds={"python", "pandas"}, partitions_def=COURSES)
def raw_documents(
    context: dg.AssetExecutionContext, refresh_lock: RefreshLockResource, faq_source: StoredValue
) -> dg.MaterializeResult:
    """The entries of one course, as the source has them now."""
    started = time.perf_counter()
    course = context.partition_key
    known = faq_source.facts["courses"]
    if course not in known:
        raise dg.Failure(
            description=f"course {course!r} is not in the source {faq_source.facts['source']} "
            f"(it has: {', '.join(sorted(known)) or 'none'}); the next refresh removes it from the index",
            allow_retries=False,
        )
    stored = refresh_lock.stored_values(course).find_or_make(
        "raw_documents", digest(faq_source.digest, course), lambda: course_documents_value(faq_source, course)
    )
    return dg.MaterializeResult(value=stored, metadata=value_metadata(stored, started))


def course_documents_value(source: StoredValue, course: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read part by part: the whole source is never held to take one course out of it."""
    frame = pd.concat([part[part["course"] == course] for part in source.parts()], ignore_index=True)
    return frame, {
        "entries": len(frame),
        "course": course,
        "source": source.facts["source"],
        "source_value": source.digest,
        "preview": preview(frame, ["doc_id", "section", "question", "answer"]),
    }


class ChunksConfig(dg.Config):
    max_chars: int = Field(default=ChunkingConfig.max_chars, description="Longest answer window")
    overlap_chars: int = Field(
        default=ChunkingConfig.overlap_chars, description="Overlap between consecutive windows"
    )


@dg.asset(group_name=GROUP, kinds={"python", "pandas"}, partitions_def=COURSES)
def chunks(
    context: dg.AssetExecutionContext,
    refresh_lock: RefreshLockResource,
    config: ChunksConfig,
    raw_documents: StoredValue,
) -> dg.MaterializeResult:
    """Searchable units: one per entry, long answers cut into overlapping windows."""
    started = time.perf_counter()
    chunking_config = ChunkingConfig(config.max_chars, config.overlap_chars)
    stored = refresh_lock.stored_values(context.partition_key).find_or_make(
        "chunks",
        digest(CHUNKING_CODE, raw_documents.digest, chunking_config.max_chars, chunking_config.overlap_chars),
        lambda: chunks_value(make_chunks(raw_documents.load(), chunking_config), chunking_config),
    )
    return dg.MaterializeResult(value=stored, metadata=value_metadata(stored, started))


def chunks_value(frame: pd.DataFrame, config: ChunkingConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    sizes = frame["text"].str.len()
    probe = quality.smoke_probe(frame)
    return frame, {
        "chunks": len(frame),
        "entries": int(frame["doc_id"].nunique()),
        "max_chars": config.max_chars,
        "split_entries": int((frame["chunk_index"] > 0).groupby(frame["doc_id"]).any().sum()),
        "max_text_chars": int(sizes.max()),
        "mean_text_chars": round(float(sizes.mean()), 1),
        "preview": preview(frame, ["chunk_id", "course", "question", "text"]),
        "smoke_probe": [probe.question, probe.course, probe.document],
        # what the es_index checks compare the served index with, without loading the chunks
        "hashes_digest": quality.hashes_digest(zip(frame["chunk_id"], frame["content_hash"], strict=True)),
    }


@dg.asset(group_name=GROUP, kinds={"python", "spacy"}, code_version=NLP_CODE_VERSION, partitions_def=COURSES)
def lemmas(
    context: dg.AssetExecutionContext,
    refresh_lock: RefreshLockResource,
    nlp: NlpResource,
    chunks: StoredValue,
) -> dg.MaterializeResult:
    """Stemmed lemmas of each searched field, without stop words, punctuation or spaces.

    Only chunks whose content is not in the NLP cache are analysed; the model loads only then.
    """
    started = time.perf_counter()

    def analyse() -> tuple[pd.DataFrame, dict[str, Any]]:
        nlp_cache = nlp.cache(context.partition_key, context.log.warning)
        frame, reuse = cached_lemmas(nlp.pipeline, chunks.load(), nlp_cache, nlp.settings(), context.log.info)
        context.log.info(f"lemmas: {reuse.computed} chunks analysed, {reuse.reused} from the cache")
        return frame, {
            "chunks": len(frame),
            "computed": reuse.computed,
            "reused": reuse.reused,
            "cache_pruned": nlp_cache.prune(),
            "terms": sum(int(token_counts(frame[f"{f}_lemmas"]).sum()) for f in LEMMA_FIELDS),
            "model_fingerprint": nlp.fingerprint(),
            "computed_per_s": round(reuse.computed / max(time.perf_counter() - started, 1e-9), 1),
            "preview": preview(frame, ["chunk_id", *(f"{f}_lemmas" for f in LEMMA_FIELDS)]),
        }

    stored = refresh_lock.stored_values(context.partition_key).find_or_make(
        "lemmas", digest(NLP_CODE, nlp.fingerprint(), chunks.digest), analyse
    )
    return dg.MaterializeResult(value=stored, metadata=value_metadata(stored, started))


@dg.asset(group_name=GROUP, kinds={"python", "numpy"}, code_version=NLP_CODE_VERSION, partitions_def=COURSES)
def embeddings(
    context: dg.AssetExecutionContext,
    refresh_lock: RefreshLockResource,
    nlp: NlpResource,
    lemmas: StoredValue,
    chunks: StoredValue,
) -> dg.MaterializeResult:
    """A unit-length word-vector mean per chunk, from the content words found by `lemmas`; with
    RAG_RERANKER=semantic also each chunk's MiniLM sentence vector (question and answer)."""
    started = time.perf_counter()
    semantic = nlp.reranker == SEMANTIC

    def embed() -> tuple[ChunkVectors, dict[str, Any]]:
        lemma_frame = lemmas.load(columns=["chunk_id", "content_hash", "vector_words"])
        nlp_cache = nlp.cache(context.partition_key, context.log.warning)
        vectors, reuse = cached_vectors(nlp.pipeline, lemma_frame, nlp_cache)
        sentence_facts: dict[str, Any] = {"sentence_vectors": "off (RAG_RERANKER is not semantic)"}
        if semantic:
            sentence_started = time.perf_counter()
            chunk_frame = chunks.load(columns=["chunk_id", "content_hash", "question", "text"])
            if list(chunk_frame["chunk_id"]) != vectors.chunk_ids:
                raise dg.Failure(description="chunks and lemmas hold different chunk ids: materialize both")
            log = context.log.info
            sentences, made = cached_sentence_vectors(sentence_encoder, chunk_frame, nlp_cache, log)
            vectors = ChunkVectors(vectors.chunk_ids, vectors.matrix, sentences)
            took = time.perf_counter() - sentence_started
            log(f"sentence vectors: {made.computed} computed in {took:.1f} s, {made.reused} cached")
            sentence_facts = {
                "sentence_vectors": SENTENCE_MODEL,
                "sentence_computed": made.computed,
                "sentence_s": round(took, 3),
            }
        shown = pd.DataFrame(
            {
                "chunk_id": vectors.chunk_ids[:PREVIEW_ROWS],
                "content words": lemma_frame["vector_words"].head(PREVIEW_ROWS).to_numpy(),
                "first components": [
                    " ".join(f"{x:+.3f}" for x in row[:4]) + " …" for row in vectors.matrix[:PREVIEW_ROWS]
                ],
            }
        )
        return vectors, {
            "chunks": len(vectors.chunk_ids),
            "computed": reuse.computed,
            "reused": reuse.reused,
            "dimensions": VECTOR_DIM,
            "zero_vectors": int((~np.any(vectors.matrix, axis=1)).sum()),
            **sentence_facts,
            "preview": preview(shown, list(shown.columns)),
        }

    stored = refresh_lock.stored_values(context.partition_key).find_or_make(
        "embeddings", digest(NLP_CODE, *made_by(nlp.fingerprint(), nlp.reranker), lemmas.digest), embed
    )
    return dg.MaterializeResult(value=stored, metadata=value_metadata(stored, started))


class PublishConfig(dg.Config):
    courses: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per course, the digests of the chunks, lemmas and embeddings values its last "
        "successful run made (the publish sensor fills it in); the other courses stay as served",
    )


@dg.asset(
    group_name=GROUP,
    kinds={"sqlite", "elasticsearch"},
    freshness_policy=FRESHNESS,
    deps=[chunks, lemmas, embeddings],
)
def es_index(
    context: dg.AssetExecutionContext,
    config: PublishConfig,
    refresh_lock: RefreshLockResource,
    search_index: SearchIndexResource,
    nlp: NlpResource,
    quality_settings: QualityResource,
) -> dg.MaterializeResult:
    """The served search index: every current course, published all at once, and only if the new
    version answers the probe questions (and the ground truth) no worse than the live one.

    A course takes the values of its last successful run (`config.courses`), else the ones it is
    served from: a course whose run failed stays as served, and holds no other course back. A
    course no longer in the source is removed. An index published from this very content is
    confirmed without being read or rewritten.
    """
    started = time.perf_counter()
    backend = search_index.backend(context.log.info)  # progress of long publishes
    current = set(context.instance.get_dynamic_partitions(COURSES.name))
    with refresh_lock.publishing(context.run.run_id):
        served = backend.served_sources()
        wanted = {c: d for c, d in {**served, **config.courses}.items() if c in current}
        try:
            courses = {course: course_values(refresh_lock, course, d) for course, d in wanted.items()}
        except StoredValueError as exc:
            raise dg.Failure(description=str(exc), allow_retries=False) from exc
        content_digest = IndexContent.courses_digest(courses, nlp.reranker)
        report = backend.confirm(content_digest)
        confirmed = report is not None
        if report is not None:
            context.log.info(f"{report.location} was published from this same content: confirmed as current")
        else:
            content = IndexContent.of_courses(courses, nlp.fingerprint(), nlp.reranker)
            # the model loads only to judge
            gate = quality_settings.gate(nlp.pipeline, content.chunks.parts(), nlp.reranker)
            try:
                report = backend.publish(content, gate)
            except PublishError as exc:
                raise dg.Failure(
                    description=str(exc), metadata=_gate_metadata(exc), allow_retries=False
                ) from exc
            context.log.info(
                f"published {report.chunks} chunks to {report.location}: {report.upserted} written, "
                f"{report.deleted} deleted, {report.unchanged} unchanged"
            )
        refresh_lock.stored_values().keep_served(d for values in courses.values() for d in values.digests())
    for warning in report.warnings:
        context.log.warning(warning)
    removed = sorted(set(served) - current)
    if removed:
        context.log.warning(f"courses no longer in the source, removed from the index: {', '.join(removed)}")
    stats = backend.stats()
    table = pd.DataFrame(
        {
            "course": sorted(courses),
            "entries": [stats.courses.get(c, 0) for c in sorted(courses)],
            "values": ["this refresh" if c in config.courses else "as served" for c in sorted(courses)],
        }
    )
    return dg.MaterializeResult(
        metadata={
            **({} if report.gate is None else report.gate.metadata),
            "published_at": stats.published_at or "",
            "confirmed_at": stats.confirmed_at or "",
            "preview": dg.MetadataValue.md(preview(table, list(table.columns))),
            "backend": backend.kind,
            "reranker": nlp.reranker,
            "location": report.location,
            "entries": stats.entries,
            "chunks": stats.chunks,
            "courses": stats.courses,
            "courses_refreshed": sorted(set(config.courses) & current),
            "courses_as_served": sorted(set(courses) - set(config.courses)),
            "courses_removed": removed,
            "courses_not_built": sorted(current - set(courses)),
            "upserted": report.upserted,
            "deleted": report.deleted,
            "unchanged": report.unchanged,
            "content_digest": content_digest,
            "confirmed_without_reading": confirmed,
            "index_version": report.version or "",
            "previous_index": report.previous or "",
            "warnings": dg.MetadataValue.md("\n".join(f"- {w}" for w in report.warnings) or "none"),
            "duration_s": round(time.perf_counter() - started, 3),
            "peak_rss_mb": peak_rss_mb(),
        },
    )


def course_values(refresh_lock: RefreshLockResource, course: str, digests: list[str]) -> CourseValues:
    """A course's stored values by digest; refuses, naming the course, if one is no longer kept."""
    store = refresh_lock.stored_values(course)
    found = [store.find(step, d) for step, d in zip(("chunks", "lemmas", "embeddings"), digests, strict=True)]
    if any(value is None for value in found):
        raise StoredValueError(
            f"the stored values of course {course!r} ({', '.join(digests)}) are no longer kept; "
            "run the refresh of that course again"
        )
    return CourseValues(*found)


def _gate_metadata(exc: PublishError) -> dict[str, object]:
    return exc.verdict.metadata if isinstance(exc, PublishRefusedError) else {}
