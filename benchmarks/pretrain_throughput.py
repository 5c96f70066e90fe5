"""Pretraining throughput: our training step beside the reference AstroPT (`astropt==2.0.9`), same machine, same run.

    python benchmarks/pretrain_throughput.py --data SURVEY_DIR [--preset 1m --batch 32 --steps 30 --repeats 3]

Four measurements per repeat, interleaved so that background load hits all of them alike; the table gives medians.

- model step, ours: `Trainer.train_step` (fused AdamW, one host sync per step, grads set to None) on a fixed batch;
- model step, reference: the reference `GPT` + its `configure_optimizers` + the loop of its `train.py` (forward,
  backward, clip 1.0, step, zero_grad) on the same batch;
- end to end, ours: `Trainer.train_step` reading the mock survey through our stream (Parquet -> records ->
  vectorised spiral tokens);
- end to end, reference: its `GalaxyImageDataset` (spiral=True, stochastic sampling, per-patch standardisation as
  its train.py does) in a `DataLoader` with num_workers=0 (the same cores as ours), reading the same images written
  the way that code reads multi-band float data (one FITS file per band); and, to separate file I/O from the
  per-sample Python, the same per-sample processing on in-memory arrays.

Tokens are predicted tokens, B x (T - 1) per step, for both. CPU fp32; `--threads` sets torch threads for both.
Two rates: per wall-clock second (what a user waits for; includes our prefetch thread's overlap) and per CPU-second
of the process (user + system time of all its threads: the work done, robust to other jobs on a shared machine).
`--data` must be an astrolom mock survey (`astrolom survey --n 2000 --size 64 --out DIR`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _reference_modules():
    # astropt.local_datasets imports torchvision (only for JPEG reading); the FITS path does not need it
    if "torchvision" not in sys.modules:
        stub = types.ModuleType("torchvision")
        stub.io = types.ModuleType("torchvision.io")
        sys.modules["torchvision"] = stub
        sys.modules["torchvision.io"] = stub.io
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        from astropt import local_datasets
        from astropt import model as ref_model
    return ref_model, local_datasets


def _ref_normalise(x: torch.Tensor) -> torch.Tensor:
    """Per-patch standardisation as the reference train.py applies it (transform on (T, P*P*C) patches)."""
    std, mean = torch.std_mean(x, dim=1, keepdim=True)
    return (x - mean) / (std + 1e-8)


class _Timer:
    def __init__(self, step, warmup: int, steps: int, tokens_per_step: int):
        self.step, self.warmup, self.steps, self.tokens = step, warmup, steps, tokens_per_step

    def run(self) -> tuple[float, float]:
        """(tokens per wall-clock second, tokens per CPU-second of this process: user + system, all threads)."""
        for _ in range(self.warmup):
            self.step()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(self.steps):
            self.step()
        n = self.tokens * self.steps
        return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def _ours(args, data: Path, out: Path, fixed: torch.Tensor | None, prefetch: int = 2):
    from astrolom.config import apply_overrides
    from astrolom.train.config import PretrainConfig
    from astrolom.train.trainer import Trainer

    cfg = apply_overrides(
        PretrainConfig(),
        [
            f"data.path={data}",
            f"train.out_dir={out}",
            f"model.preset={args.preset}",
            f"train.batch_size={args.batch}",
            f"data.image_size={args.size}",
            "train.max_steps=1000000",
            "train.eval_interval=0",
            "train.checkpoint_interval=0",
            "train.tensorboard=false",
            "train.progress=false",
            f"data.prefetch={prefetch}",
        ],
    )
    trainer = Trainer(cfg)
    if fixed is not None:
        trainer.data.next_train = lambda: fixed
    return trainer


def _ref_model(args, ref_model, T: int, D: int):
    from astrolom.model.presets import get_preset

    p = get_preset(args.preset)
    cfg = ref_model.GPTConfig(block_size=T, n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd, n_chan=3)
    reg = ref_model.ModalityRegistry(
        [ref_model.ModalityConfig("images", input_size=D, pos_input_size=1, patch_size=args.patch, embed_pos=True)]
    )
    model = ref_model.GPT(cfg, reg, master_process=False)
    opt = model.configure_optimizers(
        weight_decay=0.1, learning_rate=p.learning_rate, betas=(0.9, 0.95), device_type="cpu"
    )
    return model, opt, reg


def _ref_step(model, opt, get_batch):
    """One optimiser step of the reference train.py loop (gradient_accumulation_steps=1, CPU, no scaler)."""
    B = get_batch()
    _, loss = model(B["X"], targets=B["Y"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _write_fits(records, root: Path) -> Path:
    """One FITS file per band per galaxy and the paths CSV (one row per galaxy), as the reference reads them."""
    from astropy.io import fits

    rows = []
    for r in records:
        files = []
        for c in range(r.image.shape[2]):
            f = root / f"{r.object_id}_{c}.fits"
            fits.PrimaryHDU(np.ascontiguousarray(r.image[:, :, c])).writeto(f, overwrite=True)
            files.append(str(f))
        rows.append(",".join(files))
    paths = root / "images.csv"
    paths.write_text("\n".join(rows) + "\n")
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="astrolom mock survey directory")
    ap.add_argument("--preset", default="1m")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64, help="stamp size (centre crop)")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from astrolom.data.sources import open_source
    from astrolom.data.stream import RecordStream, TokenBatches

    ref_model, local_datasets = _reference_modules()
    source = open_source(args.data)
    n_files = max(256, args.batch * 4)
    records = []
    for r in RecordStream(source, split="train", shuffle=False, epochs=1):
        records.append(r)
        if len(records) == n_files:
            break
    if records[0].image.shape[0] != args.size:
        raise SystemExit("use --size equal to the survey stamp size (the reference dataset does not crop)")
    stream = RecordStream(source, split="train", shuffle=False, epochs=1)
    fixed = next(iter(TokenBatches(stream, args.batch, patch_size=args.patch, image_size=args.size)))["tokens"]
    B, T, D = fixed.shape
    tokens_per_step = B * (T - 1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "fits").mkdir()
        paths = _write_fits(records, tmp / "fits")
        in_memory = [torch.from_numpy(np.ascontiguousarray(r.image.transpose(2, 0, 1))) for r in records]  # (C, H, W)

        model, opt, reg = _ref_model(args, ref_model, T, D)
        pos = torch.arange(T).expand(B, T)
        fixed_ref = {"X": {"images": fixed[:, :-1], "images_positions": pos[:, :-1]}, "Y": {"images": fixed[:, 1:]}}

        ds = local_datasets.GalaxyImageDataset(
            paths={"images": str(paths)},
            transform={"images": _ref_normalise},
            stochastic=True,
            spiral=True,
            modality_registry=reg,
        )
        loader = iter(torch.utils.data.DataLoader(ds, batch_size=B, num_workers=0))

        def ref_fits_batch():
            b = next(loader)
            b["images"] = b["images"].float()  # its FITS path yields bf16; our CPU comparison is fp32
            return local_datasets.GalaxyImageDataset.process_modes(b, reg, "cpu")

        rng = np.random.default_rng(0)

        def ref_memory_batch():
            items = []
            for i in rng.integers(len(in_memory), size=B):
                raw = in_memory[i].to(torch.bfloat16)
                items.append(ds.process_galaxy(raw))
            x = torch.stack(items).float()
            b = {"images": x, "images_positions": torch.arange(T).expand(B, T)}
            return local_datasets.GalaxyImageDataset.process_modes(b, reg, "cpu")

        ours_fixed = _ours(args, Path(args.data), tmp / "run_fixed", fixed)
        ours_stream = _ours(args, Path(args.data), tmp / "run_stream", None)
        ours_serial = _ours(args, Path(args.data), tmp / "run_serial", None, prefetch=0)
        assert ours_fixed.data.tokens_per_stamp == T

        runs = {
            "model step: ours": lambda: ours_fixed.train_step(),
            "model step: reference": lambda: _ref_step(model, opt, lambda: fixed_ref),
            "end to end: ours (Parquet stream, prefetch thread)": lambda: ours_stream.train_step(),
            "end to end: ours (Parquet stream, data.prefetch=0)": lambda: ours_serial.train_step(),
            "end to end: reference (GalaxyImageDataset, FITS)": lambda: _ref_step(model, opt, ref_fits_batch),
            "end to end: reference (its processing, in-memory)": lambda: _ref_step(model, opt, ref_memory_batch),
        }
        results = {k: [] for k in runs}
        for _ in range(args.repeats):
            for name, step in runs.items():
                results[name].append(_Timer(step, args.warmup, args.steps, tokens_per_step).run())

    wall = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in results.items()}
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {_cpu_model()}",
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "threads": args.threads,
        "preset": args.preset,
        "batch": B,
        "tokens_per_stamp": T,
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
    }
    print(json.dumps(info))
    print(f"\n| measurement (median of {args.repeats}) | tokens/s wall | vs ref. | tokens/CPU-s | vs ref. |")
    print("|---|---:|---:|---:|---:|")
    for name in results:
        peer = (
            "model step: reference" if name.startswith("model") else "end to end: reference (GalaxyImageDataset, FITS)"
        )
        print(
            f"| {name} | {wall[name]:,.0f} | {wall[name] / wall[peer]:.2f}x | {cpu[name]:,.0f} | "
            f"{cpu[name] / cpu[peer]:.2f}x |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results, "wall": wall, "cpu": cpu}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
