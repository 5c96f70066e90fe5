"""Arrays of N records: `.npy` (N, H, W[, C]), `.npz` and HDF5 files with an image array plus optional per-row ids,
splits and 1-D label arrays. A chunk is a block of `chunk_rows` rows of one file."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from astrolom.data.sources.base import Chunk, Item, Source
from astrolom.data.sources.conventions import ID_COLUMNS, is_local, norm_split, strip_ext, to_python
from astrolom.data.sources.decode import decode_array
from astrolom.data.sources.errors import BadRecordError, decode_errors
from astrolom.data.sources.options import SourceOptions

_HDF5_SPECTRAL = ("spectrum", "wavelength", "spectrum_ivar", "ivar", "spectrum_mask")  # never labels


class _NpyRows:
    """Row access to a C-ordered .npy stored in a seekable file object (fsspec file, zip member) or memory map."""

    def __init__(self, opener: Callable[[], Any], local_path: str | None = None):
        self.opener = opener
        self.mm = None
        if local_path is not None:
            self.mm = np.load(local_path, mmap_mode="r")
            self.shape, self.dtype = self.mm.shape, self.mm.dtype
            return
        with opener() as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran and len(shape) > 1:
            raise ValueError("Fortran-ordered .npy arrays are not supported; save a C-ordered array")
        if dtype.hasobject:
            raise ValueError(".npy arrays of Python objects are not supported")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def rows(self, idx: Sequence[int]) -> list[np.ndarray]:
        if self.mm is not None:
            return [np.array(self.mm[j]) for j in idx]
        out: dict[int, np.ndarray] = {}
        with self.opener() as f:
            for j in sorted(set(idx)):
                f.seek(self.offset + j * self.row_bytes)
                buf = f.read(self.row_bytes)
                if len(buf) != self.row_bytes:
                    raise BadRecordError("", f"array data is truncated at row {j}")
                out[j] = np.frombuffer(buf, dtype=self.dtype).reshape(self.shape[1:]).copy()
        return [out[j] for j in idx]


class _ArraySource(Source):
    """npy / npz / HDF5: files of N rows; a chunk is a block of `chunk_rows` rows of one file."""

    _decoder = staticmethod(decode_array)

    def _setup(self, metas: list[dict]) -> None:
        """metas: per file {n, ids (array or None), splits (array or None), labels {name: array}}."""
        self._meta = metas
        self.chunks = []
        self._chunk_pos: list[tuple[int, int]] = []  # (file index, start row)
        for fi, m in enumerate(metas):
            for s in range(0, m["n"], self.chunk_rows):
                n = min(self.chunk_rows, m["n"] - s)
                self.chunks.append(
                    Chunk(len(self.chunks), self.files[fi], n, f"{self.files[fi]} rows {s}..{s + n - 1}")
                )
                self._chunk_pos.append((fi, s))
        names: list[str] = []
        for m in metas:
            names += [k for k in m["labels"] if k not in names]
        self.label_columns = names

    def _id(self, fi: int, row: int) -> str:
        ids = self._meta[fi]["ids"]
        if ids is not None:
            return str(to_python(ids[row]))
        stem = strip_ext(self.files[fi].rsplit("/", 1)[-1])
        return f"{stem}:{row}"

    def _split(self, fi: int, row: int, oid: str) -> str:
        splits = self._meta[fi]["splits"]
        if splits is None:
            return self._split_for(oid)
        return norm_split(to_python(splits[row]), f"{self.files[fi]} row {row}")

    def _chunk_keys(self, i):
        fi, s = self._chunk_pos[i]
        ids = [self._id(fi, s + r) for r in range(self.chunks[i].rows)]
        return ids, [self._split(fi, s + r, oid) for r, oid in enumerate(ids)]

    def _items(self, i, rows):
        fi, s = self._chunk_pos[i]
        self.chunk_reads += 1
        try:
            arrays = self._read_rows(fi, [s + r for r in rows])
        except decode_errors() as err:  # truncated / damaged file: the whole block is unreadable
            problem = (
                err.problem if isinstance(err, BadRecordError) else f"cannot read rows: {type(err).__name__}: {err}"
            )
            raise BadRecordError(self.files[fi], problem, s + rows[0]) from err
        m = self._meta[fi]
        out = []
        for r, arr in zip(rows, arrays, strict=True):
            row = s + r
            oid = self._id(fi, row)
            labels = {k: to_python(v[row]) for k, v in m["labels"].items()}
            out.append(Item(self.files[fi], row, oid, self._split(fi, row, oid), labels, arr))
        return out

    def _read_rows(self, fi: int, rows: list[int]) -> list[np.ndarray]:
        raise NotImplementedError

    @staticmethod
    def _side_arrays(get: Callable[[str], Any], names: Sequence[str], n: int, image_key: str, id_key: str):
        ids = splits = None
        labels = {}
        for name in names:
            if name == image_key:
                continue
            arr = get(name)
            if arr is None or getattr(arr, "ndim", 0) != 1 or len(arr) != n:
                continue
            if name == id_key:
                ids = arr
            elif name == "split":
                splits = arr
            else:
                labels[name] = arr
        return ids, splits, labels


class NpySource(_ArraySource):
    format = "npy"

    def __init__(self, location, fs, files, options: SourceOptions | None = None):
        super().__init__(location, fs, files, options)
        self._readers = []
        metas = []
        for f in files:
            local = f if is_local(fs) else None
            rd = _NpyRows(lambda f=f: fs.open(f, "rb"), local)
            if len(rd.shape) not in (3, 4):
                raise ValueError(f"{f}: .npy array has shape {rd.shape}; expected (N, H, W, C) or (N, H, W)")
            self._readers.append(rd)
            metas.append({"n": rd.shape[0], "ids": None, "splits": None, "labels": {}})
        self._setup(metas)

    def _read_rows(self, fi, rows):
        return self._readers[fi].rows(rows)


class NpzSource(_ArraySource):
    format = "npz"

    def __init__(self, location, fs, files, options: SourceOptions | None = None):
        super().__init__(location, fs, files, options)
        key = self.options.image_key or "images"
        id_key = self.options.id_column or "object_id"
        self._readers = []
        metas = []
        for f in files:
            with fs.open(f, "rb") as fh, zipfile.ZipFile(fh) as zf:
                members = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            if key not in members:
                raise ValueError(f"{f}: no array {key!r} in the .npz (arrays: {members}); pass image_key")

            def opener(f=f, key=key):
                fh = fs.open(f, "rb")
                zf = zipfile.ZipFile(fh)
                member = zf.open(key + ".npy")
                return _Closing(member, [zf, fh])

            rd = _NpyRows(opener)
            if len(rd.shape) not in (3, 4):
                raise ValueError(f"{f}: array {key!r} has shape {rd.shape}; expected (N, H, W, C) or (N, H, W)")
            self._readers.append(rd)
            with fs.open(f, "rb") as fh:
                z = np.load(fh, allow_pickle=False)
                side = {k: z[k] for k in members if k != key}
            ids, splits, labels = self._side_arrays(side.get, list(side), rd.shape[0], key, id_key)
            metas.append({"n": rd.shape[0], "ids": ids, "splits": splits, "labels": labels})
        self._setup(metas)

    def _read_rows(self, fi, rows):
        return self._readers[fi].rows(rows)


class _Closing:
    """File-like wrapper that also closes its parents (zip file, underlying file)."""

    def __init__(self, f, parents):
        self.f, self.parents = f, parents

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        for p in self.parents:
            p.close()


class Hdf5Source(_ArraySource):
    """HDF5 files: `images` (or `image`, the AstroCLIP layout) (N, H, W[, C]), optional `spectrum` (N, L[, 1]) with
    its grid as a `wavelength` dataset (L,) or attribute (of the spectrum dataset or the file), optional
    `spectrum_ivar`/`ivar` and `spectrum_mask` (N, L), a `has_spectrum` flag (rows without one get no spectrum),
    object ids (`object_id`, `targetid`, ... or `id_column`), `split` and 1-D label datasets of length N."""

    format = "hdf5"

    def __init__(self, location, fs, files, options: SourceOptions | None = None):
        super().__init__(location, fs, files, options)
        import h5py

        self._h5 = []
        self._spec: list[dict[str, Any] | None] = []  # per file: spectrum dataset names and grid
        metas = []
        key = self.options.image_key
        for f in files:
            h = h5py.File(f if is_local(fs) else fs.open(f, "rb"), "r")
            self._h5.append(h)
            names = [k for k in h if isinstance(h[k], h5py.Dataset)]
            key = key or ("images" if "images" in names or "image" not in names else "image")
            if key not in names:
                raise ValueError(f"{f}: no dataset {key!r} (datasets: {names}); pass image_key")
            ds = h[key]
            if ds.ndim not in (3, 4):
                raise ValueError(f"{f}: dataset {key!r} has shape {ds.shape}; expected (N, H, W, C) or (N, H, W)")
            if "bands" in ds.attrs and self.bands is None:
                self.bands = tuple(to_python(b) for b in np.atleast_1d(ds.attrs["bands"]))
            n = ds.shape[0]
            spec = self._spectrum_layout(f, h, names, n) if self.options.spectra else None
            self._spec.append(spec)
            taken = {key} | (set(spec["names"]) if spec else set(_HDF5_SPECTRAL))
            small = {k: h[k][()] for k in names if k not in taken and h[k].ndim == 1 and h[k].shape[0] == n}
            id_key = self.options.id_column or next((c for c in ID_COLUMNS if c in small), "object_id")
            ids, splits, labels = self._side_arrays(small.get, list(small), n, key, id_key)
            metas.append({"n": n, "ids": ids, "splits": splits, "labels": labels})
        self._key = key
        self._setup(metas)
        first = next((s for s in self._spec if s), None)
        if first is not None:
            self._set_spectrum_grid(first["wavelength"])

    def _spectrum_layout(self, f: str, h, names: list[str], n: int) -> dict[str, Any] | None:
        if "spectrum" not in names:
            return None
        ds = h["spectrum"]
        if ds.ndim == 3 and ds.shape[2] == 1:
            length = ds.shape[1]
        elif ds.ndim == 2:
            length = ds.shape[1]
        else:
            raise ValueError(f"{f}: dataset 'spectrum' has shape {ds.shape}; expected (N, L) or (N, L, 1)")
        if ds.shape[0] != n:
            raise ValueError(f"{f}: 'spectrum' has {ds.shape[0]} rows but the images {n}; they must be aligned")
        if "wavelength" in names:
            wave = h["wavelength"][()]
        elif "wavelength" in ds.attrs:
            wave = ds.attrs["wavelength"]
        elif "wavelength" in h.attrs:
            wave = h.attrs["wavelength"]
        elif self.options.wavelength is not None:
            wave = self.options.wavelength
        else:
            raise ValueError(
                f"{f}: 'spectrum' has no wavelength grid: add a 'wavelength' dataset (L,) or attribute, or pass "
                "wavelength= (the grid the spectra are on)"
            )
        wave = np.asarray(wave, dtype=np.float64).reshape(-1)
        if wave.size != length:
            raise ValueError(
                f"{f}: wrong length: 'spectrum' rows have {length} pixels but its wavelength grid {wave.size}"
            )
        out: dict[str, Any] = {"wavelength": wave, "names": ["spectrum", "wavelength"], "ivar": None, "mask": None}
        for what, cands in (("ivar", ("spectrum_ivar", "ivar")), ("mask", ("spectrum_mask",))):
            name = next((c for c in cands if c in names), None)
            if name is not None:
                if h[name].shape[:2] != ds.shape[:2]:
                    raise ValueError(f"{f}: {name!r} has shape {h[name].shape}, 'spectrum' {ds.shape}")
                out[what] = name
                out["names"].append(name)
        out["has"] = h["has_spectrum"][()].astype(bool) if "has_spectrum" in names else None
        return out

    def _items(self, i, rows):
        items = super()._items(i, rows)
        fi, _ = self._chunk_pos[i]
        spec = self._spec[fi]
        if spec is None:
            return items
        h = self._h5[fi]
        want = [it.row for it in items]
        flux = self._rows_of(h["spectrum"], want)
        ivar = self._rows_of(h[spec["ivar"]], want) if spec["ivar"] else [None] * len(want)
        mask = self._rows_of(h[spec["mask"]], want) if spec["mask"] else [None] * len(want)
        for it, fl, iv, m in zip(items, flux, ivar, mask, strict=True):
            if spec["has"] is not None and not spec["has"][it.row]:
                continue
            it.spectrum, it.spectrum_ivar, it.spectrum_mask = fl.reshape(-1), iv, m
            it.spectrum_wavelength = spec["wavelength"]
        return items

    @staticmethod
    def _rows_of(ds, rows: list[int]) -> list[np.ndarray]:
        uniq = sorted(set(rows))
        block = ds[uniq] if len(uniq) > 1 else ds[uniq[0] : uniq[0] + 1]  # h5py wants increasing indices
        pos = {j: k for k, j in enumerate(uniq)}
        return [np.array(block[pos[j]]) for j in rows]

    def _read_rows(self, fi, rows):
        return self._rows_of(self._h5[fi][self._key], rows)

    def close(self):
        super().close()
        for h in self._h5:
            h.close()
        self._h5 = []
