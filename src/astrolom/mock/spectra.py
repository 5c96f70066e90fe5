"""Spectra: one catalogue object's DESI-like spectrum, with its ivar and mask (`observe_spectrum`).

DESI-like observed-frame grid 3600–9800 Å with 2 Å pixels (3101 pixels; DESI itself uses 0.8 Å,
7781 pixels — coarser here to keep shards small), flux in 1e-17 erg/s/cm²/Å of the light a fibre collects: the
same template mix, redshifted and flux-scaled, plus Hα, Hβ, [OII]3727, [OIII]4959,5007 and [NII]6548,6584 with
strengths from the SFR (Kennicutt 1998, dust-attenuated; [NII]/Hα set by the metallicity), velocity-broadened,
stellar absorption features (G band, Mg b, Fe, Na D) whose depth grows with metallicity and age, and Gaussian
noise with a blue/red rise and sky lines. Each spectrum comes with its ivar (1/σ² of the noise added) and a mask:
sky-line cores and a few cosmic-ray runs get ivar 0 and NaN flux. About 30% of objects have no
spectrum (missing at random, label `has_spectrum`; the spectrum columns are null). Labels `log_zstar`
(mass–metallicity relation) and `age_mw_gyr` (mass-weighted age of the template mix) describe the populations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import special

from astrolom.data.spectra import Spectrum
from astrolom.mock.catalogue import LINES
from astrolom.mock.instruments import SKY_LINES, SPEC_START, SPEC_STEP, SPEC_UNITS, spectrum_wavelength
from astrolom.mock.tables import get_tables

C_KMS = 299792.458
SKY_MASK_HALF_WIDTH = 2.0  # Å: pixels this close to a strong sky line are masked (sky-subtraction residuals)
BAD_PIXEL_RUNS = 2.0  # mean number of cosmic-ray / bad-column runs (1-3 px) per spectrum, also masked
# rest-frame absorption features: (vacuum Å, equivalent width in Å for an old solar-metallicity population).
# Kept modest (≲ 0.6% of a broad band) so the spectra still integrate to the catalogue magnitudes.
ABSORPTION = {
    "g_band": (4305.6, 3.0),
    "mg_b": (5178.1, 2.0),
    "fe_5270": (5271.5, 1.2),
    "fe_5335": (5336.6, 1.2),
    "na_d": (5895.6, 2.0),
}


def _noise_shape(wave: np.ndarray) -> np.ndarray:
    shape = 1.0 + 2.0 * np.exp(-(wave - SPEC_START) / 250.0) + 0.8 * np.clip((wave - 7000.0) / 2800.0, 0, None) ** 2
    for sl in SKY_LINES:
        shape += 3.0 * np.exp(-0.5 * ((wave - sl) / 1.5) ** 2)
    return shape


def _absorption(rest: np.ndarray, obj: Mapping[str, Any]) -> np.ndarray:
    """Multiplicative absorption-feature profile: deeper for metal-rich (EW ∝ Z^0.8) and old populations."""
    strength = 10 ** (0.8 * obj["log_zstar"]) * (0.3 + 0.7 * min(obj["age_mw_gyr"] / 8.0, 1.0))
    out = np.ones_like(rest)
    for lam, ew in ABSORPTION.values():
        sig = math.hypot(4.0, lam * obj["sigma_v"] / C_KMS)
        out -= ew * strength / (sig * math.sqrt(2 * math.pi)) * np.exp(-0.5 * ((rest - lam) / sig) ** 2)
    return out


def sky_line_mask(wave: np.ndarray | None = None) -> np.ndarray:
    """(L,) bool: pixels within SKY_MASK_HALF_WIDTH of a strong sky line (observed frame, the same for all)."""
    wave = spectrum_wavelength() if wave is None else wave
    return np.min(np.abs(wave[:, None] - np.asarray(SKY_LINES)[None, :]), axis=1) <= SKY_MASK_HALF_WIDTH


def spectrum_sigma(obj: Mapping[str, Any]) -> np.ndarray:
    """(L,) per-pixel noise sigma of an object's spectrum (1e-17 erg/s/cm²/Å): sky lines, blue and red ends."""
    return obj["spec_noise"] * _noise_shape(get_tables().wave)


def render_spectrum(obj: Mapping[str, Any], noise: bool = True, lines: bool = True, rng=None) -> np.ndarray:
    """Observed-frame spectrum (1e-17 erg/s/cm²/Å) on `spectrum_wavelength()`, float32 (no masking, see
    `observe_spectrum`)."""
    T = get_tables()
    if rng is None:
        rng = np.random.default_rng([int(obj["_seed"]), int(obj["_index"]), 2])
    wave = T.wave
    z = obj["redshift"]
    i0, w1 = int(obj["_t0"]), obj["_w1"]
    rest = wave / (1 + z)
    f10 = (1 - w1) * np.interp(rest, T.tmpl_wave, T.tmpl_flux[i0]) + w1 * np.interp(
        rest, T.tmpl_wave, T.tmpl_flux[i0 + 1]
    )
    aperture = float(obj.get("fiber_frac", 1.0))  # the fibre's share of the galaxy's light
    spec = aperture * f10 / (1 + z) * 10 ** (-0.4 * (obj["_abs_r"] + obj["_dist_mod"])) * 1e17
    if "log_zstar" in obj:
        spec = spec * _absorption(rest, obj)
    if lines:
        edges = np.concatenate([wave - SPEC_STEP / 2, [wave[-1] + SPEC_STEP / 2]])
        for name, (lam, _) in LINES.items():
            flux = aperture * obj[f"_line_{name}"]
            centre = lam * (1 + z)
            sig = math.hypot(centre * obj["sigma_v"] / C_KMS, 0.8)  # + ~0.8 Å instrumental
            if flux <= 0 or not (wave[0] - 10 * sig < centre < wave[-1] + 10 * sig):
                continue
            cdf = special.ndtr((edges - centre) / sig)
            spec += flux * np.diff(cdf) / SPEC_STEP
    if noise:
        spec = spec + spectrum_sigma(obj) * rng.standard_normal(wave.size)
    return spec.astype(np.float32)


def observe_spectrum(obj: Mapping[str, Any], noise: bool = True) -> Spectrum | None:
    """The spectrum as a survey delivers it, or None for objects without one (`has_spectrum` False).

    ivar = 1/sigma² of the noise actually added. Sky-line cores and a few random 1-3 pixel runs (cosmic rays, bad
    columns) are masked: ivar 0 (as in DESI coadds) and flux NaN, so that a reader which ignores ivar and mask
    cannot train on them either. Deterministic per object; the unmasked flux equals `render_spectrum(obj, noise)`.
    """
    if not obj.get("has_spectrum", True):
        return None
    rng = np.random.default_rng([int(obj["_seed"]), int(obj["_index"]), 2])
    flux = render_spectrum(obj, noise=noise, rng=rng)
    wave = get_tables().wave
    sigma = spectrum_sigma(obj)
    ivar = (1.0 / sigma**2).astype(np.float32)
    mask = sky_line_mask(wave)
    if noise:
        for _ in range(rng.poisson(BAD_PIXEL_RUNS)):
            start = int(rng.integers(wave.size))
            mask[start : start + int(rng.integers(1, 4))] = True
    flux[mask] = np.nan
    ivar[mask] = 0.0
    meta = {"source": str(obj["object_id"]), "flux_unit": SPEC_UNITS}
    return Spectrum(wave, flux, ivar=ivar, mask=mask, meta=meta)
