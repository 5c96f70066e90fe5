"""Scaling-law fit on synthetic curves, the compute frontier, Spearman rho, and a sweep at a tiny budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

from astrolom.eval import scaling as sc


@pytest.mark.parametrize(("l_inf", "c0", "alpha"), [(0.30, 1e12, 0.25), (0.05, 1e9, 0.5), (0.0, 1e15, 0.1)])
def test_fit_recovers_known_law(l_inf, c0, alpha):
    rng = np.random.default_rng(0)
    c = np.logspace(13, 18, 25)
    loss = sc.scaling_law(c, l_inf, c0, alpha) * np.exp(0.005 * rng.normal(size=c.size))  # 0.5% scatter
    fit = sc.fit_scaling_law(c, loss, n_boot=100)
    assert fit["ok"] and fit["r2"] > 0.99
    assert fit["alpha"] == pytest.approx(alpha, rel=0.1)
    assert abs(fit["alpha"] - alpha) < 4 * fit["alpha_err"] + 1e-3  # the quoted error is honest
    assert abs(fit["L_inf"] - l_inf) < 3 * fit["L_inf_err"] + 0.01
    assert fit["log10_C0"] == pytest.approx(np.log10(c0), abs=0.5)
    assert fit["rms_log_residual"] < 0.01


@pytest.mark.slow
def test_bootstrap_errors_cover_the_true_law():
    """Ten noisy 12-point sweeps of a known law: the bootstrap 68% interval holds the true alpha in most of them."""
    c = np.logspace(13, 17, 12)
    truth = {"l_inf": 0.25, "c0": 1e12, "alpha": 0.3}
    inside, within_2sigma, r2 = 0, 0, []
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        loss = sc.scaling_law(c, truth["l_inf"], truth["c0"], truth["alpha"]) * np.exp(0.01 * rng.normal(size=c.size))
        fit = sc.fit_scaling_law(c, loss, n_boot=100, seed=seed)
        assert fit["ok"] and fit["n_boot"] >= 90 and fit["boot_failed"] <= 10
        lo, hi = fit["alpha_ci68"]
        inside += lo <= truth["alpha"] <= hi
        within_2sigma += abs(fit["alpha"] - truth["alpha"]) < 2 * fit["alpha_err"]
        assert 0.0 < fit["alpha_err"] < 0.3 and 0.0 < fit["L_inf_err"] < 0.2
        lo, hi = fit["L_inf_ci68"]
        assert lo <= fit["L_inf"] + 1e-9 and hi >= fit["L_inf"] - 0.05
        r2.append(fit["r2"])
    assert inside >= 5 and within_2sigma >= 8  # nominal 6.8 and 9.5 of 10
    assert min(r2) > 0.98


@pytest.mark.slow
def test_fit_r2_and_checks_fail_on_flat_noise():
    rng = np.random.default_rng(3)
    c = np.logspace(13, 16, 8)
    fit = sc.fit_scaling_law(c, 0.4 * np.exp(0.02 * rng.normal(size=c.size)), n_boot=50)
    # noise with no trend: whatever curve fits, it explains little of it (or sits on a bound)
    flags = sc.checks(fit, {})
    assert not (flags["fit R2 >= 0.95"] and flags["L_inf and alpha off their bounds"])
    good = sc.fit_scaling_law(
        c, sc.scaling_law(c, 0.3, 1e11, 0.3) * np.exp(0.002 * rng.normal(size=c.size)), n_boot=100
    )
    assert good["r2"] > 0.99
    flags = sc.checks(good, {"redshift": {"rho": 0.9, "p": 0.01, "n": 6}, "smooth": {"rho": 1.0, "p": 0.33, "n": 3}})
    assert flags["fit R2 >= 0.95"] and flags["L_inf and alpha off their bounds"]
    assert flags["alpha measured (bootstrap error < alpha / 2)"]
    assert flags["redshift: rho > 0 with p < 0.05"] and not flags["smooth: rho > 0 with p < 0.05"]


def test_bootstrap_is_deterministic():
    c = np.logspace(13, 16, 8)
    loss = sc.scaling_law(c, 0.3, 1e11, 0.3) * np.exp(0.01 * np.sin(np.arange(8.0)))
    a, b = sc.fit_scaling_law(c, loss, n_boot=40, seed=1), sc.fit_scaling_law(c, loss, n_boot=40, seed=1)
    assert a["alpha_err"] == b["alpha_err"] and a["L_inf_ci68"] == b["L_inf_ci68"]


def test_fit_flags_unconstrained_floor():
    c = np.logspace(12, 15, 12)
    assert sc.fit_scaling_law(c, sc.scaling_law(c, 0.3, 1e11, 0.3))["at_bound"] == []
    loss = 0.33 + 0.1 * (1e12 / c) ** 2  # flat after the first few points: L_inf sits at the lowest loss
    fit = sc.fit_scaling_law(c, loss)
    assert fit["ok"] and "L_inf" in fit["at_bound"]


def test_fit_needs_enough_points():
    fit = sc.fit_scaling_law([1e12, 1e13, 1e14], [1.0, 0.9, 0.8])
    assert not fit["ok"] and "at least 4" in fit["reason"]


def test_frontier_and_spearman():
    pts = [(1, 5.0), (2, 4.0), (3, 4.5), (4, 3.0), (2.5, 3.5)]
    assert sc.frontier(pts) == [(1, 5.0), (2, 4.0), (2.5, 3.5), (4, 3.0)]
    up = sc.spearman([1e12, 1e13, 1e14, 1e15], [0.1, 0.3, 0.35, 0.6])
    assert up["rho"] == pytest.approx(1.0) and up["p"] == pytest.approx(2 / 24) and up["n"] == 4  # exact
    down = sc.spearman([1e12, 1e13, 1e14], [0.6, 0.3, 0.1])
    assert down["rho"] == pytest.approx(-1.0) and down["p"] == pytest.approx(1 / 3)  # not the t-approximation's 0
    many = sc.spearman(np.arange(12.0), np.arange(12.0) + 0.01 * np.sin(np.arange(12.0)))
    assert many["rho"] == pytest.approx(1.0) and many["p"] < 1e-6
    two = sc.spearman([1e12, 1e13], [0.1, 0.2])
    assert two["rho"] == pytest.approx(1.0) and two["p"] is None  # no p-value from two models


def test_read_metrics_merges_repeated_steps(tmp_path):
    rows = [{"step": 1, "loss": 1.0, "flops": 1e9}, {"step": 2, "loss": 0.9, "flops": 2e9},
            {"step": 2, "val_loss": 0.95}, {"step": 3, "loss": 0.8, "flops": 3e9}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = sc.read_metrics(tmp_path)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got[1] == {"step": 2, "loss": 0.9, "flops": 2e9, "val_loss": 0.95}
    assert sc.val_points(got) == [(2e9, 0.95)]


def test_summary_and_markdown():
    models = {
        name: {"params": p, "flops": f, "tokens": f / 6 / p, "steps": 10, "final_val_loss": v,
               "scores": {"redshift": s, "telescope": a}, "metrics": {"redshift": "r2", "telescope": "accuracy"}}
        for name, p, f, v, s, a in [("1m", 1e6, 1e14, 0.4, 0.3, 0.7), ("5m", 5e6, 5e14, 0.35, 0.4, 0.75),
                                    ("12m", 1.2e7, 1.2e15, 0.33, 0.45, 0.74)]
    }  # fmt: skip
    c = np.logspace(12, 15, 12)
    curves = {"1m": [{"step": i, "flops": x, "val_loss": float(sc.scaling_law(x, 0.3, 1e10, 0.3))}
                     for i, x in enumerate(c)]}  # fmt: skip
    s = sc.summarise(models, curves)
    assert s["spearman"]["redshift"]["rho"] == pytest.approx(1.0)
    assert s["spearman"]["telescope"]["rho"] == pytest.approx(0.5)
    assert s["fit"]["ok"] and s["fit"]["alpha"] == pytest.approx(0.3, rel=0.05)
    md = sc.markdown(s)
    assert "Spearman rho" in md and "| 12m |" in md and "alpha = 0.30" in md
    assert "R² = " in md and "bootstrap" in md and "| fit R2 >= 0.95 | yes |" in md
    assert s["checks"]["redshift: rho > 0 with p < 0.05"] is False  # rho = 1 on 3 models: exact p = 1/3


@pytest.mark.slow
def test_tiny_sweep(mock_survey, tmp_path):
    from astrolom.cli import main

    out = tmp_path / "sweep"
    overrides = ["data.patch_size=8", "train.batch_size=4", "train.eval_interval=1", "train.eval_samples=4",
                 "train.progress=false", "train.tensorboard=false", "train.checkpoint_interval=0"]  # fmt: skip
    rc = main(["scaling", "--data", str(mock_survey), "--presets", "debug,1m", "--out", str(out), "--max-steps", "4",
               "--targets", "redshift,g_minus_r,telescope", *overrides])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "scaling.json").read_text())
    assert list(summary["models"]) == ["debug", "1m"]
    assert summary["models"]["1m"]["flops"] > summary["models"]["debug"]["flops"] > 0
    assert summary["models"]["1m"]["steps"] == 4
    assert set(summary["spearman"]) == {"redshift", "g_minus_r", "telescope"}
    assert summary["fit"]["n_points"] >= 4  # validation after every step of both runs
    for name in ("fig2_loss", "fig4_probe_vs_flops"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.pdf").stat().st_size > 0
    assert "Spearman rho" in (out / "scaling.md").read_text()
    # re-running reuses the finished runs instead of training again
    mtime = (out / "runs" / "1m" / "final" / "model.safetensors").stat().st_mtime
    assert main(["scaling", "--data", str(mock_survey), "--presets", "debug,1m", "--out", str(out), "--max-steps",
                 "4", "--targets", "redshift", *overrides]) == 0  # fmt: skip
    assert (out / "runs" / "1m" / "final" / "model.safetensors").stat().st_mtime == mtime
