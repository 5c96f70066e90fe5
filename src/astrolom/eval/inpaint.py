"""Inpainting: the model sees the central k spiral tokens of a stamp and generates the rest.

Pixel units: AstroPT predicts *standardised* patches (each patch has mean 0 and std 1), so a generated token carries
shape and colour but not the patch's brightness level. To show generated patches in pixel units we use the true
patch mean and standard deviation (the per-patch normalisation comes from the truth; nothing else does). A figure of
the result (`astrolom.eval.figures.plot_inpainting`) therefore shows what the model predicts about structure, and
the reported error is measured on standardised tokens, where the model made its prediction.
"""

from __future__ import annotations

import numpy as np
import torch

from astrolom.data import tokens as tok
from astrolom.model.astropt import AstroPT


def inpaint(model: AstroPT, images: np.ndarray, k: int) -> dict:
    """Give the model the first k spiral tokens of each stamp, generate the rest.

    Returns the truth and the inpainted images (B, H, W, C), both in pixel units (the generated patches mapped back
    with the true per-patch mean/std, see the module docstring), the masked input, and the mean squared error of the
    generated standardised tokens against the true ones.
    """
    x = torch.as_tensor(np.asarray(images, np.float32))
    p = model.config.patch_size
    batch = tok.tokenize(tok.center_crop(x, p), p)
    T = batch.tokens.shape[1]
    n = min(T, model.config.block_size)
    k = max(1, min(k, n - 1))
    with torch.no_grad():
        gen = model.generate(batch.tokens[:, :k], n - k)
    full = batch.tokens.clone()
    full[:, k:n] = gen[:, k:n]
    masked = batch.tokens.clone()
    masked[:, k:] = 0.0
    masked_mean, masked_std = batch.mean.clone(), batch.std.clone()
    masked_mean[:, k:], masked_std[:, k:] = 0.0, 0.0  # hidden patches are shown blank
    mse = float(((gen[:, k:n] - batch.tokens[:, k:n]) ** 2).mean())
    # the same error for the "predict the patch mean" guess (0 in standardised units): the scale of a good result
    baseline = float((batch.tokens[:, k:n] ** 2).mean())
    masked_batch = tok.TokenBatch(batch.tokens, masked_mean, masked_std, batch.grid, batch.patch_size)
    return {
        "truth": tok.detokenize(batch).numpy(),
        "inpainted": tok.detokenize(batch, full).numpy(),
        "masked": tok.detokenize(masked_batch, masked).numpy(),
        "k": k,
        "generated": n - k,
        "mse": mse,
        "mse_zero": baseline,
    }
