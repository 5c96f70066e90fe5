"""A tiny model + index over the mock survey fixture, shared by the search, serve and browser tests."""

from __future__ import annotations

from pathlib import Path

import torch


def make_model_index(survey: Path, tmp: Path, *, symmetrize: bool = True) -> Path:
    """Embed `survey` with a random 2-layer AstroPT (8 px patches) and index it (flat, PCA map); returns IDX."""
    from astrolom.eval import embed as em
    from astrolom.model.astropt import AstroPT, ModelConfig
    from astrolom.model.pretrained import load_model, save_pretrained
    from astrolom.search.index import build_index

    torch.manual_seed(0)
    save_pretrained(AstroPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, patch_size=8)), tmp / "model")
    model, meta = load_model(str(tmp / "model"))
    emb = em.embed_dataset(
        model, str(survey), tmp / "emb.parquet", metadata=meta, symmetrize=symmetrize, progress=False
    )
    return build_index(emb, tmp / "index", map_method="pca", progress=False, log=None)
