"""The sky has no "up": the 8 symmetries of the square (the dihedral group D4) for images and token batches.

Element t in 0..7 is `t % 4` counter-clockwise quarter turns, preceded by a left-right mirror when t >= 4
(`turns_then_mirror` names the elements of the other common convention). A galaxy seen under any of them is the
same galaxy, so

- at embed time, `astrolom embed --symmetrize` averages a stamp's embedding over all 8 (`D4_SIZE`) versions
  (non-square stamps: over the 4 that keep the shape), which makes it exactly invariant to them;
- at pretraining time, `data.augment=d4` applies one random element per sample to each training batch;
- fine-tuning, the supervised CNN baseline and the alignment views transform their stamps with `d4` / `d4_batch`.

`d4_tokens` transforms spiral-ordered token batches directly (grid of patches and the pixels inside each patch
together); it equals tokenising the transformed image because the per-patch standardisation does not depend on the
order of a patch's pixels (tested in tests/test_augment.py).
"""

from __future__ import annotations

import numpy as np
import torch

from astrolom.data import tokens as tok

D4_SIZE = 8
SHAPE_KEEPING = (0, 2, 4, 6)  # identity, half turn, mirror, mirror + half turn: also valid for non-square stamps


def d4(image, t: int, axes: tuple[int, int] = (0, 1)):
    """Element t of D4 applied to the (row, col) `axes` of a numpy array or torch tensor."""
    if not 0 <= t < D4_SIZE:
        raise ValueError(f"D4 element must be in 0..7, got {t}")
    if isinstance(image, torch.Tensor):
        x = torch.flip(image, dims=(axes[1],)) if t >= 4 else image
        return torch.rot90(x, t % 4, dims=axes)
    x = np.flip(image, axis=axes[1]) if t >= 4 else image
    return np.ascontiguousarray(np.rot90(x, t % 4, axes=axes))


def turns_then_mirror(turns, mirror):
    """The element equal to `turns` quarter turns followed by a left-right mirror (if `mirror`); ints or tensors."""
    if isinstance(turns, torch.Tensor):
        mirror = torch.as_tensor(mirror, dtype=torch.bool)
        return torch.where(mirror, 4 + (-turns) % 4, turns % 4)
    # a mirror after k turns is the mirror before -k turns: M R^k = R^-k M
    return 4 + (-int(turns)) % 4 if mirror else int(turns) % 4


def d4_batch(x: torch.Tensor, elements: torch.Tensor, axes: tuple[int, int] = (1, 2)) -> torch.Tensor:
    """Element `elements[i]` of D4 applied to sample i of a batch tensor, on its (row, col) `axes`."""
    out = torch.empty_like(x)
    for e in elements.unique().tolist():
        sel = elements == e
        out[sel] = d4(x[sel], int(e), axes=axes)
    return out


def group_for(height: int, width: int) -> tuple[int, ...]:
    """The D4 elements that map an H x W stamp onto one of the same shape."""
    return tuple(range(D4_SIZE)) if height == width else SHAPE_KEEPING


def d4_tokens(tokens: torch.Tensor, grid: tuple[int, int], patch_size: int, t: int | torch.Tensor) -> torch.Tensor:
    """(B, T, P*P*C) spiral-ordered tokens (or (B, T, 1) patch statistics) of the image transformed by t.

    t is one element for the whole batch or a (B,) tensor of one element per sample.
    """
    b, n, d = tokens.shape
    nh, nw = grid
    if n != nh * nw:
        raise ValueError(f"{n} tokens do not fill a {nh}x{nw} patch grid (transform the whole stamp)")
    ts = torch.full((b,), int(t)) if not isinstance(t, torch.Tensor) else t.to(torch.long).cpu()
    if any(int(x) not in group_for(nh, nw) for x in ts.unique()):
        raise ValueError(f"quarter turns of a non-square {nh}x{nw} grid change its shape")
    order = tok.spiral_order(nh, nw)
    p = patch_size if d > 1 else 1
    c = d // (p * p)
    raster = torch.empty_like(tokens)
    raster[:, order] = tokens
    raster = raster.reshape(b, nh, nw, p, p, c)
    out = d4_batch(d4_batch(raster, ts, axes=(1, 2)), ts, axes=(3, 4))  # move the patches and the pixels in each
    return out.reshape(b, n, d)[:, order]


def random_d4_batch(batch: dict, generator: torch.Generator) -> dict:
    """A token batch (the dict of `astrolom.data.stream.tokenize_records`) with one random D4 element per sample."""
    tokens = batch["tokens"]
    nh, nw = batch["grid"]
    group = torch.tensor(group_for(nh, nw))
    ts = group[torch.randint(len(group), (tokens.shape[0],), generator=generator)]
    out = dict(batch)
    p = batch["patch_size"]
    out["tokens"] = d4_tokens(tokens, (nh, nw), p, ts)
    for key in ("mean", "std"):
        if isinstance(batch.get(key), torch.Tensor) and batch[key].shape[:2] == tokens.shape[:2]:
            out[key] = d4_tokens(batch[key], (nh, nw), p, ts)
    out["d4"] = ts
    return out
