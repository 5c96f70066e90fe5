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
per-patch standardised tokens (`astrolom.data.tokens` conventions; the tokeniser is `astrolom.data.batching`), with
the same state_dict/load_state_dict counted in whole batches. Stamps larger than `image_size` are centre-cropped (the
spiral prefix is the centre, so a causal model's first tokens see the same pixels whatever the stamp size); without
`image_size`, stamps that are not a multiple of the patch size are centre-cropped with `tokens.center_crop`
(`crop_to_patch=False` makes it an error).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np

from astrolom.data import tokens as tok
from astrolom.data.batching import OUTPUTS, BatchBuilder, BufferPool, tokenize_records
from astrolom.data.records import SPLITS, Record
from astrolom.data.sources import Source

__all__ = ["RecordStream", "TokenBatches", "tokenize_records"]  # tokenize_records lives in astrolom.data.batching

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
        owned = yielded = 0  # this rank's records in the epoch, and how many of them were not skipped as bad
        while self.epochs is None or e < self.epochs:
            if ci >= nchunks:
                if epoch_total == 0:
                    raise ValueError(f"{self.source.location}: no records in split {self.split!r}")
                self._check_not_all_bad(owned, yielded, full_epoch=epoch_total is not None)
                self._end_of_epoch()
                e, ci, epoch_total, owned, yielded = e + 1, 0, 0, 0, 0
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
            owned += len(mine)
            for b in range(0, len(mine), self.decode_block):
                ts = mine[b : b + self.decode_block]
                recs = self.source.read_aligned(chunk, [sel[t] for t in ts])
                for j, t in enumerate(ts):
                    rec, recs[j] = recs[j], None  # hand the record over: the stream keeps no reference to it
                    # next record of this rank is global k0 + t + w; store the start of its round (rank-independent)
                    self._pos = {"epoch": e, "chunk": ci, "row": t + w - r, "k": k0 + t + w - r}
                    if rec is not None:
                        yielded += 1
                        yield rec
                        rec = None
            k0 += len(sel)
            ci += 1
            row = 0
        self._end_of_epoch()

    def _check_not_all_bad(self, owned: int, yielded: int, full_epoch: bool) -> None:
        """A whole epoch of this rank's records skipped as bad would otherwise end the stream (finite epochs) or
        spin forever (endless training): stop with the reason instead."""
        if full_epoch and owned and not yielded:
            where = f" (listed in {self.source.manifest})" if self.source.manifest else ""
            first = f"; first: {self.source.bad[0]['reason']}" if self.source.bad else ""
            rank = f" read by rank {self.rank} of {self.world_size}" if self.world_size > 1 else ""
            raise ValueError(
                f"{self.source.location}: every record of split {self.split!r}{rank} is bad ({owned} skipped by "
                f"skip_bad{where}){first}"
            )

    def _end_of_epoch(self) -> None:
        listed = self.source.skipped + self.source.spectra_dropped
        if listed > self._reported_skips:
            self._reported_skips = listed
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


class TokenBatches:
    """Batches of spiral-ordered tokens from a RecordStream, resumable in whole batches.

    Each item is the dict of `tokenize_records`: tokens (B, T, P*P*C) float32, mean / std (B, T, 1) (so
    `tokens * std + mean` gives the pixel patches back), object_id, split, labels {name: list}, grid, patch_size
    and, when records carry spectra, spectrum. With finite epochs the last batch may be short unless drop_last.
    `output="bfloat16"` gives bfloat16 tokens, `output="pixels"` uint8 spiral patches plus their scale instead of
    tokens / mean / std, to be standardised on the training device (`astrolom.data.batching.standardise_pixels`).
    `recycle` (default 2) token buffers are kept and reused once every tensor made from them has been released
    (`batching.BufferPool`: saves the page faults of fresh memory, about a third of the pipeline's time on 512x512
    stamps; never overwrites anything still referenced); 0 turns this off.
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
        output: str = "float32",
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
        self.recycle = int(recycle)
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.output = output
        self._pool = BufferPool(self.recycle)
        self._state = {"stream": stream.state_dict(), "batches": 0}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = iter(self.stream)
        batches = self._state["batches"]
        while True:
            builder = None
            for rec in it:  # tokenise as records arrive: each decoded image is released right away
                if builder is None:
                    builder = BatchBuilder(
                        self.batch_size,
                        self.patch_size,
                        self.image_size,
                        self.eps,
                        self.crop_to_patch,
                        self._pool.get,
                        self.output,
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
