"""The HTML report builds from a tiny run and is self-contained; the figure helpers write PNG and PDF."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest

from astrolom.eval import figures as fg
from astrolom.eval.inpaint import inpaint


@pytest.fixture(scope="module")
def tiny_run(mock_survey, tmp_path_factory):
    """A 3-step pretraining run, its embeddings and a probe report, laid out as the demo lays them out."""
    from astrolom.cli import main

    root = tmp_path_factory.mktemp("report_run")
    rc = main(["pretrain", "--data", str(mock_survey), "--preset", "debug", "--out", str(root / "run"),
               "--max-steps", "3", "data.patch_size=8", "train.batch_size=4", "train.eval_interval=1",
               "train.eval_samples=4", "train.progress=false", "train.tensorboard=false"])  # fmt: skip
    assert rc == 0
    assert main(["embed", "--model", str(root / "run"), "--data", str(mock_survey), "--out",
                 str(root / "embeddings.parquet"), "--no-progress"]) == 0  # fmt: skip
    assert main(["probe", "--embeddings", str(root / "embeddings.parquet"), "--out", str(root / "probes"),
                 "--targets", "redshift,g_minus_r,telescope", "--methods", "linear", "--model", str(root / "run"),
                 "--data", str(mock_survey), "--baselines", "random_init,pca_pixels,photometry,cnn",
                 "--cnn-epochs", "2", "--pixel-crop", "32"]) == 0  # fmt: skip
    return root


def test_report_is_self_contained(tiny_run):
    from astrolom.cli import main

    assert main(["report", str(tiny_run)]) == 0
    doc = (tiny_run / "report.html").read_text()
    for heading in ("Pretraining", "Probes", "Embedding map", "Inpainting", "Configuration and environment"):
        assert f"<h2>{heading}" in doc, heading
    images = re.findall(r'<img src="([^"]+)"', doc)
    assert len(images) >= 6
    assert all(src.startswith("data:image/png;base64,") for src in images)  # nothing loaded from elsewhere
    assert "http://" not in doc and "https://" not in doc and "<script" not in doc
    # the probe table shows the pretrained model beside the control and every baseline
    for col in ("pretrained", "random_init", "pca_pixels", "photometry", "cnn"):
        assert f"<th>{col}</th>" in doc
    assert '"torch":' in html.unescape(doc) and "preset: debug" in doc  # environment and config
    for name in ("fig2_loss", "fig3_umap", "telescope", "inpainting", "probes", "training_curves"):
        assert (tiny_run / "figures" / f"{name}.pdf").stat().st_size > 0


def test_report_without_model_or_embeddings(tiny_run, tmp_path):
    from astrolom.eval.report import build_report

    (tmp_path / "probes").mkdir()
    (tmp_path / "probes" / "probes.json").write_text((tiny_run / "probes" / "probes.json").read_text())
    path = build_report(tmp_path)
    doc = path.read_text()
    assert "<h2>Probes" in doc and "<h2>Pretraining" not in doc and "<h2>Inpainting" not in doc


def test_inpainting_uses_true_normalisation_and_measures_error(tmp_path):
    import torch

    from astrolom.model.astropt import AstroPT, ModelConfig

    torch.manual_seed(0)
    model = AstroPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, patch_size=8)).eval()
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32) + 5.0
    res = inpaint(model, images, k=4)
    assert res["k"] == 4 and res["generated"] == 12
    np.testing.assert_allclose(res["truth"], images, atol=1e-4)
    # the given tokens are reproduced exactly; generated patches carry the true per-patch mean
    assert np.allclose(res["inpainted"][:, 8:24, 8:24], images[:, 8:24, 8:24], atol=1e-4)
    assert np.allclose(res["inpainted"][:, :8, :8].mean(axis=(1, 2, 3)), images[:, :8, :8].mean(axis=(1, 2, 3)),
                       atol=1e-3)  # fmt: skip
    assert (res["masked"][:, :8, :8] == 0).all()
    assert res["mse"] > 0 and res["mse_zero"] == pytest.approx(1.0, abs=1e-4)
    paths = fg.plot_inpainting(res, tmp_path / "inpaint")
    assert paths["png"].stat().st_size > 0 and paths["pdf"].stat().st_size > 0


def test_loss_and_probe_vs_flops_figures(tmp_path):
    from astrolom.eval.scaling import scaling_law

    c = np.logspace(12, 15, 10)
    runs = {"1m": [{"step": i, "flops": x, "tokens_seen": x / 6e6, "val_loss": float(scaling_law(x, 0.3, 1e10, 0.3))}
                   for i, x in enumerate(c)]}  # fmt: skip
    fit = {"ok": True, "L_inf": 0.3, "C0": 1e10, "alpha": 0.3, "c_min": 1e12, "c_max": 1e15}
    p = fg.plot_loss_curves(runs, tmp_path / "fig2", {"1m": 1e6}, fit)
    assert p["png"].stat().st_size > 0 and p["pdf"].stat().st_size > 0
    pts = {"redshift": [(1e14, 0.3, "1m"), (5e14, 0.4, "5m")]}
    p = fg.plot_probe_vs_flops(pts, {"redshift": {"rho": 1.0, "p": None, "n": 2}}, tmp_path / "fig4")
    assert p["png"].stat().st_size > 0
