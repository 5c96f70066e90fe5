"""The demo end to end at tiny size: survey -> pretrain -> embed -> probe (control + baselines) -> report."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from astrolom import demo as demo_mod


@pytest.mark.slow
def test_tiny_demo(tmp_path, capsys):
    from astrolom.cli import main

    rc = main(["demo", "--out", str(tmp_path), "--tiny"])
    captured = capsys.readouterr()
    printed = captured.out
    for stage in ("[1/8]", "[2/8]", "[3/8]", "[4/8]", "[5/8]", "[6/8]", "[7/8]", "[8/8]"):
        assert stage in captured.err  # progress is logged (stderr)
    assert f"report: {tmp_path / 'report.html'}" in printed
    assert "pretrained" in printed and "random_init" in printed  # the key-number table

    report = (tmp_path / "report.html").read_text()
    assert report.startswith("<!doctype html>") and "data:image/png;base64," in report
    probes = json.loads((tmp_path / "probes" / "probes.json").read_text())
    assert set(probes) >= {"protocol", "targets", "results", "skipped", "embeddings"}
    assert set(probes["results"]) == {"pretrained", "random_init", "pca_pixels", "photometry", "cnn"}
    assert probes["protocol"]["fit_split"] == "val" and probes["protocol"]["test_split"] == "test"
    for target in ("redshift", "log_mstar", "g_minus_r", "telescope"):
        assert target in probes["targets"]
        for name in ("pretrained", "random_init", "pca_pixels", "photometry"):
            scores = probes["results"][name][target]["linear"]
            photo_z = {"sigma_nmad", "bias", "eta"} if target == "redshift" else set()
            assert set(scores) == ({"accuracy", "f1"} if target == "telescope" else {"r2", "mae"} | photo_z)
        assert set(probes["results"]["cnn"][target]) == {"supervised"}
    demo = json.loads((tmp_path / "demo.json").read_text())
    # the photo-z panel: the pretrained model's redshift probe on test, beside the control and baselines
    z = probes["results"]["pretrained"]["redshift"]["linear"]
    assert demo["photo_z"]["pretrained"] == {k: z[k] for k in ("sigma_nmad", "bias", "eta")}
    assert set(demo["photo_z"]) == {"pretrained", "random_init", "pca_pixels", "photometry", "cnn"}
    assert f"pretrained   sigma_NMAD {z['sigma_nmad']:.4f}" in printed
    assert "<h3>Photometric redshift</h3>" in report and f"<b>{z['sigma_nmad']:.4f} (η {z['eta']:.3f})</b>" in report
    assert 'alt="pretrained__linear__redshift"' in report
    assert (tmp_path / "probes" / "predictions" / "predictions.parquet").is_file()
    assert "<h2>Alignment: property predictions</h2>" in report  # eval-align --quick's kNN predictions
    stages = {"survey", "pretrain", "embed", "probes", "outliers", "multimodal", "alignment", "report"}
    assert set(demo["timings_s"]) == stages
    # the multimodal stage: an images + spectra model, every embedding column probed, spectra generated
    assert set(demo["multimodal"]["linear"]) == {"embedding_images", "embedding_spectra", "embedding_joint"}
    assert demo["multimodal"]["generation"]["objects"] >= 1
    assert "Multimodal" in report
    # the alignment stage: heads on the main image model + the multimodal model's spectrum half, quick evaluation
    align = json.loads((tmp_path / "align_eval" / "align_eval.json").read_text())
    assert align["quick"] is True and demo["alignment"]["retrieval"] == align["retrieval"]
    assert align["pairs"]["test"] >= 2 and 0.0 <= align["retrieval"]["image→spectrum"]["recall@10"] <= 1.0
    run_cfg = json.loads((tmp_path / "align" / "config.json").read_text())["train"]
    assert run_cfg["spectrum_model"].endswith("multimodal/run") and run_cfg["steps"] == 6
    assert "<h2>Alignment</h2>" in report and "a quick evaluation" in report
    assert "alignment heads: training and validation loss" in report  # the run's loss curves
    top = demo["outliers"]["top_1%"]  # the index + outlier stage ran and scored its ranking against has_star
    assert top["n"] >= 1 and 0.0 <= top["precision"] <= 1.0 and 0.0 < top["base_rate"] < 1.0
    assert (tmp_path / "outliers" / "outliers.png").is_file() and (tmp_path / "index" / "CURRENT").is_file()
    assert "<h2>Outliers</h2>" in report
    assert demo["settings"]["preset"] == "debug" and demo["settings"]["flux_features"] is True
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["model"]["flux_features"] is True
    assert any(k.startswith("redshift: pretrained >") for k in demo["checks"])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    # the exit status says whether the science checks passed (20 tiny steps may not beat the baselines)
    assert rc == (0 if all(demo["checks"].values()) else 1)


@pytest.mark.parametrize("outcome, rc", [((True, True), 0), ((True, False), 1)])
def test_demo_exit_status_follows_the_checks(monkeypatch, tmp_path, outcome, rc):
    checks = {"redshift: pretrained > random_init": outcome[0], "redshift: pretrained > pca_pixels": outcome[1]}
    monkeypatch.setattr(demo_mod, "run_demo", lambda out, cfg, fresh=False: {"checks": checks})
    parser = argparse.ArgumentParser()
    demo_mod.add_arguments(parser)
    assert demo_mod.run(parser.parse_args(["--out", str(tmp_path), "--tiny"])) == rc


def test_checks_compare_scores_through_the_probe_result():
    from astrolom.eval.probes import ProbeResult

    def entry(r2):
        return {"linear": {"r2": r2, "mae": 0.1}}

    result = ProbeResult(
        protocol={"methods": ["linear"], "fit_split": "val", "test_split": "test"},
        targets={"redshift": {"kind": "regression"}, "telescope": {"kind": "classification", "majority_accuracy": 0.6}},
        results={
            "pretrained": {"redshift": entry(0.8), "telescope": {"linear": {"accuracy": 0.9, "f1": 0.9}}},
            "random_init": {"redshift": entry(0.3)},
            "pca_pixels": {"redshift": entry(0.85)},
        },
    )
    assert demo_mod.checks(result) == {
        "redshift: pretrained > random_init": True,
        "redshift: pretrained > pca_pixels": False,
        "telescope predictable (accuracy > majority class)": True,
    }


def test_alignment_check_needs_retrieval_well_above_chance():
    from astrolom.eval.probes import ProbeResult

    empty = ProbeResult(protocol={"methods": ["linear"]}, targets={}, results={"pretrained": {}})

    def alignment(r10, n=571):
        return {"pairs": {"test": n}, "retrieval": {"image→spectrum": {"recall@10": r10, "chance@10": 10 / n}}}

    name = "alignment: image -> spectrum recall@10 > 5x chance"
    assert demo_mod.checks(empty, None, alignment(0.776)) == {name: True}
    assert demo_mod.checks(empty, None, alignment(0.08)) == {name: False}  # 4.6x chance
    assert demo_mod.checks(empty, None, alignment(0.0, n=30)) == {}  # too few pairs to judge (the --tiny demo)


def test_spectra_steps_flag_turns_the_multimodal_stage_on(tmp_path):
    parser = argparse.ArgumentParser()
    demo_mod.add_arguments(parser)
    assert demo_mod.config_from_args(parser.parse_args(["--out", str(tmp_path)])).spectra_steps == 300  # on by default
    off = parser.parse_args(["--out", str(tmp_path), "--spectra-steps", "0"])
    assert demo_mod.config_from_args(off).spectra_steps == 0
    cfg = demo_mod.config_from_args(parser.parse_args(["--out", str(tmp_path), "--tiny", "--spectra-steps", "5"]))
    assert cfg.spectra_steps == 5 and cfg.spectra_preset == "debug"


def test_align_steps_flag_follows_the_multimodal_stage(tmp_path):
    parser = argparse.ArgumentParser()
    demo_mod.add_arguments(parser)
    assert demo_mod.config_from_args(parser.parse_args(["--out", str(tmp_path)])).align_steps == 120  # on by default
    assert demo_mod.config_from_args(parser.parse_args(["--out", str(tmp_path), "--align-steps", "0"])).align_steps == 0
    # without the multimodal stage there is no spectrum encoder: the default stage is skipped, an explicit one refused
    off = demo_mod.config_from_args(parser.parse_args(["--out", str(tmp_path), "--spectra-steps", "0"]))
    assert off.spectra_steps == 0
    argv = ["--out", str(tmp_path), "--spectra-steps", "0", "--align-steps", "9"]
    with pytest.raises(ValueError, match="--spectra-steps"):
        demo_mod.config_from_args(parser.parse_args(argv))


@pytest.mark.slow  # a 200-object survey, a few multimodal steps, three probed columns, generation: ~40 s
def test_multimodal_stage_probes_each_column_and_generates_spectra(tmp_path):
    from dataclasses import replace

    from astrolom.eval.embeddings import load_embeddings
    from astrolom.eval.probe_columns import load_columns
    from astrolom.eval.report import build_report
    from astrolom.mock import generate_survey

    survey = generate_survey(tmp_path / "survey", n=200, size=32, seed=3, workers=1, progress=False)
    cfg = replace(demo_mod.TINY, spectra_steps=3, batch_size=8, methods=("linear",))
    summary = demo_mod.multimodal_stage(tmp_path, survey, cfg)
    folder = tmp_path / "multimodal"
    run_cfg = json.loads((folder / "run" / "final" / "config.json").read_text())
    assert run_cfg["model"]["modalities"] == ["images", "spectra"] and run_cfg["model"]["modality_order"] == "random"
    # every column is probed on the val/test objects that have a spectrum (the spectra column is null elsewhere)
    emb = load_embeddings(folder / "embeddings.parquet", "embedding_images")
    with_spectrum = int(np.nansum(emb.labels["has_spectrum"]))
    assert 0 < with_spectrum < len(emb)
    results = load_columns(folder / "probes" / "columns.json")
    assert list(results) == ["embedding_images", "embedding_spectra", "embedding_joint"]
    assert {r.protocol["rows"] for r in results.values()} == {with_spectrum} == {summary["rows"]}
    assert summary["linear"]["embedding_spectra"]["redshift"] == results["embedding_spectra"].score("redshift")
    assert summary["best_column"]["redshift"] in results
    assert (folder / "probes" / "embedding_joint" / "probes.json").is_file()
    gen = json.loads((folder / "generate" / "metrics.json").read_text())
    assert gen["from"] == "images" and gen["to"] == "spectra" and gen["objects"] == cfg.spectra_generate
    assert summary["generation"]["huber_model"] == gen["huber_model"] > 0
    assert (folder / "generate" / "generated_spectra.png").stat().st_size > 0
    doc = build_report(tmp_path, umap=False, inpainting=False).read_text()
    assert "<h2>Multimodal</h2>" in doc and "<td>images → spectra</td>" in doc
