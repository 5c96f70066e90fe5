"""The mock's instruments: the two imaging telescopes (north, south), the DESI-like spectrograph and its fibres.

**Two telescopes** (`TELESCOPES`), split at dec = 32.375° as the Legacy Surveys are:
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

**The spectrograph**: a DESI-like observed-frame grid 3600–9800 Å with 2 Å pixels (`spectrum_wavelength`, 3101
pixels; DESI itself uses 0.8 Å, 7781 pixels — coarser here to keep shards small), flux in 1e-17 erg/s/cm²/Å.

**Fibre aperture** (`--spectrum-aperture fiber`, the default; `total` gives the whole galaxy's light, the mock
before 2026-12-02): DESI observes through 1.5″-diameter fibres (DESI Collaboration 2016, arXiv:1611.00037) and
flux-calibrates on standard stars, i.e. for a point source's fibre losses, so an extended galaxy's spectrum carries
its total flux × `fiber_frac` = acceptance(galaxy) / acceptance(point source), which is why DESI stellar masses
need an aperture correction from photometry. `fiber_frac` is computed exactly (`fiber_fraction`: the fibre's
light of the circularised bulge + disc, Fourier transforms from GalSim, convolved with a β = 3 Moffat of the
night's seeing, `fiber_seeing`: log-normal around 1.1″, 0.2 scatter) for a fibre centred on the galaxy; the
same factor scales continuum and lines (no colour or line-ratio gradients), the noise does not (S/N falls with
it). Median 0.43 (1–99%: 0.06–0.85) for the default population. Line-flux labels stay totals.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import integrate, special

BANDS = ("g", "r", "z")
PIXEL_SCALE = 0.262  # arcsec / pixel (Legacy Surveys)
ZERO_POINT = 22.5  # nanomaggies
FILTER_NAMES = ("decam2014-g", "decam2014-r", "decam2014-z")
SPEC_START, SPEC_STOP, SPEC_STEP = 3600.0, 9800.0, 2.0
SPEC_UNITS = "1e-17 erg / (s cm2 Angstrom)"
NORTH_DEC = 32.375  # deg: BASS/MzLS above, DECaLS below

# Telescopes: what differs between the north (BASS g, r on the Bok 2.3 m / 90Prime; MzLS z on the Mayall 4 m /
# Mosaic-3, both at Kitt Peak) and the south (DECaLS g, r, z on the Blanco 4 m / DECam at Cerro Tololo). Sources and
# the switch that turns each difference off are in the module docstring ("Two telescopes").
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
# DESI spectra see a fibre, not the whole galaxy (see "Fibre aperture" in the module docstring): 1.5" diameter fibres
# (107 um at the Mayall's prime focus), observed in the Mayall's own seeing, flux-calibrated on standard stars (point
# sources), so a galaxy's spectrum carries its total flux times fibre acceptance(galaxy) / acceptance(point source).
FIBER_DIAMETER = 1.5  # arcsec
FIBER_SEEING, FIBER_SEEING_SCATTER = 1.1, 0.2  # median delivered FWHM (arcsec) during spectroscopy; log-normal
SPECTRUM_APERTURES = ("fiber", "total")  # "total": the spectrum of the whole galaxy (the mock before fibres)
SKY_LINES = (5578.9, 5891.6, 6302.0, 6365.5, 7340.9, 7821.5, 8344.6, 8827.1, 8885.8, 9375.9, 9788.5)


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


def check_spectrum_aperture(aperture: str) -> str:
    """`aperture` if it is one of SPECTRUM_APERTURES; else a ValueError naming the choices."""
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
        # row sums, not BLAS: an object's value must not depend on how many share its batch (see images._combine)
        out[sl] = (gal * psf * kernel).sum(axis=1) / (psf * kernel).sum(axis=1)
    return np.clip(out, 0.0, 1.0)


@lru_cache(maxsize=1)
def _lanczos_table() -> tuple[np.ndarray, np.ndarray]:
    """Fourier transform of the 1-D Lanczos-3 kernel sinc(x) sinc(x/3), |x| < 3 (x in input pixels), normalised
    to 1 at zero frequency, tabulated on frequency u in cycles per input pixel."""
    x = np.linspace(-LANCZOS_A, LANCZOS_A, 6001)
    kern = np.sinc(x) * np.sinc(x / LANCZOS_A)
    u = np.linspace(0.0, 2.0, 2001)
    ft = integrate.trapezoid(kern[None, :] * np.cos(2 * np.pi * u[:, None] * x[None, :]), x, axis=1)
    return u, ft / ft[0]


def lanczos_ft(u: np.ndarray) -> np.ndarray:
    """Transfer function of the Lanczos-3 kernel at frequency u (cycles per input pixel), 1 at u = 0."""
    ut, ft = _lanczos_table()
    return np.interp(np.abs(u), ut, ft, right=0.0)


def is_resampled(native: float) -> bool:
    """Whether a camera with `native`-arcsec pixels is resampled onto the coarser-than-native 0.262" coadd grid."""
    return native > PIXEL_SCALE * (1 + 1e-6)


@lru_cache(maxsize=8)
def resampled_noise_factor(native: float) -> float:
    """Per-pixel sigma of resampled noise over that of white noise with the same depth (the same low-frequency power).

    Noise that is white on `native`-arcsec camera pixels and Lanczos-3 resampled onto the 0.262" grid keeps its
    power below the camera's Nyquist frequency and loses it above: per pixel it is s_o ∫ |L(f s_n)|² df over the
    coadd's band (per axis; the 2-D kernel is separable). 1.0 for cameras already on the coadd's pixel scale.
    """
    if not is_resampled(native):
        return 1.0
    f = np.linspace(-0.5 / PIXEL_SCALE, 0.5 / PIXEL_SCALE, 4001)
    return float(PIXEL_SCALE * integrate.trapezoid(lanczos_ft(f * native) ** 2, f))
