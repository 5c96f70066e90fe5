"""The one record every reader yields, and the on-disk layout of astrolom Parquet shards.

A record is one object: an id, an image (H, W, C) float32 in the survey's own units (never transposed), optional
spectrum, its split and its labels. Our Parquet shards store one record per row:

- `object_id` (string), `split` (string: train / val / test), one column per label;
- `image`: raw little-endian float32 bytes in (H, W, C) order, with `image_shape` = [H, W, C] (int32 list);
- `spectrum` (optional, null for objects without one): raw float32 bytes, wavelengths in the file's metadata;
  `spectrum_ivar` (float32 bytes, inverse variance, 0 = no information) and `spectrum_mask` (uint8 bytes,
  1 = bad pixel) beside it;
- file metadata key `astrolom` (JSON): bands, pixel scale, spectrum wavelength grid, generator settings.

Parquet files whose `image` column holds encoded JPEG/PNG bytes (e.g. the Smith42/galaxies layout, where `image`
may also be a Hugging Face `{bytes, path}` struct) are read too, see `astrolom.data.sources`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IMAGE = "image"
IMAGE_SHAPE = "image_shape"
SPECTRUM = "spectrum"
SPECTRUM_IVAR = "spectrum_ivar"
SPECTRUM_MASK = "spectrum_mask"
METADATA_KEY = b"astrolom"
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass
class Record:
    object_id: str
    image: np.ndarray  # (H, W, C) float32
    split: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    spectrum: np.ndarray | None = None  # (L,) float32
    spectrum_ivar: np.ndarray | None = None  # (L,) float32 inverse variance (None: unknown, treat as 1)
    spectrum_mask: np.ndarray | None = None  # (L,) bool, True = bad pixel


def check_split_fractions(fractions, name: str = "split_fractions") -> tuple[float, float, float]:
    """`fractions` as a (train, val, test) tuple of floats, or a ValueError naming `name` (the option the user set).

    The one validation of split fractions: survey generation, readers and the pretraining config all call it.
    """
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three numbers (train, val, test), got {fractions!r}") from None
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"{name} must be three non-negative numbers summing to 1, got {fractions!r}")
    return fr  # type: ignore[return-value]


def split_of(object_id: str, fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS, seed: int = 0) -> str:
    """Deterministic train/val/test assignment from a hash of the id, for data sets that carry no split column.

    Stable across runs, machines, file orders and dataset growth: an object never changes split.
    """
    h = hashlib.blake2b(f"{seed}:{object_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "little") / 2**64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"
