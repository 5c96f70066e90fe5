"""Per-modality embeddings and cross-modal generation of a multimodal model (astrolom.eval.multimodal)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from astrolom.cli import main
from astrolom.data.multimodal import SpectrumTokeniser
from astrolom.eval.multimodal import _emission_lines, embed_multimodal, evaluate_generation, record_inputs
from astrolom.eval.recipe import recipe_of
from astrolom.mock import generate_objects, generate_survey, spectrum_wavelength
from astrolom.model.astropt import AstroPT, ModelConfig
from astrolom.train.checkpoint import save_pretrained

PATCH = 128  # 25 spectrum tokens: fast


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeval")
    survey = generate_survey(root / "survey", n=40, size=32, seed=5, workers=1, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=64, patch_size=8, modalities=("images", "spectra"),
        spectrum_patch=PATCH,
    )  # fmt: skip
    tok = SpectrumTokeniser(spectrum_wavelength(), patch=PATCH)
    model_dir = save_pretrained(
        AstroPT(cfg), root / "model", tokens={"patch_size": 8, "spectra": tok.describe()}, data={"image_size": 32}
    )
    return survey, model_dir, AstroPT(cfg).eval(), tok


def test_embeddings_per_modality(setup):
    _, _, model, tok = setup
    recs = generate_objects(6, size=32, seed=5)
    cfg_json = {"data": {"image_size": 32}}
    _, inputs = record_inputs(recs, model, cfg_json, tok)
    embs = embed_multimodal(model, inputs)
    has = np.array([r.spectrum is not None for r in recs])
    assert 0 < has.sum() < 6  # seed 5: some objects lack a spectrum
    img, img_p = embs["embedding_images"]
    spec, spec_p = embs["embedding_spectra"]
    joint, _ = embs["embedding_joint"]
    assert img.shape == (6, 32) and spec.shape == joint.shape == (6, 32 * 8)  # 8 wavelength segments by default
    assert img_p.all() and np.array_equal(spec_p.numpy(), has)
    # without a spectrum the joint pass holds only the image tokens: the joint embedding is the image one, repeated
    # once per segment to the column's width
    torch.testing.assert_close(joint[~torch.from_numpy(has)], img[~torch.from_numpy(has)].repeat(1, 8))
    assert (joint[torch.from_numpy(has)] - img[torch.from_numpy(has)].repeat(1, 8)).abs().max() > 1e-4
    # a spectrum embedding depends on the spectrum only (default: the final block): the means over 8 equal runs of
    # token positions (25 tokens: 3, 3, 3, 3, 3, 3, 3, 4), concatenated
    feats = model.forward_features({k: v for k, v in inputs.items() if k.startswith("spectra")}, layer=-1)["spectra"]
    assert feats.shape[1] == 25
    k = int(np.flatnonzero(has)[0])
    m = inputs["spectra_mask"][k]
    assert m.all()  # the mock masks pixels, not whole 128-px tokens
    bounds = [(25 * i) // 8 for i in range(9)]
    assert bounds == [0, 3, 6, 9, 12, 15, 18, 21, 25]
    segs = torch.cat([feats[k][a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    torch.testing.assert_close(spec[k], segs)
    one = embed_multimodal(model, inputs, spectrum_segments=1)
    torch.testing.assert_close(one["embedding_spectra"][0][k], feats[k][m].mean(0))  # 1 segment: the plain mean
    torch.testing.assert_close(one["embedding_images"][0], img)
    # the joint one: the spectrum tokens of the images-then-spectra pass (they have seen the image), pooled, and
    # the mean with the same tokens of the spectra-first (= spectra-only) pass
    joint_feats = model.forward_features(inputs, layer=-1)["spectra"]
    joint_segs = torch.cat([joint_feats[k][a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    torch.testing.assert_close(joint[k], 0.5 * (joint_segs + spec[k]))
    assert (joint[k] - spec[k]).abs().max() > 1e-5  # the image changed them
    with torch.no_grad():  # causal: spectrum tokens placed before the image have not seen it
        hs, layout = model._trunk(inputs, ["spectra", "images"], len(model.blocks) - 1)
        first = model.ln_f(model._split(hs[-1], layout)["spectra"])
    torch.testing.assert_close(first[k][m].mean(0), one["embedding_spectra"][0][k], atol=1e-5, rtol=1e-5)


def test_spectrum_pool_keeps_where_along_the_spectrum():
    from astrolom.eval.multimodal import spectrum_pool

    # token t's output is t: the segment means are the segments' mean positions, blue to red
    feats = torch.arange(10, dtype=torch.float32)[None, :, None].repeat(2, 1, 1)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 5:] = False  # the second spectrum covers only the blue half of the grid
    out = spectrum_pool(feats, mask, segments=2)
    assert out.shape == (2, 2)
    torch.testing.assert_close(out[0], torch.tensor([2.0, 7.0]))
    # a range without a present token gets the mean over the present ones (in distribution, never 0 or NaN)
    torch.testing.assert_close(out[1], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(spectrum_pool(feats, mask, segments=1)[:, 0], torch.tensor([4.5, 2.0]))
    # masked tokens inside a range are left out of its mean
    mask[0, 0] = False
    assert spectrum_pool(feats, mask, segments=2)[0, 0].item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="at most 10"):
        spectrum_pool(feats, mask, segments=11)
    with pytest.raises(ValueError, match=">= 1"):
        spectrum_pool(feats, mask, segments=0)


def test_embed_cli_writes_modality_columns(setup, tmp_path):
    survey, model_dir, _, _ = setup
    out = tmp_path / "emb.parquet"
    assert main(["embed", "--model", str(model_dir), "--data", str(survey), "--out", str(out), "--no-progress"]) == 0
    t = pq.read_table(out)
    assert t.num_rows == 40
    assert {"embedding", "embedding_images", "embedding_spectra", "embedding_joint", "redshift"} <= set(t.column_names)
    has = np.array(t.column("has_spectrum").to_pylist())
    spec = t.column("embedding_spectra").to_pylist()
    assert [s is None for s in spec] == list(~has)
    assert t.column("embedding").to_pylist() == t.column("embedding_joint").to_pylist()
    recipe = recipe_of(json.loads(t.schema.metadata[b"astrolom"]))
    assert recipe.encoder == "multimodal" and recipe.main_modality == "joint" and recipe.spectrum_segments == 8
    assert t.schema.field("embedding_spectra").type.list_size == 32 * 8
    # --spectrum-segments 1: one mean over the spectrum's tokens, the image embedding's width
    out1 = tmp_path / "emb1.parquet"
    args = ["embed", "--model", str(model_dir), "--data", str(survey), "--out", str(out1), "--no-progress"]
    assert main([*args, "--spectrum-segments", "1"]) == 0
    t1 = pq.read_table(out1)
    assert t1.schema.field("embedding_spectra").type.list_size == t1.schema.field("embedding_images").type.list_size


def test_generation_metrics_and_figure(setup, tmp_path):
    survey, model_dir, _, _ = setup
    m = evaluate_generation(str(model_dir), str(survey), "images", "spectra", tmp_path / "g", split="train", n=4)
    assert m["objects"] == 4 and m["huber_model"] > 0 and m["huber_mean_baseline"] > 0
    assert (tmp_path / "g" / "generated_spectra.png").stat().st_size > 10_000
    # the figure's line markers come from the survey's metadata (rest-frame vacuum Å), not from the simulator's code
    lines = _emission_lines(str(survey))
    assert len(lines) == 7 and lines[0] == pytest.approx(3728.48) and lines[-1] == pytest.approx(6585.27)
    assert json.loads((tmp_path / "g" / "metrics.json").read_text())["to"] == "spectra"
    rc = main(["generate", "--model", str(model_dir), "--data", str(survey), "--from", "spectra", "--to", "images",
               "--out", str(tmp_path / "g2"), "--split", "train", "--n", "3", "--image-tokens", "4"])  # fmt: skip
    assert rc == 0
    assert json.loads((tmp_path / "g2" / "metrics.json").read_text())["objects"] == 3
    rc = main(["generate", "--model", str(model_dir), "--data", str(survey), "--from", "images", "--to", "images",
               "--out", str(tmp_path / "g3")])  # fmt: skip
    assert rc == 2


def test_probe_modalities_scores_each_column_on_the_same_objects(tmp_path):
    import pyarrow as pa

    from astrolom.eval.multimodal import probe_modalities

    rng = np.random.default_rng(0)
    n = 400
    z = rng.uniform(0, 0.5, n)
    informative = np.stack([z, rng.normal(size=n)], 1) + 0.01 * rng.normal(size=(n, 2))
    noise = rng.normal(size=(n, 2))
    has = rng.uniform(size=n) < 0.7
    spec = [list(v) if h else None for v, h in zip(informative.astype(np.float32), has, strict=True)]
    table = pa.table({
        "object_id": [f"o{i}" for i in range(n)],
        "split": ["val" if i % 2 else "test" for i in range(n)],
        "redshift": z,
        "embedding_images": pa.array(list(noise.astype(np.float32)), pa.list_(pa.float32(), 2)),
        "embedding_spectra": pa.array(spec, pa.list_(pa.float32(), 2)),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "e.parquet")
    res = probe_modalities(tmp_path / "e.parquet", ["redshift"])
    assert res["embedding_spectra"]["redshift"] > 0.99
    assert res["embedding_images"]["redshift"] < 0.05
    assert res["_objects"]["fit"] + res["_objects"]["test"] == int(has.sum())


def test_spectrum_segments_fit_the_models_tokens(setup, tmp_path):
    from astrolom.eval.multimodal import embed_multimodal_dataset

    survey, model_dir, _, _ = setup
    with pytest.raises(ValueError, match="make 25 tokens: use at most 25"):
        embed_multimodal_dataset(str(model_dir), str(survey), tmp_path / "x.parquet", spectrum_segments=26)
    # a model whose spectra make fewer tokens than the default 8 segments: one segment per token, recorded
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, patch_size=8, modalities=("images", "spectra"),
                      spectrum_patch=1024)  # fmt: skip
    tok = SpectrumTokeniser(spectrum_wavelength(), patch=1024)
    assert tok.n_tokens < 8
    coarse = save_pretrained(
        AstroPT(cfg), tmp_path / "coarse", tokens={"patch_size": 8, "spectra": tok.describe()}, data={"image_size": 32}
    )
    out = embed_multimodal_dataset(str(coarse), str(survey), tmp_path / "c.parquet", max_per_split=3, progress=False)
    t = pq.read_table(out)
    assert recipe_of(json.loads(t.schema.metadata[b"astrolom"])).spectrum_segments == tok.n_tokens
    assert t.schema.field("embedding_spectra").type.list_size == 16 * tok.n_tokens
