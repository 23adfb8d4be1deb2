"""Vector search over an inverted file: vectors grouped in lists by their nearest centroid.

A scan of every vector reads 1.2 GB per query at a million chunks (110 ms here, and the whole
matrix in each reader's memory). Lists of about `LIST_ROWS` vectors let a query score the
centroids, then read and score only the `PROBES` nearest lists: a constant cost whatever the
corpus size. Up to `PROBES * LIST_ROWS` vectors every list is read, so the search is exact;
above, it is approximate, like the HNSW kNN of the Elasticsearch backend. Vector similarity
only breaks ties and fills the list in the fusion (`FusionSettings`), and `make bench` reports
its recall against the exact scan.
"""

from __future__ import annotations

import numpy as np

LIST_ROWS = 1000
PROBES = 8
_KMEANS_ITERATIONS = 10
_SAMPLE_PER_LIST = 64
_BLOCK = 65_536  # vectors per matrix product when assigning


def list_count(rows: int) -> int:
    return max(1, round(rows / LIST_ROWS))


def needs_new_lists(lists: int, rows: int) -> bool:
    """Lists were sized for another corpus size: twice too many or too few rows per list."""
    target = list_count(rows)
    return lists * 2 <= target or target * 2 <= lists


def training_sample(rows: int, count: int, seed: int = 0) -> np.ndarray:
    """Ascending positions of the vectors `count` centroids are trained on: a fixed sample of
    `_SAMPLE_PER_LIST` per list, or all of them (one list is their mean)."""
    if count <= 1 or rows <= count * _SAMPLE_PER_LIST:
        return np.arange(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, count * _SAMPLE_PER_LIST, replace=False))


def train_centroids(sample: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means on the `training_sample` vectors: unit centroids, the same for the same input."""
    if count <= 1 or len(sample) <= count:
        return _unit(sample.mean(axis=0, keepdims=True, dtype=np.float64)).astype(np.float32)
    rng = np.random.default_rng(seed)
    sample = np.asarray(sample, dtype=np.float32)
    centroids = sample[rng.choice(len(sample), count, replace=False)].copy()
    for _ in range(_KMEANS_ITERATIONS):
        members = nearest(sample, centroids)
        order = np.argsort(members, kind="stable")
        filled, starts = np.unique(members[order], return_index=True)
        sums = np.add.reduceat(sample[order].astype(np.float64), starts)
        centroids[filled] = _unit(sums).astype(np.float32)  # an empty list keeps its centroid
    return centroids


def nearest(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The list of each vector: its most similar centroid."""
    lists = np.empty(len(vectors), dtype=np.int32)
    for start in range(0, len(vectors), _BLOCK):
        block = np.asarray(vectors[start : start + _BLOCK], dtype=np.float32)
        lists[start : start + len(block)] = np.argmax(block @ centroids.T, axis=1)
    return lists


def probe_order(centroids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Lists from the most to the least similar centroid."""
    return np.argsort(-(centroids @ np.asarray(query, dtype=np.float32)), kind="stable")


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
