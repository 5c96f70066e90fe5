"""Shared by the trainer tests: a deterministic tiny data set, CLI runners, and the stored reference losses.

The reference losses (tests/reference_losses.json) are the first steps of the debug preset on `write_blobs` data.
Regenerate them, after a deliberate change to the model, its initialisation, the optimiser or the data pipeline, with

    python tests/pretrain_helpers.py --regenerate

and commit the new file together with the change that explains it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "reference_losses.json"
# small and fast: 32x32 stamps in 8x8 patches -> 16 tokens of 192 values
TINY = ["data.patch_size=8", "train.progress=false", "train.tensorboard=false"]


def write_blobs(out: str | Path, n: int = 48, size: int = 32, seed: int = 0, shards: int = 2) -> Path:
    """Parquet shards (astrolom layout, see data/records.py) of elliptical Gaussian 'galaxies' plus noise.

    Pure numpy (PCG64), so the pixels are identical on every machine and release: safe for stored losses.
    Every 4th object is in `val`, every 8th (offset 2) in `test`, the rest in `train`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.Generator(np.random.PCG64(seed))
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    rows = []
    for i in range(n):
        sigma, q, theta, flux = rng.uniform(1.5, 6), rng.uniform(0.3, 1), rng.uniform(0, np.pi), rng.uniform(1, 10)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        v = (-xx * np.sin(theta) + yy * np.cos(theta)) / q
        profile = flux * np.exp(-0.5 * (u**2 + v**2) / sigma**2)
        colour = rng.uniform(0.5, 1.5, 3)
        img = (profile[..., None] * colour + rng.normal(0, 0.05, (size, size, 3))).astype(np.float32)
        split = "val" if i % 4 == 3 else "test" if i % 8 == 2 else "train"
        rows.append(
            {"object_id": f"blob{i:05d}", "split": split, "image": img.tobytes(), "image_shape": list(img.shape)}
        )
    for k in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[k::shards]), out / f"shard-{k:03d}.parquet")
    return out


def subprocess_env(**extra: str) -> dict[str, str]:
    # one thread per process: deterministic, and fast on a shared 2-core machine (no OpenMP spinning)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def run_pretrain(args: list[str], *, nproc: int = 1, env: dict | None = None, timeout: float = 120):
    """`astrolom pretrain ARGS` in a subprocess (under torchrun when nproc > 1); returns CompletedProcess."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += ["-m", "astrolom", "pretrain", *args]
    else:
        cmd = [sys.executable, "-m", "astrolom", "pretrain", *args]
    return subprocess.run(
        cmd, env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=timeout, check=False
    )


def pretrain_here(args: list[str]) -> int:
    """`astrolom pretrain ARGS` in this process, on one thread like `run_pretrain`'s children; returns the exit code.

    For the uninterrupted runs that killed, resumed or torchrun runs are compared with: the same CLI and seeds, so the
    same bits, without paying a fresh interpreter's imports (several seconds on a loaded 2-core machine)."""
    from astrolom.cli import main

    with torch_threads(1):
        return main(["pretrain", *args])


def read_metrics(run: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


REFERENCE_OVERRIDES = [
    "model.preset=debug",
    "train.max_steps=5",
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "train.eval_interval=0",
    "train.checkpoint_interval=0",
    "optim.warmup_steps=2",
    *TINY,
]


def reference_run(tmp: str | Path) -> list[float]:
    """Per-step losses of the debug preset on `write_blobs` data, through the real Trainer."""
    from astrolom.config import apply_overrides
    from astrolom.train.config import PretrainConfig
    from astrolom.train.trainer import Trainer

    tmp = Path(tmp)
    data = write_blobs(tmp / "blobs")
    cfg = apply_overrides(PretrainConfig(), [f"data.path={data}", f"train.out_dir={tmp / 'run'}", *REFERENCE_OVERRIDES])
    with torch_threads(1):
        Trainer(cfg).fit()
    return [row["loss"] for row in read_metrics(tmp / "run")]


def _regenerate() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        losses = reference_run(tmp)
    REFERENCE.write_text(
        json.dumps(
            {
                "what": "per-step training loss, debug preset, tests/pretrain_helpers.py:reference_run",
                "regenerate": "python tests/pretrain_helpers.py --regenerate",
                "torch": torch.__version__,
                "overrides": REFERENCE_OVERRIDES,
                "losses": losses,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {REFERENCE}: {losses}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/pretrain_helpers.py --regenerate")
    _regenerate()
