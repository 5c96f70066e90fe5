"""Alignment speed: head training steps/s on cached features, and retrieval evaluation time vs test-set size.

    python benchmarks/align_speed.py [--batch 128 --tokens 16 --spec-tokens 97 --width 64 --embed 512 --steps 20
                                      --sizes 10000,30000,100000]

Training: one `AlignModel` step (both cross-attention heads forward/backward, InfoNCE at logit scale 15.5, AdamW)
on random cached token features shaped like the measured run (image: batch x tokens x width; spectrum: batch x
spec-tokens x width). Retrieval: `true_partner_ranks` (exact rank of every true partner among all N keys, in
chunks) on N random L2-normalised `embed`-d pairs, image->spectrum, as `eval-align` runs it. The work is N² · embed
multiply-adds, so time should grow as N²; the table gives the fitted exponent. Wall and CPU time of the process
(user + system) both shown: the machine may be shared.
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import numpy as np
import torch

from astrolom.align.evaluate import retrieval_metrics
from astrolom.align.model import AlignConfig, AlignModel


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def train_speed(batch: int, tokens: int, spec_tokens: int, width: int, embed: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = AlignModel(AlignConfig(image_dim=width, spectrum_dim=width, embed_dim=embed))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    img, spec = torch.randn(batch, tokens, width), torch.randn(batch, spec_tokens, width)
    mask = torch.ones(batch, spec_tokens, dtype=torch.bool)
    for _ in range(3):  # warm-up
        model(img, spec, mask).backward()
    t0, c0 = time.perf_counter(), _cpu()
    for _ in range(steps):
        opt.zero_grad()
        model(img, spec, mask).backward()
        opt.step()
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    return {"steps/s (wall)": steps / wall, "steps/s per CPU-s": steps / cpu, "pairs/s (wall)": steps * batch / wall}


def retrieval_speed(sizes: list[int], embed: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        x = rng.normal(size=(n, embed)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y = x + 0.5 * rng.normal(size=x.shape).astype(np.float32) / math.sqrt(embed)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        t0, c0 = time.perf_counter(), _cpu()
        r = retrieval_metrics(x, y)
        rows.append({"n": n, "wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0, "recall@10": r["recall@10"]})
        del x, y
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--spec-tokens", type=int, default=97)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--embed", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sizes", default="10000,30000,100000")
    a = p.parse_args()
    t = train_speed(a.batch, a.tokens, a.spec_tokens, a.width, a.embed, a.steps)
    print(
        f"## Alignment head training (batch {a.batch}, {a.tokens}+{a.spec_tokens} tokens x {a.width}, "
        f"embed {a.embed}, torch threads {torch.get_num_threads()})\n"
    )
    print("| steps/s (wall) | steps/s per CPU-second | pairs/s (wall) |\n|---:|---:|---:|")
    print(f"| {t['steps/s (wall)']:.2f} | {t['steps/s per CPU-s']:.2f} | {t['pairs/s (wall)']:.0f} |\n")
    rows = retrieval_speed([int(s) for s in a.sizes.split(",")], a.embed)
    print(f"## Retrieval evaluation (exact ranks, embed {a.embed})\n")
    print("| test pairs | wall s | CPU s | recall@10 |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['recall@10']:.3f} |")
    if len(rows) > 1:
        n, c = np.log([r["n"] for r in rows]), np.log([r["cpu_s"] for r in rows])
        print(f"\nCPU time ∝ N^{np.polyfit(n, c, 1)[0]:.2f} (expected N^2: every query against every key)")


if __name__ == "__main__":
    main()
