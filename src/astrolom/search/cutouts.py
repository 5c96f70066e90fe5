"""Cutouts of indexed objects, looked up by object id in the data set, and a Legacy-Survey-like colour rendering.

`CutoutStore` opens the data set once (any format `astrolom.data.sources` reads), maps object ids to (chunk, row)
by reading only the id columns, and reads single records on demand. Objects are addressed by id, never by path.

`rgb_image` renders g/r/z stamps the way the DESI Legacy Survey viewer does (Lupton et al. 2004 asinh stretch with
per-band scales, bands g, r, z → blue, green, red): each band is scaled (g 6.0, r 3.4, z 2.2 per nanomaggy) and
offset by m = 0.03, the mean intensity I is stretched by asinh(Q·I)/sqrt(Q) with Q = 20, and every band is
multiplied by stretch(I)/I so hues are kept. Other band sets are shown min–max scaled.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np

from astrolom.data.records import Record

# band -> (RGB plane, scale): the Legacy Survey viewer's DECam g/r/z scales
LS_SCALES = {"g": (2, 6.0), "r": (1, 3.4), "z": (0, 2.2)}
LS_Q, LS_M = 20.0, 0.03


def rgb_image(image: np.ndarray, bands: tuple[str, ...] | None = ("g", "r", "z")) -> np.ndarray:
    """(H, W, C) survey image -> (H, W, 3) uint8 for display (see the module docstring)."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[..., None]
    h, w, c = img.shape
    bands = tuple(bands or ())
    if c == 3 and bands == ("g", "r", "z"):
        planes = np.zeros((h, w, 3), np.float32)
        for k, b in enumerate(bands):
            plane, scale = LS_SCALES[b]
            planes[..., plane] = np.maximum(img[..., k] * scale + LS_M, 0)
        intensity = planes.mean(axis=2)
        intensity = np.where(intensity == 0, 1e-6, intensity)
        stretched = np.arcsinh(LS_Q * intensity) / np.sqrt(LS_Q)
        rgb = np.clip(planes * (stretched / intensity)[..., None], 0, 1)
    else:
        # unknown bands (e.g. JPEG RGB cutouts): first three channels, min-max scaled
        x = img[..., :3] if c >= 3 else np.repeat(img[..., :1], 3, axis=2)
        lo, hi = np.nanpercentile(x, 0.5), np.nanpercentile(x, 99.5)
        rgb = np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1)
    return (np.nan_to_num(rgb) * 255 + 0.5).astype(np.uint8)


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
