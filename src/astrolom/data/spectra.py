"""Spectra: the record type, flux-conserving resampling onto a model grid, and spectrum tokens (and back).

A `Spectrum` is one object's observed-frame 1-D spectrum: wavelength grid (strictly increasing), flux density,
inverse variance and a bad-pixel mask, with units in `meta`. A pixel is *good* when it is not masked, its ivar is
positive and its flux is finite; everything else is carried along but never enters a loss.

Tokens (`tokenize_spectra`), chosen for a causal next-token model:

- **Patches of W pixels along wavelength** with stride S (default S = W, no overlap). The reference AstroPT uses
  W = 256 without overlap, SpecFormer (a *masked* model) W = 20 with stride 10. Overlap suits masked models but not
  an autoregressive one: with S < W the next token repeats W - S values the model has just seen, so half of the
  target can be copied from the input. The default W = 32 at the mock survey's 2 Å pixels is 64 Å per token:
  an emission line (σ ≈ 1–5 Å observed) sits in one or two tokens, and the 3101-pixel DESI-like grid becomes 97
  tokens, which leaves room for 16–64 image tokens in a 256-token block.
- **Per-spectrum normalisation that keeps amplitude.** Each spectrum is divided by one scale s = median |flux| over
  its good pixels (robust to emission lines and sky residuals; one scale per spectrum, not per patch, so the
  continuum shape between patches survives). log10 s is *appended to every token as one extra value*
  (`amplitude=True`), so the tokeniser sees it and the decoder must predict it: the first spectrum token predicted
  from an image carries the predicted flux level, and `detokenize_spectra` maps predictions back to flux units.
  (An extra token would need its own position and decoder; a feature on each token needs neither.)
- **Positions from wavelength, in float32**: the mean observed wavelength of the token's real (non-padding) pixels,
  normalised as (λ - λ0) / (λ1 - λ0) with `wavelength_range` = (λ0, λ1) (default (3000, 10000) Å, the reference's
  constants, so imported reference models see the positions they were trained on). The reference casts wavelengths
  to bf16 first (16–64 Å steps) and its zero padding reads as 3000 Å; here padding tokens get `token_mask` False.
- **Masks**: `value_mask` (B, T, W[+1]) is True for good pixels (and for the amplitude value of a present spectrum);
  `token_mask` (B, T) is True when a token has at least one good pixel. Padding of the last patch, masked pixels and
  missing spectra are therefore all excluded from the loss; bad pixels enter the model as 0 (the normalised mean
  level is ~1, so 0 is distinguishable but bounded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from astrolom.data.modalities import SPECTRA

WAVELENGTH_RANGE = (3000.0, 10000.0)  # Å; position normalisation shared with the reference AstroPT
DEFAULT_PATCH = 32
MIN_SCALE = 1e-6  # floor of the normalisation scale, so an all-zero (but "good") spectrum stays finite
DEFAULT_META = {"wavelength_unit": "Angstrom", "frame": "observed", "flux_unit": "1e-17 erg/s/cm2/Angstrom"}


@dataclass
class Spectrum:
    """One observed-frame spectrum.

    Attributes:
        wavelength: (L,) strictly increasing pixel centres (`meta["wavelength_unit"]`, observed frame).
        flux: (L,) flux density (`meta["flux_unit"]`).
        ivar: (L,) inverse variance of `flux`; 0 means no information. Defaults to ones.
        mask: (L,) bool, True marks a bad pixel (e.g. a sky line). Defaults to none masked.
        meta: units and provenance; `source` (a file name) is used in error messages.
    """

    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray | None = None
    mask: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_META))

    def __post_init__(self):
        src = self.meta.get("source", "spectrum")
        self.wavelength = np.asarray(self.wavelength, dtype=np.float64)
        self.flux = np.asarray(self.flux, dtype=np.float32)
        n = self.wavelength.shape[0] if self.wavelength.ndim == 1 else -1
        if self.wavelength.ndim != 1 or n < 2:
            raise ValueError(f"{src}: wavelength must be a 1-D grid of >= 2 pixels, got shape {self.wavelength.shape}")
        if not np.all(np.isfinite(self.wavelength)) or np.any(np.diff(self.wavelength) <= 0):
            raise ValueError(f"{src}: wavelength grid is not finite and strictly increasing")
        self.ivar = np.ones(n, np.float32) if self.ivar is None else np.asarray(self.ivar, dtype=np.float32)
        self.mask = np.zeros(n, bool) if self.mask is None else np.asarray(self.mask, dtype=bool)
        for name in ("flux", "ivar", "mask"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{src}: {name} has shape {getattr(self, name).shape}, wavelength has ({n},)")
        if np.any(self.ivar < 0) or np.any(np.isnan(self.ivar)):
            raise ValueError(f"{src}: ivar must be >= 0 (0 = no information)")
        for key, value in DEFAULT_META.items():
            self.meta.setdefault(key, value)

    @property
    def good(self) -> np.ndarray:
        """(L,) bool: pixels that carry information (unmasked, ivar > 0, finite flux)."""
        return ~self.mask & (self.ivar > 0) & np.isfinite(self.flux)

    def require_usable(self) -> Spectrum:
        """Self, or a ValueError naming the source when no pixel carries information (readers turn it into their
        bad-record error): all-NaN flux, all-zero ivar or everything masked."""
        if self.good.any():
            return self
        src = self.meta.get("source", "spectrum")
        if not np.isfinite(self.flux).any():
            why = "its flux is NaN everywhere"
        elif not (self.ivar > 0).any():
            why = "its ivar is 0 everywhere"
        else:
            why = "every pixel is masked or has ivar 0 / non-finite flux"
        raise ValueError(f"{src}: unusable spectrum: {why}")


# ----------------------------------------------------------------------------------------------------------------
# grids and flux-conserving resampling
# ----------------------------------------------------------------------------------------------------------------
def describe_grid(wavelength: np.ndarray) -> str:
    """'3600-9800 A, 3101 px, step 2' style summary used in error messages."""
    w = np.asarray(wavelength, dtype=np.float64)
    steps = np.diff(w)
    step = f"step {steps[0]:g}" if np.allclose(steps, steps[0], rtol=1e-6) else f"steps {steps.min():g}-{steps.max():g}"
    return f"{w[0]:g}-{w[-1]:g} A, {w.size} px, {step}"


def same_grid(a: np.ndarray, b: np.ndarray, rtol: float = 1e-7) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=0.0))


def _edges(centres: np.ndarray) -> np.ndarray:
    """Pixel edges halfway between centres, extrapolated by half a step at both ends."""
    mid = 0.5 * (centres[1:] + centres[:-1])
    return np.concatenate([[centres[0] - (mid[0] - centres[0])], mid, [centres[-1] + (centres[-1] - mid[-1])]])


@lru_cache(maxsize=16)
def _overlap_matrix(src: tuple[float, ...], dst: tuple[float, ...]) -> np.ndarray:
    """(L_dst, L_src) overlap lengths in Å of destination pixel i with source pixel j (dense; cached per grid pair).

    Grids are at most ~10^4 pixels and a grid pair recurs for a whole data set, so the matrix is built once and
    every resampling is a (batched) matrix product.
    """
    se, de = _edges(np.array(src)), _edges(np.array(dst))
    lo = np.maximum(de[:-1, None], se[None, :-1])
    hi = np.minimum(de[1:, None], se[None, 1:])
    return np.clip(hi - lo, 0.0, None)


def grid_coverage(wavelength: np.ndarray, grid: np.ndarray, min_coverage: float = 0.99) -> float:
    """Fraction of `grid`'s pixels that a spectrum sampled at `wavelength` covers (what survives `resample`).

    A grid pixel counts when the spectrum's pixel range (its edges) covers at least `min_coverage` of its width, the
    rule `resample` applies before masking; 1.0 for a spectrum on the grid itself, 0.0 when they do not overlap.
    """
    src, dst = _edges(np.asarray(wavelength, np.float64)), _edges(np.asarray(grid, np.float64))
    over = np.clip(np.minimum(dst[1:], src[-1]) - np.maximum(dst[:-1], src[0]), 0.0, None)
    return float(np.mean(over >= min_coverage * np.diff(dst)))


def resample(spectrum: Spectrum, grid: np.ndarray, min_coverage: float = 0.99) -> Spectrum:
    """Flux-conserving resampling of `spectrum` onto `grid` (pixel centres), with ivar and mask propagation.

    Each new pixel gets the overlap-weighted mean flux density of the good source pixels it covers, which conserves
    the integrated flux ∫ f dλ over any range both grids resolve. Variances add with squared weights
    (var_i = Σ_j w_ij² / ivar_j / (Σ_j w_ij)²). A new pixel is masked when good source pixels cover less than
    `min_coverage` of it (beyond the source range, or over masked pixels).

    Raises:
        ValueError: when the grids do not overlap.
    """
    grid = np.asarray(grid, dtype=np.float64)
    src_name = spectrum.meta.get("source", "spectrum")
    if grid.ndim != 1 or grid.size < 2 or np.any(np.diff(grid) <= 0):
        raise ValueError("target grid must be a 1-D strictly increasing wavelength array of >= 2 pixels")
    if grid[-1] <= spectrum.wavelength[0] or grid[0] >= spectrum.wavelength[-1]:
        raise ValueError(
            f"{src_name}: its grid ({describe_grid(spectrum.wavelength)}) does not overlap the model grid "
            f"({describe_grid(grid)})"
        )
    over = _overlap_matrix(tuple(spectrum.wavelength.tolist()), tuple(grid.tolist()))  # (L_new, L_old)
    good = spectrum.good
    w = over * good[None, :]
    covered = w.sum(1)
    width = np.diff(_edges(grid))
    ok = covered >= min_coverage * width
    denom = np.where(covered > 0, covered, 1.0)
    f = np.where(good, spectrum.flux, 0.0).astype(np.float64)
    flux = (w @ f) / denom
    var = np.where(good, 1.0 / np.where(good, spectrum.ivar, 1.0), 0.0)
    var_new = (w**2 @ var) / denom**2
    ivar = np.where(ok & (var_new > 0), 1.0 / np.where(var_new > 0, var_new, 1.0), 0.0)
    return Spectrum(
        wavelength=grid,
        flux=np.where(ok, flux, 0.0),
        ivar=ivar,
        mask=~ok,
        meta={**spectrum.meta, "resampled_from": describe_grid(spectrum.wavelength)},
    )


def to_grid(spectrum: Spectrum, grid: np.ndarray, allow_resample: bool = True) -> Spectrum:
    """`spectrum` on `grid`: unchanged when the grids agree, resampled (flux-conserving) or refused otherwise.

    Raises:
        ValueError: naming the source and both grids, when they differ and `allow_resample` is False.
    """
    if same_grid(spectrum.wavelength, grid):
        return spectrum
    if not allow_resample:
        raise ValueError(
            f"{spectrum.meta.get('source', 'spectrum')}: wavelength grid {describe_grid(spectrum.wavelength)} "
            f"differs from the model grid {describe_grid(grid)}; enable resampling (flux-conserving) or "
            "provide spectra on the model grid"
        )
    return resample(spectrum, grid)


# ----------------------------------------------------------------------------------------------------------------
# tokens
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SpectrumTokens:
    """A batch of tokenised spectra (all tensors share the batch dimension B).

    Attributes:
        values: (B, T, W[+1]) normalised flux per patch (0 at bad/padding pixels); with amplitude, the last value
            of every token is log10 of the spectrum's scale.
        value_mask: (B, T, W[+1]) True where a value enters the loss.
        positions: (B, T) float32 normalised wavelength of each token (0 for padding tokens).
        token_mask: (B, T) True for tokens with at least one good pixel.
        log_scale: (B,) log10 of the normalisation scale (0 for missing spectra).
        present: (B,) True for objects that have a spectrum with at least one good pixel.
    """

    values: torch.Tensor
    value_mask: torch.Tensor
    positions: torch.Tensor
    token_mask: torch.Tensor
    log_scale: torch.Tensor
    present: torch.Tensor

    def model_inputs(self, name: str = SPECTRA) -> dict[str, torch.Tensor]:
        """The keys `AstroPT` reads for a spectrum modality."""
        return {
            name: self.values,
            f"{name}_positions": self.positions,
            f"{name}_mask": self.token_mask,
            f"{name}_value_mask": self.value_mask,
            f"{name}_present": self.present,
        }


def n_tokens(n_pixels: int, patch: int = DEFAULT_PATCH, stride: int | None = None) -> int:
    """Number of tokens of an `n_pixels` spectrum (the last patch zero-padded)."""
    stride = patch if stride is None else stride
    if patch < 1 or stride < 1:
        raise ValueError(f"spectrum patch ({patch}) and stride ({stride}) must be >= 1")
    return 1 + max(0, -(-(n_pixels - patch) // stride))


def _patch_index(n_pixels: int, patch: int, stride: int) -> torch.Tensor:
    """(T, W) pixel index of each token value; n_pixels marks padding."""
    t = n_tokens(n_pixels, patch, stride)
    idx = torch.arange(t)[:, None] * stride + torch.arange(patch)[None, :]
    return torch.where(idx < n_pixels, idx, torch.full_like(idx, n_pixels))


def tokenize_spectra(
    flux: torch.Tensor | np.ndarray,
    wavelength: torch.Tensor | np.ndarray,
    good: torch.Tensor | np.ndarray | None = None,
    patch: int = DEFAULT_PATCH,
    stride: int | None = None,
    amplitude: bool = True,
    wavelength_range: tuple[float, float] = WAVELENGTH_RANGE,
) -> SpectrumTokens:
    """Spectra on one grid (B, L) -> `SpectrumTokens` (see the module docstring for the choices).

    Args:
        flux: (B, L) flux density; rows of a missing spectrum may be anything with `good` all False.
        wavelength: (L,) observed-frame grid shared by the batch (resample first with `to_grid`).
        good: (B, L) bool, True for usable pixels; default: finite flux.
        patch: pixels per token W.
        stride: pixels between token starts; default W (no overlap, see the module docstring).
        amplitude: append log10(scale) to every token.
        wavelength_range: (λ0, λ1) mapped to positions 0 and 1.
    """
    flux = torch.as_tensor(np.asarray(flux) if isinstance(flux, np.ndarray) else flux, dtype=torch.float32)
    if flux.dim() != 2:
        raise ValueError(f"flux must be (B, L), got shape {tuple(flux.shape)}")
    b, n = flux.shape
    wave = torch.as_tensor(np.asarray(wavelength, dtype=np.float64)).to(torch.float64)
    if wave.shape != (n,):
        raise ValueError(f"wavelength grid has {tuple(wave.shape)} pixels, flux has {n}")
    good = torch.isfinite(flux) if good is None else torch.as_tensor(good, dtype=torch.bool) & torch.isfinite(flux)
    stride = patch if stride is None else stride
    idx = _patch_index(n, patch, stride)  # (T, W)
    f = torch.where(good, flux, torch.zeros((), dtype=flux.dtype))
    present = good.any(1)
    # median |flux| of good pixels: NaN elsewhere so nanmedian ignores them
    absf = torch.where(good, flux.abs(), torch.full((), float("nan")))
    scale = torch.nan_to_num(absf.nanmedian(dim=1).values, nan=1.0).clamp_min(MIN_SCALE)
    scale = torch.where(present, scale, torch.ones_like(scale))
    pad = lambda x, v: torch.cat([x, torch.full((*x.shape[:-1], 1), v, dtype=x.dtype)], dim=-1)  # noqa: E731
    values = (pad(f / scale[:, None], 0.0))[:, idx]  # (B, T, W)
    vmask = pad(good, False)[:, idx]
    # float64 mean of the real pixels' wavelengths, normalised, then float32 (no bf16 rounding, no 0-as-3000 Å)
    real = (idx < n).to(torch.float64)
    centre = (pad(wave, 0.0)[idx] * real).sum(1) / real.sum(1)
    lo, hi = wavelength_range
    positions = ((centre - lo) / (hi - lo)).to(torch.float32)  # (T,)
    token_mask = vmask.any(-1)
    log_scale = torch.where(present, torch.log10(scale), torch.zeros_like(scale))
    if amplitude:
        t = idx.shape[0]
        values = torch.cat([values, log_scale[:, None, None].expand(b, t, 1)], dim=-1)
        vmask = torch.cat([vmask, token_mask[..., None]], dim=-1)
    positions = torch.where(token_mask, positions.expand(b, -1), torch.zeros((), dtype=torch.float32))
    return SpectrumTokens(values, vmask, positions, token_mask, log_scale.to(torch.float32), present)


def detokenize_spectra(
    values: torch.Tensor,
    n_pixels: int,
    patch: int = DEFAULT_PATCH,
    stride: int | None = None,
    amplitude: bool = True,
    log_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens (B, T, W[+1]) -> flux (B, n_pixels) in the original units.

    The scale is 10**log_scale when given (the true one), else the tokens' own amplitude value (averaged over
    tokens, e.g. a model's prediction). Overlapping patches (stride < W) are averaged.
    """
    stride = patch if stride is None else stride
    b, t, _ = values.shape
    idx = _patch_index(n_pixels, patch, stride)
    if idx.shape[0] != t:
        raise ValueError(f"{t} tokens do not match {n_pixels} pixels with patch {patch}, stride {stride}")
    if amplitude:
        if log_scale is None:
            log_scale = values[..., -1].mean(1)
        values = values[..., :-1]
    scale = torch.ones(b, dtype=values.dtype) if log_scale is None else 10.0 ** log_scale.to(values.dtype)
    out = torch.zeros(b, n_pixels + 1, dtype=values.dtype)
    count = torch.zeros(n_pixels + 1, dtype=values.dtype)
    out.index_add_(1, idx.reshape(-1), values.reshape(b, -1))
    count.index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=values.dtype))
    return out[:, :n_pixels] / count[:n_pixels] * scale[:, None]
