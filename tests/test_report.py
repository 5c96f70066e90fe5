"""The HTML report builds from a tiny run and is self-contained; the figure helpers write PNG and PDF."""

from __future__ import annotations

import html
import json
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


@pytest.mark.slow
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


def _png(path):
    fig, ax = fg.plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, 1])
    fig.savefig(path)
    fg.plt.close(fig)
    return path


def _fake_multimodal(folder):
    """columns.json as `astrolom probe` writes it for three columns, and two `astrolom generate` outputs."""
    from astrolom.eval.embeddings import EmbeddingTable
    from astrolom.eval.probe_columns import evaluate_columns, save_columns

    rng = np.random.default_rng(0)
    n = 200
    z = rng.uniform(0, 0.5, n)
    X = {"embedding_images": rng.normal(size=(n, 3)), "embedding_spectra": np.c_[z, rng.normal(size=n)],
         "embedding_joint": np.c_[z + 0.05 * rng.normal(size=n), rng.normal(size=n)]}  # fmt: skip
    split, ids = np.array(["val", "test"] * (n // 2)), np.array([f"o{i}" for i in range(n)])
    tables = {c: EmbeddingTable(ids, split, x.astype(np.float32), {"redshift": z}) for c, x in X.items()}
    results = evaluate_columns(tables, ["redshift"], ("linear",))
    save_columns(results, folder / "probes" / "columns.json")
    for sub, src, dst, model, base in (("generate", "images", "spectra", 0.1234, 0.2345),
                                       ("generate_to_images", "spectra", "images", 0.4321, 0.3210)):  # fmt: skip
        (folder / sub).mkdir(parents=True)
        metrics = {"model": "m", "data": "d", "from": src, "to": dst, "split": "test", "objects": 7,
                   "huber_model": model, "huber_mean_baseline": base, "fraction_better_than_baseline": 0.5}  # fmt: skip
        if dst == "spectra":
            metrics["figure"] = str(_png(folder / sub / "generated_spectra.png"))
        (folder / sub / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return results


def _fake_align_eval(folder):
    """align_eval.json shaped as `astrolom eval-align` writes it (its markdown reads it), plus its figures."""
    from astrolom.align.evaluate import markdown, retrieval_metrics

    rng = np.random.default_rng(1)
    a = rng.normal(size=(20, 4)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)  # L2-normalised, as the shared space is: self is the top match
    tarp = {"alpha": [0.0, 0.5, 1.0], "ecp": [0.0, 0.45, 1.0], "band": [0.0, 0.2, 0.0], "max_abs_deviation": 0.05,
            "fraction_in_band": 0.9}  # fmt: skip
    result = {
        "model": "align",
        "pairs": {"train": 60, "val": 20, "test": 20},
        "retrieval": {"image→spectrum": retrieval_metrics(a, a), "spectrum→image": retrieval_metrics(a, a[::-1])},
        "similarity_redshift_r2": {"image→image": 0.61, "image→spectrum": 0.52},
        "properties_r2": {"image aligned · zero-shot kNN": {"redshift": 0.71, "log_mstar": 0.42},
                          "spectrum aligned · zero-shot kNN": {"redshift": 0.93, "log_mstar": 0.38},
                          "spectrum CNN (supervised)": {"redshift": 0.99, "log_mstar": 0.5}},
        "posteriors": {"image aligned": {"nll": -1.234, "epochs": 5, "best_val": 1.0, "tarp": tarp},
                       "photometry": {"nll": 0.567, "epochs": 5, "best_val": 1.2, "tarp": tarp}},
        "figures": {},
        "seconds": 1.0,
    }  # fmt: skip
    folder.mkdir(parents=True)
    for name in ("retrieval.png", "tarp.png", "corner.png"):
        _png(folder / name)
    (folder / "align_eval.json").write_text(json.dumps(result, indent=1) + "\n")
    assert "| image→spectrum | 1.000 |" in markdown(result)  # the writer's own reader accepts the shape
    return result


def test_report_multimodal_and_alignment_sections(tmp_path):
    from astrolom.eval.report import build_report

    results = _fake_multimodal(tmp_path / "run" / "multimodal")
    _fake_align_eval(tmp_path / "run" / "align_eval")
    # the alignment run beside its evaluation (the demo's layout): its loss curves join the section
    align_run = tmp_path / "run" / "align"
    align_run.mkdir()
    (align_run / "config.json").write_text('{"model_type": "astrolom-align"}')
    rows = [
        {"step": s, "loss": 4.0 - s / 10, **({"val_loss": 4.1 - s / 10} if s % 5 == 0 else {})} for s in range(1, 21)
    ]
    (align_run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = build_report(tmp_path / "run", umap=False, inpainting=False).read_text()
    assert "<h2>Multimodal</h2>" in doc and "<h2>Alignment</h2>" in doc
    mm = doc[doc.index("<h2>Multimodal") : doc.index("<h2>Alignment")]
    # the column table: the spectra column reads redshift best and is marked
    z = {c: f"{r.score('redshift'):.3f}" for c, r in results.items()}
    assert float(z["embedding_spectra"]) > 0.99 > float(z["embedding_joint"]) > float(z["embedding_images"])
    assert f'<td class="best">{z["embedding_spectra"]}</td>' in mm and f"<td>{z['embedding_images']}</td>" in mm
    assert "<td>embedding_spectra</td></tr>" in mm and "same 200 objects" in mm
    # generation, both directions, against the mean baseline; the spectra figure is embedded
    assert "<td>images → spectra</td>" in mm and "<td>spectra → images</td>" in mm
    assert '<td class="best">0.1234</td><td>0.2345</td>' in mm and '<td>0.4321</td><td class="best">0.3210</td>' in mm
    assert mm.count('<img src="data:image/png;base64,') == 1
    al = doc[doc.index("<h2>Alignment") :]
    assert "20 test pairs" in al and "<td>image→spectrum</td><td>1.000</td>" in al
    assert "<td>0.050</td>" in al and "<td>10</td>" in al  # chance R@1 = 1/20, chance median rank (N+1)/2
    assert '<td class="best">0.93' in al and '<td class="best">0.99' not in al  # supervised rows are not "best"
    assert '<td class="best">-1.234</td>' in al and "<td>0.567</td>" in al
    assert "alignment heads: training and validation loss (align" in al
    assert al.count('<img src="data:image/png;base64,') == 4  # loss curves, retrieval, TARP, corner


def test_report_flags_point_at_multimodal_and_alignment_folders(tmp_path):
    from astrolom.cli import main

    _fake_multimodal(tmp_path / "elsewhere" / "mm")
    _fake_align_eval(tmp_path / "elsewhere" / "al")
    (tmp_path / "run").mkdir()
    rc = main(["report", str(tmp_path / "run"), "--no-umap", "--no-inpainting", "--multimodal",
               str(tmp_path / "elsewhere" / "mm"), "--align", str(tmp_path / "elsewhere" / "al")])  # fmt: skip
    assert rc == 0
    doc = (tmp_path / "run" / "report.html").read_text()
    assert "<h2>Multimodal</h2>" in doc and "<h2>Alignment</h2>" in doc and "0.1234" in doc
    assert main(["report", str(tmp_path / "run"), "--no-umap", "--no-inpainting"]) == 0
    doc = (tmp_path / "run" / "report.html").read_text()
    assert "<h2>Multimodal" not in doc and "<h2>Alignment" not in doc and "<h2>Configuration" in doc


def test_inpainting_with_a_flux_aware_model_matches_step_by_step_prediction():
    import torch

    from astrolom.data import tokens as tok
    from astrolom.model.astropt import AstroPT, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, patch_size=8, flux_features=True)
    model = AstroPT(cfg).eval()
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32) + 5.0
    res = inpaint(model, images, k=4)
    assert res["k"] == 4 and res["generated"] == 12 and np.isfinite(res["mse"])
    np.testing.assert_allclose(res["inpainted"][:, 8:24, 8:24], images[:, 8:24, 8:24], atol=1e-4)  # given tokens
    # token 4 is the model's prediction from the 4 given tokens with their flux features, nothing else
    batch = tok.tokenize(tok.center_crop(torch.as_tensor(images), 8), 8)
    feats = tok.flux_features(batch.tokens, batch.mean, batch.std, 3, cfg.flux_softening)
    with torch.no_grad():
        pred, _ = model(torch.cat([batch.tokens[:, :4], feats[:, :4]], -1))
    full = batch.tokens.clone()
    full[:, 4:5] = pred[:, -1:]
    first = tok.detokenize(batch, full).numpy()
    # the pixels of spiral patch 4: where a token that is nonzero only at position 4 changes the image
    only4 = torch.zeros_like(full)
    only4[:, 4] = 1.0
    sel = (tok.detokenize(batch, only4).numpy() != tok.detokenize(batch, torch.zeros_like(full)).numpy()).any(-1)
    assert sel.sum() == 2 * 8 * 8  # one 8x8 patch per image
    np.testing.assert_allclose(res["inpainted"][sel], first[sel], atol=1e-4)


def test_neighbour_agreement_tells_islands_from_a_mixed_map(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array(["south"] * 300 + ["north"] * 100)
    mixed = (300 * 299 + 100 * 99) / 400 / 399  # mean over objects of (n_c - 1) / (n - 1)
    blobs = rng.normal(size=(400, 2)) + np.where(labels == "north", 20.0, 0.0)[:, None]
    isl = fg.neighbour_agreement(blobs, labels, k=15)
    assert isl["agreement"] == pytest.approx(1.0) and isl["excess"] == pytest.approx(1.0)
    assert isl["mixed"] == pytest.approx(mixed)
    one_cloud = fg.neighbour_agreement(rng.normal(size=(400, 2)), labels, k=15)
    assert abs(one_cloud["agreement"] - mixed) < 0.04 and abs(one_cloud["excess"]) < 0.1
    p = fg.plot_telescope(blobs, labels, tmp_path / "tel", agreement=isl)
    assert p["png"].stat().st_size > 1000


def test_report_shows_the_photo_z_panel_and_property_predictions(tiny_run):
    """The probe's per-object predictions reach the report: the photo-z table of every feature set with the numbers
    of probes.json, the redshift figure, a figure per other property, and the headline sigma_NMAD as a KPI."""
    from astrolom.eval.report import build_report

    doc = build_report(tiny_run, tiny_run / "report_predictions.html", umap=False, inpainting=False).read_text()
    assert "<h2>Property predictions of the probes</h2>" in doc and "<h3>Photometric redshift</h3>" in doc
    probes = json.loads((tiny_run / "probes" / "probes.json").read_text())["results"]
    for feature_set, method in (("pretrained", "linear"), ("random_init", "linear"), ("pca_pixels", "linear"),
                                ("photometry", "linear"), ("cnn", "supervised")):  # fmt: skip
        z = probes[feature_set]["redshift"][method]
        row = f"<td>{feature_set}</td><td>{method}</td><td>test</td>"
        assert row in doc, row
        cells = doc.split(row)[1].split("</tr>")[0]
        assert f">{z['sigma_nmad']:.4f}</td>" in cells and f">{z['bias']:+.4f}</td>" in cells
        assert f">{z['eta']:.3f}</td>" in cells and f">{z['r2']:.3f}</td>" in cells
    pre = probes["pretrained"]["redshift"]["linear"]
    assert f"<b>{pre['sigma_nmad']:.4f} (η {pre['eta']:.3f})</b>redshift σ_NMAD (pretrained linear)" in doc
    assert "photo-z of pretrained · linear" in doc
    # g_minus_r is the other regression target: one figure in the per-property grid; telescope (a class) has none
    assert doc.count('alt="pretrained__linear__g_minus_r"') == 1 and "pretrained__linear__telescope" not in doc
    assert doc.count('alt="pretrained__linear__redshift"') == 1


@pytest.mark.slow
def test_prediction_section_shows_data_as_text(tmp_path):
    from astrolom.eval.figures import write_predictions
    from astrolom.eval.metrics import PredictionSet
    from astrolom.eval.report_html import prediction_section

    evil = "<img src=x onerror=alert(1)>"
    ps = PredictionSet()
    ps.add(evil, "linear", "redshift", ["a", "b", "c"], [0.1, 0.2, 0.3], [0.1, 0.25, 0.3])
    ps.add("pretrained", evil, "mass", ["a", "b", "c"], [9.0, 10.0, 11.0], [9.5, 10.0, 10.5])
    write_predictions(ps, tmp_path / "predictions", [(evil, "linear"), ("pretrained", evil)])
    doc = prediction_section(tmp_path / "predictions", evil, evil)
    assert "<img src=x" not in doc and doc.count(html.escape(evil)) >= 4
    assert doc.count("data:image/png;base64,") == 2  # both figures found under their file-safe names


def test_report_finds_label_curve_predictions_and_extra_folders(tmp_path):
    from astrolom.cli import main
    from astrolom.eval.figures import write_predictions
    from astrolom.eval.metrics import PredictionSet

    root = tmp_path / "root"
    (root / "label_efficiency").mkdir(parents=True)
    (root / "label_efficiency" / "label_efficiency.md").write_text("| labels | target |\n")
    curve = PredictionSet()
    curve.add("finetuned", "200 labels", "redshift", ["a", "b", "c", "d"], [0.1, 0.2, 0.3, 1.0], [0.1, 0.2, 0.4, 0.2])
    write_predictions(curve, root / "label_efficiency" / "predictions", [("finetuned", "200 labels")])
    ft = PredictionSet()
    ft.add("finetuned", "lora", "smooth", ["a", "b"], [0.2, 0.8], [0.3, 0.7])
    write_predictions(ft, tmp_path / "ft" / "predictions", [("finetuned", "lora")])
    assert main(["report", str(root), "--predictions", str(tmp_path / "ft" / "predictions"), "--no-umap"]) == 0
    doc = (root / "report.html").read_text()
    assert "<h2>Fine-tuning: property predictions</h2>" in doc and "<h2>Property predictions: ft</h2>" in doc
    # eta: |dz|/(1+z) = 0.8/2 = 0.4 for one of four objects
    assert "<td>finetuned</td><td>200 labels</td><td>test</td><td>4</td>" in doc and "<td>0.250</td>" in doc
    assert 'alt="finetuned__200_labels__redshift"' in doc and 'alt="finetuned__lora__smooth"' in doc
