"""A pretrained AstroPT backbone with a task head, and the three ways to adapt it.

Features are the embedding path's (`astrolom.eval.embed`): the outputs of block `layer` (default the penultimate)
averaged over the first `n_tokens` spiral tokens (the centre of the stamp). The head is LayerNorm -> dropout ->
Linear on that pooled vector (the LayerNorm puts backbones of any depth and width on one scale).

Optional flux side channel (`n_flux > 0`): per-patch standardisation removes every patch's absolute level, so the
backbone cannot know how bright a galaxy is or how its light is spread, which is what a CNN on stretched pixels
reads first. With it the head also sees asinh fluxes per band in the nested central squares of patches the tokens
cover (`flux_features`), standardised with training-set statistics kept as buffers of the head.

Modes:
- `head`: the backbone is frozen; only the head trains (a linear probe trained by gradient descent, with the task's
  own loss).
- `lora`: low-rank adapters (peft `LoraConfig`) on the attention and MLP linear layers of every block (`qkv`,
  `attn.proj`, `mlp.fc`, `mlp.proj`); the backbone's own weights stay frozen; adapters and head train.
- `full`: everything trains; the backbone gets its own (lower) learning rate so pretraining is not washed out.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn

from astrolom.data import tokens as tok
from astrolom.data.sky import sky_sigma
from astrolom.eval.embed import DEFAULT_LAYER, DEFAULT_TOKENS
from astrolom.model.astropt import AstroPT

MODES = ("lora", "full", "head")
# AstroPT's linear layers inside each transformer block, by module-name suffix (peft matches suffixes)
LORA_TARGETS = ("qkv", "attn.proj", "mlp.fc", "mlp.proj")


def backbone_tokens(images: torch.Tensor | np.ndarray, config) -> torch.Tensor:
    """(B, H, W, C) images -> the (B, T, D) spiral tokens the backbone reads: per-patch standardised, followed by the
    per-band flux features when it was pretrained with flux-aware tokens (`ModelConfig.flux_features`); an imported
    paper model reads the paper's tokens (`ModelConfig.tokens_preset`)."""
    if config.tokens_preset == tok.PAPER2024:
        return tok.tokenize_paper2024(images, config.patch_size)
    batch = tok.tokenize(torch.as_tensor(images, dtype=torch.float32), config.patch_size)
    if not config.flux_features:
        return batch.tokens
    feats = tok.flux_features(batch.tokens, batch.mean, batch.std, config.n_chan, config.flux_softening)
    return torch.cat([batch.tokens, feats], dim=-1)


def flux_features(images: torch.Tensor, patch_size: int, n_tokens: int, sigma: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) images -> (B, rings * C) asinh(mean flux / sigma_band) in the nested central squares of patches
    (1x1 or 2x2, then 3x3 or 4x4, ...) that the first `n_tokens` spiral tokens cover: square-aperture photometry."""
    b, h, w, c = images.shape
    nh, nw = tok.grid_shape(h, w, patch_size)
    order = tok.spiral_order(nh, nw)[: min(n_tokens, nh * nw)]
    patches = tok.patchify(images.float(), patch_size)[:, order]  # (B, n, P*P*C), (p1 p2 c) order
    per_band = patches.reshape(b, len(order), -1, c).mean(2)  # (B, n, C)
    first = 1 if (nh % 2 and nw % 2) else 4
    side = int(round(math.sqrt(first)))
    ends = []
    while side * side <= len(order):
        ends.append(side * side)
        side += 2
    if not ends or ends[-1] != len(order):
        ends.append(len(order))
    csum = per_band.cumsum(1)
    rings = torch.stack([csum[:, e - 1] / e for e in ends], dim=1)  # (B, rings, C) mean flux inside each square
    return torch.asinh(rings / sigma.to(rings)).reshape(b, -1)


class Head(nn.Module):
    """LayerNorm(features) [+ standardised flux features] -> dropout -> Linear."""

    def __init__(self, n_embd: int, n_outputs: int, n_flux: int = 0, dropout: float = 0.1, n_chan: int = 3):
        super().__init__()
        self.norm = nn.LayerNorm(n_embd)
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(n_embd + n_flux, n_outputs)
        self.n_flux = n_flux
        # flux standardisation and the per-band sky sigma (set from the training set; saved with the head)
        self.register_buffer("flux_mean", torch.zeros(n_flux))
        self.register_buffer("flux_std", torch.ones(n_flux))
        self.register_buffer("sigma", torch.ones(n_chan if n_flux else 0))

    def forward(self, feats: torch.Tensor, flux: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(feats)
        if self.n_flux:
            x = torch.cat([x, (flux - self.flux_mean) / self.flux_std], dim=1)
        return self.linear(self.drop(x))


class FinetuneModel(nn.Module):
    """backbone (B, T, D) tokens -> pooled features (B, C) -> head (B, n_outputs)."""

    def __init__(
        self,
        backbone: AstroPT,
        n_outputs: int,
        *,
        layer: int = DEFAULT_LAYER,
        n_tokens: int = DEFAULT_TOKENS,
        dropout: float = 0.1,
        n_flux: int = 0,
    ):
        super().__init__()
        self.backbone = backbone
        self.layer = layer
        self.n_tokens = n_tokens
        self.head = Head(backbone.config.n_embd, n_outputs, n_flux, dropout, backbone.config.n_chan)
        self.mode = "full"

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) spiral tokens -> (B, C) mean of block `layer`'s outputs over the first `n_tokens` tokens."""
        n = min(self.n_tokens, self.backbone.config.block_size, tokens.shape[1])
        return self.backbone.forward_features(tokens[:, :n], layer=self.layer).float().mean(dim=1)

    def forward(self, tokens: torch.Tensor, flux: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(tokens), flux)

    def inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, H, W, C) centre-cropped images -> (spiral tokens, flux features or None)."""
        tokens = backbone_tokens(images, self.backbone.config)
        p = self.backbone.config.patch_size
        flux = flux_features(images, p, self.n_tokens, self.head.sigma) if self.head.n_flux else None
        return tokens, flux

    def forward_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) centre-cropped images -> head outputs (B, n_outputs)."""
        device = next(self.parameters()).device
        tokens, flux = self.inputs(images)
        return self(tokens.to(device), None if flux is None else flux.to(device))

    @torch.no_grad()
    def set_flux_statistics(self, images: np.ndarray) -> None:
        """Sky sigma per band and the flux features' mean/std, from training images (N, H, W, C)."""
        if not self.head.n_flux:
            return
        self.head.sigma.copy_(torch.as_tensor(sky_sigma(images), dtype=torch.float32))
        p = self.backbone.config.patch_size
        chunks = [torch.from_numpy(images[i : i + 512]) for i in range(0, len(images), 512)]
        feats = torch.cat([flux_features(x, p, self.n_tokens, self.head.sigma) for x in chunks])
        self.head.flux_mean.copy_(feats.mean(0))
        self.head.flux_std.copy_(feats.std(0).clamp_min(1e-3) if len(feats) > 1 else torch.ones_like(feats[0]))

    def configure(self, mode: str, *, lora_r: int = 8, lora_alpha: float | None = None, lora_dropout: float = 0.0):
        """Freeze / wrap the backbone for `mode` (see the module docstring). Call once, before building optimisers."""
        if mode not in MODES:
            raise ValueError(f"fine-tuning mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if mode == "lora":
            import peft  # 10 s of imports (transformers): only when adapters are asked for

            if lora_r < 1:
                raise ValueError(f"LoRA rank must be a positive integer, got {lora_r}")
            cfg = peft.LoraConfig(
                r=lora_r,
                lora_alpha=2 * lora_r if lora_alpha is None else lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=list(LORA_TARGETS),
            )
            # injects LoRA layers in place and freezes every non-adapter backbone weight
            self.backbone = peft.inject_adapter_in_model(cfg, self.backbone)
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(mode == "full" or (mode == "lora" and "lora_" in name))
        for p in self.head.parameters():
            p.requires_grad_(True)
        return self

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: head and adapters at `lr`; the backbone's own weights (full mode) at `backbone_lr`.

        Biases, LayerNorm gains and embeddings get no weight decay.
        """
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            base = backbone_lr if name.startswith("backbone.") and "lora_" not in name else lr
            wd = weight_decay if p.ndim >= 2 and "pos_emb" not in name else 0.0
            groups.setdefault((base, wd), []).append(p)
        return [{"params": ps, "lr": base, "weight_decay": wd} for (base, wd), ps in groups.items()]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of the parameters that train in this mode (what early stopping keeps)."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def merged_backbone(self) -> AstroPT:
        """A plain AstroPT with the adapters folded into its weights (a copy; this model is unchanged)."""
        backbone = copy.deepcopy(self.backbone)
        if self.mode == "lora":
            import peft

            for module in backbone.modules():
                if isinstance(module, peft.tuners.lora.LoraLayer):
                    module.merge()
            # replace each wrapped layer by its (now merged) base layer
            for name, module in list(backbone.named_modules()):
                if isinstance(module, peft.tuners.lora.LoraLayer):
                    parent_name, _, child = name.rpartition(".")
                    setattr(backbone.get_submodule(parent_name), child, module.get_base_layer())
        for p in backbone.parameters():
            p.requires_grad_(False)
        return backbone.eval()
