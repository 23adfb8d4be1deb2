"""Asset checks: the rules of `quality.py` in Dagster.

The source's checks are blocking: a bad source stops the refresh before any course is built, and
a source they refused is marked so that no later step or run reads it. The per-course rules
(chunks, lemmas, embeddings) judge each course inside the steps that make its values, so a
course they refuse goes no further while the others do; their checks here report those verdicts:
a warning when some courses were refused, an error (blocking the publish) when every course was.
The `es_index` checks verify what is served.
"""

import dagster as dg
import pandas as pd

from rag_assets import quality
from rag_assets.common.stored import StoredValue
from rag_assets.defs import assets
from rag_assets.defs.courses import CourseSet
from rag_assets.defs.resources import (
    NlpResource,
    QualityResource,
    RefreshLockResource,
    SearchIndexResource,
    environment_resources,
    naming_cluster_errors,
)
from rag_assets.evaluation import GroundTruth, read_ground_truth
from rag_assets.index.backend import IndexDamagedError, IndexNotFoundError, SearchBackend
from rag_assets.retrieval import Retriever

Context = dg.AssetCheckExecutionContext


def result(
    context: Context,
    verdict: quality.Verdict,
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
    metadata: dict[str, object] | None = None,
) -> dg.AssetCheckResult:
    """The check's result; a failure is also logged as an ERROR line, where a user looks first."""
    if not verdict.passed:
        context.log.error(f"{context.check_specs[0].key.name} failed: {verdict.description}")
    return dg.AssetCheckResult(
        passed=verdict.passed,
        severity=severity,
        description=verdict.description,
        metadata={**verdict.metadata, **(metadata or {})},
    )


def source_result(
    context: Context, refresh_lock: RefreshLockResource, faq_source: StoredValue, verdict: quality.Verdict
) -> dg.AssetCheckResult:
    """A source check's result; a refused source value is marked so nothing is ever built on it."""
    store, check = refresh_lock.stored_values(), context.check_specs[0].key.name
    if verdict.passed:
        store.accept(faq_source, check)
    else:
        store.refuse(faq_source, check, verdict.description)
    return result(context, verdict)


@dg.asset_check(asset=assets.faq_source, blocking=True)
def faq_source_well_formed(
    context: Context, refresh_lock: RefreshLockResource, faq_source: StoredValue
) -> dg.AssetCheckResult:
    """Entries exist, have every field, and their doc ids are unique."""
    verdict = assets.judged(
        refresh_lock.stored_values(),
        "faq_source_well_formed",
        [faq_source],
        (),
        lambda: quality.check_documents(faq_source.load()),
    )
    return source_result(context, refresh_lock, faq_source, verdict)


@dg.asset_check(asset=assets.faq_source, blocking=True)
@naming_cluster_errors
def faq_source_count_guard(
    context: Context,
    refresh_lock: RefreshLockResource,
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
    return source_result(context, refresh_lock, faq_source, verdict)


def course_rule_result(context: Context, courses: CourseSet) -> dg.AssetCheckResult:
    """The verdicts the check's rule gave each course as the step made its values, with each
    course's figures in a table."""
    check = context.check_specs[0].key.name
    refused = courses.refused_by(check)
    figures = courses.figures.get(check, {})
    metadata: dict[str, object] = {"courses_judged": len(figures), "courses_refused": sorted(refused)}
    if figures:
        table = pd.DataFrame.from_dict(figures, orient="index").drop(columns="judged", errors="ignore")
        table.insert(0, "status", ["refused" if c in refused else "passed" for c in table.index])
        metadata["per_course"] = dg.MetadataValue.md(table.rename_axis("course").to_markdown())
    problems = [f"course {c!r}: {r.reason}" for c, r in refused.items()]
    if problems and courses.values:
        problems[-1] += f" (refused, kept as served; {len(courses.values)} other courses go on)"
    # a warning lets the other courses go on to the publish; refusing every course blocks it
    severity = dg.AssetCheckSeverity.WARN if courses.values else dg.AssetCheckSeverity.ERROR
    verdict = quality.Verdict(problems)
    return result(context, verdict, severity, metadata)


@dg.asset_check(asset=assets.raw_documents, blocking=True)
def raw_documents_content(context: Context, raw_documents: CourseSet) -> dg.AssetCheckResult:
    """Per course: few answers empty or without words, few entries repeating another's question
    and answer or answer (RAG_MAX_BLANK_ANSWER_SHARE, RAG_MAX_DUPLICATE_SHARE); repeats are
    served once."""
    return course_rule_result(context, raw_documents)


@dg.asset_check(asset=assets.chunks, blocking=True)
def chunks_well_formed(context: Context, chunks: CourseSet) -> dg.AssetCheckResult:
    """Per course: chunk ids unique, texts present and no longer than the window they were cut with."""
    return course_rule_result(context, chunks)


@dg.asset_check(asset=assets.chunks, blocking=True)
def chunks_answer_churn(context: Context, chunks: CourseSet) -> dg.AssetCheckResult:
    """Per course: the share of its served entries whose answer changes in this refresh stays
    below RAG_MAX_ANSWER_CHURN (a real day changes a few; a shuffle nearly all)."""
    return course_rule_result(context, chunks)


@dg.asset_check(asset=assets.lemmas, blocking=True)
def lemmas_well_formed(context: Context, lemmas: CourseSet) -> dg.AssetCheckResult:
    """Per course: one lemma row per chunk, and few chunks without any lemma."""
    return course_rule_result(context, lemmas)


@dg.asset_check(asset=assets.embeddings, blocking=True)
def embeddings_well_formed(context: Context, embeddings: CourseSet) -> dg.AssetCheckResult:
    """Per course: 300 dimensions, unit length, no NaN, a bounded share of zero vectors."""
    return course_rule_result(context, embeddings)


def served_chunks(refresh_lock: RefreshLockResource, backend: SearchBackend) -> list[StoredValue]:
    """The chunks values of every course the served index says it was published from."""
    sources = backend.served_sources()
    return [assets.course_values(refresh_lock, course, sources[course]).chunks for course in sorted(sources)]


@dg.asset_check(asset=assets.es_index)
@naming_cluster_errors
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
@naming_cluster_errors
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
@naming_cluster_errors
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
    raw_documents_content,
    chunks_well_formed,
    chunks_answer_churn,
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
