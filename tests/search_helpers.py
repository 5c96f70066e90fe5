"""A tiny model + index over the mock survey fixture, shared by the search, serve and browser tests."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def make_model_index(survey: Path, tmp: Path, *, symmetrize: bool = True, scales=(4, 16, 64)) -> Path:
    """Embed `survey` with a random 2-layer AstroPT (8 px patches) and index it (flat, PCA map); returns IDX.

    The defaults are `astrolom index --model`'s: multi-scale, symmetry-pooled embeddings."""
    from astrolom.eval import embed as em
    from astrolom.model.astropt import AstroPT, ModelConfig
    from astrolom.model.pretrained import load_model, save_pretrained
    from astrolom.search.index import build_index

    torch.manual_seed(0)
    save_pretrained(AstroPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, patch_size=8)), tmp / "model")
    model, meta = load_model(str(tmp / "model"))
    emb = em.embed_dataset(
        model, str(survey), tmp / "emb.parquet", metadata=meta, symmetrize=symmetrize, scales=scales, progress=False
    )
    return build_index(emb, tmp / "index", map_method="pca", progress=False, log=None)


def make_aligned_index(survey: Path, tmp: Path) -> tuple[Path, Path]:
    """Two random encoders (images-only, spectra-only), a 12-step alignment run on `survey`, its shared-space
    embeddings (`astrolom embed` of the run) and their per-modality index; returns (IDX, RUN)."""
    from astrolom.align.embed import embed_aligned_dataset
    from astrolom.align.model import AlignConfig
    from astrolom.align.train import AlignTrainConfig, AlignTrainer
    from astrolom.data.multimodal import SpectrumTokeniser
    from astrolom.mock import spectrum_wavelength
    from astrolom.model.astropt import AstroPT, ModelConfig
    from astrolom.search.index import build_index
    from astrolom.train.checkpoint import save_pretrained

    torch.manual_seed(0)
    small = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, patch_size=8)
    img = save_pretrained(AstroPT(ModelConfig(**small)), tmp / "img", tokens={"patch_size": 8}, data={"image_size": 32})
    tok = SpectrumTokeniser(spectrum_wavelength(), patch=128)
    spec_cfg = ModelConfig(**small, modalities=("spectra",), spectrum_patch=128)
    spec = save_pretrained(AstroPT(spec_cfg), tmp / "spec", tokens={"spectra": tok.describe()})
    cfg = AlignTrainConfig(
        image_model=str(img),
        spectrum_model=str(spec),
        data=str(survey),
        out=str(tmp / "run"),
        steps=12,
        batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        views=1,
        eval_interval=6,
        checkpoint_interval=0,
        progress=False,
        head=AlignConfig(embed_dim=16, head_dim=16, n_heads=2),
    )
    AlignTrainer(cfg).fit()
    emb = embed_aligned_dataset(tmp / "run", str(survey), tmp / "aligned.parquet", progress=False)
    return build_index(emb, tmp / "aligned_index", map_method="pca", progress=False, log=None), tmp / "run"


def write_fits_spectrum(path: Path, wavelength, flux) -> Path:
    """A DESI-coadd-like FITS spectrum file (WAVELENGTH and FLUX image HDUs)."""
    import numpy as np
    from astropy.io import fits

    hdus = [fits.PrimaryHDU(), fits.ImageHDU(np.asarray(wavelength, np.float64), name="WAVELENGTH")]
    hdus.append(fits.ImageHDU(np.asarray(flux, np.float32), name="FLUX"))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


@contextlib.contextmanager
def serving(index_dir: Path, **kwargs):
    """`astrolom serve` of an index in a thread on a free 127.0.0.1 port (create_app kwargs); yields the base URL."""
    import socket
    import threading
    import time

    import uvicorn

    from astrolom.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(
        uvicorn.Config(create_app(index_dir, **kwargs), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):  # wait until it accepts connections (bounded)
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
