"""Flux-aware image tokens (ModelConfig.flux_features): per-band patch flux features next to standardised patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pretrain_helpers import TINY, write_blobs
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import cross_val_score

from astrolom.data import tokens as tok
from astrolom.data.batching import batch_tokens
from astrolom.data.records import Record
from astrolom.data.sources import PixelRecord, open_source
from astrolom.data.stream import RecordStream, tokenize_records
from astrolom.eval.embed import embed_records, embed_tokens
from astrolom.model.astropt import AstroPT, ModelConfig
from astrolom.train.pretrain import make_config
from astrolom.train.trainer import Trainer

P, C = 8, 3


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0.05, 0.02, (n, 16, 16, C)).astype(np.float32))


def test_features_are_asinh_of_per_band_patch_mean_and_std():
    images = _images(2)
    b = tok.tokenize(images, P)
    feats = tok.flux_features(b.tokens, b.mean, b.std, C, softening=0.01)  # (B, T, 2C)
    raw = tok.patchify(images, P)[:, tok.spiral_order(*b.grid)].view(2, -1, P * P, C)  # raw values per band
    expect = torch.cat([torch.asinh(raw.mean(2) / 0.01), torch.asinh(raw.std(2, unbiased=False) / 0.01)], -1)
    torch.testing.assert_close(feats, expect, rtol=1e-4, atol=1e-4)


def test_batch_tokens_appends_features_only_when_asked():
    recs = [Record(object_id=str(i), image=im.numpy()) for i, im in enumerate(_images(3))]
    batch = tokenize_records(recs, P)
    plain = batch_tokens(batch)
    assert plain.shape[-1] == P * P * C
    with_flux = batch_tokens(batch, flux_softening=0.01)
    assert with_flux.shape[-1] == P * P * C + 2 * C
    assert torch.equal(with_flux[..., : P * P * C], plain)  # the standardised values are untouched


def test_features_are_the_same_for_every_token_format():
    """8-bit records: tokens standardised on the CPU (float32) or where the model runs (pixels) agree exactly."""
    pix = np.random.default_rng(2).integers(0, 256, (3, 16, 16, C), dtype=np.uint8)
    recs = [PixelRecord(str(i), pixels=a) for i, a in enumerate(pix)]
    as_float = batch_tokens(tokenize_records(recs, P), flux_softening=0.01)
    as_pixels = batch_tokens(tokenize_records(recs, P, output="pixels"), flux_softening=0.01)
    assert torch.equal(as_float, as_pixels)


def test_flux_option_off_is_the_paper_model_and_on_only_adds_a_projection():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, patch_size=P, n_chan=C)
    torch.manual_seed(0)
    paper = AstroPT(cfg)
    torch.manual_seed(0)
    flux = AstroPT(ModelConfig(**{**vars(cfg), "flux_features": True}))
    extra = set(flux.state_dict()) - set(paper.state_dict())
    assert extra == {"flux_emb.weight"}
    for k, v in paper.state_dict().items():  # the paper modules draw the same initial weights
        assert torch.equal(v, flux.state_dict()[k]), k
    x = torch.randn(2, 8, cfg.input_dim)
    f = torch.randn(2, 8, 2 * C)
    with torch.no_grad():
        flux.flux_emb.weight.zero_()  # zero projection: exactly the paper model
        torch.testing.assert_close(flux(torch.cat([x, f], -1))[0], paper(x)[0])
        flux.flux_emb.weight.normal_(0, 0.02)
        a = flux(torch.cat([x, f], -1))[0]
        b = flux(torch.cat([x, f + 1.0], -1))[0]
        assert not torch.allclose(a, b)  # the features change the output when enabled
        # the loss is on the standardised values only: changing the targets' flux values changes nothing
        t = torch.randn(2, 8, cfg.input_dim)
        la = flux(torch.cat([x, f], -1), torch.cat([t, f], -1))[1]
        lb = flux(torch.cat([x, f], -1), torch.cat([t, f * 5], -1))[1]
        assert torch.equal(la, lb)
    with pytest.raises(ValueError, match="flux values"):
        flux(x)
    with pytest.raises(ValueError, match="images-only"):
        ModelConfig(modalities=("images", "spectra"), flux_features=True)


def test_flux_model_recovers_absolute_brightness_the_paper_tokeniser_cannot():
    """Scaled copies of one shape tokenise identically after per-patch standardisation; flux features keep the
    scale. Random-init models, so this is about what the tokens carry, not about training."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:16, :16] - 7.5
    n = 96
    log_flux = rng.uniform(-1, 1, n)
    recs = []
    for i in range(n):
        r2 = (xx**2 + (yy * rng.uniform(0.5, 1)) ** 2) / rng.uniform(4, 16)
        img = np.exp(-r2)[..., None] * np.array([0.5, 1.0, 1.5]) * 10 ** log_flux[i]
        recs.append(Record(object_id=str(i), image=img.astype(np.float32)))
    scores = {}
    for on in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=4, patch_size=P, n_chan=C, flux_features=on)
        model = AstroPT(cfg).eval()
        emb = np.concatenate([e for _, e in embed_records(model, recs, batch_size=32)])
        scores[on] = cross_val_score(RidgeCV(alphas=np.logspace(-4, 2, 7)), emb, log_flux, cv=4, scoring="r2").mean()
    assert scores[True] > 0.9
    assert scores[False] < 0.5


def test_train_and_embed_paths_give_the_same_features(tmp_path):
    data = write_blobs(tmp_path / "blobs", n=24)
    cfg = make_config(
        data=data,
        out=tmp_path / "run",
        max_steps=1,
        overrides=[*TINY, "model.flux_features=true", "train.batch_size=4", "train.eval_samples=4"],
    )
    trainer = Trainer(cfg)
    val = trainer.data.val[0]  # what the trainer validates on: (4, T, D + 2C)
    assert val.shape[-1] == trainer.model_config.input_dim + 2 * C
    stream = RecordStream(open_source(str(data)), split="val", shuffle=False, epochs=1)
    recs = [r for _, r in zip(range(4), stream, strict=False)]
    assert [r.object_id for r in recs] == trainer.data.val_ids[:4]
    model = trainer.model.eval()
    via_embed = np.concatenate([e for _, e in embed_records(model, recs, batch_size=4)])
    via_train = embed_tokens(model, val).numpy()
    np.testing.assert_allclose(via_embed, via_train, rtol=1e-5, atol=1e-6)
    trainer.data.close()
