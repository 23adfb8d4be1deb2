"""The asset graph: faq_source -> raw_documents -> chunks -> lemmas -> embeddings -> es_index.

One run builds it all. The four per-course assets fan their work out as steps over shards of
courses (`courses.CourseSet.shards`) and join them again; the executor places the steps. The
work happens in plain functions; the assets and ops add logging, timings and the metadata shown
in the Dagster UI.
"""

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from rag_assets import quality
from rag_assets.common.memory import peak_rss_mb
from rag_assets.common.progress import Progress
from rag_assets.common.stored import StoredValue, StoredValueError, ValueStore, code_digest, digest
from rag_assets.defs.courses import CourseSet, Refusal
from rag_assets.defs.resources import (
    DocumentSourceResource,
    NlpResource,
    QualityResource,
    RefreshLockResource,
    SearchIndexResource,
    naming_cluster_errors,
)
from rag_assets.index.backend import (
    SEMANTIC,
    CourseValues,
    IndexContent,
    IndexDamagedError,
    IndexNotFoundError,
    PublishError,
    PublishRefusedError,
    SearchBackend,
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
PREVIEW_ROWS = 5
# Known at load time without loading the model, so the UI flags the NLP assets as unsynced when
# the model or the analysis rules change.
NLP_CODE_VERSION = model_fingerprint()
# Part of every stored value's digest: editing the code that makes a value makes it anew.
SOURCE_CODE = code_digest(sources)
CHUNKING_CODE = code_digest(chunking)
NLP_CODE = code_digest(analysis, features, cache, sentence)
RULES_CODE = code_digest(quality)  # a changed rule judges every value again
LOGGED_EXAMPLES = 20
# A course's own progress lines (each a Dagster event) only where it takes a while; the shard's
# progress line counts its courses.
COURSE_PROGRESS_ROWS = 2_000
_WARN_HOURS, _FAIL_HOURS = freshness_hours()
# On the source and on what is served: a stale index shows as stale in the UI.
FRESHNESS = dg.FreshnessPolicy.time_window(
    warn_window=timedelta(hours=_WARN_HOURS), fail_window=timedelta(hours=_FAIL_HOURS)
)


def preview(frame: pd.DataFrame, columns: list[str], width: int = 80) -> str:
    """A Markdown table of the first rows, kept in the stored value's facts (written by hand:
    pandas' `to_markdown` costs 5 ms a value, a second at 200 courses)."""

    def cell(value: object) -> str:
        text = str(value).replace("\n", " ").replace("|", "\\|")
        return text[: width - 1] + "…" if len(text) > width else text

    rows = frame[columns].head(PREVIEW_ROWS).itertuples(index=False)
    lines = [columns, ["---"] * len(columns), *([cell(v) for v in row] for row in rows)]
    return "\n".join(f"| {' | '.join(line)} |" for line in lines)


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
    courses it names.

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


def course_frames(source: StoredValue, courses: list[str]) -> dict[str, pd.DataFrame]:
    """These courses' entries, from one pass over the source part by part: the whole source is
    never held, nor read once per course."""
    found: dict[str, list[pd.DataFrame]] = {course: [] for course in courses}
    for part in source.parts():
        for course, rows in part[part["course"].isin(found)].groupby("course", sort=False):
            found[str(course)].append(rows)
    return {course: pd.concat(frames, ignore_index=True) for course, frames in found.items()}


def course_documents_value(
    source: StoredValue, course: str, frame: pd.DataFrame
) -> tuple[pd.DataFrame, dict[str, Any]]:
    frame, duplicates = quality.without_duplicates(frame)
    return frame, {
        "entries": len(frame),
        **quality.content_figures(frame, duplicates),
        "course": course,
        "source": source.facts["source"],
        "source_value": source.digest,
        "preview": preview(frame, ["doc_id", "section", "question", "answer"]),
    }


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


def lemmas_value(
    nlp: NlpResource, course: str, chunks: StoredValue, log: dg.DagsterLogManager
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Only chunks whose content is not in the NLP cache are analysed; the model loads only then."""
    started = time.perf_counter()
    progress = log.info if chunks.facts["chunks"] >= COURSE_PROGRESS_ROWS else None
    with contextlib.closing(nlp.cache(course, log.warning)) as nlp_cache:
        frame, reuse = cached_lemmas(nlp.pipeline, chunks.load(), nlp_cache, nlp.settings(), progress)
        pruned = nlp_cache.prune()
    return frame, {
        "chunks": len(frame),
        "computed": reuse.computed,
        "reused": reuse.reused,
        "cache_pruned": pruned,
        "terms": sum(int(token_counts(frame[f"{f}_lemmas"]).sum()) for f in LEMMA_FIELDS),
        "model_fingerprint": nlp.fingerprint(),
        "computed_per_s": round(reuse.computed / max(time.perf_counter() - started, 1e-9), 1),
        "preview": preview(frame, ["chunk_id", *(f"{f}_lemmas" for f in LEMMA_FIELDS)]),
    }


def embeddings_value(
    nlp: NlpResource, course: str, values: dict[str, StoredValue], log: dg.DagsterLogManager
) -> tuple[ChunkVectors, dict[str, Any]]:
    """Word-vector means from the lemmas' content words; in the semantic mode also MiniLM vectors."""
    lemma_frame = values["lemmas"].load(columns=["chunk_id", "content_hash", "vector_words"])
    with contextlib.closing(nlp.cache(course, log.warning)) as nlp_cache:
        vectors, reuse = cached_vectors(nlp.pipeline, lemma_frame, nlp_cache)
        if nlp.reranker == SEMANTIC:
            vectors, sentence_facts = with_sentence_vectors(vectors, values["chunks"], nlp_cache, log)
        else:
            sentence_facts = {"sentence_vectors": "off (RAG_RERANKER is not semantic)"}
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


def with_sentence_vectors(
    vectors: ChunkVectors, chunks: StoredValue, nlp_cache: cache.NlpCache, log: dg.DagsterLogManager
) -> tuple[ChunkVectors, dict[str, Any]]:
    """The chunks' MiniLM vectors (question and answer) beside their word-vector means."""
    started = time.perf_counter()
    chunk_frame = chunks.load(columns=["chunk_id", "content_hash", "question", "text"])
    if list(chunk_frame["chunk_id"]) != vectors.chunk_ids:
        raise dg.Failure(description="chunks and lemmas hold different chunk ids: materialize both")
    progress = log.info if len(chunk_frame) >= COURSE_PROGRESS_ROWS else None
    sentences, made = cached_sentence_vectors(sentence_encoder, chunk_frame, nlp_cache, progress)
    took = time.perf_counter() - started
    log.info(f"sentence vectors: {made.computed} computed in {took:.1f} s, {made.reused} cached")
    facts = {
        "sentence_vectors": SENTENCE_MODEL,
        "sentence_computed": made.computed,
        "sentence_s": round(took, 3),
    }
    return ChunkVectors(vectors.chunk_ids, vectors.matrix, sentences), facts


def chunk_ids(chunks: StoredValue) -> list[str]:
    """Only the ids column: the whole chunks value (1.2 GB at a million) is not needed for them."""
    return list(chunks.load(columns=["chunk_id"])["chunk_id"])


def judged(
    store: ValueStore,
    check: str,
    inputs: list[StoredValue],
    thresholds: tuple[object, ...],
    rule: Callable[[], quality.Verdict],
) -> quality.Verdict:
    """`rule()`'s verdict, judged once per set of input values and thresholds and kept with them,
    so a refresh that changed nothing loads nothing to judge."""

    def judge() -> tuple[None, dict[str, object]]:
        verdict = rule()
        return None, {"problems": verdict.problems, "metadata": verdict.metadata}

    stored = store.find_or_make(
        f"check-{check}", digest(RULES_CODE, *(value.digest for value in inputs), *thresholds), judge
    )
    verdict = quality.Verdict(list(stored.facts["problems"]), dict(stored.facts["metadata"]))
    verdict.metadata["judged"] = "earlier, of these same values" if stored.reused else "now"
    return verdict


Figures = dict[str, dict[str, Any]]  # check -> the figures its rule found for a course


@dataclass(frozen=True)
class CourseRule:
    """A rule of a course asset (one asset check): the values it reads for a course (by name,
    from the course's values so far and `inputs`' extras), its thresholds, and its verdict."""

    check: str
    inputs: Callable[[str, dict[str, StoredValue]], dict[str, StoredValue]]
    thresholds: tuple[object, ...]
    verdict: Callable[[dict[str, StoredValue]], quality.Verdict]


def of_steps(*steps: str) -> Callable[[str, dict[str, StoredValue]], dict[str, StoredValue]]:
    """A rule's inputs: the course's values of these steps."""
    return lambda course, values: {step: values[step] for step in steps}


def build_shard(
    context: dg.OpExecutionContext,
    refresh_lock: RefreshLockResource,
    shard: CourseSet,
    step: str,
    make: Callable[[str, dict[str, StoredValue]], StoredValue],
    rules: tuple[CourseRule, ...] = (),
) -> CourseSet:
    """Each course of the shard: its value of `step`, then the step's rules on it (`judged`); a
    course a rule refuses goes no further (it stays as served), the others go on."""
    progress = Progress(f"{step} ({context.op_handle})", len(shard.values), context.log.info)

    def judge(course: str, values: dict[str, StoredValue]) -> tuple[Refusal | None, Figures]:
        figures: Figures = {}
        store = refresh_lock.stored_values(course)
        for rule in rules:
            inputs = rule.inputs(course, values)
            verdict = judged(
                store,
                rule.check,
                list(inputs.values()),
                rule.thresholds,
                functools.partial(rule.verdict, inputs),
            )
            figures[rule.check] = verdict.metadata
            if not verdict.passed:
                context.log.error(f"{rule.check} refused course {course!r}: {verdict.description}")
                return Refusal(step, rule.check, verdict.description), figures
        return None, figures

    built = shard.build(step, make, judge, progress.update)
    seconds = progress.close()
    made = sum(not values[step].reused for values in built.values.values())
    context.log.info(
        f"{step}: {len(shard.values)} courses in {seconds:.2f} s ({made} made, "
        f"{len(built.values) - made} reused, {len(built.refused)} refused)"
    )
    return built


@dg.op(out={"shards": dg.DynamicOut(CourseSet), "courses": dg.Out(CourseSet)})
def split_source(
    context: dg.OpExecutionContext, refresh_lock: RefreshLockResource, faq_source: StoredValue
) -> Iterator[dg.Output[CourseSet] | dg.DynamicOutput[CourseSet]]:
    """The source's courses in shards; a source its blocking checks refused is never read."""
    refusal = refresh_lock.stored_values().refusal(faq_source)
    if refusal is not None:
        raise dg.Failure(
            description=f"the stored source {faq_source.digest} was refused ({refusal}); nothing is "
            "built on it: run the whole refresh once the source (or the allowed drop) is right",
            allow_retries=False,
        )
    courses = CourseSet(faq_source, {course: {} for course in faq_source.facts["courses"]})
    yield from shards_of(context, courses)


@dg.op(out={"shards": dg.DynamicOut(CourseSet), "courses": dg.Out(CourseSet)})
def split_courses(
    context: dg.OpExecutionContext, courses: CourseSet
) -> Iterator[dg.Output[CourseSet] | dg.DynamicOutput[CourseSet]]:
    """The courses still going, in shards of at most about 10,000 chunks: one step each."""
    yield from shards_of(context, courses)


def shards_of(
    context: dg.OpExecutionContext, courses: CourseSet
) -> Iterator[dg.Output[CourseSet] | dg.DynamicOutput[CourseSet]]:
    shards = courses.shards()
    context.log.info(f"{len(courses.values)} courses in {len(shards)} step(s)")
    for number, shard in enumerate(shards):
        yield dg.DynamicOutput(shard, mapping_key=f"shard_{number}", output_name="shards")
    yield dg.Output(courses, output_name="courses")


@dg.op
def join_shards(
    context: dg.OpExecutionContext, courses: CourseSet, shards: list[CourseSet]
) -> dg.Output[CourseSet]:
    """The asset's value: every course as its shard left it, with a per-course table."""
    started = time.perf_counter()
    step = context.asset_key.to_user_string()
    joined = courses.joined(shards)
    values = {course: step_values[step] for course, step_values in joined.values.items()}
    refused_here = joined.refused_at(step)
    return dg.Output(joined, metadata=course_metadata(step, joined, values, refused_here, started))


def course_metadata(
    step: str,
    joined: CourseSet,
    values: dict[str, StoredValue],
    refused_here: dict[str, Refusal],
    started: float,
) -> dict[str, Any]:
    """Totals over the courses, and a table of what each course's value is."""

    def status(course: str) -> str:
        if course in values:
            return "reused" if values[course].reused else "made"
        refusal = joined.refused[course]
        where = "here" if course in refused_here else f"at {refusal.step}"
        return f"refused {where}: {refusal.reason}"

    table = pd.DataFrame(
        {
            "course": joined.courses,
            "entries": [values[c].facts.get("entries", 0) if c in values else 0 for c in joined.courses],
            "chunks": [values[c].facts.get("chunks", 0) if c in values else 0 for c in joined.courses],
            "status": [status(c) for c in joined.courses],
        }
    )
    totals: dict[str, int | float] = {}
    for value in values.values():
        facts = value.facts
        # a reused value was made by an earlier run: it counts, but nothing was computed for it
        counted = {**facts, "computed": 0, "reused": facts.get("chunks", 0), "sentence_computed": 0}
        counted = counted if value.reused else facts
        for key in ("entries", "chunks", "computed", "reused", "sentence_computed", "zero_vectors"):
            if isinstance(counted.get(key), int | float):
                totals[key] = totals.get(key, 0) + counted[key]
    first = next(iter(values.values()), None)
    return {
        **totals,
        "courses": len(joined.courses),
        "courses_built": len(values),
        "courses_refused": sorted(refused_here),
        "courses_refused_before": sorted(set(joined.refused) - set(refused_here)),
        "per_course": dg.MetadataValue.md(table.to_markdown(index=False)),
        "preview": dg.MetadataValue.md(first.facts["preview"] if first else "no course"),
        "value_digests": {course: value.digest for course, value in values.items()},
        "values_made": sum(not value.reused for value in values.values()),
        "join_s": round(time.perf_counter() - started, 3),
        "peak_rss_mb": peak_rss_mb(),
    }


@dg.op
def raw_documents_of_shard(
    context: dg.OpExecutionContext,
    refresh_lock: RefreshLockResource,
    quality_settings: QualityResource,
    shard: CourseSet,
) -> CourseSet:
    source = shard.source
    digests = {course: digest(source.digest, course) for course in shard.values}
    missing = [
        c for c in shard.values if refresh_lock.stored_values(c).find("raw_documents", digests[c]) is None
    ]
    frames = course_frames(source, missing) if missing else {}

    def make(course: str, values: dict[str, StoredValue]) -> StoredValue:
        return refresh_lock.stored_values(course).find_or_make(
            "raw_documents",
            digests[course],
            lambda: course_documents_value(source, course, frames.pop(course)),
        )

    rule = CourseRule(
        "raw_documents_content",
        of_steps("raw_documents"),
        (quality_settings.max_blank_answer_share, quality_settings.max_duplicate_share),
        lambda values: quality.check_course_content(
            values["raw_documents"].facts,
            quality_settings.max_blank_answer_share,
            quality_settings.max_duplicate_share,
        ),
    )
    return build_shard(context, refresh_lock, shard, "raw_documents", make, (rule,))


class ChunksConfig(dg.Config):
    max_chars: int = Field(default=ChunkingConfig.max_chars, description="Longest answer window")
    overlap_chars: int = Field(
        default=ChunkingConfig.overlap_chars, description="Overlap between consecutive windows"
    )


@dg.op
@naming_cluster_errors
def chunks_of_shard(
    context: dg.OpExecutionContext,
    refresh_lock: RefreshLockResource,
    search_index: SearchIndexResource,
    quality_settings: QualityResource,
    config: ChunksConfig,
    shard: CourseSet,
) -> CourseSet:
    chunking_config = ChunkingConfig(config.max_chars, config.overlap_chars)
    served = search_index.backend().served_sources()

    def make(course: str, values: dict[str, StoredValue]) -> StoredValue:
        documents = values["raw_documents"]
        return refresh_lock.stored_values(course).find_or_make(
            "chunks",
            digest(CHUNKING_CODE, documents.digest, chunking_config.max_chars, chunking_config.overlap_chars),
            lambda: chunks_value(make_chunks(documents.load(), chunking_config), chunking_config),
        )

    def with_served(course: str, values: dict[str, StoredValue]) -> dict[str, StoredValue]:
        """The course's new chunks and, while kept, the chunks its served answers came from."""
        found = served_value(refresh_lock, course, "chunks", served.get(course))
        return {"chunks": values["chunks"], **({"served": found} if found else {})}

    max_churn = quality_settings.max_answer_churn
    rules = (
        CourseRule(
            "chunks_well_formed",
            of_steps("chunks"),
            (),
            lambda values: quality.check_chunks(values["chunks"].load(), values["chunks"].facts["max_chars"]),
        ),
        CourseRule(
            "chunks_answer_churn",
            with_served,
            (max_churn,),
            lambda values: answer_churn(values, max_churn),
        ),
    )
    return build_shard(context, refresh_lock, shard, "chunks", make, rules)


def answer_churn(values: dict[str, StoredValue], max_churn: float) -> quality.Verdict:
    """`check_answer_churn` of the course's new chunks against the served ones; chunks served as
    they are changed nothing, and are not loaded to say so."""
    new, served = values["chunks"], values.get("served")
    columns = ["doc_id", "text"]
    if served is not None and served.digest == new.digest:
        return quality.Verdict(
            [], {"entries_still_served": new.facts["entries"], "answers_changed": 0, "answer_churn": 0.0}
        )
    return quality.check_answer_churn(
        new.load(columns=columns), None if served is None else served.load(columns=columns), max_churn
    )


@dg.op
def lemmas_of_shard(
    context: dg.OpExecutionContext,
    refresh_lock: RefreshLockResource,
    nlp: NlpResource,
    quality_settings: QualityResource,
    shard: CourseSet,
) -> CourseSet:
    def make(course: str, values: dict[str, StoredValue]) -> StoredValue:
        chunks = values["chunks"]
        return refresh_lock.stored_values(course).find_or_make(
            "lemmas",
            digest(NLP_CODE, nlp.fingerprint(), chunks.digest),
            lambda: lemmas_value(nlp, course, chunks, context.log),
        )

    share = quality_settings.max_empty_lemma_share
    rule = CourseRule(
        "lemmas_well_formed",
        of_steps("lemmas", "chunks"),
        (share,),
        lambda values: quality.check_lemmas(values["lemmas"].load(), chunk_ids(values["chunks"]), share),
    )
    return build_shard(context, refresh_lock, shard, "lemmas", make, (rule,))


@dg.op
def embeddings_of_shard(
    context: dg.OpExecutionContext,
    refresh_lock: RefreshLockResource,
    nlp: NlpResource,
    quality_settings: QualityResource,
    shard: CourseSet,
) -> CourseSet:
    def make(course: str, values: dict[str, StoredValue]) -> StoredValue:
        return refresh_lock.stored_values(course).find_or_make(
            "embeddings",
            digest(NLP_CODE, *made_by(nlp.fingerprint(), nlp.reranker), values["lemmas"].digest),
            lambda: embeddings_value(nlp, course, values, context.log),
        )

    share = quality_settings.max_zero_vector_share
    rule = CourseRule(
        "embeddings_well_formed",
        of_steps("embeddings", "chunks"),
        (share,),
        lambda values: quality.check_vectors(values["embeddings"].load(), chunk_ids(values["chunks"]), share),
    )
    return build_shard(context, refresh_lock, shard, "embeddings", make, (rule,))


@dg.graph_asset(group_name=GROUP, kinds={"python", "pandas"})
def raw_documents(faq_source: StoredValue) -> CourseSet:
    """The entries of each course, as the source has them now."""
    shards, courses = split_source(faq_source)
    return join_shards(courses, shards.map(raw_documents_of_shard).collect())


@dg.graph_asset(group_name=GROUP, kinds={"python", "pandas"})
def chunks(raw_documents: CourseSet) -> CourseSet:
    """Searchable units: one per entry, long answers cut into overlapping windows."""
    shards, courses = split_courses(raw_documents)
    return join_shards(courses, shards.map(chunks_of_shard).collect())


@dg.graph_asset(group_name=GROUP, kinds={"python", "spacy"}, code_version=NLP_CODE_VERSION)
def lemmas(chunks: CourseSet) -> CourseSet:
    """Stemmed lemmas of each searched field, without stop words, punctuation or spaces; only
    chunks whose content is not in the NLP cache are analysed."""
    shards, courses = split_courses(chunks)
    return join_shards(courses, shards.map(lemmas_of_shard).collect())


@dg.graph_asset(group_name=GROUP, kinds={"python", "numpy"}, code_version=NLP_CODE_VERSION)
def embeddings(lemmas: CourseSet) -> CourseSet:
    """A unit-length word-vector mean per chunk, from the content words found by `lemmas`; with
    RAG_RERANKER=semantic also each chunk's MiniLM sentence vector (question and answer)."""
    shards, courses = split_courses(lemmas)
    return join_shards(courses, shards.map(embeddings_of_shard).collect())


@dg.asset(group_name=GROUP, kinds={"sqlite", "elasticsearch"}, freshness_policy=FRESHNESS)
@naming_cluster_errors
def es_index(
    context: dg.AssetExecutionContext,
    refresh_lock: RefreshLockResource,
    search_index: SearchIndexResource,
    nlp: NlpResource,
    quality_settings: QualityResource,
    embeddings: CourseSet,
) -> dg.MaterializeResult:
    """The served search index: every course of the source, published all at once, and only if
    the new version answers the probe questions (and the ground truth) no worse than the live one.

    A course whose values a rule refused stays as served and holds no other course back; a
    course no longer in the source is removed (the source's guard allowed it). An index published
    from this very content is confirmed without being read or rewritten.
    """
    started = time.perf_counter()
    backend = search_index.backend(context.log.info)  # progress of long publishes
    current = set(embeddings.courses)
    served = backend.served_sources()
    built = {
        course: CourseValues(values["chunks"], values["lemmas"], values["embeddings"])
        for course, values in embeddings.values.items()
    }
    try:
        kept = {
            course: course_values(refresh_lock, course, served[course])
            for course in embeddings.refused
            if course in served
        }
    except StoredValueError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    courses = dict(sorted({**kept, **built}.items()))
    content_digest = IndexContent.courses_digest(courses, nlp.reranker)
    switched = mode_switch(backend, nlp.reranker)
    if switched:
        context.log.warning(switched)
    report = backend.confirm(content_digest)
    confirmed = report is not None
    if report is not None:
        context.log.info(f"{report.location} was published from this same content: confirmed as current")
    else:
        content = IndexContent.of_courses(courses, nlp.fingerprint(), nlp.reranker)
        # the courses this refresh changes are asked with their served answers
        changed = [
            found
            for course, values in built.items()
            if (found := served_value(refresh_lock, course, "chunks", served.get(course)))
            and found.digest != values.chunks.digest
        ]
        # the model loads only to judge
        gate = quality_settings.gate(
            nlp.pipeline,
            content.chunks.parts(),
            (
                value.load(columns=["course", "doc_id", "chunk_index", "question", "text"])
                for value in changed
            ),
            nlp.reranker,
        )
        try:
            report = backend.publish(content, gate)
        except PublishError as exc:
            raise dg.Failure(description=str(exc), metadata=_gate_metadata(exc), allow_retries=False) from exc
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
    for course, refusal in embeddings.refused.items():
        kept_as = "kept as served" if course in kept else "not served (never published)"
        context.log.warning(f"course {course!r} {kept_as}: {refusal.check} refused it: {refusal.reason}")
    stats = backend.stats()
    listed = sorted(current | set(courses))
    table = pd.DataFrame(
        {
            "course": listed,
            "entries": [stats.courses.get(c, 0) for c in listed],
            "values": [
                "this refresh" if c in built else "as served" if c in kept else "not served" for c in listed
            ],
        }
    )
    return dg.MaterializeResult(
        metadata={
            **({} if report.gate is None else report.gate.metadata),
            "published_at": stats.published_at or "",
            "confirmed_at": stats.confirmed_at or "",
            "preview": dg.MetadataValue.md(preview(table, list(table.columns))),
            "per_course": dg.MetadataValue.md(table.to_markdown(index=False)),
            "backend": backend.kind,
            "reranker": nlp.reranker,
            "mode_switch": switched,
            "location": report.location,
            "entries": stats.entries,
            "chunks": stats.chunks,
            "courses": stats.courses,
            "courses_refreshed": sorted(built),
            "courses_as_served": sorted(kept),
            "courses_removed": removed,
            "courses_not_built": sorted(set(embeddings.refused) - set(kept)),
            "refusals": {course: f"{r.check}: {r.reason}" for course, r in embeddings.refused.items()},
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


SERVED_STEPS = ("chunks", "lemmas", "embeddings")  # the values a served course names, in order


def served_value(
    refresh_lock: RefreshLockResource, course: str, step: str, digests: list[str] | None
) -> StoredValue | None:
    """The value of `step` the served course was published from, while it is still kept."""
    if digests is None:
        return None
    return refresh_lock.stored_values(course).find(step, digests[SERVED_STEPS.index(step)])


def mode_switch(backend: SearchBackend, reranker: str) -> str:
    """Why this publish rewrites every row, when it does: the served index was built for a
    RAG_RERANKER mode that stores sentence vectors and this one does not, or the other way round."""
    try:
        served = backend.stats()
    except (IndexNotFoundError, IndexDamagedError):
        return ""
    if served.reranker is None or (served.reranker == SEMANTIC) == (reranker == SEMANTIC):
        return ""
    return (
        f"RAG_RERANKER={reranker}, but the served index at {served.location} was built for "
        f"RAG_RERANKER={served.reranker}: this refresh rewrites all of its {served.chunks} rows "
        f"(set RAG_RERANKER={served.reranker} to keep that mode)"
    )


def course_values(refresh_lock: RefreshLockResource, course: str, digests: list[str]) -> CourseValues:
    """A course's stored values by digest; refuses, naming the course, if one is no longer kept."""
    found = [served_value(refresh_lock, course, step, digests) for step in SERVED_STEPS]
    if any(value is None for value in found):
        raise StoredValueError(
            f"the stored values of course {course!r} ({', '.join(digests)}) are no longer kept; "
            "run the whole refresh again"
        )
    return CourseValues(*found)


def _gate_metadata(exc: PublishError) -> dict[str, object]:
    return exc.verdict.metadata if isinstance(exc, PublishRefusedError) else {}
