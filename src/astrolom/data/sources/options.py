"""`SourceOptions`: how to read a data set (the bad-record policy, splits, ids, shapes, chunking, decode threads,
spectra, bands); every reader takes one."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from astrolom.config import comma_list
from astrolom.data.records import DEFAULT_SPLIT_FRACTIONS, check_split_fractions

DEFAULT_CHUNK_ROWS = 256


@dataclass(frozen=True)
class SourceOptions:
    """How to read a data set; every reader takes one (`open_source(path, options)` or its keyword overrides)."""

    skip_bad: bool = False  # skip (and list) records that cannot be used, or only their bad spectrum, not raise
    manifest: str | Path | None = None  # JSONL file to which skipped records and dropped spectra are appended
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS  # for data without a split column
    split_seed: int = 0
    id_column: str | None = None  # object id column / dataset (default: detected)
    image_key: str | None = None  # image column / dataset / array name (default: image(s))
    expect_shape: tuple[int | None, ...] | None = None  # (H, W, C), None entries match anything; default: inferred
    chunk_rows: int = DEFAULT_CHUNK_ROWS  # files or array rows per chunk (Parquet chunks are row groups)
    threads: int | None = None  # JPEG/PNG decode threads; None: min(4, cores)
    spectra: bool = True  # False: do not read spectra (image-only work reads less)
    spectra_dir: str | Path | None = None  # folder of FITS spectra paired with the images by object id
    wavelength: tuple[float, ...] | None = None  # reference grid (the model's); default: the data set's / first file's
    resample_spectra: bool = True  # spectra on another grid: resample (flux-conserving); False: bad record
    bands: tuple[str, ...] | None = None  # keep these bands, by name, in this order (e.g. g,r,z of griz); None: all

    def __post_init__(self):
        if self.bands is not None:
            names = comma_list(self.bands, name="bands") if isinstance(self.bands, str) else self.bands
            names = tuple(str(b).strip() for b in names if str(b).strip())
            if not names or len(set(names)) != len(names):
                raise ValueError(f"bands must be distinct band names, e.g. g,r,z; got {self.bands!r}")
            object.__setattr__(self, "bands", names)
        object.__setattr__(self, "split_fractions", check_split_fractions(self.split_fractions))
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.expect_shape is not None:
            object.__setattr__(self, "expect_shape", tuple(self.expect_shape))
        if self.wavelength is not None:
            object.__setattr__(self, "wavelength", tuple(float(w) for w in self.wavelength))

    @classmethod
    def with_overrides(cls, options: SourceOptions | None = None, **overrides: Any) -> SourceOptions:
        """`options` (default: the defaults) with some fields replaced; unknown names are a TypeError listing them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown source option(s) {unknown}; SourceOptions has {sorted(names)}")
        base = options if options is not None else cls()
        return cls(**{**{n: getattr(base, n) for n in names}, **overrides})

    @property
    def decode_threads(self) -> int:
        return max(1, min(4, os.cpu_count() or 1) if self.threads is None else int(self.threads))
