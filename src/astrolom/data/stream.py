"""Deterministic, resumable, DDP-aware streams of records and of token batches.

`RecordStream(source, split="train", shuffle=True, seed=0, rank=0, world_size=1, epochs=None)`

* **Order.** Epoch e visits the source's chunks in a permutation drawn from (seed, e) and, inside each chunk, the
  rows of the requested split in a permutation drawn from (seed, e, chunk). Only one chunk's keys and rows are in
  memory at a time: memory does not grow with the data set. `shuffle=False` keeps file order.
* **Ranks.** The epoch's ordered stream of split records is numbered globally (k = 0, 1, 2, ... continuing across
  epochs) and dealt round-robin: record k goes to rank k % world_size. So with a batch of b records per step on one
  process and b / world_size per rank on world_size ranks, batch i of the single process is exactly the union of
  batch i of the ranks, every step, across epoch boundaries. Ranks only decode their own records.
* **Position.** `state_dict()` is a small JSON-able dict {epoch, chunk, row, k} naming the start of the round of
  world_size records that holds this rank's next record (plus the settings, checked on load). Restored with
  `load_state_dict`, iteration continues with exactly the next record. At batch boundaries every rank has the same
  state, so saving rank 0's is enough.
* **Bad records** (when the source has skip_bad=True) are skipped by the rank that owns them; that rank then takes
  its next record, so its batches shift by one relative to the other ranks (the union over ranks still equals the
  single-process stream). Without skip_bad, a bad record raises `BadRecordError`.

`TokenBatches(stream, batch_size, patch_size=16, image_size=None)` turns records into dicts of spiral-ordered,
per-patch standardised tokens (`astrolom.data.tokens` conventions), with the same state_dict/load_state_dict counted
in whole batches. Stamps larger than `image_size` are centre-cropped (the spiral prefix is the centre, so a causal
model's first tokens see the same pixels whatever the stamp size); without `image_size`, stamps that are not a
multiple of the patch size are centre-cropped with `tokens.center_crop` (`crop_to_patch=False` makes it an error).
"""

from __future__ import annotations

import copy
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from astrolom.data import tokens as tok
from astrolom.data.records import SPLITS, Record
from astrolom.data.sources import PixelRecord, Source

STATE_VERSION = 1


class RecordStream:
    """Iterable of `Record`s from a `Source`; see the module docstring for order, ranks and position."""

    def __init__(
        self,
        source: Source,
        *,
        split: str | None = "train",
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        decode_block: int = 32,
    ):
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if epochs is not None and epochs < 0:
            raise ValueError(f"epochs must be >= 0 or None, got {epochs}")
        self.source = source
        self.split = split
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epochs = epochs
        self.decode_block = max(1, int(decode_block))
        self._pos = {"epoch": 0, "chunk": 0, "row": 0, "k": 0}
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._reported_skips = 0

    # -- order ----------------------------------------------------------------------------------------------------
    def chunk_order(self, epoch: int) -> np.ndarray:
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        n = self.source.num_chunks
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(n) if self.shuffle else np.arange(n)
        self._order_cache = (epoch, order)
        return order

    def _split_count(self, chunk: int) -> int:
        _, splits = self.source.chunk_keys(chunk)
        return len(splits) if self.split is None else sum(s == self.split for s in splits)

    def chunk_rows(self, epoch: int, chunk: int) -> list[int]:
        """Rows (indices within `chunk`) of the requested split, in the order epoch `epoch` visits them."""
        _, splits = self.source.chunk_keys(chunk)
        rows = [j for j, s in enumerate(splits) if self.split is None or s == self.split]
        if self.shuffle and len(rows) > 1:
            perm = np.random.default_rng([self.seed, epoch, 1, int(chunk)]).permutation(len(rows))
            rows = [rows[p] for p in perm]
        return rows

    def epoch_size(self) -> int:
        """Records of the split in one epoch, over all ranks (reads every chunk's keys, no images)."""
        return sum(len(self.chunk_rows(0, c)) for c in range(self.source.num_chunks))

    # -- iteration ------------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Record]:
        return self._generate()

    def _generate(self) -> Iterator[Record]:
        w, r = self.world_size, self.rank
        e, ci, row = self._pos["epoch"], self._pos["chunk"], self._pos["row"]
        k0 = self._pos["k"] - row  # global index of the first record of the current chunk
        nchunks = self.source.num_chunks
        epoch_total = 0 if (ci == 0 and row == 0) else None  # split records seen in a full epoch
        while self.epochs is None or e < self.epochs:
            if ci >= nchunks:
                if epoch_total == 0:
                    raise ValueError(f"{self.source.location}: no records in split {self.split!r}")
                self._end_of_epoch()
                e, ci, epoch_total = e + 1, 0, 0
                continue
            order = self.chunk_order(e)
            chunk = int(order[ci])
            sel = self.chunk_rows(e, chunk)
            if epoch_total is not None:
                epoch_total += len(sel)
            if row >= len(sel):  # saved position lies beyond this chunk (or the rank has nothing left in it)
                row -= len(sel)
                k0 += len(sel)
                ci += 1
                continue
            mine = [t for t in range(row, len(sel)) if (k0 + t) % w == r]
            for b in range(0, len(mine), self.decode_block):
                ts = mine[b : b + self.decode_block]
                recs = self.source.read_aligned(chunk, [sel[t] for t in ts])
                for j, t in enumerate(ts):
                    rec, recs[j] = recs[j], None  # hand the record over: the stream keeps no reference to it
                    # next record of this rank is global k0 + t + w; store the start of its round (rank-independent)
                    self._pos = {"epoch": e, "chunk": ci, "row": t + w - r, "k": k0 + t + w - r}
                    if rec is not None:
                        yield rec
                        rec = None
            k0 += len(sel)
            ci += 1
            row = 0
        self._end_of_epoch()

    def _end_of_epoch(self) -> None:
        if self.source.skipped > self._reported_skips:
            self._reported_skips = self.source.skipped
            self.source.log_summary()

    # -- position -------------------------------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_chunks": self.source.num_chunks,
            "num_records": len(self.source),
        }

    def _canonical(self, pos: dict[str, int]) -> dict[str, int]:
        """The same position with 0 <= row < records of the split in that chunk (the stream may leave `row` past
        the end of its chunk); makes the states of all ranks identical at batch boundaries."""
        e, ci, row = pos["epoch"], pos["chunk"], pos["row"]
        n_chunks, empty_run = self.source.num_chunks, 0
        while n_chunks and empty_run <= n_chunks:
            if ci >= n_chunks:
                e, ci = e + 1, 0
            n = self._split_count(int(self.chunk_order(e)[ci]))
            if row < n:
                break
            empty_run = empty_run + 1 if n == 0 else 0
            row, ci = row - n, ci + 1
        return {"epoch": e, "chunk": ci, "row": row, "k": pos["k"]}

    def state_dict(self) -> dict[str, Any]:
        return self._state_of(self._pos)

    def _state_of(self, pos: dict[str, int]) -> dict[str, Any]:
        return {"version": STATE_VERSION, **self._canonical(pos), "settings": self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; the next iterator (`iter(stream)`) continues with exactly the next record."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported stream state version {state.get('version')!r}")
        saved, now = state.get("settings", {}), self._settings()
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if diff:
            raise ValueError(
                "stream state was saved with different settings (saved, now): "
                + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
            )
        self._pos = {k: int(state[k]) for k in ("epoch", "chunk", "row", "k")}


# --------------------------------------------------------------------------------------------------------------------
# tokenisation (fast path with the conventions and ordering of astrolom.data.tokens)


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


class _BatchBuilder:
    """Tokenises records one at a time into a preallocated batch, so a decoded image can be released as soon as its
    tokens are written (peak memory: the batch plus one image)."""

    def __init__(self, capacity, patch_size, image_size, eps, crop_to_patch, allocate):
        self.capacity, self.p, self.image_size = capacity, int(patch_size), image_size
        self.eps, self.crop_to_patch, self.allocate = eps, crop_to_patch, allocate
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
        self.tokens = torch.empty(b, t, d) if self.allocate is None else self.allocate((b, t, d))
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
        if shape[0] != h or shape[1] != w:
            if self.image_size is None:  # only the patch-size remainder: the tokens.py crop convention
                arr = tok.center_crop(_as_tensor(arr), p).numpy()
            else:
                top, left = (shape[0] - h) // 2, (shape[1] - w) // 2
                arr = arr[top : top + h, left : left + w]
        arr = np.ascontiguousarray(arr)
        t, d = self.nh * self.nw, p * p * c
        src = _as_tensor(arr).view(h * self.nw, p * c)
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
        tokens, mean, std = self.tokens[:n], self.mean[:n], self.std[:n]
        std.mul_(self.scales[:n])
        mean.mul_(self.scales[:n])
        flat = (std < eps).squeeze(2)  # flat patches (std below eps): zero tokens, std reported as eps
        if bool(flat.any()):
            bi, ti = flat.nonzero(as_tuple=True)
            tokens[bi, ti] = 0.0
            std[bi, ti] = eps
        label_keys: list[str] = []
        for _, _, labels, _ in self.meta:
            label_keys += [k for k in labels if k not in label_keys]
        out: dict[str, Any] = {
            "tokens": tokens,
            "mean": mean,
            "std": std,
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


def tokenize_records(
    records: list[Record],
    patch_size: int = 16,
    image_size: int | tuple[int, int] | None = None,
    eps: float = tok.DEFAULT_EPS,
    crop_to_patch: bool = True,
    *,
    allocate: Callable[[tuple[int, int, int]], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Records -> batch dict (tokens (B, T, P*P*C) float32 in spiral order, mean, std (B, T, 1), object_id,
    split, labels {name: list}, grid, patch_size, and spectrum when the records carry spectra).

    Equal (to float rounding) to `tokens.tokenize` on the stacked, cropped float images, except that patches with
    std < eps give exactly zero tokens (std reported as eps). Works image by image into the output (cache-friendly
    for big stamps) and on the 8-bit pixels when the record has them. `allocate(shape)` may supply the
    (uninitialised) token tensor. Stamps larger than `image_size` are centre-cropped (top-left offset
    ((H - h) // 2, (W - w) // 2)); without it, a size that is not a multiple of the patch size is cropped with
    `tokens.center_crop` (or is an error with crop_to_patch=False).
    """
    if not records:
        raise ValueError("no records to tokenise")
    builder = _BatchBuilder(len(records), patch_size, image_size, eps, crop_to_patch, allocate)
    for rec in records:
        builder.add(rec)
    return builder.result()


def _storage_use_count(t: torch.Tensor) -> int:
    """Number of tensors (TensorImpls: views included) sharing t's storage."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1  # minus the temporary storage object


_storage_refs = _storage_use_count if hasattr(torch._C, "_storage_Use_Count") else None


class TokenBatches:
    """Batches of spiral-ordered tokens from a RecordStream, resumable in whole batches.

    Each item is the dict of `tokenize_records`: tokens (B, T, P*P*C) float32, mean / std (B, T, 1) (so
    `tokens * std + mean` gives the pixel patches back), object_id, split, labels {name: list}, grid, patch_size
    and, when records carry spectra, spectrum. With finite epochs the last batch may be short unless drop_last.
    `recycle` (default 2) token buffers are kept and reused once every tensor made from them has been released
    (saves the page faults of fresh memory; never overwrites anything still referenced); 0 turns this off.
    """

    def __init__(
        self,
        stream: RecordStream,
        batch_size: int,
        *,
        patch_size: int = 16,
        image_size: int | tuple[int, int] | None = None,
        eps: float = tok.DEFAULT_EPS,
        drop_last: bool = False,
        crop_to_patch: bool = True,
        recycle: int = 2,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if image_size is not None:
            hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            tok.grid_shape(hw[0], hw[1], patch_size)
        self.stream = stream
        self.batch_size = int(batch_size)
        self.patch_size = int(patch_size)
        self.image_size = image_size
        self.eps = eps
        self.drop_last = drop_last
        self.crop_to_patch = crop_to_patch
        self.recycle = int(recycle) if _storage_refs is not None else 0
        self._pool: list[torch.Tensor] = []
        self._state = {"stream": stream.state_dict(), "batches": 0}

    def _allocate(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """Token memory for a batch: a pooled buffer that nothing outside the pool references any more, else new.

        Writing tokens into fresh memory costs a page fault per 4 KiB (as much as the JPEG decode for big stamps);
        reusing a released buffer avoids it. A buffer is reused only when no tensor, view or numpy array made from
        an earlier batch is alive, so recycling is never visible to the consumer.
        """
        for buf in self._pool:
            if buf.shape == shape and _storage_refs(buf) == 1:
                return buf.view(shape)  # hand out a view: the consumer's references are then counted
        buf = torch.empty(shape)
        if self.recycle:
            self._pool.append(buf)
            if len(self._pool) > self.recycle:
                self._pool.pop(0)
        return buf.view(shape)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = iter(self.stream)
        batches = self._state["batches"]
        while True:
            builder = None
            for rec in it:  # tokenise as records arrive: each decoded image is released right away
                if builder is None:
                    builder = _BatchBuilder(
                        self.batch_size, self.patch_size, self.image_size, self.eps, self.crop_to_patch, self._allocate
                    )
                builder.add(rec)
                rec = None
                if builder.n == self.batch_size:
                    break
            if builder is None or (self.drop_last and builder.n < self.batch_size):
                return
            batch = builder.result()
            builder = None
            batches += 1
            self._state = {"stream": dict(self.stream._pos), "batches": batches, "raw": True}
            yield batch
            batch = None  # drop our reference so that the buffer can be recycled once the consumer is done

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out (JSON-able)."""
        if self._state.get("raw"):
            self._state = {"stream": self.stream._state_of(self._state["stream"]), "batches": self._state["batches"]}
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; the next `iter()` yields exactly the batch that followed the saved one."""
        self.stream.load_state_dict(state["stream"])
        self._state = {"stream": copy.deepcopy(state["stream"]), "batches": int(state["batches"])}
