"""Base types of the readers: `Source` (chunks, keys, the bad-record policy, masked pixels, shape inference), `Chunk`
and `Item`. How to read is `SourceOptions` (`options`); the file-name conventions shared by the formats are in
`conventions`.

A format is a `Source` subclass in its own module (`files`, `arrays`, `parquet`; spectra go beside them) that
implements `_chunk_keys(i)` and `_items(i, rows)` and names its decoder (`astrolom.data.sources.decode`); it is
registered by its extensions in `conventions.EXTENSIONS` and by its name in `astrolom.data.sources.open`.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astrolom.data.records import SPLITS, Record, split_of
from astrolom.data.sources.decode import PixelRecord
from astrolom.data.sources.errors import BadRecordError, decode_errors
from astrolom.data.sources.options import SourceOptions
from astrolom.data.sources.spectra import SpectrumGrid, SpectrumRef
from astrolom.data.spectra import Spectrum, grid_coverage

log = logging.getLogger("astrolom.data")


@dataclass
class Chunk:
    """One unit of streaming: `rows` records of `file` (a row group, or a block of files / array rows)."""

    index: int
    file: str
    rows: int
    where: str  # human-readable location, e.g. "shard-0001.parquet row group 3"


@dataclass
class Item:
    """A row selected for decoding: everything but the pixels, plus what the decoder needs."""

    file: str
    row: int | None
    object_id: str
    split: str
    labels: dict[str, Any]
    payload: Any
    # flux on the data set's grid, a Spectrum, where to read one (a FITS file), or why it could not be read
    spectrum: np.ndarray | Spectrum | SpectrumRef | BadRecordError | None = None
    spectrum_ivar: np.ndarray | None = None
    spectrum_mask: np.ndarray | None = None
    spectrum_wavelength: np.ndarray | None = None  # the grid of a flux-array spectrum, when not the data set's


def bad_record(item: Item, err: BaseException, action: str = "cannot decode") -> BadRecordError:
    """The BadRecordError for `item` caused by `err` (kept as its `__cause__`, as `raise ... from err` would)."""
    if isinstance(err, BadRecordError):  # a decoder's own message: add the location it did not know
        out = BadRecordError(item.file, err.problem, item.row, item.object_id)
    else:
        out = BadRecordError(item.file, f"{action}: {type(err).__name__}: {err}", item.row, item.object_id)
    out.__cause__ = err
    return out


class Source:
    """A data set as a list of chunks of records. Use `open_source` to make one."""

    format: str = "?"

    def __init__(self, location: str, fs, files: list[str], options: SourceOptions | None = None):
        self.location = location
        self.fs = fs
        self.files = files
        self.options = opts = options if options is not None else SourceOptions()
        # resolved forms of the options the machinery reads on every chunk
        self.manifest = Path(opts.manifest) if opts.manifest is not None else None
        self.chunk_rows = int(opts.chunk_rows)
        self.threads = opts.decode_threads
        self.bands: tuple[str, ...] | None = None  # of the records (after `options.bands` selected some)
        self._stored_bands: tuple[str, ...] | None = None  # the data set's own, for payloads that name none
        self.image_shape: tuple[int, ...] | None = opts.expect_shape
        self._shape_given = opts.expect_shape is not None
        self.label_columns: list[str] = []
        self.metadata: dict[str, Any] = {}
        self.bad: list[dict[str, Any]] = []  # records skipped whole (skip_bad)
        self._bad_keys: set = set()
        self.bad_spectra: list[dict[str, Any]] = []  # records kept without their bad spectrum (skip_bad)
        self.partial_spectra: list[dict[str, Any]] = []  # {object_id, coverage} of spectra covering part of the grid
        self._partial_keys: set = set()
        self._bad_spectrum_keys: set = set()
        self.masked_pixels = 0
        self.masked_records = 0
        self.chunk_reads = 0  # number of chunk payload reads (for tests / diagnostics)
        self.key_reads = 0
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._keys_cache: collections.OrderedDict[int, tuple[list[str], list[str]]] = collections.OrderedDict()
        self.chunks: list[Chunk] = []
        # every spectrum goes onto one reference grid (see astrolom.data.sources.spectra)
        self.spectrum_grid = SpectrumGrid(opts.wavelength, opts.resample_spectra)
        self._own_grid: np.ndarray | None = None  # the grid flux arrays of this data set are stored on

    # -- to implement ----------------------------------------------------------------------------------------
    def _chunk_keys(self, i: int) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def _items(self, i: int, rows: Sequence[int]) -> list[Item]:
        raise NotImplementedError

    _decoder: Callable  # payload -> (array, max_value, bands); see astrolom.data.sources.decode
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
        """Records skipped whole as bad (skip_bad)."""
        return len(self.bad)

    @property
    def spectra_dropped(self) -> int:
        """Records kept image-only because their spectrum was bad (skip_bad)."""
        return len(self.bad_spectra)

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
        if self.bad_spectra:
            where = f" (listed in {self.manifest})" if self.manifest else ""
            parts.append(
                f"dropped {len(self.bad_spectra)} bad spectrum(s), keeping their records image-only{where}; "
                f"first: {self.bad_spectra[0]['reason']}"
            )
        if self.partial_spectra:
            low = min(self.partial_spectra, key=lambda e: e["coverage"])
            parts.append(
                f"{len(self.partial_spectra)} spectrum(s) cover only part of the model's wavelength grid (kept: the "
                f"overlap, the rest masked; label spectrum_coverage); least: {low['object_id']} "
                f"{100 * low['coverage']:.1f}%"
            )
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
        return split_of(object_id, self.options.split_fractions, self.options.split_seed)

    def _map(self, fn, items):
        if self._parallel_decode and self.threads > 1 and len(items) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="astrolom-decode")
            return list(self._pool.map(fn, items))  # map keeps input order: output is deterministic
        return [fn(it) for it in items]

    def _decode_one(self, item: Item):
        """Decoded payload, or the BadRecordError to raise for it (returned, not raised: this runs in the pool)."""
        try:
            return self._decoder(item.payload)
        except decode_errors() as err:  # damaged input is a bad record, reported with its location
            return bad_record(item, err)

    def _decode_items(self, items: list[Item], check_shape: bool) -> list[Record | None]:
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

    def _finish(self, item: Item, arr: np.ndarray, max_value: int | None, bands, check_shape: bool) -> Record:
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3:
            raise BadRecordError(item.file, f"image has shape {arr.shape}, expected (H, W, C)", item.row)
        if self.options.bands is not None:
            arr = arr[:, :, self._band_index(bands or self._stored_bands, arr.shape[2], item)]
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
            *spec, labels = self._spectrum(item)
            return PixelRecord(item.object_id, None, item.split, labels, *spec, pixels=arr, max_value=max_value)
        img = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(img).all():
            img = self._fill_masked(img, item)
        # after the image checks: a record skipped whole drops no spectrum separately
        *spec, labels = self._spectrum(item)
        return Record(item.object_id, img, item.split, labels, *spec)

    def _band_index(self, have, channels: int, item: Item) -> list[int]:
        """Channel indices of the requested bands (`options.bands`) in a payload whose bands are `have`, or a
        BadRecordError naming the file, the bands it has and the ones it lacks."""
        want = self.options.bands
        if not have:
            raise BadRecordError(
                item.file, f"cannot select bands {','.join(want)}: the file does not name its {channels} band(s)",
                item.row, item.object_id,
            )  # fmt: skip
        have = [str(b) for b in have]
        exact = {b: k for k, b in enumerate(have)}
        folded: dict[str, list[int]] = {}
        for k, b in enumerate(have):
            folded.setdefault(b.lower(), []).append(k)
        idx, missing = [], []
        for b in want:
            if b in exact:
                idx.append(exact[b])
            elif len(folded.get(b.lower(), [])) == 1:  # 'G' in a file that says 'g': the same band
                idx.append(folded[b.lower()][0])
            else:
                missing.append(b)
        if missing:
            raise BadRecordError(
                item.file,
                f"has no band {','.join(missing)} (bands asked for: {','.join(want)}); it has bands {','.join(have)}",
                item.row,
                item.object_id,
            )
        return idx

    def _spectrum(self, item: Item) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, dict]:
        """(flux, ivar, mask, labels) of the item's spectrum on the reference grid, or Nones (no spectrum / not
        read) and the item's labels.

        Every format's spectra pass here, so this is where a bad spectrum is handled: without skip_bad it raises its
        BadRecordError (the record is bad); with skip_bad only the spectrum is dropped (listed in `bad_spectra` and
        the manifest) and the record goes on image-only, like an object that has no spectrum.

        The labels are the item's plus what the spectrum file carries (an SDSS SPECOBJ redshift) and, for a spectrum
        that was not on the reference grid, `spectrum_coverage`: the fraction of the reference grid it covers
        (`astrolom.data.spectra.grid_coverage`; the rest is masked), also counted in `partial_spectra`.
        """
        if item.spectrum is None or not self.options.spectra:
            return None, None, None, item.labels
        grid = self._own_grid if item.spectrum_wavelength is None else item.spectrum_wavelength
        try:
            if isinstance(item.spectrum, BadRecordError):  # the spectrum could not be read (e.g. a paired file)
                raise item.spectrum
            flux, ivar, mask = self.spectrum_grid.flux_on_grid(
                item.spectrum, item.file, item.row, item.spectrum_ivar, item.spectrum_mask, grid=grid
            )
            return flux, ivar, mask, self._spectrum_labels(item, grid)
        except BadRecordError as err:
            if err.object_id is None:
                cause = err.__cause__
                err = BadRecordError(err.file, err.problem, err.row, item.object_id)
                err.__cause__ = cause
            if not self.options.skip_bad:
                raise err
            self._list_bad(err, "spectrum")
            return None, None, None, item.labels

    def _spectrum_labels(self, item: Item, grid: np.ndarray | None) -> dict[str, Any]:
        own = item.spectrum.wavelength if isinstance(item.spectrum, Spectrum) else grid
        ref = self.spectrum_grid.wavelength
        extra = dict(item.spectrum.meta.get("labels", {})) if isinstance(item.spectrum, Spectrum) else {}
        if own is not None and ref is not None and not self.spectrum_grid.is_reference(own):
            coverage = grid_coverage(own, ref)
            extra["spectrum_coverage"] = coverage
            if coverage < 1.0:
                with self._lock:
                    key = (item.file, item.row, item.object_id)
                    if key not in self._partial_keys:  # once per object, however many epochs read it
                        self._partial_keys.add(key)
                        self.partial_spectra.append({"object_id": item.object_id, "coverage": coverage})
        return {**item.labels, **extra} if extra else item.labels

    def _set_spectrum_grid(self, own: Any = None) -> None:
        """Fix the reference grid: the requested one, else `own` (the data set's); publish it as
        `metadata["wavelength"]` (what a spectra model reads)."""
        if own is not None:
            self._own_grid = np.asarray(own, dtype=np.float64)
        self.spectrum_grid.adopt(self._own_grid)
        if self.spectrum_grid.wavelength is not None:
            self.metadata["wavelength"] = self.spectrum_grid.wavelength.tolist()

    def _fill_masked(self, img: np.ndarray, item: Item) -> np.ndarray:
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
        if not self.options.skip_bad:
            raise err
        self._list_bad(err, "record")

    def _list_bad(self, err: BadRecordError, dropped: str) -> None:
        """Count and list (in `bad` or `bad_spectra`, and the manifest) a skipped record or a dropped spectrum, once
        however many epochs meet it. Manifest lines are {"file", "row", "object_id", "reason", "dropped"}."""
        if dropped == "record":
            listed, keys, key = self.bad, self._bad_keys, (err.file, err.row)
        else:  # a coadd's spectrum file serves many objects: the object is part of the key
            listed, keys, key = self.bad_spectra, self._bad_spectrum_keys, (err.file, err.row, err.object_id)
        with self._lock:
            if key in keys:
                return  # seen in an earlier epoch: skipped again, counted once
            keys.add(key)
            entry = {"file": err.file, "row": err.row, "object_id": err.object_id, "reason": str(err)}
            entry["dropped"] = dropped
            listed.append(entry)
            if self.manifest is not None:
                self.manifest.parent.mkdir(parents=True, exist_ok=True)
                with open(self.manifest, "a") as f:
                    f.write(json.dumps(entry) + "\n")
        what = "skipping bad record" if dropped == "record" else "dropping bad spectrum (record kept image-only)"
        if len(listed) == 1:
            counter = "source.skipped" if dropped == "record" else "source.spectra_dropped"
            log.warning("%s: %s (further ones are counted in %s)", what, err, counter)
        else:
            log.debug("%s: %s", what, err)

    def _peek_one(self, item: Item):
        """((H, W, C), bands) of an item, as cheaply as the format allows (default: decode it)."""
        res = self._decode_one(item)
        if isinstance(res, BadRecordError):
            return res
        shape = res[0].shape if res[0].ndim == 3 else (*res[0].shape, 1)
        return tuple(shape), res[2]

    def _infer_shape(self, sample: int = 8) -> None:
        """Reference shape = the most common (H, W, C) among the first decodable records (and their bands); with
        `options.bands`, records carry the selected bands (each file is checked when it is read)."""
        self._peek_shape(sample)
        self._stored_bands = self.bands
        if self.options.bands is not None:
            self.bands = self.options.bands
            if self.image_shape is not None and not self._shape_given:
                self.image_shape = (*self.image_shape[:2], len(self.options.bands))

    def _peek_shape(self, sample: int) -> None:
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
