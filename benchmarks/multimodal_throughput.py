"""Multimodal (images + spectra) training-step throughput: our AstroPT beside the reference's multimodal GPT.

    python benchmarks/multimodal_throughput.py [--layers 4 --width 128 --batch 16 --steps 10 --repeats 3]

The same batch for both: 64x64 g,r,z stamps in 16x16 patches (16 image tokens of 768 values) and 3101-pixel spectra
in 32-pixel tokens (97 tokens). One step = forward, backward, clip 1.0, AdamW step, zero_grad. Rows:

- reference: `astropt.model.GPT` with images (learned positions) + spectra (wavelength MLP, embed_pos=False), its
  alphabetical layout, every object having both modalities (it cannot train otherwise);
- ours, reference layout: `modality_tokens=False`, fixed order, spectra without the amplitude value (the same work);
- ours, BOM tokens + random order per sample (the default multimodal model; two more tokens);
- ours, BOM + random order with 30% of spectra missing (masked attention: SDPA with an explicit mask).

Tokens are the tokens in the sequence (B x 113 or 115). Medians over interleaved repeats; CPU fp32. Per
CPU-second rates (user + system time of the process) are robust to other jobs on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from astrolom.model.astropt import AstroPT, ModelConfig

TI, TS, D, W = 16, 97, 768, 32


def _batch(b: int, seed: int = 0, missing: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos = (3600 + 64.0 * (torch.arange(TS) + 0.5) - 3000) / 7000
    present = torch.rand(b, generator=g) >= missing
    return {
        "images": torch.randn(b, TI, D, generator=g),
        "spectra": torch.randn(b, TS, W + 1, generator=g),
        "spectra_positions": pos.expand(b, TS).contiguous(),
        "spectra_present": present,
    }


def _ours(cfg: ModelConfig, batch: dict) -> callable:
    torch.manual_seed(0)
    model = AstroPT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = dict(batch)
    if not cfg.spectrum_amplitude:
        x["spectra"] = x["spectra"][..., :W].contiguous()

    def step():
        _, loss = model(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _reference(layers: int, width: int, heads: int, batch: dict) -> callable:
    from astropt.model import GPT, GPTConfig, ModalityConfig, ModalityRegistry

    mods = [
        ModalityConfig(name="images", input_size=D, pos_input_size=1, patch_size=16, embed_pos=True),
        ModalityConfig(name="spectra", input_size=W, pos_input_size=1, patch_size=W, embed_pos=False),
    ]
    cfg = GPTConfig(n_layer=layers, n_head=heads, n_embd=width, block_size=TI + TS, n_chan=3, modalities=mods)
    torch.manual_seed(0)
    model = GPT(cfg, ModalityRegistry(mods), master_process=False).train()
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")
    b = batch["images"].shape[0]
    x = {
        "images": batch["images"],
        "images_positions": torch.arange(TI).expand(b, TI),
        "spectra": batch["spectra"][..., :W].contiguous(),
        "spectra_positions": batch["spectra_positions"][..., None],
    }
    y = {"images": x["images"][:, 1:], "spectra": x["spectra"]}

    def step():
        _, loss = model(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _time(step, n: int) -> tuple[float, float]:
    step()  # warm-up
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    return (time.perf_counter() - w0) / n, (time.process_time() - c0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    base = dict(n_layer=a.layers, n_head=a.heads, n_embd=a.width, block_size=TI + TS + 2, patch_size=16)
    mm = dict(modalities=("images", "spectra"), spectrum_patch=W)
    full, gappy = _batch(a.batch), _batch(a.batch, missing=0.3)
    rows = {
        "reference astropt 2.0.9 (images, spectra)": (_reference(a.layers, a.width, a.heads, full), TI + TS),
        "ours, reference layout": (
            _ours(ModelConfig(**base, **mm, modality_tokens=False, spectrum_amplitude=False), full),
            TI + TS,
        ),
        "ours, BOM + random order": (_ours(ModelConfig(**base, **mm, modality_order="random"), full), TI + TS + 2),
        "ours, BOM + random order, 30% spectra missing": (
            _ours(ModelConfig(**base, **mm, modality_order="random"), gappy),
            TI + TS + 2,
        ),
    }
    wall = {k: [] for k in rows}
    cpu = {k: [] for k in rows}
    for _ in range(a.repeats):
        for name, (step, _) in rows.items():
            w, c = _time(step, a.steps)
            wall[name].append(w)
            cpu[name].append(c)
    print(f"\n{a.layers} layers, width {a.width}, batch {a.batch}, CPU fp32, {torch.get_num_threads()} threads\n")
    print("| model | step (ms) | tokens/s | tokens per CPU-s |")
    print("|---|---|---|---|")
    for name, (_, t) in rows.items():
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"| {name} | {1000 * w:.1f} | {a.batch * t / w:,.0f} | {a.batch * t / c:,.0f} |")


if __name__ == "__main__":
    main()
