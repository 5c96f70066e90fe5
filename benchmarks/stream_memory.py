"""Flat memory while streaming: peak RSS of RecordStream -> TokenBatches over 10k, 100k and 1M records.

Each size runs in a fresh subprocess (so one size's peak cannot hide another's), reading a generated on-the-fly
data set: a `Source` whose records are made when read (8-bit g/r/z stamps, a few distinct images cycled by index, so
generation costs little and needs no disk), with the real machinery around it: chunks of `chunk_rows` records,
per-chunk key reads and split assignment by object-id hash, the shuffled resumable stream, and the batched tokeniser
with its buffer pool. Every batch is consumed and dropped, as the trainer does. What could grow with the number of
records (chunk lists, key caches, the bad-record list, stream positions, token buffers) would show as a growing peak.

Run: python benchmarks/stream_memory.py [--sizes 10000 100000 1000000] [--size 32] [--batch 64] [--markdown]

The peak is `ru_maxrss` of the child process (Linux: KiB), which includes the Python interpreter, numpy, torch and
pyarrow imports (the floor every size shares); the table also gives the peak after the first batch, so the growth
during streaming is the difference.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _child(n: int, size: int, batch: int, chunk_rows: int) -> dict:
    """Stream n generated records once through RecordStream -> TokenBatches; return RSS numbers and counts."""
    import fsspec
    import torch

    from astrolom.data.sources.base import Chunk, Item, Source
    from astrolom.data.sources.options import SourceOptions
    from astrolom.data.stream import RecordStream, TokenBatches

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    stamps = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(16)]

    class GeneratedSource(Source):
        """n records made on the fly: record i is stamp i % 16 (uint8, max 255), object id `gen{i}`."""

        format = "generated"
        _decoder = staticmethod(lambda payload: (stamps[payload], 255, ("g", "r", "z")))

        def __init__(self, n_records: int, options: SourceOptions):
            super().__init__(f"generated://{n_records}", fsspec.filesystem("memory"), [], options)
            rows = self.chunk_rows
            self.chunks = [
                Chunk(k, self.location, min(rows, n_records - s), f"records {s}..")
                for k, s in enumerate(range(0, n_records, rows))
            ]
            self.image_shape = (size, size, 3)

        def _chunk_keys(self, i):
            s = i * self.chunk_rows
            ids = [f"gen{s + r}" for r in range(self.chunks[i].rows)]
            return ids, [self._split_for(x) for x in ids]

        def _items(self, i, rows):
            s = i * self.chunk_rows
            return [Item(self.location, s + r, f"gen{s + r}", "train", {"i": s + r}, (s + r) % 16) for r in rows]

    src = GeneratedSource(n, SourceOptions(chunk_rows=chunk_rows, split_fractions=(1.0, 0.0, 0.0)))
    batches = TokenBatches(RecordStream(src, split="train", shuffle=True, seed=0, epochs=1), batch)
    seen = n_batches = 0
    first_rss = None
    t = time.perf_counter()
    for b in batches:
        seen += len(b["object_id"])
        n_batches += 1
        if first_rss is None:
            first_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        b = None
    wall = time.perf_counter() - t
    state = batches.state_dict()
    return {
        "n": n,
        "seen": seen,
        "batches": n_batches,
        "first_kib": first_rss,
        "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "wall_s": wall,
        "state_bytes": len(json.dumps(state)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--size", type=int, default=32, help="stamp size in pixels (patch 16)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=256)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args.child, args.size, args.batch, args.chunk_rows)))
        return 0

    from tqdm.auto import tqdm

    rows = []
    for n in tqdm(args.sizes, desc="sizes (fresh process each)", unit="size"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--size", str(args.size)]
        cmd += ["--batch", str(args.batch), "--chunk-rows", str(args.chunk_rows)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        if r["seen"] != n:
            raise RuntimeError(f"streamed {r['seen']} records of {n}")
        rows.append(r)
    base = rows[0]["peak_kib"]
    header = (
        f"RecordStream -> TokenBatches over generated {args.size}x{args.size}x3 uint8 stamps, patch 16, batch "
        f"{args.batch}, chunk_rows {args.chunk_rows}, shuffled, one epoch; one fresh process per size"
    )
    print(header + "\n")
    if args.markdown:
        print(
            "| records | batches | peak RSS after the first batch (MiB) | peak RSS at the end (MiB) "
            "| peak vs smallest | wall (s) |"
        )
        print("|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['n']:,} | {r['batches']:,} | {r['first_kib'] / 1024:.1f} | {r['peak_kib'] / 1024:.1f} | "
                f"{100 * (r['peak_kib'] / base - 1):+.1f} % | {r['wall_s']:.0f} |"
            )
    else:
        print(f"{'records':>10} {'batches':>8} {'first MiB':>10} {'peak MiB':>9} {'vs smallest':>12} {'wall s':>7}")
        for r in rows:
            print(
                f"{r['n']:>10,} {r['batches']:>8,} {r['first_kib'] / 1024:>10.1f} {r['peak_kib'] / 1024:>9.1f} "
                f"{100 * (r['peak_kib'] / base - 1):>+11.1f}% {r['wall_s']:>7.0f}"
            )
    spread = max(r["peak_kib"] for r in rows) / min(r["peak_kib"] for r in rows) - 1
    print(f"\npeak RSS spread across sizes: {100 * spread:.1f} % (goal: within 10 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
