"""What the explorer serves: an index, its data set, and the map, outlier scores and thumbnails made from them
lazily and kept in memory (the server writes nothing but the marks file)."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from astrolom.data.modalities import ALL
from astrolom.search.index import SearchIndex
from astrolom.search.maps import compute_map
from astrolom.search.outliers import outlier_scores
from astrolom.search.query import model_dir_of, open_store
from astrolom.serve.mapview import POINTS_MAX, MapView


class LRU:
    """A small thread-safe LRU cache of rendered thumbnails (bytes)."""

    def __init__(self, size: int):
        self.size, self.data, self.lock = size, OrderedDict(), threading.Lock()
        self.hits = self.misses = 0

    def get(self, key, make):
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                self.hits += 1
                return self.data[key]
        value = make()
        with self.lock:
            self.misses += 1
            self.data[key] = value
            while len(self.data) > self.size:
                self.data.popitem(last=False)
        return value


class Explorer:
    """What the web app serves: an index, its data set and lazily computed map and outlier scores."""

    def __init__(
        self,
        index: SearchIndex,
        data: str | None = None,
        *,
        map_method: str = "umap",
        thumbs: int = 4096,
        points_max: int = POINTS_MAX,
    ):
        self.index = index
        self.data = data or index.meta.get("data")
        self._store = None
        self._lock = threading.Lock()
        self._map: np.ndarray | None = None
        self._scores: dict[int, np.ndarray] = {}
        self.map_method = map_method
        self.thumbs = LRU(thumbs)
        self.view = MapView(index, lambda: self.map(), points_max)  # late-bound: the map method may be replaced

    @property
    def store(self):
        with self._lock:
            if self._store is None and self.data:
                self._store = open_store(self.index, self.data)
        return self._store

    def map(self) -> np.ndarray:
        with self._lock:
            if self._map is None:
                coords = self.index.map_coords()
                if coords is None:  # not made at index time: compute once, keep in memory (the server writes nothing)
                    coords = compute_map(self.index.vectors(np.arange(len(self.index))), self.map_method)
                self._map = np.asarray(coords, dtype=np.float32)
        return self._map

    def scores(self, k: int) -> np.ndarray:
        with self._lock:
            if k not in self._scores:
                f = self.index.path / f"outliers-k{k}.npy"
                cached = np.load(f) if f.is_file() else None
                if cached is not None and len(cached) == len(self.index):
                    self._scores[k] = cached
                else:
                    self._scores[k] = outlier_scores(self.index, k, progress=False, cache=False)
        return self._scores[k]

    def can_embed_images(self) -> bool:
        try:
            model_dir_of(self.index)
        except (ValueError, FileNotFoundError):
            return False
        return True

    def modalities(self) -> list[str]:
        return self.index.modalities or [self.index.main_modality]

    def bands(self) -> tuple[str, ...] | None:
        """Band names of the indexed data set, where it is there and names them."""
        try:
            return self.store.bands if self.store is not None else None
        except (OSError, ValueError):
            return None

    def cross_modal(self) -> bool:
        return self.index.aligned and set(ALL) <= set(self.index.modalities)
