"""Read any supported data set as a stream of `Record`s: `astrolom inspect --data PATH` summarises one.

Every command's `--data` goes through `open_source(path, format=None)`, which detects (or is told) the layout:

========== =================================================================================================
format      what `path` may be
========== =================================================================================================
images      a folder (searched recursively), glob or single file of JPEG/PNG cutouts (e.g. DESI viewer
            cutouts). 8-bit pixels become float32 in [0, 1] (value / 255; 16-bit PNG: / 65535); RGB(A)/P
            images give 3 channels (alpha dropped), greyscale 1. The object id is the file path relative
            to the folder without its extension.
fits        a folder / glob / file of `.fits`, `.fit`, `.fts` (optionally `.gz`), one object per file: either a
            multi-extension file with one 2-D band per image HDU (stacked in HDU order) or one (C, H, W) cube,
            transposed to (H, W, C). Array rows are kept as astropy gives them (no flip).
npy         `.npy` of shape (N, H, W, C) (or (N, H, W)), read row by row from the file (memory-mapped when local).
npz         `.npz` holding `images` (N, H, W[, C]) and optionally `object_id`, `split` and 1-D label arrays.
hdf5        `.h5`/`.hdf5` with dataset `images` (or `image_key`) (N, H, W[, C]), optional `object_id`, `split`
            and 1-D label datasets of length N.
parquet     a file, folder of `*.parquet` or glob. Our layout (raw float32 `image` bytes + `image_shape`, see
            `astrolom.data.records`) and encoded layouts: an `image` column of raw JPEG/PNG bytes or a Hugging
            Face Image struct `{bytes, path}` (the Smith42/galaxies layout: `dr8_id` is used as object id and
            the other scalar columns become labels).
========== =================================================================================================

Paths may be local or any fsspec URL (`file://`, `memory://`, `s3://`, ...). Records without a split column get
`records.split_of(object_id, split_fractions, split_seed)`. Numeric arrays (FITS, npy, npz, HDF5, our Parquet) are
returned in their own units as float32; only encoded 8/16-bit images are rescaled to [0, 1].

**Streaming.** A Source is a list of *chunks* (a Parquet row group, or a block of `chunk_rows` files or array rows).
`chunk_keys(i)` gives the chunk's (object ids, splits) without touching any image, so split filtering and DDP rank
assignment are cheap; `read(i, rows)` decodes just the selected rows. Memory is bounded by one chunk's encoded
payload plus the rows being decoded.

**Decoding.** JPEG/PNG decode runs in a small thread pool (`threads`, default min(4, cores); PIL releases the GIL);
results keep their order, so output is deterministic. 8-bit images come back as `PixelRecord`s, which keep the uint8
pixels and compute the float32 `image` on first access (tokenisation works on the 4x smaller uint8 array).

**Masked pixels.** Non-finite pixels (NaN/inf, FITS BLANK) are replaced by the median of the finite pixels of the
same band; the totals are kept in `source.masked_pixels` / `source.masked_records` and shown by `inspect`.
A band with no finite pixel at all makes the record bad.

**Bad input.** A record that cannot be decoded (0-byte or truncated file, corrupt JPEG/PNG/FITS, all-NaN band) or
whose shape does not match the data set (the most common shape among the first records, or `expect_shape`) raises
`BadRecordError` (a ValueError) naming the file, the row (Parquet/HDF5/arrays) and the problem. With
`skip_bad=True` the record is skipped instead: counted in `source.skipped`, listed in `source.bad`, appended as one
JSON line `{"file", "row", "object_id", "reason"}` to `manifest` (when given) and summarised in the log.
Nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import io
import json
import logging
import os
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astrolom.data.records import IMAGE, IMAGE_SHAPE, METADATA_KEY, SPECTRUM, SPLITS, Record, split_of

log = logging.getLogger("astrolom.data")

FORMATS = ("images", "fits", "npy", "npz", "hdf5", "parquet")
_ALIASES = {
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
_EXTENSIONS = {
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
_ID_COLUMNS = ("object_id", "dr8_id", "objid", "object_name", "targetid", "TARGETID", "id")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}  # fmt: skip
DEFAULT_CHUNK_ROWS = 256


class BadRecordError(ValueError):
    """A record that cannot be used; the message names the file, the row (when there is one) and the problem."""

    def __init__(self, file: str, problem: str, row: int | None = None, object_id: str | None = None):
        self.file, self.problem, self.row, self.object_id = str(file), problem, row, object_id
        where = self.file if row is None else f"{self.file} row {row}"
        super().__init__(f"{where}: {problem}")


class PixelRecord(Record):
    """A Record decoded from 8/16-bit encoded pixels (JPEG/PNG).

    Behaves like any Record; `image` (float32, pixels / max_value) is made on first access. The integer `pixels` stay
    available so that tokenisation can work on the 4x smaller array (see `astrolom.data.stream.TokenBatches`).
    """

    def __init__(
        self,
        object_id: str,
        image: np.ndarray | None = None,
        split: str | None = None,
        labels: dict[str, Any] | None = None,
        spectrum: np.ndarray | None = None,
        *,
        pixels: np.ndarray | None = None,
        max_value: int = 255,
    ):
        self.object_id = object_id
        self.split = split
        self.labels = {} if labels is None else labels
        self.spectrum = spectrum
        self.pixels = pixels
        self.max_value = max_value
        self._image = image
        if image is None and pixels is None:
            raise ValueError("PixelRecord needs an image or pixels")

    @property
    def image(self) -> np.ndarray:  # type: ignore[override]
        if self._image is None:
            self._image = np.divide(self.pixels, np.float32(self.max_value), dtype=np.float32)
        return self._image

    @property
    def scale(self) -> float:
        """image = pixels * scale (up to float rounding: the image is computed as pixels / max_value)."""
        return 1.0 / self.max_value

    @image.setter
    def image(self, value: np.ndarray) -> None:
        self._image = value
        self.pixels = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple((self.pixels if self.pixels is not None else self._image).shape)


@dataclass
class Chunk:
    """One unit of streaming: `rows` records of `file` (a row group, or a block of files / array rows)."""

    index: int
    file: str
    rows: int
    where: str  # human-readable location, e.g. "shard-0001.parquet row group 3"


@dataclass
class _Item:
    """A row selected for decoding: everything but the pixels, plus what the decoder needs."""

    file: str
    row: int | None
    object_id: str
    split: str
    labels: dict[str, Any]
    payload: Any
    spectrum: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------------------------
# decoders: payload -> (array, max_value of integer pixels or None, bands or None);
# they may raise anything on failure: the caller wraps it in a BadRecordError naming the file and row


def _decode_encoded(data: bytes) -> tuple[np.ndarray, int | None, tuple[str, ...] | None]:
    from PIL import Image

    if data is None or len(data) == 0:
        raise BadRecordError("", "file is empty (0 bytes)")
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # forces the decode: truncated / corrupt data raise here
        mode = im.mode
        if mode == "RGB":
            return np.asarray(im), 255, ("R", "G", "B")
        if mode == "L":
            return np.asarray(im)[:, :, None], 255, ("L",)
        if mode.startswith("I;16"):
            return np.asarray(im).astype(np.uint16)[:, :, None], 65535, ("L",)
        if mode in ("I", "F"):
            return np.asarray(im).astype(np.float32)[:, :, None], None, ("L",)
        return np.asarray(im.convert("RGB")), 255, ("R", "G", "B")


def _peek_encoded(data: bytes):
    """Shape and bands of an encoded image from its header, without decoding the pixels (same rules as
    `_decode_encoded`)."""
    from PIL import Image

    if not data:
        raise BadRecordError("", "file is empty (0 bytes)")
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        grey = im.mode == "L" or im.mode.startswith("I;16") or im.mode in ("I", "F")
    return (h, w, 1 if grey else 3), (("L",) if grey else ("R", "G", "B"))


def _hdu_band(header, k: int) -> str:
    for key in ("BAND", "FILTER", "FILTNAM", "EXTNAME"):
        v = header.get(key)
        if isinstance(v, str) and v.strip():
            return v.strip()
    return f"band{k}"


def _decode_fits(data: bytes) -> tuple[np.ndarray, float | None, tuple[str, ...] | None]:
    from astropy.io import fits

    if data is None or len(data) == 0:
        raise BadRecordError("", "file is empty (0 bytes)")
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy's truncation warnings; the read below raises on real damage
        with fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False) as hdul:
            planes = []
            for k, hdu in enumerate(hdul):
                if not hdu.is_image or hdu.data is None:
                    continue
                arr = np.asarray(hdu.data)
                blank = hdu.header.get("BLANK")
                if arr.dtype.kind in "iu" and blank is not None:
                    arr = np.where(arr == blank, np.nan, arr.astype(np.float32))
                planes.append((arr.astype(np.float32), _hdu_band(hdu.header, k), hdu.header))
    if not planes:
        raise BadRecordError("", "no image data in any HDU")
    if len(planes) == 1 and planes[0][0].ndim == 3:  # one (C, H, W) cube
        cube, _, header = planes[0]
        bands = tuple(
            str(header.get(f"BAND{i + 1}", header.get(f"FILTER{i + 1}", f"band{i}"))) for i in range(len(cube))
        )
        return np.ascontiguousarray(cube.transpose(1, 2, 0)), None, bands
    if all(p[0].ndim == 2 for p in planes):
        shapes = {p[0].shape for p in planes}
        if len(shapes) > 1:
            raise BadRecordError("", f"image HDUs have different shapes {sorted(shapes)}")
        return np.stack([p[0] for p in planes], axis=-1), None, tuple(p[1] for p in planes)
    raise BadRecordError(
        "", f"unsupported FITS layout: image HDUs of {[p[0].shape for p in planes]} (want 2-D bands or one C,H,W cube)"
    )


def _decode_raw_f32(payload) -> tuple[np.ndarray, None, None]:
    data, shape = payload
    if data is None or len(data) == 0:
        raise BadRecordError("", "image is empty (0 bytes)")
    if shape is None or len(shape) not in (2, 3):
        raise BadRecordError("", f"image_shape {shape!r} is not [H, W, C]")
    n = int(np.prod(shape))
    if len(data) != 4 * n:
        raise BadRecordError("", f"image has {len(data)} bytes but image_shape {list(shape)} needs {4 * n}")
    return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32), None, None


def _decode_array(arr) -> tuple[np.ndarray, None, None]:
    return arr, None, None


# ----------------------------------------------------------------------------------------------------------------


def _strip_ext(name: str) -> str:
    low = name.lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if low.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def _kind_of(name: str) -> str | None:
    low = name.lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if low.endswith(ext):
            return _EXTENSIONS[ext]
    return None


def _norm_split(value, where: str) -> str:
    s = _SPLIT_ALIASES.get(str(value).strip().lower()) if value is not None else None
    if s is None:
        raise BadRecordError(where, f"split {value!r} is not one of {SPLITS} (or validation)")
    return s


def _py(v):
    """numpy scalar -> python scalar (labels stay JSON-friendly)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


class Source:
    """A data set as a list of chunks of records. Use `open_source` to make one."""

    format: str = "?"

    def __init__(
        self,
        location: str,
        fs,
        files: list[str],
        *,
        skip_bad: bool = False,
        manifest: str | Path | None = None,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        split_seed: int = 0,
        id_column: str | None = None,
        image_key: str | None = None,
        expect_shape: tuple[int | None, ...] | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        threads: int | None = None,
        spectra: bool = True,
    ):
        self.location = location
        self.load_spectra = spectra
        self.fs = fs
        self.files = files
        self.skip_bad = skip_bad
        self.manifest = Path(manifest) if manifest is not None else None
        self.split_fractions = tuple(split_fractions)
        self.split_seed = split_seed
        self.id_column = id_column
        self.image_key = image_key
        self.chunk_rows = int(chunk_rows)
        self.threads = max(1, min(4, os.cpu_count() or 1) if threads is None else int(threads))
        self.bands: tuple[str, ...] | None = None
        self.image_shape: tuple[int, ...] | None = tuple(expect_shape) if expect_shape is not None else None
        self._shape_given = expect_shape is not None
        self.label_columns: list[str] = []
        self.metadata: dict[str, Any] = {}
        self.bad: list[dict[str, Any]] = []
        self._bad_keys: set = set()
        self.masked_pixels = 0
        self.masked_records = 0
        self.chunk_reads = 0  # number of chunk payload reads (for tests / diagnostics)
        self.key_reads = 0
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._keys_cache: collections.OrderedDict[int, tuple[list[str], list[str]]] = collections.OrderedDict()
        self.chunks: list[Chunk] = []

    # -- to implement ----------------------------------------------------------------------------------------
    def _chunk_keys(self, i: int) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def _items(self, i: int, rows: Sequence[int]) -> list[_Item]:
        raise NotImplementedError

    _decoder: Callable = staticmethod(_decode_array)
    _parallel_decode = False  # PIL releases the GIL; astropy's warnings handling is not thread-safe

    # -- public API --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(c.rows for c in self.chunks)

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def channels(self) -> int | None:
        return None if self.image_shape is None else self.image_shape[-1]

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def chunk_keys(self, i: int) -> tuple[list[str], list[str]]:
        """(object ids, splits) of chunk i, in row order, without decoding any image."""
        hit = self._keys_cache.get(i)
        if hit is not None:
            self._keys_cache.move_to_end(i)
            return hit
        self.key_reads += 1
        keys = self._chunk_keys(i)
        self._keys_cache[i] = keys
        while len(self._keys_cache) > 8:
            self._keys_cache.popitem(last=False)
        return keys

    def read(self, i: int, rows: Sequence[int] | None = None) -> list[Record]:
        """Decode rows (indices within chunk i, in the order given; default all) -> Records (bad ones skipped
        when skip_bad, else BadRecordError)."""
        return [r for r in self.read_aligned(i, rows) if r is not None]

    def read_aligned(self, i: int, rows: Sequence[int] | None = None) -> list[Record | None]:
        """Like `read`, but one entry per requested row: None where a bad record was skipped."""
        if rows is None:
            rows = range(self.chunks[i].rows)
        rows = list(rows)
        if not rows:
            return []
        items = self._items(i, rows)
        return self._decode_items(items, check_shape=True)

    def records(self) -> Iterator[Record]:
        """All records in file order (no split filtering, no shuffling)."""
        for i in range(len(self.chunks)):
            for start in range(0, self.chunks[i].rows, 64):
                yield from self.read(i, range(start, min(start + 64, self.chunks[i].rows)))

    def split_counts(self) -> dict[str, int]:
        counts = collections.Counter()
        for i in range(len(self.chunks)):
            counts.update(self.chunk_keys(i)[1])
        return {s: counts.get(s, 0) for s in SPLITS}

    def describe(self) -> str:
        return (
            f"{self.format} data set {self.location}: {len(self)} records in {len(self.chunks)} chunks, "
            f"image shape {self.image_shape}, bands {self.bands}"
        )

    def log_summary(self) -> str | None:
        """Log (and return) a one-line summary of skipped bad records / replaced masked pixels, if any."""
        parts = []
        if self.bad:
            where = f" (listed in {self.manifest})" if self.manifest else ""
            parts.append(f"skipped {len(self.bad)} bad record(s){where}; first: {self.bad[0]['reason']}")
        if self.masked_pixels:
            parts.append(
                f"replaced {self.masked_pixels} masked/NaN pixel(s) in {self.masked_records} record(s) "
                "with the band median"
            )
        if not parts:
            return None
        line = f"{self.location}: " + "; ".join(parts)
        log.warning(line)
        return line

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    # -- shared machinery --------------------------------------------------------------------------------------
    def _split_for(self, object_id: str) -> str:
        return split_of(object_id, self.split_fractions, self.split_seed)

    def _map(self, fn, items):
        if self._parallel_decode and self.threads > 1 and len(items) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="astrolom-decode")
            return list(self._pool.map(fn, items))  # map keeps input order: output is deterministic
        return [fn(it) for it in items]

    def _decode_one(self, item: _Item):
        try:
            return self._decoder(item.payload)
        except BadRecordError as err:
            return BadRecordError(item.file, err.problem, item.row, item.object_id)
        except Exception as err:  # any decoder failure is a bad record, reported with its location
            return BadRecordError(item.file, f"cannot decode: {type(err).__name__}: {err}", item.row, item.object_id)

    def _decode_items(self, items: list[_Item], check_shape: bool) -> list[Record | None]:
        decoded = self._map(self._decode_one, items)
        out: list[Record | None] = []
        for item, res in zip(items, decoded, strict=True):
            try:
                if isinstance(res, BadRecordError):
                    raise res
                out.append(self._finish(item, *res, check_shape=check_shape))
            except BadRecordError as err:
                self._bad_record(err)
                out.append(None)
        return out

    def _finish(self, item: _Item, arr: np.ndarray, max_value: int | None, bands, check_shape: bool) -> Record:
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3:
            raise BadRecordError(item.file, f"image has shape {arr.shape}, expected (H, W, C)", item.row)
        if check_shape and self.image_shape is not None:
            want = self.image_shape
            if len(want) != 3 or any(w is not None and w != a for w, a in zip(want, arr.shape, strict=True)):
                origin = "requested" if self._shape_given else "the data set's (most common among its first records)"
                what = "band count" if want[2] is not None and want[2] != arr.shape[2] else "image size"
                raise BadRecordError(
                    item.file,
                    f"wrong {what}: image shape (H, W, C) = {tuple(arr.shape)} does not match {origin} {tuple(want)}",
                    item.row,
                    item.object_id,
                )
        if max_value is not None and arr.dtype.kind == "u":
            return PixelRecord(
                item.object_id, None, item.split, item.labels, item.spectrum, pixels=arr, max_value=max_value
            )
        img = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(img).all():
            img = self._fill_masked(img, item)
        return Record(item.object_id, img, item.split, item.labels, item.spectrum)

    def _fill_masked(self, img: np.ndarray, item: _Item) -> np.ndarray:
        img = np.array(img, dtype=np.float32, copy=True)
        total = 0
        for c in range(img.shape[2]):
            band = img[:, :, c]
            bad = ~np.isfinite(band)
            n = int(bad.sum())
            if n == 0:
                continue
            if n == band.size:
                name = self.bands[c] if self.bands and c < len(self.bands) else c
                raise BadRecordError(
                    item.file, f"band {name} is entirely NaN/masked ({n} pixels)", item.row, item.object_id
                )
            band[bad] = np.median(band[~bad])
            total += n
        with self._lock:
            self.masked_pixels += total
            self.masked_records += 1
        return img

    def _bad_record(self, err: BadRecordError) -> None:
        if not self.skip_bad:
            raise err
        key = (err.file, err.row)
        with self._lock:
            if key in self._bad_keys:
                return  # seen in an earlier epoch: skipped again, counted once
            self._bad_keys.add(key)
            entry = {"file": err.file, "row": err.row, "object_id": err.object_id, "reason": str(err)}
            self.bad.append(entry)
            if self.manifest is not None:
                self.manifest.parent.mkdir(parents=True, exist_ok=True)
                with open(self.manifest, "a") as f:
                    f.write(json.dumps(entry) + "\n")
        if len(self.bad) == 1:
            log.warning("skipping bad record: %s (further ones are counted in source.skipped)", err)
        else:
            log.debug("skipping bad record: %s", err)

    def _peek_one(self, item: _Item):
        """((H, W, C), bands) of an item, as cheaply as the format allows (default: decode it)."""
        res = self._decode_one(item)
        if isinstance(res, BadRecordError):
            return res
        shape = res[0].shape if res[0].ndim == 3 else (*res[0].shape, 1)
        return tuple(shape), res[2]

    def _infer_shape(self, sample: int = 8) -> None:
        """Reference shape = the most common (H, W, C) among the first decodable records (and their bands)."""
        if not self.chunks:
            return
        seen: list[tuple[tuple, Any]] = []
        for i in range(len(self.chunks)):
            rows = range(min(sample, self.chunks[i].rows))
            items = self._items(i, rows)
            for res in self._map(self._peek_one, items):
                if not isinstance(res, BadRecordError):
                    seen.append(res)
            if len(seen) >= min(sample, 3):
                break
        if not seen:
            return
        counts = collections.Counter(s for s, _ in seen)
        best = max(counts, key=lambda s: (counts[s], -[x for x, _ in seen].index(s)))
        if self.image_shape is None:
            self.image_shape = best
        if self.bands is None:
            self.bands = next((b for s, b in seen if s == best and b), None)


# --------------------------------------------------------------------------------------------------------- files


class _FileSource(Source):
    """One file per record (JPEG/PNG or FITS); a chunk is a block of `chunk_rows` files."""

    def __init__(self, location, fs, files, root: str | None, **kw):
        super().__init__(location, fs, files, **kw)
        self.root = root
        self.ids = [self._id_of(f) for f in files]
        n = self.chunk_rows
        self.chunks = [
            Chunk(k, files[s], min(n, len(files) - s), f"files {s}..{min(s + n, len(files)) - 1}")
            for k, s in enumerate(range(0, len(files), n))
        ]

    def _id_of(self, f: str) -> str:
        rel = f
        if self.root and f.startswith(self.root.rstrip("/") + "/"):
            rel = f[len(self.root.rstrip("/")) + 1 :]
        else:
            rel = f.rsplit("/", 1)[-1]
        return _strip_ext(rel)

    def _chunk_keys(self, i):
        s = i * self.chunk_rows
        ids = self.ids[s : s + self.chunks[i].rows]
        return ids, [self._split_for(x) for x in ids]

    def _items(self, i, rows):
        s = i * self.chunk_rows
        self.chunk_reads += 1
        out = []
        for r in rows:
            f = self.files[s + r]
            oid = self.ids[s + r]
            out.append(_Item(f, None, oid, self._split_for(oid), {}, f))
        return out

    def _decode_one(self, item: _Item):
        try:
            with self.fs.open(item.file, "rb") as fh:
                data = fh.read()
        except Exception as err:
            return BadRecordError(item.file, f"cannot read: {type(err).__name__}: {err}", None, item.object_id)
        return super()._decode_one(_Item(item.file, None, item.object_id, item.split, {}, data))


class ImageDirSource(_FileSource):
    format = "images"
    _decoder = staticmethod(_decode_encoded)
    _parallel_decode = True

    def _peek_one(self, item: _Item):
        try:
            with self.fs.open(item.file, "rb") as fh:
                return _peek_encoded(fh.read())
        except BadRecordError as err:
            return BadRecordError(item.file, err.problem)
        except Exception as err:
            return BadRecordError(item.file, f"cannot read: {type(err).__name__}: {err}")


class FitsDirSource(_FileSource):
    format = "fits"
    _decoder = staticmethod(_decode_fits)


# -------------------------------------------------------------------------------------------------------- arrays


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
            return str(_py(ids[row]))
        stem = _strip_ext(self.files[fi].rsplit("/", 1)[-1])
        return f"{stem}:{row}"

    def _split(self, fi: int, row: int, oid: str) -> str:
        splits = self._meta[fi]["splits"]
        if splits is None:
            return self._split_for(oid)
        return _norm_split(_py(splits[row]), f"{self.files[fi]} row {row}")

    def _chunk_keys(self, i):
        fi, s = self._chunk_pos[i]
        ids = [self._id(fi, s + r) for r in range(self.chunks[i].rows)]
        return ids, [self._split(fi, s + r, oid) for r, oid in enumerate(ids)]

    def _items(self, i, rows):
        fi, s = self._chunk_pos[i]
        self.chunk_reads += 1
        try:
            arrays = self._read_rows(fi, [s + r for r in rows])
        except Exception as err:
            if isinstance(err, BadRecordError):
                err = BadRecordError(self.files[fi], err.problem, s + rows[0])
            else:
                err = BadRecordError(self.files[fi], f"cannot read rows: {type(err).__name__}: {err}", s + rows[0])
            raise err from None
        m = self._meta[fi]
        out = []
        for r, arr in zip(rows, arrays, strict=True):
            row = s + r
            oid = self._id(fi, row)
            labels = {k: _py(v[row]) for k, v in m["labels"].items()}
            out.append(_Item(self.files[fi], row, oid, self._split(fi, row, oid), labels, arr))
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

    def __init__(self, location, fs, files, **kw):
        super().__init__(location, fs, files, **kw)
        self._readers = []
        metas = []
        for f in files:
            local = f if _is_local(fs) else None
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

    def __init__(self, location, fs, files, **kw):
        super().__init__(location, fs, files, **kw)
        key = self.image_key or "images"
        id_key = self.id_column or "object_id"
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
    format = "hdf5"

    def __init__(self, location, fs, files, **kw):
        super().__init__(location, fs, files, **kw)
        import h5py

        self._h5 = []
        key = self.image_key or "images"
        id_key = self.id_column or "object_id"
        metas = []
        for f in files:
            h = h5py.File(f if _is_local(fs) else fs.open(f, "rb"), "r")
            self._h5.append(h)
            if key not in h or not isinstance(h[key], h5py.Dataset):
                names = [k for k in h if isinstance(h[k], h5py.Dataset)]
                raise ValueError(f"{f}: no dataset {key!r} (datasets: {names}); pass image_key")
            ds = h[key]
            if ds.ndim not in (3, 4):
                raise ValueError(f"{f}: dataset {key!r} has shape {ds.shape}; expected (N, H, W, C) or (N, H, W)")
            if "bands" in ds.attrs and self.bands is None:
                self.bands = tuple(_py(b) for b in np.atleast_1d(ds.attrs["bands"]))
            n = ds.shape[0]
            names = [k for k in h if isinstance(h[k], h5py.Dataset)]
            small = {k: h[k][()] for k in names if k != key and h[k].ndim == 1 and h[k].shape[0] == n}
            ids, splits, labels = self._side_arrays(small.get, list(small), n, key, id_key)
            metas.append({"n": n, "ids": ids, "splits": splits, "labels": labels})
        self._key = key
        self._setup(metas)

    def _read_rows(self, fi, rows):
        ds = self._h5[fi][self._key]
        uniq = sorted(set(rows))
        block = ds[uniq] if len(uniq) > 1 else ds[uniq[0] : uniq[0] + 1]  # h5py wants increasing indices
        pos = {j: k for k, j in enumerate(uniq)}
        return [np.array(block[pos[j]]) for j in rows]

    def close(self):
        super().close()
        for h in self._h5:
            h.close()
        self._h5 = []


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


# ------------------------------------------------------------------------------------------------------- parquet


class ParquetSource(Source):
    """Parquet shards, our layout (raw float32 + image_shape) or encoded JPEG/PNG (raw bytes or HF Image struct)."""

    format = "parquet"

    def __init__(self, location, fs, files, **kw):
        super().__init__(location, fs, files, **kw)
        import pyarrow.parquet as pq

        self._pq = pq
        self._files_open: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._cached_chunk: tuple[int, Any] | None = None
        self.chunks = []
        self._chunk_pos: list[tuple[int, int, int]] = []  # (file index, row group, first row of the group in file)
        schema = None
        for fi, f in enumerate(files):
            pf = self._file(fi)
            md = pf.metadata
            if schema is None:
                schema = pf.schema_arrow
                raw_meta = (schema.metadata or {}).get(METADATA_KEY)
                if raw_meta:
                    try:
                        self.metadata = json.loads(raw_meta)
                    except ValueError:
                        self.metadata = {}
            start = 0
            for rg in range(md.num_row_groups):
                n = md.row_group(rg).num_rows
                if n:
                    self.chunks.append(Chunk(len(self.chunks), f, n, f"{f} row group {rg}"))
                    self._chunk_pos.append((fi, rg, start))
                start += n
        if schema is None:
            raise ValueError(f"{location}: no Parquet files")
        self._configure(schema)

    def _configure(self, schema) -> None:
        import pyarrow as pa

        names = schema.names
        self.image_col = self.image_key or IMAGE
        if self.image_col not in names:
            raise ValueError(
                f"{self.location}: no image column {self.image_col!r}; columns are {names}. "
                "Pass image_key (--image-key) to name it."
            )
        t = schema.field(self.image_col).type
        if pa.types.is_struct(t):
            if t.get_field_index("bytes") < 0:
                raise ValueError(f"{self.location}: image column is a struct without a 'bytes' field: {t}")
            self.layout = "hf-image-struct"
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
            self.layout = "raw-float32" if IMAGE_SHAPE in names else "encoded-bytes"
        else:
            raise ValueError(
                f"{self.location}: image column {self.image_col!r} has type {t}; expected raw float32 bytes with "
                f"{IMAGE_SHAPE!r}, JPEG/PNG bytes or a Hugging Face Image struct"
            )
        if self.id_column is not None:
            if self.id_column not in names:
                raise ValueError(f"{self.location}: no id column {self.id_column!r}; columns are {names}")
            self.id_col = self.id_column
        else:
            self.id_col = next((c for c in _ID_COLUMNS if c in names), None)
        self.split_col = "split" if "split" in names else None
        skip = {self.image_col, IMAGE_SHAPE, SPECTRUM, self.id_col, self.split_col}
        self.label_columns = []
        for name in names:
            if name in skip or name.startswith("__"):
                continue
            ft = schema.field(name).type
            if (
                pa.types.is_integer(ft)
                or pa.types.is_floating(ft)
                or pa.types.is_boolean(ft)
                or pa.types.is_string(ft)
                or pa.types.is_large_string(ft)
            ):
                self.label_columns.append(name)
        self.other_columns = [n for n in names if n not in skip and n not in self.label_columns]
        self.has_spectrum = SPECTRUM in names
        if self.layout == "raw-float32" and isinstance(self.metadata.get("bands"), list):
            self.bands = tuple(self.metadata["bands"])

    def _file(self, fi: int):
        pf = self._files_open.get(fi)
        if pf is None:
            f = self.files[fi]
            pf = self._pq.ParquetFile(f if _is_local(self.fs) else self.fs.open(f, "rb"))
            self._files_open[fi] = pf
            while len(self._files_open) > 4:
                _, old = self._files_open.popitem(last=False)
                old.close()
        else:
            self._files_open.move_to_end(fi)
        return pf

    def _columns(self, i: int, columns: list[str]):
        fi, rg, _ = self._chunk_pos[i]
        pf = self._file(fi)
        present = [c for c in columns if c in pf.schema_arrow.names]
        return pf.read_row_group(rg, columns=present)

    def _chunk_keys(self, i):
        fi, rg, start = self._chunk_pos[i]
        cols = [c for c in (self.id_col, self.split_col) if c]
        t = self._columns(i, cols) if cols else None
        n = self.chunks[i].rows
        if self.id_col:
            ids = [str(v) for v in t.column(self.id_col).to_pylist()]
        else:
            stem = _strip_ext(self.files[fi].rsplit("/", 1)[-1])
            ids = [f"{stem}:{start + r}" for r in range(n)]
        if self.split_col:
            where = self.chunks[i].where
            splits = [_norm_split(s, where) for s in t.column(self.split_col).to_pylist()]
        else:
            splits = [self._split_for(x) for x in ids]
        return ids, splits

    def _chunk_table(self, i: int):
        if self._cached_chunk is not None and self._cached_chunk[0] == i:
            return self._cached_chunk[1]
        self._cached_chunk = None  # drop the previous chunk before reading the next one
        cols = [self.image_col] + self.label_columns
        cols.append(IMAGE_SHAPE)
        if self.load_spectra:
            cols.append(SPECTRUM)
        self.chunk_reads += 1
        t = self._columns(i, cols)
        self._cached_chunk = (i, t)
        return t

    def _items(self, i, rows):
        import pyarrow as pa

        fi, rg, start = self._chunk_pos[i]
        ids, splits = self.chunk_keys(i)
        t = self._chunk_table(i).take(pa.array(rows, type=pa.int64()))
        img = t.column(self.image_col).to_pylist()
        shapes = t.column(IMAGE_SHAPE).to_pylist() if self.layout == "raw-float32" else None
        spectra = t.column(SPECTRUM).to_pylist() if self.has_spectrum and SPECTRUM in t.column_names else None
        labels = {c: t.column(c).to_pylist() for c in self.label_columns if c in t.column_names}
        f = self.files[fi]
        out = []
        for k, r in enumerate(rows):
            if self.layout == "raw-float32":
                payload = (img[k], shapes[k])
            elif self.layout == "hf-image-struct":
                payload = (img[k] or {}).get("bytes")
            else:
                payload = img[k]
            spec = None
            if spectra is not None and spectra[k] is not None:
                spec = np.frombuffer(spectra[k], dtype="<f4").astype(np.float32)
            out.append(
                _Item(f, start + r, ids[r], splits[r], {c: v[k] for c, v in labels.items()}, payload, spectrum=spec)
            )
        return out

    def _decode_one(self, item: _Item):
        if self.layout == "raw-float32":
            fn = _decode_raw_f32
        else:
            fn = _decode_encoded
        try:
            return fn(item.payload)
        except BadRecordError as err:
            return BadRecordError(item.file, err.problem, item.row, item.object_id)
        except Exception as err:
            return BadRecordError(item.file, f"cannot decode: {type(err).__name__}: {err}", item.row, item.object_id)

    def _peek_one(self, item: _Item):
        if self.layout == "raw-float32":
            return super()._peek_one(item)
        try:
            return _peek_encoded(item.payload)
        except Exception as err:
            return BadRecordError(item.file, f"cannot decode: {err}", item.row)

    @property
    def _parallel_decode(self):  # type: ignore[override]
        return self.layout != "raw-float32"

    def close(self):
        super().close()
        for pf in self._files_open.values():
            pf.close()
        self._files_open.clear()
        self._cached_chunk = None


# ---------------------------------------------------------------------------------------------------------- open


_CLASSES: dict[str, type[Source]] = {
    "images": ImageDirSource,
    "fits": FitsDirSource,
    "npy": NpySource,
    "npz": NpzSource,
    "hdf5": Hdf5Source,
    "parquet": ParquetSource,
}


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
    kinds = collections.Counter(k for k in (_kind_of(f) for f in files) if k)
    if not kinds:
        raise ValueError(
            f"{path}: found no file of a supported format ({', '.join(sorted(set(_EXTENSIONS)))}); "
            f"pass --format ({', '.join(FORMATS)})"
        )
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes formats {dict(kinds)}; pass --format to choose one ({', '.join(FORMATS)})")
    return next(iter(kinds))


def open_source(
    path: str | Path,
    format: str | None = None,
    *,
    skip_bad: bool = False,
    manifest: str | Path | None = None,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    split_seed: int = 0,
    id_column: str | None = None,
    image_key: str | None = None,
    expect_shape: tuple[int | None, ...] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    threads: int | None = None,
    spectra: bool = True,
) -> Source:
    """Open a data set (local path, glob or fsspec URL) in any supported format; see the module docstring.

    format: one of FORMATS (aliases: dir, jpeg, png, h5, ...) or None to detect from file extensions.
    expect_shape: (H, W, C) every record must have (None entries match anything); default: the most common
    shape among the first records. threads: decode threads for JPEG/PNG (default min(4, cores)).
    spectra: False skips reading spectra (image-only work such as pretraining and embedding reads less).
    """
    import fsspec

    if len(split_fractions) != 3 or abs(sum(split_fractions) - 1) > 1e-6 or min(split_fractions) < 0:
        raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, got {split_fractions}")
    path = str(path)
    fs, root = fsspec.core.url_to_fs(path)
    files, root_dir = _list_files(fs, root)
    if format is None:
        fmt = _detect(files, path)
    else:
        fmt = _ALIASES.get(format.lower(), format.lower())
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    chosen = [f for f in files if _kind_of(f) == fmt]
    if not chosen:
        if format is not None and len(files) == 1:
            chosen = files  # an explicitly named format for a file with an unusual extension
        else:
            raise ValueError(f"{path}: no {fmt} files found")
    kw = dict(
        skip_bad=skip_bad,
        manifest=manifest,
        split_fractions=tuple(split_fractions),
        split_seed=split_seed,
        id_column=id_column,
        image_key=image_key,
        expect_shape=expect_shape,
        chunk_rows=chunk_rows,
        threads=threads,
        spectra=spectra,
    )
    if fmt in ("images", "fits"):
        src = _CLASSES[fmt](path, fs, chosen, root_dir, **kw)
    else:
        src = _CLASSES[fmt](path, fs, chosen, **kw)
    src._infer_shape()
    src.chunk_reads = src.key_reads = 0  # count only what the caller reads
    return src


# ----------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data set: folder, file, glob or fsspec URL")
    parser.add_argument("--format", default=None, choices=sorted(set(FORMATS) | set(_ALIASES)), help="default: detect")
    parser.add_argument("--skip-bad", action="store_true", help="skip undecodable / mismatched records (listed)")
    parser.add_argument("--manifest", default=None, help="JSONL file to which skipped records are appended")
    parser.add_argument("--image-key", default=None, help="image column / dataset / array name (default: image(s))")
    parser.add_argument("--id-column", default=None, help="object id column / dataset (default: detected)")
    parser.add_argument("--show", type=int, default=4, help="number of records whose value ranges are printed")


def run(args: argparse.Namespace) -> int:
    src = open_source(
        args.data,
        args.format,
        skip_bad=args.skip_bad,
        manifest=args.manifest,
        image_key=args.image_key,
        id_column=args.id_column,
    )
    print(f"data:          {args.data}")
    print(f"format:        {src.format}" + (f" ({src.layout})" if isinstance(src, ParquetSource) else ""))
    print(f"files:         {len(src.files)}")
    print(f"records:       {len(src)} in {src.num_chunks} chunks")
    counts = src.split_counts()
    print("splits:        " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"image shape:   {src.image_shape} (H, W, C), dtype float32")
    print(f"bands:         {', '.join(map(str, src.bands)) if src.bands else 'unknown'}")
    print(f"label columns: {', '.join(src.label_columns) if src.label_columns else 'none'}")
    shown = 0
    for rec in src.records():
        if shown >= args.show:
            break
        img = rec.image
        ranges = ", ".join(f"[{img[..., c].min():.4g}, {img[..., c].max():.4g}]" for c in range(img.shape[2]))
        spec = "" if rec.spectrum is None else f", spectrum {rec.spectrum.shape[0]} px"
        print(f"  {rec.object_id} ({rec.split}): {tuple(img.shape)} per band min/max {ranges}{spec}")
        shown += 1
    summary = src.log_summary()
    if summary:
        print(summary)
    src.close()
    return 0
