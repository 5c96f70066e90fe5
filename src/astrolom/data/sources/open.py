"""`open_source`: a path, glob or fsspec URL -> the `Source` of its format (detected from file extensions or named).

To add a format: write its `Source` subclass in a module of this package, map its file extensions to the format name
in `conventions.EXTENSIONS`, and register the class in `READERS` below (and its name in `FORMATS`).

`paired` has no extension of its own: it is chosen by `spectra_dir` (images at `path`, FITS spectra there), or by a
folder holding `images/` and `spectra/` sub-folders (so that `--data FOLDER` works on the command line).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from astrolom.data.modalities import ALL
from astrolom.data.sources.arrays import Hdf5Source, NpySource, NpzSource
from astrolom.data.sources.base import Source
from astrolom.data.sources.conventions import EXTENSIONS, kind_of
from astrolom.data.sources.files import FitsDirSource, ImageDirSource, PairedSource
from astrolom.data.sources.options import SourceOptions
from astrolom.data.sources.parquet import ParquetSource

FORMATS = ("images", "fits", "npy", "npz", "hdf5", "parquet", "paired")
ALIASES = {
    "dir": "images",
    "image": "images",
    "jpeg": "images",
    "jpg": "images",
    "png": "images",
    "fits.gz": "fits",
    "fit": "fits",
    "h5": "hdf5",
    "pq": "parquet",
}

READERS: dict[str, type[Source]] = {
    "images": ImageDirSource,
    "fits": FitsDirSource,
    "npy": NpySource,
    "npz": NpzSource,
    "hdf5": Hdf5Source,
    "parquet": ParquetSource,
    "paired": PairedSource,
}
PAIRED_DIRS = ALL  # sub-folders of a paired data set
_PER_FILE = ("images", "fits")  # one record per file: object ids are paths relative to the folder given


def _list_files(fs, root: str) -> tuple[list[str], str | None]:
    """Files named by a path: a glob, a directory (recursive) or one file. Returns (sorted files, root dir)."""
    if any(ch in root for ch in "*?["):
        files = sorted(p for p in fs.glob(root) if not fs.isdir(p))
        return files, None
    if fs.isdir(root):
        files = sorted(p for p in fs.find(root) if not p.rsplit("/", 1)[-1].startswith("."))
        return files, root.rstrip("/")
    if fs.exists(root):
        return [root], None
    raise FileNotFoundError(f"no such file, directory or glob: {root}")


def detect_format(path: str) -> str:
    """Name the format of `path` from its extension(s), or a ValueError listing what was found."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    files, _ = _list_files(fs, root)
    return _detect(files, path)


def _detect(files: list[str], path: str) -> str:
    kinds = collections.Counter(k for k in (kind_of(f) for f in files) if k)
    if not kinds:
        raise ValueError(
            f"{path}: found no file of a supported format ({', '.join(sorted(set(EXTENSIONS)))}); "
            f"pass --format ({', '.join(FORMATS)})"
        )
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes formats {dict(kinds)}; pass --format to choose one ({', '.join(FORMATS)})")
    return next(iter(kinds))


def open_source(
    path: str | Path, format: str | None = None, options: SourceOptions | None = None, **overrides: Any
) -> Source:
    """Open a data set (local path, glob or fsspec URL) in any supported format; see `astrolom.data.sources`.

    Args:
        path: a file, folder (searched recursively), glob or fsspec URL.
        format: one of FORMATS (aliases: dir, jpeg, png, h5, ...) or None to detect from file extensions.
        options: how to read it (`SourceOptions`); default: the defaults.
        **overrides: `SourceOptions` fields to change, e.g. `open_source(p, spectra=False, skip_bad=True)`.
    """
    import fsspec

    opts = SourceOptions.with_overrides(options, **overrides)
    path = str(path)
    fs, root = fsspec.core.url_to_fs(path)
    fmt_asked = None if format is None else ALIASES.get(format.lower(), format.lower())
    if opts.spectra_dir is not None or fmt_asked == "paired":
        return _open_paired(path, fs, root, opts)
    if format is None and fs.isdir(root) and all(fs.isdir(f"{root.rstrip('/')}/{d}") for d in PAIRED_DIRS):
        return _open_paired(path, fs, root, opts)
    files, root_dir = _list_files(fs, root)
    if format is None:
        fmt = _detect(files, path)
    else:
        fmt = ALIASES.get(format.lower(), format.lower())
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    chosen = [f for f in files if kind_of(f) == fmt]
    if not chosen:
        if format is not None and len(files) == 1:
            chosen = files  # an explicitly named format for a file with an unusual extension
        else:
            raise ValueError(f"{path}: no {fmt} files found")
    if fmt in _PER_FILE:
        src = READERS[fmt](path, fs, chosen, root_dir, opts)
    else:
        src = READERS[fmt](path, fs, chosen, opts)
    src._infer_shape()
    src.chunk_reads = src.key_reads = 0  # count only what the caller reads
    return src


def _open_paired(path: str, fs, root: str, opts: SourceOptions) -> Source:
    """Images at `root` (or `root/images`) paired with FITS spectra in `opts.spectra_dir` (or `root/spectra`)."""
    images, spectra = root, opts.spectra_dir
    if spectra is None:
        if not all(fs.isdir(f"{root.rstrip('/')}/{d}") for d in PAIRED_DIRS):
            raise ValueError(f"{path}: format 'paired' needs spectra_dir= or sub-folders images/ and spectra/")
        images, spectra = f"{root.rstrip('/')}/images", f"{root.rstrip('/')}/spectra"
    else:
        spectra = fsspec_path(str(spectra))
        if not fs.isdir(spectra):
            raise FileNotFoundError(f"spectra folder {opts.spectra_dir} does not exist")
    files, root_dir = _list_files(fs, images)
    kinds = collections.Counter(kind_of(f) for f in files)
    chosen = [f for f in files if kind_of(f) in ("images", "fits")]
    if not chosen:
        raise ValueError(f"{path}: no JPEG/PNG/FITS images to pair with spectra (found {dict(kinds)})")
    src = PairedSource(path, fs, chosen, root_dir, opts, spectra_root=spectra)
    src._infer_shape()
    src.chunk_reads = src.key_reads = 0
    return src


def fsspec_path(url: str) -> str:
    """The file-system path part of a local path or fsspec URL."""
    import fsspec

    return fsspec.core.url_to_fs(url)[1]
