"""Spectra in the readers: one FITS file per spectrum (DESI-coadd-like), and putting every spectrum on one grid.

**FITS spectra** (`read_fits_spectrum`), one object per file, in any of these layouts:

- image HDUs named `WAVELENGTH` (or `WAVE`, `LAMBDA`), `FLUX`, optional `IVAR` and `MASK` (MASK != 0 marks a bad
  pixel), each a 1-D array (a (1, L) array is flattened);
- DESI per-camera coadds: `B_WAVELENGTH`, `B_FLUX`, `B_IVAR`, optional `B_MASK`, the same for `R_` and `Z_`, the arms
  merged onto one grid (inverse-variance-weighted where they overlap, see `astrolom.data.sources.desi`). A file named
  `coadd-*.fits` may hold many targets: a paired spectra folder matches its rows to images by the TARGETID of its
  FIBERMAP (`spectrum_refs`), and the reader then reads one row;
- a binary table (the first one that has a flux column) with columns `wavelength`/`wave`/`lambda`/`loglam`
  (log10 Å), `flux`, optional `ivar`/`inverse_variance` (else `err`/`error`/`sigma`: ivar = 1/err², 0 where the
  error is not positive) and `mask`/`and_mask`/`qual` (non-zero = bad), case-insensitive; one row per pixel, or one
  row whose cells hold the arrays. This reads SDSS/BOSS `spec-*.fits` (COADD: loglam, flux, ivar, and_mask; the
  one-row SPECOBJ table's Z, Z_ERR, ZWARNING become the labels redshift, redshift_err, zwarning, in
  `meta["labels"]`) and ESO Phase 3 1-D spectra (one row of WAVE, FLUX, ERR, QUAL array cells).

Units come from the header (`BUNIT`, `TUNITn`) when present and go to `Spectrum.meta`.

**One grid** (`SpectrumGrid`): a data set's spectra all end up on one wavelength grid, the *reference grid* (the
model's, passed as `SourceOptions.wavelength`, else the data set's own: its metadata, or the first readable spectrum).
A spectrum on another grid is resampled onto it with the flux-conserving `astrolom.data.spectra.resample`
(`SourceOptions.resample_spectra=True`, the default) or refused (False) with a `BadRecordError` that names the file and
both grids. A spectrum that cannot be used is a bad record too (raised, or with `skip_bad` dropped and listed while
its record goes on image-only, see `Source._spectrum`): flux NaN everywhere, ivar 0 everywhere, every pixel masked, a
flux/ivar/mask length that differs from its wavelength grid (or from the data set's grid, for formats that store one
grid for all rows), a wavelength grid that is not strictly increasing. On the record, `spectrum` is the flux on the
reference grid with NaN at every pixel that carries no information (masked, ivar 0, outside the original coverage), so
that no later stage can train on it; `spectrum_ivar` (0 there) and `spectrum_mask` (True there) come with it.
"""

from __future__ import annotations

import gzip
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from astrolom.data.sources.desi import arm_names, coadd_target_ids, is_coadd_name, merge_arms, read_arms
from astrolom.data.sources.errors import BadRecordError, decode_errors
from astrolom.data.spectra import Spectrum, describe_grid, same_grid, to_grid

SPECTRUM_EXTENSIONS = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")
_WAVE = ("wavelength", "wave", "lambda")
_LOGLAM = ("loglam",)
_FLUX = ("flux",)
_IVAR = ("ivar", "inverse_variance")
_ERR = ("err", "error", "sigma")  # 1-sigma errors (ESO Phase 3): ivar = 1 / err^2
_MASK = ("mask", "and_mask", "qual")  # non-zero = bad: DESI MASK bits, SDSS and_mask, ESO QUAL
# SDSS/BOSS spec-*.fits: the pipeline's redshift fit for the object, from its one-row SPECOBJ table
SPECOBJ_LABELS = {"Z": "redshift", "Z_ERR": "redshift_err", "ZWARNING": "zwarning"}


def _pick(names: dict[str, str], candidates: tuple[str, ...]) -> str | None:
    return next((names[c] for c in candidates if c in names), None)


def _flat(a: Any, what: str, file: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise BadRecordError(file, f"{what} has shape {arr.shape}; expected a 1-D spectrum")
    return arr


def read_fits_spectrum(data: bytes | BinaryIO, file: str, row: int | None = None) -> Spectrum:
    """Parse one FITS spectrum (see the module docstring for the layouts) -> `Spectrum` with `meta["source"]=file`.

    Args:
        data: the file's bytes (optionally gzipped), or an open binary file (then a coadd reads only `row`).
        row: the target's row in a multi-target DESI per-camera coadd (`coadd_target_ids` gives the rows' ids).

    Raises:
        BadRecordError: naming `file`, for a file with no spectrum, mismatched lengths or a non-increasing grid.
        OSError / ValueError ...: from astropy for damaged bytes (the readers turn them into bad records).
    """
    from astropy.io import fits

    if isinstance(data, bytes | bytearray):
        if not data:
            raise BadRecordError(file, "spectrum file is empty (0 bytes)")
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        data = io.BytesIO(data)
    with fits.open(data, memmap=False, lazy_load_hdus=False) as hdul:
        ext = {(h.name or "").strip().lower(): h for h in hdul}
        if arm_names(ext):  # DESI per-camera coadd: B_/R_/Z_ extensions
            return merge_arms(read_arms(ext, file, row))
        if row is not None:
            raise BadRecordError(file, f"target row {row} asked for, but this is not a per-camera coadd")
        arrays: dict[str, np.ndarray] = {}
        units: dict[str, str] = {}
        if "flux" in ext and ext["flux"].is_image and ext["flux"].data is not None:
            hf = ext["flux"]
            arrays["flux"] = _flat(hf.data, "FLUX", file)
            if hf.header.get("BUNIT"):
                units["flux_unit"] = str(hf.header["BUNIT"])
            wave_hdu = _pick({k: k for k in ext}, _WAVE)
            if wave_hdu is None:
                raise BadRecordError(file, f"has a FLUX image HDU but no WAVELENGTH HDU (HDUs: {list(ext)})")
            arrays["wavelength"] = _flat(ext[wave_hdu].data, wave_hdu.upper(), file)
            if ext[wave_hdu].header.get("BUNIT"):
                units["wavelength_unit"] = str(ext[wave_hdu].header["BUNIT"])
            for key, cands in (("ivar", _IVAR), ("mask", _MASK)):
                name = _pick({k: k for k in ext}, cands)
                if name is not None and ext[name].data is not None:
                    arrays[key] = _flat(ext[name].data, name.upper(), file)
        else:
            tables = [h for h in hdul if isinstance(h, fits.BinTableHDU)]
            table = next((h for h in tables if any(c.lower() in _FLUX for c in h.columns.names)), None)
            if table is None:
                raise BadRecordError(
                    file, f"no spectrum: neither a FLUX image HDU nor a table with a flux column (HDUs: {list(ext)})"
                )
            cols = {c.lower(): c for c in table.columns.names}
            rows = table.data
            if len(rows) != 1 and rows[cols["flux"]].ndim == 2:
                raise BadRecordError(file, f"table {table.name} holds {len(rows)} spectra; expected one per file")

            def col(name: str) -> np.ndarray:
                v = rows[name]
                return _flat(v[0] if v.ndim == 2 else v, name, file)

            arrays["flux"] = col(cols["flux"])
            wave, loglam = _pick(cols, _WAVE), _pick(cols, _LOGLAM)
            if wave is not None:
                arrays["wavelength"] = col(wave)
            elif loglam is not None:
                arrays["wavelength"] = 10.0 ** col(loglam).astype(np.float64)
            else:
                raise BadRecordError(file, f"table {table.name} has a flux column but no wavelength/loglam column")
            for key, cands in (("ivar", _IVAR), ("mask", _MASK)):
                name = _pick(cols, cands)
                if name is not None:
                    arrays[key] = col(name)
            err = _pick(cols, _ERR)
            if "ivar" not in arrays and err is not None:
                arrays["ivar"] = _ivar_from_err(col(err))
            for c in table.columns:
                if c.unit and c.name.lower() in ("flux", *_WAVE):
                    units["flux_unit" if c.name.lower() == "flux" else "wavelength_unit"] = str(c.unit)
        labels = _specobj_labels(ext.get("specobj"))
        if labels:
            units["labels"] = labels
    return make_spectrum(arrays["wavelength"], arrays["flux"], arrays.get("ivar"), arrays.get("mask"), file, meta=units)


def _ivar_from_err(err: np.ndarray) -> np.ndarray:
    """1 / err^2, with 0 (no information) where the error is 0, negative or not finite."""
    e = np.asarray(err, dtype=np.float64)
    ok = np.isfinite(e) & (e > 0)
    return np.where(ok, 1.0 / np.where(ok, e, 1.0) ** 2, 0.0)


def _specobj_labels(hdu) -> dict[str, Any]:
    """Labels from an SDSS SPECOBJ table (one row): the pipeline redshift, its error and warning flags."""
    if hdu is None or hdu.is_image or hdu.data is None or len(hdu.data) != 1:
        return {}
    names = {c.upper(): c for c in hdu.columns.names}
    return {label: hdu.data[names[k]][0].item() for k, label in SPECOBJ_LABELS.items() if k in names}


def make_spectrum(
    wavelength: Any,
    flux: Any,
    ivar: Any = None,
    mask: Any = None,
    file: str = "spectrum",
    row: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Spectrum:
    """A `Spectrum` from raw arrays, or a `BadRecordError` naming `file` (and `row`) for wrong lengths or a grid that
    is not strictly increasing. A non-boolean mask counts every non-zero value as bad (DESI mask bits)."""
    wavelength = np.asarray(wavelength, dtype=np.float64).reshape(-1)
    flux = np.asarray(flux, dtype=np.float32).reshape(-1)
    n = wavelength.size
    for name, arr in (("flux", flux), ("ivar", ivar), ("mask", mask)):
        if arr is not None and np.asarray(arr).size != n:
            raise BadRecordError(file, f"wrong length: {name} has {np.asarray(arr).size} pixels, wavelength {n}", row)
    if n < 2 or not np.all(np.isfinite(wavelength)) or np.any(np.diff(wavelength) <= 0):
        bad = int(np.argmax(np.diff(wavelength) <= 0)) if n >= 2 else 0
        raise BadRecordError(
            file, f"wavelength grid is not finite and strictly increasing ({n} px; first problem at pixel {bad})", row
        )
    if ivar is not None:
        ivar = np.asarray(ivar, dtype=np.float32).reshape(-1)
        ivar = np.where(np.isfinite(ivar) & (ivar > 0), ivar, 0.0).astype(np.float32)  # NaN / negative: no information
    if mask is not None:
        mask = np.asarray(mask).reshape(-1) != 0
    return Spectrum(wavelength, flux, ivar, mask, meta={**(meta or {}), "source": file})


class SpectrumGrid:
    """Puts every spectrum of a data set on one reference grid (see the module docstring); counts what it did."""

    def __init__(self, wavelength: Any = None, resample: bool = True):
        self.wavelength = None if wavelength is None else np.asarray(wavelength, dtype=np.float64)
        self.resample = bool(resample)
        self.resampled = 0  # spectra that were on another grid
        self._seen: set[tuple[str, int | None]] = set()
        self._checked: np.ndarray | None = None
        self.grids: dict[str, int] = {}  # describe_grid of every foreign grid -> count
        self._lock = threading.Lock()

    def adopt(self, wavelength: Any) -> None:
        """Use `wavelength` as the reference grid when none is set yet (the data set's own grid)."""
        if self.wavelength is None and wavelength is not None:
            self.wavelength = np.asarray(wavelength, dtype=np.float64)

    def flux_on_grid(
        self,
        spectrum: Spectrum | np.ndarray,
        file: str,
        row: int | None = None,
        ivar: Any = None,
        mask: Any = None,
        grid: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flux with NaN at bad pixels, ivar, mask) on the reference grid, or a BadRecordError naming the file.

        Args:
            spectrum: a `Spectrum` on its own grid, or a flux array (with `ivar`, `mask`) on the data set's `grid`.
        """
        if isinstance(spectrum, Spectrum):
            file = spectrum.meta.get("source", file)  # e.g. the spectrum's own FITS file, not the image's
            row = spectrum.meta.get("row", row)  # and its row there (a target of a DESI coadd)
        else:
            grid = self.wavelength if grid is None else grid
            flux = np.asarray(spectrum, dtype=np.float32).reshape(-1)
            if grid is None:  # no grid known (e.g. Parquet without one in its metadata): check it, keep it as is
                return self._good_only(make_spectrum(np.arange(flux.size), flux, ivar, mask, file, row), file, row)
            if flux.size != grid.size:
                raise BadRecordError(
                    file,
                    f"wrong length: spectrum has {flux.size} pixels, the data set's wavelength grid "
                    f"({describe_grid(grid)}) has {grid.size}",
                    row,
                )
            if self.is_reference(grid):  # the common case (our Parquet, HDF5): no Spectrum object, no resampling
                return self._fast(flux, ivar, mask, grid, file, row)
            spectrum = make_spectrum(grid, flux, ivar, mask, file, row)
        _require_usable(spectrum, file, row)
        if self.wavelength is None:
            self.adopt(spectrum.wavelength)
        if not same_grid(spectrum.wavelength, self.wavelength):
            try:
                spectrum = to_grid(spectrum, self.wavelength, allow_resample=self.resample)
            except ValueError as err:
                raise BadRecordError(file, str(err).split(": ", 1)[-1], row) from err
            with self._lock:  # counted once per record, however often it is read (epochs)
                if (file, row) not in self._seen:
                    self._seen.add((file, row))
                    self.resampled += 1
                    key = spectrum.meta.get("resampled_from", "?")
                    self.grids[key] = self.grids.get(key, 0) + 1
            _require_usable(spectrum, file, row, " after resampling onto the reference grid")
        return self._good_only(spectrum, file, row)

    def is_reference(self, grid: np.ndarray) -> bool:
        """Whether `grid` is the reference grid (False while none is set)."""
        if self.wavelength is None:
            return False
        if grid is self.wavelength or grid is self._checked:
            return True
        if same_grid(grid, self.wavelength):
            self._checked = grid  # a data set passes the same grid array for every row: compare it once
            return True
        return False

    def _fast(self, flux, ivar, mask, grid, file, row) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`_good_only` for a flux array already on the reference grid."""
        iv = np.ones(flux.size, np.float32) if ivar is None else np.asarray(ivar, dtype=np.float32).reshape(-1)
        bad = ~np.isfinite(flux) | ~(iv > 0)  # NaN ivar counts as no information
        if mask is not None:
            m = np.asarray(mask).reshape(-1)
            if m.size != flux.size:
                raise BadRecordError(file, f"wrong length: mask has {m.size} pixels, wavelength {flux.size}", row)
            bad |= m != 0
        if iv.size != flux.size:
            raise BadRecordError(file, f"wrong length: ivar has {iv.size} pixels, wavelength {flux.size}", row)
        if bad.all():  # the slow path words the reason
            return self._good_only(make_spectrum(grid, flux, ivar, mask, file, row), file, row)
        return np.where(bad, np.float32(np.nan), flux), np.where(bad, np.float32(0), iv), bad

    @staticmethod
    def _good_only(spectrum: Spectrum, file: str, row: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        _require_usable(spectrum, file, row)
        good = spectrum.good
        flux = np.where(good, spectrum.flux, np.float32(np.nan)).astype(np.float32)
        return flux, np.where(good, spectrum.ivar, 0.0).astype(np.float32), ~good


def _require_usable(spectrum: Spectrum, file: str, row: int | None, when: str = "") -> None:
    try:
        spectrum.require_usable()
    except ValueError as err:
        raise BadRecordError(file, str(err).split(": ", 1)[-1] + when, row) from err


@dataclass(frozen=True)
class SpectrumRef:
    """Where an object's spectrum is: a FITS file, and the target's row when the file is a multi-target coadd."""

    file: str
    row: int | None = None

    def __str__(self) -> str:
        return self.file if self.row is None else f"{self.file} row {self.row}"


def spectrum_files(fs, root: str) -> dict[str, str]:
    """File stem (path relative to `root` without the FITS extension) -> spectrum file, for a folder of spectra."""
    root = root.rstrip("/")
    out = {}
    for f in sorted(fs.find(root)):
        name = f.rsplit("/", 1)[-1]
        low = name.lower()
        ext = next((e for e in sorted(SPECTRUM_EXTENSIONS, key=len, reverse=True) if low.endswith(e)), None)
        if ext is None or name.startswith("."):
            continue
        rel = f[len(root) + 1 :] if f.startswith(root + "/") else name
        out[rel[: -len(ext)]] = f
    return out


def spectrum_refs(
    fs,
    root: str,
    open_file: Callable[[str], BinaryIO],
    on_bad: Callable[[BadRecordError], None],
) -> tuple[dict[str, SpectrumRef], list[str]]:
    """Object id -> `SpectrumRef` for a folder of spectra, and the ids met again (the first file in path order wins).

    A file's object id is its stem (`spectrum_files`), except for multi-target DESI coadds (`coadd-*.fits`): each of
    their rows is the object named by its FIBERMAP TARGETID. A coadd whose index cannot be read goes to `on_bad`
    (which raises, or lists it under skip_bad).
    """
    refs: dict[str, SpectrumRef] = {}
    again: list[str] = []
    for stem, path in spectrum_files(fs, root).items():
        if is_coadd_name(path):
            try:
                with open_file(path) as fh:
                    ids = coadd_ids(fh, path)
            except decode_errors() as err:
                problem = err.problem if isinstance(err, BadRecordError) else f"{type(err).__name__}: {err}"
                out = BadRecordError(path, f"cannot index the coadd's targets: {problem}")
                out.__cause__ = err
                on_bad(out)
                continue
            pairs = [(oid, SpectrumRef(path, r)) for r, oid in enumerate(ids)]
        else:
            pairs = [(stem, SpectrumRef(path))]
        for oid, ref in pairs:
            if oid in refs:
                again.append(oid)
            else:
                refs[oid] = ref
    return refs, again


def coadd_ids(data: BinaryIO, file: str) -> list[str]:
    """The TARGETID (as an object id) of every row of a DESI per-camera coadd, read from its FIBERMAP."""
    from astropy.io import fits

    with fits.open(data, memmap=False, lazy_load_hdus=True) as hdul:
        return coadd_target_ids({(h.name or "").strip().lower(): h for h in hdul}, file)
