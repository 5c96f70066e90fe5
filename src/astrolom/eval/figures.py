"""The paper's figures for your own runs (matplotlib, Agg backend; every figure is written as PNG and PDF).

- `plot_loss_curves`: Figure 2, validation loss against training FLOPs and against tokens seen, one line per model,
  with the fitted L(C) = L_inf + (C0 / C)^alpha when given.
- `plot_umap`: Figure 3, a UMAP of the embeddings as a hexbin grid coloured by the mean of each property per bin;
  `plot_telescope` the same map coloured by telescope (the paper's "islands").
- `plot_probe_vs_flops`: Figure 4, probe score against pretraining FLOPs per property, with Spearman's rho.
- `plot_probe_summary`: probe scores of the pretrained model beside its control and the baselines.
- `plot_predicted_vs_true`: AstroCLIP Figs. 3-4 layout for one property: a density (hexbin) of predicted against
  true with the 1:1 line and the metrics of `astrolom.eval.metrics` written on it, residuals below (dz / (1 + z) for
  redshift, with the outlier limits); `plot_predictions` draws one per property of a `PredictionSet` group.
- `plot_inpainting`: truth, the central k spiral tokens the model saw, and its completion (from
  `astrolom.eval.inpaint.inpaint`, which explains the pixel units).

Plots only: these functions draw results computed elsewhere and never run a model.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from astrolom.data.display import display_rgb  # noqa: E402
from astrolom.eval import metrics as mt  # noqa: E402
from astrolom.eval.probes import ProbeResult  # noqa: E402

SET_COLOURS = {
    "pretrained": "#1f77b4",
    "random_init": "#7f7f7f",
    "pca_pixels": "#2ca02c",
    "photometry": "#ff7f0e",
    "cnn": "#d62728",
}
UMAP_PROPERTIES = (
    "redshift",
    "log_mstar",
    "log_ssfr",
    "g_minus_r",
    "abs_mag_g",
    "abs_mag_z",
    "sersic_n",
    "smooth",
    "disc",
    "edge_on_vote",
    "spiral",
    "telescope",
)


def save(fig, stem: str | Path) -> dict[str, Path]:
    """Write `stem.png` (150 dpi) and `stem.pdf`; returns their paths keyed by format."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt in ("png", "pdf"):
        paths[fmt] = stem.with_suffix(f".{fmt}")
        fig.savefig(paths[fmt], dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out `fig`, write it to `path` (its format by the extension; parent directories made), close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _human(x: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


# ------------------------------------------------------------------------------------------------ Figure 2


def plot_loss_curves(
    runs: dict[str, list[dict]],
    stem: str | Path,
    params: dict[str, float] | None = None,
    fit: dict | None = None,
) -> dict[str, Path]:
    """Validation loss vs FLOPs (left) and vs tokens (right), one line per run; `fit` overlays L(C)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    names = sorted(runs, key=lambda n: (params or {}).get(n, 0))
    for i, name in enumerate(names):
        rows = [r for r in runs[name] if r.get("val_loss") is not None and r.get("flops", 0) > 0]
        if not rows:
            continue
        colour = cmap(i / max(1, len(names) - 1)) if len(names) > 1 else "#1f77b4"
        label = name if not params or name not in params else f"{name} ({_human(params[name])} params)"
        flops = [r["flops"] for r in rows]
        tokens = [r.get("tokens_seen", r.get("tokens", 0)) for r in rows]
        loss = [r["val_loss"] for r in rows]
        axes[0].plot(flops, loss, "-o", ms=2.5, color=colour, label=label)
        axes[1].plot(tokens, loss, "-o", ms=2.5, color=colour, label=label)
    if fit and fit.get("ok"):
        c = np.logspace(math.log10(fit["c_min"]), math.log10(fit["c_max"]), 200)
        axes[0].plot(
            c,
            fit["L_inf"] + (fit["C0"] / c) ** fit["alpha"],
            "k--",
            lw=1,
            label=f"L = {fit['L_inf']:.3f} + (C0/C)^{fit['alpha']:.3f}",
        )
    losses = [r["val_loss"] for rows in runs.values() for r in rows if r.get("val_loss")]
    # log-log as in the paper when the losses span a range; a narrow range reads better on a linear axis
    log_y = bool(losses) and max(losses) / min(losses) > 3
    for ax, xlabel in zip(axes, ("training FLOPs", "tokens (patches) seen"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log" if log_y else "linear")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (Huber)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle("Validation loss (paper Fig. 2)")
    return save(fig, stem)


# ------------------------------------------------------------------------------------------------ Figure 3


def standardised(X: np.ndarray) -> np.ndarray:
    """Embeddings scaled per feature to zero mean and unit variance: what the UMAP map is computed from."""
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit_transform(X)


def umap_coords(X: np.ndarray, n_neighbors: int | None = None, seed: int = 0) -> np.ndarray:
    """2-D UMAP of standardised embeddings; n_neighbors defaults to 15, shrunk for tiny samples."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba / umap chatter (n_jobs with a seed, tbb)
        import umap

        k = n_neighbors or max(2, min(15, len(X) // 4))
        reducer = umap.UMAP(n_neighbors=k, min_dist=0.1, random_state=seed, n_jobs=1)
        return reducer.fit_transform(standardised(X))


def _numeric(values: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Numbers for colouring; a two-class string label becomes the fraction of its second class."""
    if values.dtype.kind in "OUS":
        classes = sorted(set(values.tolist()) - {""})
        if len(classes) != 2:
            return np.full(len(values), np.nan), None
        return (values == classes[1]).astype(float), f"fraction {classes[1]}"
    return values.astype(float), None


def plot_umap(
    coords: np.ndarray,
    labels: dict[str, np.ndarray],
    stem: str | Path,
    properties: tuple[str, ...] = UMAP_PROPERTIES,
    title: str = "UMAP of the embeddings (paper Fig. 3)",
) -> dict[str, Path]:
    """Hexbin grid of the UMAP coloured by the mean of each property per bin."""
    props = [p for p in properties if p in labels]
    ncol = min(4, max(1, len(props)))
    nrow = max(1, math.ceil(len(props) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False)
    grid = max(8, min(40, int(math.sqrt(len(coords)))))
    for ax, name in zip(axes.flat, props, strict=False):
        values, note = _numeric(labels[name])
        ok = np.isfinite(values)
        hb = ax.hexbin(
            coords[ok, 0], coords[ok, 1], C=values[ok], reduce_C_function=np.mean, gridsize=grid, cmap="viridis"
        )
        fig.colorbar(hb, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(name + (f" ({note})" if note else ""), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(props) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, stem)


def neighbour_agreement(X: np.ndarray, labels: np.ndarray, k: int = 15) -> dict[str, float]:
    """How much a class keeps to itself: the mean fraction of each object's k nearest neighbours (Euclidean, in X:
    an embedding or a 2-D map) that share its label, against the same fraction for labels placed at random,
    mean over objects of (n_c - 1) / (n - 1). Islands of one class push `agreement` to 1; a well-mixed map gives
    `mixed`. `excess` = (agreement - mixed) / (1 - mixed): 0 mixed, 1 perfectly separated."""
    from sklearn.neighbors import NearestNeighbors

    labels = np.asarray(labels)
    n = len(labels)
    k = min(k, n - 1)
    idx = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X, return_distance=False)[:, 1:]
    agreement = float((labels[idx] == labels[:, None]).mean())
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    mixed = float(((counts[inverse] - 1) / (n - 1)).mean())
    return {"k": k, "agreement": agreement, "mixed": mixed, "excess": (agreement - mixed) / max(1.0 - mixed, 1e-12)}


def plot_telescope(
    coords: np.ndarray, telescope: np.ndarray, stem: str | Path, agreement: dict | None = None
) -> dict[str, Path]:
    """The UMAP coloured by telescope: instrument differences show up as islands (paper sec. 3). `agreement`
    (`neighbour_agreement` of the map) goes into the title."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for name, colour in zip(
        sorted(set(telescope.tolist())), ("#1f77b4", "#d62728", "#2ca02c", "#9467bd"), strict=False
    ):
        sel = telescope == name
        ax.scatter(coords[sel, 0], coords[sel, 1], s=4, alpha=0.6, color=colour, label=f"{name} ({sel.sum()})")
    ax.legend(markerscale=3, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    title = "UMAP coloured by telescope"
    if agreement is not None:
        title += f"\nneighbours on the same telescope {agreement['agreement']:.2f} (mixed {agreement['mixed']:.2f})"
    ax.set_title(title, fontsize=9)
    return save(fig, stem)


# ------------------------------------------------------------------------------------------------ Figure 4


def plot_probe_vs_flops(
    points: dict[str, list[tuple[float, float, str]]],
    rho: dict[str, dict],
    stem: str | Path,
    metric_names: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Probe score against pretraining FLOPs per property; `points[target]` = [(flops, score, model), ...]."""
    targets = list(points)
    ncol = min(4, max(1, len(targets)))
    nrow = max(1, math.ceil(len(targets) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 2.9 * nrow), squeeze=False)
    for ax, name in zip(axes.flat, targets, strict=False):
        pts = sorted(points[name])
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        ax.plot(x, y, "-", color="0.7", lw=1)
        ax.scatter(x, y, c=np.log10(x), cmap="viridis", s=30, zorder=3)
        for xi, yi, label in pts:
            ax.annotate(label, (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
        r = rho.get(name, {})
        rtxt = "n/a" if r.get("rho") is None else f"{r['rho']:.2f}"
        if r.get("p") is not None:
            rtxt += f" (p={r['p']:.2g})"
        ax.set_title(f"{name}: Spearman rho {rtxt}", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("pretraining FLOPs", fontsize=8)
        ax.set_ylabel((metric_names or {}).get(name, "score"), fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(targets) :]:
        ax.axis("off")
    fig.suptitle("Linear-probe score per pretraining FLOP (paper Fig. 4)")
    fig.tight_layout()
    return save(fig, stem)


# ------------------------------------------------------------------------------------------------ probes


def plot_probe_summary(result: ProbeResult, stem: str | Path, method: str = "linear") -> dict[str, Path]:
    """Grouped bars: the `method` probe's R2 / accuracy per target for every feature set (CNN: its own score)."""
    sets = result.feature_sets
    names = list(result.targets)
    width = 0.8 / max(1, len(sets))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    for i, s in enumerate(sets):
        vals = [result.score(t, s, method) for t in names]
        xs = np.arange(len(names)) + (i - (len(sets) - 1) / 2) * width
        ax.bar(
            xs,
            [np.nan if v is None else max(v, -0.2) for v in vals],
            width,
            label=s,
            color=SET_COLOURS.get(s),
        )
    for j, t in enumerate(names):
        if result.majority_accuracy(t) is not None:
            ax.plot([j - 0.4, j + 0.4], [result.majority_accuracy(t)] * 2, "k:", lw=1)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(-0.2, 1.05)
    ax.set_ylabel("R2 (regression) / accuracy (classes)")
    ax.set_title(f"{method} probe on {result.protocol['test_split']} (dotted: majority class)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save(fig, stem)


# ------------------------------------------------------------------------------------------------ predictions


def metrics_text(m: dict) -> str:
    """The metrics of `astrolom.eval.metrics.regression_metrics` as the lines written on a prediction panel."""
    lines = [f"N = {m['n']}" + (f" ({m['n_missing']} without a value)" if m.get("n_missing") else "")]
    lines.append(f"R$^2$ = {m['r2']:.3f}   MAE = {m['mae']:.4g}")
    if "sigma_nmad" in m:
        lines.append(f"$\\sigma_{{NMAD}}$ = {m['sigma_nmad']:.4f}   bias = {m['bias']:+.4f}")
        lines.append(f"$\\eta$ = {100 * m['eta']:.1f}% (|$\\Delta z$|/(1+z) > {mt.OUTLIER_THRESHOLD})")
    if m.get("median_posterior_sigma") is not None:
        lines.append(f"median posterior $\\sigma$ = {m['median_posterior_sigma']:.4g}")
    return "\n".join(lines)


def plot_predicted_vs_true(
    truth: np.ndarray, prediction: np.ndarray, target: str, stem: str | Path, title: str = ""
) -> dict[str, Path]:
    """Predicted against true (hexbin density, 1:1 line, metrics on the panel) over the residuals (AstroCLIP Figs.
    3-4). Residuals are dz / (1 + z) for a redshift (dashed: the outlier limits), prediction - truth otherwise."""
    truth, prediction = np.asarray(truth, np.float64), np.asarray(prediction, np.float64)
    ok = np.isfinite(truth) & np.isfinite(prediction)
    t, p = truth[ok], prediction[ok]
    m = mt.regression_metrics(truth, prediction, target)
    redshift = mt.is_redshift(target)
    resid = (p - t) / (1 + t) if redshift else p - t
    fig, (ax, axr) = plt.subplots(
        2, 1, figsize=(4.6, 5.6), sharex=True, gridspec_kw={"height_ratios": (3, 1), "hspace": 0.05}
    )
    lo, hi = (float(min(t.min(), p.min())), float(max(t.max(), p.max()))) if len(t) else (0.0, 1.0)
    pad = 0.03 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    grid = max(10, min(50, int(np.sqrt(max(len(t), 1)))))
    if len(t):
        hb = ax.hexbin(t, p, gridsize=grid, extent=(lo, hi, lo, hi), mincnt=1, bins="log", cmap="viridis")
        fig.colorbar(hb, ax=[ax, axr], fraction=0.05, pad=0.02, label="objects per bin")
        r_lim = float(np.percentile(np.abs(resid), 99)) * 1.2 or 1.0
        if redshift:
            r_lim = max(r_lim, 1.3 * mt.OUTLIER_THRESHOLD)
        axr.hexbin(t, resid, gridsize=(grid, max(5, grid // 3)), extent=(lo, hi, -r_lim, r_lim), mincnt=1,
                   bins="log", cmap="viridis")  # fmt: skip
        axr.set_ylim(-r_lim, r_lim)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="1:1")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_ylabel(f"predicted {target}")
    ax.text(0.03, 0.97, metrics_text(m), transform=ax.transAxes, va="top", ha="left", fontsize=7,
            bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8, "lw": 0.5})  # fmt: skip
    axr.axhline(0, color="k", lw=0.8)
    if redshift:
        for sign in (-1, 1):
            axr.axhline(sign * mt.OUTLIER_THRESHOLD, color="C3", ls="--", lw=0.8)
    axr.set_ylabel("$\\Delta z$/(1+z)" if redshift else "pred. - true", fontsize=8)
    axr.set_xlabel(f"true {target}")
    ax.set_title(title or target, fontsize=9)
    return save(fig, stem)


def prediction_figure(folder: str | Path, feature_set: str, method: str, target: str) -> Path:
    """Where `plot_predictions` puts the figure of one group: folder/<feature set>__<method>__<target> (names made
    file-safe), without a suffix."""
    parts = (re.sub(r"[^A-Za-z0-9_.-]+", "_", x).strip("_") for x in (feature_set, method, target))
    return Path(folder) / "__".join(parts)


def plot_predictions(
    predictions: mt.PredictionSet, folder: str | Path, feature_set: str, method: str
) -> dict[str, dict[str, Path]]:
    """`plot_predicted_vs_true` for every target of one (feature set, method) group -> {target: paths}; the files
    are named by `prediction_figure`."""
    out = {}
    for fs, m, target in predictions.groups():
        if (fs, m) != (feature_set, method):
            continue
        g = predictions.select(fs, m, target)
        title = f"{target}: {feature_set} · {method} ({g['split'][0]} split)"
        stem = prediction_figure(folder, fs, m, target)
        out[target] = plot_predicted_vs_true(g["truth"], g["prediction"], target, stem, title)
    return out


def write_predictions(
    predictions: mt.PredictionSet, folder: str | Path, plots: list[tuple[str, str]]
) -> dict[str, Path]:
    """Write a `PredictionSet` (table + metrics) and, for each (feature set, method) in `plots` that it holds, a
    predicted-vs-true figure per property, as one generation of `folder` (`PredictionSet.write`)."""
    groups = {(fs, m) for fs, m, _ in predictions.groups()}

    def draw(preds: mt.PredictionSet, tmp: Path) -> None:
        for fs, m in plots:
            if (fs, m) in groups:
                plot_predictions(preds, tmp, fs, m)

    return predictions.write(folder, draw)


# ------------------------------------------------------------------------------------------------ inpainting


def plot_inpainting(
    result: dict, stem: str | Path, bands: tuple[str, ...] | None = None, n_show: int = 6
) -> dict[str, Path]:
    """Rows: truth, what the model was given (central k tokens), the model's completion.

    Args:
        bands: the band names of the stamps' planes; g, r, z are drawn with the Legacy Survey viewer's stretch
            (`astrolom.data.display.display_rgb`), other band sets min-max scaled.
    """
    truth, masked, gen = result["truth"], result["masked"], result["inpainted"]
    n = min(n_show, len(truth))
    fig, axes = plt.subplots(3, n, figsize=(1.9 * n, 6), squeeze=False)
    rows = (("truth", truth), (f"given: central {result['k']} tokens", masked), ("AstroPT completion", gen))
    for r, (label, imgs) in enumerate(rows):
        for j in range(n):
            ax = axes[r, j]
            ax.imshow(display_rgb(imgs[j], bands), interpolation="nearest")  # row 0 on top, as in the explorer
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(
        f"Inpainting: {result['generated']} generated tokens; MSE on standardised tokens {result['mse']:.3f} "
        f"(predicting the patch mean: {result['mse_zero']:.3f}). Generated patches use the true per-patch mean/std.",
        fontsize=8,
    )
    fig.tight_layout()
    return save(fig, stem)
