"""Alignment heads: per modality a cross-attention pooling head and an MLP into a shared embedding space.

A learned query attends over a frozen encoder's per-token features (padding and missing tokens masked out), and an
MLP maps the pooled vector into the shared space (default 512-d). `AlignModel` holds one head per modality plus the
contrastive loss (`loss.ContrastiveLoss`); the backbones stay outside it (frozen by default, features cached by
`features.py`), so the same head trains on cached features or on a fine-tuned backbone's live output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from astrolom.align.loss import DEFAULT_LOGIT_SCALE, ContrastiveLoss
from astrolom.data.modalities import ALL, IMAGES, SPECTRA


@dataclass
class AlignConfig:
    """Heads and loss of an aligned model (saved as `align` in its config.json)."""

    image_dim: int = 64  # width of the image encoder's token features
    spectrum_dim: int = 64  # width of the spectrum encoder's token features
    embed_dim: int = 512  # shared space
    head_dim: int = 256  # width of the attention pooling and the MLP's hidden layer
    n_heads: int = 4  # attention heads of the pooling
    dropout: float = 0.0
    logit_scale: float = DEFAULT_LOGIT_SCALE
    learnable_scale: bool = False

    def __post_init__(self):
        for name in ("image_dim", "spectrum_dim", "embed_dim", "head_dim", "n_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"align.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim % self.n_heads:
            raise ValueError(f"align.head_dim ({self.head_dim}) must be divisible by align.n_heads ({self.n_heads})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class AttentionPool(nn.Module):
    """One learned query attending over token features (B, T, C_in) -> (B, head_dim)."""

    def __init__(self, in_dim: int, dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (B, T) True = real token; rows without any real token are an error (no spectrum, no pair)."""
        kv = self.norm(self.proj(tokens))  # (B, T, D)
        pad = None
        if mask is not None:
            if not bool(mask.any(dim=1).all()):
                raise ValueError("AttentionPool: a row has no real token to attend to")
            pad = ~mask.to(torch.bool)
        q = self.query.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        out, _ = self.attn(q, kv, kv, key_padding_mask=pad, need_weights=False)
        return out[:, 0]  # (B, D)


class Head(nn.Module):
    """AttentionPool + MLP (LayerNorm, Linear, GELU, Linear) into the shared space."""

    def __init__(self, in_dim: int, cfg: AlignConfig):
        super().__init__()
        self.pool = AttentionPool(in_dim, cfg.head_dim, cfg.n_heads, cfg.dropout)
        self.mlp = nn.Sequential(
            nn.LayerNorm(cfg.head_dim),
            nn.Linear(cfg.head_dim, cfg.head_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.head_dim, cfg.embed_dim),
        )

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(self.pool(tokens, mask))  # (B, embed_dim), not normalised


class AlignModel(nn.Module):
    """Image head, spectrum head and the contrastive loss; `forward` returns the loss of a paired batch."""

    def __init__(self, cfg: AlignConfig):
        super().__init__()
        self.config = cfg
        self.image_head = Head(cfg.image_dim, cfg)
        self.spectrum_head = Head(cfg.spectrum_dim, cfg)
        self.loss = ContrastiveLoss(cfg.logit_scale, cfg.learnable_scale)

    def encode(self, modality: str, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Shared-space embeddings (B, embed_dim), L2-normalised, of one modality's token features."""
        head = {IMAGES: self.image_head, SPECTRA: self.spectrum_head}.get(modality)
        if head is None:
            raise ValueError(f"unknown modality {modality!r}; choose from {ALL}")
        return nn.functional.normalize(head(tokens, mask), dim=-1)

    def forward(
        self, image_tokens: torch.Tensor, spectrum_tokens: torch.Tensor, spectrum_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """InfoNCE of paired (image (B, Ti, Ci), spectrum (B, Ts, Cs)) token features."""
        return self.loss(self.image_head(image_tokens), self.spectrum_head(spectrum_tokens, spectrum_mask))
