"""GPU training throughput and MFU: our AstroPT step beside the reference `astropt` GPT (`astropt==2.0.9`), same run.

    python benchmarks/gpu_mfu.py                        # presets 89m and 309m, 1024 tokens, bf16, SDPA flash, compile
    python benchmarks/gpu_mfu.py --presets 89m --batch 32 --steps 30
    python benchmarks/gpu_mfu.py --dry-run              # CPU smoke run: debug preset, 64 tokens, fp32, no compile

For each preset, two training steps on the same fixed batch of random standardised patches (B x 1024 tokens of
16x16x3 pixels; the data pipeline is measured by benchmarks/data_pipeline.py), each timed over `--steps` optimiser
steps after `--warmup` (compilation happens in the warm-up), with `torch.cuda.synchronize` around the timed loop:

- ours: `AstroPT` wrapped by `train.parallel.parallelize` (per-block `torch.compile`), bf16 autocast
  (`train.parallel.autocast`), TF32 for what stays fp32, fused AdamW from the trainer's `build_optimizer`, gradient
  clipping at 1.0, grads set to None; attention forced onto the flash kernel (`sdpa_kernel(FLASH_ATTENTION)`, which
  raises where flash cannot run, so the number is flash's);
- reference: `astropt.model.GPT` of the same width, depth and heads, `torch.compile`d as its train script does, its
  `configure_optimizers` (fused AdamW on CUDA), the same bf16 autocast and flash context, the loop of its train
  script (forward, backward, clip 1.0, step, zero_grad).

MFU = tokens/s x training FLOPs per token (`model.flops.flops_per_token`: 6 N + 12 L C T, the same formula for
both, with N the non-embedding parameters of our model) / the GPU's dense bf16 peak (`model.flops.PEAK_FLOPS`).
Also printed: peak GPU memory per step. Goal (issue 7): >= 50% MFU for 89m on an H100/H200-class GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

from astrolom.model.astropt import AstroPT
from astrolom.model.flops import flops_per_token, peak_flops
from astrolom.model.presets import count_params, get_preset, model_config
from astrolom.train import parallel
from astrolom.train.config import PretrainConfig
from astrolom.train.trainer import build_optimizer

DEFAULT_BATCH = {"debug": 2, "89m": 32, "309m": 16, "1m": 64, "5m": 64, "12m": 64, "21m": 64}


def _attention_context(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step, batch: tuple, warmup: int, steps: int, device: torch.device) -> tuple[float, float | None]:
    """(seconds per step, peak memory in GiB or None on CPU)."""
    for _ in range(warmup):
        step(*batch)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*batch)
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dt, mem


def _ours(preset: str, T: int, D: int, patch: int, device: torch.device, precision: str, compile: bool):
    cfg = model_config(preset, block_size=T, patch_size=patch, n_chan=D // (patch * patch))
    torch.manual_seed(0)
    model = AstroPT(cfg)
    env = parallel.DistEnv(device=device)
    parallel.configure_backends(device)
    model, _ = parallel.parallelize(model, env, strategy="none", precision=precision, compile=compile)
    opt = build_optimizer(model, PretrainConfig(), device, fsdp=False)

    def step(x, y):
        with parallel.autocast(precision, device):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def _reference(preset: str, T: int, D: int, patch: int, device: torch.device, precision: str, compile: bool):
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        from astropt import model as ref

        p = get_preset(preset)
        mods = [ref.ModalityConfig("images", input_size=D, pos_input_size=1, patch_size=patch, embed_pos=True)]
        gcfg = ref.GPTConfig(block_size=T, n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd, n_chan=D // patch**2)
        gcfg.modalities = mods
        torch.manual_seed(0)
        gpt = ref.GPT(gcfg, ref.ModalityRegistry(mods), master_process=False).to(device)
        opt = gpt.configure_optimizers(
            weight_decay=0.1, learning_rate=p.learning_rate, betas=(0.9, 0.95), device_type=device.type
        )
    run = torch.compile(gpt) if compile else gpt
    positions = torch.arange(T - 1, device=device)

    def step(x, y):
        inputs = {"images": x, "images_positions": positions.expand(x.shape[0], -1)}
        with parallel.autocast(precision, device):
            _, loss = run(inputs, targets={"images": y})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return gpt, step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="89m,309m")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per sequence (the model context)")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default per preset)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU smoke run: debug preset, 64 tokens, fp32, no compile")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.presets, args.tokens, args.device, args.precision = "debug", 64, "cpu", "fp32"
        args.steps, args.warmup, args.no_compile = 2, 1, True
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run (CPU smoke run)")
    D = args.patch * args.patch * 3
    T = args.tokens + 1  # the step predicts `tokens` next patches from `tokens` inputs
    peak = peak_flops(device) if device.type == "cuda" else None
    rows = []
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        B = args.batch or DEFAULT_BATCH.get(preset, 8)
        g = torch.Generator().manual_seed(0)
        seq = torch.randn(B, T, D, generator=g).to(device)
        x, y = seq[:, :-1], seq[:, 1:]
        cfg = model_config(preset, block_size=T, patch_size=args.patch, n_chan=3)
        n_params = count_params(cfg)  # the same architecture on both sides: one FLOP count
        fpt = flops_per_token(cfg, n_params, args.tokens)
        impls = [("ours", _ours)] + ([] if args.no_reference else [("reference astropt 2.0.9", _reference)])
        for name, build in impls:
            model, step = build(preset, T, D, args.patch, device, args.precision, not args.no_compile)
            with _attention_context(device):
                dt, mem = _time(step, (x, y), args.warmup, args.steps, device)
            tok_s = B * args.tokens / dt
            rows.append(
                {
                    "preset": preset,
                    "impl": name,
                    "params": n_params,
                    "batch": B,
                    "tokens": args.tokens,
                    "step_s": dt,
                    "tokens_per_s": tok_s,
                    "mfu": None if peak is None else tok_s * fpt / peak,
                    "peak_mem_gib": mem,
                }
            )
            del model, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "peak_bf16_flops": peak,
        "torch": torch.__version__,
        "precision": args.precision,
        "compile": not args.no_compile,
        "attention": "SDPA flash (forced)" if device.type == "cuda" else "SDPA (CPU)",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
    }
    print(json.dumps(info))
    print("\n| preset | implementation | params | batch x tokens | step (ms) | tokens/s | MFU | peak mem (GiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        print(
            f"| {r['preset']} | {r['impl']} | {r['params'] / 1e6:.1f}M | {r['batch']} x {r['tokens']} | "
            f"{1e3 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {mem} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
