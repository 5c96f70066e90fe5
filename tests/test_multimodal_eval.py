"""Per-modality embeddings and cross-modal generation of a multimodal model (astrolom.eval.multimodal)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from astrolom.cli import main
from astrolom.data.multimodal import SpectrumTokeniser
from astrolom.data.survey import generate_objects, generate_survey, spectrum_wavelength
from astrolom.eval.multimodal import embed_multimodal, evaluate_generation, record_inputs
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
    assert img.shape == spec.shape == joint.shape == (6, 32)
    assert img_p.all() and np.array_equal(spec_p.numpy(), has)
    # without a spectrum the joint pass holds only the image tokens: the joint embedding is the image one
    torch.testing.assert_close(joint[~torch.from_numpy(has)], img[~torch.from_numpy(has)])
    assert (joint[torch.from_numpy(has)] - img[torch.from_numpy(has)]).abs().max() > 1e-4
    # a spectrum embedding depends on the spectrum only (default: the final block)
    feats = model.forward_features({k: v for k, v in inputs.items() if k.startswith("spectra")}, layer=-1)["spectra"]
    k = int(np.flatnonzero(has)[0])
    m = inputs["spectra_mask"][k]
    torch.testing.assert_close(spec[k], feats[k][m].mean(0))
    # the joint one: the spectrum tokens of the images-then-spectra pass (they have seen the image), averaged, and
    # the mean with the same tokens of the spectra-first (= spectra-only) pass
    joint_feats = model.forward_features(inputs, layer=-1)["spectra"]
    torch.testing.assert_close(joint[k], 0.5 * (joint_feats[k][m].mean(0) + spec[k]))
    assert (joint[k] - spec[k]).abs().max() > 1e-5  # the image changed them
    with torch.no_grad():  # causal: spectrum tokens placed before the image have not seen it
        hs, layout = model._trunk(inputs, ["spectra", "images"], len(model.blocks) - 1)
        first = model.ln_f(model._split(hs[-1], layout)["spectra"])
    torch.testing.assert_close(first[k][m].mean(0), spec[k], atol=1e-5, rtol=1e-5)


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
    assert json.loads(t.schema.metadata[b"astrolom"])["columns"]["embedding"] == "joint"


def test_generation_metrics_and_figure(setup, tmp_path):
    survey, model_dir, _, _ = setup
    m = evaluate_generation(str(model_dir), str(survey), "images", "spectra", tmp_path / "g", split="train", n=4)
    assert m["objects"] == 4 and m["huber_model"] > 0 and m["huber_mean_baseline"] > 0
    assert (tmp_path / "g" / "generated_spectra.png").stat().st_size > 10_000
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
