"""The mock Legacy Survey: physics that hangs together, images and spectra that match their labels, shards on disk.

Statistics use the catalogue alone (20k objects, ~1 s, no rendering); only a few dozen objects are rendered.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr

from astrolom import mock as S
from astrolom.data.records import IMAGE, IMAGE_SHAPE, METADATA_KEY, SPECTRUM
from astrolom.mock import catalogue
from astrolom.mock.tables import get_tables

REQUIRED = (
    "object_id split redshift log_mstar log_ssfr g_minus_r r_minus_z abs_mag_g abs_mag_z mag_r r_half_arcsec "
    "sersic_n bulge_frac axis_ratio edge_on telescope smooth disc edge_on_vote spiral"
).split()


@pytest.fixture(scope="module")
def cat():
    return S.sample_catalogue(20000, seed=11)


@pytest.fixture(scope="module")
def survey_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("survey") / "mock"
    S.generate_survey(out, n=23, size=32, seed=4, workers=1, shard_size=10, progress=False)
    return out


def _smooth(row: dict) -> dict:
    """The same object without arms, clumps, bar or star: bulge + disc only."""
    row = dict(row)
    row.update(has_bar=False, arm_strength=0.0, n_arms=0, clump_frac=0.0, has_star=False)
    return row


# ---------------------------------------------------------------------------------------------------- catalogue
def test_labels_present_and_in_physical_range(cat):
    assert set(REQUIRED) <= set(cat)
    n = len(cat["object_id"])
    for name in S.LABELS:
        assert len(cat[name]) == n, name
        if name not in S.STR_LABELS:
            assert np.all(np.isfinite(np.asarray(cat[name], dtype=float))), name
    ranges = {
        "redshift": (0.01, 0.5),
        "log_mstar": (9.0, 11.8),
        "log_ssfr": (-14.5, -8.0),
        "g_minus_r": (0.0, 2.2),
        "r_minus_z": (0.0, 1.5),
        "abs_mag_g": (-24.5, -15.0),
        "abs_mag_z": (-25.5, -16.0),
        "mag_r": (10.0, 23.0),
        "r_half_arcsec": (0.05, 40.0),
        "sersic_n": (1.0, 5.5),
        "bulge_frac": (0.0, 1.0),
        "axis_ratio": (catalogue.DISC_Q0, 1.0),
        "inclination_deg": (0.0, 90.0),
        "psf_fwhm_r": (0.7, 3.5),
        "noise_r": (1e-3, 0.1),
        "sigma_v": (25.0, 300.0),
    }
    for name, (lo, hi) in ranges.items():
        a = cat[name]
        assert lo <= a.min() and a.max() <= hi, (name, a.min(), a.max())
    for name in ("smooth", "disc", "artefact", "edge_on_vote", "spiral", "bar"):
        a = cat[name]
        assert 0.0 <= a.min() and a.max() <= 1.0, name
    np.testing.assert_allclose(cat["smooth"] + cat["disc"] + cat["artefact"], 1.0, atol=1e-12)
    votes = cat["smooth"] * S.N_VOLUNTEERS  # fractions of 40 volunteers
    np.testing.assert_allclose(votes, np.round(votes), atol=1e-9)
    np.testing.assert_allclose(cat["g_minus_r"], cat["mag_g"] - cat["mag_r"])
    np.testing.assert_allclose(cat["log_sfr"], cat["log_mstar"] + cat["log_ssfr"])
    assert set(np.unique(cat["telescope"])) == {"north", "south"}
    assert set(np.unique(cat["split"])) == {"train", "val", "test"}
    for name in S.BOOL_LABELS:
        assert cat[name].dtype == bool


def test_redshift_prior_and_flux_limit(cat):
    z = cat["redshift"]
    assert 0.10 < np.median(z) < 0.15
    # a bright, Legacy-BGS-like sample: most galaxies brighter than r = 19.5, more massive at higher z
    assert np.mean(cat["mag_r"] < 19.5) > 0.7
    lo, hi = z < 0.07, z > 0.2
    assert np.median(cat["log_mstar"][hi]) > np.median(cat["log_mstar"][lo]) + 0.5


def test_quenched_fraction_rises_with_mass_and_ssfr_is_bimodal(cat):
    m, q = cat["log_mstar"], cat["quenched"]
    fq = [q[(m >= lo) & (m < lo + 0.5)].mean() for lo in (9.0, 10.0, 11.0)]
    assert fq[0] < 0.05 and 0.15 < fq[1] < 0.5 and fq[2] > 0.85
    assert np.median(cat["log_ssfr"][q]) == pytest.approx(-12.0, abs=0.1)
    sf = ~q & (np.abs(m - 10.0) < 0.1)
    assert np.median(cat["log_ssfr"][sf]) == pytest.approx(-9.8, abs=0.1)
    assert np.std(cat["log_ssfr"][sf]) == pytest.approx(0.3, abs=0.05)


def test_quenched_galaxies_are_redder_at_fixed_redshift(cat):
    q = cat["quenched"]
    for z_lo in (0.06, 0.10, 0.16):
        sel = (cat["redshift"] > z_lo) & (cat["redshift"] < z_lo + 0.03)
        gr_q, gr_sf = np.median(cat["g_minus_r"][sel & q]), np.median(cat["g_minus_r"][sel & ~q])
        assert gr_q > gr_sf + 0.3, (z_lo, gr_q, gr_sf)
        assert np.median(cat["r_minus_z"][sel & q]) > np.median(cat["r_minus_z"][sel & ~q]) + 0.1
    # rest frame too, and observed colours redden with redshift (k-correction) for the red sequence
    rest = cat["abs_mag_g"] - cat["abs_mag_r"]
    assert np.median(rest[q]) > np.median(rest[~q]) + 0.25
    zq = cat["redshift"][q]
    assert spearmanr(zq, cat["g_minus_r"][q])[0] > 0.5


def test_size_and_flux_fall_with_redshift_at_fixed_mass(cat):
    m, z = cat["log_mstar"], cat["redshift"]
    for lo in (10.0, 10.6):
        sel = (m > lo) & (m < lo + 0.3)
        assert sel.sum() > 500
        assert spearmanr(z[sel], cat["r_half_arcsec"][sel])[0] < -0.4
        assert spearmanr(z[sel], cat["mag_r"][sel])[0] > 0.8  # fainter
        # at fixed mass the physical size does not depend on z: only the angular size does
        assert abs(spearmanr(z[sel], cat["r_half_kpc"][sel])[0]) < 0.1
    # angular size = physical size / (kpc per arcsec) from Planck18
    from astropy.cosmology import Planck18

    i = np.arange(0, 20000, 997)
    scale = Planck18.kpc_proper_per_arcmin(cat["redshift"][i]).value / 60.0
    np.testing.assert_allclose(cat["r_half_arcsec"][i], cat["r_half_kpc"][i] / scale, rtol=2e-3)


def test_size_mass_relations(cat):
    m, q, r = cat["log_mstar"], cat["quenched"], np.log10(cat["r_half_kpc"])
    slope_sf = np.polyfit(m[~q], r[~q], 1)[0]
    slope_q = np.polyfit(m[q], r[q], 1)[0]
    assert slope_sf == pytest.approx(0.22, abs=0.03)
    assert slope_q == pytest.approx(0.56, abs=0.06)
    resid = r[~q] - np.polyval(np.polyfit(m[~q], r[~q], 1), m[~q])
    assert np.std(resid) == pytest.approx(0.15, abs=0.02)


def test_morphology_follows_star_formation(cat):
    q = cat["quenched"]
    assert np.median(cat["bulge_frac"][q]) > 0.7 and np.median(cat["bulge_frac"][~q]) < 0.15
    assert 3.0 <= np.median(cat["sersic_n"][q]) <= 5.0 and np.median(cat["sersic_n"][~q]) < 1.5
    assert np.all(cat["arm_strength"][q] == 0) and np.all(cat["n_arms"][q] == 0)
    sf = ~q
    assert spearmanr(cat["log_ssfr"][sf], cat["arm_strength"][sf])[0] > 0.5
    assert cat["smooth"][q].mean() > 0.8 and cat["disc"][sf].mean() > 0.6
    assert cat["spiral"][cat["arm_strength"] > 0.3].mean() > cat["spiral"][q].mean() + 0.4
    assert cat["bar"][cat["has_bar"]].mean() > cat["bar"][~cat["has_bar"]].mean() + 0.3
    assert cat["artefact"][cat["has_star"]].mean() > cat["artefact"][~cat["has_star"]].mean()


def test_inclination_prior_edge_on_fraction_and_axis_ratio(cat):
    disc = cat["bulge_frac"] < 0.5
    n = disc.sum()
    expected = math.cos(math.radians(catalogue.EDGE_ON_DEG))  # isotropic: P(i > i0) = cos(i0)
    frac = cat["edge_on"][disc].mean()
    assert abs(frac - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    assert not cat["edge_on"][~disc].any()
    # cos i uniform on [0, 1]
    cosi = np.cos(np.radians(cat["inclination_deg"]))
    assert np.histogram(cosi, bins=5, range=(0, 1))[0].min() > 0.18 * len(cosi)
    # face-on discs are round, edge-on discs thin; the votes see it
    pure = cat["bulge_frac"] < 0.05
    eo = cat["edge_on"]
    assert np.median(cat["axis_ratio"][pure & eo]) < 0.3
    assert np.median(cat["axis_ratio"][pure & (cat["inclination_deg"] < 30)]) > 0.85
    assert cat["edge_on_vote"][eo].mean() > 0.7 and cat["edge_on_vote"][disc & ~eo].mean() < 0.2


def test_telescopes_differ(cat):
    north = cat["telescope"] == "north"
    assert north.mean() == pytest.approx(0.34, abs=0.02)  # dec > 32.375 on -20 < dec < 80
    assert np.array_equal(north, cat["dec"] > S.NORTH_DEC)
    # each camera's median seeing, as in TELESCOPES (BASS blurrier in g and r, MzLS sharper in z than DECam)
    for b, band in enumerate(S.BANDS):
        for tel, mask in (("north", north), ("south", ~north)):
            assert np.median(cat[f"psf_fwhm_{band}"][mask]) == pytest.approx(S.TELESCOPES[tel]["fwhm"][b], rel=0.02)
    med = {(t, b): np.median(cat[f"psf_fwhm_{b}"][m]) for t, m in (("n", north), ("s", ~north)) for b in S.BANDS}
    assert med["n", "g"] > med["s", "g"] + 0.25 and med["n", "r"] > med["s", "r"] + 0.25
    assert med["n", "z"] < med["s", "z"] - 0.07
    # a wider seeing distribution in the north, and its z seeing independent of its g seeing (another telescope)
    spread = {t: np.std(np.log(cat["psf_fwhm_r"][m])) for t, m in (("n", north), ("s", ~north))}
    assert spread["n"] > spread["s"] + 0.02
    assert spearmanr(cat["psf_fwhm_g"][north], cat["psf_fwhm_z"][north])[0] < 0.1
    assert spearmanr(cat["psf_fwhm_g"][~north], cat["psf_fwhm_z"][~north])[0] > 0.8
    # depth: the white-equivalent noise follows the 5-sigma depths (0.4 mag shallower in g and r in the north)
    for band in ("g", "r"):
        fw_ratio = np.median(cat[f"psf_fwhm_{band}"][north]) / np.median(cat[f"psf_fwhm_{band}"][~north])
        ratio = np.median(cat[f"_noise_white_{band}"][north]) / np.median(cat[f"_noise_white_{band}"][~north])
        assert ratio * fw_ratio == pytest.approx(10 ** (0.4 * 0.4), rel=0.05)
    # pixels: the north's g, r come from 0.454" pixels, so per-pixel noise is the white-equivalent times the factor
    f = S.resampled_noise_factor(0.454)
    assert 0.45 < f < 0.6 and S.resampled_noise_factor(S.PIXEL_SCALE) == 1.0
    np.testing.assert_allclose(cat["noise_g"][north], f * cat["_noise_white_g"][north])
    np.testing.assert_allclose(cat["noise_z"], cat["_noise_white_z"])
    np.testing.assert_allclose(cat["noise_r"][~north], cat["_noise_white_r"][~north])


def _synthetic_offsets(row: dict) -> np.ndarray:
    """North-filter minus DECam magnitudes of an object's SED by speclite synthetic photometry (independent grid)."""
    from speclite import filters

    T = get_tables()
    i0, w1, z = int(row["_t0"]), row["_w1"], row["redshift"]
    rest = (1 - w1) * T.tmpl_flux[i0] + w1 * T.tmpl_flux[i0 + 1]
    wave = np.arange(3300.0, 11000.0, 1.0)
    flux = np.interp(wave / (1 + z), T.tmpl_wave, rest) / (1 + z)
    north = filters.load_filters(*S.TELESCOPES["north"]["filters"]).get_ab_magnitudes(flux, wave)
    south = filters.load_filters(*S.FILTER_NAMES).get_ab_magnitudes(flux, wave)
    return np.array(
        [float(north[0][n]) - float(south[0][s]) for n, s in zip(north.colnames, south.colnames, strict=True)]
    )


def test_north_filter_offsets_match_speclite_synthetic_photometry(cat):
    north = cat["telescope"] == "north"
    idx = np.flatnonzero(north)
    order = np.argsort(cat["sed_type"][idx])
    for j in idx[order[np.linspace(0, idx.size - 1, 6).astype(int)]]:  # from ellipticals to irregulars
        row = S.catalogue_row(cat, j)
        got = np.array([row[f"_zp_offset_{b}"] for b in S.BANDS])
        np.testing.assert_allclose(got, _synthetic_offsets(row), atol=2e-3)
    off_g = cat["_zp_offset_g"][north]
    assert 0.01 < np.median(off_g) < 0.06 and np.all(np.abs(cat["_zp_offset_z"][north]) < 0.03)
    assert spearmanr(cat["g_minus_r"][north], off_g)[0] > 0.8  # a colour term: redder galaxies, larger offset
    for band in S.BANDS:  # the south is DECam: its images carry the labels' magnitudes
        assert np.all(cat[f"_zp_offset_{band}"][~north] == 0.0) and np.all(cat[f"_star_offset_{band}"][~north] == 0)
    # stars: blackbodies spanning the drawn colours, with the same kind of colour term in g
    T = get_tables()
    assert T.star_gr.min() < 0.3 and T.star_gr.max() > 1.4 and np.all(np.diff(T.star_gr) > 0)
    star = cat["has_star"] & north
    assert spearmanr(cat["_star_gr"][star], cat["_star_offset_g"][star])[0] > 0.9


def test_north_noise_is_resampled_correlated_noise_at_the_same_depth():
    cat = S.sample_catalogue(200, seed=3)
    for tel in ("north", "south"):
        row = _smooth(S.catalogue_row(cat, int(np.flatnonzero(cat["telescope"] == tel)[0])))
        row.update(mag_g=40.0, mag_r=40.0, mag_z=40.0)  # an empty stamp: noise only
        img = S.render_image(row, 64).astype(np.float64)
        for b, band in enumerate(S.BANDS):
            x = img[:, :, b] - img[:, :, b].mean()
            lag1 = (x[:, 1:] * x[:, :-1]).mean() / x.var()
            if tel == "north" and band in ("g", "r"):
                assert 0.45 < lag1 < 0.7, (tel, band, lag1)  # resampled from 0.454" pixels
            else:
                assert abs(lag1) < 0.06, (tel, band, lag1)
            assert x.std() == pytest.approx(row[f"noise_{band}"], rel=0.06)
            # the noise of 8x8-pixel means is the white-equivalent noise / 8: the depth is the same
            blocks = x.reshape(8, 8, 8, 8).mean(axis=(1, 3))
            assert blocks.std() == pytest.approx(row[f"_noise_white_{band}"] / 8, rel=0.3)


@pytest.mark.slow
def test_instrument_differences_switch_off_one_by_one():
    full = S.sample_catalogue(3000, seed=9)
    none = S.sample_catalogue(3000, seed=9, instrument=())
    north = full["telescope"] == "north"
    votes = ("smooth", "disc", "artefact", "edge_on_vote", "spiral", "bar")  # volunteers see the seeing
    for k in S.LABELS:  # the physics does not change, only the observing conditions
        if not k.startswith(("psf_fwhm_", "noise_")) and k not in votes:
            np.testing.assert_array_equal(full[k], none[k])
    for band in S.BANDS:  # with every difference off the north is drawn exactly as the south
        assert np.all(none[f"_zp_offset_{band}"] == 0) and np.all(none[f"_native_scale_{band}"] == S.PIXEL_SCALE)
        for key in (f"psf_fwhm_{band}", f"noise_{band}"):
            a, b = none[key][north], none[key][~north]
            assert np.median(a) == pytest.approx(np.median(b), rel=0.03)
        np.testing.assert_array_equal(full[f"psf_fwhm_{band}"][~north], none[f"psf_fwhm_{band}"][~north])
    only_filters = S.sample_catalogue(3000, seed=9, instrument=("filters",))
    np.testing.assert_array_equal(only_filters["_zp_offset_g"], full["_zp_offset_g"])
    np.testing.assert_array_equal(only_filters["psf_fwhm_g"], none["psf_fwhm_g"])
    only_pixels = S.sample_catalogue(3000, seed=9, instrument=("pixels",))
    assert np.all(only_pixels["_native_scale_g"][north] == 0.454) and np.all(only_pixels["_zp_offset_g"] == 0)
    # south images are the same whatever the north's settings
    j = int(np.flatnonzero(~north)[0])
    np.testing.assert_array_equal(
        S.render_image(S.catalogue_row(full, j), 32), S.render_image(S.catalogue_row(none, j), 32)
    )
    assert S.parse_instrument("-pixels,-psf") == ("filters", "depth")
    assert S.parse_instrument("all") == S.INSTRUMENT_EFFECTS and S.parse_instrument("none") == ()
    assert S.parse_instrument("psf, filters") == ("filters", "psf")
    with pytest.raises(ValueError, match="seeing"):
        S.parse_instrument("filters,seeing")


def test_objects_do_not_depend_on_n_or_start():
    a = S.sample_catalogue(50, seed=3)
    b = S.sample_catalogue(10, seed=3, start=20)
    c = S.sample_catalogue(50, seed=4)
    for name in ("object_id", "split", "redshift", "log_mstar", "smooth", "spiral", "psf_fwhm_g"):
        assert np.array_equal(a[name][20:30], b[name]), name
    assert not np.allclose(a["redshift"], c["redshift"])
    assert a["object_id"][7] == "mls-3-000000007"


# ------------------------------------------------------------------------------------------------------- images
def test_fourier_renderer_matches_galsim_drawimage():
    import galsim

    cat = S.sample_catalogue(12, seed=1)
    for j in range(12):
        row = _smooth(S.catalogue_row(cat, j))
        if row["r_half_arcsec"] > 2.0 or row["_native_scale_r"] != S.PIXEL_SCALE:  # (resampled: pixel differs)
            continue
        img = S.render_image(row, 48, noise=False)
        beta = math.radians(row["position_angle_deg"]) * galsim.radians
        b = 1  # r band: bulge and disc have the same colour weight
        flux = 10 ** (-0.4 * (row["mag_r"] + row["_zp_offset_r"] - S.ZERO_POINT))
        bt = row["bulge_frac"]
        gal = galsim.Add(
            galsim.Sersic(row["_n_bulge"], half_light_radius=row["_r_bulge"]).shear(q=row["_q_bulge"], beta=beta)
            * (bt * flux),
            galsim.Exponential(half_light_radius=row["_r_disc"]).shear(q=row["_q_disc"], beta=beta) * ((1 - bt) * flux),
        )
        psf = galsim.Moffat(beta=3.0, fwhm=row["psf_fwhm_r"]).shear(g1=row["_psf_g1"], g2=row["_psf_g2"])
        ref = galsim.Convolve(gal, psf).drawImage(
            nx=48, ny=48, scale=S.PIXEL_SCALE, offset=(row["_offset_x"], row["_offset_y"])
        )
        # identical up to the faint Sérsic wings that wrap around the padded Fourier grid
        np.testing.assert_allclose(img[:, :, b], ref.array, rtol=0, atol=1e-3 * ref.array.max())
        assert img[:, :, b].sum() == pytest.approx(ref.array.sum(), rel=5e-3)


def test_rendered_images_shape_flux_and_centre():
    cat = S.sample_catalogue(30, seed=7)
    checked = 0
    for j in range(30):
        row = S.catalogue_row(cat, j)
        img = S.render_image(row, 64)
        assert img.shape == (64, 64, 3) and img.dtype == np.float32 and np.isfinite(img).all()
        # noise matches the label in an empty corner (ignoring stamps with a star)
        if not row["has_star"] and row["r_half_arcsec"] < 3:
            corner = img[:12, :12, 1]
            assert np.std(corner) == pytest.approx(row["noise_r"], rel=0.3)
        if row["r_half_arcsec"] > 1.0 or row["has_star"]:
            continue
        clean = S.render_image(row, 64, noise=False)
        flux = np.array([10 ** (-0.4 * (row[f"mag_{b}"] + row[f"_zp_offset_{b}"] - S.ZERO_POINT)) for b in S.BANDS])
        ratio = clean.sum(axis=(0, 1)) / flux
        assert np.all((ratio > 0.9) & (ratio < 1.005)), ratio  # Sérsic wings beyond the stamp are lost
        # the smooth (bulge + disc) light is centred on the stamp centre plus the sub-pixel jitter
        sym = S.render_image(_smooth(row), 64, noise=False)[:, :, 1]
        yy, xx = np.mgrid[:64, :64]
        w = sym / sym.sum()
        assert (w * xx).sum() == pytest.approx(31.5 + row["_offset_x"], abs=0.05)
        assert (w * yy).sum() == pytest.approx(31.5 + row["_offset_y"], abs=0.05)
        # flux concentrated in the centre: most of the light in the central 16×16 pixels (4.2″), and the
        # noisy central surface brightness far above the outskirts'
        assert np.all(clean[24:40, 24:40].sum(axis=(0, 1)) > 0.6 * clean.sum(axis=(0, 1)))
        central = img[24:40, 24:40].mean(axis=(0, 1))
        outer = (img.sum(axis=(0, 1)) - img[24:40, 24:40].sum(axis=(0, 1))) / (64 * 64 - 16 * 16)
        assert np.all(central > 10 * np.abs(outer)), (central, outer)
        checked += 1
    assert checked >= 5


def _fwhm(im: np.ndarray, cx: float, cy: float) -> float:
    """FWHM (arcsec) from the azimuthally averaged profile in 0.25-pixel rings."""
    yy, xx = np.mgrid[: im.shape[0], : im.shape[1]]
    r = np.hypot(xx - cx, yy - cy).ravel()
    v = (im / im.max()).ravel()
    ring = (r / 0.25).astype(int)
    count = np.bincount(ring)
    keep = count > 0
    prof = np.bincount(ring, weights=v)[keep] / count[keep]
    rc = (np.arange(count.size)[keep] + 0.5) * 0.25
    k = int(np.argmax(prof < 0.5))
    r_half = np.interp(0.5, [prof[k], prof[k - 1]], [rc[k], rc[k - 1]])
    return 2 * r_half * S.PIXEL_SCALE


def test_psf_fwhm_of_point_like_object_matches_label_and_telescope():
    cat = S.sample_catalogue(400, seed=2)
    fwhm = {"north": [], "south": []}
    for tel in ("north", "south"):
        for j in np.flatnonzero(cat["telescope"] == tel)[:4]:
            row = _smooth(S.catalogue_row(cat, j))
            row.update(_r_disc=1e-3, _r_bulge=1e-3, _offset_x=0.5, _offset_y=0.5)  # point source on a pixel
            img = S.render_image(row, 64, noise=False)
            for b, band in enumerate(S.BANDS):
                measured = _fwhm(img[:, :, b], 32.0, 32.0)
                # the pixel response broadens the PSF by a few per cent
                assert measured == pytest.approx(row[f"psf_fwhm_{band}"] * 1.02, rel=0.04), (band, measured)
                if band == "r":
                    fwhm[tel].append(measured)
    assert np.mean(fwhm["north"]) > np.mean(fwhm["south"]) + 0.2  # r: BASS (Bok) seeing is worse than DECam's


# ------------------------------------------------------------------------------------------------------ spectra
def _synthetic_mag(spec: np.ndarray, band: str) -> float:
    from speclite import filters

    f = filters.load_filters(f"decam2014-{band}")[0]
    wave = S.spectrum_wavelength()
    resp = np.interp(wave, f.wavelength, f.response, left=0.0, right=0.0)
    num = np.trapezoid(spec * 1e-17 * wave * resp, wave)
    den = np.trapezoid(3631e-23 * 2.99792458e18 / wave**2 * wave * resp, wave)
    return -2.5 * math.log10(num / den)


def test_spectra_match_photometry_and_lines_match_sfr():
    cat = S.sample_catalogue(40, seed=9)
    wave = S.spectrum_wavelength()
    assert wave[0] == 3600.0 and wave[-1] == 9800.0 and wave.size == 3101
    seen_lines = 0
    for j in range(40):
        row = S.catalogue_row(cat, j)
        cont = S.render_spectrum(row, noise=False, lines=False)
        assert cont.dtype == np.float32 and cont.shape == wave.shape
        fibre = -2.5 * math.log10(row["fiber_frac"])  # the spectrum holds the fibre's share of the light
        assert 0.0 < fibre < 3.5
        assert _synthetic_mag(cont, "r") == pytest.approx(row["mag_r"] + fibre, abs=0.01)
        assert _synthetic_mag(cont, "g") == pytest.approx(row["mag_g"] + fibre, abs=0.02)
        full = S.render_spectrum(row, noise=False)
        lam = S.LINES["ha"][0] * (1 + row["redshift"])
        win = np.abs(wave - lam) < 10
        if lam < 9700 and not row["quenched"]:
            line_flux = (full - cont)[win].sum() * S.SPEC_STEP
            assert line_flux == pytest.approx(row["flux_ha"] * row["fiber_frac"], rel=0.06)
            seen_lines += 1
        noisy = S.render_spectrum(row)
        assert np.isfinite(noisy).all()
        resid = (noisy - full)[(wave > 6000) & (wave < 6250)]
        assert np.std(resid) == pytest.approx(row["spec_noise"], rel=0.3)
    assert seen_lines >= 10
    # emission lines scale with SFR: Halpha flux * 4 pi d_L^2 tracks SFR (dust aside)
    big = S.sample_catalogue(5000, seed=9)
    sf = ~big["quenched"]
    dl = np.interp(big["redshift"], get_tables().z_grid, get_tables().lum_dist_cm)
    lum = np.log10(big["flux_ha"] * 1e-17 * 4 * np.pi * dl**2)
    assert spearmanr(big["log_sfr"][sf], lum[sf])[0] > 0.8


# ------------------------------------------------------------------------------------------------------- shards
def test_shards_schema_and_metadata(survey_dir):
    files = sorted(p.name for p in survey_dir.glob("shard-*.parquet"))
    assert files == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert not list(survey_dir.glob(".*tmp"))
    table = pq.read_table(survey_dir)
    assert table.num_rows == 23
    assert set(REQUIRED) | {IMAGE, IMAGE_SHAPE, SPECTRUM} <= set(table.column_names)
    assert table.column_names == list(S.COLUMNS)
    assert table.schema.field("edge_on").type == "bool" and table.schema.field("redshift").type == "double"
    meta = json.loads(pq.read_schema(survey_dir / files[0]).metadata[METADATA_KEY])
    assert meta["bands"] == ["g", "r", "z"] and meta["pixel_scale"] == 0.262
    assert meta["image_shape"] == [32, 32, 3] and meta["image_units"] == "nanomaggies"
    assert meta["seed"] == 4 and meta["generator"]["config"]["n"] == 23
    assert meta["generator"]["module"] == "astrolom.mock"
    # the facts the library reads from the data set instead of importing the mock (fine-tuning, figures)
    assert meta["vote_volunteers"] == 40
    assert meta["emission_lines"]["ha"] == 6564.61 and len(meta["emission_lines"]) == 7
    votes = np.array([r["smooth"] for r in table.select(["smooth"]).to_pylist()]) * meta["vote_volunteers"]
    np.testing.assert_allclose(votes, np.round(votes), atol=1e-9)
    wave = np.array(meta["wavelength"])
    assert wave.size == 3101 and wave[0] == 3600.0 and np.all(np.diff(wave) == 2.0)
    rows = table.to_pylist()
    ids = [r["object_id"] for r in rows]
    assert ids == [S.object_id(4, i) for i in range(23)]
    ref = S.generate_objects(3, size=32, seed=4, start=5)
    for rec in ref:
        row = rows[ids.index(rec.object_id)]
        img = np.frombuffer(row[IMAGE], dtype="<f4").reshape(row[IMAGE_SHAPE])
        assert row[IMAGE_SHAPE] == [32, 32, 3]
        np.testing.assert_array_equal(img, rec.image)
        if rec.spectrum is None:
            assert row[SPECTRUM] is None and row["spectrum_ivar"] is None and not row["has_spectrum"]
        else:
            np.testing.assert_array_equal(np.frombuffer(row[SPECTRUM], dtype="<f4"), rec.spectrum)
            np.testing.assert_array_equal(np.frombuffer(row["spectrum_ivar"], dtype="<f4"), rec.spectrum_ivar)
            np.testing.assert_array_equal(np.frombuffer(row["spectrum_mask"], dtype=np.uint8), rec.spectrum_mask)
        assert row["split"] == rec.split and row["redshift"] == rec.labels["redshift"]
    summary = json.loads((survey_dir / "_survey.json").read_text())
    assert summary["counts"]["total"] == 23
    assert sum(summary["counts"][s]["total"] for s in ("train", "val", "test")) == 23
    assert set(summary["labels"]) == set(S.LABELS) and summary["labels"]["r_half_arcsec"]["unit"] == "arcsec"


@pytest.mark.slow
def test_same_bytes_whatever_the_number_of_workers(survey_dir, tmp_path):
    S.generate_survey(tmp_path / "w2", n=23, size=32, seed=4, workers=2, shard_size=10, progress=False)
    a, b = pq.read_table(survey_dir), pq.read_table(tmp_path / "w2")
    assert a.equals(b)
    for name in ("shard-00000.parquet", "shard-00002.parquet"):  # the files themselves, metadata included
        assert (survey_dir / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    S.generate_survey(tmp_path / "one", n=23, size=32, seed=4, workers=1, shard_size=100, progress=False)
    assert pq.read_table(tmp_path / "one").equals(a)  # shard size does not matter either


def test_hugging_face_datasets_reads_the_shards(survey_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(
        "parquet", data_files=str(survey_dir / "shard-*.parquet"), split="train", cache_dir=str(tmp_path)
    )
    assert len(ds) == 23 and "redshift" in ds.column_names
    img = np.frombuffer(ds[0][IMAGE], dtype="<f4").reshape(ds[0][IMAGE_SHAPE])
    assert img.shape == (32, 32, 3) and np.isfinite(img).all()


@pytest.mark.slow
def test_split_fractions_are_respected():
    cat = S.sample_catalogue(20000, seed=0, split_fractions=(0.98, 0.01, 0.01))
    frac = {s: np.mean(cat["split"] == s) for s in ("train", "val", "test")}
    assert frac["train"] == pytest.approx(0.98, abs=0.005) and frac["val"] == pytest.approx(0.01, abs=0.003)


# ---------------------------------------------------------------------------------------------------------- CLI
def test_cli_writes_shards_and_prints_summary(tmp_path, capsys):
    from astrolom.cli import main

    out = tmp_path / "cli"
    argv = ["survey", "--n", "5", "--size", "32", "--seed", "2", "--out", str(out), "--workers", "1"]
    assert main([*argv, "--split-fractions", "0.6,0.2,0.2", "--shard-size", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "5 objects" in text and "train" in text and "north" in text and "redshift" in text
    assert "objects/s" in text
    assert len(list(out.glob("shard-*.parquet"))) == 3
    assert pq.read_table(out).num_rows == 5
    cfg = json.loads((out / "_survey.json").read_text())["config"]
    assert cfg["split_fractions"] == [0.6, 0.2, 0.2] and cfg["size"] == 32
    # refuses to mix two surveys in one directory, unless asked
    assert main([*argv, "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--no-progress", "--overwrite", "--n", "3"]) == 0
    assert pq.read_table(out).num_rows == 3


def _rows(folder) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("shard-*.parquet"))


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_switches_a_new_survey_in_and_a_failed_run_leaves_the_old_whole(tmp_path, monkeypatch):
    from astrolom.mock import writer

    out = tmp_path / "mock"
    S.generate_survey(out, n=6, size=32, seed=1, workers=1, shard_size=2, progress=False)
    (out / "notes.txt").write_text("mine")  # the user's files beside the survey
    (out / "sub").mkdir()
    (out / "sub" / "a.txt").write_text("also mine")
    before = _files(out)
    assert sorted(n for n in before if n.startswith("shard-")) == [f"shard-0000{i}.parquet" for i in range(3)]

    render, calls, seen = writer._render_chunk, [], {}

    def fail_mid_write(task):
        calls.append(task)
        if len(calls) == 4:  # one object a chunk, two a shard: the new survey's first shard is on disk by now
            (new,) = tmp_path.glob(".mock.tmp-*")
            seen["new"] = sorted(p.name for p in new.iterdir())
            seen["out"] = _files(out)
            raise RuntimeError("planted fault")
        return render(task)

    monkeypatch.setattr(writer, "_render_chunk", fail_mid_write)
    with pytest.raises(RuntimeError, match="planted fault"):
        S.generate_survey(out, n=6, size=32, seed=2, workers=1, shard_size=2, progress=False, overwrite=True)
    assert "shard-00000.parquet" in seen["new"] and "notes.txt" in seen["new"]  # it failed mid-write, beside out
    assert seen["out"] == before  # while it wrote, the old survey was untouched ...
    assert _files(out) == before  # ... and after the failure it is whole, with no temporary directory left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mock"]
    assert _rows(out) == 6

    monkeypatch.setattr(writer, "_render_chunk", render)
    (tmp_path / ".mock.tmp-999999").mkdir()  # left by a killed run: cleared by the next one
    (tmp_path / ".mock.tmp-999999" / "shard-00000.parquet").write_bytes(b"half")
    S.generate_survey(out, n=3, size=32, seed=2, workers=1, shard_size=2, progress=False, overwrite=True)
    after = _files(out)
    assert sorted(n for n in after if n.startswith("shard-")) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert after["notes.txt"] == b"mine" and after["sub/a.txt"] == b"also mine"
    assert json.loads(after["_survey.json"])["config"]["seed"] == 2 and _rows(out) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mock"]

    monkeypatch.chdir(out)  # the switch renames the directory: not the one the user stands in
    with pytest.raises(ValueError, match="current directory"):
        S.generate_survey(out, n=3, size=32, seed=2, workers=1, progress=False, overwrite=True)
    with pytest.raises(ValueError, match="is a file"):
        S.generate_survey(out / "notes.txt", n=3, size=32, progress=False)


@pytest.mark.parametrize("size", ["33", "30", "514", "0"])
def test_cli_rejects_bad_sizes(tmp_path, capsys, size):
    from astrolom.cli import main

    assert main(["survey", "--n", "2", "--size", size, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--size" in capsys.readouterr().err


def test_cli_rejects_bad_split_fractions(tmp_path, capsys):
    from astrolom.cli import main

    argv = ["survey", "--n", "2", "--out", str(tmp_path / "x"), "--split-fractions", "0.5,0.1,0.1"]
    assert main([*argv, "--no-progress"]) == 2
    assert "split-fractions" in capsys.readouterr().err


def test_cli_instrument_option(tmp_path, capsys):
    from astrolom.cli import main

    argv = ["survey", "--n", "2", "--size", "32", "--workers", "1", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "x"), "--instrument", "filters,seeing"]) == 2
    assert "seeing" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "y"), "--instrument=-pixels"]) == 0
    meta = json.loads((tmp_path / "y" / "_survey.json").read_text())
    assert meta["config"]["instrument"] == ["filters", "psf", "depth"]
