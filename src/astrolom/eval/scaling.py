"""Scaling sweeps: `astrolom scaling --data DIR --presets 1m,5m,12m --out DIR [--max-steps N | --tokens T]`.

For each preset in turn: pretrain (`astrolom pretrain`, in this process or through `--launcher "torchrun ..."`),
embed the fit and test splits with the final model, and probe them linearly. Then:

- fit the saturating power law L(C) = L_inf + (C0 / C)^alpha to the validation loss against training compute C,
  on the compute-efficient frontier of all runs (the lowest loss reached at or below each C), by least squares on
  log L (`scipy.optimize.curve_fit`, parameters L_inf, alpha and log C0, bounds 0 <= L_inf < min L, 0 < alpha <= 5,
  several starting points), with residual-bootstrap errors on every parameter and the fit's R² on log L;
- Figure 2 (validation loss against FLOPs and tokens), Figure 4 (probe score against pretraining FLOPs per property)
  and a table of Spearman's rho (`scipy.stats.spearmanr`) between each model's total pretraining FLOPs and its probe
  score, per property (the paper's sec. 3 test; with fewer than 3 models rho is reported but its p-value is not);
- pass/fail checks (`checks`): the fit converged, R² >= 0.95, L_inf and alpha off their bounds, alpha measured
  (bootstrap error < alpha / 2), and per property rho > 0 with p < 0.05.

Outputs in DIR: runs/<preset>/ (the pretraining runs), embeddings/<preset>.parquet, scaling.json, scaling.md,
fig2_loss.{png,pdf}, fig4_probe_vs_flops.{png,pdf}. Finished runs are reused when the sweep is re-run (`--retrain`
starts them again), so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import optimize, stats

from astrolom import layout
from astrolom.config import apply_overrides, comma_list
from astrolom.data.sources import open_source
from astrolom.eval.embed import embed_dataset
from astrolom.eval.embeddings import load_embeddings
from astrolom.eval.figures import plot_loss_curves, plot_probe_vs_flops
from astrolom.eval.probes import HEADLINE_TARGETS, evaluate
from astrolom.log import get_logger
from astrolom.model.presets import get_preset
from astrolom.model.pretrained import load_model
from astrolom.train.config import PretrainConfig
from astrolom.train.pretrain import make_config, pretrain

log = get_logger(__name__)


# ---------------------------------------------------------------------------------------------------- the fit


def scaling_law(c: np.ndarray, l_inf: float, c0: float, alpha: float) -> np.ndarray:
    """L(C) = L_inf + (C0 / C)^alpha."""
    return l_inf + (c0 / np.asarray(c, dtype=np.float64)) ** alpha


def _log_model(x, l_inf, alpha, ln_c0):
    """log L(C) with x = ln(C / c_ref) and C0 = c_ref exp(ln_c0)."""
    return np.log(l_inf + np.exp(np.clip(alpha * (ln_c0 - x), -700, 700)))


def _bounds(y_min: float) -> tuple[list[float], list[float]]:
    return [0.0, 1e-4, -1e3], [y_min * (1 - 1e-9), 5.0, 1e3]


def _curve_fit(x: np.ndarray, ly: np.ndarray, p0, y_min: float):
    """One bounded least-squares fit of log L; (ssr, popt, pcov) or None when it fails."""
    lo, hi = _bounds(y_min)
    p0 = list(np.clip(p0, np.array(lo) + 1e-12, np.array(hi) - 1e-12))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            popt, pcov = optimize.curve_fit(_log_model, x, ly, p0=p0, bounds=(lo, hi), maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    return float(np.sum((_log_model(x, *popt) - ly) ** 2)), popt, pcov


def _best_fit(x: np.ndarray, y: np.ndarray, n_starts: int):
    """Best of several starts (L_inf from 0 to 0.95 min L, alpha and C0 from a line through log(L - L_inf))."""
    ly, y_min, best = np.log(y), float(y.min()), None
    for frac in np.linspace(0.0, 0.95, n_starts):
        l0 = frac * y_min
        resid = y - l0
        if np.any(resid <= 0):
            continue
        slope, intercept = np.polyfit(x, np.log(resid), 1)  # log(L - L_inf) = alpha ln C0 - alpha x
        a0 = float(np.clip(-slope, 1e-3, 4.9))
        got = _curve_fit(x, ly, [l0, a0, float(intercept / a0)], y_min)
        if got is not None and (best is None or got[0] < best[0]):
            best = got
    return best


def fit_scaling_law(flops, loss, n_starts: int = 6, n_boot: int = 300, seed: int = 0) -> dict:
    """Fit L(C) = L_inf + (C0 / C)^alpha in log space; parameters with bootstrap errors and the fit's R².

    Parametrised as log L = log(L_inf + exp(alpha * (ln C0 - ln C))), with C scaled by the geometric mean of the data
    so the optimiser sees numbers of order one. Needs at least 4 points with distinct C.

    Errors: a residual bootstrap (`n_boot` replicates; the fitted curve plus resampled log-space residuals, refitted),
    whose standard deviations are `*_err` and 16th-84th percentiles `*_ci68`; a few points with a smooth curve
    through them make the covariance errors (`*_err_cov`, kept for comparison) over-optimistic when a parameter
    is close to its bound. `r2` is the coefficient of determination of the fit on log L (1 - SS_res / SS_tot).
    """
    c = np.asarray(flops, dtype=np.float64)
    y = np.asarray(loss, dtype=np.float64)
    ok = np.isfinite(c) & np.isfinite(y) & (c > 0) & (y > 0)
    c, y = c[ok], y[ok]
    out: dict = {"ok": False, "n_points": int(len(c))}
    if len(np.unique(c)) < 4:
        out["reason"] = "need at least 4 points with distinct compute"
        return out
    c_ref = float(np.exp(np.mean(np.log(c))))
    x = np.log(c / c_ref)
    ly = np.log(y)
    y_min = float(y.min())
    best = _best_fit(x, y, n_starts)
    if best is None:
        out["reason"] = "curve_fit did not converge from any starting point"
        return out
    ssr, popt, pcov = best
    l_inf, alpha, ln_c0 = (float(v) for v in popt)
    err = np.sqrt(np.clip(np.diag(pcov), 0, None)) if np.all(np.isfinite(pcov)) else np.full(3, np.nan)
    sst = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - ssr / sst if sst > 0 else float("nan")
    log10_c0 = (ln_c0 + math.log(c_ref)) / math.log(10)
    boot = bootstrap_scaling_law(x, ly, popt, n_boot=n_boot, seed=seed)
    ln10 = math.log(10)
    out.update(
        ok=True,
        L_inf=l_inf,
        alpha=alpha,
        log10_C0=float(log10_c0),
        C0=float(10**log10_c0),
        L_inf_err=boot["std"][0],
        alpha_err=boot["std"][1],
        log10_C0_err=boot["std"][2] / ln10,
        L_inf_ci68=boot["ci68"][0],
        alpha_ci68=boot["ci68"][1],
        log10_C0_ci68=[(v + math.log(c_ref)) / ln10 for v in boot["ci68"][2]],
        L_inf_err_cov=float(err[0]),
        alpha_err_cov=float(err[1]),
        log10_C0_err_cov=float(err[2] / ln10),
        n_boot=boot["n"],
        boot_failed=boot["failed"],
        r2=float(r2),
        c_min=float(c.min()),
        c_max=float(c.max()),
        rms_log_residual=float(math.sqrt(ssr / len(c))),
        # a parameter on its bound is not measured by the data (e.g. L_inf at min L: no sign of saturation yet,
        # or the curve has already flattened to its last point)
        at_bound=[
            name
            for name, v, lo, hi in (("L_inf", l_inf, 0.0, y_min), ("alpha", alpha, 1e-4, 5.0))
            if min(abs(v - lo), abs(hi - v)) <= 1e-6 * max(1.0, abs(hi))
        ],
    )
    return out


def bootstrap_scaling_law(x: np.ndarray, ly: np.ndarray, popt, n_boot: int = 300, seed: int = 0) -> dict:
    """Residual bootstrap of the log-space fit: refit `fitted + resampled residuals` `n_boot` times.

    x = ln(C / c_ref), ly = log L, popt = (L_inf, alpha, ln C0 relative to c_ref) of the best fit. Residuals are
    rescaled by sqrt(n / (n - 3)) (three fitted parameters), the usual correction for their shrinkage. Each replicate
    starts from `popt`. Returns std and 16th/84th percentiles of each parameter over the converged replicates.
    """
    n = len(x)
    fitted = _log_model(x, *popt)
    resid = (ly - fitted) * math.sqrt(n / max(n - 3, 1))
    rng = np.random.default_rng(seed)
    draws, failed = [], 0
    for _ in range(n_boot):
        ly_b = fitted + rng.choice(resid, size=n, replace=True)
        got = _curve_fit(x, ly_b, popt, float(np.exp(ly_b).min()))
        if got is None:
            failed += 1
            continue
        draws.append(got[1])
    if len(draws) < 2:
        nan = float("nan")
        return {"std": [nan] * 3, "ci68": [[nan, nan]] * 3, "n": len(draws), "failed": failed}
    d = np.array(draws)
    return {
        "std": [float(v) for v in d.std(axis=0, ddof=1)],
        "ci68": [[float(a), float(b)] for a, b in np.percentile(d, [16, 84], axis=0).T],
        "n": len(draws),
        "failed": failed,
    }


def frontier(points) -> list[tuple[float, float]]:
    """Compute-efficient frontier: points (C, L), sorted by C, whose L is below every point at smaller C."""
    out, best = [], math.inf
    for c, loss in sorted(points):
        if loss < best:
            out.append((c, loss))
            best = loss
    return out


def spearman(flops, scores, exact_max: int = 8) -> dict:
    """Spearman's rho between FLOPs and a probe score, with a two-sided p-value.

    For up to `exact_max` models the p-value is exact (the fraction of all orderings with |rho| at least as large):
    the t-approximation `scipy.stats.spearmanr` uses says p = 0 for any perfect ranking, even of 3 models, where
    the exact value is 1/3. No p-value for fewer than 3 models.
    """
    f, s = np.asarray(flops, float), np.asarray(scores, float)
    ok = np.isfinite(f) & np.isfinite(s)
    f, s = f[ok], s[ok]
    n = int(len(f))
    if n < 2 or np.unique(s).size < 2:
        return {"rho": None, "p": None, "n": n}
    rho = float(stats.spearmanr(f, s).statistic)
    if n < 3:
        p = None
    elif n <= exact_max:
        rf, rs = stats.rankdata(f), stats.rankdata(s)
        perms = np.array(list(itertools.permutations(range(n))))
        null = np.array([stats.pearsonr(rf, rs[q]).statistic for q in perms])
        p = float(np.mean(np.abs(null) >= abs(rho) - 1e-12))
    else:
        p = float(stats.spearmanr(f, s).pvalue)
    return {"rho": rho, "p": p, "n": n}


# ------------------------------------------------------------------------------------------------ run records


def read_metrics(run_dir: str | Path) -> list[dict]:
    """RUN/metrics.jsonl as a list of dicts (later lines win for a repeated step, as after a resume)."""
    path = Path(run_dir) / layout.METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {layout.METRICS_NAME} in {run_dir}")
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            step = int(row.get("step", len(by_step)))
            by_step[step] = {**by_step.get(step, {}), **row}
    return [by_step[k] for k in sorted(by_step)]


def val_points(rows: list[dict]) -> list[tuple[float, float]]:
    """(FLOPs, validation loss) of the validation passes after training started."""
    return [(r["flops"], r["val_loss"]) for r in rows if r.get("val_loss") is not None and r.get("flops", 0) > 0]


# ----------------------------------------------------------------------------------------------------- the sweep


def _pretrain(data: str, preset: str, run_dir: Path, steps: int, overrides: list[str], launcher: str | None) -> None:
    if launcher:  # torchrun and friends start their own processes: hand them the command line
        argv = ["pretrain", "--data", data, "--preset", preset, "--out", str(run_dir), "--max-steps", str(steps)]
        subprocess.run([*shlex.split(launcher), "-m", "astrolom", *argv, *overrides], check=True)
        return
    cfg = make_config(data=data, preset=preset, out=run_dir, max_steps=steps, overrides=overrides)
    summary = pretrain(cfg)
    if not summary["finished"]:
        raise RuntimeError(f"pretraining {preset} stopped at step {summary['step']} of {steps}; see {run_dir}")


def steps_for_tokens(data: str, tokens: float, overrides: list[str]) -> int:
    """Optimiser steps that make `tokens` predicted tokens, from the batch size and stamp size training will use."""
    cfg = apply_overrides(PretrainConfig(), overrides)
    src = open_source(data, spectra=False)
    h, w = src.image_shape[:2]
    src.close()
    if cfg.data.image_size:
        h = w = cfg.data.image_size
    p = cfg.data.patch_size
    per_step = cfg.train.batch_size * ((h // p) * (w // p) - 1)
    return max(1, math.ceil(tokens / per_step))


def run_sweep(
    data: str,
    presets: list[str],
    out: str | Path,
    *,
    max_steps: int | None = None,
    tokens: float | None = None,
    overrides: list[str] | None = None,
    targets: tuple[str, ...] = HEADLINE_TARGETS,
    fit_split: str = "val",
    test_split: str = "test",
    launcher: str | None = None,
    retrain: bool = False,
    batch_size: int = 64,
) -> dict:
    """Pretrain, embed and probe each preset; fit L(C); write figures and tables. Returns the summary dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides or [])
    for p in presets:
        get_preset(p)  # fail before hours of training, not after
    if tokens is not None:
        steps = steps_for_tokens(data, tokens, overrides)
    elif max_steps is not None:
        steps = max_steps
    else:
        raise ValueError("give --max-steps or --tokens")
    models: dict[str, dict] = {}
    curves: dict[str, list[dict]] = {}
    for i, preset in enumerate(presets):
        run_dir = out / "runs" / preset
        t0 = time.perf_counter()
        if retrain or not (run_dir / layout.FINAL_DIR / layout.WEIGHTS_NAME).is_file():
            if retrain and run_dir.exists():
                shutil.rmtree(run_dir)
            log.info("[%d/%d] pretraining %s for %d steps -> %s", i + 1, len(presets), preset, steps, run_dir)
            _pretrain(data, preset, run_dir, steps, overrides, launcher)
        else:
            log.info("[%d/%d] reusing finished run %s", i + 1, len(presets), run_dir)
        rows = read_metrics(run_dir)
        curves[preset] = rows
        model, meta = load_model(str(run_dir))
        emb_path = out / "embeddings" / f"{preset}.parquet"
        embed_dataset(model, data, emb_path, splits=(fit_split, test_split), batch_size=batch_size, metadata=meta)
        result = evaluate(load_embeddings(emb_path), list(targets), ("linear",), fit_split, test_split)
        scores = {t: result.score(t, "pretrained", "linear") for t in result.targets}
        last = rows[-1]
        models[preset] = {
            "params": model.num_params(),
            "flops": float(last.get("flops", 0.0)),
            "tokens": float(last.get("tokens_seen", 0.0)),
            "steps": int(last.get("step", 0)),
            "final_val_loss": next((r["val_loss"] for r in reversed(rows) if r.get("val_loss") is not None), None),
            "scores": scores,
            "metrics": {t: result.metric(t) for t in result.targets},
            "seconds": time.perf_counter() - t0,
        }
        log.info("  %s: val loss %s, probe %s", preset, models[preset]["final_val_loss"], json.dumps(_rounded(scores)))
    summary = summarise(models, curves)
    summary["sweep"] = {"data": data, "presets": presets, "steps": steps, "overrides": overrides}
    (out / layout.SCALING_JSON).write_text(json.dumps(summary, indent=2))
    (out / "scaling.md").write_text(markdown(summary))
    params = {k: v["params"] for k, v in models.items()}
    plot_loss_curves(curves, out / "fig2_loss", params=params, fit=summary["fit"])
    names = list(models)
    targets_seen = list(summary["spearman"])
    points = {t: [(models[m]["flops"], models[m]["scores"][t], m) for m in names] for t in targets_seen}
    metric_names = {t: models[names[0]]["metrics"][t] for t in targets_seen}
    plot_probe_vs_flops(points, summary["spearman"], out / "fig4_probe_vs_flops", metric_names)
    log.info((out / "scaling.md").read_text())
    return summary


def _rounded(d: dict) -> dict:
    return {k: round(v, 3) for k, v in d.items()}


def summarise(models: dict[str, dict], curves: dict[str, list[dict]]) -> dict:
    """Fit L(C) on the frontier of every run's validation curve; Spearman rho per probed property."""
    pts = [p for rows in curves.values() for p in val_points(rows)]
    front = frontier(pts)
    fit = fit_scaling_law([c for c, _ in front], [v for _, v in front])
    fit["points"] = "compute-efficient frontier of all validation curves"
    names = list(models)
    targets = list(models[names[0]]["scores"]) if names else []
    rho = {
        t: spearman([models[m]["flops"] for m in names], [models[m]["scores"].get(t, np.nan) for m in names])
        for t in targets
    }
    return {"models": models, "fit": fit, "spearman": rho, "checks": checks(fit, rho)}


MIN_R2 = 0.95  # the fit must explain this much of the variance of log L to be quoted
MAX_P = 0.05  # Spearman p-value for "probe score rises with compute"


def checks(fit: dict, rho: dict) -> dict[str, bool]:
    """Pass/fail flags for the sweep: is the L(C) fit worth quoting, and does each probe score rise with FLOPs?"""
    out = {
        "L(C) fitted": bool(fit.get("ok")),
        f"fit R2 >= {MIN_R2}": bool(fit.get("ok") and fit.get("r2", float("nan")) >= MIN_R2),
        "L_inf and alpha off their bounds": bool(fit.get("ok") and not fit.get("at_bound")),
        "alpha measured (bootstrap error < alpha / 2)": bool(
            fit.get("ok") and math.isfinite(fit.get("alpha_err", math.nan)) and fit["alpha_err"] < fit["alpha"] / 2
        ),
    }
    for t, r in rho.items():
        out[f"{t}: rho > 0 with p < {MAX_P}"] = bool(r["rho"] is not None and r["p"] is not None and r["rho"] > 0
                                                    and r["p"] < MAX_P)  # fmt: skip
    return out


def markdown(summary: dict) -> str:
    models, fit, rho = summary["models"], summary["fit"], summary["spearman"]
    names = list(models)
    lines = ["| model | params | FLOPs | tokens | final val loss | " + " | ".join(rho) + " |"]
    lines.append("|---|---|---|---|---|" + "---|" * len(rho))
    for m in names:
        d = models[m]
        vl = "-" if d["final_val_loss"] is None else f"{d['final_val_loss']:.4f}"
        cells = " | ".join(f"{d['scores'].get(t, float('nan')):.3f}" for t in rho)
        lines.append(f"| {m} | {d['params']:,} | {d['flops']:.3g} | {d['tokens']:.3g} | {vl} | {cells} |")
    lines.append(
        "| **Spearman rho (FLOPs vs score)** | | | | | "
        + " | ".join(
            "-" if r["rho"] is None else f"{r['rho']:.2f}" + ("" if r["p"] is None else f" (p={r['p']:.2g})")
            for r in rho.values()
        )  # fmt: skip
        + " |"
    )
    lines.append("")
    if fit.get("ok"):
        lines.append(
            f"L(C) = L_inf + (C0/C)^alpha on {fit['n_points']} frontier points: L_inf = {fit['L_inf']:.4f} "
            f"± {fit['L_inf_err']:.4f}, alpha = {fit['alpha']:.3f} ± {fit['alpha_err']:.3f}, "
            f"log10 C0 = {fit['log10_C0']:.2f} ± {fit['log10_C0_err']:.2f} (± : bootstrap std over "
            f"{fit['n_boot']} residual resamples); R² = {fit['r2']:.4f} on log L, rms log residual "
            f"{fit['rms_log_residual']:.4f}"
            + (f"; on a bound, not constrained by the data: {', '.join(fit['at_bound'])}" if fit["at_bound"] else "")
        )
    else:
        lines.append(f"L(C) not fitted: {fit.get('reason')}")
    flags = summary.get("checks") or checks(fit, rho)
    lines += ["", "| check | pass |", "|---|---|"] + [f"| {k} | {'yes' if v else 'NO'} |" for k, v in flags.items()]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data set to pretrain and probe on")
    parser.add_argument(
        "--presets", required=True, help="comma-separated presets (1m,5m,12m) or custom sizes LAYERSxWIDTH (2x48,3x96)"
    )
    parser.add_argument("--out", required=True, help="sweep directory")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-steps", type=int, help="optimiser steps per model")
    budget.add_argument("--tokens", type=float, help="predicted tokens per model (steps from batch and stamp size)")
    parser.add_argument("--targets", default=",".join(HEADLINE_TARGETS), help="properties to probe")
    parser.add_argument("--fit-split", default="val")
    parser.add_argument("--test-split", default="test")
    parser.add_argument(
        "--launcher", default=None, help='run each pretraining through a launcher, e.g. "torchrun --nproc_per_node 8"'
    )
    parser.add_argument("--retrain", action="store_true", help="retrain presets whose runs already finished")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="pretraining overrides for every preset"
    )


def run(args: argparse.Namespace) -> int:
    run_sweep(
        args.data,
        list(comma_list(args.presets, name="--presets")),
        args.out,
        max_steps=args.max_steps,
        tokens=args.tokens,
        overrides=args.overrides,
        targets=comma_list(args.targets, name="--targets"),
        fit_split=args.fit_split,
        test_split=args.test_split,
        launcher=args.launcher,
        retrain=args.retrain,
    )
    return 0
