"""`astrolom embed --model RUN --data DIR --out EMB.parquet`: embed a data set with whatever encoder RUN holds.

`load_encoder` (`astrolom.align.encoder`) says what that is, and `embed` goes to its embedder:

- an images-only AstroPT: `astrolom.eval.embed` (the paper's readout; `--scales`, `--symmetrize`, `--random-init`);
- an images + spectra AstroPT: `astrolom.eval.multimodal` (per-modality and joint columns);
- an alignment run: its shared space (`embed_aligned_dataset` below). One row per object of the data set (with or
  without a spectrum): `embedding_images`, `embedding_spectra` (null without a usable spectrum) and `embedding`
  (= the image one, so every tool that reads `embedding` uses it unchanged).

All three write through one body (`astrolom.eval.embed_job.write_embeddings`) and record their `EmbeddingRecipe`, so
that `astrolom index` builds one index per modality and `astrolom search` embeds new images and spectra the same
way. `astrolom index --model` embeds through `embed_with` here too. `--skip-bad` skips unreadable records (listed
with the embeddings and carried into the index); `--part-rows N` writes a resumable parts directory and
`--resume` continues a killed job; under torchrun every rank writes its own parts (docs/embeddings.md).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from astrolom.align.encoder import AlignedEncoder, ModelEncoder, load_encoder, record_flux
from astrolom.config import comma_list
from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.data.records import SPLITS, Record
from astrolom.eval.embeddings import embedding_metadata
from astrolom.eval.multimodal import batched_columns, source_settings
from astrolom.eval.recipe import EMBEDDING, EmbeddingRecipe, recipe_of

COLUMNS = {EMBEDDING: IMAGES, "embedding_images": IMAGES, "embedding_spectra": SPECTRA}
# what `astrolom embed` says it wrote, by encoder kind
WRITTEN = {
    "astropt": "",
    "multimodal": " (images, spectra, joint columns)",
    "aligned": " in the aligned space (images, spectra columns)",
}


def aligned_recipe(run: str | Path, cfg: dict) -> EmbeddingRecipe:
    """The recipe of the embeddings of alignment run `run` (config.json `cfg`), so that an index built on them
    embeds new queries with the same run (`astrolom search --image/--spectrum`)."""
    tokens = int((cfg.get("features") or {}).get("tokens") or 64)
    return EmbeddingRecipe(encoder="aligned", model=str(Path(run).resolve()), tokens=tokens, columns=dict(COLUMNS))


def embed_aligned_dataset(
    run: str | Path | AlignedEncoder,
    data: str,
    out: str | Path,
    *,
    splits: Iterable[str] = SPLITS,
    batch_size: int = 64,
    max_per_split: int | None = None,
    skip_bad: bool = False,
    part_rows: int | None = None,
    resume: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Embed every object of `splits` of `data` into the shared space of an alignment run (module docstring).

    `skip_bad`, `part_rows`, `resume`, ranks: as `astrolom.eval.embed.embed_dataset`."""
    from astrolom.data.sources import open_source
    from astrolom.eval.embed_job import check_splits, write_embeddings
    from astrolom.train import parallel

    enc = run if isinstance(run, AlignedEncoder) else load_encoder(run)
    if not isinstance(enc, AlignedEncoder):
        raise ValueError(f"{run}: not an alignment run")
    splits = check_splits(splits)
    env = parallel.read_env()
    rank = env.rank if rank is None else rank
    world_size = env.world_size if world_size is None else world_size
    cfg = enc.config
    meta = {
        "recipe": aligned_recipe(enc.run, enc.config).to_json(),
        "image_model": (cfg.get("features") or {}).get("image_model"),
        "spectrum_model": (cfg.get("features") or {}).get("spectrum_model"),
        "embed_dim": (cfg.get("align") or {}).get("embed_dim"),
        "data": str(data),
        "splits": splits,
        "max_per_split": max_per_split,
        "skip_bad": skip_bad,
        "world_size": world_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    dim = enc.heads.config.embed_dim

    def embed(batch: list[Record]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        img = enc.embed_images(batch)
        flux = [record_flux(r) if r.spectrum is not None else None for r in batch]
        has = np.array([f is not None and bool(np.isfinite(f).any()) for f in flux])
        spec = np.zeros((len(batch), dim), np.float32)
        if has.any():
            rows = np.flatnonzero(has)
            spec[rows] = enc.embed_spectra([flux[i] for i in rows], [str(batch[i].object_id) for i in rows])
        return {"embedding_images": (img, np.ones(len(batch), bool)), "embedding_spectra": (spec, has)}

    # the image run's split settings, the spectrum run's wavelength grid
    settings = source_settings({"data": enc.image_cfg.get("data") or {}, "tokens": enc.spectrum_cfg.get("tokens")})
    source = open_source(data, spectra=True, skip_bad=skip_bad, **settings)
    try:
        return write_embeddings(out, meta, source, splits, batched_columns(embed, batch_size), rank=rank,
                                world_size=world_size, max_per_split=max_per_split, part_rows=part_rows,
                                resume=resume, alias="embedding_images", desc="embed[aligned]",
                                progress=progress)  # fmt: skip
    finally:
        source.close()


def embed_with(
    model: str | Path | ModelEncoder | AlignedEncoder,
    data: str,
    out: str | Path,
    *,
    splits: Iterable[str] = SPLITS,
    batch_size: int | None = None,
    layer: int | None = None,
    tokens: int | None = None,
    scales: tuple[int, ...] | None = None,
    symmetrize: bool = False,
    spectrum_segments: int | None = None,
    random_init: bool = False,
    seed: int = 0,
    device: str | None = None,
    max_per_split: int | None = None,
    skip_bad: bool = False,
    part_rows: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Embed `data` with the encoder at `model` (an AstroPT of any modalities, or an alignment run; or the encoder
    `load_encoder` made of one); returns the embeddings written at `out`. Options that do not apply to that encoder
    are refused, naming it; None means the encoder's default (layer -2 for images-only models, -1 for multimodal
    ones; 64 tokens)."""
    from astrolom.eval import embed as em
    from astrolom.eval import multimodal as mm

    if isinstance(model, ModelEncoder | AlignedEncoder):
        enc, model = model, model.path
        if random_init:
            raise ValueError("random_init: pass the model's path, so that its control is made from its config")
    else:  # an alignment run has no random-init control: load_encoder refuses it
        enc = load_encoder(model, random_init=random_init, seed=seed)
    common = dict(splits=splits, max_per_split=max_per_split, skip_bad=skip_bad, part_rows=part_rows,
                  resume=resume, progress=progress)  # fmt: skip
    if isinstance(enc, AlignedEncoder):
        unused = _given(layer=layer, tokens=tokens, scales=scales, symmetrize=symmetrize,
                        spectrum_segments=spectrum_segments)  # fmt: skip
        if unused:
            raise ValueError(f"{model}: {', '.join(unused)} {'do' if len(unused) > 1 else 'does'} not apply to an "
                             "alignment run")  # fmt: skip
        return embed_aligned_dataset(enc, data, out, batch_size=min(batch_size or 64, 64), **common)
    assert isinstance(enc, ModelEncoder)
    if enc.kind == "multimodal":
        unused = _given(scales=scales, symmetrize=symmetrize, random_init=random_init)
        if unused:
            raise ValueError(f"{model}: {', '.join(unused)} not supported for multimodal models yet")
        kw = {k: v for k, v in (("layer", layer), ("n_tokens", tokens), ("spectrum_segments", spectrum_segments))
              if v is not None}  # fmt: skip
        return mm.embed_multimodal_dataset(str(enc.path), data, out, batch_size=batch_size or 64, **kw, **common)
    if spectrum_segments is not None:
        raise ValueError(f"--spectrum-segments: {model} has no spectra (modalities {enc.model.config.modalities})")
    return em.embed_dataset(
        enc.model,
        data,
        out,
        batch_size=batch_size or em.DEFAULT_BATCH,
        layer=em.DEFAULT_LAYER if layer is None else layer,
        n_tokens=em.DEFAULT_TOKENS if tokens is None else tokens,
        device=device,
        metadata=enc.meta,
        symmetrize=symmetrize,
        scales=scales,
        **common,
    )


def _given(**options) -> list[str]:
    return [f"--{k.replace('_', '-')}" for k, v in options.items() if v not in (None, False)]


# ----------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from astrolom.eval import embed

    embed.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from astrolom.eval.embed import parse_scales

    path = embed_with(
        args.model,
        args.data,
        args.out,
        splits=list(comma_list(args.splits, name="--splits")),
        batch_size=args.batch_size,
        layer=args.layer,
        tokens=args.tokens,
        scales=parse_scales(args.scales),
        symmetrize=args.symmetrize,
        spectrum_segments=args.spectrum_segments,
        random_init=args.random_init,
        seed=args.seed,
        device=args.device,
        max_per_split=args.max_per_split,
        skip_bad=args.skip_bad,
        part_rows=args.part_rows,
        resume=args.resume,
        progress=not args.no_progress,
    )
    print(f"embedded{WRITTEN[recipe_of(embedding_metadata(path)).encoder]} -> {path}")
    return 0
