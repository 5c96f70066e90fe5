"""What the catalogue draws from: priors, SED templates through the filters, cosmology, and per-object random streams.

The tables (`get_tables`) are built once per process (~1 s: the four GalSim CWW templates redshifted through the
DECam and the north's filters with speclite, Planck18 distances, the Baldry+12 mass function and the soft flux limit)
and handed to worker processes by the pool initialiser. The random streams are counter-based: every uniform is a
pure function of (seed, object index, named column), so an object is the same whatever the number of objects,
workers or shard size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import special

from astrolom.mock.instruments import FILTER_NAMES, TELESCOPES, spectrum_wavelength

TEMPLATES = ("E", "Sbc", "Scd", "Im")
Z_MIN, Z_MAX, Z0 = 0.01, 0.5, 0.085  # p(z) ∝ z² exp(-(z/z0)^1.5): median ≈ 1.41 z0 ≈ 0.12
LOGM_MIN, LOGM_MAX = 9.0, 11.8
R_LIMIT = 19.5  # soft bright-sample flux limit used to truncate the mass function at each redshift
M_SUN_R = 4.64  # AB absolute magnitude of the Sun in r


# --- precomputed tables (templates, filters, cosmology), built once per process ---------------------------------
@dataclass
class Tables:
    """Per-process lookup tables: templates through the filters on a redshift grid, distances, the mass function."""

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


def _build_tables() -> Tables:
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
    log_ml = log_ml_r(gr_rest)
    abs_r_lim = R_LIMIT - dist_mod + 2.5 * np.log10(maggies[t_ref, 1])
    logm_limit = log_ml + (M_SUN_R - abs_r_lim) / 2.5

    return Tables(
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


_TABLES: Tables | None = None


def get_tables() -> Tables:
    """The tables of this process, built on first use (or handed over by the pool initialiser)."""
    global _TABLES
    if _TABLES is None:
        _TABLES = _build_tables()
    return _TABLES


def init_worker(tables: Tables) -> None:
    """Pool initialiser: share the main process's tables; one OpenMP thread per worker (workers = cores)."""
    import galsim

    global _TABLES
    _TABLES = tables
    galsim.utilities.set_omp_threads(1)


def log_ml_r(g_minus_r_rest: np.ndarray) -> np.ndarray:
    """Bell & de Jong (2003) r-band mass-to-light ratio from rest-frame g - r, shifted to a Chabrier IMF."""
    return -0.306 + 1.097 * np.asarray(g_minus_r_rest) - 0.093


# --- per-object randomness: counter-based, a pure function of (seed, index, column) -----------------------------
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


def _column_uniforms(seed: int, index: np.ndarray, names, first: int) -> dict[str, np.ndarray]:
    """Uniforms in (0, 1), one per (object, named column); column j of `names` is stream `first + j`."""
    with np.errstate(over="ignore"):
        base = _splitmix64(_splitmix64(np.full(index.shape, seed, dtype=np.uint64)) ^ index.astype(np.uint64))
        out = {}
        for j, name in enumerate(names):
            bits = _splitmix64(base + np.uint64(first + j) * np.uint64(0xD1B54A32D192ED03))
            out[name] = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    return out


def uniforms(seed: int, index: np.ndarray) -> dict[str, np.ndarray]:
    """Uniforms in (0, 1), one per (object, named column), independent of how many objects are drawn."""
    return _column_uniforms(seed, index, _U_COLUMNS, 1)


def normal(u: np.ndarray) -> np.ndarray:
    """Standard normal deviates from uniforms (inverse CDF: deterministic in u)."""
    return special.ndtri(u)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function."""
    return 1.0 / (1.0 + np.exp(-x))


_SPEC_U_COLUMNS = ("has_spec", "metal", "age", "fib_see")  # append only


def spectrum_uniforms(seed: int, index: np.ndarray) -> dict[str, np.ndarray]:
    """Uniforms for the spectrum physics, from the same counter-based stream as `uniforms` (own column range)."""
    return _column_uniforms(seed, index, _SPEC_U_COLUMNS, 1001)


@lru_cache(maxsize=1)
def universe_age_table() -> tuple[np.ndarray, np.ndarray]:
    """(z, age of the universe in Gyr) on a grid z = 0..1, Planck18."""
    from astropy.cosmology import Planck18

    z = np.linspace(0.0, 1.0, 201)
    return z, Planck18.age(z).value
