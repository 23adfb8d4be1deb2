"""The asset graph: raw_documents -> chunks -> lemmas -> embeddings -> es_index.

Each asset is a thin wrapper: the work happens in plain functions, the asset adds logging,
timings and the metadata shown in the Dagster UI.
"""

import time
from datetime import timedelta

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from rag_assets.common.progress import peak_rss_mb
from rag_assets.defs.resources import (
    DocumentSourceResource,
    NlpResource,
    QualityResource,
    RefreshLockResource,
    SearchIndexResource,
)
from rag_assets.index.backend import IndexContent, PublishError, PublishRefusedError
from rag_assets.ingest.chunking import ChunkingConfig, make_chunks
from rag_assets.ingest.sources import SourceError
from rag_assets.nlp.analysis import VECTOR_DIM, model_fingerprint
from rag_assets.nlp.cache import cached_lemmas, cached_vectors
from rag_assets.nlp.features import LEMMA_FIELDS, ChunkVectors, token_counts
from rag_assets.settings import freshness_hours

GROUP = "faq_index"
PREVIEW_ROWS = 5
# Known at load time without loading the model, so the UI flags the NLP assets as unsynced when
# the model or the analysis rules change.
NLP_CODE_VERSION = model_fingerprint()
_WARN_HOURS, _FAIL_HOURS = freshness_hours()
# On the source and on what is served: a stale index shows as stale in the UI.
FRESHNESS = dg.FreshnessPolicy.time_window(
    warn_window=timedelta(hours=_WARN_HOURS), fail_window=timedelta(hours=_FAIL_HOURS)
)


def preview(frame: pd.DataFrame, columns: list[str], width: int = 80) -> dg.MetadataValue:
    shown = (
        frame[columns]
        .head(PREVIEW_ROWS)
        .map(lambda v: (s[: width - 1] + "…") if len(s := str(v).replace("\n", " ")) > width else s)
    )
    return dg.MetadataValue.md(shown.to_markdown(index=False))


def per_course(frame: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in frame.groupby("course").size().items()}


@dg.asset(group_name=GROUP, kinds={"python", "pandas"}, freshness_policy=FRESHNESS)
def raw_documents(
    context: dg.AssetExecutionContext, refresh_lock: RefreshLockResource, source: DocumentSourceResource
) -> dg.MaterializeResult:
    """FAQ entries from DOCUMENTS_URL, whichever of the three source shapes it has."""
    started = time.perf_counter()
    try:
        loaded = source.load()
    except SourceError as exc:
        # A Failure shows the reason itself in the UI instead of a wrapped traceback.
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    for dropped in loaded.dropped[:20]:
        context.log.warning(f"dropped {dropped}")
    if len(loaded.dropped) > 20:
        context.log.warning(f"... and {len(loaded.dropped) - 20} more dropped entries")
    for doc_id in loaded.renamed_ids:
        context.log.warning(f"repeated source id, kept as {doc_id}")
    frame = loaded.frame
    context.log.info(f"{len(frame)} entries from {len(loaded.locations)} file(s), shape {loaded.shape}")
    return dg.MaterializeResult(
        value=frame,
        metadata={
            "entries": len(frame),
            "dropped_entries": len(loaded.dropped),
            "renamed_ids": len(loaded.renamed_ids),
            "courses": per_course(frame),
            "source_shape": loaded.shape,
            "source_files": len(loaded.locations),
            "source": loaded.locations[0],
            "duration_s": round(time.perf_counter() - started, 3),
            "peak_rss_mb": peak_rss_mb(),
            "preview": preview(frame, ["doc_id", "course", "section", "question", "answer"]),
        },
    )


class ChunksConfig(dg.Config):
    max_chars: int = Field(default=ChunkingConfig.max_chars, description="Longest answer window")
    overlap_chars: int = Field(
        default=ChunkingConfig.overlap_chars, description="Overlap between consecutive windows"
    )


@dg.asset(group_name=GROUP, kinds={"python", "pandas"})
def chunks(
    refresh_lock: RefreshLockResource, config: ChunksConfig, raw_documents: pd.DataFrame
) -> dg.MaterializeResult:
    """Searchable units: one per entry, long answers cut into overlapping windows."""
    started = time.perf_counter()
    chunking = ChunkingConfig(config.max_chars, config.overlap_chars)
    frame = make_chunks(raw_documents, chunking)
    sizes = frame["text"].str.len()
    return dg.MaterializeResult(
        value=frame,
        metadata={
            "chunks": len(frame),
            "entries": int(frame["doc_id"].nunique()),
            "max_chars": chunking.max_chars,
            "split_entries": int((frame["chunk_index"] > 0).groupby(frame["doc_id"]).any().sum()),
            "max_text_chars": int(sizes.max()),
            "mean_text_chars": round(float(sizes.mean()), 1),
            "duration_s": round(time.perf_counter() - started, 3),
            "peak_rss_mb": peak_rss_mb(),
            "preview": preview(frame, ["chunk_id", "course", "question", "text"]),
        },
    )


@dg.asset(group_name=GROUP, kinds={"python", "spacy"}, code_version=NLP_CODE_VERSION)
def lemmas(
    context: dg.AssetExecutionContext,
    refresh_lock: RefreshLockResource,
    nlp: NlpResource,
    chunks: pd.DataFrame,
) -> dg.MaterializeResult:
    """Stemmed lemmas of each searched field, without stop words, punctuation or spaces.

    Only chunks whose content is not in the NLP cache are analysed; the model loads only then.
    """
    started = time.perf_counter()
    cache = nlp.cache(context.log.warning)
    frame, reuse = cached_lemmas(nlp.pipeline, chunks, cache, nlp.settings(), context.log.info)
    pruned = cache.prune()
    duration = time.perf_counter() - started
    context.log.info(f"lemmas: {reuse.computed} chunks analysed, {reuse.reused} from the cache")
    terms = sum(int(token_counts(frame[f"{f}_lemmas"]).sum()) for f in LEMMA_FIELDS)
    return dg.MaterializeResult(
        value=frame,
        metadata={
            "chunks": len(frame),
            "computed": reuse.computed,
            "reused": reuse.reused,
            "cache_pruned": pruned,
            "terms": int(terms),
            "model_fingerprint": nlp.fingerprint(),
            "duration_s": round(duration, 3),
            "peak_rss_mb": peak_rss_mb(),
            "computed_per_s": round(reuse.computed / max(duration, 1e-9), 1),
            "preview": preview(frame, ["chunk_id", *(f"{f}_lemmas" for f in LEMMA_FIELDS)]),
        },
    )


@dg.asset(group_name=GROUP, kinds={"python", "numpy"}, code_version=NLP_CODE_VERSION)
def embeddings(
    context: dg.AssetExecutionContext,
    refresh_lock: RefreshLockResource,
    nlp: NlpResource,
    lemmas: pd.DataFrame,
) -> dg.MaterializeResult:
    """A unit-length word-vector mean per chunk, from the content words found by `lemmas`."""
    started = time.perf_counter()
    vectors, reuse = cached_vectors(nlp.pipeline, lemmas, nlp.cache(context.log.warning))
    zero = int((~np.any(vectors.matrix, axis=1)).sum())
    shown = pd.DataFrame(
        {
            "chunk_id": vectors.chunk_ids[:PREVIEW_ROWS],
            "content words": lemmas["vector_words"].head(PREVIEW_ROWS).to_numpy(),
            "first components": [
                " ".join(f"{x:+.3f}" for x in row[:4]) + " …" for row in vectors.matrix[:PREVIEW_ROWS]
            ],
        }
    )
    return dg.MaterializeResult(
        value=vectors,
        metadata={
            "chunks": len(vectors.chunk_ids),
            "computed": reuse.computed,
            "reused": reuse.reused,
            "dimensions": VECTOR_DIM,
            "zero_vectors": zero,
            "duration_s": round(time.perf_counter() - started, 3),
            "peak_rss_mb": peak_rss_mb(),
            "preview": preview(shown, list(shown.columns)),
        },
    )


@dg.asset(group_name=GROUP, kinds={"sqlite", "elasticsearch"}, freshness_policy=FRESHNESS)
def es_index(
    context: dg.AssetExecutionContext,
    refresh_lock: RefreshLockResource,
    search_index: SearchIndexResource,
    nlp: NlpResource,
    quality_settings: QualityResource,
    chunks: pd.DataFrame,
    lemmas: pd.DataFrame,
    embeddings: ChunkVectors,
) -> dg.MaterializeResult:
    """The served search index: exactly the current chunks, published all at once, and only if
    the new version answers the probe questions (and the ground truth) no worse than the live one."""
    started = time.perf_counter()
    backend = search_index.backend(context.log.info)  # progress of long publishes
    content = IndexContent.assemble(chunks, lemmas, embeddings, nlp.fingerprint())
    gate = quality_settings.gate(nlp.pipeline, chunks)  # loads the model only if it must judge
    try:
        report = backend.publish(content, gate)
    except PublishError as exc:
        raise dg.Failure(description=str(exc), metadata=_gate_metadata(exc), allow_retries=False) from exc
    context.log.info(
        f"published {report.chunks} chunks to {report.location}: {report.upserted} written, "
        f"{report.deleted} deleted, {report.unchanged} unchanged"
    )
    for warning in report.warnings:
        context.log.warning(warning)
    stats = backend.stats()
    courses = pd.DataFrame({"course": list(stats.courses), "entries": list(stats.courses.values())})
    return dg.MaterializeResult(
        metadata={
            **({} if report.gate is None else report.gate.metadata),
            "published_at": stats.published_at or "",
            "confirmed_at": stats.confirmed_at or "",
            "preview": preview(courses, ["course", "entries"]),
            "backend": backend.kind,
            "location": report.location,
            "entries": stats.entries,
            "chunks": stats.chunks,
            "courses": stats.courses,
            "upserted": report.upserted,
            "deleted": report.deleted,
            "unchanged": report.unchanged,
            "index_version": report.version or "",
            "previous_index": report.previous or "",
            "warnings": dg.MetadataValue.md("\n".join(f"- {w}" for w in report.warnings) or "none"),
            "duration_s": round(time.perf_counter() - started, 3),
            "peak_rss_mb": peak_rss_mb(),
        },
    )


def _gate_metadata(exc: PublishError) -> dict[str, object]:
    return exc.verdict.metadata if isinstance(exc, PublishRefusedError) else {}
