"""Per-token features of the frozen encoders, computed once and cached (fast head training on a CPU).

The image encoder is an images-only AstroPT run; the spectrum encoder an AstroPT pretrained on spectra alone
(`model.modalities=spectra`), or an images + spectra model that trained with spectra first (`encoder.reads_alone`). Only
objects with a usable spectrum form pairs. For every pair the cache holds:

- `image_tokens` (N, V, T, C): the image encoder's penultimate-block features of the first T spiral (central)
  tokens for V views. View 0 is the stamp itself; views 1..V-1 are the D4 elements (90° rotations, flips; the stamp
  centre never moves, so the galaxy stays the object the spectrum was taken of) cycled in order, each with fresh
  Gaussian noise of `noise` times the per-band sky sigma. No crops: a shifted crop would put a neighbour at the
  fibre position.
- `spectrum_tokens` (N, Ts, C) and `spectrum_mask` (N, Ts) (True = real token) from the spectrum encoder;
- `labels` (N, L), `images` (N, H, W, C) and `spectra` (N, Lpix) (for the supervised baselines), ids and splits.

The cache is a safetensors file with the object ids, splits, label names and encoder paths in its metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from astrolom.align.encoder import (
    DEFAULT_TOKENS,
    image_token_features,
    load_encoder,
    record_flux,
    spectrum_token_features,
)
from astrolom.data.augment import d4, turns_then_mirror
from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.data.records import Record
from astrolom.data.sky import sky_sigma
from astrolom.eval.multimodal import spectrum_tokeniser_from_config
from astrolom.log import progress as progress_bar

DEFAULT_VIEWS = 8
DEFAULT_NOISE = 0.5
TARGETS = ("redshift", "log_mstar", "log_ssfr", "log_zstar", "age_mw_gyr")


def view_element(view: int) -> int:
    """The D4 element (`astrolom.data.augment`) of cached view `view`: (view % 4) quarter turns, then a mirror for
    view % 8 >= 4 (the order views have always had, so caches and runs stay comparable)."""
    return turns_then_mirror(view % 4, view % 8 >= 4)


def augment(image: np.ndarray, view: int, sigma: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """View `view` of a stamp: 0 = itself; otherwise D4 element `view_element(view)` plus noise * sigma (C,)
    Gaussian noise."""
    if view == 0:
        return image
    out = d4(image, view_element(view))
    return (out + rng.normal(size=out.shape) * (noise * sigma)).astype(np.float32)


@dataclass
class FeatureCache:
    """Cached encoder features of the pairs (see the module docstring)."""

    image_tokens: torch.Tensor  # (N, V, T, Ci)
    spectrum_tokens: torch.Tensor  # (N, Ts, Cs)
    spectrum_mask: torch.Tensor  # (N, Ts) bool
    labels: torch.Tensor  # (N, L) float32, NaN = unknown
    images: torch.Tensor  # (N, H, W, C)
    spectra: torch.Tensor  # (N, Lpix), NaN = bad pixel
    object_ids: list[str]
    splits: list[str]
    label_names: list[str]
    meta: dict

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.splits) == split)

    def label(self, name: str) -> np.ndarray:
        return self.labels[:, self.label_names.index(name)].numpy().astype(np.float64)

    def unaligned(self, modality: str) -> np.ndarray:
        """The encoders' own embeddings (mean of the token features, view 0): the 'unaligned' baseline."""
        if modality == IMAGES:
            return self.image_tokens[:, 0].mean(1).numpy()
        m = self.spectrum_mask.to(self.spectrum_tokens.dtype)[..., None]
        return ((self.spectrum_tokens * m).sum(1) / m.sum(1).clamp_min(1)).numpy()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, object_ids=self.object_ids, splits=self.splits, label_names=self.label_names)
        tensors = {
            "image_tokens": self.image_tokens,
            "spectrum_tokens": self.spectrum_tokens,
            "spectrum_mask": self.spectrum_mask.to(torch.uint8),
            "labels": self.labels,
            IMAGES: self.images,
            SPECTRA: self.spectra,
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"astrolom": json.dumps(meta)})
        tmp.replace(path)  # atomic: a cache is complete or absent
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureCache:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no feature cache at {path}")
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("astrolom", "{}"))
        if "object_ids" not in meta:
            raise ValueError(f"{path} is not an astrolom alignment feature cache (no astrolom metadata)")
        t = load_file(str(path))
        ids, splits, names = meta.pop("object_ids"), meta.pop("splits"), meta.pop("label_names")
        return cls(
            t["image_tokens"],
            t["spectrum_tokens"],
            t["spectrum_mask"].bool(),
            t["labels"],
            t[IMAGES],
            t[SPECTRA],
            ids,
            splits,
            names,
            meta,
        )


def _pairs(data: str, split_settings: dict, on_open=None, on_record=None) -> Iterator[Record]:
    """Every record of every split that has a spectrum with at least one good pixel.

    `on_open(n, bands)` is told how many records will be scanned and the images' band names (None: unknown),
    `on_record()` is called for each (progress with an ETA).
    """
    from astrolom.data.sources import open_source
    from astrolom.data.stream import RecordStream

    source = open_source(data, spectra=True, **split_settings)
    try:
        counts = source.split_counts()
        if on_open is not None:
            on_open(sum(counts.get(s, 0) for s in ("train", "val", "test")), source.bands)
        for split in ("train", "val", "test"):
            if counts.get(split, 0):
                for rec in RecordStream(source, split=split, shuffle=False, epochs=1):
                    if on_record is not None:
                        on_record()
                    if rec.spectrum is not None and np.isfinite(record_flux(rec)).any():
                        yield rec
    finally:
        source.close()


def extract_features(
    image_model: str,
    spectrum_model: str,
    data: str,
    *,
    views: int = DEFAULT_VIEWS,
    noise: float = DEFAULT_NOISE,
    n_tokens: int = DEFAULT_TOKENS,
    batch_size: int = 256,  # stamps per encoder pass: on a CPU big batches amortise per-op overhead
    seed: int = 0,
    max_objects: int | None = None,
    progress: bool = True,
) -> FeatureCache:
    """Run both frozen encoders over every pair of `data` once (module docstring); returns the cache."""

    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    img = load_encoder(image_model, modality=IMAGES)
    spec = load_encoder(spectrum_model, modality=SPECTRA)
    img_model, img_cfg, img_dir = img.model, img.config, str(img.path)
    spec_model, spec_cfg, spec_dir = spec.model, spec.config, str(spec.path)
    tokeniser = spectrum_tokeniser_from_config(spec_cfg)
    d = img_cfg.get("data") or {}
    settings = {}
    if "split_fractions" in d:
        settings = {"split_fractions": tuple(d["split_fractions"]), "split_seed": int(d.get("split_seed", 0))}
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {k: [] for k in ("img", "spec", "mask", "labels", IMAGES, SPECTRA)}
    ids, splits, sigma = [], [], None
    names, bands = None, None
    # progress over the records scanned (known up front, so the bar has an ETA); pairs are those with a spectrum
    bar = progress_bar(None, desc="encoder features", unit="obj", enabled=progress)
    buf: list[Record] = []
    scanned = 0

    def on_open(n: int, source_bands: tuple[str, ...] | None) -> None:
        nonlocal bands
        bands = source_bands
        if not max_objects:  # a cap counts pairs, not the records scanned: then the scan length is unknown
            bar.total = n
            bar.refresh()

    def on_record() -> None:
        nonlocal scanned
        scanned += 1

    def flush() -> None:
        nonlocal sigma
        images = np.stack([r.image for r in buf]).astype(np.float32)
        if sigma is None:  # sky noise from the first batch: the noise augmentation's unit
            sigma = sky_sigma(images)
        per_view = []
        for v in range(views):
            recs = [replace(r, image=augment(r.image, v, sigma, noise, rng)) for r in buf]
            per_view.append(image_token_features(img_model, img_cfg, recs, n_tokens))
        out["img"].append(torch.stack(per_view, 1))  # (B, V, T, C)
        flux = [record_flux(r) for r in buf]
        f, m = spectrum_token_features(spec_model, tokeniser, flux, [r.object_id for r in buf])
        out["spec"].append(f)
        out["mask"].append(m)
        out["labels"].append(torch.tensor([[float(r.labels.get(n, np.nan)) for n in names] for r in buf]))
        out[IMAGES].append(torch.from_numpy(images))
        out[SPECTRA].append(torch.from_numpy(np.stack(flux)))
        bar.update(scanned - bar.n)
        bar.set_postfix(pairs=len(ids), refresh=False)
        buf.clear()

    for rec in _pairs(data, settings, on_open, on_record):
        if names is None:
            names = [n for n in TARGETS if n in rec.labels]
        ids.append(str(rec.object_id))
        splits.append(rec.split or "train")
        buf.append(rec)
        if len(buf) == batch_size:
            flush()
        if max_objects and len(ids) >= max_objects:
            break
    if buf:
        flush()
    bar.close()
    if not ids:
        raise ValueError(f"{data}: no objects with a usable spectrum to align")
    meta = {
        "image_model": img_dir,
        "spectrum_model": spec_dir,
        "data": str(data),
        "views": views,
        "noise": noise,
        "tokens": n_tokens,
        "seed": seed,
        "sky_sigma": [float(s) for s in sigma],
        "bands": list(bands) if bands else None,  # the planes of `images`, for the figures' colour rendering
        "wavelength": [float(w) for w in tokeniser.wavelength],  # Å, the grid of `spectra` (figures' x axis)
    }
    cat = {k: torch.cat(v) for k, v in out.items()}
    return FeatureCache(
        cat["img"],
        cat["spec"],
        cat["mask"],
        cat["labels"].float(),
        cat[IMAGES],
        cat[SPECTRA],
        ids,
        splits,
        names or [],
        meta,
    )
