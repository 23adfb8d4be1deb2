"""Asset checks: the rules of `quality.py` in Dagster. The checks up to `embeddings` are blocking,
so bad data stops the run before its values can be published: a bad source stops the refresh
before any course runs, a bad course stops that course's run, and the publish takes only the
values of successful course runs. The `es_index` checks verify what is served. Each check holds
the data directory's lock like the assets (`refresh_lock`).

A rule over stored values alone gives the same verdict for the same values (their digests) and
thresholds, so it is kept with them and reused: a refresh that changed nothing loads nothing.
"""

from collections.abc import Callable

import dagster as dg
import pandas as pd

from rag_assets import quality
from rag_assets.common.stored import StoredValue, code_digest, digest
from rag_assets.defs import assets
from rag_assets.defs.resources import (
    NlpResource,
    QualityResource,
    RefreshLockResource,
    SearchIndexResource,
    environment_resources,
)
from rag_assets.evaluation import GroundTruth, read_ground_truth
from rag_assets.index.backend import IndexDamagedError, IndexNotFoundError, SearchBackend
from rag_assets.retrieval import Retriever

CHUNKS = {"chunks": dg.AssetIn(key="chunks")}
RULES_CODE = code_digest(quality)  # a changed rule judges every value again
Context = dg.AssetCheckExecutionContext


def result(context: Context, verdict: quality.Verdict) -> dg.AssetCheckResult:
    """The check's result; a failure is also logged as an ERROR line, where a user looks first."""
    if not verdict.passed:
        context.log.error(f"{context.check_specs[0].key.name} failed: {verdict.description}")
    return dg.AssetCheckResult(
        passed=verdict.passed, description=verdict.description, metadata=dict(verdict.metadata)
    )


def memoized(
    context: Context,
    refresh_lock: RefreshLockResource,
    inputs: list[StoredValue],
    thresholds: tuple[object, ...],
    rule: Callable[[], quality.Verdict],
) -> dg.AssetCheckResult:
    """`rule()`'s verdict, judged once per set of input values and thresholds."""
    name = context.check_specs[0].key.name

    def judge() -> tuple[None, dict[str, object]]:
        verdict = rule()
        return None, {"problems": verdict.problems, "metadata": verdict.metadata}

    course = context.partition_key if context.has_partition_key else None
    stored = refresh_lock.stored_values(course).find_or_make(
        f"check-{name}", digest(RULES_CODE, *(value.digest for value in inputs), *thresholds), judge
    )
    verdict = quality.Verdict(list(stored.facts["problems"]), dict(stored.facts["metadata"]))
    verdict.metadata["judged"] = "earlier, of these same values" if stored.reused else "now"
    return result(context, verdict)


@dg.asset_check(asset=assets.faq_source, blocking=True)
def faq_source_well_formed(
    context: Context, refresh_lock: RefreshLockResource, faq_source: StoredValue
) -> dg.AssetCheckResult:
    """Entries exist, have every field, and their doc ids are unique."""
    return memoized(
        context, refresh_lock, [faq_source], (), lambda: quality.check_documents(faq_source.load())
    )


@dg.asset_check(asset=assets.faq_source, blocking=True)
def faq_source_count_guard(
    context: Context,
    search_index: SearchIndexResource,
    quality_settings: QualityResource,
    faq_source: StoredValue,
) -> dg.AssetCheckResult:
    """The source did not lose more than the allowed share of the entries being served, in all
    or of any one course; a course gone from the source lost all of its entries, so it is removed
    from the index only when that is allowed (RAG_MAX_COURSE_ENTRY_DROP=1 for one refresh).

    Compared with what the backend serves, not with run history, so a new or lost Dagster
    instance cannot let a shrunk source through. A damaged index serves nothing either: the
    publish sets it aside and rebuilds it, so it must not block the run that heals it.
    """
    served: dict[str, int] | None = None
    why_none = "none published yet"
    try:
        served = search_index.backend().stats().courses
    except IndexDamagedError:
        why_none = "unreadable (damaged)"
    except IndexNotFoundError:
        pass
    verdict = quality.check_course_drops(
        faq_source.facts["courses"],
        served,
        quality_settings.max_entry_drop,
        quality_settings.max_course_entry_drop,
        why_none,
    )
    return result(context, verdict)


def chunk_ids(chunks: StoredValue) -> list[str]:
    """Only the ids column: the whole chunks value (1.2 GB at a million) is not needed for them."""
    return list(chunks.load(columns=["chunk_id"])["chunk_id"])


@dg.asset_check(asset=assets.chunks, blocking=True, partitions_def=assets.COURSES)
def chunks_well_formed(
    context: Context, refresh_lock: RefreshLockResource, chunks: StoredValue
) -> dg.AssetCheckResult:
    """Chunk ids unique, texts present and no longer than the window they were cut with."""
    limit = chunks.facts["max_chars"]
    return memoized(context, refresh_lock, [chunks], (), lambda: quality.check_chunks(chunks.load(), limit))


@dg.asset_check(asset=assets.lemmas, blocking=True, additional_ins=CHUNKS, partitions_def=assets.COURSES)
def lemmas_well_formed(
    context: Context,
    refresh_lock: RefreshLockResource,
    quality_settings: QualityResource,
    lemmas: StoredValue,
    chunks: StoredValue,
) -> dg.AssetCheckResult:
    """One lemma row per chunk, and few chunks without any lemma."""
    share = quality_settings.max_empty_lemma_share
    return memoized(
        context,
        refresh_lock,
        [lemmas, chunks],
        (share,),
        lambda: quality.check_lemmas(lemmas.load(), chunk_ids(chunks), share),
    )


@dg.asset_check(asset=assets.embeddings, blocking=True, additional_ins=CHUNKS, partitions_def=assets.COURSES)
def embeddings_well_formed(
    context: Context,
    refresh_lock: RefreshLockResource,
    quality_settings: QualityResource,
    embeddings: StoredValue,
    chunks: StoredValue,
) -> dg.AssetCheckResult:
    """300 dimensions, unit length, no NaN, a bounded share of zero vectors."""
    share = quality_settings.max_zero_vector_share
    return memoized(
        context,
        refresh_lock,
        [embeddings, chunks],
        (share,),
        lambda: quality.check_vectors(embeddings.load(), chunk_ids(chunks), share),
    )


def served_chunks(refresh_lock: RefreshLockResource, backend: SearchBackend) -> list[StoredValue]:
    """The chunks values of every course the served index says it was published from."""
    sources = backend.served_sources()
    return [assets.course_values(refresh_lock, course, sources[course]).chunks for course in sorted(sources)]


@dg.asset_check(asset=assets.es_index)
def es_index_matches_chunks(
    context: Context, refresh_lock: RefreshLockResource, search_index: SearchIndexResource
) -> dg.AssetCheckResult:
    """The served index holds exactly the chunks of the course values it was published from.

    What is served is read every time; the chunks are loaded only to say what differs.
    """
    backend = search_index.backend()
    served = backend.chunk_hashes()
    chunks = served_chunks(refresh_lock, backend)
    expected = quality.combined_digest(value.facts["hashes_digest"] for value in chunks)
    if quality.hashes_digest(served.items()) == expected:
        verdict = quality.Verdict([], {"served_chunks": len(served), "expected_chunks": len(served)})
    else:
        columns = ["chunk_id", "content_hash"]
        frames = [value.load(columns=columns) for value in chunks]
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        verdict = quality.check_index_matches(served, frame)
    return result(context, verdict)


@dg.asset_check(asset=assets.es_index)
def es_index_smoke_query(
    context: Context,
    refresh_lock: RefreshLockResource,
    search_index: SearchIndexResource,
    nlp: NlpResource,
) -> dg.AssetCheckResult:
    """Asking an entry's own question finds that entry among the first three hits."""
    backend = search_index.backend()
    chunks = served_chunks(refresh_lock, backend)
    if not chunks:
        return result(context, quality.Verdict(["the served index was published from no course"], {}))
    retriever = Retriever(backend, nlp.pipeline(), reranker=nlp.reranker)
    probe = GroundTruth(*chunks[0].facts["smoke_probe"])
    return result(context, quality.check_smoke_query(retriever, probe))


@dg.asset_check(asset=assets.es_index)
def es_index_retrieval_quality(
    context: Context,
    refresh_lock: RefreshLockResource,
    search_index: SearchIndexResource,
    nlp: NlpResource,
    quality_settings: QualityResource,
) -> dg.AssetCheckResult:
    """Hit rate and MRR of the served index on the configured ground truth (RAG_GROUND_TRUTH)."""
    settings = quality_settings
    verdict = quality.check_retrieval(
        Retriever(search_index.backend(), nlp.pipeline(), reranker=nlp.reranker),
        read_ground_truth(settings.ground_truth or ""),
        settings.eval_k,
        settings.min_hit_rate,
        settings.min_mrr,
    )
    verdict.metadata["ground_truth"] = str(settings.ground_truth)
    return result(context, verdict)


STRUCTURAL_CHECKS = [
    faq_source_well_formed,
    faq_source_count_guard,
    chunks_well_formed,
    lemmas_well_formed,
    embeddings_well_formed,
    es_index_matches_chunks,
    es_index_smoke_query,
]


def all_checks(quality_settings: QualityResource) -> list[dg.AssetChecksDefinition]:
    """The retrieval-quality check exists only when a ground truth is configured."""
    return STRUCTURAL_CHECKS + ([es_index_retrieval_quality] if quality_settings.ground_truth else [])


@dg.definitions
def asset_checks() -> dg.Definitions:
    return dg.Definitions(asset_checks=all_checks(environment_resources()["quality_settings"]))
