"""Pretraining step time of this checkout beside a peer checkout (e.g. the commit before a change to the loop).

    OMP_NUM_THREADS=2 python benchmarks/engine_step.py --data SURVEY --peer-src /path/to/peer/src [--rounds 3]

Each round runs one fresh process per source tree, alternating, so that background load hits both alike; each
process trains `Trainer.train_step` on the demo's settings (`1m`, flux-aware tokens, batch 32, 8 px patches on the
64 px mock stamps), times `--steps` steps after 5 warm-up steps, and reports wall and CPU (user + system, all
threads) milliseconds per step and its last loss. The table gives medians over rounds and the ratio ours / peer.
`--data` is an astrolom mock survey (`astrolom survey --n 600 --size 64 --out DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OURS = Path(__file__).resolve().parents[1] / "src"


def _worker(data: str, steps: int) -> dict:
    import torch

    import astrolom
    from astrolom.train.pretrain import make_config
    from astrolom.train.trainer import Trainer

    overrides = ["data.patch_size=8", "model.flux_features=true", "train.batch_size=32", "train.eval_interval=0",
                 "train.checkpoint_interval=0", "train.tensorboard=false", "train.progress=false"]  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(make_config(data=data, preset="1m", out=out, max_steps=steps + 5, overrides=overrides))
        for _ in range(5):
            trainer.train_step()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        rows = [trainer.train_step() for _ in range(steps)]
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        trainer.data.close()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {
        "src": str(Path(astrolom.__file__).parents[1]),
        "ms_per_step": wall / steps * 1e3,
        "cpu_ms_per_step": cpu / steps * 1e3,
        "last_loss": rows[-1]["loss"],
        "threads": torch.get_num_threads(),
    }


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="astrolom mock survey directory")
    ap.add_argument("--peer-src", required=True, help="the src/ directory of the checkout to compare against")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.data, args.steps)))
        return
    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    loads = [_load()]
    for _ in range(args.rounds):
        for name, src in (("peer", args.peer_src), ("ours", str(OURS))):
            env = dict(os.environ, PYTHONPATH=src)
            cmd = [sys.executable, __file__, "--worker", "--data", args.data, "--steps", str(args.steps),
                   "--peer-src", args.peer_src]  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            loads.append(_load())
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("ms_per_step", "cpu_ms_per_step")}
           for n, rs in runs.items()}  # fmt: skip
    print(f"load average (1/5/15 min) before and after each run: {' | '.join(loads)}")
    print(f"threads {runs['ours'][0]['threads']}, {args.steps} steps per run, {args.rounds} rounds")
    for name, rs in runs.items():
        print(f"{name}, each round (wall / CPU ms per step): " + ", ".join(
            f"{r['ms_per_step']:.0f} / {r['cpu_ms_per_step']:.0f}" for r in rs))  # fmt: skip
    print()
    print("| | ours | peer | ours / peer |\n|---|---:|---:|---:|")
    for key, label in (("ms_per_step", "wall ms per step"), ("cpu_ms_per_step", "CPU ms per step")):
        ours, peer = med["ours"][key], med["peer"][key]
        print(f"| {label} | {ours:.1f} | {peer:.1f} | {ours / peer:.3f} |")
    same = {r["last_loss"] for r in runs["ours"] + runs["peer"]}
    verdict = "identical" if len(same) == 1 else "DIFFERENT"
    print(f"\nlast loss: {', '.join(repr(x) for x in sorted(same))} ({verdict})")


if __name__ == "__main__":
    main()
