import numpy as np
import pytest
import torch

from astrolom.data.spectra import (
    Spectrum,
    detokenize_spectra,
    n_tokens,
    resample,
    to_grid,
    tokenize_spectra,
)

GRID = 3600.0 + 2.0 * np.arange(3101)  # the mock survey's grid


def _spectrum(seed=0):
    rng = np.random.default_rng(seed)
    flux = 5.0 + 0.001 * (GRID - 6000) + rng.normal(0, 0.3, GRID.size)
    flux += 40 * np.exp(-0.5 * ((GRID - 7000) / 3.0) ** 2)  # an emission line
    return flux.astype(np.float32)


def test_spectrum_validates_its_arrays():
    with pytest.raises(ValueError, match="strictly increasing"):
        Spectrum(GRID[::-1], np.ones(GRID.size), meta={"source": "obj1.fits"})
    with pytest.raises(ValueError, match="obj2.fits: ivar has shape"):
        Spectrum(GRID, np.ones(GRID.size), ivar=np.ones(10), meta={"source": "obj2.fits"})
    s = Spectrum(GRID, np.ones(GRID.size), mask=GRID < 3700)
    assert s.good.sum() == GRID.size - 50
    assert s.meta["wavelength_unit"] == "Angstrom"


def test_token_count_and_shapes():
    assert n_tokens(3101, 32) == 97  # 96 full patches + one padded
    assert n_tokens(3101, 20, 10) == 310
    assert n_tokens(256, 256) == 1
    flux = torch.from_numpy(np.stack([_spectrum(0), _spectrum(1)]))
    tok = tokenize_spectra(flux, GRID, patch=32)
    assert tok.values.shape == (2, 97, 33)  # 32 fluxes + log amplitude
    assert tok.positions.dtype == torch.float32
    # last token: 3101 - 96*32 = 29 real pixels, 3 padding values never enter the loss
    assert tok.value_mask[0, -1, :32].sum() == 29
    assert tok.value_mask[0, :-1].all()


def test_normalisation_keeps_amplitude_and_round_trips():
    f = _spectrum(0)
    flux = torch.from_numpy(np.stack([f, 10 * f]))
    tok = tokenize_spectra(flux, GRID, patch=32)
    # normalised shapes are identical, amplitudes differ by exactly one dex
    torch.testing.assert_close(tok.values[0, :, :-1], tok.values[1, :, :-1])
    assert tok.log_scale[1] - tok.log_scale[0] == pytest.approx(1.0, abs=1e-6)
    assert tok.values[1, 5, -1] == pytest.approx(tok.log_scale[1].item())
    # median |flux| ~ 5 for this spectrum
    assert 10 ** tok.log_scale[0].item() == pytest.approx(np.median(np.abs(f)), rel=1e-6)
    back = detokenize_spectra(tok.values, GRID.size, patch=32)
    torch.testing.assert_close(back, flux, rtol=1e-5, atol=1e-5)


def test_positions_are_float32_wavelength_not_bf16_rounded():
    tok = tokenize_spectra(torch.from_numpy(_spectrum()[None]), GRID, patch=32)
    lam = tok.positions[0].double() * 7000 + 3000
    # token k covers pixels 32k..32k+31 -> mean wavelength 3600 + 2*(32k + 15.5)
    expected = 3600 + 2 * (32 * np.arange(96) + 15.5)
    np.testing.assert_allclose(lam[:96].numpy(), expected, atol=1e-3)
    assert lam[96].item() == pytest.approx(3600 + 2 * (3072 + 14), abs=1e-3)  # padding does not pull it down
    steps = np.diff(lam.numpy())
    assert steps[:95].min() == pytest.approx(64.0, abs=1e-3)  # bf16 would give 32/64 A steps and ties


def test_masked_pixels_and_missing_spectra_are_excluded():
    f = np.stack([_spectrum(0), _spectrum(1)])
    good = np.ones_like(f, dtype=bool)
    good[0, 100:164] = False  # two whole tokens (100..163 covers tokens 3,4,5 partly)
    good[1] = False  # no spectrum
    f[1] = np.nan
    tok = tokenize_spectra(torch.from_numpy(f), GRID, good=torch.from_numpy(good), patch=32)
    assert tok.present.tolist() == [True, False]
    assert not tok.token_mask[1].any() and not tok.value_mask[1].any()
    assert torch.isfinite(tok.values).all()
    assert tok.token_mask[0, 3] and not tok.token_mask[0, 4] and tok.token_mask[0, 5]
    assert tok.value_mask[0, 3, :-1].sum() == 100 - 96
    assert (tok.values[0, 4, :-1] == 0).all()
    assert not tok.value_mask[0, 4].any()  # amplitude value of an empty token is not a target either
    assert tok.positions[0, 4] == 0.0


def test_stride_overlap_detokenizes_by_averaging():
    flux = torch.from_numpy(_spectrum()[None])
    tok = tokenize_spectra(flux, GRID, patch=20, stride=10, amplitude=False)
    assert tok.values.shape == (1, 310, 20)
    back = detokenize_spectra(tok.values, GRID.size, patch=20, stride=10, amplitude=False, log_scale=tok.log_scale)
    torch.testing.assert_close(back, flux, rtol=1e-5, atol=1e-5)


def test_resample_conserves_flux_and_propagates_ivar():
    rng = np.random.default_rng(3)
    fine = 3600.0 + 1.0 * np.arange(6201)
    flux = 3 + np.sin(fine / 50.0) + rng.normal(0, 0.1, fine.size)
    s = Spectrum(fine, flux, ivar=np.full(fine.size, 4.0))
    out = resample(s, GRID)
    inner = slice(1, -1)
    # integrated flux over the common range equals the source integral (pixels of 1 A vs 2 A)
    assert (out.flux[inner] * 2.0).sum() == pytest.approx(flux[2:-2].sum() + 0.5 * (flux[1] + flux[-2]), rel=1e-6)
    # a 2 A pixel covers two 1 A pixels fully (plus halves): variance ~ 1/4 / 2 -> ivar ~ 8 (up to the half pixels)
    np.testing.assert_allclose(out.ivar[inner], 4.0 * 4 / 1.5, rtol=1e-6)
    assert not out.mask[inner].any()


def test_resample_masks_uncovered_and_bad_pixels():
    coarse = 4000.0 + 4.0 * np.arange(500)  # covers 4000-5996 only
    mask = np.zeros(coarse.size, bool)
    mask[100] = True  # a sky line at 4400 A
    s = Spectrum(coarse, np.ones(coarse.size), mask=mask)
    out = resample(s, GRID)
    assert out.mask[GRID < 3998].all() and out.mask[GRID > 5998].all()
    assert out.mask[(GRID > 4397) & (GRID < 4403)].all()
    np.testing.assert_allclose(out.flux[~out.mask], 1.0, rtol=1e-6)
    assert (out.ivar[out.mask] == 0).all()


def test_to_grid_refuses_with_both_grids_named():
    s = Spectrum(4000.0 + 4.0 * np.arange(500), np.ones(500), meta={"source": "spec_0001.fits"})
    with pytest.raises(ValueError, match=r"spec_0001.fits.*4000-5996 A, 500 px, step 4.*3600-9800 A, 3101 px, step 2"):
        to_grid(s, GRID, allow_resample=False)
    same = Spectrum(GRID, np.ones(GRID.size))
    assert to_grid(same, GRID, allow_resample=False) is same
    with pytest.raises(ValueError, match="does not overlap"):
        resample(Spectrum(12000.0 + np.arange(10.0), np.ones(10)), GRID)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"flux": np.full(GRID.size, np.nan)}, "flux is NaN everywhere"),
        ({"ivar": np.zeros(GRID.size)}, "ivar is 0 everywhere"),
        ({"mask": np.ones(GRID.size, bool)}, "every pixel is masked"),
    ],
)
def test_unusable_spectra_are_named(kwargs, why):
    args = {"flux": np.ones(GRID.size), **kwargs}
    s = Spectrum(GRID, meta={"source": "coadd-42.fits"}, **args)
    with pytest.raises(ValueError, match=f"coadd-42.fits: unusable spectrum: .*{why}"):
        s.require_usable()
    assert Spectrum(GRID, np.ones(GRID.size)).require_usable() is not None
