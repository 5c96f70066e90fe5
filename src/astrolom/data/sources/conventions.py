"""Conventions shared by the formats: file-name endings -> format (`EXTENSIONS`), id column names, split names
and their aliases, label values as plain Python, and whether a file system is the local disk."""

from __future__ import annotations

import os

import numpy as np

from astrolom.data.records import SPLITS
from astrolom.data.sources.errors import BadRecordError

EXTENSIONS = {  # file name ending -> format (longest match wins)
    ".jpg": "images",
    ".jpeg": "images",
    ".png": "images",
    ".fits": "fits",
    ".fit": "fits",
    ".fts": "fits",
    ".fits.gz": "fits",
    ".fit.gz": "fits",
    ".fts.gz": "fits",
    ".npy": "npy",
    ".npz": "npz",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".hdf": "hdf5",
    ".he5": "hdf5",
    ".parquet": "parquet",
    ".pq": "parquet",
}


ID_COLUMNS = ("object_id", "dr8_id", "objid", "object_name", "targetid", "TARGETID", "id")


_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}  # fmt: skip


def strip_ext(name: str) -> str:
    low = name.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if low.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def kind_of(name: str) -> str | None:
    low = name.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if low.endswith(ext):
            return EXTENSIONS[ext]
    return None


def norm_split(value, where: str) -> str:
    s = _SPLIT_ALIASES.get(str(value).strip().lower()) if value is not None else None
    if s is None:
        raise BadRecordError(where, f"split {value!r} is not one of {SPLITS} (or validation)")
    return s


def to_python(v):
    """numpy scalar -> python scalar (labels stay JSON-friendly)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


def is_local(fs) -> bool:
    """Whether an fsspec file system is the local disk (then files may be memory-mapped / opened by path)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
