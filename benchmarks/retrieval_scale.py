"""Cross-modal retrieval evaluation at scale: recall@1/5/10 and median rank over all N pairs, time and peak memory.

    OMP_NUM_THREADS=2 python benchmarks/retrieval_scale.py [--sizes 10000,30000,100000 --dim 512 --noise 3]

For each N: synthetic aligned pairs in the shared space, image i a random unit vector in `dim` dimensions and its
partner a noisy copy (Gaussian noise of norm ~`noise`, re-normalised), then `eval-align`'s exact evaluation
(`align.evaluate.retrieval_metrics`, i.e. `true_partner_ranks`: the rank of every true partner among all N keys,
queries in chunks of 4096). The work is N² · dim multiply-adds and the similarity chunk holds 4096 · N floats, so
time should grow as N² and memory as N. Each size runs in a fresh process so that its peak RSS (`ru_maxrss`) is
its own; the pairs themselves take 2 · N · dim · 4 bytes of it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np


def pairs(n: int, dim: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x + (noise / math.sqrt(dim)) * rng.standard_normal((n, dim), dtype=np.float32)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return x, y


def one(n: int, dim: int, noise: float) -> dict:
    """Time `retrieval_metrics` on N pairs in this process; peak RSS of the whole process (MiB)."""
    import torch

    from astrolom.align.evaluate import retrieval_metrics

    x, y = pairs(n, dim, noise)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    m = retrieval_metrics(x, y)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "n": n,
        "threads": torch.get_num_threads(),
        "wall_s": round(wall, 2),
        "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2),
        "peak_rss_mib": round(r1.ru_maxrss / 1024, 1),  # Linux: KiB
        "pairs_mib": round(2 * n * dim * 4 / 2**20, 1),
        **{k: round(m[k], 4) for k in ("recall@1", "recall@5", "recall@10", "median_rank")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,30000,100000")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--noise", type=float, default=3.0)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one size, JSON out
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps(one(a.one, a.dim, a.noise)))
        return
    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--one", str(n), "--dim", str(a.dim), "--noise", str(a.noise)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"# N={n}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"{a.dim}-d pairs, partner = noisy copy (noise {a.noise}), {rows[0]['threads']} torch threads\n")
    print("| N pairs | wall s | CPU s | peak RSS MiB | of which pairs MiB | R@1 | R@5 | R@10 | median rank |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['pairs_mib']:.0f} | "
            f"{r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['recall@10']:.3f} | {r['median_rank']:.0f} |"
        )
    if len(rows) > 1:
        k = np.polyfit(np.log([r["n"] for r in rows]), np.log([max(r["cpu_s"], 1e-3) for r in rows]), 1)[0]
        print(f"\nCPU time ∝ N^{k:.2f}")


if __name__ == "__main__":
    main()
