"""What embeds: `load_encoder(path)` for every kind of run, and how the alignment encoders read their inputs.

`load_encoder` takes a model directory, a RUN directory or an alignment run and returns

- a `ModelEncoder` for an AstroPT: images-only or spectra-only (`kind` "astropt"), or images + spectra
  ("multimodal"); with `modality`, the model must be one whose pass over that modality alone is one it was
  pretrained on (`reads_alone`: the frozen encoders of an alignment run);
- an `AlignedEncoder` for an alignment run (`astrolom align`): both encoders (the frozen ones the run recorded,
  with the fine-tuned weights where the run trained them) and the heads, ready to embed new objects into the
  shared space. It runs the same feature extractors as training (`image_token_features`,
  `spectrum_token_features`: the stamp itself, central tokens) and the heads' `encode`, so an object embedded here
  lands exactly where `eval-align`'s `aligned_embeddings` puts it.

`kind` matches the `EmbeddingRecipe.encoder` of the embeddings each one writes (`astrolom.eval.embeddings`).
This module is the bottom of `astrolom.align` beside the heads (`model.py`): training, features and embedding all
load their encoders here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from astrolom.align.model import AlignConfig, AlignModel
from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.data.multimodal import SpectrumTokeniser
from astrolom.data.records import Record
from astrolom.eval.multimodal import spectrum_tokeniser_from_config
from astrolom.layout import CONFIG_NAME, FINAL_DIR, WEIGHTS_NAME
from astrolom.model.astropt import AstroPT

MODEL_TYPE = "astrolom-align"  # config.json model_type of an aligned model
BEST_DIR = "best"
DEFAULT_TOKENS = 64


# ------------------------------------------------------------------------------------------- reading the inputs


def record_flux(rec: Record) -> np.ndarray:
    """Flux with masked or zero-inverse-variance pixels set to NaN (the tokeniser's 'bad value')."""
    flux = np.asarray(rec.spectrum, dtype=np.float32).copy()
    if rec.spectrum_mask is not None:
        flux[np.asarray(rec.spectrum_mask, dtype=bool)] = np.nan
    if rec.spectrum_ivar is not None:
        flux[np.asarray(rec.spectrum_ivar) <= 0] = np.nan
    return flux


@torch.no_grad()
def image_token_features(
    model: AstroPT, cfg_json: dict, records: list[Record], n_tokens: int = DEFAULT_TOKENS, layer: int = -2
) -> torch.Tensor:
    """(B, T, C) penultimate-block features of the first `n_tokens` spiral tokens of each record's image."""
    from astrolom.data.batching import batch_tokens
    from astrolom.data.stream import tokenize_records

    if model.config.tokens_preset != "astrolom":
        raise ValueError(
            f"image encoders with tokens_preset={model.config.tokens_preset!r} (an imported paper model) are not "
            "supported for alignment yet; embed with `astrolom embed`, which applies the preset"
        )
    size = (cfg_json.get("data") or {}).get("image_size")
    batch = tokenize_records(
        records, model.config.patch_size, image_size=tuple(size) if isinstance(size, list) else size
    )
    # the trainer's token maker, so a flux-aware encoder reads the flux features it was trained with
    flux = model.config.flux_softening if model.config.flux_features else None
    tokens = batch_tokens(batch, flux_softening=flux)[:, :n_tokens]
    return model.forward_features(tokens, layer=layer).float()


@torch.no_grad()
def spectrum_token_features(
    model: AstroPT, tokeniser, flux: list[np.ndarray], ids: list[str], layer: int = -2
) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, Ts, C) features, (B, Ts) real-token mask) of spectra from a spectra-only encoder."""
    inputs = tokeniser(flux, ids)
    feats = model.forward_features(inputs, layer=layer)[SPECTRA].float()
    return feats, inputs["spectra_mask"].bool() & inputs["spectra_present"].bool()[:, None]


def reads_alone(config, modality: str) -> bool:
    """Whether a model's pass over `modality` alone is one it was pretrained on.

    True for a single-modality model of that modality. A multimodal model qualifies as a *spectrum* encoder when its
    training sequences began with the spectrum (order random, or fixed with spectra first): the model is causal, so
    on those samples its spectrum tokens were a spectra-only next-token model, exactly the pass the encoder runs
    (docs "Alignment"). Image encoders read tensors and stay images-only.
    """
    mods = tuple(config.modalities)
    if mods == (modality,):
        return True
    if modality != SPECTRA or modality not in mods:
        return False
    return config.modality_order == "random" or mods[0] == modality


# ------------------------------------------------------------------------------------------------------ encoders


@dataclass
class ModelEncoder:
    """A pretrained AstroPT with its config.json and directory (`meta`: what `load_model` records for embedding)."""

    model: AstroPT
    config: dict
    path: Path
    meta: dict

    @property
    def kind(self) -> str:
        """`astropt` (one modality) or `multimodal` (dict inputs: images + spectra), as in `EmbeddingRecipe`."""
        return "multimodal" if self.model.config.multimodal else "astropt"


@dataclass
class AlignedEncoder:
    """Encoders + heads of an alignment run (module docstring); embeddings are L2-normalised, (B, embed_dim)."""

    heads: AlignModel
    image: AstroPT
    image_cfg: dict
    spectrum: AstroPT
    spectrum_cfg: dict
    tokeniser: SpectrumTokeniser
    tokens: int
    run: Path
    config: dict
    tuned: bool = False  # the run fine-tuned its encoders (--finetune-backbones): their weights are the run's
    kind = "aligned"

    @property
    def path(self) -> Path:
        return self.run

    @property
    def wavelength(self) -> np.ndarray:
        """The spectrum encoder's wavelength grid (Å): spectra are put on it before tokenising."""
        return self.tokeniser.wavelength

    @property
    def patch_size(self) -> int:
        return int(self.image.config.patch_size)

    @torch.no_grad()
    def embed_images(self, records: list[Record]) -> np.ndarray:
        feats = image_token_features(self.image, self.image_cfg, records, self.tokens)  # (B, T, Ci)
        return self.heads.encode(IMAGES, feats).numpy()

    @torch.no_grad()
    def embed_spectra(self, flux: list[np.ndarray], ids: list[str]) -> np.ndarray:
        """Spectra on `wavelength` with NaN at bad pixels (each with at least one good pixel)."""
        feats, mask = spectrum_token_features(self.spectrum, self.tokeniser, flux, ids)  # (B, Ts, Cs), (B, Ts)
        return self.heads.encode(SPECTRA, feats, mask).numpy()


def aligned_dir(path: str | Path) -> Path:
    """The aligned model directory of RUN (RUN/best, else RUN/final), or RUN itself / a checkpoint directory."""
    path = Path(path)
    for d in (path / BEST_DIR, path / FINAL_DIR, path):
        if (d / WEIGHTS_NAME).is_file():
            return d
    raise FileNotFoundError(f"no aligned model in {path} (expected {BEST_DIR}/ or final/ with model.safetensors)")


def is_aligned(path: str | Path) -> bool:
    """Whether `path` holds an alignment run or aligned model (its config.json says model_type astrolom-align)."""
    try:
        cfg = json.loads((aligned_dir(path) / CONFIG_NAME).read_text())
    except (FileNotFoundError, ValueError):
        return False
    return cfg.get("model_type") == MODEL_TYPE


def load_aligned(path: str | Path) -> tuple[AlignModel, dict]:
    """(heads in eval mode, config.json) from RUN/best, RUN/final, RUN itself or a checkpoint directory."""
    d = aligned_dir(path)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    if cfg.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{d / CONFIG_NAME} is not an aligned model (model_type={cfg.get('model_type')!r})")
    model = AlignModel(AlignConfig(**cfg["align"]))
    state = load_file(str(d / WEIGHTS_NAME))
    heads = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(heads)
    return model.eval(), cfg


def has_tuned_backbones(run: str | Path) -> bool:
    """Whether an alignment run trained its encoders (`--finetune-backbones`): its weights include theirs."""
    from safetensors import safe_open

    with safe_open(str(aligned_dir(run) / WEIGHTS_NAME), framework="pt") as f:
        return any(k.startswith("backbones.") for k in f.keys())  # noqa: SIM118 (safe_open is not a mapping)


def load_encoder(
    path: str | Path, *, modality: str | None = None, random_init: bool = False, seed: int = 0
) -> ModelEncoder | AlignedEncoder:
    """The encoder a directory holds: an alignment run's `AlignedEncoder`, else a pretrained AstroPT's
    `ModelEncoder` (module docstring). `modality`: the AstroPT must read that modality alone (`reads_alone`);
    `random_init` / `seed`: the random-initialisation control of the AstroPT's config (`load_model`)."""
    from astrolom.model.pretrained import load_model, read_config, resolve_model_dir

    if is_aligned(path):
        if modality is not None or random_init:
            raise ValueError(f"{path}: an alignment run, not an AstroPT (wanted a {modality or 'random-init'} model)")
        return _load_aligned_encoder(path)
    d = resolve_model_dir(path)
    model, meta = load_model(d, random_init=random_init, seed=seed)
    if modality is not None and not reads_alone(model.config, modality):
        mods, order = tuple(model.config.modalities), model.config.modality_order
        raise ValueError(
            f"{d}: the {modality} encoder must have been pretrained on {modality} alone, or be a multimodal spectra "
            f"encoder that trained with spectra first in the sequence (modality_order random, or fixed with spectra "
            f"first); got modalities {mods}, order {order!r}"
        )
    return ModelEncoder(model, read_config(d), d, meta)


def _load_aligned_encoder(run: str | Path) -> AlignedEncoder:
    heads, cfg = load_aligned(run)
    enc = cfg.get("features") or {}
    if not enc.get("image_model") or not enc.get("spectrum_model"):
        raise ValueError(f"{run}: the alignment run does not record its image and spectrum encoders")
    image = load_encoder(enc["image_model"], modality=IMAGES)
    spectrum = load_encoder(enc["spectrum_model"], modality=SPECTRA)
    state = load_file(str(aligned_dir(run) / WEIGHTS_NAME))
    tuned_any = False
    for prefix, model in (("backbones.image.", image.model), ("backbones.spectrum.", spectrum.model)):
        tuned = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if tuned:  # --finetune-backbones: the run's own encoder weights, not the frozen starting point
            model.load_state_dict(tuned, strict=True)
            tuned_any = True
    return AlignedEncoder(
        heads,
        image.model.eval(),
        image.config,
        spectrum.model.eval(),
        spectrum.config,
        spectrum_tokeniser_from_config(spectrum.config),
        int(enc.get("tokens") or DEFAULT_TOKENS),
        Path(run).resolve(),
        cfg,
        tuned_any,
    )
