"""The demo end to end at tiny size: survey -> pretrain -> embed -> probe (control + baselines) -> report."""

from __future__ import annotations

import json
import time

import pytest


@pytest.mark.slow
def test_tiny_demo(tmp_path, capsys):
    from astrolom.cli import main

    t0 = time.perf_counter()
    assert main(["demo", "--out", str(tmp_path), "--tiny"]) == 0
    elapsed = time.perf_counter() - t0
    assert elapsed < 120, f"tiny demo took {elapsed:.0f} s"
    printed = capsys.readouterr().out
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert stage in printed  # progress is shown
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
            assert set(scores) == ({"accuracy", "f1"} if target == "telescope" else {"r2", "mae"})
        assert set(probes["results"]["cnn"][target]) == {"supervised"}
    demo = json.loads((tmp_path / "demo.json").read_text())
    assert set(demo["timings_s"]) == {"survey", "pretrain", "embed", "probes", "report"}
    assert demo["settings"]["preset"] == "debug"
    assert any(k.startswith("redshift: pretrained >") for k in demo["checks"])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
