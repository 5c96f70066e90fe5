"""Training FLOPs and model FLOPs utilisation (MFU).

FLOPs per token of a training step (forward + backward) follow PaLM (Chowdhery et al. 2022, appendix B):
6 N for the weight matmuls (N = parameters touched by every token, i.e. without position embeddings) plus
12 L T C for attention scores and values at context T. `seq_len` is the context the step actually trains on.
"""

from __future__ import annotations

import torch

from astrolom.model.astropt import ModelConfig

# dense bf16 peak (no sparsity), FLOP/s
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def flops_per_token(config: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs (fwd + bwd) per token."""
    return 6.0 * n_params + 12.0 * config.n_layer * config.n_embd * seq_len


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """bf16 dense peak of the current CUDA device, or None where unknown (CPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def mfu(flops_per_second: float, device: torch.device | str | None = None) -> float | None:
    peak = peak_flops(device)
    return None if peak is None else flops_per_second / peak
