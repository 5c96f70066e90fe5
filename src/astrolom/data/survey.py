"""Generate the embedded mock DESI Legacy Survey: g, r, z GalSim stamps, DESI-like spectra and true physics.

Every object is drawn from physics that hangs together:

- **Catalogue** (`sample_catalogue`, no rendering, ~20k objects/s): redshift from p(z) ∝ z² exp(-(z/z0)^1.5)
  (median ≈ 0.12, 0.01–0.5); stellar mass from a double-Schechter mass function (Baldry+12), truncated below the
  mass that an average galaxy at that redshift needs to reach r ≈ 19.5 (a Legacy/BGS-like bright, soft flux
  limit, so mass and redshift correlate as in a real flux-limited sample); quenched probability logistic in mass
  around log M = 10.5; log sSFR on the star-forming main sequence (-9.8 - 0.3 (log M - 10), 0.3 dex scatter) or
  quenched (-12 ± 0.4).
- **Colours and magnitudes**: the four GalSim CWW templates (E, Sbc, Scd, Im) are mixed by sSFR (quenched → E,
  star forming → Sbc…Im with rising sSFR), normalised by a Bell & de Jong (2003) colour-based r-band mass-to-light
  ratio, redshifted and integrated through the DECam g, r, z filters (speclite, AB). Template magnitudes are tabulated
  once on a redshift grid and interpolated. Distances: astropy Planck18. `abs_mag_*` are rest-frame (k-corrected with
  the same templates); `mag_*`, `g_minus_r`, `r_minus_z` are observed-frame DECam AB magnitudes (noise-free).
- **Morphology**: every galaxy is a Sérsic bulge (n_b 3–5.5 for quenched, 1.5–4 for star forming, quantised to
  0.5 so GalSim can cache its Hankel tables) plus an exponential disc. Quenched → bulge-dominated; star forming →
  discs with logarithmic spiral arms and star-forming clumps whose strength scales with sSFR, bars in some
  massive discs. Size–mass relations (r_e ∝ M^0.22 for discs, M^0.56 for early types, 0.15 dex scatter),
  angular size from the angular-diameter distance. Isotropic inclinations: disc axis ratio
  q = sqrt(cos² i (1 - q0²) + q0²), q0 = 0.18; `edge_on` = disc-dominated (B/T < 0.5) and i > 75°.
- **Galaxy-Zoo-like votes** from 40 simulated volunteers (binomial), depending on the true morphology *and* on how
  resolved and bright the galaxy is: `smooth`, `disc` (featured or disc), `artefact` (these three sum to 1), then
  `edge_on_vote` (among `disc` voters), `spiral` and `bar` (among face-on `disc` voters); 0 when nobody was asked.
- **Images**: per-object/per-band Moffat (β = 3) PSFs, sky noise plus source shot noise, pixel scale 0.262″,
  units nanomaggies (AB zero-point 22.5), float32 (H, W, C) with bands g, r, z. Smooth components are drawn
  in Fourier space with GalSim (exact Sérsic/Moffat transforms, pixel response) on a padded grid of fixed size,
  so the cost does not explode for large nearby galaxies; arms and clumps are added on the same grid. The galaxy
  sits at the stamp centre (the corner between the four central pixels) with ±0.5 px jitter. About 12% of stamps
  contain a contaminating star (a blackbody of the drawn colour).
- **Instrument realism: two telescopes** (`TELESCOPES`), split at dec = 32.375° as the Legacy Surveys are:
  'north' = BASS g, r (Bok 2.3 m, 90Prime camera) + MzLS z (Mayall 4 m, Mosaic-3), both at Kitt Peak; 'south' =
  DECaLS g, r, z (Blanco 4 m, DECam, Cerro Tololo). Labels are always on the DECam system. The north differs only
  in ways the real surveys differ, each switchable (`--instrument`, `INSTRUMENT_EFFECTS`; off = the south's value):

  - `filters`: north images are the same SED (template mix at its redshift; blackbodies for stars) integrated
    through speclite's BASS-g, BASS-r and MzLS-z curves instead of decam2014-g/r/z, so the north sees colour- and
    redshift-dependent offsets (g: +0.02 to +0.07 mag, r: ≈ +0.005, z: ≈ -0.006 for the galaxies here). Source:
    the filter curves shipped with speclite; the systems differ as described by Dey et al. (2019, AJ 157, 168)
    and Zou et al. (2017, PASP 129, 064101) for BASS.
  - `psf`: each camera its own seeing distribution: log-normal around the median delivered FWHM, one draw per
    camera (bands of one camera share nights and site; the north's z comes from another telescope than its g, r,
    so it has its own draw). Medians g, r, z: DECam 1.29″, 1.18″, 1.11″; BASS 1.61″, 1.47″ (the Bok is a smaller,
    older telescope); MzLS 1.01″ (the Mayall's z-band image quality is better than DECam's), so the north is
    blurrier in g, r and sharper in z. Values are rounded medians of the kind Dey et al. (2019) report per survey.
  - `depth`: 5σ point-source depths g, r, z: DECaLS 24.3, 23.8, 22.9; BASS 23.9, 23.4 (smaller aperture);
    MzLS 23.0 (rounded, after Dey et al. 2019's per-survey depth figures); 0.2 mag scatter per object and band.
  - `pixels`: 90Prime's 0.454″ pixels (Zou et al. 2017; Mosaic-3 and DECam have 0.262″) are resampled onto the
    0.262″ coadd grid with a Lanczos-3 kernel, as legacypipe does: the signal gets the wider native pixel response
    times the kernel's transfer function, and the noise is correlated (its power stops at the native Nyquist
    frequency; per-pixel sigma × `resampled_noise_factor(0.454)` ≈ 0.52 at the same depth). Aliasing of the
    native sampling is neglected.

  Not modelled (named so nobody looks for them): zero-point calibration offsets between the surveys, CCD
  artefacts, different sky levels (dark sky is taken as alike at both sites, `SKY_MAG`), and PSF shapes beyond a
  sheared Moffat. `benchmarks/telescope_islands.py` measures how visible each difference is in the pixels;
  `benchmarks/island_sensitivity.py` how much larger than the real one a difference must be for UMAP islands.
- **Spectra**: DESI-like observed-frame grid 3600–9800 Å with 2 Å pixels (3101 pixels; DESI itself uses 0.8 Å,
  7781 pixels — coarser here to keep shards small), flux in 1e-17 erg/s/cm²/Å of the light a fibre collects: the
  same template mix, redshifted and flux-scaled, plus Hα, Hβ, [OII]3727, [OIII]4959,5007 and [NII]6548,6584 with
  strengths from the SFR (Kennicutt 1998, dust-attenuated; [NII]/Hα set by the metallicity), velocity-broadened,
  stellar absorption features (G band, Mg b, Fe, Na D) whose depth grows with metallicity and age, and Gaussian
  noise with a blue/red rise and sky lines. Each spectrum comes with its ivar (1/σ² of the noise added) and a mask:
  sky-line cores and a few cosmic-ray runs get ivar 0 and NaN flux. About 30% of objects have no
  spectrum (missing at random, label `has_spectrum`; the spectrum columns are null). Labels `log_zstar`
  (mass–metallicity relation) and `age_mw_gyr` (mass-weighted age of the template mix) describe the populations.
- **Fibre aperture** (`--spectrum-aperture fiber`, the default; `total` gives the whole galaxy's light, the mock
  before 2026-12-02): DESI observes through 1.5″-diameter fibres (DESI Collaboration 2016, arXiv:1611.00037) and
  flux-calibrates on standard stars, i.e. for a point source's fibre losses, so an extended galaxy's spectrum carries
  its total flux × `fiber_frac` = acceptance(galaxy) / acceptance(point source), which is why DESI stellar masses
  need an aperture correction from photometry. `fiber_frac` is computed exactly (`fiber_fraction`: the fibre's
  light of the circularised bulge + disc, Fourier transforms from GalSim, convolved with a β = 3 Moffat of the
  night's seeing, `fiber_seeing`: log-normal around 1.1″, 0.2 scatter) for a fibre centred on the galaxy; the
  same factor scales continuum and lines (no colour or line-ratio gradients), the noise does not (S/N falls with
  it). Median 0.43 (1–99%: 0.06–0.85) for the default population. Line-flux labels stay totals.

- **JPEG mode** (`--format jpeg [--jpeg-size 512]`): the stamps as the paper's data were made, 8-bit RGB JPEGs rendered
  from g, r, z as the Legacy Survey viewer renders them (`astrolom.data.display.viewer_jpeg`, the viewer's `ls-dr9`
  layer: the same scaling for north and south), stored in the Smith42/galaxies Parquet layout (`image` =
  `{bytes, path}`) with the labels and spectra. `--size 512` gives the paper's 512x512 at 0.262"/px.

Determinism: each object's randomness derives from (seed, index) only, so an object is the same whatever the
number of objects, workers or shard size. Splits come from a hash of the object id (`records.split_of`).
The paper splits its 8.6M galaxies 98/1/1; the default here is 80/10/10 because the mock is usually small.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import integrate, special

from astrolom.data.display import JPEG_QUALITY, viewer_jpeg
from astrolom.data.records import (
    DEFAULT_SPLIT_FRACTIONS,
    IMAGE,
    IMAGE_SHAPE,
    METADATA_KEY,
    SPECTRUM,
    SPECTRUM_IVAR,
    SPECTRUM_MASK,
    Record,
    check_split_fractions,
    split_of,
)
from astrolom.data.spectra import Spectrum
from astrolom.log import progress as progress_bar

# ----------------------------------------------------------------------------------------------------------------
# constants
# ----------------------------------------------------------------------------------------------------------------
BANDS = ("g", "r", "z")
PIXEL_SCALE = 0.262  # arcsec / pixel (Legacy Surveys)
ZERO_POINT = 22.5  # nanomaggies
TEMPLATES = ("E", "Sbc", "Scd", "Im")
FILTER_NAMES = ("decam2014-g", "decam2014-r", "decam2014-z")
SPEC_START, SPEC_STOP, SPEC_STEP = 3600.0, 9800.0, 2.0
SPEC_UNITS = "1e-17 erg / (s cm2 Angstrom)"
N_VOLUNTEERS = 40
NORTH_DEC = 32.375  # deg: BASS/MzLS above, DECaLS below
Z_MIN, Z_MAX, Z0 = 0.01, 0.5, 0.085  # p(z) ∝ z² exp(-(z/z0)^1.5): median ≈ 1.41 z0 ≈ 0.12
LOGM_MIN, LOGM_MAX = 9.0, 11.8
R_LIMIT = 19.5  # soft bright-sample flux limit used to truncate the mass function at each redshift
M_SUN_R = 4.64  # AB absolute magnitude of the Sun in r
EDGE_ON_DEG = 75.0
DISC_Q0 = 0.18
C_KMS = 299792.458

# Telescopes: what differs between the north (BASS g, r on the Bok 2.3 m / 90Prime; MzLS z on the Mayall 4 m /
# Mosaic-3, both at Kitt Peak) and the south (DECaLS g, r, z on the Blanco 4 m / DECam at Cerro Tololo). Sources and
# the switch that turns each difference off are in the module docstring ("Instrument realism").
#   filters: speclite names of the filter curves the images are taken through (labels always stay on DECam);
#   fwhm: median delivered seeing per band (arcsec); seeing_scatter: log-normal scatter of the per-camera seeing;
#   camera: bands sharing a camera share their seeing draw (taken on the same nights and site);
#   depth: median 5-sigma point-source depth per band (AB); native_scale: the camera's pixel scale (arcsec), images
#   with a coarser native pixel are resampled (Lanczos-3) onto the 0.262" coadd grid, as the Legacy Surveys do.
TELESCOPES: dict[str, dict[str, tuple]] = {
    "north": {
        "filters": ("BASS-g", "BASS-r", "MzLS-z"),
        "camera": ("90Prime", "90Prime", "Mosaic-3"),
        "fwhm": (1.61, 1.47, 1.01),
        "seeing_scatter": (0.16, 0.16, 0.14),
        "depth": (23.9, 23.4, 23.0),
        "native_scale": (0.454, 0.454, 0.262),
    },
    "south": {
        "filters": FILTER_NAMES,
        "camera": ("DECam", "DECam", "DECam"),
        "fwhm": (1.29, 1.18, 1.11),
        "seeing_scatter": (0.12, 0.12, 0.12),
        "depth": (24.3, 23.8, 22.9),
        "native_scale": (PIXEL_SCALE, PIXEL_SCALE, PIXEL_SCALE),
    },
}
# Sky brightness (AB mag / arcsec², g r z): dark-time levels at Kitt Peak and Cerro Tololo are alike, so one value
# for both; it sets the source shot noise through the gain implied by the sky noise.
SKY_MAG = (22.0, 21.0, 19.8)
# The switchable instrument differences of the north ("survey --instrument"); a difference switched off makes the
# north take the south's value for it.
INSTRUMENT_EFFECTS = ("filters", "psf", "depth", "pixels")
LANCZOS_A = 3  # Lanczos-3 resampling kernel (legacypipe resamples every exposure onto the coadd grid with it)
# DESI spectra see a fibre, not the whole galaxy (see "Spectra" in the module docstring): 1.5" diameter fibres
# (107 um at the Mayall's prime focus), observed in the Mayall's own seeing, flux-calibrated on standard stars (point
# sources), so a galaxy's spectrum carries its total flux times fibre acceptance(galaxy) / acceptance(point source).
FIBER_DIAMETER = 1.5  # arcsec
FIBER_SEEING, FIBER_SEEING_SCATTER = 1.1, 0.2  # median delivered FWHM (arcsec) during spectroscopy; log-normal
IMAGE_FORMATS = ("flux", "jpeg")  # how stamps are stored: float32 nanomaggies, or viewer-rendered 8-bit JPEGs
JPEG_LAYER = "ls-dr9"  # the viewer layer whose rendering the JPEGs follow (astrolom.data.display.VIEWER_LAYERS)
SPECTRUM_APERTURES = ("fiber", "total")  # "total": the spectrum of the whole galaxy (the mock before fibres)

# Emission lines: vacuum wavelength (Å), Calzetti k(λ) for the attenuation.
LINES = {
    "oii_3727": (3728.48, 5.86),  # the doublet 3727.09/3729.88, blended at DESI-like resolution here
    "hb": (4862.68, 4.60),
    "oiii_4959": (4960.30, 4.47),
    "oiii_5007": (5008.24, 4.46),
    "nii_6548": (6549.86, 3.33),
    "ha": (6564.61, 3.33),
    "nii_6584": (6585.27, 3.32),
}
SKY_LINES = (5578.9, 5891.6, 6302.0, 6365.5, 7340.9, 7821.5, 8344.6, 8827.1, 8885.8, 9375.9, 9788.5)

# Labels written to the shards: name -> (unit, description). Order is the column order after object_id, split.
LABELS: dict[str, tuple[str, str]] = {
    "ra": ("deg", "right ascension"),
    "dec": ("deg", "declination; dec > 32.375 is the 'north' footprint"),
    "telescope": ("", "'north' (BASS/MzLS-like) or 'south' (DECaLS-like)"),
    "redshift": ("", "true redshift"),
    "log_mstar": ("log10 Msun", "stellar mass"),
    "log_ssfr": ("log10 1/yr", "specific star-formation rate"),
    "log_sfr": ("log10 Msun/yr", "star-formation rate"),
    "quenched": ("", "drawn as quenched (red sequence) rather than star forming"),
    "sed_type": ("", "template mix: 0 = E, 1 = Sbc, 2 = Scd, 3 = Im (CWW), linear in between"),
    "mag_g": ("AB mag", "apparent DECam g (total, noise-free)"),
    "mag_r": ("AB mag", "apparent DECam r (total, noise-free)"),
    "mag_z": ("AB mag", "apparent DECam z (total, noise-free)"),
    "g_minus_r": ("AB mag", "observed-frame g - r"),
    "r_minus_z": ("AB mag", "observed-frame r - z"),
    "abs_mag_g": ("AB mag", "rest-frame absolute DECam g (Planck18, k-corrected with the templates)"),
    "abs_mag_r": ("AB mag", "rest-frame absolute DECam r"),
    "abs_mag_z": ("AB mag", "rest-frame absolute DECam z"),
    "r_half_kpc": ("kpc", "half-light radius of the bulge+disc light (circularised, face-on), physical"),
    "r_half_arcsec": ("arcsec", "half-light radius on the sky (r_half_kpc / angular-diameter scale)"),
    "sersic_n": ("", "light-weighted Sérsic index: B/T * n_bulge + (1 - B/T) * 1"),
    "bulge_frac": ("", "bulge-to-total light ratio in r"),
    "axis_ratio": ("", "light-weighted projected axis ratio b/a of bulge and disc"),
    "inclination_deg": ("deg", "disc inclination (0 = face on); isotropic"),
    "position_angle_deg": ("deg", "major-axis position angle, from +x towards +y"),
    "edge_on": ("", "disc-dominated (B/T < 0.5) and inclination > 75 deg"),
    "arm_strength": ("", "fraction of the disc light in spiral arms (0 for quenched)"),
    "n_arms": ("", "number of spiral arms (0 when arm_strength = 0)"),
    "clump_frac": ("", "fraction of the disc light in star-forming clumps"),
    "has_bar": ("", "the disc has a bar"),
    "has_star": ("", "a contaminating star is in the stamp"),
    "psf_fwhm_g": ("arcsec", "Moffat (beta=3) PSF FWHM in g"),
    "psf_fwhm_r": ("arcsec", "Moffat PSF FWHM in r"),
    "psf_fwhm_z": ("arcsec", "Moffat PSF FWHM in z"),
    "noise_g": ("nanomaggies/pixel", "sky noise sigma per pixel in g (correlated in the resampled north g, r)"),
    "noise_r": ("nanomaggies/pixel", "sky noise sigma in r"),
    "noise_z": ("nanomaggies/pixel", "sky noise sigma in z"),
    "smooth": ("", "Galaxy-Zoo-like vote fraction: smooth (of 40 volunteers)"),
    "disc": ("", "vote fraction: featured or disc"),
    "artefact": ("", "vote fraction: star or artefact"),
    "edge_on_vote": ("", "vote fraction: edge-on, among the 'disc' voters (0 if none)"),
    "spiral": ("", "vote fraction: spiral arms, among face-on 'disc' voters (0 if none)"),
    "bar": ("", "vote fraction: bar, among face-on 'disc' voters (0 if none)"),
    "flux_ha": (
        "1e-17 erg/s/cm2",
        "observed (attenuated) total Halpha line flux (the spectrum holds fiber_frac of it)",
    ),
    "flux_hb": ("1e-17 erg/s/cm2", "observed Hbeta line flux"),
    "flux_oii": ("1e-17 erg/s/cm2", "observed [OII]3727 doublet flux"),
    "flux_oiii": ("1e-17 erg/s/cm2", "observed [OIII]5007 line flux"),
    "flux_nii": ("1e-17 erg/s/cm2", "observed [NII]6584 line flux"),
    "sigma_v": ("km/s", "emission-line velocity dispersion"),
    "spec_noise": ("1e-17 erg/s/cm2/A", "spectrum noise sigma per pixel at 6500 A"),
    "fiber_seeing": ("arcsec", "Moffat FWHM of the seeing while the spectrum was taken"),
    "fiber_frac": (
        "",
        "the spectrum's flux over the galaxy's total flux: fibre acceptance of the galaxy / of a point source "
        "(1 with --spectrum-aperture total)",
    ),
    "has_spectrum": (
        "",
        "the object has a spectrum (about 70%, missing at random); else the spectrum columns are null",
    ),
    "log_zstar": ("log10 Z/Zsun", "mass-weighted stellar metallicity (mass-metallicity relation)"),
    "age_mw_gyr": ("Gyr", "mass-weighted stellar age of the template mix at the galaxy's redshift"),
}
BOOL_LABELS = ("quenched", "edge_on", "has_bar", "has_star", "has_spectrum")
INT_LABELS = ("n_arms",)
STR_LABELS = ("telescope",)
COLUMNS = ("object_id", "split", *LABELS, IMAGE, IMAGE_SHAPE, SPECTRUM, SPECTRUM_IVAR, SPECTRUM_MASK)


def spectrum_wavelength() -> np.ndarray:
    """Observed-frame wavelength grid of the spectra (Å, vacuum): 3600, 3602, ..., 9800."""
    n = int(round((SPEC_STOP - SPEC_START) / SPEC_STEP)) + 1
    return SPEC_START + SPEC_STEP * np.arange(n)


def check_instrument(effects) -> tuple[str, ...]:
    """The instrument differences in canonical order; raises ValueError naming any unknown one."""
    if isinstance(effects, str):
        effects = parse_instrument(effects)
    effects = tuple(effects)
    bad = [e for e in effects if e not in INSTRUMENT_EFFECTS]
    if bad:
        raise ValueError(f"unknown instrument difference(s) {bad}; choose from {', '.join(INSTRUMENT_EFFECTS)} or none")
    return tuple(e for e in INSTRUMENT_EFFECTS if e in effects)


def parse_instrument(text: str) -> tuple[str, ...]:
    """'filters,psf' -> ('filters', 'psf'); 'all' -> every difference; 'none' or '' -> none; '-pixels' -> all but."""
    text = text.strip()
    if text in ("", "none"):
        return ()
    if text == "all":
        return INSTRUMENT_EFFECTS
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if all(p.startswith("-") for p in parts):
        drop = check_instrument([p[1:] for p in parts])
        return tuple(e for e in INSTRUMENT_EFFECTS if e not in drop)
    return check_instrument(parts)


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SurveyConfig:
    """Settings of one generated survey (the physics is fixed by the module constants)."""

    n: int = 2000
    size: int = 64
    seed: int = 0
    workers: int | None = None  # None: os.cpu_count()
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS
    shard_size: int = 1000
    # north/south instrument differences that are on (see INSTRUMENT_EFFECTS); () makes both telescopes alike
    instrument: tuple[str, ...] = INSTRUMENT_EFFECTS
    # 'fiber': spectra carry the light a 1.5" DESI fibre collects; 'total': the whole galaxy's (SPECTRUM_APERTURES)
    spectrum_aperture: str = "fiber"
    # 'flux': float32 g, r, z in nanomaggies; 'jpeg': 8-bit RGB JPEGs rendered as the Legacy Survey viewer renders
    # them (astrolom.data.display.viewer_jpeg), the form of the paper's training data (IMAGE_FORMATS)
    image_format: str = "flux"
    jpeg_size: int | None = None  # JPEG pixels per side (the paper's: 512); None: the stamp size

    def validate(self) -> SurveyConfig:
        self.instrument = check_instrument(self.instrument)
        self.spectrum_aperture = check_spectrum_aperture(self.spectrum_aperture)
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"--format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.jpeg_size is not None and self.image_format != "jpeg":
            raise ValueError("--jpeg-size needs --format jpeg")
        if self.jpeg_size is not None and not 16 <= self.jpeg_size <= 1024:
            raise ValueError(f"--jpeg-size must be in 16..1024 pixels, got {self.jpeg_size}")
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if not (32 <= self.size <= 512 and self.size % 2 == 0):
            raise ValueError(f"--size must be an even number of pixels in 32..512, got {self.size}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        self.split_fractions = check_split_fractions(self.split_fractions, "--split-fractions")
        return self


# ----------------------------------------------------------------------------------------------------------------
# precomputed tables (templates, filters, cosmology), built once per process
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Tables:
    z_grid: np.ndarray  # (Z,)
    dist_mod: np.ndarray  # (Z,) distance modulus
    lum_dist_cm: np.ndarray  # (Z,)
    kpc_per_arcsec: np.ndarray  # (Z,) proper kpc per arcsec
    maggies: np.ndarray  # (T, B, Z) observed maggies of each template (M_r = 0) at each z, before the DM term
    maggies_north: np.ndarray  # (T, B, Z) the same through the north's filters (BASS g, r; MzLS z)
    star_gr: np.ndarray  # (K,) DECam g - r of blackbody stars on a temperature grid (decreasing with temperature)
    star_north_offset: np.ndarray  # (B, K) north-filter minus DECam magnitude of those stars
    rest_mags: np.ndarray  # (T, B) rest-frame absolute magnitudes for M_r = 0 (so rest_mags[:, 1] == 0)
    tmpl_wave: np.ndarray  # (L,) rest-frame Å
    tmpl_flux: np.ndarray  # (T, L) erg/s/cm²/Å at 10 pc for M_r = 0
    mass_grid: np.ndarray  # (M,)
    mass_cdf: np.ndarray  # (M,)
    logm_limit: np.ndarray  # (Z,) mass at which a typical (Scd-like) galaxy has r = R_LIMIT
    wave: np.ndarray = field(default_factory=spectrum_wavelength)


def _load_templates() -> tuple[np.ndarray, np.ndarray]:
    import galsim

    sed_dir = Path(galsim.meta_data.share_dir) / "SEDs"
    wave = np.arange(900.0, 20000.0, 5.0)
    flux = []
    for name in TEMPLATES:
        w, f = np.loadtxt(sed_dir / f"CWW_{name}_ext.sed", comments="#").T
        flux.append(np.interp(wave, w, f))
    return wave, np.array(flux)


def _build_tables() -> _Tables:
    from astropy.cosmology import Planck18
    from speclite import filters as sfilters

    filt = sfilters.load_filters(*FILTER_NAMES)
    north_names = TELESCOPES["north"]["filters"]
    filt_north = sfilters.load_filters(*north_names)
    wave, flux = _load_templates()
    obs_wave = np.arange(3000.0, 11600.0, 4.0)

    def maggies_at(f_rest: np.ndarray, z: np.ndarray, north: bool = False) -> np.ndarray:
        spec = np.stack([np.interp(obs_wave / (1 + zz), wave, f_rest) / (1 + zz) for zz in np.atleast_1d(z)])
        fs, names = (filt_north, north_names) if north else (filt, FILTER_NAMES)
        t = fs.get_ab_maggies(spec, obs_wave)
        return np.stack([np.asarray(t[name], dtype=float) for name in names])  # (B, Z)

    # normalise each template to rest-frame absolute M_r = 0 at 10 pc
    for i in range(len(TEMPLATES)):
        flux[i] /= maggies_at(flux[i], np.array([0.0]))[1, 0]
    z_grid = np.linspace(0.0, 0.6, 601)
    maggies = np.stack([maggies_at(flux[i], z_grid) for i in range(len(TEMPLATES))])  # (T, B, Z)
    maggies_north = np.stack([maggies_at(flux[i], z_grid, north=True) for i in range(len(TEMPLATES))])

    # stars as blackbodies: their colour term between the two filter systems, against DECam g - r
    temp = np.geomspace(2500.0, 30000.0, 200)[::-1]
    lam_cm = obs_wave[None, :] * 1e-8
    bb = 1.0 / (lam_cm**5 * np.expm1(1.4387769 / (lam_cm * temp[:, None])))  # B_λ up to a constant, per Å
    bb = bb / bb.max(axis=1, keepdims=True)
    t_s, t_n = filt.get_ab_maggies(bb, obs_wave), filt_north.get_ab_maggies(bb, obs_wave)
    m_s = np.stack([-2.5 * np.log10(np.asarray(t_s[k], dtype=float)) for k in FILTER_NAMES])  # (B, K)
    m_n = np.stack([-2.5 * np.log10(np.asarray(t_n[k], dtype=float)) for k in north_names])
    rest_mags = -2.5 * np.log10(maggies[:, :, 0])

    zc = np.maximum(z_grid, 1e-4)
    dl = Planck18.luminosity_distance(zc).to("cm").value
    dist_mod = 5.0 * np.log10(Planck18.luminosity_distance(zc).to("pc").value / 10.0)
    kpc_as = Planck18.kpc_proper_per_arcmin(zc).value / 60.0

    # double Schechter stellar-mass function (Baldry et al. 2012), per dex
    mg = np.linspace(LOGM_MIN - 1.0, LOGM_MAX, 4001)
    x = 10 ** (mg - 10.66)
    phi = np.log(10) * np.exp(-x) * (3.96e-3 * x ** (1 - 0.35) + 0.79e-3 * x ** (1 - 1.47))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (phi[1:] + phi[:-1]) * np.diff(mg))])
    cdf /= cdf[-1]

    # soft flux limit: the mass an Scd-like galaxy needs to be at r = R_LIMIT at each z
    t_ref = 2
    gr_rest = rest_mags[t_ref, 0] - rest_mags[t_ref, 1]
    log_ml = _log_ml_r(gr_rest)
    abs_r_lim = R_LIMIT - dist_mod + 2.5 * np.log10(maggies[t_ref, 1])
    logm_limit = log_ml + (M_SUN_R - abs_r_lim) / 2.5

    return _Tables(
        z_grid=z_grid,
        dist_mod=dist_mod,
        lum_dist_cm=dl,
        kpc_per_arcsec=kpc_as,
        maggies=maggies,
        maggies_north=maggies_north,
        star_gr=m_s[0] - m_s[1],
        star_north_offset=m_n - m_s,
        rest_mags=rest_mags,
        tmpl_wave=wave,
        tmpl_flux=flux,
        mass_grid=mg,
        mass_cdf=cdf,
        logm_limit=logm_limit,
    )


_TABLES: _Tables | None = None


def _tables() -> _Tables:
    global _TABLES
    if _TABLES is None:
        _TABLES = _build_tables()
    return _TABLES


def _init_worker(tables: _Tables) -> None:
    """Pool initialiser: share the main process's tables; one OpenMP thread per worker (workers = cores)."""
    import galsim

    global _TABLES
    _TABLES = tables
    galsim.utilities.set_omp_threads(1)


def _log_ml_r(g_minus_r_rest):
    """Bell & de Jong (2003) r-band mass-to-light ratio from rest-frame g - r, shifted to a Chabrier IMF."""
    return -0.306 + 1.097 * np.asarray(g_minus_r_rest) - 0.093


# ----------------------------------------------------------------------------------------------------------------
# per-object randomness: counter-based, a pure function of (seed, index, column)
# ----------------------------------------------------------------------------------------------------------------
_U_COLUMNS = (
    "z mass quench ssfr sed size bt nb rbr cosi pa qb arms_n pitch arm_str clump bar bar_len dec ra "
    "seeing see_g see_r see_z depth_g depth_r depth_z psf_g1 psf_g2 star star_mag star_col sigv "
    "vote_s vote_a vote_e vote_sp vote_b spec_noise dust nii oiii jitter_x jitter_y seeing_cam2"
).split()  # (append new columns at the end: a column's stream depends on its position)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, index: np.ndarray) -> dict[str, np.ndarray]:
    """Uniforms in (0, 1), one per (object, named column), independent of how many objects are drawn."""
    with np.errstate(over="ignore"):
        base = _splitmix64(_splitmix64(np.full(index.shape, seed, dtype=np.uint64)) ^ index.astype(np.uint64))
        out = {}
        for j, name in enumerate(_U_COLUMNS):
            bits = _splitmix64(base + np.uint64(j + 1) * np.uint64(0xD1B54A32D192ED03))
            out[name] = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    return out


def _normal(u: np.ndarray) -> np.ndarray:
    return special.ndtri(u)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _binomial(u: np.ndarray, n: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Inverse-CDF binomial draws for n <= N_VOLUNTEERS (vectorised, deterministic in u)."""
    n = np.asarray(n).astype(np.int64)[:, None]
    p = np.clip(np.asarray(p, dtype=float), 0.0, 1.0)[:, None]
    k = np.arange(N_VOLUNTEERS + 1, dtype=np.int64)[None, :]
    with np.errstate(invalid="ignore"):
        cdf = np.where(k < n, special.bdtr(np.minimum(k, n), n, p), 1.0)
    return np.minimum((cdf < u[:, None]).sum(axis=1), n[:, 0]).astype(float)


def object_id(seed: int, index: int) -> str:
    return f"mls-{seed}-{index:09d}"


# ----------------------------------------------------------------------------------------------------------------
# the catalogue: all labels and render parameters, vectorised, no images
# ----------------------------------------------------------------------------------------------------------------
def sample_catalogue(
    n: int,
    seed: int = 0,
    start: int = 0,
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
    instrument: tuple[str, ...] = INSTRUMENT_EFFECTS,
    spectrum_aperture: str = "fiber",
) -> dict[str, np.ndarray]:
    """Draw the physics of objects start..start+n-1 (no rendering): a dict of equal-length arrays.

    Keys: `object_id`, `split`, every name in `LABELS`, and render parameters prefixed with '_'. Object i is the
    same whatever n and start are. `instrument` lists the north/south differences that are on (`INSTRUMENT_EFFECTS`);
    the physics and every label but the observing conditions are the same whatever it is. `spectrum_aperture`
    'fiber' (default) gives each spectrum the light a DESI fibre collects (`fiber_frac` of the total), 'total' the
    whole galaxy's light.
    """
    instrument = check_instrument(instrument)
    spectrum_aperture = check_spectrum_aperture(spectrum_aperture)
    T = _tables()
    idx = np.arange(start, start + n, dtype=np.int64)
    U = _uniforms(seed, idx)
    c: dict[str, np.ndarray] = {}
    c["_index"] = idx
    c["_seed"] = np.full(n, seed, dtype=np.int64)
    c["object_id"] = np.array([object_id(seed, int(i)) for i in idx], dtype=object)
    c["split"] = np.array([split_of(o, split_fractions) for o in c["object_id"]], dtype=object)

    # sky position and telescope: uniform on the sphere for -20 < dec < 80
    s_lo, s_hi = np.sin(np.radians(-20.0)), np.sin(np.radians(80.0))
    c["ra"] = 360.0 * U["ra"]
    c["dec"] = np.degrees(np.arcsin(s_lo + (s_hi - s_lo) * U["dec"]))
    north = c["dec"] > NORTH_DEC
    c["telescope"] = np.where(north, "north", "south").astype(object)

    # redshift: x = (z/z0)^1.5 ~ Gamma(2), truncated
    x_lo, x_hi = (Z_MIN / Z0) ** 1.5, (Z_MAX / Z0) ** 1.5
    p_lo, p_hi = special.gammainc(2, x_lo), special.gammainc(2, x_hi)
    z = Z0 * special.gammaincinv(2, p_lo + (p_hi - p_lo) * U["z"]) ** (2 / 3)
    c["redshift"] = z

    # stellar mass: mass function truncated below the soft flux limit at this z
    lim = np.interp(z, T.z_grid, T.logm_limit) - 0.3
    m_lo = np.clip(lim, LOGM_MIN, LOGM_MAX - 0.4)
    c_lo = np.interp(m_lo, T.mass_grid, T.mass_cdf)
    c_hi = np.interp(LOGM_MAX, T.mass_grid, T.mass_cdf)
    logm = np.interp(c_lo + (c_hi - c_lo) * U["mass"], T.mass_cdf, T.mass_grid)
    c["log_mstar"] = logm

    # star formation
    quenched = U["quench"] < _sigmoid((logm - 10.5) / 0.22)
    ssfr_sf = -9.8 - 0.3 * (logm - 10.0) + 0.3 * _normal(U["ssfr"])
    ssfr_q = -12.0 + 0.4 * _normal(U["ssfr"])
    c["quenched"] = quenched
    c["log_ssfr"] = np.where(quenched, ssfr_q, ssfr_sf)
    c["log_sfr"] = c["log_mstar"] + c["log_ssfr"]

    # SED: template index 0..3 (E, Sbc, Scd, Im)
    t_q = np.clip(0.25 - 0.2 * (logm - 10.8) + 0.12 * _normal(U["sed"]), 0.0, 0.7)
    t_sf = np.clip(1.0 + (c["log_ssfr"] + 10.4) / 0.55 + 0.15 * _normal(U["sed"]), 0.6, 3.0)
    sed_type = np.where(quenched, t_q, t_sf)
    c["sed_type"] = sed_type
    i0 = np.clip(np.floor(sed_type).astype(int), 0, len(TEMPLATES) - 2)
    w1 = sed_type - i0
    c["_t0"], c["_w1"] = i0, w1
    rest_maggies = (1 - w1)[:, None] * 10 ** (-0.4 * T.rest_mags[i0]) + w1[:, None] * 10 ** (-0.4 * T.rest_mags[i0 + 1])
    rest_col = -2.5 * np.log10(rest_maggies)  # (n, B), r column == 0
    log_ml = _log_ml_r(rest_col[:, 0] - rest_col[:, 1])
    abs_r = M_SUN_R - 2.5 * (logm - log_ml)
    c["abs_mag_g"] = abs_r + rest_col[:, 0]
    c["abs_mag_r"] = abs_r
    c["abs_mag_z"] = abs_r + rest_col[:, 2]
    c["_abs_r"] = abs_r
    dm = np.interp(z, T.z_grid, T.dist_mod)
    obs = np.empty((n, 3))
    sys_offset = np.zeros((n, 3))  # the north's filters: the same SED through BASS/MzLS minus DECam (mag)
    rows = np.arange(n)
    for b in range(3):
        mg_t = _interp_rows(z, T.z_grid, T.maggies[:, b])  # (n, T)
        mgz = (1 - w1) * mg_t[rows, i0] + w1 * mg_t[rows, i0 + 1]
        obs[:, b] = abs_r + dm - 2.5 * np.log10(mgz)
        mg_n = _interp_rows(z, T.z_grid, T.maggies_north[:, b])
        sys_offset[:, b] = -2.5 * np.log10(((1 - w1) * mg_n[rows, i0] + w1 * mg_n[rows, i0 + 1]) / mgz)
    c["mag_g"], c["mag_r"], c["mag_z"] = obs[:, 0], obs[:, 1], obs[:, 2]
    c["g_minus_r"] = obs[:, 0] - obs[:, 1]
    c["r_minus_z"] = obs[:, 1] - obs[:, 2]

    # structure: bulge + disc
    bt_q = 0.55 + 0.45 * special.betaincinv(3.0, 1.3, U["bt"])
    mfac = 0.6 + 0.4 * np.clip((logm - 9.0) / 2.5, 0.0, 1.0)
    bt_sf = 0.45 * special.betaincinv(1.3, 4.0, U["bt"]) * mfac
    bt = np.where(quenched, bt_q, bt_sf)
    n_b = np.where(quenched, 3.0 + 2.5 * U["nb"], 1.5 + 2.5 * U["nb"])
    n_b = np.round(n_b * 2.0) / 2.0  # quantised: GalSim caches one Hankel table per index
    c["bulge_frac"] = bt
    c["_n_bulge"] = n_b
    c["sersic_n"] = bt * n_b + (1.0 - bt)

    log_re_sf = 0.62 + 0.22 * (logm - 10.5)
    log_re_q = 0.50 + 0.56 * (logm - 10.8)
    r_kpc = 10 ** (np.where(quenched, log_re_q, log_re_sf) + 0.15 * _normal(U["size"]))
    c["r_half_kpc"] = r_kpc
    kpc_as = np.interp(z, T.z_grid, T.kpc_per_arcsec)
    c["_kpc_per_arcsec"] = kpc_as
    r_as = r_kpc / kpc_as
    c["r_half_arcsec"] = r_as
    ratio = np.where(quenched, 0.4 + 0.5 * U["rbr"], 0.15 + 0.25 * U["rbr"])  # r_bulge / r_disc
    hlr1 = _composite_hlr(bt, n_b, ratio)  # HLR for r_disc = 1
    c["_r_disc"] = r_as / hlr1
    c["_r_bulge"] = ratio * c["_r_disc"]

    cosi = U["cosi"]
    incl = np.degrees(np.arccos(cosi))
    q_d = np.sqrt(cosi**2 * (1 - DISC_Q0**2) + DISC_Q0**2)
    q_b = np.where(quenched, 1.0 - 0.5 * special.betaincinv(1.5, 2.5, U["qb"]), 0.7 + 0.3 * U["qb"])
    c["inclination_deg"] = incl
    c["_q_disc"], c["_q_bulge"] = q_d, q_b
    c["axis_ratio"] = bt * q_b + (1 - bt) * q_d
    c["position_angle_deg"] = 180.0 * U["pa"]
    is_disc = bt < 0.5
    c["edge_on"] = is_disc & (incl > EDGE_ON_DEG)

    # spiral arms, clumps, bars (star-forming discs)
    sf = ~quenched
    arm = np.clip(0.1 + 0.25 * (c["log_ssfr"] + 10.6) + 0.12 * _normal(U["arm_str"]), 0.0, 0.6)
    arm = np.where(sf & (arm > 0.05), arm, 0.0)
    c["arm_strength"] = arm
    c["n_arms"] = np.where(arm > 0, np.where(U["arms_n"] < 0.7, 2, np.where(U["arms_n"] < 0.9, 3, 4)), 0)
    c["_pitch_deg"] = 10.0 + 20.0 * U["pitch"]
    c["clump_frac"] = np.where(sf, np.clip(0.04 + 0.1 * (c["log_ssfr"] + 10.0), 0.0, 0.25) * U["clump"] * 2, 0.0)
    c["clump_frac"] = np.clip(c["clump_frac"], 0.0, 0.3)
    c["has_bar"] = is_disc & (logm > 9.8) & (U["bar"] < 0.35)
    c["_bar_len"] = 0.6 + 0.6 * U["bar_len"]  # bar half-light radius in disc half-light radii

    # observing conditions: each telescope's own seeing, depth, pixels and filters (see "Instrument realism")
    north_is = {e: north & (e in instrument) for e in INSTRUMENT_EFFECTS}  # north objects that get each difference
    S_, N_ = TELESCOPES["south"], TELESCOPES["north"]

    def per_tel(key: str, effect: str) -> np.ndarray:  # (n, B)
        return np.where(north_is[effect][:, None], np.array(N_[key], dtype=float), np.array(S_[key], dtype=float))

    fwhm0, scatter, depth0 = per_tel("fwhm", "psf"), per_tel("seeing_scatter", "psf"), per_tel("depth", "depth")
    c["_native_scale"] = per_tel("native_scale", "pixels")  # (n, B), popped into per-band keys below
    # one seeing draw per camera (its bands are taken on the same nights at one site); the north's z comes from
    # another telescope (Mayall) than its g and r (Bok), so it gets its own draw
    second_cam = north_is["psf"][:, None] & (np.array(N_["camera"]) != N_["camera"][0])[None, :]
    common = np.where(second_cam, _normal(U["seeing_cam2"])[:, None], _normal(U["seeing"])[:, None])
    sky = np.array(SKY_MAG)
    for b, band in enumerate(BANDS):
        fw = fwhm0[:, b] * np.exp(scatter[:, b] * common[:, b] + 0.04 * _normal(U[f"see_{band}"]))
        fw = np.clip(fw, 0.7, 3.5)
        c[f"psf_fwhm_{band}"] = fw
        depth = depth0[:, b] + 0.2 * _normal(U[f"depth_{band}"])
        # 5σ point-source depth with a Gaussian-equivalent noise-equivalent area 4πσ², for noise that is white at
        # the coadd's pixel scale; resampled (correlated) noise has the same power at low frequency, so the same
        # depth, and a smaller per-pixel sigma (the `noise_*` label), set below
        nea = 4 * np.pi * (fw / 2.3548 / PIXEL_SCALE) ** 2
        white = 10 ** (-0.4 * (depth - ZERO_POINT)) / 5.0 / np.sqrt(nea)
        c[f"_noise_white_{band}"] = white
        native = c["_native_scale"][:, b]
        c[f"_native_scale_{band}"] = native
        c[f"noise_{band}"] = white * np.array([resampled_noise_factor(float(s)) for s in native])
        sky_pix = 10 ** (-0.4 * (sky[b] - ZERO_POINT)) * PIXEL_SCALE**2
        c[f"_gain_{band}"] = sky_pix / white**2  # counts per nanomaggy implied by the sky noise
        c[f"_zp_offset_{band}"] = np.where(north_is["filters"], sys_offset[:, b], 0.0)
    del c["_native_scale"]
    c["_offset_x"] = U["jitter_x"] - 0.5  # sub-pixel position jitter (pixels)
    c["_offset_y"] = U["jitter_y"] - 0.5
    c["_psf_g1"] = 0.025 * _normal(U["psf_g1"])
    c["_psf_g2"] = 0.025 * _normal(U["psf_g2"])

    # contaminating star
    c["has_star"] = U["star"] < 0.12
    c["_star_mag_r"] = 17.5 + 4.0 * U["star_mag"]
    c["_star_gr"] = 0.3 + 1.1 * U["star_col"]
    for b, band in enumerate(BANDS):  # stars are blackbodies seen through the same filters as the galaxy
        off = np.interp(c["_star_gr"], T.star_gr, T.star_north_offset[b])
        c[f"_star_offset_{band}"] = np.where(north_is["filters"], off, 0.0)

    # Galaxy-Zoo-like votes
    resolved = _sigmoid((np.log(r_as / c["psf_fwhm_r"]) - np.log(0.7)) / 0.3)
    bright = _sigmoid((20.0 - c["mag_r"]) / 0.6)
    vis = resolved * bright
    discness = _sigmoid((0.45 - bt) / 0.07)
    p_art = 0.01 + 0.35 * c["has_star"] * _sigmoid((19.5 - c["_star_mag_r"]) / 0.6)
    edge_vis = _sigmoid((incl - 74.0) / 3.0) * discness
    p_feat = (1 - p_art) * np.clip(0.04 + 0.9 * discness * (0.25 + 0.75 * np.maximum(vis, edge_vis)), 0, 1)
    nv = np.full(n, N_VOLUNTEERS)
    k_s = _binomial(U["vote_s"], nv, 1 - p_feat - p_art)
    k_a = _binomial(U["vote_a"], nv - k_s, p_art / np.maximum(p_feat + p_art, 1e-9))
    k_d = nv - k_s - k_a
    c["smooth"], c["disc"], c["artefact"] = k_s / nv, k_d / nv, k_a / nv
    p_edge = 0.03 + 0.92 * _sigmoid((incl - 74.0) / 3.5) * discness
    k_e = _binomial(U["vote_e"], k_d, p_edge)
    c["edge_on_vote"] = np.where(k_d > 0, k_e / np.maximum(k_d, 1), 0.0)
    k_f = k_d - k_e  # face-on disc voters
    p_sp = 0.05 + 0.9 * _sigmoid((arm - 0.15) / 0.05) * (0.3 + 0.7 * vis)
    p_bar = 0.05 + 0.75 * c["has_bar"] * (0.2 + 0.8 * vis)
    c["spiral"] = np.where(k_f > 0, _binomial(U["vote_sp"], k_f, p_sp) / np.maximum(k_f, 1), 0.0)
    c["bar"] = np.where(k_f > 0, _binomial(U["vote_b"], k_f, p_bar) / np.maximum(k_f, 1), 0.0)

    # emission lines (observed fluxes, 1e-17 erg/s/cm²)
    dl = np.interp(z, T.z_grid, T.lum_dist_cm)
    a_ha = np.clip(0.35 + 0.55 * (logm - 10.0) + 0.2 * _normal(U["dust"]), 0.0, 2.5)
    l_ha = 1.27e41 * 10 ** c["log_sfr"]  # Kennicutt (1998), erg/s, intrinsic
    f_ha_int = l_ha / (4 * np.pi * dl**2) * 1e17
    c.update(_stellar_population(c, seed, idx, quenched))
    # [NII]/Halpha follows the metallicity (gas and stars enriched together; N2 flattens at high Z)
    log_nii = np.clip(-0.54 + 0.75 * c["log_zstar"] + 0.07 * _normal(U["nii"]), -1.4, -0.1)
    log_oiii = np.clip(0.1 - 0.55 * (logm - 9.7) + 0.15 * _normal(U["oiii"]), -0.8, 0.8)
    intrinsic = {
        "ha": f_ha_int,
        "hb": f_ha_int / 2.86,
        "oii_3727": 0.9 * f_ha_int,
        "nii_6584": f_ha_int * 10**log_nii,
        "oiii_5007": f_ha_int / 2.86 * 10**log_oiii,
    }
    intrinsic["nii_6548"] = intrinsic["nii_6584"] / 3.0
    intrinsic["oiii_4959"] = intrinsic["oiii_5007"] / 3.0
    for name, (_, k_l) in LINES.items():
        c[f"_line_{name}"] = intrinsic[name] * 10 ** (-0.4 * a_ha * k_l / LINES["ha"][1])
    c["flux_ha"], c["flux_hb"] = c["_line_ha"], c["_line_hb"]
    c["flux_oii"], c["flux_oiii"], c["flux_nii"] = c["_line_oii_3727"], c["_line_oiii_5007"], c["_line_nii_6584"]
    c["sigma_v"] = np.clip(40.0 + 55.0 * (logm - 9.0) + 15.0 * _normal(U["sigv"]), 25.0, 300.0)
    c["spec_noise"] = 0.5 * np.exp(0.25 * _normal(U["spec_noise"]))
    # the fibre: seeing while the spectrum was taken, and the share of the galaxy's light the spectrum carries
    see = FIBER_SEEING * np.exp(FIBER_SEEING_SCATTER * _normal(_spectrum_uniforms(seed, idx)["fib_see"]))
    c["fiber_seeing"] = np.clip(see, 0.6, 3.0)
    if spectrum_aperture == "fiber":  # bulge and disc circularised (r sqrt(q)); bar, arms and clumps count as disc
        c["fiber_frac"] = fiber_fraction(
            bt, n_b, c["_r_bulge"] * np.sqrt(q_b), c["_r_disc"] * np.sqrt(q_d), c["fiber_seeing"]
        )
    else:
        c["fiber_frac"] = np.ones(n)
    c["_dist_mod"] = dm
    return c


def check_spectrum_aperture(aperture: str) -> str:
    if aperture not in SPECTRUM_APERTURES:
        raise ValueError(f"unknown spectrum aperture {aperture!r}; choose from {', '.join(SPECTRUM_APERTURES)}")
    return aperture


@lru_cache(maxsize=1)
def _aperture_tables() -> tuple[np.ndarray, dict[float, np.ndarray], np.ndarray]:
    """Fourier transforms (real, radial) of unit-flux profiles on a grid of log u, u = k × size: Sérsic bulges
    (n = 1.5, 2, ..., 5.5, the quantised bulge indices; size = half-light radius) and the β = 3 Moffat PSF (size =
    FWHM), from GalSim. Exponential discs are analytic."""
    import galsim

    log_u = np.linspace(np.log(1e-3), np.log(5e3), 700)

    def table(prof) -> np.ndarray:
        return np.array([prof.kValue(galsim.PositionD(float(x), 0.0)).real for x in np.exp(log_u)])

    sersic = {float(n): table(galsim.Sersic(float(n), half_light_radius=1.0)) for n in np.arange(1.5, 5.51, 0.5)}
    return log_u, sersic, table(galsim.Moffat(beta=3.0, fwhm=1.0))


def fiber_fraction(
    bt: np.ndarray,
    n_bulge: np.ndarray,
    r_bulge: np.ndarray,
    r_disc: np.ndarray,
    seeing: np.ndarray,
    diameter: float = FIBER_DIAMETER,
) -> np.ndarray:
    """Light of a centred fibre on a bulge + disc galaxy seen through a Moffat (β = 3) PSF, over a point source's.

    Circular profiles: Sérsic bulge (index n_bulge, half-light radius r_bulge, light fraction bt) plus exponential
    disc (half-light radius r_disc), sizes and seeing FWHM in arcsec. The light inside radius R of a profile whose
    2-D Fourier transform is F(k) is ∫ F(k) R J1(kR) dk; the ratio to the PSF's own is what a spectrum flux-calibrated
    on point sources (as DESI's is, on standard stars) keeps of the galaxy's total flux. Vectorised; (n,) in [0, 1].
    """
    log_u, sersic, moffat = _aperture_tables()
    radius = diameter / 2
    k = np.linspace(0.0, 80.0, 4001)[1:]  # rad / arcsec; the narrowest PSF (0.6") has no power left at 80
    kernel = radius * special.j1(k * radius) * (k[1] - k[0])
    bt, n_bulge, seeing = (np.asarray(a, dtype=float) for a in (bt, n_bulge, seeing))
    r_bulge, r_disc = np.asarray(r_bulge, dtype=float), np.asarray(r_disc, dtype=float)
    out = np.empty(bt.shape)
    logk = np.log(k)
    for lo in range(0, bt.size, 512):
        sl = slice(lo, lo + 512)
        psf = np.interp(logk[None, :] + np.log(seeing[sl])[:, None], log_u, moffat, right=0.0)
        gal = (1.0 - bt[sl])[:, None] * (1.0 + (k[None, :] * r_disc[sl, None] / 1.6783) ** 2) ** -1.5
        for n_val, tab in sersic.items():
            rows = np.flatnonzero(np.isclose(n_bulge[sl], n_val)) + lo
            if rows.size:
                u = logk[None, :] + np.log(np.maximum(r_bulge[rows], 1e-6))[:, None]
                gal[rows - lo] += bt[rows, None] * np.interp(u, log_u, tab, right=0.0)
        unknown = ~np.isin(np.round(n_bulge[sl] * 2) / 2, list(sersic)) & (bt[sl] > 0)
        if unknown.any():
            raise ValueError(f"fiber_fraction: bulge index {n_bulge[sl][unknown][0]} not in {sorted(sersic)}")
        # row sums, not BLAS: an object's value must not depend on how many share its batch (see _combine)
        out[sl] = (gal * psf * kernel).sum(axis=1) / (psf * kernel).sum(axis=1)
    return np.clip(out, 0.0, 1.0)


def _interp_rows(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Interpolate each row of fp (K, len(xp)) at x: returns (len(x), K)."""
    return np.stack([np.interp(x, xp, row) for row in fp], axis=1)


def _composite_hlr(bt: np.ndarray, n_b: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """Half-light radius of bulge (Sérsic n_b, HLR = ratio) + exponential disc (HLR = 1), by bisection."""
    b_b = special.gammaincinv(2 * n_b, 0.5)
    b_d = special.gammaincinv(2.0, 0.5)

    def enclosed(r):
        return bt * special.gammainc(2 * n_b, b_b * (r / ratio) ** (1 / n_b)) + (1 - bt) * special.gammainc(
            2.0, b_d * r
        )

    lo, hi = np.full_like(bt, 1e-3), np.full_like(bt, 10.0)
    for _ in range(50):
        mid = np.sqrt(lo * hi)
        inside = enclosed(mid) > 0.5
        hi = np.where(inside, mid, hi)
        lo = np.where(inside, lo, mid)
    return np.sqrt(lo * hi)


def catalogue_row(cat: Mapping[str, np.ndarray], j: int) -> dict[str, Any]:
    """Object j of a catalogue as a plain dict of Python scalars."""
    return {k: (v[j].item() if hasattr(v[j], "item") else v[j]) for k, v in cat.items()}


# ----------------------------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------------------------
# colour offsets (mag, g r z) of each component relative to the galaxy's mean colour
_COMPONENT_COLOUR = {
    "bulge": (0.15, 0.0, -0.08),
    "bar": (0.10, 0.0, -0.05),
    "disc": (0.0, 0.0, 0.0),
    "arms": (-0.12, 0.0, 0.06),
    "clumps": (-0.35, 0.0, 0.2),
}


@lru_cache(maxsize=16)
def _fft_size(size: int) -> int:
    """Side of the padded Fourier grid used for a stamp of `size` pixels."""
    import galsim

    return int(galsim.Image.good_fft_size(2 * size))


@dataclass(frozen=True)
class _Grid:
    N: int
    ky: np.ndarray  # (N,) rad/arcsec, numpy FFT order
    kx: np.ndarray  # (N//2 + 1,) rad/arcsec, non-negative (real-FFT half plane)
    pix: np.ndarray  # (N, N//2 + 1) pixel response
    ksq: np.ndarray  # (N, N//2 + 1) |k|²
    x: np.ndarray  # (N,) real-space coordinate (arcsec) with the centre at index N//2


@lru_cache(maxsize=8)
def _grid(N: int) -> _Grid:
    ky = 2 * np.pi * np.fft.fftfreq(N, d=PIXEL_SCALE)
    kx = 2 * np.pi * np.fft.rfftfreq(N, d=PIXEL_SCALE)
    pix = np.outer(np.sinc(ky * PIXEL_SCALE / (2 * np.pi)), np.sinc(kx * PIXEL_SCALE / (2 * np.pi)))
    ksq = ky[:, None] ** 2 + kx[None, :] ** 2
    return _Grid(N, ky, kx, pix, ksq, (np.arange(N) - N // 2) * PIXEL_SCALE)


def _khalf(obj, N: int) -> np.ndarray:
    """Fourier transform of a GalSim profile on the real-FFT half plane (N, N//2+1), numpy FFT order.

    Uses GalSim's own k-space drawing (exact Sérsic Hankel tables), the same call its drawFFT makes.
    """
    import galsim

    dk = 2 * np.pi / (N * PIXEL_SCALE)
    kim = galsim.ImageCD(galsim.BoundsI(0, N // 2, -N // 2, N // 2 - 1), scale=dk)
    obj._drawKImage(kim)
    return np.fft.ifftshift(kim.array, axes=0)


@lru_cache(maxsize=1)
def _moffat3_table() -> tuple[np.ndarray, np.ndarray]:
    """Fourier transform of a unit-flux β=3 Moffat, 0.5 x² K₂(x) with x = k α, tabulated for interpolation."""
    x = np.linspace(0.0, 60.0, 60001)
    with np.errstate(invalid="ignore", over="ignore"):
        f = 0.5 * x**2 * special.kv(2, np.maximum(x, 1e-300))
    f[0] = 1.0
    return x, np.nan_to_num(f)


@lru_cache(maxsize=1)
def _lanczos_table() -> tuple[np.ndarray, np.ndarray]:
    """Fourier transform of the 1-D Lanczos-3 kernel sinc(x) sinc(x/3), |x| < 3 (x in input pixels), normalised
    to 1 at zero frequency, tabulated on frequency u in cycles per input pixel."""
    x = np.linspace(-LANCZOS_A, LANCZOS_A, 6001)
    kern = np.sinc(x) * np.sinc(x / LANCZOS_A)
    u = np.linspace(0.0, 2.0, 2001)
    ft = integrate.trapezoid(kern[None, :] * np.cos(2 * np.pi * u[:, None] * x[None, :]), x, axis=1)
    return u, ft / ft[0]


def _lanczos_ft(u: np.ndarray) -> np.ndarray:
    ut, ft = _lanczos_table()
    return np.interp(np.abs(u), ut, ft, right=0.0)


def _resampled(native: float) -> bool:
    return native > PIXEL_SCALE * (1 + 1e-6)


@lru_cache(maxsize=8)
def resampled_noise_factor(native: float) -> float:
    """Per-pixel sigma of resampled noise over that of white noise with the same depth (the same low-frequency power).

    Noise that is white on `native`-arcsec camera pixels and Lanczos-3 resampled onto the 0.262" grid keeps its
    power below the camera's Nyquist frequency and loses it above: per pixel it is s_o ∫ |L(f s_n)|² df over the
    coadd's band (per axis; the 2-D kernel is separable). 1.0 for cameras already on the coadd's pixel scale.
    """
    if not _resampled(native):
        return 1.0
    f = np.linspace(-0.5 / PIXEL_SCALE, 0.5 / PIXEL_SCALE, 4001)
    return float(PIXEL_SCALE * integrate.trapezoid(_lanczos_ft(f * native) ** 2, f))


@lru_cache(maxsize=16)
def _pixel_transfer(N: int, native: float) -> np.ndarray:
    """Pixel response on the (N, N//2+1) half plane: the 0.262" pixel, or a coarser camera pixel followed by the
    Lanczos-3 resampling onto the 0.262" grid (aliasing of the camera's sampling is neglected)."""
    grid = _grid(N)
    if not _resampled(native):
        return grid.pix
    fy, fx = grid.ky / (2 * np.pi), grid.kx / (2 * np.pi)
    ty = np.sinc(fy * native) * _lanczos_ft(fy * native)
    tx = np.sinc(fx * native) * _lanczos_ft(fx * native)
    return np.outer(ty, tx)


@lru_cache(maxsize=16)
def _noise_filter(size: int, native: float) -> np.ndarray:
    """Transfer function (size, size//2+1) that turns white noise on the 0.262" grid into Lanczos-3 resampled noise
    from `native`-arcsec camera pixels (1 at zero frequency: the depth is kept)."""
    fy = np.fft.fftfreq(size, d=PIXEL_SCALE) * native
    fx = np.fft.rfftfreq(size, d=PIXEL_SCALE) * native
    return np.outer(_lanczos_ft(fy), _lanczos_ft(fx))


def _moffat_k(grid: _Grid, fwhm: float, g1: float, g2: float) -> np.ndarray:
    """Sheared β=3 Moffat PSF in Fourier space on the half plane (identical to GalSim's Moffat.shear)."""
    import galsim

    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / 3.0) - 1.0))
    a = galsim.Shear(g1=g1, g2=g2).getMatrix()  # symmetric, det 1: K'(k) = K(Aᵀ k)
    kx, ky = grid.kx[None, :], grid.ky[:, None]
    kxe = a[0, 0] * kx + a[1, 0] * ky
    kye = a[0, 1] * kx + a[1, 1] * ky
    xt, ft = _moffat3_table()
    # linear interpolation on the uniform table (np.interp's binary search is the bottleneck otherwise)
    t = np.minimum(np.sqrt(kxe**2 + kye**2) * (alpha / (xt[1] - xt[0])), xt.size - 1.0)
    i = np.minimum(t.astype(np.int64), xt.size - 2)
    return ft[i] + (ft[i + 1] - ft[i]) * (t - i)


def _disc_plane(X: np.ndarray, Y: np.ndarray, pa: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """Sky coordinates → disc-plane coordinates (inverse of GalSim's area-preserving shear(q, beta=pa))."""
    c, s = math.cos(pa), math.sin(pa)
    xr = X * c + Y * s
    yr = -X * s + Y * c
    return xr * math.sqrt(q), yr / math.sqrt(q)


def _phase(grid: _Grid, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
    """Fourier phase of a shift by (x, y) arcsec (one plane per position when x, y are arrays)."""
    return (
        np.exp(-1j * np.multiply.outer(y, grid.ky))[..., :, None]
        * np.exp(-1j * np.multiply.outer(x, grid.kx))[..., None, :]
    )


def _combine(weights: np.ndarray, planes: list[np.ndarray]) -> np.ndarray:
    """(B, C) weights × C planes → B planes, without BLAS (its threads fight GalSim's OpenMP threads)."""
    out = np.zeros((weights.shape[0], *planes[0].shape), dtype=np.complex128)
    for b in range(weights.shape[0]):
        for c, plane in enumerate(planes):
            out[b] += weights[b, c] * plane
    return out


def render_image(obj: Mapping[str, Any], size: int = 64, noise: bool = True, rng=None) -> np.ndarray:
    """Render one catalogue object as an (size, size, 3) float32 g, r, z stamp in nanomaggies.

    Bulge, disc and bar are GalSim profiles drawn in Fourier space on a padded N×N grid (N = `_fft_size(size)`),
    multiplied by the pixel response and the per-band Moffat PSF and transformed back; clumps are Gaussian knots
    added in Fourier space, arms a real-space pattern on the same grid. Light beyond the padded grid wraps.
    """
    import galsim

    if rng is None:
        rng = np.random.default_rng([int(obj["_seed"]), int(obj["_index"]), 1])
    N = _fft_size(size)
    grid = _grid(N)
    pa = math.radians(obj["position_angle_deg"])
    beta = pa * galsim.radians
    r_d, r_b = obj["_r_disc"], obj["_r_bulge"]
    q_d, q_b = obj["_q_disc"], obj["_q_bulge"]
    bt = obj["bulge_frac"]
    h = r_d / 1.6783  # exponential scale length
    n_arms = int(obj["n_arms"])
    pitch = math.radians(obj["_pitch_deg"])
    phase0 = rng.uniform(0, 2 * np.pi)

    # r-band light fractions of the components
    bar_f = 0.2 * (1 - bt) if obj["has_bar"] else 0.0
    disc_total = 1.0 - bt - bar_f
    arm_f = obj["arm_strength"] * disc_total if n_arms > 0 else 0.0
    clump_f = obj["clump_frac"] * disc_total
    frac_r = {"bulge": bt, "bar": bar_f, "disc": disc_total - arm_f - clump_f, "arms": arm_f, "clumps": clump_f}

    analytic: dict[str, np.ndarray] = {}  # unit-flux transforms that still need the pixel response
    sampled: dict[str, np.ndarray] = {}  # pixel-sampled components (already pixelised)
    if bt > 0:
        analytic["bulge"] = _khalf(galsim.Sersic(obj["_n_bulge"], half_light_radius=r_b).shear(q=q_b, beta=beta), N)
    analytic["disc"] = _khalf(galsim.Exponential(half_light_radius=r_d).shear(q=q_d, beta=beta), N)
    if bar_f > 0:
        bar_angle = rng.uniform(0, np.pi) * galsim.radians
        bar = galsim.Gaussian(half_light_radius=0.5 * obj["_bar_len"] * r_d)
        analytic["bar"] = _khalf(bar.shear(q=0.3, beta=bar_angle).shear(q=q_d, beta=beta), N)
    if clump_f > 0:
        n_cl = int(rng.integers(4, 25))
        rad = rng.gamma(2.0, h, n_cl)
        if n_arms > 0:  # clumps trace the arms
            arm_i = rng.integers(0, n_arms, n_cl)
            phi = phase0 / n_arms + 2 * np.pi * arm_i / n_arms + np.log(rad / h + 1e-3) / math.tan(pitch)
            phi = phi + rng.normal(0, 0.25, n_cl)
        else:
            phi = rng.uniform(0, 2 * np.pi, n_cl)
        xr, yr = rad * np.cos(phi) / math.sqrt(q_d), rad * np.sin(phi) * math.sqrt(q_d)
        cx = xr * math.cos(pa) - yr * math.sin(pa)
        cy = xr * math.sin(pa) + yr * math.cos(pa)
        w = rng.gamma(1.5, 1.0, n_cl)
        w /= w.sum()
        ex = np.exp(-1j * np.outer(cx, grid.kx))  # (n_cl, N//2+1)
        ey = np.exp(-1j * np.outer(cy, grid.ky))  # (n_cl, N)
        sig = 0.25 / obj["_kpc_per_arcsec"]  # ~250 pc clumps
        # sum of shifted knots (broadcasting, not BLAS: see _combine)
        knots = ((w[:, None] * ey)[:, :, None] * ex[:, None, :]).sum(axis=0)
        analytic["clumps"] = knots * np.exp(-0.5 * sig**2 * grid.ksq)
    if arm_f > 0:
        X, Y = np.meshgrid(grid.x, grid.x)
        u, v = _disc_plane(X, Y, pa, q_d)
        r = np.hypot(u, v)
        spiral = np.cos(n_arms * (np.arctan2(v, u) - np.log(r / h + 1e-3) / math.tan(pitch)) - phase0)
        arms = np.exp(-r / h) * (1 - np.exp(-((r / (0.7 * h)) ** 2))) * (0.5 * (1 + spiral)) ** 3
        total = arms.sum()
        if total > 0:
            sampled["arms"] = np.fft.rfft2(np.fft.ifftshift(arms / total))
        else:
            frac_r["disc"] += frac_r.pop("arms")

    # per-band fluxes of each component, from the component colours
    names_a, names_s = list(analytic), list(sampled)
    fluxes = np.zeros((3, len(names_a) + len(names_s)))
    for b, band in enumerate(BANDS):
        flux = 10 ** (-0.4 * (obj[f"mag_{band}"] + obj[f"_zp_offset_{band}"] - ZERO_POINT))
        w = {c: f * 10 ** (-0.4 * _COMPONENT_COLOUR[c][b]) for c, f in frac_r.items()}
        tot = sum(w.values())
        fluxes[b] = [flux * w[c] / tot for c in names_a + names_s]
    na = len(names_a)
    kb = _combine(fluxes[:, :na], [analytic[c] for c in names_a])
    if obj["has_star"]:
        ang = rng.uniform(0, 2 * np.pi)
        rad_px = rng.uniform(0.25, 0.45) * size
        star = _phase(grid, rad_px * math.cos(ang) * PIXEL_SCALE, rad_px * math.sin(ang) * PIXEL_SCALE)
        m_r, gr = obj["_star_mag_r"], obj["_star_gr"]
        for b, (m, band) in enumerate(zip((m_r + gr, m_r, m_r - 0.7 * gr + 0.1), BANDS, strict=True)):
            kb[b] += 10 ** (-0.4 * (m + obj[f"_star_offset_{band}"] - ZERO_POINT)) * star
    natives = [float(obj[f"_native_scale_{band}"]) for band in BANDS]
    for b in range(3):
        kb[b] *= _pixel_transfer(N, natives[b])
    if names_s:
        ks = _combine(fluxes[:, na:], [sampled[c] for c in names_s])  # already sampled on 0.262" pixels
        for b in range(3):
            if _resampled(natives[b]):
                ks[b] *= _pixel_transfer(N, natives[b]) / grid.pix
        kb += ks

    # PSF, and the shift that puts the centre on the corner between the four central pixels (+ jitter)
    for b, band in enumerate(BANDS):
        kb[b] *= _moffat_k(grid, obj[f"psf_fwhm_{band}"], obj["_psf_g1"], obj["_psf_g2"])
    kb *= _phase(grid, (obj["_offset_x"] - 0.5) * PIXEL_SCALE, (obj["_offset_y"] - 0.5) * PIXEL_SCALE)
    img = np.fft.fftshift(np.fft.irfft2(kb, s=(N, N)), axes=(1, 2))
    lo = N // 2 - size // 2
    img = img[:, lo : lo + size, lo : lo + size]
    if noise:
        for b, band in enumerate(BANDS):
            var = obj[f"_noise_white_{band}"] ** 2 + np.maximum(img[b], 0.0) / obj[f"_gain_{band}"]
            field = np.sqrt(var) * rng.standard_normal((size, size))
            if _resampled(natives[b]):  # camera pixels resampled onto the coadd grid: correlated noise
                field = np.fft.irfft2(np.fft.rfft2(field) * _noise_filter(size, natives[b]), s=(size, size))
            img[b] += field
    return np.ascontiguousarray(img.transpose(1, 2, 0), dtype=np.float32)


def _noise_shape(wave: np.ndarray) -> np.ndarray:
    shape = 1.0 + 2.0 * np.exp(-(wave - SPEC_START) / 250.0) + 0.8 * np.clip((wave - 7000.0) / 2800.0, 0, None) ** 2
    for sl in SKY_LINES:
        shape += 3.0 * np.exp(-0.5 * ((wave - sl) / 1.5) ** 2)
    return shape


# --- spectra: stellar population labels, absorption features, ivar, masks, missing spectra ----------------------
SPEC_MISSING_FRACTION = 0.3  # objects without a spectrum (missing completely at random, so probes stay unbiased)
SKY_MASK_HALF_WIDTH = 2.0  # Å: pixels this close to a strong sky line are masked (sky-subtraction residuals)
BAD_PIXEL_RUNS = 2.0  # mean number of cosmic-ray / bad-column runs (1-3 px) per spectrum, also masked
TEMPLATE_AGE_GYR = (10.0, 6.0, 3.5, 1.5)  # mass-weighted age of the E, Sbc, Scd, Im populations today
# rest-frame absorption features: (vacuum Å, equivalent width in Å for an old solar-metallicity population).
# Kept modest (≲ 0.6% of a broad band) so the spectra still integrate to the catalogue magnitudes.
ABSORPTION = {
    "g_band": (4305.6, 3.0),
    "mg_b": (5178.1, 2.0),
    "fe_5270": (5271.5, 1.2),
    "fe_5335": (5336.6, 1.2),
    "na_d": (5895.6, 2.0),
}
_SPEC_U_COLUMNS = ("has_spec", "metal", "age", "fib_see")  # append only


def _spectrum_uniforms(seed: int, index: np.ndarray) -> dict[str, np.ndarray]:
    """Uniforms for the spectrum physics, from the same counter-based stream as `_uniforms` (own column range)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(_splitmix64(np.full(index.shape, seed, dtype=np.uint64)) ^ index.astype(np.uint64))
        out = {}
        for j, name in enumerate(_SPEC_U_COLUMNS):
            bits = _splitmix64(base + np.uint64(1001 + j) * np.uint64(0xD1B54A32D192ED03))
            out[name] = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    return out


@lru_cache(maxsize=1)
def _universe_age_table() -> tuple[np.ndarray, np.ndarray]:
    from astropy.cosmology import Planck18

    z = np.linspace(0.0, 1.0, 201)
    return z, Planck18.age(z).value


def _stellar_population(c: Mapping[str, np.ndarray], seed: int, idx: np.ndarray, quenched: np.ndarray) -> dict:
    """Metallicity, mass-weighted age and spectrum availability for a catalogue under construction.

    - log Z*/Z☉ follows a stellar mass-metallicity relation shaped like Gallazzi et al. (2005): about -0.55 at
      10^9 M☉, rising and flattening to ~0 above 10^11 M☉, quenched galaxies +0.05, 0.1 dex scatter.
    - The age is the mass-weighted mean of the template ages, weighted by each template's share of the r-band light
      times its mass-to-light ratio (Bell & de Jong from the template's rest g - r), scaled by the age of the
      universe at the galaxy's redshift relative to today, with 0.05 dex scatter (capped at 95% of that age).
    """
    T = _tables()
    U = _spectrum_uniforms(seed, idx)
    logm = c["log_mstar"]
    log_z = 0.05 - 0.6 * np.exp(-(logm - 9.0) / 0.9) + 0.05 * quenched + 0.1 * _normal(U["metal"])
    i0, w1 = c["_t0"], c["_w1"]
    ml = 10 ** _log_ml_r(T.rest_mags[:, 0] - T.rest_mags[:, 1])  # (templates,)
    ages = np.asarray(TEMPLATE_AGE_GYR)
    m0, m1 = (1 - w1) * ml[i0], w1 * ml[i0 + 1]
    age0 = (m0 * ages[i0] + m1 * ages[i0 + 1]) / (m0 + m1)
    zt, at = _universe_age_table()
    t_univ = np.interp(c["redshift"], zt, at)
    # the scatter never makes a population older than 95% of the universe at that redshift
    age = np.minimum(age0 * t_univ / at[0] * 10 ** (0.05 * _normal(U["age"])), 0.95 * t_univ)
    return {
        "log_zstar": np.clip(log_z, -1.2, 0.4),
        "age_mw_gyr": age,
        "has_spectrum": U["has_spec"] >= SPEC_MISSING_FRACTION,
    }


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
    return obj["spec_noise"] * _noise_shape(_tables().wave)


def render_spectrum(obj: Mapping[str, Any], noise: bool = True, lines: bool = True, rng=None) -> np.ndarray:
    """Observed-frame spectrum (1e-17 erg/s/cm²/Å) on `spectrum_wavelength()`, float32 (no masking, see
    `observe_spectrum`)."""
    T = _tables()
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
    wave = _tables().wave
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


def render_object(obj: Mapping[str, Any], size: int = 64, noise: bool = True) -> tuple[np.ndarray, Spectrum | None]:
    """(image (size, size, 3) float32, observed `Spectrum` or None) for one catalogue row; deterministic."""
    return render_image(obj, size, noise=noise), observe_spectrum(obj, noise=noise)


def _spectrum_columns(spec: Spectrum | None) -> tuple[bytes | None, bytes | None, bytes | None]:
    if spec is None:
        return None, None, None
    return (
        spec.flux.astype("<f4").tobytes(),
        spec.ivar.astype("<f4").tobytes(),
        spec.mask.astype(np.uint8).tobytes(),
    )


def _render_chunk(task: tuple) -> dict[str, Any]:
    """Objects start..stop-1 of one task (start, stop, seed, size, fractions, instrument, aperture, image_format,
    jpeg_size) rendered into column lists."""
    start, stop, seed, size, fractions, instrument, aperture, image_format, jpeg_size = task
    cat = sample_catalogue(
        stop - start,
        seed=seed,
        start=start,
        split_fractions=fractions,
        instrument=instrument,
        spectrum_aperture=aperture,
    )
    images, spectra = [], []
    for j in range(stop - start):
        row = catalogue_row(cat, j)
        img, spec = render_object(row, size)
        if image_format == "jpeg":  # the Hugging Face Image struct of the Smith42/galaxies layout
            images.append({"bytes": viewer_jpeg(img, BANDS, JPEG_LAYER, jpeg_size), "path": f"{row['object_id']}.jpg"})
        else:
            images.append(img.astype("<f4").tobytes())
        spectra.append(_spectrum_columns(spec))
    out = {k: v for k, v in cat.items() if k in ("object_id", "split") or k in LABELS}
    out[IMAGE] = images
    out[SPECTRUM], out[SPECTRUM_IVAR], out[SPECTRUM_MASK] = (list(col) for col in zip(*spectra, strict=True))
    return out


def generate_objects(
    n: int,
    size: int = 64,
    seed: int = 0,
    start: int = 0,
    noise: bool = True,
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
    instrument: tuple[str, ...] = INSTRUMENT_EFFECTS,
    spectrum_aperture: str = "fiber",
) -> list[Record]:
    """Render objects start..start+n-1 in memory (single process) as `Record`s, identical to the shards' rows."""
    cat = sample_catalogue(
        n,
        seed=seed,
        start=start,
        split_fractions=split_fractions,
        instrument=instrument,
        spectrum_aperture=spectrum_aperture,
    )
    records = []
    for j in range(n):
        row = catalogue_row(cat, j)
        img, spec = render_object(row, size, noise=noise)
        labels = {k: row[k] for k in LABELS}
        records.append(
            Record(
                object_id=row["object_id"],
                image=img,
                split=row["split"],
                labels=labels,
                spectrum=None if spec is None else spec.flux,
                spectrum_ivar=None if spec is None else spec.ivar,
                spectrum_mask=None if spec is None else spec.mask,
            )
        )
    return records


# ----------------------------------------------------------------------------------------------------------------
# writing shards
# ----------------------------------------------------------------------------------------------------------------
def _arrow_schema(metadata: dict[str, Any]):
    import pyarrow as pa

    jpeg = metadata.get("image_format") == "jpeg"
    fields = [pa.field("object_id", pa.string()), pa.field("split", pa.string())]
    for name in LABELS:
        if name in BOOL_LABELS:
            t = pa.bool_()
        elif name in INT_LABELS:
            t = pa.int32()
        elif name in STR_LABELS:
            t = pa.string()
        else:
            t = pa.float64()
        fields.append(pa.field(name, t))
    if jpeg:
        fields.append(pa.field(IMAGE, pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])))
    else:
        fields += [pa.field(IMAGE, pa.binary()), pa.field(IMAGE_SHAPE, pa.list_(pa.int32()))]
    fields += [
        pa.field(SPECTRUM, pa.binary()),
        pa.field(SPECTRUM_IVAR, pa.binary()),
        pa.field(SPECTRUM_MASK, pa.binary()),
    ]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata).encode()})


def _metadata(cfg: SurveyConfig) -> dict[str, Any]:
    from astrolom import __version__

    meta = {
        "format": "astrolom-shard",
        "format_version": 1,
        "source": "astrolom.data.survey (mock DESI Legacy Survey)",
        "astrolom_version": __version__,
        "bands": list(BANDS),
        "pixel_scale": PIXEL_SCALE,
        "image_shape": [cfg.size, cfg.size, len(BANDS)],
        "image_dtype": "float32",
        "image_layout": "HWC",
        "image_units": "nanomaggies",
        "zero_point": ZERO_POINT,
        "wavelength": spectrum_wavelength().tolist(),
        "wavelength_units": "Angstrom (observed frame, vacuum)",
        "spectrum_dtype": "float32",
        "spectrum_units": SPEC_UNITS,
        "spectrum_ivar": "float32 inverse variance of the spectrum, 0 = no information",
        "spectrum_mask": "uint8 per pixel, 1 = bad (sky-line core or cosmic ray; ivar is 0 there)",
        "spectrum_missing": "spectrum columns are null where has_spectrum is false",
        "seed": cfg.seed,
        "split_fractions": list(cfg.split_fractions),
        "telescopes": {k: {kk: list(vv) for kk, vv in v.items()} for k, v in TELESCOPES.items()},
        "sky_mag": list(SKY_MAG),
        "instrument": list(cfg.instrument),
        "spectrum_aperture": cfg.spectrum_aperture,
        # (the worker count is left out: it changes nothing in the data, so shards are byte-identical across it)
        "generator": {
            "module": "astrolom.data.survey",
            "config": {k: v for k, v in _config_dict(cfg).items() if k != "workers"},
        },
        "labels": {k: {"unit": u, "description": d} for k, (u, d) in LABELS.items()},
    }
    if cfg.image_format == "jpeg":
        side = cfg.jpeg_size or cfg.size
        meta.update(
            image_format="jpeg",
            bands=["R", "G", "B"],
            rendered_from_bands=list(BANDS),
            pixel_scale=PIXEL_SCALE * cfg.size / side,
            image_shape=[side, side, 3],
            image_dtype="uint8",
            image_units=f"8-bit RGB, JPEG quality {JPEG_QUALITY}, rendered as the Legacy Survey viewer's {JPEG_LAYER} "
            "layer (astrolom.data.display.viewer_rgb)",
        )
    return meta


def _config_dict(cfg: SurveyConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["split_fractions"] = list(cfg.split_fractions)
    d["instrument"] = list(cfg.instrument)
    return d


def _to_table(rows: dict[str, list], schema, size: int):
    import pyarrow as pa

    n = len(rows["object_id"])
    arrays = []
    for f in schema:
        if f.name == IMAGE_SHAPE:
            arrays.append(pa.array([[size, size, 3]] * n, type=f.type))
        else:
            arrays.append(pa.array(rows[f.name], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def generate_survey(
    out_dir: str | os.PathLike,
    n: int,
    size: int = 64,
    seed: int = 0,
    workers: int | None = None,
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
    shard_size: int = 1000,
    progress: bool = True,
    overwrite: bool = False,
    instrument: tuple[str, ...] | str = INSTRUMENT_EFFECTS,
    spectrum_aperture: str = "fiber",
    image_format: str = "flux",
    jpeg_size: int | None = None,
) -> Path:
    """Render n objects into Parquet shards `out_dir/shard-00000.parquet`, ... plus `out_dir/_survey.json`.

    The summary file starts with '_' so that `pyarrow.parquet.read_table(out_dir)` ignores it. Returns out_dir.
    `image_format="jpeg"` stores viewer-rendered JPEGs (`jpeg_size` pixels per side, default `size`) instead of
    float32 flux (see the module docstring).
    With workers > 1 this starts 'spawn' processes: call it under `if __name__ == "__main__":` in scripts.
    """
    cfg = SurveyConfig(
        n=n,
        size=size,
        seed=seed,
        workers=workers,
        split_fractions=split_fractions,
        shard_size=shard_size,
        instrument=check_instrument(instrument),
        spectrum_aperture=spectrum_aperture,
        image_format=image_format,
        jpeg_size=jpeg_size,
    ).validate()
    return _generate(cfg, Path(out_dir), progress=progress, overwrite=overwrite)[0]


def _generate(cfg: SurveyConfig, out: Path, progress: bool, overwrite: bool) -> tuple[Path, dict[str, Any]]:
    import pyarrow.parquet as pq

    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("shard-*.parquet")) + sorted(out.glob("_survey.json"))
    if old and not overwrite:
        raise ValueError(f"{out} already holds a survey ({old[0].name}, ...); pass --overwrite to replace it")
    for p in old + sorted(out.glob(".shard-*.parquet.tmp")):  # (.tmp: left by an interrupted run)
        p.unlink()
    tables = _tables()
    meta = _metadata(cfg)
    schema = _arrow_schema(meta)
    workers = max(1, min(cfg.workers or os.cpu_count() or 1, cfg.n))
    bytes_per_row = cfg.size * cfg.size * 3 * 4 + spectrum_wavelength().size * 4 + 1024
    # row groups of <= 256 rows / ~16 MiB: the unit that readers shuffle and deal out to data-parallel ranks
    row_group = int(max(1, min(cfg.shard_size, 256, (16 << 20) // bytes_per_row)))
    chunk = int(max(1, min(32, math.ceil(cfg.n / (workers * 8)), row_group)))
    tasks = [
        (s, min(s + chunk, cfg.n), cfg.seed, cfg.size, cfg.split_fractions, cfg.instrument, cfg.spectrum_aperture,
         cfg.image_format, cfg.jpeg_size)
        for s in range(0, cfg.n, chunk)
    ]  # fmt: skip

    stats = _RunningStats()
    files: list[Path] = []
    writer = None
    tmp_path: Path | None = None
    buf: dict[str, list] = {f.name: [] for f in schema}
    in_shard = 0

    def flush():
        nonlocal buf
        if buf["object_id"]:
            writer.write_table(_to_table(buf, schema, cfg.size), row_group_size=row_group)
            buf = {f.name: [] for f in schema}

    def close_shard():
        nonlocal writer, tmp_path, in_shard
        flush()
        writer.close()
        final = out / f"shard-{len(files):05d}.parquet"
        os.replace(tmp_path, final)
        files.append(final)
        writer, tmp_path, in_shard = None, None, 0

    if workers > 1:
        ctx = mp.get_context("spawn")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tables,))
        results = pool.imap(_render_chunk, tasks)
    else:
        pool = None
        results = map(_render_chunk, tasks)
    bar = progress_bar(cfg.n, desc="survey", unit="obj", enabled=progress, smoothing=0.1)
    try:
        for res in results:
            m = len(res["object_id"])
            j = 0
            while j < m:
                if writer is None:
                    tmp_path = out / f".shard-{len(files):05d}.parquet.tmp"
                    writer = pq.ParquetWriter(tmp_path, schema, compression="zstd")
                take = min(m - j, cfg.shard_size - in_shard)
                for key in buf:
                    if key != IMAGE_SHAPE:
                        buf[key].extend(res[key][j : j + take])
                in_shard += take
                j += take
                if len(buf["object_id"]) >= row_group:
                    flush()
                if in_shard >= cfg.shard_size:
                    close_shard()
            stats.update(res)
            bar.update(m)
        if writer is not None:
            close_shard()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        if writer is not None:
            writer.close()
            if tmp_path is not None and tmp_path.exists():
                tmp_path.unlink()

    elapsed = time.time() - t_start
    summary = _summary(cfg, stats, files, elapsed, workers)
    doc = {
        "description": "astrolom mock DESI Legacy Survey (astrolom.data.survey)",
        "config": _config_dict(cfg),
        "files": [p.name for p in files],
        "counts": summary["counts"],
        "columns": list(schema.names),
        "labels": meta["labels"],
        "bands": meta["bands"],
        "pixel_scale": meta["pixel_scale"],
        "image_shape": meta["image_shape"],
        "image_units": meta["image_units"],
        "spectrum": {
            "start": SPEC_START,
            "stop": SPEC_STOP,
            "step": SPEC_STEP,
            "n": int(spectrum_wavelength().size),
            "units": SPEC_UNITS,
            "with_spectrum_fraction": summary["label_stats"]["has_spectrum"]["mean"],
        },
        "label_stats": summary["label_stats"],
        "seconds": round(elapsed, 2),
    }
    (out / "_survey.json").write_text(json.dumps(doc, indent=1))
    return out, summary


SUMMARY_LABELS = (
    "redshift",
    "log_mstar",
    "log_ssfr",
    "g_minus_r",
    "r_minus_z",
    "mag_r",
    "r_half_arcsec",
    "psf_fwhm_r",
    "quenched",
    "edge_on",
    "has_spectrum",
)


class _RunningStats:
    """Counts per split × telescope and min / mean / max of the summary labels, in O(1) memory."""

    def __init__(self) -> None:
        self.n = 0
        self.counts = {(s, t): 0 for s in ("train", "val", "test") for t in ("north", "south")}
        self.lo = dict.fromkeys(SUMMARY_LABELS, math.inf)
        self.hi = dict.fromkeys(SUMMARY_LABELS, -math.inf)
        self.sum = dict.fromkeys(SUMMARY_LABELS, 0.0)

    def update(self, res: Mapping[str, Any]) -> None:
        self.n += len(res["split"])
        for s, t in zip(res["split"], res["telescope"], strict=True):
            self.counts[s, t] += 1
        for k in SUMMARY_LABELS:
            a = np.asarray(res[k], dtype=float)
            self.lo[k] = min(self.lo[k], float(a.min()))
            self.hi[k] = max(self.hi[k], float(a.max()))
            self.sum[k] += float(a.sum())


def _summary(cfg: SurveyConfig, stats: _RunningStats, files, elapsed, workers) -> dict[str, Any]:
    counts: dict[str, Any] = {"total": stats.n}
    for s in ("train", "val", "test"):
        counts[s] = {t: stats.counts[s, t] for t in ("north", "south")}
        counts[s]["total"] = counts[s]["north"] + counts[s]["south"]
    label_stats = {
        k: {"min": stats.lo[k], "mean": stats.sum[k] / max(stats.n, 1), "max": stats.hi[k]} for k in SUMMARY_LABELS
    }
    return {"counts": counts, "label_stats": label_stats, "files": files, "seconds": elapsed, "workers": workers}


def _print_summary(out: Path, summary: dict[str, Any]) -> None:
    c = summary["counts"]
    print(f"astrolom survey: {c['total']} objects -> {out}")
    print(f"  {'split':<6} {'total':>7} {'north':>7} {'south':>7}")
    for s in ("train", "val", "test"):
        print(f"  {s:<6} {c[s]['total']:>7} {c[s]['north']:>7} {c[s]['south']:>7}")
    print(f"  {'label':<14} {'min':>9} {'mean':>9} {'max':>9}")
    for k, v in summary["label_stats"].items():
        print(f"  {k:<14} {v['min']:>9.3f} {v['mean']:>9.3f} {v['max']:>9.3f}")
    files = summary["files"]
    total = sum(p.stat().st_size for p in files)
    shown = ", ".join(p.name for p in files[:3]) + (f", ... ({len(files)} files)" if len(files) > 3 else "")
    print(f"  files: {shown} + _survey.json, {total / 2**20:.1f} MiB")
    secs = summary["seconds"]
    print(f"  time: {secs:.1f} s ({c['total'] / max(secs, 1e-9):.3g} objects/s, {summary['workers']} workers)")


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from err
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return parts  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=2000, help="number of objects (default 2000)")
    parser.add_argument("--size", type=int, default=64, help="stamp size in pixels, even, 32..512 (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, help="output directory for the Parquet shards")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    parser.add_argument(
        "--split-fractions",
        type=_fractions,
        default=DEFAULT_SPLIT_FRACTIONS,
        help="train,val,test fractions (default 0.8,0.1,0.1; the paper used 0.98,0.01,0.01)",
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="objects per Parquet shard (default 1000)")
    parser.add_argument(
        "--instrument",
        default="all",
        help="north/south instrument differences to simulate: 'all' (default), 'none', a comma list of "
        f"{','.join(INSTRUMENT_EFFECTS)}, or all but some (--instrument=-pixels,-psf)",
    )
    parser.add_argument(
        "--spectrum-aperture",
        choices=SPECTRUM_APERTURES,
        default="fiber",
        help="light the spectra carry: 'fiber' (default; a 1.5\" DESI fibre in the seeing of the night, "
        "flux-calibrated on point sources, label fiber_frac) or 'total' (the whole galaxy, as before 2026-12-02)",
    )
    parser.add_argument(
        "--format",
        choices=IMAGE_FORMATS,
        default="flux",
        help="stamps as 'flux' (default: float32 g, r, z in nanomaggies) or 'jpeg': 8-bit RGB JPEGs rendered as the "
        "Legacy Survey viewer renders g, r, z (as the paper's training data were made; Smith42/galaxies Parquet "
        "layout, image column {bytes, path})",
    )
    parser.add_argument(
        "--jpeg-size",
        type=int,
        default=None,
        help="JPEG pixels per side (the paper's: 512; default: --size). Another size resamples the stamp, so the "
        "pixel scale becomes 0.262 * size / jpeg-size arcsec; --size 512 renders the paper's 512x512 at 0.262\"/px",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a survey already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    cfg = SurveyConfig(
        n=args.n,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        split_fractions=tuple(args.split_fractions),
        shard_size=args.shard_size,
        instrument=parse_instrument(args.instrument),
        spectrum_aperture=args.spectrum_aperture,
        image_format=args.format,
        jpeg_size=args.jpeg_size,
    ).validate()
    out, summary = _generate(cfg, Path(args.out), progress=not args.no_progress, overwrite=args.overwrite)
    _print_summary(out, summary)
    return 0
