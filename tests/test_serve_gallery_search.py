"""Exact gallery search for large galleries: argpartition top-k equals a full sort; the contiguous
matrix is cached and follows add() and remove()."""
from __future__ import annotations

import numpy as np
import pytest

from petal_runtime.gallery import Gallery, gallery_dtype, top_k_indices


def random_gallery(n: int, dim: int = 16, seed: int = 0) -> Gallery:
    rng = np.random.default_rng(seed)
    entries = np.zeros(n, gallery_dtype(dim))
    entries["name"] = [f"id{i:06d}" for i in range(n)]
    x = rng.normal(size=(n, dim)).astype(np.float32)
    entries["embedding"] = x / np.linalg.norm(x, axis=1, keepdims=True)
    entries["count"] = 1
    return Gallery(entries, {"models_sha256": "x"})


@pytest.mark.parametrize("n, k", [(1, 5), (5, 5), (7, 3), (1000, 1), (1000, 10), (1000, 5000)])
def test_top_k_matches_a_full_sort(n, k):
    rng = np.random.default_rng(n + k)
    scores = rng.normal(size=n).astype(np.float32)
    scores[: n // 3] = scores[n // 3: 2 * (n // 3)]  # ties
    expected = np.argsort(-scores, kind="stable")[:k]
    np.testing.assert_array_equal(top_k_indices(scores, k), expected)


def test_identify_uses_the_cached_matrix_and_follows_edits():
    gallery = random_gallery(2000)
    matrix = gallery.embeddings
    assert matrix.flags.c_contiguous and not matrix.flags.writeable and gallery.embeddings is matrix
    query = matrix[1234] + 0.01
    match = gallery.identify(query, threshold=0.5, top_k=4)
    full = np.argsort(-(matrix @ (query / np.linalg.norm(query))))[:4]
    assert match.identity == "id001234" and [n for n, _ in match.top_k] == [f"id{i:06d}" for i in full]
    gallery.remove(["id001234"])
    assert len(gallery.embeddings) == 1999 and gallery.identify(query, 0.5).identity != "id001234"
    gallery.add("newcomer", query[None])
    assert gallery.identify(query, 0.5).identity == "newcomer" and "newcomer" in gallery.names
