"""Outlier scores computed when an index is built: each object's cosine distance to its k-th nearest other object
(`astrolom.search.outliers` ranks by it), by one k-NN search per object (`kth_neighbour_scores`) or, for an IVF
index, by a blocked self-join of each inverted list with its nearest lists (`list_join_scores`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from astrolom.log import progress as progress_bar


def kth_neighbour_scores(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    chunks: Iterable[tuple[int, np.ndarray]],
    n: int,
    k: int,
    *,
    progress: bool = True,
) -> np.ndarray:
    """The outlier score (`astrolom.search.outliers`): (n,) cosine distance to the k-th nearest other object, from
    `search(prepared queries, k) -> (sims, rows)` over `chunks` of (first row, prepared vectors) that cover rows
    0..n-1 in order."""
    if not 1 <= k < n:
        raise ValueError(f"k must be in 1..{n - 1} for an index of {n} objects, got {k}")
    scores = np.empty(n, np.float32)
    with progress_bar(n, desc=f"outliers[k={k}]", unit="obj", enabled=progress) as bar:
        for start, V in chunks:
            for i in range(0, len(V), 4096):
                rows = np.arange(start + i, start + min(i + 4096, len(V)))
                scores[rows] = kth_by_search(search, rows, V[i : i + 4096], k)
                bar.update(len(rows))
    return scores


def kth_by_search(search, rows: np.ndarray, V: np.ndarray, k: int) -> np.ndarray:
    sims, nbr = search(V, k + 1)
    # the object itself is normally its own first hit; drop it wherever it appears (ties, approximate search)
    own = nbr == rows[:, None]
    kth = np.where(own.any(1), np.sort(np.where(own, np.inf, -sims), axis=1)[:, k - 1], -sims[:, k - 1])
    return 1.0 + kth


JOIN_LISTS = 4  # an IVF index's outlier pass compares each list's objects with those of the 4 lists nearest to it


def list_join_scores(
    index, k: int, exact_rows: Callable[[np.ndarray], np.ndarray] | None, *, lists: int = JOIN_LISTS,
    progress: bool = True,
) -> np.ndarray | None:  # fmt: skip
    """The outlier score of every vector of an IVF index by a blocked self-join (None for other kinds): each
    inverted list's vectors against the vectors of the `lists` lists whose centroids are nearest to its own, as
    dense matrix products. A k-NN search per object scans nprobe lists chosen per object, one vector at a time; the
    join reads each list a few times and runs at matrix-multiply speed. Rows whose candidate set is too small for k
    are NaN (the caller searches those). `exact_rows(rows)`: the exact vectors for IVF-PQ (IVF-Flat lists hold them).
    """
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    ivf = faiss.downcast_index(ivf)
    flat = isinstance(ivf, faiss.IndexIVFFlat)
    if not flat and exact_rows is None:
        return None
    inv, nlist, d = ivf.invlists, ivf.nlist, ivf.d
    members = [
        faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy() if inv.list_size(i) else np.zeros(0, np.int64)
        for i in range(nlist)
    ]

    def vectors(i: int) -> np.ndarray:
        if flat:
            size = inv.list_size(i)
            return faiss.rev_swig_ptr(inv.get_codes(i), size * ivf.code_size).view(np.float32).reshape(size, d)
        out = np.empty((len(members[i]), d), np.float32)
        order = np.argsort(members[i])
        out[order] = exact_rows(members[i][order])
        return out

    centroids = ivf.quantizer.reconstruct_n(0, nlist)
    near_index = faiss.IndexFlatL2(d)
    near_index.add(centroids)
    _, near = near_index.search(centroids, min(lists, nlist))
    scores = np.full(ivf.ntotal, np.nan, np.float32)
    with progress_bar(int(ivf.ntotal), desc=f"outliers[k={k}]", unit="obj", enabled=progress) as bar:
        for i in range(nlist):
            if not len(members[i]):
                continue
            others = [int(j) for j in near[i] if j >= 0 and j != i]
            C = np.concatenate([vectors(i), *(vectors(j) for j in others)])  # the list itself first
            if len(C) > k:
                m = len(members[i])
                for b in range(0, m, 1024):
                    S = C[b : min(b + 1024, m)] @ C.T  # (B, candidates): cosines, the vectors being unit length
                    S[np.arange(len(S)), b + np.arange(len(S))] = -np.inf  # not its own neighbour
                    scores[members[i][b : b + 1024]] = 1.0 - np.partition(S, -k, axis=1)[:, -k]
            bar.update(len(members[i]))
    return scores
