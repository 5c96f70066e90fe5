"""Alignment on real encoders and a real (tiny) mock survey: feature extraction, frozen and fine-tuned training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from astrolom.align.features import FeatureCache, extract_features
from astrolom.align.model import AlignConfig
from astrolom.align.train import AlignTrainConfig, AlignTrainer
from astrolom.data.multimodal import SpectrumTokeniser
from astrolom.mock import generate_survey, spectrum_wavelength
from astrolom.model.astropt import AstroPT, ModelConfig
from astrolom.train.checkpoint import save_pretrained

PATCH = 128
pytestmark = pytest.mark.slow  # a GalSim survey and two encoders: ~50 s on the shared 2-core box


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    survey = generate_survey(root / "survey", n=48, size=32, seed=5, workers=1, progress=False)
    torch.manual_seed(0)
    small = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, patch_size=8)
    img = save_pretrained(
        AstroPT(ModelConfig(**small)), root / "img", tokens={"patch_size": 8}, data={"image_size": 32}
    )
    tok = SpectrumTokeniser(spectrum_wavelength(), patch=PATCH)
    spec_cfg = ModelConfig(**small, modalities=("spectra",), spectrum_patch=PATCH)
    spec = save_pretrained(AstroPT(spec_cfg), root / "spec", tokens={"spectra": tok.describe()})
    return survey, img, spec


def test_features_of_real_encoders(encoders, tmp_path):
    survey, img, spec = encoders
    cache = extract_features(str(img), str(spec), str(survey), views=3, progress=False)
    n = len(cache.object_ids)
    assert 20 < n < 48  # only objects with a spectrum are pairs
    assert cache.image_tokens.shape == (n, 3, 16, 32)  # 32x32 stamps in 8x8 patches: 16 tokens
    assert cache.spectrum_tokens.shape[0] == n and cache.spectrum_mask.any(1).all()
    # views 1, 2 are rotations with noise: different features from the stamp itself
    assert (cache.image_tokens[:, 1] - cache.image_tokens[:, 0]).abs().mean() > 1e-3
    assert set(cache.label_names) >= {"redshift", "log_mstar", "log_ssfr", "log_zstar", "age_mw_gyr"}
    wave = cache.meta["wavelength"]  # Å grid of the cached spectra: the figures' x axis
    assert len(wave) == cache.spectra.shape[1] and wave[0] == pytest.approx(3600) and wave[-1] == pytest.approx(9800)
    back = FeatureCache.load(cache.save(tmp_path / "f.safetensors"))
    assert back.meta["wavelength"] == wave
    assert back.meta["bands"] == ["g", "r", "z"]  # the figures render the cached stamps by band name
    assert back.object_ids == cache.object_ids and torch.equal(back.image_tokens, cache.image_tokens)
    with pytest.raises(ValueError, match="pretrained on spectra alone"):
        extract_features(str(img), str(img), str(survey), progress=False)


def test_finetune_backbones_moves_encoders_at_their_own_rate(encoders, tmp_path):
    survey, img, spec = encoders
    cfg = AlignTrainConfig(
        image_model=str(img),
        spectrum_model=str(spec),
        data=str(survey),
        out=str(tmp_path),
        steps=2,
        batch_size=8,
        lr=1e-3,
        backbone_lr=1e-4,
        views=2,
        eval_interval=2,
        checkpoint_interval=0,
        progress=False,
        finetune_backbones=True,
        head=AlignConfig(embed_dim=16, head_dim=16, n_heads=2),
    )
    trainer = AlignTrainer(cfg)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 1e-4]
    res = trainer.fit()
    assert np.isfinite(res["loss"]) and np.isfinite(res["val_loss"])
    final = load_file(str(tmp_path / "final" / "model.safetensors"))
    before = load_file(str(img / "model.safetensors"))
    key = next(k for k in before if k.endswith("weight") and before[k].ndim == 2)
    assert (final["backbones.image." + key] - before[key]).abs().max() > 0  # the image encoder was trained
    # eval-align scores a fine-tuned run with its own encoders, not with the frozen features of the cache
    from astrolom.align.encoder import has_tuned_backbones, load_aligned, load_encoder
    from astrolom.align.evaluate import aligned_embeddings, tuned_embeddings
    from astrolom.align.features import FeatureCache

    encoder = load_encoder(tmp_path / "final")
    assert encoder.tuned and has_tuned_backbones(tmp_path / "final")
    cache = FeatureCache.load(next(tmp_path.glob("*.safetensors")))
    tuned = tuned_embeddings(encoder, cache)
    frozen = aligned_embeddings(load_aligned(tmp_path / "final")[0], cache)
    assert tuned["images"].shape == frozen["images"].shape
    assert np.abs(tuned["images"] - frozen["images"]).max() > 1e-6  # the tuned encoder moved the embeddings
    # the same frozen encoders would reproduce the cached-feature path exactly
    encoder.tuned = False
    for m, frozen_m in zip((img, spec), (encoder.image, encoder.spectrum), strict=True):
        frozen_m.load_state_dict(load_file(str(m / "model.safetensors")))
    again = tuned_embeddings(encoder, cache)
    np.testing.assert_allclose(again["images"], frozen["images"], atol=1e-5)
    np.testing.assert_allclose(again["spectra"], frozen["spectra"], atol=1e-5)


def test_flux_aware_image_encoder_reads_its_flux_features():
    """An encoder pretrained with flux-aware tokens (the demo's) gets them in alignment features too."""
    from astrolom.align.features import image_token_features
    from astrolom.data.batching import batch_tokens
    from astrolom.data.stream import tokenize_records
    from astrolom.mock import generate_objects

    torch.manual_seed(0)
    model = AstroPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, patch_size=8, flux_features=True))
    recs = generate_objects(3, size=32, seed=1)
    feats = image_token_features(model.eval(), {"data": {"image_size": 32}}, recs, n_tokens=16)
    tokens = batch_tokens(tokenize_records(recs, 8, image_size=32), flux_softening=model.config.flux_softening)
    assert tokens.shape[-1] == 8 * 8 * 3 + 6  # standardised patch + per-band asinh mean and std
    torch.testing.assert_close(feats, model.forward_features(tokens).float())
