"""Embed a data set with a pretrained AstroPT: `astrolom embed --model RUN --data DIR --out EMB.parquet`.

An embedding is the paper's (sec. 3): the outputs of the penultimate transformer block averaged over the central 64
spiral tokens (`--layer`, `--tokens`; a model that sees fewer tokens averages all it sees). The model is causal and
the spiral prefix is the centre, so only the first `min(tokens, block_size)` spiral tokens are computed: stamps
larger than the training size are centre-cropped to the patches that prefix covers before tokenising (a 512x512
stamp with 16 px patches costs what its central 128x128 does), and its embedding is exactly that of the crop.

Output: the embedding table of `astrolom.eval.embeddings` (one Parquet row per object with `object_id`, `split`,
every label column of the data, and `embedding`), written batch by batch (memory does not depend on the data size);
its metadata holds the `EmbeddingRecipe` (model, layer, token count, scales, symmetry pooling) and the data.
`write_embeddings` (`astrolom.eval.embed_job`) is the one body every embedder writes through (this one, the
multimodal and the aligned).

Multi-scale embeddings (`--scales 4,16,64`; what `astrolom index --model` uses by default): the same layer's outputs
averaged over the central 4, 16 and 64 spiral tokens (2x2, 4x4 and 8x8 patches), each mean L2-normalised (after
the D4 average with `--symmetrize`), concatenated. The galaxy sits at the centre and the outer tokens are mostly sky,
so a single 64-token mean moves with every new noise draw; the pyramid weights the centre. Measured on the demo
model (README "The sky has no up"): a fresh-noise copy is found top-1 among 600 stamps 0.85 -> 0.96 of the time,
and the linear probes rise too.

At scale (docs/embeddings.md): `--part-rows N` writes a directory of parts of N objects, each renamed into place
when complete, with a progress file per rank; `--resume` continues a killed job after its last finished part. Under
torchrun every rank embeds its share of the records (record k goes to rank k % world size) into its own parts;
`load_embeddings` and `astrolom index` read the file or the directory alike.

    astrolom embed --model runs/1m --data mock --out emb.parquet --splits val,test
    astrolom embed --model RUN --data DIR --out emb --part-rows 100000 [--resume]
    torchrun --nproc_per_node 8 -m astrolom embed --model RUN --data DIR --out emb
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from astrolom.config import comma_list
from astrolom.data.batching import batch_tokens
from astrolom.data.records import Record
from astrolom.data.tokens import PAPER2024, center_crop, eight_bit, prefix_crop, tokenize_paper2024
from astrolom.eval.embed_job import DEFAULT_PART_ROWS, check_splits, write_embeddings
from astrolom.eval.recipe import EmbeddingRecipe
from astrolom.log import get_logger
from astrolom.model.astropt import AstroPT
from astrolom.train import parallel

log = get_logger(__name__)

DEFAULT_TOKENS = 64
DEFAULT_LAYER = -2
# only the central <= 64 tokens are computed, so big batches stay small in memory; on CPU 256 is ~1.5x faster than
# 64 per galaxy (per-op overhead amortised; benchmarks/embed_speed.py)
DEFAULT_BATCH = 256


def tokens_used(model: AstroPT, available: int, n_tokens: int = DEFAULT_TOKENS) -> int:
    """How many spiral tokens an embedding averages: the central `n_tokens`, capped by what the model and stamp hold."""
    if n_tokens <= 0:
        raise ValueError(f"the token count must be positive, got {n_tokens}")
    return min(n_tokens, model.config.block_size, available)


def parse_scales(text: str | None) -> tuple[int, ...] | None:
    """'4,16,64' -> (4, 16, 64); None, '' or 'none' -> None (the paper's single mean over --tokens)."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    try:
        scales = comma_list(text, int, "scales")
    except ValueError:
        raise ValueError(f"scales must be comma-separated token counts such as 4,16,64, got {text!r}") from None
    if not scales or min(scales) <= 0 or list(scales) != sorted(set(scales)):
        raise ValueError(f"scales must be increasing positive token counts such as 4,16,64, got {text!r}")
    return scales


@torch.inference_mode()  # no autograd bookkeeping at all: ~15% less CPU time than no_grad for a small model
def embed_tokens(
    model: AstroPT,
    tokens: torch.Tensor,
    layer: int = DEFAULT_LAYER,
    n_tokens: int = DEFAULT_TOKENS,
    scales: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """(B, T, D) spiral tokens -> (B, C) mean of layer `layer`'s outputs over the first `n_tokens` tokens.

    With `scales`: (B, C * len(scales)), the means over the first s tokens for each s (capped like `n_tokens`),
    not yet normalised (`normalise_scales` does that, after any D4 average). Only the first tokens are run through
    the model: with causal attention their outputs do not depend on later ones.
    """
    n = tokens_used(model, tokens.shape[1], max(scales) if scales else n_tokens)
    feats = model.forward_features(tokens[:, :n], layer=layer).float()  # (B, n, C)
    if not scales:
        return feats.mean(dim=1)
    return torch.cat([feats[:, : min(s, n)].mean(dim=1) for s in scales], dim=1)


def normalise_scales(emb: torch.Tensor, n_scales: int) -> torch.Tensor:
    """L2-normalise each of the `n_scales` equal blocks of (B, C * n_scales) multi-scale embeddings."""
    blocks = emb.reshape(emb.shape[0], n_scales, -1)
    return torch.nn.functional.normalize(blocks, dim=-1).reshape(emb.shape)


def embed_records(
    model: AstroPT,
    records: Iterable[Record],
    *,
    batch_size: int = DEFAULT_BATCH,
    layer: int = DEFAULT_LAYER,
    n_tokens: int = DEFAULT_TOKENS,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    symmetrize: bool = False,
    scales: tuple[int, ...] | None = None,
) -> Iterator[tuple[list[Record], np.ndarray]]:
    """Yield (records, embeddings (B, C) float32) batch by batch; records of one batch share an image shape.

    symmetrize: average each embedding over the 8 rotations/mirrors of the stamp (`astrolom.data.augment`).
    scales: multi-scale embeddings (module docstring), (B, C * len(scales)); `n_tokens` is then unused.
    """
    from astrolom.data.stream import tokenize_records

    device = torch.device(device)
    p = model.config.patch_size
    precision = parallel.resolve_precision(precision, device)
    # the trainer's own token maker (batch_tokens), so a flux-aware model sees the features it was trained with
    flux = model.config.flux_softening if model.config.flux_features else None
    it = iter(records)
    pending: list[Record] = []
    while True:
        pending += list(islice(it, batch_size - len(pending)))
        if not pending:
            return
        shape = _shape(pending[0])
        batch = [r for r in pending if _shape(r) == shape]  # mixed stamp sizes: one size per batch
        pending = [r for r in pending if _shape(r) != shape]
        h, w = shape[0] - shape[0] % p, shape[1] - shape[1] % p
        n = tokens_used(model, (h // p) * (w // p), max(scales) if scales else n_tokens)
        crop = prefix_crop(h, w, p, n)
        if model.config.tokens_preset == PAPER2024:
            if symmetrize:
                raise ValueError("symmetrized embeddings are not defined for the paper2024 tokens preset")
            tb = {"tokens": _paper2024_tokens(batch, p, crop)}
        else:
            tb = tokenize_records(batch, p, image_size=crop)

        def embed(b: dict, n: int = n) -> torch.Tensor:
            return embed_tokens(model, batch_tokens(b, device, flux_softening=flux), layer, n, scales)

        with parallel.autocast(precision, device):
            emb = symmetrized(embed, tb) if symmetrize else embed(tb)
        if scales:
            emb = normalise_scales(emb.float(), len(scales))
        yield batch, emb.cpu().numpy().astype(np.float32)


def _paper2024_tokens(records: list[Record], patch_size: int, crop: tuple[int, int]) -> torch.Tensor:
    """Tokens of an imported paper model (`tokens.tokenize_paper2024`) from the records' 8-bit pixels."""
    pixels = []
    for r in records:
        arr = getattr(r, "pixels", None)  # the decoded uint8 values when the reader kept them
        try:
            pixels.append(eight_bit(center_crop(r.image if arr is None else arr, size=crop)))
        except ValueError as err:
            raise ValueError(f"{r.object_id}: {err}") from None
    return tokenize_paper2024(torch.stack(pixels), patch_size)


def symmetrized(embed: Callable[[dict], torch.Tensor], batch: dict) -> torch.Tensor:
    """Mean of `embed` over the D4 transforms of a token batch (the 4 shape-keeping ones for non-square grids).

    The tokens and their patch mean/std move together, so a flux-aware model's features follow the transform.
    """
    from astrolom.data.augment import d4_tokens, group_for

    grid, p = tuple(batch["grid"]), batch["patch_size"]
    if "tokens" not in batch:
        raise ValueError("symmetrized embeddings need float tokens (not the pixels output)")
    group = group_for(*grid)
    total = 0
    for t in group:
        moved = dict(batch, **{k: d4_tokens(batch[k], grid, p, t) for k in ("tokens", "mean", "std")})
        total = total + embed(moved)
    return total / len(group)


def _shape(record: Record) -> tuple[int, ...]:
    # encoded 8-bit records know their shape without making the float image
    return tuple(record.shape) if isinstance(getattr(record, "shape", None), tuple) else tuple(record.image.shape)


def embed_dataset(
    model: AstroPT,
    data: str,
    out: str | Path,
    *,
    splits: Iterable[str] | None = None,
    batch_size: int = DEFAULT_BATCH,
    layer: int = DEFAULT_LAYER,
    n_tokens: int = DEFAULT_TOKENS,
    device: str | torch.device | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    metadata: dict | None = None,
    max_per_split: int | None = None,
    symmetrize: bool = False,
    scales: tuple[int, ...] | None = None,
    skip_bad: bool = False,
    part_rows: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Embed `splits` (default all) of the data set at `data` into Parquet at `out`; returns the path written.

    `max_per_split` keeps the first N records of each split in file order (the same objects on every run).
    `metadata` (from `load_model`) goes into the file: the model directory, random-init seed and the run's
    split settings (data.split_fractions / split_seed, which decide the splits of data sets that have no split
    column). `skip_bad`: skip unreadable records (listed with the embeddings) instead of failing. `part_rows` /
    `resume` and torchrun: a resumable parts directory (`write_embeddings`).
    """
    from astrolom.data.sources import open_source

    env = parallel.read_env()
    rank = env.rank if rank is None else rank
    world_size = env.world_size if world_size is None else world_size
    if device is None:
        device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model = model.to(device).eval()
    splits = check_splits(splits)
    if model.config.multimodal:
        raise ValueError(f"{(metadata or {}).get('model')}: a multimodal model; embed it with `astrolom embed`")
    # data without a split column is split by a hash of the object id: use the settings the model trained with
    split_settings = dict((metadata or {}).get("split_settings") or {})
    if "split_fractions" in split_settings:
        split_settings["split_fractions"] = tuple(split_settings["split_fractions"])
    extra = dict(metadata or {})
    recipe = EmbeddingRecipe(
        encoder="astropt",
        model=extra.pop("model", None),
        layer=layer,
        tokens=max(scales) if scales else n_tokens,
        scales=scales,
        symmetrize=symmetrize,
        random_init=bool(extra.pop("random_init", False)),
        seed=extra.pop("seed", None),
    )
    meta = {
        "recipe": recipe.to_json(),
        "data": str(data),
        "layer_index": layer % model.config.n_layer if layer < 0 else layer,
        "n_layer": model.config.n_layer,
        "splits": splits,
        "max_per_split": max_per_split,
        "skip_bad": skip_bad,
        "world_size": world_size,
        "model_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(model.config).items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }

    def embed_batches(records: Iterator[Record]) -> Iterator[tuple[list[Record], np.ndarray]]:
        yield from embed_records(model, records, batch_size=batch_size, layer=layer, n_tokens=n_tokens,
                                 device=device, symmetrize=symmetrize, scales=scales)  # fmt: skip

    source = open_source(data, spectra=False, skip_bad=skip_bad, **split_settings)
    t0 = time.perf_counter()
    try:
        path = write_embeddings(out, meta, source, splits, embed_batches, rank=rank, world_size=world_size,
                                max_per_split=max_per_split, part_rows=part_rows, resume=resume,
                                progress=progress)  # fmt: skip
    finally:
        source.close()
    log.info("embedded %s in %.1f s -> %s", data, time.perf_counter() - t0, path)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="RUN directory (its final/ model) or a model directory")
    parser.add_argument("--data", required=True, help="data set to embed (any format astrolom reads)")
    parser.add_argument("--out", required=True, help="EMB.parquet (a directory of per-rank parts under torchrun)")
    parser.add_argument("--splits", default="train,val,test", help="comma-separated splits to embed")
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="block whose outputs are averaged (default -2, the paper's penultimate block; -1, the final block, for "
        "multimodal models: README 'Spectra')",
    )
    parser.add_argument("--tokens", type=int, default=None, help="central spiral tokens averaged (default 64)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help=f"stamps per forward (default {DEFAULT_BATCH}; 64 with spectra)"
    )
    parser.add_argument("--max-per-split", type=int, default=None, help="embed only the first N objects per split")
    parser.add_argument("--device", default=None, help="cpu / cuda / cuda:1 (default: this rank's GPU, else CPU)")
    parser.add_argument(
        "--random-init", action="store_true", help="embed with a randomly initialised model of the same config"
    )
    parser.add_argument("--seed", type=int, default=0, help="init seed for --random-init")
    parser.add_argument(
        "--symmetrize", action="store_true", help="average over the 8 rotations/mirrors (orientation-invariant)"
    )
    parser.add_argument(
        "--scales",
        default=None,
        help="multi-scale embeddings: means over these central token counts, each L2-normalised, concatenated "
        "(e.g. 4,16,64; `astrolom index --model`'s default); default: the paper's single mean over --tokens",
    )
    parser.add_argument(
        "--spectrum-segments",
        type=int,
        default=None,
        help="models with spectra: the spectrum and joint embeddings are the means over this many equal wavelength "
        "ranges of the spectrum's tokens, concatenated (default 8, at most the model's spectrum tokens; 1 = one mean "
        "over all tokens; README 'Fibre apertures')",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable records (truncated or corrupt files, wrong shapes) instead of failing; they are listed "
        "with the embeddings and counted in an index built from them",
    )
    parser.add_argument(
        "--part-rows",
        type=int,
        default=None,
        help="write --out as a directory of parts of this many objects, each complete on disk, so that a killed job "
        f"can --resume (always parts under torchrun, {DEFAULT_PART_ROWS:,} a part unless given)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted parts directory after its last finished part"
    )
    parser.add_argument("--no-progress", action="store_true")
