"""Using a multimodal (images + spectra) AstroPT: per-modality embeddings and cross-modal generation.

Embeddings (`embed_multimodal`), each a block's output (default: the final block, after the final LayerNorm)
averaged over a modality's real tokens:

- `embedding_images`: an images-only pass over the first `n_tokens` spiral tokens (the central patches), averaged;
- `embedding_spectra`: a spectra-only pass over the spectrum's present tokens (null without a spectrum), read out
  with `spectrum_pool`: the mean over each of `spectrum_segments` (default 8) equal wavelength ranges of the
  model's grid, concatenated (8× the image embedding's width; `spectrum_segments=1` is the plain mean);
- `embedding_joint`: the spectrum's tokens read both ways, pooled the same way: one pass over both in the order
  images, spectra (in a causal model its spectrum tokens are the only ones that have seen both modalities; its image
  tokens are exactly the images-only pass), and the mean with `embedding_spectra` (the same tokens in the order
  spectra, images, where they have not seen the image). Objects without a spectrum get their image embedding here,
  repeated once per segment. The file's `embedding` column holds the joint one, so every tool that reads
  `embedding` (probes, search) uses it unchanged.

Why wavelength segments (README "Fibre apertures", `benchmarks/spectrum_readout.py`): where a line falls is
redshift, and one mean over all tokens keeps little of where; the tokens do not make up for it (the last token, which
has read the whole spectrum, is worse than the mean). On the fibre-aperture mock, `1m`, 3,000 steps, linear probes fit
on val: redshift R² 0.895 (one mean) → 0.939 / 0.947 / 0.957 with 2 / 4 / 8 segments, and every other target up too;
a random-init model of the same config, read out the same ways, stays well below (0.554 → 0.812).

Why the final block and the spectrum tokens (README "Spectra", one mean over tokens, measured on the whole-galaxy
mock, `astrolom survey --spectrum-aperture total`, with a `1m` images + spectra model, 3,000 steps; linear probes,
redshift R²): spectrum
embedding 0.952 from the final block vs 0.917 from the penultimate (the images-only convention of the paper); joint
0.942 from the spectrum tokens vs 0.929 when the image tokens are averaged in. Why both orders: on the fibre-aperture
mock the image-conditioned spectrum tokens alone lift log M* by 0.038 over the spectrum (the image knows the fibre's
share of the light) but lose 0.005-0.009 on redshift; their mean with the spectra-only tokens keeps the gain
(+0.039) and is level on redshift (+0.0004) and log sSFR (`benchmarks/joint_vs_spectrum.py`; README "Fibre apertures").

Cross-modal generation (`astrolom generate --from images --to spectra`): the model is prompted with the image tokens
and the spectrum's begin-of-modality token and continues the spectrum token by token (`AstroPT.generate_modality`).
The metric is the mean Huber loss (δ = 1) over the good values of the true tokens, in the normalised units the
model is trained on (flux / scale, plus log10 scale), against a trivial baseline: the training split's mean
spectrum token values (per token position and value). The figure shows predicted and true spectra in flux units
with emission lines marked at the true redshift. `--to images` predicts the first image tokens from a spectrum,
scored the same way against the mean training image tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from astrolom import layout
from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.data.multimodal import SpectrumTokeniser, multimodal_inputs
from astrolom.data.records import SPLITS, Record
from astrolom.data.spectra import detokenize_spectra
from astrolom.eval.embeddings import embedding_columns
from astrolom.eval.probe_columns import probe_columns
from astrolom.eval.recipe import EMBEDDING, EmbeddingRecipe
from astrolom.model.astropt import AstroPT
from astrolom.model.pretrained import data_settings

DEFAULT_LAYER = -1  # the final block (after ln_f); images-only `astrolom embed` keeps the paper's -2
DEFAULT_TOKENS = 64
DEFAULT_SPECTRUM_SEGMENTS = 8  # spectrum readout: means over 8 wavelength ranges, concatenated (module docstring)
COLUMNS = ("embedding_images", "embedding_spectra", "embedding_joint")


def spectrum_tokeniser_from_config(cfg_json: dict) -> SpectrumTokeniser:
    """The spectrum tokeniser a model was trained with (its config.json `tokens.spectra`)."""
    spec = (cfg_json.get("tokens") or {}).get(SPECTRA)
    if not spec or "wavelength" not in spec:
        raise ValueError("the model's config.json has no tokens.spectra section: it was not trained on spectra")
    return SpectrumTokeniser(
        spec["wavelength"],
        patch=int(spec["patch"]),
        amplitude=bool(spec["amplitude"]),
        wavelength_range=tuple(spec["wavelength_range"]),
    )


def _image_size(cfg_json: dict) -> int | tuple[int, int] | None:
    size = (cfg_json.get("data") or {}).get("image_size")
    return tuple(size) if isinstance(size, list) else size


def record_inputs(
    records: list[Record], model: AstroPT, cfg_json: dict, spectra: SpectrumTokeniser | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(tokenised batch, the model's dict input) for records, with the model's image and spectrum tokenisation."""
    from astrolom.data.stream import tokenize_records

    batch = tokenize_records(records, model.config.patch_size, image_size=_image_size(cfg_json))
    batch["spectrum"] = [r.spectrum for r in records]
    return batch, multimodal_inputs(batch, model.config.modalities, spectra)


def _masked_mean(feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(feats.dtype)[..., None]
    return (feats * m).sum(1) / m.sum(1).clamp_min(1.0)


def spectrum_pool(feats: torch.Tensor, mask: torch.Tensor, segments: int = DEFAULT_SPECTRUM_SEGMENTS) -> torch.Tensor:
    """(B, T, C) spectrum-token outputs, (B, T) present tokens -> (B, segments * C): the mean over the present tokens
    of each of `segments` equal runs of token positions (fixed observed-frame wavelength ranges of the model's grid,
    blue to red), concatenated. A run without a present token gets the mean over all present tokens, so partial
    coverage stays in distribution. `segments=1` is the plain mean over tokens."""
    if segments < 1:
        raise ValueError(f"spectrum segments must be >= 1, got {segments}")
    t = feats.shape[1]
    if segments > t:
        raise ValueError(f"{segments} spectrum segments for a model with {t} spectrum tokens: use at most {t}")
    whole = _masked_mean(feats, mask)
    if segments == 1:
        return whole
    pos = torch.arange(t, device=feats.device)
    parts = []
    for k in range(segments):
        run = mask & ((pos >= (t * k) // segments) & (pos < (t * (k + 1)) // segments))[None]
        parts.append(torch.where(run.any(1, keepdim=True), _masked_mean(feats, run), whole))
    return torch.cat(parts, 1)


@torch.no_grad()
def embed_multimodal(
    model: AstroPT,
    inputs: dict[str, torch.Tensor],
    layer: int = DEFAULT_LAYER,
    n_tokens: int = DEFAULT_TOKENS,
    spectrum_segments: int = DEFAULT_SPECTRUM_SEGMENTS,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{column: (embeddings (B, C) float32, present (B,) bool)} for the modalities in `inputs` (module docstring);
    the spectrum and joint columns are `spectrum_segments` times as wide as the image one."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    joint: dict[str, torch.Tensor] = {}
    if IMAGES in inputs:
        img = {IMAGES: inputs[IMAGES][:, :n_tokens]}
        joint.update(img)
        f = model.forward_features(img, layer=layer)[IMAGES].float()
        b = f.shape[0]
        out["embedding_images"] = (f.mean(1), torch.ones(b, dtype=torch.bool, device=f.device))
    spec = {k: v for k, v in inputs.items() if k.startswith(SPECTRA)}
    if spec:
        joint.update(spec)
        f = model.forward_features(spec, layer=layer)[SPECTRA].float()
        present = spec["spectra_present"].to(torch.bool)
        mask = spec["spectra_mask"] & present[:, None]
        out["embedding_spectra"] = (spectrum_pool(f, mask, spectrum_segments), present)
    if len(joint) > 1 and IMAGES in joint:
        fs = model.forward_features(joint, layer=layer)[SPECTRA].float()
        pooled = spectrum_pool(fs, mask, spectrum_segments)  # spectrum tokens that saw the image
        pooled = 0.5 * (pooled + out["embedding_spectra"][0])  # ... and the same tokens that did not
        # objects without a spectrum keep their image embedding (repeated once per segment, to the same width)
        image = out["embedding_images"][0].repeat(1, spectrum_segments)
        out["embedding_joint"] = (torch.where(present[:, None], pooled, image), out["embedding_images"][1])
    return out


def _load(model_path: str) -> tuple[AstroPT, dict, Path]:
    from astrolom.train.checkpoint import from_pretrained, read_config, resolve_model_dir

    model_dir = resolve_model_dir(model_path)
    return from_pretrained(model_dir), read_config(model_dir), model_dir


def source_settings(cfg_json: dict) -> dict:
    """`open_source` settings that read data as a model's run did: its split settings (data without a split
    column) and bands (`astrolom.model.pretrained.data_settings`), and spectra put on the model's wavelength grid
    (resampled, flux-conserving)."""
    settings: dict[str, Any] = data_settings(cfg_json)
    grid = ((cfg_json.get("tokens") or {}).get(SPECTRA) or {}).get("wavelength")
    if grid:
        settings["wavelength"] = tuple(grid)
    return settings


def model_records(
    data: str, cfg_json: dict, splits: Iterable[str], max_per_split: int | None = None
) -> Iterator[Record]:
    """The records of `splits` of `data`, split as the model's run split them and with spectra on its grid."""
    from astrolom.data.sources import open_source
    from astrolom.data.stream import RecordStream

    source = open_source(data, spectra=True, **source_settings(cfg_json))
    counts = source.split_counts()
    try:
        for s in splits:
            if counts.get(s, 0):
                it = RecordStream(source, split=s, shuffle=False, epochs=1)
                yield from (islice(it, max_per_split) if max_per_split else it)
    finally:
        source.close()


def batched_columns(
    embed: Callable[[list[Record]], dict[str, tuple[np.ndarray, np.ndarray]]], batch_size: int
) -> Callable[[Iterator[Record]], Iterator[tuple[list[Record], dict]]]:
    """`embed_batches` for `astrolom.eval.embed_job.write_embeddings` from a function of one batch of records."""

    def embed_batches(records: Iterator[Record]) -> Iterator[tuple[list[Record], dict]]:
        while batch := list(islice(records, batch_size)):
            yield batch, embed(batch)

    return embed_batches


def embed_multimodal_dataset(
    model_path: str,
    data: str,
    out: str | Path,
    *,
    splits: Iterable[str] = SPLITS,
    batch_size: int = 64,
    layer: int = DEFAULT_LAYER,
    n_tokens: int = DEFAULT_TOKENS,
    spectrum_segments: int = DEFAULT_SPECTRUM_SEGMENTS,
    max_per_split: int | None = None,
    skip_bad: bool = False,
    part_rows: int | None = None,
    resume: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Embed a data set with a multimodal model: one row per object, per-modality columns (module docstring).

    `spectrum_segments`: wavelength ranges of the spectrum readout (`spectrum_pool`); the default 8 is capped at the
    model's spectrum token count, a larger explicit value is refused. The file's recipe records the value used.
    `skip_bad`, `part_rows`, `resume`, ranks: as `astrolom.eval.embed.embed_dataset`."""
    from astrolom.data.sources import open_source
    from astrolom.eval.embed_job import check_splits, write_embeddings
    from astrolom.train import parallel

    model, cfg_json, model_dir = _load(model_path)
    if not model.config.multimodal:
        raise ValueError(f"{model_dir} is an images-only model: use `astrolom embed`")
    spectra = spectrum_tokeniser_from_config(cfg_json) if SPECTRA in model.config.modalities else None
    if spectra is not None and spectrum_segments > spectra.n_tokens:
        if spectrum_segments != DEFAULT_SPECTRUM_SEGMENTS:
            raise ValueError(
                f"{spectrum_segments} spectrum segments for {model_dir}, whose spectra make {spectra.n_tokens} tokens: "
                f"use at most {spectra.n_tokens}"
            )
        spectrum_segments = spectra.n_tokens  # the default, for a model with fewer tokens: one segment per token
    splits = check_splits(splits)
    env = parallel.read_env()
    rank = env.rank if rank is None else rank
    world_size = env.world_size if world_size is None else world_size
    recipe = EmbeddingRecipe(
        encoder="multimodal",
        model=str(model_dir),
        layer=layer,
        tokens=n_tokens,
        spectrum_segments=spectrum_segments,
        columns={EMBEDDING: "joint", **{c: c.split("_", 1)[1] for c in COLUMNS}},
    )
    meta = {"recipe": recipe.to_json(), "data": str(data), "splits": splits, "max_per_split": max_per_split,
            "skip_bad": skip_bad, "world_size": world_size, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip

    def embed(batch: list[Record]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        _, inputs = record_inputs(batch, model, cfg_json, spectra)
        embs = embed_multimodal(model, inputs, layer, n_tokens, spectrum_segments)
        return {k: (v.numpy(), p.numpy()) for k, (v, p) in embs.items()}

    source = open_source(data, spectra=True, skip_bad=skip_bad, **source_settings(cfg_json))
    try:
        return write_embeddings(out, meta, source, splits, batched_columns(embed, batch_size), rank=rank,
                                world_size=world_size, max_per_split=max_per_split, part_rows=part_rows,
                                resume=resume, alias="embedding_joint", progress=progress)  # fmt: skip
    finally:
        source.close()


def probe_modalities(
    path: str | Path,
    targets: Iterable[str] = ("redshift", "log_mstar", "log_ssfr"),
    *,
    fit_split: str = "val",
    test_split: str = "test",
    method: str = "linear",
) -> dict[str, dict[str, float]]:
    """Probe R² of each modality column on the objects that have every modality (the same objects for all).

    A summary of `astrolom.eval.probe_columns.probe_columns` (which returns full `ProbeResult`s): paper protocol, fit on
    `fit_split`, scored on `test_split`. Returns {column: {target: R²}} plus "_objects": {"fit": n, "test": n}.
    """
    cols = [c for c in COLUMNS if c in embedding_columns(path)]
    results = probe_columns(path, cols, list(targets), (method,), fit_split, test_split)
    out: dict[str, dict[str, float]] = {
        c: {t: r.score(t, "pretrained", method, "r2") for t in r.targets} for c, r in results.items()
    }
    pr = next(iter(results.values())).protocol
    out["_objects"] = {"fit": int(pr["n_fit"]), "test": int(pr["n_test"])}
    return out


# --- cross-modal generation ---------------------------------------------------------------------------------------
def _huber_per_object(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(pred.dtype)
    return (F.huber_loss(pred, true, reduction="none", delta=1.0) * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1.0)


def _mean_tokens(model, cfg_json, spectra, data, target, n, batch_size) -> torch.Tensor:
    """The training split's mean target tokens (per position and value, good values only): the baseline."""
    total = count = None
    it = model_records(data, cfg_json, ["train"], n)
    while batch := list(islice(it, batch_size)):
        _, inputs = record_inputs(batch, model, cfg_json, spectra)
        x = inputs[target]
        m = inputs.get(f"{target}_value_mask", torch.ones_like(x, dtype=torch.bool)).to(x.dtype)
        total = (x * m).sum(0) if total is None else total + (x * m).sum(0)
        count = m.sum(0) if count is None else count + m.sum(0)
    if total is None:
        raise ValueError(f"{data}: no training objects for the baseline")
    return total / count.clamp_min(1.0)


@torch.no_grad()
def evaluate_generation(
    model_path: str,
    data: str,
    source: str,
    target: str,
    out: str | Path,
    *,
    split: str = "test",
    n: int = 64,
    n_baseline: int = 512,
    image_tokens: int = 16,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Generate `target` from `source` for up to n objects of `split` that have both; metrics.json and a figure."""
    model, cfg_json, model_dir = _load(model_path)
    mods = model.config.modalities
    if {source, target} != {IMAGES, SPECTRA} or not set(mods) >= {source, target}:
        raise ValueError(f"--from/--to must be images and spectra (either way round); the model has {mods}")
    spectra = spectrum_tokeniser_from_config(cfg_json)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    baseline = _mean_tokens(model, cfg_json, spectra, data, target, n_baseline, batch_size)
    if target == IMAGES:
        baseline = baseline[:image_tokens]
    losses, base_losses, shown = [], [], []
    it = (r for r in model_records(data, cfg_json, [split], None) if r.spectrum is not None)
    done = 0
    while done < n and (batch := list(islice(it, min(batch_size, n - done)))):
        _, inputs = record_inputs(batch, model, cfg_json, spectra)
        cond = {k: v for k, v in inputs.items() if k == source or k.startswith(f"{source}_")}
        if target == SPECTRA:
            pred = model.generate_modality(cond, SPECTRA, positions=inputs["spectra_positions"][0])
            true, mask = inputs[SPECTRA], inputs["spectra_value_mask"]
        else:
            pred = model.generate_modality(cond, IMAGES, n_tokens=image_tokens)
            true = inputs[IMAGES][:, :image_tokens]
            mask = torch.ones_like(true, dtype=torch.bool)
        losses.append(_huber_per_object(pred, true, mask))
        base_losses.append(_huber_per_object(baseline.expand_as(true), true, mask))
        if target == SPECTRA and len(shown) < 4:
            shown += [(r, pred[i], inputs["spectra_value_mask"][i]) for i, r in enumerate(batch)][: 4 - len(shown)]
        done += len(batch)
    if not losses:
        raise ValueError(f"{data}: no objects with both modalities in split {split!r}")
    model_loss, base_loss = torch.cat(losses), torch.cat(base_losses)
    metrics = {
        "model": str(model_dir),
        "data": str(data),
        "from": source,
        "to": target,
        "split": split,
        "objects": int(model_loss.numel()),
        "huber_model": float(model_loss.mean()),
        "huber_mean_baseline": float(base_loss.mean()),
        "fraction_better_than_baseline": float((model_loss < base_loss).float().mean()),
    }
    if shown:
        lines = _emission_lines(data)
        metrics["figure"] = str(_spectra_figure(shown, spectra, lines, out / layout.GENERATED_SPECTRA_PNG))
    (out / layout.GENERATION_JSON).write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def _emission_lines(data: str) -> list[float]:
    """Rest-frame wavelengths (Å) of the emission lines the data set's metadata lists (the mock survey writes
    `emission_lines`); none for data sets that list none, whose figures then mark no lines."""
    from astrolom.data.sources import open_source

    source = open_source(data, spectra=False)
    try:
        return sorted(float(lam) for lam in (source.metadata.get("emission_lines") or {}).values())
    finally:
        source.close()


def _spectra_figure(shown, spectra: SpectrumTokeniser, lines: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wave = spectra.wavelength
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.2 * len(shown)), squeeze=False)
    for ax, (rec, pred, _) in zip(axes[:, 0], shown, strict=True):
        flux = detokenize_spectra(pred[None].float().cpu(), wave.size, spectra.patch, amplitude=spectra.amplitude)[0]
        ax.plot(wave, rec.spectrum, lw=0.5, color="0.5", label="true")
        ax.plot(wave, flux.numpy(), lw=0.8, color="C3", label="predicted from image")
        z = rec.labels.get("redshift")
        if z is not None:
            for lam in lines:
                if wave[0] < lam * (1 + z) < wave[-1]:
                    ax.axvline(lam * (1 + z), color="C0", lw=0.5, ls=":")
            ax.set_title(f"{rec.object_id}  z = {z:.3f}", fontsize=8)
        ax.set_ylabel("flux")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("observed wavelength (Å)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="RUN directory or model directory of a multimodal model")
    parser.add_argument("--data", required=True, help="data set with images and spectra")
    parser.add_argument("--from", dest="source", default=IMAGES, choices=(IMAGES, SPECTRA))
    parser.add_argument("--to", dest="target", default=SPECTRA, choices=(IMAGES, SPECTRA))
    parser.add_argument("--out", required=True, help="directory for metrics.json and the figure")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--n", type=int, default=64, help="objects to generate for")
    parser.add_argument("--image-tokens", type=int, default=16, help="image tokens to generate (--to images)")


def run(args: argparse.Namespace) -> int:
    m = evaluate_generation(
        args.model, args.data, args.source, args.target, args.out, split=args.split, n=args.n,
        image_tokens=args.image_tokens,
    )  # fmt: skip
    print(
        f"{m['from']} -> {m['to']} on {m['objects']} {m['split']} objects: Huber {m['huber_model']:.4f} "
        f"(mean-{m['to']} baseline {m['huber_mean_baseline']:.4f}); better than the baseline for "
        f"{100 * m['fraction_better_than_baseline']:.0f}% -> {args.out}/metrics.json"
    )
    return 0
