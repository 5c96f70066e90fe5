"""Records -> batches of spiral-ordered, per-patch standardised tokens: the fast tokeniser every path uses.

`tokenize_records(records, patch_size, image_size)` gives the batch dict the trainer and the embedder consume;
`BatchBuilder` is the same thing one record at a time (what `astrolom.data.stream.TokenBatches` drives, so that each
decoded image is released as soon as its tokens are written). The conventions are those of `astrolom.data.tokens`
(patch (p1 p2 c) order, centre-out spiral, per-patch mean / std with the flat-patch epsilon); this module only makes
them fast: the spiral is a cached row index (one `index_select` per image, no per-sample Python), 8-bit pixels are
gathered before the float conversion, and the standardisation runs in a cache-resident scratch buffer.
"""

from __future__ import annotations

import math
import sys
import threading
import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from astrolom.data import tokens as tok
from astrolom.data.records import Record
from astrolom.data.sources import PixelRecord


@lru_cache(maxsize=32)
def _row_index(h: int, w: int, p: int) -> torch.Tensor:
    """Index of the (P*C)-value pixel-row segments of an (h, w, C) image, in spiral token order: gathering
    `image.view(h * w // p, p * C)[idx]` and viewing it as (T, P*P*C) gives the spiral-ordered patches."""
    nh, nw = tok.grid_shape(h, w, p)
    order = tok.spiral_order(nh, nw).numpy()
    pi, pj = order // nw, order % nw
    rows = (pi[:, None] * p + np.arange(p)[None, :]) * nw + pj[:, None]  # (T, p) pixel row * nw + patch column
    return torch.from_numpy(rows.reshape(-1).astype(np.int64))


_local = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch buffer, reused across calls (fresh memory costs a page fault per 4 KiB)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = bufs[name] = torch.empty(shape, dtype=dtype)
    return buf


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():  # read-only decoder output: we only ever read from it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _standardise_rows_into(x: torch.Tensor, out: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Per-row standardisation (biased std) of the scratch rows `x` (centred in place) into `out`.

    Two passes over `x` while it is in cache (mean, then the norm of the centred rows: no cancellation whatever the
    offset), and a single write of `out`. Rows with std 0 give 0 / 0 here; the caller zeroes them.
    """
    torch.mean(x, dim=-1, keepdim=True, out=mean)
    x.sub_(mean)
    torch.linalg.vector_norm(x, dim=-1, keepdim=True, out=std)
    std.mul_(1.0 / math.sqrt(x.shape[-1]))
    torch.div(x, std, out=out)


OUTPUTS = ("float32", "bfloat16", "pixels")


class BatchBuilder:
    """Tokenises records one at a time into a preallocated batch, so a decoded image can be released as soon as its
    tokens are written (peak memory: the batch plus one image).

    `output`: "float32" tokens (exact; the default), "bfloat16" tokens (standardised in float32, rounded once on the
    write: half the bytes, for models that run in bf16 anyway), or "pixels": the 8-bit pixels gathered into spiral
    patch order, uint8 (B, T, P*P*C) with their `scale`, standardised later where the model runs
    (`standardise_pixels`): the CPU then only decodes and gathers, and the host-to-device copy is 4x smaller.
    """

    def __init__(self, capacity, patch_size, image_size, eps, crop_to_patch, allocate=None, output="float32"):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.capacity, self.p, self.image_size = capacity, int(patch_size), image_size
        self.eps, self.crop_to_patch, self.output = eps, crop_to_patch, output
        self.allocate = allocate if allocate is not None else (lambda shape, dtype: torch.empty(shape, dtype=dtype))
        self.n = 0
        self.meta: list[tuple[str, str | None, dict, np.ndarray | None]] = []

    def _setup(self, rec: Record, shape: tuple[int, ...]) -> None:
        p = self.p
        self.shape0, self.first_id = shape, rec.object_id
        if self.image_size is not None:
            isz = self.image_size
            h, w = (isz, isz) if isinstance(isz, int) else tuple(isz)
            tok.grid_shape(h, w, p)  # image_size must be a multiple of the patch size
        else:
            h, w = shape[:2]
            if (h % p or w % p) and not self.crop_to_patch:
                tok.grid_shape(h, w, p)  # raises the clear error
            h, w = h - h % p, w - w % p
        self.h, self.w, self.c = h, w, shape[2]
        self.nh, self.nw = tok.grid_shape(h, w, p)
        t, d = self.nh * self.nw, p * p * self.c
        b = self.capacity
        if self.output == "pixels":
            self.pixels = self.allocate((b, t, d), torch.uint8)
        else:
            self.tokens = self.allocate((b, t, d), getattr(torch, self.output))
            self.mean = torch.empty(b, t, 1)
            self.std = torch.empty(b, t, 1)
        self.scales = torch.ones(b, 1, 1)
        self.idx = _row_index(h, w, p)

    def add(self, rec: Record) -> None:
        shape = rec.shape if isinstance(rec, PixelRecord) else rec.image.shape
        if self.n == 0:
            self._setup(rec, shape)
        h, w, c, p, i = self.h, self.w, self.c, self.p, self.n
        if shape[2] != c:
            raise ValueError(
                f"records in one batch have different band counts: {rec.object_id} has {shape[2]}, "
                f"{self.first_id} has {c}"
            )
        if self.image_size is None and shape[:2] != self.shape0[:2]:
            raise ValueError(
                f"records in one batch have different sizes: {rec.object_id} is {shape[0]}x{shape[1]}, "
                f"{self.first_id} is {self.shape0[0]}x{self.shape0[1]}; set image_size to centre-crop them"
            )
        if shape[0] < h or shape[1] < w:
            raise ValueError(
                f"record {rec.object_id}: image of {shape[0]}x{shape[1]} px is smaller than image_size {h}x{w}"
            )
        if isinstance(rec, PixelRecord) and rec.pixels is not None and rec.pixels.dtype == np.uint8:
            arr, scale = rec.pixels, rec.scale
        else:
            arr, scale = rec.image, 1.0
        if shape[0] != h or shape[1] != w:  # image_size, or only the patch-size remainder
            arr = tok.center_crop(arr, size=(h, w))
        arr = np.ascontiguousarray(arr)
        t, d = self.nh * self.nw, p * p * c
        src = _as_tensor(arr).view(h * self.nw, p * c)
        if self.output == "pixels":
            if arr.dtype != np.uint8:
                raise ValueError(
                    f"record {rec.object_id}: output='pixels' (data.token_format=pixels) needs 8-bit JPEG/PNG pixels, "
                    f"this record has {arr.dtype} values; use float32 or bfloat16 tokens for this data"
                )
            torch.index_select(src, 0, self.idx, out=self.pixels[i].view(t * p, p * c))
            self.scales[i] = scale
            self.meta.append((rec.object_id, rec.split, rec.labels, rec.spectrum))
            self.n += 1
            return
        scratch_f = _scratch("f32", (t, d), torch.float32)
        if arr.dtype == np.uint8:
            scratch_u8 = _scratch("u8", (t * p, p * c), torch.uint8)
            torch.index_select(src, 0, self.idx, out=scratch_u8)
            scratch_f.copy_(scratch_u8.view(t, d))
        else:
            if src.dtype != torch.float32:
                src = src.float()
            torch.index_select(src, 0, self.idx, out=scratch_f.view(t * p, p * c))
        _standardise_rows_into(scratch_f, self.tokens[i], self.mean[i], self.std[i])
        self.scales[i] = scale
        self.meta.append((rec.object_id, rec.split, rec.labels, rec.spectrum))
        self.n += 1

    def result(self) -> dict[str, Any]:
        n, eps = self.n, self.eps
        if self.output == "pixels":
            out: dict[str, Any] = {"pixels": self.pixels[:n], "scale": self.scales[:n]}
        else:
            tokens, mean, std = self.tokens[:n], self.mean[:n], self.std[:n]
            std.mul_(self.scales[:n])
            mean.mul_(self.scales[:n])
            _zero_flat(tokens, std, eps)
            out = {"tokens": tokens, "mean": mean, "std": std}
        label_keys: list[str] = []
        for _, _, labels, _ in self.meta:
            label_keys += [k for k in labels if k not in label_keys]
        out |= {
            "object_id": [m[0] for m in self.meta],
            "split": [m[1] for m in self.meta],
            "labels": {k: [m[2].get(k) for m in self.meta] for k in label_keys},
            "grid": (self.nh, self.nw),
            "patch_size": self.p,
        }
        spectra = [m[3] for m in self.meta]
        if any(sp is not None for sp in spectra):
            lengths = {None if sp is None else len(sp) for sp in spectra}
            out["spectrum"] = (
                torch.from_numpy(np.stack(spectra).astype(np.float32)) if len(lengths) == 1 and None not in lengths
                else spectra
            )  # fmt: skip
        return out


def _zero_flat(tokens: torch.Tensor, std: torch.Tensor, eps: float) -> None:
    """Flat patches (std below eps): zero tokens, std reported as eps (the `tokens.standardise` convention)."""
    flat = (std < eps).squeeze(-1)
    if bool(flat.any()):
        bi, ti = flat.nonzero(as_tuple=True)
        tokens[bi, ti] = 0.0
        std[bi, ti] = eps


def standardise_pixels(
    pixels: torch.Tensor, scale: torch.Tensor, eps: float = tok.DEFAULT_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device half of output="pixels": uint8 spiral patches (B, T, D) and their scale (B, 1, 1) -> float32
    (tokens, mean, std), on the pixels' device.

    The same operations in the same order as the CPU path (mean, centre, norm of the centred values, divide, then
    mean and std scaled to the image's units), so on the CPU the result is bit-identical to output="float32".
    """
    x = pixels.float()
    mean = torch.mean(x, dim=-1, keepdim=True)
    x.sub_(mean)
    std = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    std.mul_(1.0 / math.sqrt(x.shape[-1]))
    tokens = x.div_(std)
    std.mul_(scale)
    mean.mul_(scale)
    _zero_flat(tokens, std, eps)
    return tokens, mean, std


def batch_tokens(
    batch: dict[str, Any], device: torch.device | str | None = None, *, flux_softening: float | None = None
) -> torch.Tensor:
    """The float tokens of a batch of any output mode, on `device` (pixels are moved there, then standardised).

    With `flux_softening` (a flux-aware model's `ModelConfig.flux_softening`) each token is followed by its
    per-band flux features (`tokens.flux_features`): (B, T, D + 2 * C), what a model with `flux_features` reads.
    The trainer and the embedder both call this, so training and embedding see the same features.
    """
    if "tokens" in batch:
        tokens = batch["tokens"] if device is None else batch["tokens"].to(device, non_blocking=True)
        if flux_softening is None:
            return tokens
        mean, std = batch["mean"], batch["std"]
        if device is not None:
            mean, std = mean.to(device, non_blocking=True), std.to(device, non_blocking=True)
    else:
        pixels, scale = batch["pixels"], batch["scale"]
        if device is not None:
            pixels, scale = pixels.to(device, non_blocking=True), scale.to(device, non_blocking=True)
        tokens, mean, std = standardise_pixels(pixels, scale)
        if flux_softening is None:
            return tokens
    c = tokens.shape[-1] // (batch["patch_size"] ** 2)
    feats = tok.flux_features(tokens, mean, std, c, flux_softening).to(tokens.dtype)
    return torch.cat([tokens, feats], dim=-1)


def tokenize_records(
    records: list[Record],
    patch_size: int = 16,
    image_size: int | tuple[int, int] | None = None,
    eps: float = tok.DEFAULT_EPS,
    crop_to_patch: bool = True,
    *,
    allocate: Callable[[tuple[int, int, int], torch.dtype], torch.Tensor] | None = None,
    output: str = "float32",
) -> dict[str, Any]:
    """Records -> batch dict (tokens (B, T, P*P*C) float32 in spiral order, mean, std (B, T, 1), object_id,
    split, labels {name: list}, grid, patch_size, and spectrum when the records carry spectra). With
    output="bfloat16" the tokens are bfloat16; with output="pixels", `pixels` (B, T, D) uint8 and `scale` (B, 1, 1)
    replace tokens / mean / std (see `BatchBuilder`, `standardise_pixels`).

    Equal (to float rounding) to `tokens.tokenize` on the stacked, cropped float images, except that patches with
    std < eps give exactly zero tokens (std reported as eps). Works image by image into the output (cache-friendly
    for big stamps) and on the 8-bit pixels when the record has them. `allocate(shape, dtype)` may supply the
    (uninitialised) output tensor. Stamps larger than `image_size` are centre-cropped (`tokens.center_crop`); without
    it, a size that is not a multiple of the patch size is cropped to one (or is an error with crop_to_patch=False).
    """
    if not records:
        raise ValueError("no records to tokenise")
    builder = BatchBuilder(len(records), patch_size, image_size, eps, crop_to_patch, allocate, output)
    for rec in records:
        builder.add(rec)
    return builder.result()


class BufferPool:
    """Token buffers that are reused once nothing made from them is alive any more.

    Writing tokens into fresh memory costs a page fault per 4 KiB (a batch of 32 512x512 stamps is 100 MB of float32
    tokens, which the allocator maps fresh and unmaps again each time). Each pooled buffer is a numpy array handed
    out as `torch.from_numpy(array)`: every tensor, view or `.numpy()` array derived from it keeps the array alive
    through the tensor's storage, so the array's reference count is back at its idle value exactly when the consumer
    has let go of everything made from it. Only then is the buffer handed out again.
    """

    def __init__(self, size: int = 2):
        self.size = int(size)
        self._slots: list[_Slot] = []

    def get(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised tensor of `shape`: a released pooled buffer when there is one, else fresh memory."""
        for slot in self._slots:
            if slot.free_for(shape, dtype):
                return slot.tensor()
        slot = _Slot(shape, dtype)
        if self.size:
            self._slots.append(slot)
            if len(self._slots) > self.size:
                self._slots.pop(0)
        return slot.tensor()


_NUMPY_STORAGE = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.uint8: np.uint8}  # bf16: no numpy type


class _Slot:
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype
        self.array = np.empty(self.shape, _NUMPY_STORAGE[dtype])
        self.idle_refs = sys.getrefcount(self.array)  # measured like `free_for` does, before any tensor exists

    def free_for(self, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        return self.shape == tuple(shape) and self.dtype == dtype and sys.getrefcount(self.array) <= self.idle_refs

    def tensor(self) -> torch.Tensor:
        t = torch.from_numpy(self.array)
        return t.view(self.dtype) if t.dtype != self.dtype else t
