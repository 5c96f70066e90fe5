"""Supervised spectrum baseline for the alignment property table: a small 1-D CNN on the normalised spectra."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from astrolom.train.engine import EarlyStopping


class SpectrumCNN(nn.Module):
    """Three strided 1-D conv layers (GELU), global average pooling and a linear head: (B, L) -> (B, n_out)."""

    def __init__(self, n_out: int, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(2, width, 9, stride=2, padding=4),
            nn.GELU(),
            nn.Conv1d(width, 2 * width, 9, stride=2, padding=4),
            nn.GELU(),
            nn.Conv1d(2 * width, 4 * width, 9, stride=2, padding=4),
            nn.GELU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def _prep(spectra: np.ndarray) -> torch.Tensor:
    """(N, L) flux with NaN bad pixels -> (N, 2, L): flux / median |flux| of good pixels, and the good-pixel mask."""
    good = np.isfinite(spectra)
    flux = np.where(good, spectra, 0.0)
    scale = np.array([np.median(np.abs(f[g])) if g.any() else 1.0 for f, g in zip(flux, good, strict=True)])
    x = np.stack([flux / np.maximum(scale, 1e-12)[:, None], good.astype(np.float64)], 1)
    return torch.from_numpy(x.astype(np.float32))


def train_spectrum_cnn(
    fit_spectra: np.ndarray,
    fit_targets: np.ndarray,
    test_spectra: np.ndarray,
    *,
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    holdout: float = 0.15,
    patience: int = 10,
) -> np.ndarray:
    """Fit a multi-output CNN (targets standardised, NaN labels ignored; best holdout epoch kept); test predictions."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_fit, x_test = _prep(fit_spectra), _prep(test_spectra)
    mu, sd = np.nanmean(fit_targets, 0), np.nanstd(fit_targets, 0) + 1e-9
    y = torch.from_numpy(((fit_targets - mu) / sd).astype(np.float32))
    perm = torch.randperm(len(x_fit), generator=gen)
    n_hold = max(1, int(holdout * len(x_fit)))
    hold, fit = perm[:n_hold], perm[n_hold:]
    model = SpectrumCNN(y.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        target = y[idx]
        ok = torch.isfinite(target)
        return ((model(x_fit[idx]) - torch.nan_to_num(target)) ** 2 * ok).sum() / ok.sum().clamp_min(1)

    early = EarlyStopping(patience)
    for _ in range(epochs):
        model.train()
        order = fit[torch.randperm(len(fit), generator=gen)]
        for i in range(0, len(order), batch_size):
            opt.zero_grad()
            loss_of(order[i : i + batch_size]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = float(loss_of(hold))
        early.update(val, model)
        if early.stop:
            break
    early.restore(model)
    with torch.no_grad():
        return model.eval()(x_test).numpy() * sd + mu
