"""Where a CPU pretraining step goes: the demo's model (`1m`, flux-aware tokens, batch 32 x 64 tokens of 8x8x3 px).

Prints one markdown table: forward + backward of the whole model in fp32 and under bf16 autocast, the share of the
top operators in a `torch.profiler` trace, and the two kernels that are candidates for a faster step (the tanh GELU
against the exact one, SDPA backends). Random tokens: data loading is not on the critical path (BENCHMARKS.md).

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/cpu_step.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from astrolom.model.astropt import AstroPT
from astrolom.model.presets import model_config


def ms_per_call(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def fwd_bwd(fn, *shapes):
    """A callable running fn on fresh leaf tensors of `shapes` and back-propagating a random gradient."""
    xs = [torch.randn(s, requires_grad=True) for s in shapes]
    out_grad = torch.randn_like(fn(*xs))

    def run():
        fn(*xs).backward(out_grad)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    cfg = model_config("1m", patch_size=8, n_chan=3, block_size=64, flux_features=True)
    model = AstroPT(cfg)
    x = torch.randn(args.batch, 64, cfg.input_dim + 2 * cfg.n_chan)

    def step(precision: str):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()

        return run

    rows = [
        (f"model forward + backward, {p}", f"{ms_per_call(step(p), args.repeats):.1f} ms") for p in ("fp32", "bf16")
    ]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(max(5, args.repeats // 2)):
            step("fp32")()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = {
        "aten::mm": ("aten::mm",),  # substring match: aten::mm only (addmm is not used: bias=False)
        "GELU forward + backward": ("aten::gelu", "aten::gelu_backward"),
        "SDPA forward + backward": ("_scaled_dot_product_flash_attention_for_cpu",),
        "LayerNorm forward + backward": ("aten::native_layer_norm",),
    }
    for label, keys in groups.items():
        share = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys)) / total
        rows.append((f"profile: {label}", f"{share:.0%} of self CPU time"))
    h = (args.batch, 63, 4 * cfg.n_embd)
    for name, fn in (
        ("GELU tanh approximation (the model's; the reference's formula)", lambda t: F.gelu(t, approximate="tanh")),
        ("GELU exact (erf)", F.gelu),
        (
            "GELU tanh formula written out",
            lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3))),
        ),
    ):
        rows.append((f"{name}, {h}, forward + backward", f"{ms_per_call(fwd_bwd(fn, h), args.repeats):.2f} ms"))
    q = (args.batch, cfg.n_head, 63, cfg.n_embd // cfg.n_head)

    def sdpa(backend):
        def fn(a, b, c):
            if backend is None:
                return F.scaled_dot_product_attention(a, b, c, is_causal=True)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(a, b, c, is_causal=True)

        return fn

    for name, backend in (("default", None), ("math", SDPBackend.MATH)):
        run = fwd_bwd(sdpa(backend), q, q, q)
        rows.append(
            (f"SDPA causal {q}, {name} backend, forward + backward", f"{ms_per_call(run, args.repeats):.2f} ms")
        )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| what | measured |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
