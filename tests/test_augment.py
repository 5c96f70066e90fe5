"""The 8 symmetries of the square: token-space transforms, symmetry-pooled embeddings, the pretraining option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from astrolom.data import tokens as tok
from astrolom.data.augment import D4_SIZE, d4, d4_batch, d4_tokens, group_for, random_d4_batch, turns_then_mirror


@pytest.mark.parametrize("t", range(D4_SIZE))
def test_token_transform_equals_tokenising_the_transformed_image(t):
    img = torch.randn(3, 32, 32, 3)
    tb = tok.tokenize(img, 8)
    ref = tok.tokenize(d4(img, t, axes=(1, 2)), 8)
    torch.testing.assert_close(d4_tokens(tb.tokens, tb.grid, 8, t), ref.tokens)
    torch.testing.assert_close(d4_tokens(tb.mean, tb.grid, 8, t), ref.mean)
    torch.testing.assert_close(d4_tokens(tb.std, tb.grid, 8, t), ref.std)


def _turns_then_mirror_reference(x: torch.Tensor, turns: int, mirror: bool, axes=(0, 1)) -> torch.Tensor:
    """How fine-tuning, the CNN baseline and alignment transformed stamps in their own copies: rotate, then mirror."""
    x = torch.rot90(x, turns, dims=axes)
    return torch.flip(x, dims=(axes[1],)) if mirror else x


def test_turns_then_mirror_names_the_transform_the_old_copies_made():
    img = torch.arange(5 * 5 * 3).reshape(5, 5, 3)
    made = set()
    for turns in range(4):
        for mirror in (False, True):
            e = turns_then_mirror(turns, mirror)
            assert torch.equal(d4(img, e), _turns_then_mirror_reference(img, turns, mirror))
            made.add(e)
    assert made == set(range(D4_SIZE))
    # per sample in a batch (fine-tuning), and on the (H, W) axes of a (B, C, H, W) batch (CNN baseline)
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(32, 6, 6, 2, generator=g)
    turns, mirror = torch.randint(4, (32,), generator=g), torch.randint(2, (32,), generator=g).bool()
    got = d4_batch(batch, turns_then_mirror(turns, mirror), axes=(1, 2))
    for i in range(32):
        want = _turns_then_mirror_reference(batch[i], int(turns[i]), bool(mirror[i]))
        assert torch.equal(got[i], want), i
    chw = batch.permute(0, 3, 1, 2)
    assert torch.equal(d4(chw, turns_then_mirror(3, True), axes=(2, 3)),
                       _turns_then_mirror_reference(chw, 3, True, axes=(2, 3)))  # fmt: skip


def test_group_elements_are_distinct_and_closed():
    img = np.random.default_rng(0).normal(size=(6, 6, 2))
    seen = [d4(img, t) for t in range(D4_SIZE)]
    assert len({s.tobytes() for s in seen}) == 8
    for t in range(D4_SIZE):  # each element has an inverse in the group
        assert any(np.array_equal(d4(seen[t], u), img) for u in range(D4_SIZE))
    assert group_for(4, 6) == (0, 2, 4, 6)
    with pytest.raises(ValueError, match="non-square"):
        d4_tokens(torch.zeros(1, 6, 12), (2, 3), 2, 1)
    with pytest.raises(ValueError):
        d4(img, 8)


def test_symmetrized_embeddings_are_invariant():
    from astrolom.data.records import Record
    from astrolom.eval.embed import embed_records
    from astrolom.model.astropt import AstroPT, ModelConfig

    torch.manual_seed(0)
    m = AstroPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, patch_size=8)).eval()
    img = np.random.default_rng(1).normal(size=(32, 32, 3)).astype(np.float32)
    recs = [Record(str(t), d4(img, t)) for t in range(D4_SIZE)]
    (_, plain), = embed_records(m, recs)  # fmt: skip
    (_, pooled), = embed_records(m, recs, symmetrize=True)  # fmt: skip
    assert np.abs(plain - plain[0]).max() > 1e-3  # the plain model does see orientation
    np.testing.assert_allclose(pooled, np.broadcast_to(pooled[0], pooled.shape), atol=1e-5)


def test_symmetrized_embeddings_of_a_flux_aware_model_are_invariant():
    from astrolom.data.records import Record
    from astrolom.eval.embed import embed_records
    from astrolom.model.astropt import AstroPT, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, patch_size=8, flux_features=True)
    m = AstroPT(cfg).eval()
    img = np.random.default_rng(2).normal(size=(32, 32, 3)) * 0.05 + np.linspace(0, 1, 32)[:, None, None]
    recs = [Record(str(t), d4(img.astype(np.float32), t)) for t in range(D4_SIZE)]
    (_, plain), = embed_records(m, recs)  # fmt: skip
    (_, pooled), = embed_records(m, recs, symmetrize=True)  # fmt: skip
    assert np.abs(plain - plain[0]).max() > 1e-3
    np.testing.assert_allclose(pooled, np.broadcast_to(pooled[0], pooled.shape), atol=1e-5)


def test_multiscale_embeddings_concatenate_normalised_central_means():
    from astrolom.data.batching import batch_tokens
    from astrolom.data.records import Record
    from astrolom.data.stream import tokenize_records
    from astrolom.eval.embed import embed_records, parse_scales
    from astrolom.model.astropt import AstroPT, ModelConfig

    torch.manual_seed(0)
    m = AstroPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, patch_size=8)).eval()
    img = np.random.default_rng(3).normal(size=(64, 64, 3)).astype(np.float32)
    (_, ms), = embed_records(m, [Record("a", img)], scales=(4, 16, 64))  # fmt: skip
    assert ms.shape == (1, 96)
    with torch.no_grad():
        feats = m.forward_features(batch_tokens(tokenize_records([Record("a", img)], 8)), layer=-2)[0]  # (64, 32)
    for j, s in enumerate((4, 16, 64)):
        mean = feats[:s].mean(0).numpy()
        np.testing.assert_allclose(ms[0, 32 * j : 32 * (j + 1)], mean / np.linalg.norm(mean), atol=1e-5)
    # symmetry pooling averages first, then normalises each scale: invariant and unit-norm per block
    recs = [Record(str(t), d4(img, t)) for t in range(D4_SIZE)]
    (_, pooled), = embed_records(m, recs, symmetrize=True, scales=(4, 16, 64))  # fmt: skip
    np.testing.assert_allclose(pooled, np.broadcast_to(pooled[0], pooled.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(pooled.reshape(8, 3, 32), axis=-1), 1.0, atol=1e-5)
    assert parse_scales("4,16,64") == (4, 16, 64) and parse_scales("none") is None and parse_scales(None) is None
    for bad in ("16,4", "0,4", "4,4", "a,b"):
        with pytest.raises(ValueError, match="scales"):
            parse_scales(bad)


def test_random_batch_transform_is_seeded_and_per_sample():
    tb = tok.tokenize(torch.randn(16, 16, 16, 3), 8)
    batch = {"tokens": tb.tokens, "mean": tb.mean, "std": tb.std, "grid": tb.grid, "patch_size": 8}
    a = random_d4_batch(batch, torch.Generator().manual_seed(3))
    b = random_d4_batch(batch, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a["tokens"], b["tokens"])
    assert len(set(a["d4"].tolist())) > 2
    for i, t in enumerate(a["d4"].tolist()):
        torch.testing.assert_close(a["tokens"][i : i + 1], d4_tokens(tb.tokens[i : i + 1], tb.grid, 8, t))


def test_pretraining_option_d4(tmp_path):
    from pretrain_helpers import TINY, torch_threads, write_blobs

    from astrolom.config import apply_overrides
    from astrolom.train.config import PretrainConfig
    from astrolom.train.trainer import Trainer

    with pytest.raises(ValueError, match="data.augment"):
        apply_overrides(PretrainConfig(), ["data.augment=rot"])
    data = write_blobs(tmp_path / "blobs", n=24, size=32)
    losses = {}
    for aug in ("none", "d4", "d4"):
        cfg = apply_overrides(
            PretrainConfig(),
            [f"data.path={data}", f"train.out_dir={tmp_path / aug}", *TINY, "train.max_steps=3", "train.batch_size=4"]
            + ["train.eval_interval=0", "data.prefetch=0", f"data.augment={aug}"],
        )
        with torch_threads(1):
            trainer = Trainer(cfg)
            batch = trainer.data.next_train_batch()
            assert ("d4" in batch) == (aug == "d4")
            losses.setdefault(aug, []).append([trainer.train_step()["loss"] for _ in range(2)])
            trainer.data.close()
    assert losses["d4"][0] == losses["d4"][1]  # the transforms are seeded: runs repeat exactly
    assert losses["d4"][0] != losses["none"][0]
