"""Image + spectrum batches for a multimodal model: the `inputs` dict `astrolom.model.astropt.AstroPT` reads.

`MultimodalBatches` wraps the image `TokenBatches` (order, shards, exact resume stay theirs) and adds, to every
batch, `inputs`: {"images": (B, T, D) spiral tokens, "spectra": ..., "spectra_positions": ..., masks} built with
`astrolom.data.spectra.tokenize_spectra`. Records without a spectrum (None) get `spectra_present` False and train on
their image alone; pixels with non-finite flux (the mock survey stores masked pixels as NaN) never enter the loss.
Spectra must be on the data set's wavelength grid (`source.metadata["wavelength"]`); a record of another length is
refused with its object id and both lengths (resample it with `astrolom.data.spectra.to_grid` when converting).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from astrolom.data.modalities import ALL, IMAGES, SPECTRA
from astrolom.data.spectra import DEFAULT_PATCH, WAVELENGTH_RANGE, n_tokens, tokenize_spectra


def spectrum_matrix(spectra: Any, n_pixels: int, object_ids: Sequence[str] | None = None) -> torch.Tensor:
    """A batch's spectra (a (B, L) tensor or a list of arrays / None) -> (B, L) float32, NaN rows for missing ones.

    Raises:
        ValueError: naming the object and both lengths, for a spectrum not on the `n_pixels` grid.
    """
    if isinstance(spectra, torch.Tensor):
        rows = [spectra[i].numpy() for i in range(spectra.shape[0])]
    else:
        rows = list(spectra)
    out = np.full((len(rows), n_pixels), np.nan, dtype=np.float32)
    for i, sp in enumerate(rows):
        if sp is None:
            continue
        sp = np.asarray(sp, dtype=np.float32)
        if sp.shape != (n_pixels,):
            name = object_ids[i] if object_ids is not None else f"record {i}"
            raise ValueError(
                f"{name}: spectrum has {sp.shape[0] if sp.ndim == 1 else sp.shape} pixels but the data set's "
                f"wavelength grid has {n_pixels}; resample it onto the grid (astrolom.data.spectra.to_grid)"
            )
        out[i] = sp
    return torch.from_numpy(out)


class SpectrumTokeniser:
    """The spectrum-token settings of a model, applied to the raw spectra of a batch."""

    def __init__(
        self,
        wavelength: Sequence[float] | np.ndarray,
        patch: int = DEFAULT_PATCH,
        amplitude: bool = True,
        wavelength_range: tuple[float, float] = WAVELENGTH_RANGE,
    ):
        self.wavelength = np.asarray(wavelength, dtype=np.float64)
        if self.wavelength.ndim != 1 or self.wavelength.size < 2 or np.any(np.diff(self.wavelength) <= 0):
            raise ValueError("the spectrum wavelength grid must be 1-D and strictly increasing")
        self.patch, self.amplitude, self.wavelength_range = int(patch), bool(amplitude), tuple(wavelength_range)

    @property
    def n_tokens(self) -> int:
        return n_tokens(self.wavelength.size, self.patch)

    def __call__(self, spectra: Any, object_ids: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        flux = spectrum_matrix(spectra, self.wavelength.size, object_ids)
        tok = tokenize_spectra(
            flux, self.wavelength, patch=self.patch, amplitude=self.amplitude, wavelength_range=self.wavelength_range
        )
        return tok.model_inputs(SPECTRA)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint's config.json records about spectrum tokens (enough to rebuild this tokeniser)."""
        return {
            "patch": self.patch,
            "stride": self.patch,
            "amplitude": self.amplitude,
            "normalisation": "flux / median |flux| of good pixels; log10 of that scale appended to every token",
            "wavelength_range": list(self.wavelength_range),
            "wavelength": self.wavelength.tolist(),
            "tokens": self.n_tokens,
        }


def source_wavelength(source: Any, location: str) -> np.ndarray:
    """The observed-frame wavelength grid of a data set's spectra (astrolom shard metadata key `wavelength`)."""
    grid = (getattr(source, "metadata", None) or {}).get("wavelength")
    if not grid:
        raise ValueError(
            f"{location}: no spectrum wavelength grid in the data's metadata (astrolom key 'wavelength'); "
            "a spectra model needs spectra on one known grid"
        )
    return np.asarray(grid, dtype=np.float64)


def multimodal_inputs(
    batch: dict[str, Any], modalities: Sequence[str], spectra: SpectrumTokeniser | None
) -> dict[str, torch.Tensor]:
    """The model's dict input for one `TokenBatches` batch."""
    inputs: dict[str, torch.Tensor] = {}
    if IMAGES in modalities:
        inputs[IMAGES] = batch["tokens"]
    if SPECTRA in modalities:
        if spectra is None:
            raise ValueError("a spectra model needs a SpectrumTokeniser (the data's wavelength grid)")
        b = len(batch["object_id"])
        inputs.update(spectra(batch.get("spectrum", [None] * b), batch["object_id"]))
    return inputs


class MultimodalBatches:
    """`TokenBatches` whose batches also carry `inputs` (see the module docstring); resumable like them."""

    def __init__(self, batches: Any, modalities: Sequence[str], spectra: SpectrumTokeniser | None):
        unknown = [m for m in modalities if m not in ALL]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; choose from {ALL}")
        self.batches, self.modalities, self.spectra = batches, tuple(modalities), spectra

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.batches:
            batch["inputs"] = multimodal_inputs(batch, self.modalities, self.spectra)
            yield batch

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def to_device(inputs: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def slice_inputs(inputs: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The first n objects of a batch's inputs."""
    return {k: v[:n] for k, v in inputs.items()}
