"""Shared-space embeddings from an alignment run: `astrolom embed --model ALIGN_RUN --data DIR --out EMB.parquet`.

`AlignedEncoder` is an alignment run ready to embed new objects: both encoders (the frozen ones the run recorded,
with the fine-tuned weights where the run trained them) and the heads. It runs the same feature extractors as
training (`features.image_token_features`, `features.spectrum_token_features`: stamp itself, central tokens) and the
heads' `encode`, so an object embedded here lands exactly where `eval-align`'s `aligned_embeddings` puts it.

The embedding file has one row per object of the data set (with or without a spectrum): `embedding_images`,
`embedding_spectra` (null without a usable spectrum) and `embedding` (= the image one, so every tool that reads
`embedding` uses it unchanged). Its metadata records the alignment run (`aligned`, `model`), so that `astrolom
index` builds one index per modality and `astrolom search` embeds new images and spectra with the same run.

`astrolom embed` lands here first: an alignment run is embedded as above, any other model goes on to
`astrolom.eval.embed` unchanged.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from astrolom.align.features import _flux, _load_encoder, image_token_features, spectrum_token_features
from astrolom.align.model import AlignModel
from astrolom.align.train import aligned_dir, is_aligned, load_aligned
from astrolom.data.multimodal import SpectrumTokeniser
from astrolom.data.records import SPLITS, Record
from astrolom.eval.multimodal import (
    MultimodalEmbeddingWriter,
    model_records,
    spectrum_tokeniser_from_config,
    write_embedding_columns,
)
from astrolom.model.astropt import AstroPT

COLUMNS = {"embedding": "images", "embedding_images": "images", "embedding_spectra": "spectra"}


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
        return self.heads.encode("images", feats).numpy()

    @torch.no_grad()
    def embed_spectra(self, flux: list[np.ndarray], ids: list[str]) -> np.ndarray:
        """Spectra on `wavelength` with NaN at bad pixels (each with at least one good pixel)."""
        feats, mask = spectrum_token_features(self.spectrum, self.tokeniser, flux, ids)  # (B, Ts, Cs), (B, Ts)
        return self.heads.encode("spectra", feats, mask).numpy()


def aligned_metadata(run: str | Path, cfg: dict) -> dict:
    """What an embedding file of run `run` (config.json `cfg`) records, so that an index built on it embeds new
    queries with the same run (`astrolom search --image/--spectrum`)."""
    enc = cfg.get("features") or {}
    run = str(Path(run).resolve())
    return {
        "model": run,
        "aligned": run,
        "image_model": enc.get("image_model"),
        "spectrum_model": enc.get("spectrum_model"),
        "tokens": enc.get("tokens"),
        "embed_dim": (cfg.get("align") or {}).get("embed_dim"),
        "columns": dict(COLUMNS),
    }


def has_tuned_backbones(run: str | Path) -> bool:
    """Whether an alignment run trained its encoders (`--finetune-backbones`): its weights include theirs."""
    from safetensors import safe_open

    with safe_open(str(aligned_dir(run) / "model.safetensors"), framework="pt") as f:
        return any(k.startswith("backbones.") for k in f.keys())  # noqa: SIM118 (safe_open is not a mapping)


def load_aligned_encoder(run: str | Path) -> AlignedEncoder:
    """An alignment run (RUN, RUN/best or RUN/final) with its two encoders, ready to embed."""
    heads, cfg = load_aligned(run)
    enc = cfg.get("features") or {}
    if not enc.get("image_model") or not enc.get("spectrum_model"):
        raise ValueError(f"{run}: the alignment run does not record its image and spectrum encoders")
    image, image_cfg, _ = _load_encoder(enc["image_model"], "images")
    spectrum, spectrum_cfg, _ = _load_encoder(enc["spectrum_model"], "spectra")
    state = load_file(str(aligned_dir(run) / "model.safetensors"))
    tuned_any = False
    for prefix, model in (("backbones.image.", image), ("backbones.spectrum.", spectrum)):
        tuned = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if tuned:  # --finetune-backbones: the run's own encoder weights, not the frozen starting point
            model.load_state_dict(tuned, strict=True)
            tuned_any = True
    return AlignedEncoder(
        heads,
        image.eval(),
        image_cfg,
        spectrum.eval(),
        spectrum_cfg,
        spectrum_tokeniser_from_config(spectrum_cfg),
        int(enc.get("tokens") or 64),
        Path(run).resolve(),
        cfg,
        tuned_any,
    )


def embed_aligned_dataset(
    run: str | Path,
    data: str,
    out: str | Path,
    *,
    splits: Iterable[str] = SPLITS,
    batch_size: int = 64,
    max_per_split: int | None = None,
    progress: bool = True,
) -> Path:
    """Embed every object of `splits` of `data` into the shared space of an alignment run (module docstring)."""
    enc = load_aligned_encoder(run)
    splits = list(splits)
    # the image run's split settings, the spectrum run's wavelength grid
    cfg = {"data": enc.image_cfg.get("data") or {}, "tokens": enc.spectrum_cfg.get("tokens") or {}}
    meta = {**aligned_metadata(enc.run, enc.config), "data": str(data), "splits": splits}
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    writer = MultimodalEmbeddingWriter(out, meta, embedding_column="embedding_images")
    it = model_records(data, cfg, splits, max_per_split)
    dim = enc.heads.config.embed_dim

    def embed(batch: list[Record]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        img = enc.embed_images(batch)
        flux = [_flux(r) if r.spectrum is not None else None for r in batch]
        has = np.array([f is not None and bool(np.isfinite(f).any()) for f in flux])
        spec = np.zeros((len(batch), dim), np.float32)
        if has.any():
            rows = np.flatnonzero(has)
            spec[rows] = enc.embed_spectra([flux[i] for i in rows], [str(batch[i].object_id) for i in rows])
        return {"embedding_images": (img, np.ones(len(batch), bool)), "embedding_spectra": (spec, has)}

    return write_embedding_columns(writer, it, embed, batch_size, "embed[aligned]", progress,
                                   f"{data}: no records in split(s) {splits}")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from astrolom.eval import embed

    embed.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if not is_aligned(args.model):
        from astrolom.eval import embed

        return embed.run(args)
    if args.random_init or args.symmetrize or args.scales:
        raise ValueError("--random-init, --symmetrize and --scales do not apply to an alignment run")
    path = embed_aligned_dataset(
        args.model,
        args.data,
        args.out,
        splits=[s.strip() for s in args.splits.split(",") if s.strip()],
        batch_size=min(args.batch_size, 64),
        max_per_split=args.max_per_split,
        progress=not args.no_progress,
    )
    print(f"embedded in the aligned space (images, spectra columns) -> {path}")
    return 0
