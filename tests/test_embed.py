"""Embedding extraction: the paper's definition, the causal-prefix crop, streaming Parquet output, rank parts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from astrolom.data import tokens as tok
from astrolom.eval import embed as em
from astrolom.eval.embeddings import load_embeddings
from astrolom.model.astropt import AstroPT, ModelConfig
from astrolom.model.pretrained import load_model, save_pretrained


def _model(block_size=64, patch_size=8, seed=0):
    torch.manual_seed(seed)
    return AstroPT(ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=block_size, patch_size=patch_size)).eval()


def test_embedding_is_mean_of_penultimate_layer_over_central_tokens():
    m = _model()
    x = tok.tokenize(torch.randn(2, 96, 96, 3), 8).tokens  # 144 tokens, more than block_size
    with torch.no_grad():
        h = m.forward_intermediates(x[:, :64])[1]  # block 1 of 3 = penultimate
    torch.testing.assert_close(em.embed_tokens(m, x), h[:, :64].mean(1))
    with torch.no_grad():
        h16 = m.forward_intermediates(x[:, :16])[0]
    torch.testing.assert_close(em.embed_tokens(m, x, layer=0, n_tokens=16), h16.mean(1))
    # a model that sees fewer tokens than asked for averages all it sees
    small = _model(block_size=16)
    assert em.tokens_used(small, 144, 64) == 16
    assert em.embed_tokens(small, x).shape == (2, 32)
    with pytest.raises(ValueError):
        em.tokens_used(small, 144, 0)


@pytest.mark.parametrize(("h", "w", "p", "n"), [(512, 512, 16, 64), (80, 80, 16, 9), (80, 80, 16, 10), (96, 64, 8, 20)])
def test_prefix_crop_keeps_the_spiral_prefix(h, w, p, n):
    ch, cw = em.prefix_crop(h, w, p, n)
    img = torch.randn(1, h, w, 3)
    full = tok.tokenize(img, p).tokens[:, :n]
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = tok.tokenize(img[:, top : top + ch, left : left + cw], p).tokens[:, :n]
    torch.testing.assert_close(full, crop)
    assert ch * cw < h * w or (ch, cw) == (h, w)


def test_larger_stamps_embed_like_their_centre():
    from astrolom.data.records import Record

    m = _model()
    rng = np.random.default_rng(0)
    big = rng.normal(size=(128, 128, 3)).astype(np.float32)
    small = big[32:96, 32:96]  # the central 64x64 = the 8x8 central patches
    (_, e_big), = em.embed_records(m, [Record("a", big)])  # fmt: skip
    (_, e_small), = em.embed_records(m, [Record("a", small)])  # fmt: skip
    np.testing.assert_allclose(e_big, e_small, atol=1e-5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "final"
    save_pretrained(_model(block_size=16), d)
    return d


def test_embed_cli_writes_streaming_parquet(mock_survey, model_dir, tmp_path):
    from astrolom.cli import main
    from astrolom.data.sources import open_source

    counts = open_source(mock_survey).split_counts()
    out = tmp_path / "emb.parquet"
    rc = main(["embed", "--model", str(model_dir), "--data", str(mock_survey), "--out", str(out),
               "--splits", "val,test", "--batch-size", "4", "--no-progress"])  # fmt: skip
    assert rc == 0
    f = pq.ParquetFile(out)
    assert f.metadata.num_rows == counts["val"] + counts["test"]
    assert f.metadata.num_row_groups > 1  # written batch by batch
    schema = f.schema_arrow
    assert pa.types.is_fixed_size_list(schema.field("embedding").type)
    assert schema.field("embedding").type.value_type == pa.float32()
    assert schema.field("embedding").type.list_size == 32
    for col in ("object_id", "split", "redshift", "log_mstar", "telescope"):
        assert col in schema.names
    emb = load_embeddings(out)
    assert set(emb.split) == {"val", "test"}
    assert np.isfinite(emb.X).all()
    assert emb.recipe.layer == -2 and emb.recipe.tokens == 64 and emb.recipe.random_init is False
    # a spectrum readout for a model without spectra is refused, naming the model
    rc = main(["embed", "--model", str(model_dir), "--data", str(mock_survey), "--out", str(tmp_path / "x.parquet"),
               "--spectrum-segments", "4", "--no-progress"])  # fmt: skip
    assert rc != 0 and not (tmp_path / "x.parquet").exists()

    # two ranks write two parts whose union is the single-process output, row for row
    model, _ = load_model(str(model_dir))
    parts = tmp_path / "emb_ddp.parquet"
    for rank in (0, 1):
        em.embed_dataset(model, str(mock_survey), parts, splits=["val", "test"], batch_size=4, rank=rank,
                         world_size=2, progress=False)  # fmt: skip
    names = sorted(p.name for p in parts.iterdir())
    assert names == [
        "part-00000-00000.parquet",
        "part-00001-00000.parquet",
        "progress-00000.json",
        "progress-00001.json",
    ]
    both = load_embeddings(parts)
    order = {oid: i for i, oid in enumerate(emb.object_id)}
    idx = [order[o] for o in both.object_id]
    assert sorted(idx) == list(range(len(emb)))
    np.testing.assert_allclose(both.X, emb.X[idx], atol=1e-6)


def test_random_init_control_is_seeded_and_differs(model_dir):
    pre, meta = load_model(str(model_dir))
    a, meta_a = load_model(str(model_dir), random_init=True, seed=3)
    b, _ = load_model(str(model_dir), random_init=True, seed=3)
    c, _ = load_model(str(model_dir), random_init=True, seed=4)
    x = tok.tokenize(torch.randn(2, 32, 32, 3), 8).tokens
    assert meta_a["random_init"] is True and meta_a["seed"] == 3 and meta["random_init"] is False
    assert a.config == pre.config
    torch.testing.assert_close(em.embed_tokens(a, x), em.embed_tokens(b, x))
    assert not torch.allclose(em.embed_tokens(a, x), em.embed_tokens(c, x))
    assert not torch.allclose(em.embed_tokens(a, x), em.embed_tokens(pre, x))


def test_random_init_control_is_extracted_like_the_embeddings(mock_survey, model_dir, tmp_path):
    from astrolom.eval.baselines import random_init_embeddings

    model, meta = load_model(str(model_dir))
    path = em.embed_dataset(model, str(mock_survey), tmp_path / "ms.parquet", splits=["val"], metadata=meta,
                            symmetrize=True, scales=(4, 16), progress=False)  # fmt: skip
    like = load_embeddings(path)
    assert like.X.shape[1] == 64 and like.recipe.scales == (4, 16) and like.recipe.tokens == 16
    control = random_init_embeddings(str(model_dir), str(mock_survey), tmp_path / "ctl.parquet", like, splits=("val",),
                                     progress=False)  # fmt: skip
    # the control is pooled and multi-scale like the embeddings it controls: same width, unit-norm blocks
    assert control.recipe.symmetrize is True and control.recipe.scales == (4, 16)
    assert control.X.shape == like.X.shape
    np.testing.assert_allclose(np.linalg.norm(control.X.reshape(len(control), 2, 32), axis=-1), 1.0, atol=1e-5)


def test_unsplit_data_is_split_as_in_pretraining(tmp_path):
    """Data without a split column: embed uses the split settings of the run the model came from."""
    from astrolom.data.records import split_of

    run = tmp_path / "run"
    save_pretrained(_model(block_size=16), run / "final")
    (run / "config.yaml").write_text("data:\n  split_fractions: [0.5, 0.25, 0.25]\n  split_seed: 7\n")
    np.save(tmp_path / "stamps.npy", np.random.default_rng(0).normal(size=(40, 32, 32, 3)).astype(np.float32))
    model, meta = load_model(str(run))
    assert meta["split_settings"] == {"split_fractions": (0.5, 0.25, 0.25), "split_seed": 7}
    out = em.embed_dataset(model, str(tmp_path / "stamps.npy"), tmp_path / "emb.parquet", metadata=meta,
                           progress=False)  # fmt: skip
    emb = load_embeddings(out)
    assert len(emb) == 40
    expected = [split_of(oid, (0.5, 0.25, 0.25), 7) for oid in emb.object_id]
    assert list(emb.split) == expected
    assert expected != [split_of(oid) for oid in emb.object_id]  # the default settings would differ
