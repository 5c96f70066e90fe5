"""Cutouts of indexed objects, looked up by object id in the data set, rendered for display.

`CutoutStore` opens the data set once (any format `astrolom.data.sources` reads), maps object ids to (chunk, row)
by reading only the id columns, and reads single records on demand. Objects are addressed by id, never by path.
Cutouts are rendered by `astrolom.data.display.display_rgb` (the Legacy Survey viewer's stretch for g, r, z).
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np

from astrolom.data.display import display_rgb, to_8bit
from astrolom.data.records import Record


def rgb_image(image: np.ndarray, bands: tuple[str, ...] | None = ("g", "r", "z")) -> np.ndarray:
    """(H, W, C) survey image -> (H, W, 3) uint8 for display: `display_rgb` in 8 bits as the viewer writes them."""
    return to_8bit(display_rgb(image, bands))


def png_bytes(rgb: np.ndarray, size: int | None = None) -> bytes:
    """PNG encoding of an (H, W, 3) uint8 image, optionally upscaled (nearest) to `size` pixels on its long side."""
    from PIL import Image

    im = Image.fromarray(rgb)
    if size and max(im.size) != size:
        f = size / max(im.size)
        im = im.resize((max(1, round(im.size[0] * f)), max(1, round(im.size[1] * f))), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


class CutoutStore:
    """Read-only access to a data set's records by object id."""

    def __init__(self, data: str | Path):
        from astrolom.data.sources import open_source

        self.data = str(data)
        self.source = open_source(self.data)
        self.bands = tuple(self.source.bands) if self.source.bands else None
        self._where: dict[str, tuple[int, int]] | None = None
        self._lock = threading.Lock()  # sources keep per-file state; serve requests come from a thread pool

    def _map(self) -> dict[str, tuple[int, int]]:
        if self._where is None:
            where = {}
            for i in range(self.source.num_chunks):
                ids, _ = self.source.chunk_keys(i)
                for r, oid in enumerate(ids):
                    where.setdefault(str(oid), (i, r))
            self._where = where
        return self._where

    def __contains__(self, object_id: str) -> bool:
        with self._lock:
            return str(object_id) in self._map()

    def get(self, object_id: str) -> Record:
        """The record of an object id; a KeyError naming the data set if it is not there."""
        with self._lock:
            loc = self._map().get(str(object_id))
            if loc is None:
                raise KeyError(f"object id {object_id!r} is not in the data set {self.data}")
            recs = self.source.read_aligned(loc[0], [loc[1]])
        if not recs or recs[0] is None:
            raise KeyError(f"object id {object_id!r}: its record in {self.data} could not be read")
        return recs[0]

    def wavelength(self) -> np.ndarray | None:
        """The spectrum wavelength grid (Angstrom) recorded in the data set's metadata, if any."""
        wl = (getattr(self.source, "metadata", None) or {}).get("wavelength")
        return np.asarray(wl, dtype=np.float64) if wl is not None else None

    def rgb(self, object_id: str) -> np.ndarray:
        return rgb_image(self.get(object_id).image, self.bands)

    def close(self) -> None:
        self.source.close()
