"""The one sky-noise estimate (`astrolom.data.sky.sky_sigma`) on stamps of known noise."""

from __future__ import annotations

import numpy as np
import pytest

from astrolom.data.sky import sky_sigma


def test_sky_sigma_recovers_the_noise_beside_a_bright_galaxy():
    rng = np.random.default_rng(0)
    sigma = np.array([0.004, 0.007, 0.02], np.float32)  # g, r, z per pixel, Legacy-Survey-like nanomaggies
    images = rng.normal(0.0, 1.0, (16, 32, 32, 3)).astype(np.float32) * sigma
    yy, xx = np.mgrid[:32, :32] - 15.5
    images += 5.0 * np.exp(-(yy**2 + xx**2) / (2 * 3.0**2))[None, :, :, None]  # bright, inside the border
    # 16 stamps x 2 x 2 rows x 32 px = 2048 pixels per band: the MAD's sigma is within ~3% of the truth
    np.testing.assert_allclose(sky_sigma(images), sigma, rtol=0.06)
    # light in the border is not sky: a wide galaxy reaching the edge inflates it (why the border is narrow)
    wide = images + 0.5 * np.exp(-(yy**2 + xx**2) / (2 * 12.0**2))[None, :, :, None]
    assert (sky_sigma(wide) > 2 * sigma).all()
    assert (sky_sigma(images[:, ::-1]) == sky_sigma(images)).all()  # top and bottom alike


def test_sky_sigma_refuses_what_is_not_a_stack_of_stamps():
    with pytest.raises(ValueError, match=r"needs \(N, H, W, C\) stamps"):
        sky_sigma(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match=r"at least 4 rows high"):
        sky_sigma(np.zeros((2, 3, 8, 3)))
    assert (sky_sigma(np.zeros((2, 8, 8, 3))) == 1e-12).all()  # a flat stamp: the floor, not a division by zero
