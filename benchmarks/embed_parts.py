"""Resumable embedding: what writing parts costs beside one file, and peak memory against the data size.

    python benchmarks/embed_parts.py --data SURVEY_DIR [--n 2048 --part-rows 256 --repeats 3]

Same model, same galaxies (the first `--n` of the train split), CPU fp32, interleaved repeats (medians):

- one file: `embed_dataset(..., out=EMB.parquet)`, the default of a single process;
- parts: `embed_dataset(..., part_rows=K)`, a parts directory with a progress file updated (atomically, fsynced)
  after every part, which is what makes a killed job resumable (`astrolom embed --part-rows K --resume`).

Rates are galaxies per wall-clock second and per CPU-second of the process (robust to other jobs on a shared
machine). Peak memory: each of `--n / 4` and `--n` galaxies embedded into parts in a fresh process, its peak RSS
(ru_maxrss); bounded memory means the two are about the same. `--data` is an astrolom mock survey
(`astrolom survey --n 2048 --size 64 --out DIR`); without it one is generated into a temporary directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_throughput import _cpu_model  # noqa: E402


def _model(preset: str, patch: int, size: int, out: Path) -> Path:
    from astrolom.model.astropt import AstroPT
    from astrolom.model.presets import model_config
    from astrolom.model.pretrained import save_pretrained

    torch.manual_seed(0)
    return save_pretrained(AstroPT(model_config(preset, block_size=(size // patch) ** 2, patch_size=patch)), out)


def _embed(model_dir: str, data: str, out: str, n: int, part_rows: int | None, batch: int) -> None:
    from astrolom.eval.embed import embed_dataset
    from astrolom.model.pretrained import load_model

    model, meta = load_model(model_dir)
    embed_dataset(model, data, out, splits=("train",), batch_size=batch, metadata=meta, max_per_split=n,
                  part_rows=part_rows, device="cpu", progress=False)  # fmt: skip


def _peak_rss_mb(model_dir: Path, data: str, out: Path, n: int, part_rows: int, batch: int) -> float:
    """Peak RSS (MB) of a fresh process that embeds the first n galaxies into parts."""
    code = (
        "import resource, sys; sys.path.insert(0, sys.argv[1]); from embed_parts import _embed; "
        "_embed(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    args = [str(Path(__file__).parent), str(model_dir), data, str(out), str(n), str(part_rows), str(batch)]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="astrolom mock survey directory (default: generate one)")
    ap.add_argument("--n", type=int, default=2048, help="galaxies embedded per measurement")
    ap.add_argument("--size", type=int, default=64, help="stamp size of a generated survey")
    ap.add_argument("--preset", default="1m")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--part-rows", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            from astrolom.mock import generate_survey

            data = str(generate_survey(tmp / "survey", n=int(args.n * 1.6), size=args.size, seed=0, progress=False))
        model_dir = _model(args.preset, args.patch, args.size, tmp / "model")

        def timed(part_rows: int | None) -> tuple[float, float]:
            out = tmp / ("parts" if part_rows else "one.parquet")
            t0, c0 = time.perf_counter(), time.process_time()
            _embed(str(model_dir), data, str(out), args.n, part_rows, args.batch)
            return args.n / (time.perf_counter() - t0), args.n / (time.process_time() - c0)

        timed(None)  # warm-up: page cache, model load
        runs = {"one file (EMB.parquet)": None, f"parts of {args.part_rows} (resumable)": args.part_rows}
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for name, part_rows in runs.items():
                results[name].append(timed(part_rows))
        peak = {
            n: _peak_rss_mb(model_dir, data, tmp / f"rss{n}", n, args.part_rows, args.batch)
            for n in (args.n // 4, args.n)
        }

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {_cpu_model()}",
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "torch": torch.__version__,
        "model": f"fresh {args.preset}, {args.patch} px patches, {args.size}x{args.size} stamps",
        "galaxies": args.n,
        "batch": args.batch,
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
    }
    print(json.dumps(info))
    wall = {k: statistics.median(x for x, _ in v) for k, v in results.items()}
    cpu = {k: statistics.median(y for _, y in v) for k, v in results.items()}
    peer = next(iter(runs))
    print(f"\n| writer (median of {args.repeats}, {args.n} galaxies) | galaxies/s wall | vs one file | "
          "galaxies/CPU-s | vs one file |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for name in runs:
        print(f"| {name} | {wall[name]:,.0f} | {wall[name] / wall[peer]:.2f}x | {cpu[name]:,.0f} | "
              f"{cpu[name] / cpu[peer]:.2f}x |")  # fmt: skip
    print("\n| galaxies embedded into parts (fresh process) | peak RSS MB |")
    print("|---:|---:|")
    for n, mb in peak.items():
        print(f"| {n:,} | {mb:,.0f} |")
    print(f"\npeak RSS ratio {args.n:,} / {args.n // 4:,} galaxies: {peak[args.n] / peak[args.n // 4]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
