"""The catalogue: every object's physics, labels and render parameters, vectorised, without rendering.

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
- **Stellar populations** for the spectra: `log_zstar` (a Gallazzi+05-like mass–metallicity relation) and
  `age_mw_gyr` (mass-weighted age of the template mix); `has_spectrum` (about 70%, missing at random).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import special

from astrolom.data.records import DEFAULT_SPLIT_FRACTIONS, split_of
from astrolom.mock.instruments import (
    BANDS,
    FIBER_SEEING,
    FIBER_SEEING_SCATTER,
    INSTRUMENT_EFFECTS,
    NORTH_DEC,
    PIXEL_SCALE,
    SKY_MAG,
    TELESCOPES,
    ZERO_POINT,
    check_instrument,
    check_spectrum_aperture,
    fiber_fraction,
    resampled_noise_factor,
)
from astrolom.mock.tables import (
    LOGM_MAX,
    LOGM_MIN,
    M_SUN_R,
    TEMPLATES,
    Z0,
    Z_MAX,
    Z_MIN,
    get_tables,
    log_ml_r,
    normal,
    sigmoid,
    spectrum_uniforms,
    uniforms,
    universe_age_table,
)

N_VOLUNTEERS = 40
EDGE_ON_DEG = 75.0
DISC_Q0 = 0.18
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


def _binomial(u: np.ndarray, n: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Inverse-CDF binomial draws for n <= N_VOLUNTEERS (vectorised, deterministic in u)."""
    n = np.asarray(n).astype(np.int64)[:, None]
    p = np.clip(np.asarray(p, dtype=float), 0.0, 1.0)[:, None]
    k = np.arange(N_VOLUNTEERS + 1, dtype=np.int64)[None, :]
    with np.errstate(invalid="ignore"):
        cdf = np.where(k < n, special.bdtr(np.minimum(k, n), n, p), 1.0)
    return np.minimum((cdf < u[:, None]).sum(axis=1), n[:, 0]).astype(float)


def object_id(seed: int, index: int) -> str:
    """The id of object `index` of the survey drawn with `seed` (ids set the splits: `records.split_of`)."""
    return f"mls-{seed}-{index:09d}"


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
    T = get_tables()
    idx = np.arange(start, start + n, dtype=np.int64)
    U = uniforms(seed, idx)
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
    quenched = U["quench"] < sigmoid((logm - 10.5) / 0.22)
    ssfr_sf = -9.8 - 0.3 * (logm - 10.0) + 0.3 * normal(U["ssfr"])
    ssfr_q = -12.0 + 0.4 * normal(U["ssfr"])
    c["quenched"] = quenched
    c["log_ssfr"] = np.where(quenched, ssfr_q, ssfr_sf)
    c["log_sfr"] = c["log_mstar"] + c["log_ssfr"]

    # SED: template index 0..3 (E, Sbc, Scd, Im)
    t_q = np.clip(0.25 - 0.2 * (logm - 10.8) + 0.12 * normal(U["sed"]), 0.0, 0.7)
    t_sf = np.clip(1.0 + (c["log_ssfr"] + 10.4) / 0.55 + 0.15 * normal(U["sed"]), 0.6, 3.0)
    sed_type = np.where(quenched, t_q, t_sf)
    c["sed_type"] = sed_type
    i0 = np.clip(np.floor(sed_type).astype(int), 0, len(TEMPLATES) - 2)
    w1 = sed_type - i0
    c["_t0"], c["_w1"] = i0, w1
    rest_maggies = (1 - w1)[:, None] * 10 ** (-0.4 * T.rest_mags[i0]) + w1[:, None] * 10 ** (-0.4 * T.rest_mags[i0 + 1])
    rest_col = -2.5 * np.log10(rest_maggies)  # (n, B), r column == 0
    log_ml = log_ml_r(rest_col[:, 0] - rest_col[:, 1])
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
    r_kpc = 10 ** (np.where(quenched, log_re_q, log_re_sf) + 0.15 * normal(U["size"]))
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
    arm = np.clip(0.1 + 0.25 * (c["log_ssfr"] + 10.6) + 0.12 * normal(U["arm_str"]), 0.0, 0.6)
    arm = np.where(sf & (arm > 0.05), arm, 0.0)
    c["arm_strength"] = arm
    c["n_arms"] = np.where(arm > 0, np.where(U["arms_n"] < 0.7, 2, np.where(U["arms_n"] < 0.9, 3, 4)), 0)
    c["_pitch_deg"] = 10.0 + 20.0 * U["pitch"]
    c["clump_frac"] = np.where(sf, np.clip(0.04 + 0.1 * (c["log_ssfr"] + 10.0), 0.0, 0.25) * U["clump"] * 2, 0.0)
    c["clump_frac"] = np.clip(c["clump_frac"], 0.0, 0.3)
    c["has_bar"] = is_disc & (logm > 9.8) & (U["bar"] < 0.35)
    c["_bar_len"] = 0.6 + 0.6 * U["bar_len"]  # bar half-light radius in disc half-light radii

    # observing conditions: each telescope's own seeing, depth, pixels and filters (see `astrolom.mock.instruments`)
    north_is = {e: north & (e in instrument) for e in INSTRUMENT_EFFECTS}  # north objects that get each difference
    S_, N_ = TELESCOPES["south"], TELESCOPES["north"]

    def per_tel(key: str, effect: str) -> np.ndarray:  # (n, B)
        return np.where(north_is[effect][:, None], np.array(N_[key], dtype=float), np.array(S_[key], dtype=float))

    fwhm0, scatter, depth0 = per_tel("fwhm", "psf"), per_tel("seeing_scatter", "psf"), per_tel("depth", "depth")
    c["_native_scale"] = per_tel("native_scale", "pixels")  # (n, B), popped into per-band keys below
    # one seeing draw per camera (its bands are taken on the same nights at one site); the north's z comes from
    # another telescope (Mayall) than its g and r (Bok), so it gets its own draw
    second_cam = north_is["psf"][:, None] & (np.array(N_["camera"]) != N_["camera"][0])[None, :]
    common = np.where(second_cam, normal(U["seeing_cam2"])[:, None], normal(U["seeing"])[:, None])
    sky = np.array(SKY_MAG)
    for b, band in enumerate(BANDS):
        fw = fwhm0[:, b] * np.exp(scatter[:, b] * common[:, b] + 0.04 * normal(U[f"see_{band}"]))
        fw = np.clip(fw, 0.7, 3.5)
        c[f"psf_fwhm_{band}"] = fw
        depth = depth0[:, b] + 0.2 * normal(U[f"depth_{band}"])
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
    c["_psf_g1"] = 0.025 * normal(U["psf_g1"])
    c["_psf_g2"] = 0.025 * normal(U["psf_g2"])

    # contaminating star
    c["has_star"] = U["star"] < 0.12
    c["_star_mag_r"] = 17.5 + 4.0 * U["star_mag"]
    c["_star_gr"] = 0.3 + 1.1 * U["star_col"]
    for b, band in enumerate(BANDS):  # stars are blackbodies seen through the same filters as the galaxy
        off = np.interp(c["_star_gr"], T.star_gr, T.star_north_offset[b])
        c[f"_star_offset_{band}"] = np.where(north_is["filters"], off, 0.0)

    # Galaxy-Zoo-like votes
    resolved = sigmoid((np.log(r_as / c["psf_fwhm_r"]) - np.log(0.7)) / 0.3)
    bright = sigmoid((20.0 - c["mag_r"]) / 0.6)
    vis = resolved * bright
    discness = sigmoid((0.45 - bt) / 0.07)
    p_art = 0.01 + 0.35 * c["has_star"] * sigmoid((19.5 - c["_star_mag_r"]) / 0.6)
    edge_vis = sigmoid((incl - 74.0) / 3.0) * discness
    p_feat = (1 - p_art) * np.clip(0.04 + 0.9 * discness * (0.25 + 0.75 * np.maximum(vis, edge_vis)), 0, 1)
    nv = np.full(n, N_VOLUNTEERS)
    k_s = _binomial(U["vote_s"], nv, 1 - p_feat - p_art)
    k_a = _binomial(U["vote_a"], nv - k_s, p_art / np.maximum(p_feat + p_art, 1e-9))
    k_d = nv - k_s - k_a
    c["smooth"], c["disc"], c["artefact"] = k_s / nv, k_d / nv, k_a / nv
    p_edge = 0.03 + 0.92 * sigmoid((incl - 74.0) / 3.5) * discness
    k_e = _binomial(U["vote_e"], k_d, p_edge)
    c["edge_on_vote"] = np.where(k_d > 0, k_e / np.maximum(k_d, 1), 0.0)
    k_f = k_d - k_e  # face-on disc voters
    p_sp = 0.05 + 0.9 * sigmoid((arm - 0.15) / 0.05) * (0.3 + 0.7 * vis)
    p_bar = 0.05 + 0.75 * c["has_bar"] * (0.2 + 0.8 * vis)
    c["spiral"] = np.where(k_f > 0, _binomial(U["vote_sp"], k_f, p_sp) / np.maximum(k_f, 1), 0.0)
    c["bar"] = np.where(k_f > 0, _binomial(U["vote_b"], k_f, p_bar) / np.maximum(k_f, 1), 0.0)

    # emission lines (observed fluxes, 1e-17 erg/s/cm²)
    dl = np.interp(z, T.z_grid, T.lum_dist_cm)
    a_ha = np.clip(0.35 + 0.55 * (logm - 10.0) + 0.2 * normal(U["dust"]), 0.0, 2.5)
    l_ha = 1.27e41 * 10 ** c["log_sfr"]  # Kennicutt (1998), erg/s, intrinsic
    f_ha_int = l_ha / (4 * np.pi * dl**2) * 1e17
    c.update(_stellar_population(c, seed, idx, quenched))
    # [NII]/Halpha follows the metallicity (gas and stars enriched together; N2 flattens at high Z)
    log_nii = np.clip(-0.54 + 0.75 * c["log_zstar"] + 0.07 * normal(U["nii"]), -1.4, -0.1)
    log_oiii = np.clip(0.1 - 0.55 * (logm - 9.7) + 0.15 * normal(U["oiii"]), -0.8, 0.8)
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
    c["sigma_v"] = np.clip(40.0 + 55.0 * (logm - 9.0) + 15.0 * normal(U["sigv"]), 25.0, 300.0)
    c["spec_noise"] = 0.5 * np.exp(0.25 * normal(U["spec_noise"]))
    # the fibre: seeing while the spectrum was taken, and the share of the galaxy's light the spectrum carries
    see = FIBER_SEEING * np.exp(FIBER_SEEING_SCATTER * normal(spectrum_uniforms(seed, idx)["fib_see"]))
    c["fiber_seeing"] = np.clip(see, 0.6, 3.0)
    if spectrum_aperture == "fiber":  # bulge and disc circularised (r sqrt(q)); bar, arms and clumps count as disc
        c["fiber_frac"] = fiber_fraction(
            bt, n_b, c["_r_bulge"] * np.sqrt(q_b), c["_r_disc"] * np.sqrt(q_d), c["fiber_seeing"]
        )
    else:
        c["fiber_frac"] = np.ones(n)
    c["_dist_mod"] = dm
    return c


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


SPEC_MISSING_FRACTION = 0.3  # objects without a spectrum (missing completely at random, so probes stay unbiased)
TEMPLATE_AGE_GYR = (10.0, 6.0, 3.5, 1.5)  # mass-weighted age of the E, Sbc, Scd, Im populations today


def _stellar_population(c: Mapping[str, np.ndarray], seed: int, idx: np.ndarray, quenched: np.ndarray) -> dict:
    """Metallicity, mass-weighted age and spectrum availability for a catalogue under construction.

    - log Z*/Z☉ follows a stellar mass-metallicity relation shaped like Gallazzi et al. (2005): about -0.55 at
      10^9 M☉, rising and flattening to ~0 above 10^11 M☉, quenched galaxies +0.05, 0.1 dex scatter.
    - The age is the mass-weighted mean of the template ages, weighted by each template's share of the r-band light
      times its mass-to-light ratio (Bell & de Jong from the template's rest g - r), scaled by the age of the
      universe at the galaxy's redshift relative to today, with 0.05 dex scatter (capped at 95% of that age).
    """
    T = get_tables()
    U = spectrum_uniforms(seed, idx)
    logm = c["log_mstar"]
    log_z = 0.05 - 0.6 * np.exp(-(logm - 9.0) / 0.9) + 0.05 * quenched + 0.1 * normal(U["metal"])
    i0, w1 = c["_t0"], c["_w1"]
    ml = 10 ** log_ml_r(T.rest_mags[:, 0] - T.rest_mags[:, 1])  # (templates,)
    ages = np.asarray(TEMPLATE_AGE_GYR)
    m0, m1 = (1 - w1) * ml[i0], w1 * ml[i0 + 1]
    age0 = (m0 * ages[i0] + m1 * ages[i0 + 1]) / (m0 + m1)
    zt, at = universe_age_table()
    t_univ = np.interp(c["redshift"], zt, at)
    # the scatter never makes a population older than 95% of the universe at that redshift
    age = np.minimum(age0 * t_univ / at[0] * 10 ** (0.05 * normal(U["age"])), 0.95 * t_univ)
    return {
        "log_zstar": np.clip(log_z, -1.2, 0.4),
        "age_mw_gyr": age,
        "has_spectrum": U["has_spec"] >= SPEC_MISSING_FRACTION,
    }
