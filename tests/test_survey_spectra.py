"""The mock survey's spectra: ivar, masks, missing spectra, metallicity and age labels."""

import numpy as np
import pytest
from scipy import stats

from astrolom import mock as S
from astrolom.data.spectra import tokenize_spectra
from astrolom.mock import catalogue
from astrolom.mock.spectra import ABSORPTION
from astrolom.mock.tables import universe_age_table


@pytest.fixture(scope="module")
def big():
    return S.sample_catalogue(4000, seed=11)


@pytest.fixture(scope="module")
def rows():
    cat = S.sample_catalogue(60, seed=12)
    return [S.catalogue_row(cat, j) for j in range(60)]


def test_ivar_matches_the_noise_and_masked_pixels_are_unusable(rows):
    seen = 0
    wave = S.spectrum_wavelength()
    sky = S.sky_line_mask()
    expected = sum(int((np.abs(wave - line) <= 2.0).sum()) for line in S.SKY_LINES)  # 2-3 pixels per line
    assert sky.sum() == expected and 22 <= expected <= 33
    for row in rows:
        spec = S.observe_spectrum(row)
        if spec is None:
            assert not row["has_spectrum"]
            continue
        seen += 1
        clean = S.render_spectrum(row, noise=False)
        good = spec.good
        pull = (spec.flux[good] - clean[good]) * np.sqrt(spec.ivar[good])
        assert spec.mask[sky].all() and (spec.ivar[spec.mask] == 0).all()
        assert np.isnan(spec.flux[spec.mask]).all() and np.isfinite(spec.flux[~spec.mask]).all()
        assert good.sum() >= wave.size - 45
        assert np.std(pull) == pytest.approx(1.0, abs=0.06)
        assert abs(np.mean(pull)) < 0.06
        again = S.observe_spectrum(row)
        np.testing.assert_array_equal(again.flux, spec.flux)  # NaNs in the same places
        np.testing.assert_array_equal(again.mask, spec.mask)
    assert 30 <= seen <= 54


def test_tokens_of_an_observed_spectrum_exclude_its_masked_pixels(rows):
    row = next(r for r in rows if r["has_spectrum"])
    spec = S.observe_spectrum(row)
    tok = tokenize_spectra(spec.flux[None], spec.wavelength, good=spec.good[None], patch=32)
    assert int(tok.value_mask[0, :, :-1].sum()) == int(spec.good.sum())
    k = int(np.argmin(np.abs(spec.wavelength - 5578.9)))  # [OI] sky line
    assert not tok.value_mask[0, k // 32, k % 32]
    assert tok.values[0, k // 32, k % 32] == 0.0


def test_about_30_percent_have_no_spectrum_at_random(big):
    has = big["has_spectrum"]
    assert has.mean() == pytest.approx(1 - catalogue.SPEC_MISSING_FRACTION, abs=0.025)
    # missing completely at random: no dependence on mass or redshift
    assert abs(big["log_mstar"][has].mean() - big["log_mstar"][~has].mean()) < 0.05
    assert abs(big["redshift"][has].mean() - big["redshift"][~has].mean()) < 0.01
    row = S.catalogue_row(big, int(np.flatnonzero(~has)[0]))
    assert S.observe_spectrum(row) is None
    assert S.generate_objects(1, size=32, seed=11, start=row["_index"])[0].spectrum is None


def test_mass_metallicity_relation_and_nii(big):
    logm, logz = big["log_mstar"], big["log_zstar"]
    med = [np.median(logz[(logm >= lo) & (logm < lo + 0.5)]) for lo in (9.0, 10.0, 11.0)]
    assert med[0] == pytest.approx(-0.45, abs=0.1)
    assert med[1] == pytest.approx(-0.13, abs=0.08)
    assert med[2] == pytest.approx(0.02, abs=0.08)
    assert stats.spearmanr(logm, logz).statistic > 0.5
    # [NII]/Halpha tracks metallicity (line ratios are dust-free to first order: 6584 vs 6563 A)
    n2 = np.log10(big["flux_nii"] / big["flux_ha"])
    assert stats.pearsonr(logz, n2).statistic > 0.8


def test_absorption_depth_follows_metallicity_and_age(rows):
    row = dict(next(r for r in rows if r["redshift"] < 0.3))
    z = row["redshift"]
    wave = S.spectrum_wavelength()
    rest = wave / (1 + z)
    win = np.abs(rest - ABSORPTION["g_band"][0]) < 40

    def ew(r):
        plain = {k: v for k, v in r.items() if k != "log_zstar"}  # no absorption without a metallicity
        f0 = S.render_spectrum(plain, noise=False, lines=False)
        f = S.render_spectrum(r, noise=False, lines=False)
        return float(((1 - f / f0)[win]).sum() * S.SPEC_STEP / (1 + z))

    strength = 10 ** (0.8 * row["log_zstar"]) * (0.3 + 0.7 * min(row["age_mw_gyr"] / 8, 1))
    assert ew(row) == pytest.approx(3.0 * strength, rel=0.02)
    rich = {**row, "log_zstar": row["log_zstar"] + 0.3}
    assert ew(rich) / ew(row) == pytest.approx(10**0.24, rel=0.01)


def test_ages_follow_the_template_mix_and_the_age_of_the_universe(big):
    age, sed = big["age_mw_gyr"], big["sed_type"]
    assert stats.spearmanr(sed, age).statistic < -0.8
    q = big["quenched"]
    assert np.median(age[q]) > np.median(age[~q]) + 3.0
    zt, at = universe_age_table()
    assert (age <= 0.95 * np.interp(big["redshift"], zt, at) + 1e-9).all()
    # a pure early-type (sed_type 0) at redshift z is ~10 Gyr * t(z) / t(0)
    e = sed < 0.01
    ratio = age[e] / (10.0 * np.interp(big["redshift"][e], zt, at) / at[0])
    assert np.median(ratio) == pytest.approx(1.0, abs=0.03)


@pytest.mark.slow
def test_fiber_fraction_matches_a_drawn_aperture_and_follows_size_and_seeing():
    import galsim

    # the Fourier-space fibre light against GalSim drawing the convolved galaxy and summing inside 0.75"
    y, x = np.mgrid[:301, :301]
    inside = np.hypot(x - 150, y - 150) * 0.02 <= S.FIBER_DIAMETER / 2

    def drawn(prof):
        return prof.drawImage(nx=301, ny=301, scale=0.02, method="no_pixel").array[inside].sum()

    for bt, n, rb, rd, see in [(0.3, 4.0, 0.5, 2.0, 1.1), (0.8, 5.5, 1.0, 2.5, 0.8), (0.0, 2.0, 0.3, 5.0, 1.5)]:
        gal = bt * galsim.Sersic(n, half_light_radius=rb) + (1 - bt) * galsim.Exponential(half_light_radius=rd)
        psf = galsim.Moffat(beta=3.0, fwhm=see)
        truth = drawn(galsim.Convolve(gal, psf)) / drawn(psf)
        got = S.fiber_fraction(np.array([bt]), np.array([n]), np.array([rb]), np.array([rd]), np.array([see]))[0]
        assert got == pytest.approx(truth, abs=2e-3)
    # a point-like galaxy keeps everything; bigger galaxies and sharper nights lose more to the aperture
    ff = S.fiber_fraction(
        np.full(3, 0.5), np.full(3, 4.0), np.array([1e-4, 0.5, 2.0]), np.array([1e-4, 1.0, 4.0]), np.full(3, 1.1)
    )
    assert ff[0] == pytest.approx(1.0, abs=1e-4) and ff[0] > ff[1] > ff[2] > 0


def test_spectra_carry_the_fibre_share_of_the_light(big):
    ff = big["fiber_frac"]
    assert 0.3 < np.median(ff) < 0.6 and ff.min() > 0.01 and ff.max() <= 1.0
    assert 0.9 < np.median(big["fiber_seeing"]) < 1.3
    # angular size decides it: nearby, large galaxies lose most
    assert stats.spearmanr(big["r_half_arcsec"], ff).statistic < -0.8
    total = S.sample_catalogue(200, seed=11, spectrum_aperture="total")
    np.testing.assert_array_equal(total["fiber_frac"], np.ones(200))
    np.testing.assert_array_equal(total["log_mstar"], big["log_mstar"][:200])  # the physics does not change
    row = S.catalogue_row(big, int(np.flatnonzero(big["has_spectrum"])[0]))
    whole = S.render_spectrum({**row, "fiber_frac": 1.0}, noise=False)
    np.testing.assert_allclose(S.render_spectrum(row, noise=False), row["fiber_frac"] * whole, rtol=1e-5)
    with pytest.raises(ValueError, match="spectrum aperture"):
        S.sample_catalogue(2, spectrum_aperture="slit")
