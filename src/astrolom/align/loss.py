"""Symmetric InfoNCE (CLIP loss) on L2-normalised embeddings, with the global batch as negatives under DDP.

Kept in its own small module like open_clip's `loss.py`. Under torch.distributed every rank all-gathers the other
ranks' embeddings *with gradients* (`torch.distributed.nn.functional.all_gather`), so each rank's loss is the loss of
the whole global batch and the DDP-averaged gradient equals the single-process gradient on the same batch.
AstroCLIP keeps the logit scale fixed (15.5 worked better than learned); the learnable option here is a parameter
(stored as its log) that really multiplies the logits (in AstroCLIP's code the learnable scale never enters the loss).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

DEFAULT_LOGIT_SCALE = 15.5


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of every rank concatenated in rank order (B_global, C), offset of this rank's rows); no-op alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float, gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE between row-paired embeddings a (B, C) and b (B, C) (normalised here), gathered over ranks.

    Returns the mean of the a->b and b->a cross-entropies over the local rows; with equal local batch sizes the mean
    over ranks equals the single-process loss on the global batch.
    """
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    all_a, offset = gather_with_grad(a) if gather else (a, 0)
    all_b, _ = gather_with_grad(b) if gather else (b, 0)
    labels = torch.arange(a.shape[0], device=a.device) + offset
    logits_ab = logit_scale * a @ all_b.T  # (B, B_global): each local a against every b
    logits_ba = logit_scale * b @ all_a.T
    return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))


class ContrastiveLoss(nn.Module):
    """CLIP loss with a fixed logit scale (default 15.5) or a learnable one (initialised there, learned as a log)."""

    def __init__(self, logit_scale: float = DEFAULT_LOGIT_SCALE, learnable: bool = False):
        super().__init__()
        if logit_scale <= 0:
            raise ValueError(f"logit_scale must be positive, got {logit_scale}")
        log_scale = torch.tensor(math.log(logit_scale))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.learnable = learnable

    @property
    def scale(self) -> torch.Tensor:
        # clamp like CLIP (100) so a learned scale cannot blow the softmax up
        return self.log_scale.exp().clamp(max=100.0)

    def forward(self, a: torch.Tensor, b: torch.Tensor, gather: bool = True) -> torch.Tensor:
        return clip_loss(a, b, self.scale, gather)
