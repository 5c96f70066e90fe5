"""The 2-D map of an index for the explorer: fit on at most `MAP_MAX_DEFAULT` objects (UMAP or PCA), applied to
every object chunk by chunk."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from astrolom.log import progress as progress_bar
from astrolom.search.vectors import ArraySource, _Prepared

MAP_MAX_DEFAULT = 200_000


def _map_reducer(method: str, seed: int):
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(2, random_state=seed)
    if method != "umap":
        raise ValueError(f"unknown map method {method!r}; choose umap, pca or none")
    import umap

    return umap.UMAP(n_neighbors=15, min_dist=0.1, metric="cosine", random_state=seed, low_memory=True)


def map_prepared(
    src: _Prepared, out: np.ndarray, method: str = "umap", seed: int = 0, max_fit: int = MAP_MAX_DEFAULT,
    progress: bool = False,
) -> np.ndarray:  # fmt: skip
    """Fill `out` (N, 2) with the map of prepared vectors: fit on all of them up to `max_fit`, else fit on a fixed
    random sample of `max_fit` and place every row with `transform`, chunk by chunk."""
    n = src.n
    if n < 3:
        out[:] = 0
        return out
    method = "pca" if n < 16 else method  # UMAP needs more neighbours than a handful of points have
    reducer = _map_reducer(method, seed)
    if n <= max_fit:
        out[:] = reducer.fit_transform(src.take(np.arange(n)))
        return out
    reducer.fit(src.take(np.sort(np.random.default_rng(seed).choice(n, max_fit, replace=False))))
    with progress_bar(n, desc=f"map[{method}]", unit="obj", enabled=progress) as bar:
        for start, V in src.chunks(50_000 if method == "umap" else None):
            out[start : start + len(V)] = reducer.transform(V)
            bar.update(len(V))
    return out


def compute_map(X: np.ndarray, method: str = "umap", seed: int = 0, max_fit: int = MAP_MAX_DEFAULT) -> np.ndarray:
    """(N, 2) float32 map of embeddings for display: UMAP (cosine), or PCA (fast, for tests and huge sets)."""
    src = _Prepared(ArraySource(np.atleast_2d(X), pa.table({})), None)
    return map_prepared(src, np.empty((src.n, 2), np.float32), method, seed, max_fit)
