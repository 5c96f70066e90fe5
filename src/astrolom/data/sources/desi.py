"""DESI per-camera coadd files: one spectrum per target, its arms merged onto one grid.

A DESI `coadd-*.fits` file holds, per camera (arm) `B`, `R`, `Z`, the image HDUs `<ARM>_WAVELENGTH` (n_pix,),
`<ARM>_FLUX`, `<ARM>_IVAR` and optional `<ARM>_MASK` (n_targets, n_pix) (or 1-D for one target; `<ARM>_RESOLUTION` is
not read), and a `FIBERMAP` binary table with one row per target and its `TARGETID`. Any `<ARM>_FLUX` extension
counts as an arm, so a camera-merged `BRZ_*` file reads too.

**Merging the arms.** The arms are taken in order of their first wavelength; the merged grid is the first arm's
pixels followed by each next arm's pixels beyond the grid so far. Where arms overlap, a pixel is the
inverse-variance-weighted mean of the arms that have a good pixel there (MASK == 0, ivar > 0, finite flux):
f = Σ ivar_k f_k / Σ ivar_k with ivar = Σ ivar_k, so masked pixels never contribute. DESI's arms share one 0.8 Å
lattice, so overlapping pixels coincide and are combined as they are; an arm whose pixels fall between the grid's
is first resampled onto the overlap pixels with the flux-conserving `astrolom.data.spectra.resample`. The merged
spectrum then goes onto the model's grid like any other spectrum (`astrolom.data.sources.spectra.SpectrumGrid`).

Every problem (an arm without its WAVELENGTH or IVAR extension, lengths that differ, arms with different target
counts, a wavelength grid that is not strictly increasing) is a `BadRecordError` naming the file and the arm.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from astrolom.data.sources.errors import BadRecordError
from astrolom.data.spectra import Spectrum, resample

_ARM_FLUX = re.compile(r"^([a-z0-9]+)_flux$")
COADD_PREFIX = "coadd-"  # file names whose targets are matched to images by TARGETID


def arm_names(extensions) -> list[str]:
    """The arms (lower-case prefixes of `<ARM>_FLUX` HDUs) among lower-case extension names, in file order."""
    return [m.group(1) for m in map(_ARM_FLUX.match, extensions) if m]


def is_coadd_name(path: str) -> bool:
    """Whether a spectrum file is a multi-target DESI coadd by its name (`coadd-*.fits`)."""
    return path.rsplit("/", 1)[-1].lower().startswith(COADD_PREFIX)


def _targets_of(hdu, what: str, file: str) -> int:
    shape = hdu.shape
    if len(shape) == 1:
        return 1
    if len(shape) == 2:
        return shape[0]
    raise BadRecordError(file, f"{what} has shape {shape}; expected (n_pix,) or (n_targets, n_pix)")


def _row(hdu, row: int) -> np.ndarray:
    """One target's pixels, reading only that row from the file (`section`) for a 2-D HDU."""
    return np.asarray(hdu.data if len(hdu.shape) == 1 else hdu.section[row]).reshape(-1)


def coadd_target_ids(ext: dict[str, Any], file: str) -> list[str]:
    """TARGETID of every row of a per-camera coadd (its FIBERMAP), as object ids; checks the rows match the arms."""
    arms = arm_names(ext)
    if not arms:
        raise BadRecordError(file, f"not a per-camera DESI coadd: no <ARM>_FLUX extension (HDUs: {list(ext)})")
    fm = ext.get("fibermap")
    if fm is None or fm.is_image or "TARGETID" not in [c.upper() for c in fm.columns.names]:
        raise BadRecordError(file, f"coadd has no FIBERMAP table with a TARGETID column (HDUs: {list(ext)})")
    name = next(c for c in fm.columns.names if c.upper() == "TARGETID")
    ids = [str(int(t)) for t in fm.data[name]]
    n = _targets_of(ext[f"{arms[0]}_flux"], f"{arms[0].upper()}_FLUX", file)
    if n != len(ids):
        raise BadRecordError(file, f"FIBERMAP has {len(ids)} rows but {arms[0].upper()}_FLUX {n} targets")
    return ids


def read_arms(ext: dict[str, Any], file: str, row: int | None) -> list[Spectrum]:
    """The arms of target `row` (None: the file must hold one target) as `Spectrum`s on their own grids.

    Args:
        ext: lower-case extension name -> HDU of the open file.
    """
    arms = arm_names(ext)
    counts: dict[str, int] = {}
    out = []
    for arm in arms:
        a = arm.upper()
        for need in ("wavelength", "ivar"):
            if f"{arm}_{need}" not in ext:
                raise BadRecordError(file, f"arm {a}: missing extension {a}_{need.upper()} (HDUs: {list(ext)})")
        wave = np.asarray(ext[f"{arm}_wavelength"].data, dtype=np.float64).reshape(-1)
        hdus = {k: ext[f"{arm}_{k}"] for k in ("flux", "ivar", "mask") if f"{arm}_{k}" in ext}
        for k, hdu in hdus.items():
            counts[f"{a}_{k.upper()}"] = _targets_of(hdu, f"{a}_{k.upper()}", file)
        if len(set(counts.values())) > 1:
            raise BadRecordError(file, f"arms hold different numbers of targets: {counts}")
        n = counts[f"{a}_FLUX"]
        if row is None and n != 1:
            raise BadRecordError(
                file,
                f"holds {n} targets ({a}_FLUX has shape {hdus['flux'].shape}); expected one per file, or name it "
                f"{COADD_PREFIX}*.fits so that its targets are matched to images by the TARGETID of its FIBERMAP",
            )
        r = 0 if row is None else row
        if not 0 <= r < n:
            raise BadRecordError(file, f"target row {r} out of range: {a}_FLUX holds {n} targets")
        vals = {k: _row(hdu, r) for k, hdu in hdus.items()}
        for k, v in vals.items():
            if v.size != wave.size:
                raise BadRecordError(
                    file, f"arm {a}: wrong length: {a}_{k.upper()} has {v.size} pixels, {a}_WAVELENGTH {wave.size}"
                )
        if wave.size < 2 or not np.all(np.isfinite(wave)) or np.any(np.diff(wave) <= 0):
            bad = int(np.argmax(np.diff(wave) <= 0)) if wave.size >= 2 else 0
            raise BadRecordError(
                file, f"arm {a}: {a}_WAVELENGTH is not finite and strictly increasing (first problem at pixel {bad})"
            )
        ivar = np.asarray(vals["ivar"], dtype=np.float32)
        ivar = np.where(np.isfinite(ivar) & (ivar > 0), ivar, np.float32(0))  # NaN / negative: no information
        mask = vals["mask"] != 0 if "mask" in vals else None
        meta: dict[str, Any] = {"source": file, "arm": a} | ({} if row is None else {"row": row})
        for key, hdu in (("flux_unit", hdus["flux"]), ("wavelength_unit", ext[f"{arm}_wavelength"])):
            if hdu.header.get("BUNIT"):
                meta[key] = str(hdu.header["BUNIT"])
        out.append(Spectrum(wave, vals["flux"], ivar, mask, meta=meta))
    return out


def merge_arms(arms: list[Spectrum]) -> Spectrum:
    """One spectrum from overlapping arms (see the module docstring): inverse-variance-weighted in the overlaps."""
    arms = sorted(arms, key=lambda s: s.wavelength[0])
    first = arms[0]
    wave = first.wavelength
    good = first.good
    fsum = np.where(good, first.ivar.astype(np.float64) * first.flux, 0.0)  # Σ ivar f over good pixels
    isum = np.where(good, first.ivar, 0.0).astype(np.float64)  # Σ ivar over good pixels
    # where no arm has a good pixel: the first arm's own values, masked (keeps why it is unusable readable)
    raw_f, raw_i = first.flux.astype(np.float64), first.ivar.astype(np.float64)
    for arm in arms[1:]:
        idx = np.flatnonzero((wave >= arm.wavelength[0]) & (wave <= arm.wavelength[-1]))
        over = _on_pixels(arm, wave[idx])
        if over is not None:
            f, iv, g = over
            fsum[idx] += np.where(g, iv.astype(np.float64) * f, 0.0)
            isum[idx] += np.where(g, iv, 0.0)
        tail = arm.wavelength > wave[-1]
        g = arm.good[tail]
        wave = np.concatenate([wave, arm.wavelength[tail]])
        fsum = np.concatenate([fsum, np.where(g, arm.ivar[tail].astype(np.float64) * arm.flux[tail], 0.0)])
        isum = np.concatenate([isum, np.where(g, arm.ivar[tail], 0.0)])
        raw_f = np.concatenate([raw_f, arm.flux[tail]])
        raw_i = np.concatenate([raw_i, arm.ivar[tail]])
    ok = isum > 0
    flux = np.where(ok, fsum / np.where(ok, isum, 1.0), raw_f)
    meta = {k: v for k, v in first.meta.items() if k != "arm"}
    meta["arms"] = "".join(a.meta.get("arm", "?") for a in arms)
    return Spectrum(wave, flux, np.where(ok, isum, raw_i), ~ok, meta=meta)


def _on_pixels(arm: Spectrum, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(flux, ivar, good) of `arm` at the grid pixels `centres` inside its range: its own pixels when they coincide
    (DESI), else resampled flux-conserving; None when there is nothing to combine."""
    if centres.size == 0:
        return None
    j = np.clip(np.searchsorted(arm.wavelength, centres), 0, arm.wavelength.size - 1)
    step = float(np.median(np.diff(arm.wavelength)))
    if np.allclose(arm.wavelength[j], centres, rtol=0.0, atol=1e-6 * step):
        return arm.flux[j], arm.ivar[j], arm.good[j]
    if centres.size < 2:  # one misaligned pixel at the very edge: not worth a resampling grid
        return None
    on = resample(arm, centres)
    return on.flux, on.ivar, on.good
