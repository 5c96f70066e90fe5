"""Images -> spiral-ordered, per-patch standardised tokens (and back).

An image (H, W, C) is cut into P x P patches, each flattened in (p1 p2 c) order. Patches are then standardised
to mean 0 / std 1 over all their values and reordered centre-out along a spiral, so that the first 4, 16, 64, ...
tokens are the central 2x2, 4x4, 8x8, ... patches of any even grid. Stamps of different sizes therefore share a
token prefix: a model trained on 64x64 stamps can embed 512x512 stamps from their first tokens, and a causal model's
outputs on that prefix do not depend on the outer tokens at all.

Everything here is batched tensor code; the spiral permutation is computed once per grid size and cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

DEFAULT_EPS = 1e-6


@lru_cache(maxsize=64)
def _spiral_order_np(nh: int, nw: int) -> np.ndarray:
    """Raster index of the patch at each spiral position, for an nh x nw grid.

    Rings are Chebyshev distance from the grid centre (in half-patch units, so even and odd grids both work).
    Within a ring the walk starts just below the top-left corner, runs down the left side, right along the bottom,
    up the right side and left along the top; for square grids this is exactly the order of the reference
    AstroPT `_spiral`, so reference checkpoints see the sequence they were trained on.
    """
    di = (2 * np.arange(nh) - (nh - 1))[:, None].repeat(nw, axis=1)  # row offset from centre, half-patch units
    dj = (2 * np.arange(nw) - (nw - 1))[None, :].repeat(nh, axis=0)
    r = np.maximum(np.abs(di), np.abs(dj))
    t = np.select(
        [(dj == -r) & (di > -r), (di == r) & (dj > -r), (dj == r) & (di < r)],
        [di + r, 3 * r + dj, 5 * r - di],
        default=7 * r - dj,  # top row, walked leftwards; the top-left corner closes the ring
    )
    return np.lexsort((t.ravel(), r.ravel()))


def spiral_order(nh: int, nw: int | None = None) -> torch.Tensor:
    """Permutation taking raster-ordered patches to centre-out spiral order (`tokens = patches[:, order]`)."""
    return torch.from_numpy(_spiral_order_np(nh, nh if nw is None else nw).copy())


def inverse_spiral_order(nh: int, nw: int | None = None) -> torch.Tensor:
    """Permutation taking spiral-ordered tokens back to raster order."""
    return torch.argsort(spiral_order(nh, nw))


def grid_shape(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Patch grid (rows, cols) of an image, or a ValueError naming the problem."""
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image of {height}x{width} px is not a multiple of the patch size {patch_size}; "
            f"crop it to {height - height % patch_size}x{width - width % patch_size} "
            "(astrolom.data.tokens.center_crop) or choose another patch size"
        )
    return height // patch_size, width // patch_size


def center_crop(images, patch_size: int | None = None, *, size: int | tuple[int, int] | None = None):
    """Centred crop of (..., H, W, C) images (torch tensors or numpy arrays; returns a view).

    To `size` (h, w) pixels (an int for square crops), or without `size` to the largest multiple of `patch_size`
    (with neither, the images as they are). The top-left corner is ((H - h) // 2, (W - w) // 2): the galaxy stays
    centred, an odd margin loses its extra pixel at the bottom / right. This is the one crop every path uses
    (tokeniser, embedding, baselines), so the pixels a model and a baseline see are the same.
    """
    h0, w0 = images.shape[-3], images.shape[-2]
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if h0 < h or w0 < w:
            raise ValueError(f"image of {h0}x{w0} px is smaller than the crop {h}x{w}")
    elif patch_size is not None:
        h, w = h0 - h0 % patch_size, w0 - w0 % patch_size
    else:
        return images
    top, left = (h0 - h) // 2, (w0 - w) // 2
    return images[..., top : top + h, left : left + w, :]


def prefix_crop(height: int, width: int, patch_size: int, n_tokens: int) -> tuple[int, int]:
    """Smallest centred (H', W') crop whose spiral tokens begin with the first `n_tokens` tokens of the full stamp.

    The spiral walks rings of patches around the stamp centre; a centred crop keeps the centre only when it removes
    whole patches symmetrically, i.e. keeps the parity of each grid dimension.
    """
    nh, nw = height // patch_size, width // patch_size
    need = spiral_order(nh, nw)[:n_tokens].numpy()
    rows, cols = need // nw, need % nw
    # half-extent (in patches) of the needed patches around the grid centre, per axis
    kh = int(max(np.abs(2 * rows - (nh - 1)).max(), 0)) + 1 if len(need) else nh
    kw = int(max(np.abs(2 * cols - (nw - 1)).max(), 0)) + 1 if len(need) else nw
    return min(nh, kh) * patch_size, min(nw, kw) * patch_size


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nh*nw, P*P*C) raster-ordered patches flattened in (p1 p2 c) order."""
    b, h, w, c = images.shape
    nh, nw = grid_shape(h, w, patch_size)
    p = patch_size
    x = images.reshape(b, nh, p, nw, p, c).permute(0, 1, 3, 2, 4, 5)  # (B, nh, nw, p1, p2, C)
    return x.reshape(b, nh * nw, p * p * c)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, nh*nw, P*P*C) raster patches -> (B, H, W, C)."""
    b, n, d = patches.shape
    nh, nw = grid
    p = patch_size
    c = d // (p * p)
    if n != nh * nw or c * p * p != d:
        raise ValueError(f"{n} patches of {d} values do not form a {nh}x{nw} grid of {p}x{p} patches")
    x = patches.reshape(b, nh, nw, p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, nh * p, nw * p, c)


def standardise(patches: torch.Tensor, eps: float = DEFAULT_EPS):
    """Per-patch standardisation over all P*P*C values.

    Returns (tokens, mean, std) with mean/std of shape (..., 1). Flat patches (std < eps, in the data's own units:
    lower `eps` for data in tiny physical units) give exactly zero tokens and report std = eps, so nothing blows up
    and `destandardise` still returns the patch (its mean) up to float rounding.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    std = patches.std(dim=-1, keepdim=True, unbiased=False)
    flat = std < eps
    std = torch.where(flat, torch.full_like(std, eps), std)
    tokens = torch.where(flat, torch.zeros_like(patches), (patches - mean) / std)
    return tokens, mean, std


def destandardise(tokens: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return tokens * std + mean


def flux_features(tokens: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, n_chan: int, softening: float):
    """What per-patch standardisation throws away, per band: (B, T, 2 * C) = [asinh(mean_b / s), asinh(std_b / s)].

    mean_b and std_b are the mean and (biased) std of band b's P*P raw values in a patch, recovered exactly from the
    standardised tokens (patch order (p1 p2 c)) and the whole-patch mean / std, so every output mode of the batched
    tokeniser gives the same features. asinh with softening s (in the pixels' units) is the Lupton et al. (1999)
    asinh magnitude up to sign and offset: linear through zero and noise, logarithmic for bright patches, defined
    for negative sky-subtracted fluxes, and in calibrated flux units (nanomaggies for the Legacy Survey) rather than
    in units of one image's noise, so a flux means the same thing in every image.
    """
    b, t, d = tokens.shape
    if d % n_chan:
        raise ValueError(f"tokens of {d} values do not split into {n_chan} bands")
    per_band = tokens.float().view(b, t, d // n_chan, n_chan)
    mean_b = mean + std * per_band.mean(dim=2)  # (B, T, C)
    std_b = std * per_band.std(dim=2, unbiased=False)
    return torch.cat([torch.asinh(mean_b / softening), torch.asinh(std_b / softening)], dim=-1)


@dataclass
class TokenBatch:
    """Spiral-ordered standardised tokens plus what is needed to map them back to pixels."""

    tokens: torch.Tensor  # (B, T, P*P*C) float32, spiral order
    mean: torch.Tensor  # (B, T, 1)
    std: torch.Tensor  # (B, T, 1)
    grid: tuple[int, int]
    patch_size: int


def tokenize(images: torch.Tensor, patch_size: int = 16, eps: float = DEFAULT_EPS) -> TokenBatch:
    """(B, H, W, C) float images -> spiral-ordered standardised tokens."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, H, W, C), got {tuple(images.shape)}")
    grid = grid_shape(images.shape[1], images.shape[2], patch_size)
    patches = patchify(images.float(), patch_size)[:, spiral_order(*grid)]
    tokens, mean, std = standardise(patches, eps)
    return TokenBatch(tokens, mean, std, grid, patch_size)


def detokenize(batch: TokenBatch, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens (the batch's own, or e.g. model predictions in the same order) -> (B, H, W, C) pixel images."""
    tokens = batch.tokens if tokens is None else tokens
    patches = destandardise(tokens, batch.mean[:, : tokens.shape[1]], batch.std[:, : tokens.shape[1]])
    raster = patches[:, inverse_spiral_order(*batch.grid)]
    return unpatchify(raster, batch.grid, batch.patch_size)


# --- the paper's tokens ----------------------------------------------------------------------------------------

PAPER2024 = "paper2024"
PAPER2024_EPS = 1e-8  # added to the std, as the reference's training script did


def eight_bit(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Images as the 8-bit pixels they were decoded from: uint8 as is; float images must be k / 255 in [0, 1] (what
    astrolom's readers make of 8-bit files, from which k is recovered exactly), anything else is a ValueError."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # decoded files are read-only views; torch warns on those
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        return x
    scaled = x.to(torch.float32) * 255
    k = scaled.round()
    if x.numel() and (not x.is_floating_point() or (scaled - k).abs().max() > 1e-3 or k.min() < 0 or k.max() > 255):
        raise ValueError(
            "the paper2024 tokens preset reads 8-bit pixels (decoded JPEG/PNG files, or those values / 255): the "
            "paper's models never saw other inputs, and these images are not 8-bit values"
        )
    return k.to(torch.uint8)


def tokenize_paper2024(pixels: torch.Tensor | np.ndarray, patch_size: int = 16) -> torch.Tensor:
    """(B, H, W, C) 8-bit pixels -> float32 tokens (B, T, P*P*C) exactly as `astropt` 1.0.x fed them in training.

    The paper's released models were trained by `astropt` 1.0.x's `scripts/train.py` on the Hugging Face
    `Smith42/galaxies` JPEGs (its default `use_hf=True`): `np.array(PIL.Image.open(...))` (H, W, C) uint8, then
    `.swapaxes(0, 2)`, i.e. the image *transposed* to (C, W, H), patched `c (h p1) (w p2) -> (h w) (p1 p2 c)` by
    `GalaxyImageDataset.process_galaxy`, each patch standardised in float32 with the *unbiased* std plus 1e-8
    (`(x - mean) / (std + 1e-8)`), cast to float16, and put in the reference spiral order (which `spiral_order`
    equals for square grids). This function does the same, batched; flat patches give zero tokens as there.
    The model then reads the float16 values as float32. Float images are accepted as `eight_bit` describes.
    """
    if pixels.ndim != 4:
        raise ValueError(f"expected pixels of shape (B, H, W, C), got {tuple(pixels.shape)}")
    x = eight_bit(pixels).transpose(1, 2)  # (B, W, H, C): the reference's swapaxes(0, 2) of (H, W, C)
    grid = grid_shape(x.shape[1], x.shape[2], patch_size)
    patches = patchify(x.to(torch.float32), patch_size)  # (B, T, D) raster order of the transposed image
    std, mean = torch.std_mean(patches, dim=-1, keepdim=True)  # unbiased, as torch.std_mean defaults to
    tokens = ((patches - mean) / (std + PAPER2024_EPS)).to(torch.float16)
    return tokens[:, spiral_order(*grid)].to(torch.float32)
