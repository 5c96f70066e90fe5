"""The HTML sections of `astrolom report`: tables, probe and prediction panels, the multimodal and alignment sections
and the training curves, each a function returning an HTML fragment (data strings escaped)."""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from astrolom import layout
from astrolom.data.modalities import SPECTRA
from astrolom.eval import figures as fg
from astrolom.eval import metrics as mt
from astrolom.eval.probe_columns import best_column, column_targets, load_columns
from astrolom.eval.probes import KEY_TARGETS, ProbeResult
from astrolom.eval.scaling import read_metrics

# ---------------------------------------------------------------------------------------------- HTML pieces


def img_html(path: Path, caption: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    cap = f'<div class="note">{html.escape(caption)}</div>' if caption else ""
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">{cap}'


def table_html(header: list[str], rows: list[list[str]], best: list[set[int]] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cells = []
        for j, c in enumerate(row):
            cls = ' class="best"' if best and j in best[i] else ""
            cells.append(f"<td{cls}>{html.escape(str(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def probe_tables(result: ProbeResult) -> str:
    """HTML tables of a probe result: per method, targets x feature sets, the best non-supervised cell in bold."""
    sets = result.feature_sets
    sup = {s for s in sets if result.is_supervised(s)}
    parts = []
    for method in result.methods:
        rows, best = [], []
        for t in result.targets:
            vals = [result.score(t, s, method) for s in sets]
            unsup = [(v, j) for j, (v, s) in enumerate(zip(vals, sets, strict=True)) if v is not None and s not in sup]
            top = {max(unsup)[1] + 2} if unsup else set()
            majority = result.majority_accuracy(t)
            chance = "" if majority is None else f" (majority {majority:.2f})"
            rows.append([t, result.metric(t) + chance] + ["-" if v is None else f"{v:.3f}" for v in vals])
            best.append(top)
        parts.append(f"<h3>{html.escape(method)} probe</h3>" + table_html(["target", "metric", *sets], rows, best))
    return "\n".join(parts)


def photo_z_row(doc: dict, feature_set: str = "pretrained", method: str = "linear") -> dict | None:
    """The redshift metrics row of one (feature set, method) in a prediction_metrics.json document (None if absent)."""
    return next(
        (r for r in doc["metrics"] if (r["feature_set"], r["method"]) == (feature_set, method) and "sigma_nmad" in r),
        None,
    )


def _num(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


def _figure(folder: Path, row: dict) -> Path:
    return fg.prediction_figure(folder, row["feature_set"], row["method"], row["target"]).with_suffix(".png")


def prediction_section(folder: Path, heading: str, note: str) -> str:
    """HTML of a predictions folder: the photo-z table (every feature set and method that predicted a redshift, the
    lowest sigma_NMAD in bold) with its figure, then the metrics and figure of each drawn property."""
    rows = mt.read_metrics(folder)["metrics"]
    drawn = [r for r in rows if _figure(folder, r).is_file()]
    body = f'<p class="note">{html.escape(note)}</p>'
    photo_z = [r for r in rows if "sigma_nmad" in r]
    if photo_z:
        low = min(range(len(photo_z)), key=lambda i: (np.nan_to_num(photo_z[i]["sigma_nmad"], nan=np.inf), i))
        cells = [
            [r["feature_set"], r["method"], r["split"], str(r["n"]), _num(r["sigma_nmad"], ".4f"),
             _num(r["bias"], "+.4f"), _num(r["eta"], ".3f"), _num(r["r2"], ".3f"), _num(r["mae"], ".4f")]
            for r in photo_z
        ]  # fmt: skip
        header = ["feature set", "method", "split", "N", "σ_NMAD", "bias", "η", "R2", "MAE"]
        body += (
            "<h3>Photometric redshift</h3>"
            f'<p class="note">σ_NMAD = {html.escape(mt.DEFINITIONS["sigma_nmad"])}; bias = '
            f"{html.escape(mt.DEFINITIONS['bias'])}; η = fraction with |Δz|/(1+z) &gt; {mt.OUTLIER_THRESHOLD}; "
            "Δz = prediction − truth. Bold: the lowest σ_NMAD.</p>"
            + table_html(header, cells, [{4} if i == low else set() for i in range(len(photo_z))])
        )
        for r in drawn:
            if mt.is_redshift(r["target"]):
                caption = (
                    f"photo-z of {r['feature_set']} · {r['method']}: predicted against true redshift, residuals "
                    f"Δz/(1+z) below (dashed: ±{mt.OUTLIER_THRESHOLD})"
                )
                body += img_html(_figure(folder, r), caption)
    others = [r for r in drawn if not mt.is_redshift(r["target"])]
    if others:
        sigma = any("median_posterior_sigma" in r for r in others)
        header = ["feature set", "method", "target", "N", "R2", "MAE"] + (["median posterior σ"] if sigma else [])
        cells = [
            [r["feature_set"], r["method"], r["target"], str(r["n"]), _num(r["r2"], ".3f"), _num(r["mae"], ".4g")]
            + ([_num(r.get("median_posterior_sigma"), ".4g")] if sigma else [])
            for r in others
        ]
        body += "<h3>Predicted against true, per property</h3>" + table_html(header, cells)
        body += f'<div class="figs">{"".join(img_html(_figure(folder, r)) for r in others)}</div>'
    return f"<h2>{html.escape(heading)}</h2>" + body


def predictions_beside(result: Path, heading: str, note: str) -> list[str]:
    """[`prediction_section`] of the predictions/ folder next to a command's result file, [] when there is none."""
    folder = result.parent / layout.PREDICTIONS_DIR
    return [prediction_section(folder, heading, note)] if (folder / layout.PREDICTION_METRICS_JSON).is_file() else []


def kpis(probes: ProbeResult | None, metrics: list[dict] | None, demo: dict | None, photo_z: dict | None = None) -> str:
    items = []
    if metrics:
        val = [r["val_loss"] for r in metrics if r.get("val_loss") is not None]
        if val:
            items.append(("validation loss", f"{val[0]:.4f} → {val[-1]:.4f}"))
        last = metrics[-1]
        items.append(("steps / tokens", f"{last.get('step', 0)} / {last.get('tokens_seen', 0):.3g}"))
        items.append(("training FLOPs", f"{last.get('flops', 0):.3g}"))
    if probes:
        for t in (*KEY_TARGETS, "telescope"):
            pre = probes.score(t, "pretrained", "linear")
            if pre is not None:
                ctl = probes.score(t, "random_init", "linear")
                m = probes.metric(t)
                items.append((f"{t} linear {m}", f"{pre:.3f}" + ("" if ctl is None else f" (control {ctl:.3f})")))
    if photo_z:
        items.append((f"redshift σ_NMAD ({photo_z['feature_set']} {photo_z['method']})",
                      f"{_num(photo_z['sigma_nmad'], '.4f')} (η {_num(photo_z['eta'], '.3f')})"))  # fmt: skip
    if demo and "seconds" in demo:
        items.append(("demo wall time", f"{demo['seconds'] / 60:.1f} min"))
    return "".join(f'<div class="kpi"><b>{html.escape(v)}</b>{html.escape(k)}</div>' for k, v in items)


def environment() -> dict:
    """Versions and machine facts for the record."""
    import importlib.metadata as md

    import torch

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for pkg in ("astrolom", "torch", "numpy", "scipy", "scikit-learn", "pyarrow", "matplotlib", "umap-learn"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def column_table(results: dict[str, ProbeResult], method: str = "linear") -> str:
    """HTML of `astrolom.eval.probe_columns.columns_markdown`: targets x embedding columns, the best column in bold."""
    cols = list(results)
    rows, best = [], []
    for t in column_targets(results):
        ref = next(r for r in results.values() if t in r.targets)
        majority = ref.majority_accuracy(t)
        vals = [results[c].score(t, "pretrained", method) for c in cols]
        top = best_column(results, t, method)
        rows.append(
            [t, ref.metric(t) + ("" if majority is None else f" (majority {majority:.2f})")]
            + ["-" if v is None else f"{v:.3f}" for v in vals]
            + [top or "-"]
        )
        best.append({cols.index(top) + 2} if top else set())
    return table_html(["target", "metric", *cols, "best"], rows, best)


def multimodal_section(columns: Path | None, generations: list[Path]) -> str:
    body = ""
    if columns:
        results = load_columns(columns)
        pr = next(iter(results.values())).protocol
        method = "linear" if "linear" in pr.get("methods", ["linear"]) else pr["methods"][0]
        body += (
            "<h3>Probes of each embedding column</h3>"
            f'<p class="note">{html.escape(method.capitalize())} probes of every embedding column on the same '
            f"{pr.get('rows', pr['n_fit'])} objects (those with every column): fit on <code>{pr['fit_split']}</code> "
            f"({pr['n_fit']} objects), scored on <code>{pr['test_split']}</code> ({pr['n_test']}). R2 for "
            "continuous targets, accuracy for classes. <b>embedding_images</b>: images only; "
            "<b>embedding_spectra</b>: spectra only; <b>embedding_joint</b>: the spectrum's tokens after and before "
            "reading the image, averaged; both read out as means over equal wavelength ranges (8 by default). "
            "Bold: the best column per target.</p>" + column_table(results, method)
        )
    if generations:
        rows, figs = [], ""
        for path in generations:
            m = json.loads(path.read_text())
            rows.append(
                [f"{m['from']} → {m['to']}", m["split"], str(m["objects"]), f"{m['huber_model']:.4f}",
                 f"{m['huber_mean_baseline']:.4f}", f"{100 * m['fraction_better_than_baseline']:.0f}%"]
            )  # fmt: skip
            png = path.parent / layout.GENERATED_SPECTRA_PNG
            if m["to"] == SPECTRA and png.exists():
                figs += img_html(png, "spectra generated from the images (red) against the true ones (grey); dotted: "
                             "emission lines at the true redshift")  # fmt: skip
        best = [{3} if float(r[3]) < float(r[4]) else {4} for r in rows]
        body += (
            "<h3>Cross-modal generation</h3>"
            '<p class="note">The model is prompted with one modality and generates the other token by token '
            "(<code>astrolom generate</code>). Mean Huber loss (δ = 1) over the true tokens in the model's normalised "
            "units, against a trivial baseline: the training split's mean tokens. Lower is better; bold: the "
            "lower of the two.</p>"
            + table_html(
                [
                    "direction",
                    "split",
                    "objects",
                    "Huber (model)",
                    "Huber (mean baseline)",
                    "objects better than baseline",
                ],
                rows,
                best,
            )  # fmt: skip
            + figs
        )
    return "<h2>Multimodal</h2>" + body


def flow_input(post: dict) -> str:
    """What one `eval-align` feature set's flows condition on: 'PCA 16 of 512', '20 features' (older results: '-')."""
    if "features" not in post:
        return "-"
    k, d = post.get("components"), post["features"]
    return f"{d} features" if k is None else f"PCA {k} of {d}"


def _alignment_run(path: Path, res: dict) -> Path | None:
    """The alignment RUN an `eval-align` JSON scored: its recorded path, else the run the JSON sits in (RUN/eval)
    or beside (the demo's align/ next to align_eval/)."""
    recorded = [Path(res["model"])] if res.get("model") else []
    for cand in (*recorded, path.parent.parent, path.parent.parent / "align"):
        if (cand / layout.METRICS_NAME).is_file() and (cand / layout.CONFIG_NAME).is_file():
            return cand
    return None


def alignment_section(path: Path, figdir: Path | None = None) -> str:
    res = json.loads(path.read_text())
    rows = [
        [d, f"{r['recall@1']:.3f}", f"{r['recall@5']:.3f}", f"{r['recall@10']:.3f}", f"{r['median_rank']:.0f}",
         f"{r['chance@1']:.3f}", f"{r['chance@10']:.3f}", f"{r['chance_median_rank']:.0f}"]
        for d, r in res["retrieval"].items()
    ]  # fmt: skip
    body = (
        f'<p class="note">Image–spectrum alignment (<code>astrolom eval-align</code>) on {res["pairs"]["test"]} '
        f"test pairs ({res['pairs']['train']} train). Retrieval: the rank of the true partner among all test "
        "pairs, against chance.</p>"
        + _alignment_curves(path, res, figdir)
        + table_html(
            ["direction", "R@1", "R@5", "R@10", "median rank", "chance R@1", "chance R@10", "chance median rank"], rows
        )  # fmt: skip
    )
    if res.get("similarity_redshift_r2"):
        sim = [[k, f"{v:.3f}"] for k, v in res["similarity_redshift_r2"].items()]
        body += "<p class=\"note\">Similarity search: R2 of the top match's redshift against the query's.</p>"
        body += table_html(["search", "redshift R2"], sim)
    props = res.get("properties_r2") or {}
    if props:
        targets = list(next(iter(props.values())))
        names = list(props)
        best: list[set[int]] = [set() for _ in names]
        for j, t in enumerate(targets):
            unsup = [(props[n][t], i) for i, n in enumerate(names) if "(supervised)" not in n]
            if unsup:
                best[max(unsup)[1]].add(j + 1)
        rows = [[n] + [f"{props[n][t]:.3f}" for t in targets] for n in names]
        body += (
            "<h3>Property estimation (test R2)</h3>"
            + (
                '<p class="note">Zero-shot kNN from the aligned and unaligned embeddings of each modality (a quick '
                "evaluation: no MLPs, supervised baselines or flows; <code>astrolom eval-align</code> runs them). "
                "Bold: the best embedding per target.</p>"
                if res.get("quick")
                else '<p class="note">Zero-shot kNN and few-shot MLP from the aligned and unaligned embeddings of each '
                "modality, against supervised baselines (AstroCLIP Table 2). Bold: the best embedding per target.</p>"
            )
            + table_html(["source · method", *targets], rows, best)
        )
    post = res.get("posteriors") or {}
    if post:
        names = list(post)
        low = min(range(len(names)), key=lambda i: post[names[i]]["nll"])
        rows = [
            [n, flow_input(v), f"{v['nll']:.3f}", f"{v['tarp']['max_abs_deviation']:.3f}",
             f"{v['tarp']['fraction_in_band']:.2f}"]
            for n, v in post.items()
        ]  # fmt: skip
        body += (
            "<h3>Posteriors</h3>"
            '<p class="note">One ensemble of conditional normalising flows per feature set over the joint '
            "(redshift, log M*, log sSFR), on the PCA width chosen by validation NLL; test negative log-likelihood "
            "(lower is better; bold: lowest) and TARP calibration.</p>"
            + table_html(
                ["feature set", "flow input", "test NLL (nats)", "TARP max abs deviation", "TARP fraction in 2σ band"],
                rows,
                [{2} if i == low else set() for i in range(len(rows))],
            )  # fmt: skip
        )
    captions = {
        "retrieval.png": "image → spectrum retrieval: queries, top matches and their spectra",
        "tarp.png": "TARP expected coverage of the posteriors",
        "corner.png": "posteriors from aligned image embeddings for a few test galaxies (red: truth)",
    }
    for name in layout.ALIGN_EVAL_FIGURES:
        if (path.parent / name).exists():
            body += img_html(path.parent / name, captions.get(name, ""))
    return "<h2>Alignment</h2>" + body


def _alignment_curves(path: Path, res: dict, figdir: Path | None) -> str:
    """Training and validation InfoNCE of the alignment run, when its metrics are found (empty string otherwise)."""
    run = _alignment_run(path, res)
    if run is None or figdir is None:
        return ""
    rows = read_metrics(run)  # resume-aware: a repeated step keeps its latest values
    if not rows:
        return ""
    fig = training_curves(rows, figdir / "align_loss", ylabel="InfoNCE loss (symmetric)", log_y=False)
    return img_html(fig["png"], f"alignment heads: training and validation loss ({run.name}; chance: log batch size)")


# ------------------------------------------------------------------------------------------------- figures


def training_curves(
    rows: list[dict], stem: Path, ylabel: str = "Huber loss (standardised patches)", log_y: bool = True
) -> dict[str, Path]:
    fig, ax = fg.plt.subplots(figsize=(6.5, 3.8))
    tr = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    va = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if tr:
        ax.plot(*zip(*tr, strict=True), lw=0.8, alpha=0.7, label="training loss")
    if va:
        ax.plot(*zip(*va, strict=True), "o-", ms=3, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fg.save(fig, stem)
