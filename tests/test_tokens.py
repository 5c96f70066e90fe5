"""tokens.py: spiral prefix = centre, exact round trips, standardisation, flat patches, crops, reference order."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from astrolom.data import tokens as tok

EVEN = range(8, 34, 2)


def _centre_block_order(nh: int, nw: int, k: int = 8) -> np.ndarray:
    """Raster indices (in the nh x nw grid) of the central k x k patches, in the k x k grid's own spiral order."""
    oi, oj = (nh - k) // 2, (nw - k) // 2
    small = tok.spiral_order(k).numpy()
    return (small // k + oi) * nw + (small % k + oj)


@pytest.mark.parametrize("nh", EVEN)
def test_first_64_tokens_are_the_central_8x8_every_even_grid(nh):
    for nw in EVEN:  # all even grids from 8x8 to 32x32, square and rectangular (8x16, 16x8, ...)
        order = tok.spiral_order(nh, nw).numpy()
        assert sorted(order) == list(range(nh * nw))  # a permutation
        np.testing.assert_array_equal(order[:64], _centre_block_order(nh, nw))
        # and likewise the first 4 and 16 are the central 2x2 and 4x4
        np.testing.assert_array_equal(order[:16], _centre_block_order(nh, nw, 4))
        np.testing.assert_array_equal(order[:4], _centre_block_order(nh, nw, 2))


@pytest.mark.parametrize(("h", "w"), [(128, 128), (128, 256), (256, 160), (512, 512)])
def test_token_prefix_equals_tokens_of_the_centre_crop(h, w):
    img = torch.randn(1, h, w, 3)
    top, left = (h - 128) // 2, (w - 128) // 2
    centre = img[:, top : top + 128, left : left + 128]
    full = tok.tokenize(img, 16)
    crop = tok.tokenize(centre, 16)
    assert torch.equal(full.tokens[:, :64], crop.tokens[:, :64])
    assert torch.equal(full.mean[:, :64], crop.mean[:, :64]) and torch.equal(full.std[:, :64], crop.std[:, :64])


@pytest.mark.parametrize(("h", "w", "p"), [(32, 48, 16), (64, 64, 8), (48, 16, 16), (24, 40, 4)])
def test_patchify_round_trip_exact_and_not_transposed(h, w, p):
    x = torch.randn(2, h, w, 3)
    patches = tok.patchify(x, p)
    nh, nw = h // p, w // p
    assert patches.shape == (2, nh * nw, p * p * 3)
    # patch (i, j) holds pixels [i*p:(i+1)*p, j*p:(j+1)*p] flattened in (p1 p2 c) order
    i, j = nh - 1, nw - 1
    assert torch.equal(patches[1, i * nw + j], x[1, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(-1))
    assert torch.equal(tok.unpatchify(patches, (nh, nw), p), x)
    batch = tok.tokenize(x, p)
    assert torch.allclose(tok.detokenize(batch), x, atol=1e-5, rtol=0)
    order, inv = tok.spiral_order(nh, nw), tok.inverse_spiral_order(nh, nw)
    assert torch.equal(order[inv], torch.arange(nh * nw))


def test_standardise_destandardise():
    torch.manual_seed(0)  # unseeded, a rare draw missed the 1e-5 tolerance
    x = torch.randn(4, 30, 768) * (torch.rand(4, 30, 1) * 100 + 1) + torch.randn(4, 30, 1) * 100
    t, m, s = tok.standardise(x)
    assert torch.allclose(t.mean(-1), torch.zeros(4, 30), atol=1e-5)
    assert torch.allclose(t.std(-1, unbiased=False), torch.ones(4, 30), atol=1e-5)
    assert (tok.destandardise(t, m, s) - x).abs().max() < 1e-5 * x.abs().max()
    y = torch.rand(3, 10, 48)
    t, m, s = tok.standardise(y)
    assert (tok.destandardise(t, m, s) - y).abs().max() < 1e-5


@pytest.mark.parametrize("value", [0.0, 0.3, 7.0, -2.5])
def test_flat_patches_are_finite_zeros(value):
    x = torch.full((2, 5, 768), value)
    t, m, s = tok.standardise(x)
    assert torch.isfinite(t).all() and torch.equal(t, torch.zeros_like(t))
    assert (s == tok.DEFAULT_EPS).all() and torch.equal(tok.destandardise(t, m, s), x)


def test_flat_patch_with_inexact_mean_is_zero():
    t, _, _ = tok.standardise(torch.full((1, 4, 768), 200 / 255))
    assert torch.equal(t, torch.zeros_like(t))


def test_non_multiple_is_a_clear_error_and_center_crop_fixes_it():
    x = torch.arange(37 * 50 * 3, dtype=torch.float32).reshape(1, 37, 50, 3)
    with pytest.raises(ValueError, match=r"37x50 px is not a multiple of the patch size 16; crop it to 32x48"):
        tok.tokenize(x, 16)
    c = tok.center_crop(x, 16)
    assert c.shape == (1, 32, 48, 3)
    assert torch.equal(c, x[:, 2:34, 1:49])  # remainders 5 and 2 split as 2/3 and 1/1
    assert tok.tokenize(c, 16).tokens.shape == (1, 6, 768)


def _reference_dataset():
    pytest.importorskip("einops")
    if "torchvision" not in sys.modules:  # astropt.local_datasets imports torchvision.io at import time; unused here
        tv = types.ModuleType("torchvision")
        tv.io = types.ModuleType("torchvision.io")
        sys.modules["torchvision"], sys.modules["torchvision.io"] = tv, tv.io
    mod = pytest.importorskip("astropt.local_datasets")
    return mod.GalaxyImageDataset


def test_spiral_equals_reference_astropt_for_square_grids():
    ds_cls = _reference_dataset()
    for n in range(1, 33):
        ref = np.argsort(ds_cls._spiral(n).reshape(-1), kind="stable")
        np.testing.assert_array_equal(tok.spiral_order(n).numpy(), ref)
    ds = ds_cls(paths=None, spiral=True)
    patches = torch.randn(16 * 16, 12)
    assert torch.equal(ds.spiralise(patches), patches[tok.spiral_order(16)])
    assert torch.equal(ds.antispiralise(patches[tok.spiral_order(16)]), patches)


def test_center_crop_one_convention_for_tensors_and_arrays():
    x = np.arange(37 * 50 * 2, dtype=np.float32).reshape(37, 50, 2)
    to_patch = tok.center_crop(torch.from_numpy(x)[None], 16)  # patch mode: largest multiple of 16, centred
    assert to_patch.shape == (1, 32, 48, 2) and to_patch[0, 0, 0, 0].item() == x[2, 1, 0]  # top = 5 // 2, left = 1
    sized = tok.center_crop(x, size=(20, 30))  # numpy in, numpy view out
    assert isinstance(sized, np.ndarray) and sized.shape == (20, 30, 2)
    np.testing.assert_array_equal(sized, x[8:28, 10:40])  # ((37 - 20) // 2, (50 - 30) // 2)
    np.testing.assert_array_equal(tok.center_crop(x, size=32), x[2:34, 9:41])
    assert tok.center_crop(x) is x  # neither size nor patch size: unchanged
    with pytest.raises(ValueError, match="image of 37x50 px is smaller than the crop 64x64"):
        tok.center_crop(x, size=64)
