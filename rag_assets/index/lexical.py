"""BM25F over the lemma fields from per-term postings, scored exactly as SQLite FTS5's `bm25()`.

FTS5 scores every row that shares a term with the query before it can sort them: at a million
chunks a question of common words matches most rows and takes a second. Postings (for each term,
the rows holding it and its field-weighted frequency there) let a query read only its own terms
and score them with numpy: the work is a few gathers and one `bincount` over the matching rows.

The formula is FTS5's, so rankings are the same as before (tested against FTS5 itself):
    score = sum over query terms t of idf(t) * f * (k1 + 1) / (f + k1 * (1 - b + b * D / avgdl))
with f the field-weighted frequency of t in the row (sum of weight * count per field), D the
row's length in tokens over all fields (unweighted), avgdl the mean D, and
idf(t) = log((N - n(t) + 0.5) / (n(t) + 0.5)), floored at 1e-6, N rows and n(t) rows holding t.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rag_assets.nlp.features import token_counts

K1 = 1.2
B = 0.75
ROWID = np.int32  # row ids as stored in posting blobs
WEIGHT = np.float32  # field-weighted frequencies as stored in posting blobs


def searchable(terms: Iterable[str]) -> list[str]:
    """Distinct query terms that can match: tokens hold a letter or a digit."""
    return list(dict.fromkeys(t for t in terms if any(ch.isalnum() for ch in t)))


@dataclass
class Postings:
    """One term's rows (ascending) and its field-weighted frequency in each."""

    rowids: np.ndarray
    weights: np.ndarray

    @classmethod
    def from_blobs(cls, rowids: bytes, weights: bytes) -> Postings:
        return cls(np.frombuffer(rowids, dtype=ROWID), np.frombuffer(weights, dtype=WEIGHT))

    def blobs(self) -> tuple[bytes, bytes]:
        return self.rowids.astype(ROWID).tobytes(), self.weights.astype(WEIGHT).tobytes()

    def replace_rows(self, removed: np.ndarray, added: Postings | None) -> Postings:
        """Without the `removed` rows, plus `added` (whose row ids are all above the kept ones)."""
        keep = ~np.isin(self.rowids, removed)
        if added is None:
            return Postings(self.rowids[keep], self.weights[keep])
        return Postings(
            np.concatenate([self.rowids[keep], added.rowids]),
            np.concatenate([self.weights[keep], added.weights]),
        )


def row_lengths(fields: Sequence[tuple[float, Sequence[str]]]) -> np.ndarray:
    return np.sum([token_counts(texts) for _, texts in fields], axis=0)


@dataclass(frozen=True)
class PackedPostings:
    """The postings of a block of rows in four arrays: the i-th term (in term order) is held by
    rows `rowids[bounds[i]:bounds[i + 1]]`. A million rows' postings are a few arrays per block,
    not a pair of arrays per term and block (which cost more than the postings themselves)."""

    terms: np.ndarray  # str, ascending
    bounds: np.ndarray
    rowids: np.ndarray
    weights: np.ndarray

    def postings(self, i: int) -> Postings:
        start, end = self.bounds[i], self.bounds[i + 1]
        return Postings(self.rowids[start:end], self.weights[start:end])

    def items(self) -> Iterator[tuple[str, Postings]]:
        for i, term in enumerate(self.terms):
            yield str(term), self.postings(i)


def index_terms(rowids: np.ndarray, fields: Sequence[tuple[float, Sequence[str]]]) -> PackedPostings:
    """Postings of rows whose fields hold space-separated terms, as (field weight, texts) pairs.

    Vectorised over the rows: one split and one factorisation of all their tokens, then a sort
    of (term, row) keys; callers pass blocks of rows to bound the memory of the token list.
    """
    rowids = np.asarray(rowids, dtype=np.int64)
    per_field_counts = []
    tokens: list[str] = []
    token_weights = []
    for weight, texts in fields:
        counts = token_counts(texts)
        if counts.sum():
            tokens.extend(" ".join(t for t in texts if t).split(" "))
        per_field_counts.append(counts)
        token_weights.append(np.full(int(counts.sum()), weight, dtype=np.float64))
    if not tokens:
        empty = np.empty(0)
        return PackedPostings(
            empty.astype(object), np.zeros(1, dtype=np.int64), empty.astype(ROWID), empty.astype(WEIGHT)
        )
    codes, terms = pd.factorize(np.array(tokens, dtype=object), sort=True)
    positions = np.concatenate([np.repeat(np.arange(len(rowids)), counts) for counts in per_field_counts])
    keys = codes.astype(np.int64) * len(rowids) + positions
    pairs, inverse = np.unique(keys, return_inverse=True)
    weights = np.bincount(inverse, weights=np.concatenate(token_weights))
    pair_terms, pair_rows = np.divmod(pairs, len(rowids))
    bounds = np.searchsorted(pair_terms, np.arange(len(terms) + 1))
    return PackedPostings(
        np.asarray(terms, dtype=object), bounds, rowids[pair_rows].astype(ROWID), weights.astype(WEIGHT)
    )


def merge_postings(parts: Sequence[PackedPostings]) -> Iterator[tuple[str, Postings]]:
    """One posting list per term, in term order, from blocks of ascending, disjoint row ranges:
    a merge of the blocks' sorted terms, so only the merged list of one term is made at a time."""
    terms = heapq.merge(*(_numbered_terms(block, part) for block, part in enumerate(parts)))
    for term, found in itertools.groupby(terms, key=operator.itemgetter(0)):
        pieces = [parts[block].postings(i) for _, block, i in found]  # blocks in row order
        yield (
            term,
            Postings(
                np.concatenate([p.rowids for p in pieces]).astype(ROWID),
                np.concatenate([p.weights for p in pieces]).astype(WEIGHT),
            ),
        )


def _numbered_terms(block: int, part: PackedPostings) -> Iterator[tuple[str, int, int]]:
    for i, term in enumerate(part.terms):
        yield str(term), block, i


@dataclass(frozen=True)
class RowTable:
    """What scoring needs to know of every row, indexed by row id: its length and its course."""

    lengths: np.ndarray  # tokens over all fields; 0 where no row has that id
    courses: np.ndarray  # a course code (the index's own numbering); -1 where no row has that id

    @functools.cached_property
    def rows(self) -> int:
        return int((self.courses >= 0).sum())

    def length_norms(self) -> np.ndarray:
        """k1 * (1 - b + b * D / avgdl) per row id: the part of the denominator fixed per row."""
        rows = self.rows
        avgdl = float(self.lengths.sum()) / rows if rows else 1.0
        return K1 * (1 - B + B * self.lengths.astype(np.float64) / (avgdl or 1.0))


def idf(rows: int, holding: int) -> float:
    value = float(np.log((rows - holding + 0.5) / (holding + 0.5)))
    return value if value > 0 else 1e-6


def top_rows(scores: np.ndarray, rowids: np.ndarray, k: int) -> list[int]:
    """Row ids of the k best scores, best first, ties to the lower row id (as FTS5 returns them)."""
    if k <= 0 or not len(scores):
        return []
    if len(scores) > k:
        keep = np.argpartition(-scores, k - 1)[:k]
        # Rows tied with the k-th score may have been cut arbitrarily: take all of them.
        keep = np.flatnonzero(scores >= scores[keep].min())
        scores, rowids = scores[keep], rowids[keep]
    order = np.lexsort((rowids, -scores))[:k]
    return [int(r) for r in rowids[order]]


def bm25_top(
    postings: Mapping[str, Postings],
    terms: Sequence[str],
    table: RowTable,
    norms: np.ndarray,
    course: int | None,
    k: int,
) -> list[tuple[int, float]]:
    """The k best (row id, score) for an OR of `terms` (in query order), optionally within one
    course, best first."""
    found = [postings[t] for t in terms if t in postings and len(postings[t].rowids)]
    if not found:
        return []
    rowids = np.concatenate([p.rowids for p in found])
    freqs = np.concatenate([p.weights for p in found]).astype(np.float64)
    idfs = np.repeat([idf(table.rows, len(p.rowids)) for p in found], [len(p.rowids) for p in found])
    if course is not None:
        inside = table.courses[rowids] == course
        rowids, freqs, idfs = rowids[inside], freqs[inside], idfs[inside]
    scores = idfs * (freqs * (K1 + 1)) / (freqs + norms[rowids])
    # Summed in the order of the query's terms, as FTS5 sums them.
    totals = np.bincount(rowids, weights=scores, minlength=len(norms))
    matched = np.flatnonzero(totals)  # every match scores above 0: idf is at least 1e-6
    return [(row, float(totals[row])) for row in top_rows(totals[matched], matched, k)]
