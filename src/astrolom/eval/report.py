"""`astrolom report RUN`: one self-contained HTML file (figures embedded as base64 PNG) describing a run.

RUN may be a pretraining run (`astrolom pretrain --out RUN`), a demo directory (`astrolom demo --out DIR`) or a
scaling sweep (`astrolom scaling --out DIR`). The report shows whatever it finds:

- loss curves (training and validation loss per step; validation loss against FLOPs and tokens: paper Fig. 2);
- the probe table against the random-init control and the baselines (`probes/probes.json`, `astrolom probe`);
- property predictions (`predictions/` of `astrolom probe`, `eval-align` and `finetune`, see `astrolom.eval.metrics`):
  the photometric-redshift panel (sigma_NMAD, bias, outlier fraction eta of every feature set and method, and the
  predicted-vs-true figure) and a figure per property; more folders with `--predictions`;
- the UMAP of the embeddings coloured by properties (Fig. 3) and by telescope (the paper's islands);
- inpainting: the model completes stamps from their central spiral tokens (needs the model and the data);
- the scaling sweep (Figs. 2 and 4, L(C) fit, Spearman rho) when `scaling.json` is present;
- multimodal: per-embedding-column probes (`astrolom probe` on a multimodal model's embeddings: columns.json) and
  cross-modal generation against its mean baseline (`astrolom generate`: metrics.json and figure), found in
  RUN/multimodal (the demo's `--spectra-steps` stage) or given with `--multimodal DIR`;
- alignment: retrieval against chance, property and posterior tables and figures of `astrolom eval-align`, found
  in RUN/align_eval or given with `--align DIR`;
- the configuration and the environment (package versions, machine).

Where things live is discovered in RUN (and RUN/run, RUN/probes, RUN/scaling, RUN/multimodal, RUN/align_eval); flags
override each location.
Figures are written next to the report (RUN/figures/*.png|pdf) and embedded in it.
"""

from __future__ import annotations

import argparse
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
from astrolom.data.sources import open_source
from astrolom.data.stream import RecordStream
from astrolom.eval import figures as fg
from astrolom.eval import metrics as mt
from astrolom.eval.embeddings import load_embeddings
from astrolom.eval.inpaint import inpaint
from astrolom.eval.probes import KEY_TARGETS, ProbeResult, best_column, column_targets, load_columns
from astrolom.eval.scaling import markdown as scaling_markdown
from astrolom.eval.scaling import read_metrics
from astrolom.log import get_logger
from astrolom.model.pretrained import load_model

log = get_logger(__name__)

CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 1180px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; } td.best { font-weight: bold; background: #eef6ee; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .8em; }
.note { color: #555; font-size: .9em; } .kpi { display: inline-block; margin: 0 1.5em .6em 0; }
.kpi b { font-size: 1.3em; display: block; }
.figs img { width: 32%; min-width: 260px; vertical-align: top; }
"""


# ----------------------------------------------------------------------------------------------- discovery


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p is not None and p.exists()), None)


def find_artifacts(root: str | Path) -> dict[str, Path | None]:
    """Locations of the pieces a report can show, for a RUN, demo or sweep directory (None where absent)."""
    L = layout
    root = Path(root)
    run_dir = _first(root / L.METRICS_NAME, root / L.DEMO_RUN_DIR / L.METRICS_NAME)
    run_dir = run_dir.parent if run_dir else None
    model = None
    if run_dir is not None:
        model = _first(run_dir / L.FINAL_DIR / L.WEIGHTS_NAME)
        model = model.parent if model else None
    return {
        "root": root,
        "run": run_dir,
        "model": model,
        "embeddings": _first(root / L.EMBEDDINGS_NAME, root / "embeddings" / L.EMBEDDINGS_NAME),
        "probes": _first(root / L.PROBES_DIR / L.PROBES_JSON, root / L.PROBES_JSON),
        "scaling": _first(root / L.SCALING_JSON, root / "scaling" / L.SCALING_JSON),
        "demo": _first(root / L.DEMO_JSON),
        "outliers": _first(root / L.OUTLIERS_DIR / L.OUTLIERS_JSON),
        "label_efficiency": _first(root / L.LABEL_EFFICIENCY_MD, root / "label_efficiency" / L.LABEL_EFFICIENCY_MD),
        "columns": _first(root / L.PROBES_DIR / L.COLUMNS_JSON, root / L.COLUMNS_JSON),
        "multimodal": _first(root / L.MULTIMODAL_DIR),
        "align": _first(root / L.ALIGN_EVAL_DIR / L.ALIGN_EVAL_JSON, root / L.ALIGN_EVAL_JSON),
    }


def multimodal_artifacts(folder: str | Path) -> tuple[Path | None, list[Path]]:
    """(per-column probe results, `astrolom generate` metrics files) in a multimodal folder and its subfolders."""
    L, folder = layout, Path(folder)
    columns = _first(folder / L.COLUMNS_JSON, folder / L.PROBES_DIR / L.COLUMNS_JSON)
    candidates = [folder / L.GENERATION_JSON, *sorted(folder.glob(f"*/{L.GENERATION_JSON}"))]
    return columns, [p for p in candidates if p.is_file() and "huber_model" in json.loads(p.read_text())]


def _data_path(artifacts: dict, override: str | None) -> str | None:
    if override:
        return override
    if artifacts.get("model") is not None:
        cfg = json.loads((artifacts["model"] / layout.CONFIG_NAME).read_text())
        path = cfg.get("data", {}).get("path")
        if path and Path(path).exists():
            return path
    return None


# ---------------------------------------------------------------------------------------------- HTML pieces


def _img(path: Path, caption: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    cap = f'<div class="note">{html.escape(caption)}</div>' if caption else ""
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">{cap}'


def _table(header: list[str], rows: list[list[str]], best: list[set[int]] | None = None) -> str:
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
        parts.append(f"<h3>{html.escape(method)} probe</h3>" + _table(["target", "metric", *sets], rows, best))
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
            + _table(header, cells, [{4} if i == low else set() for i in range(len(photo_z))])
        )
        for r in drawn:
            if mt.is_redshift(r["target"]):
                caption = (
                    f"photo-z of {r['feature_set']} · {r['method']}: predicted against true redshift, residuals "
                    f"Δz/(1+z) below (dashed: ±{mt.OUTLIER_THRESHOLD})"
                )
                body += _img(_figure(folder, r), caption)
    others = [r for r in drawn if not mt.is_redshift(r["target"])]
    if others:
        sigma = any("median_posterior_sigma" in r for r in others)
        header = ["feature set", "method", "target", "N", "R2", "MAE"] + (["median posterior σ"] if sigma else [])
        cells = [
            [r["feature_set"], r["method"], r["target"], str(r["n"]), _num(r["r2"], ".3f"), _num(r["mae"], ".4g")]
            + ([_num(r.get("median_posterior_sigma"), ".4g")] if sigma else [])
            for r in others
        ]
        body += "<h3>Predicted against true, per property</h3>" + _table(header, cells)
        body += f'<div class="figs">{"".join(_img(_figure(folder, r)) for r in others)}</div>'
    return f"<h2>{html.escape(heading)}</h2>" + body


def _predictions_beside(result: Path, heading: str, note: str) -> list[str]:
    """[`prediction_section`] of the predictions/ folder next to a command's result file, [] when there is none."""
    folder = result.parent / layout.PREDICTIONS_DIR
    return [prediction_section(folder, heading, note)] if (folder / layout.PREDICTION_METRICS_JSON).is_file() else []


def _kpis(
    probes: ProbeResult | None, metrics: list[dict] | None, demo: dict | None, photo_z: dict | None = None
) -> str:
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
    """HTML of `astrolom.eval.probes.columns_markdown`: targets x embedding columns, the best column in bold."""
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
    return _table(["target", "metric", *cols, "best"], rows, best)


def _multimodal_section(columns: Path | None, generations: list[Path]) -> str:
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
                figs += _img(png, "spectra generated from the images (red) against the true ones (grey); dotted: "
                             "emission lines at the true redshift")  # fmt: skip
        best = [{3} if float(r[3]) < float(r[4]) else {4} for r in rows]
        body += (
            "<h3>Cross-modal generation</h3>"
            '<p class="note">The model is prompted with one modality and generates the other token by token '
            "(<code>astrolom generate</code>). Mean Huber loss (δ = 1) over the true tokens in the model's normalised "
            "units, against a trivial baseline: the training split's mean tokens. Lower is better; bold: the "
            "lower of the two.</p>"
            + _table(
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


def _alignment_section(path: Path, figdir: Path | None = None) -> str:
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
        + _table(
            ["direction", "R@1", "R@5", "R@10", "median rank", "chance R@1", "chance R@10", "chance median rank"], rows
        )  # fmt: skip
    )
    if res.get("similarity_redshift_r2"):
        sim = [[k, f"{v:.3f}"] for k, v in res["similarity_redshift_r2"].items()]
        body += "<p class=\"note\">Similarity search: R2 of the top match's redshift against the query's.</p>"
        body += _table(["search", "redshift R2"], sim)
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
            + _table(["source · method", *targets], rows, best)
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
            + _table(
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
            body += _img(path.parent / name, captions.get(name, ""))
    return "<h2>Alignment</h2>" + body


def _alignment_curves(path: Path, res: dict, figdir: Path | None) -> str:
    """Training and validation InfoNCE of the alignment run, when its metrics are found (empty string otherwise)."""
    run = _alignment_run(path, res)
    if run is None or figdir is None:
        return ""
    rows = read_metrics(run)  # resume-aware: a repeated step keeps its latest values
    if not rows:
        return ""
    fig = _training_curves(rows, figdir / "align_loss", ylabel="InfoNCE loss (symmetric)", log_y=False)
    return _img(fig["png"], f"alignment heads: training and validation loss ({run.name}; chance: log batch size)")


# ------------------------------------------------------------------------------------------------- figures


def _training_curves(
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


def build_report(
    root: str | Path,
    out: str | Path | None = None,
    *,
    data: str | None = None,
    embeddings: str | None = None,
    probes: str | None = None,
    scaling: str | None = None,
    multimodal: str | None = None,
    align: str | None = None,
    predictions: list[str] | None = None,
    umap: bool = True,
    inpainting: bool = True,
    inpaint_k: int | None = None,
    umap_max: int = 5000,
) -> Path:
    """Write the HTML report of `root` to `out` (default root/report.html); returns its path. `predictions`: more
    prediction folders (`astrolom finetune --out FT` writes FT/predictions) beside those found in `root`."""
    art = find_artifacts(root)
    for key, value in (
        ("embeddings", embeddings),
        ("probes", probes),
        ("scaling", scaling),
        ("multimodal", multimodal),
    ):
        if value:
            art[key] = Path(value)
    if align:
        art["align"] = Path(align) / layout.ALIGN_EVAL_JSON if Path(align).is_dir() else Path(align)
    root = Path(root)
    out = Path(out) if out else root / layout.REPORT_NAME
    figdir = out.parent / "figures"
    sections: list[str] = []
    metrics = probe_report = demo = photo_z = None
    if art["demo"]:
        demo = json.loads(art["demo"].read_text())

    if art["run"]:
        metrics = read_metrics(art["run"])
        p1 = _training_curves(metrics, figdir / "training_curves")
        p2 = fg.plot_loss_curves({art["run"].name: metrics}, figdir / "fig2_loss")
        sections.append(
            "<h2>Pretraining</h2>"
            + _img(p1["png"], "training loss (per step) and validation loss (held-out split)")
            + _img(p2["png"], "validation loss against training FLOPs and tokens seen (paper Fig. 2)")
        )

    if art["probes"]:
        probe_report = ProbeResult.load(art["probes"])
        pr = probe_report.protocol
        stem = figdir / "probes"
        fg.plot_probe_summary(probe_report, stem)
        sections.append(
            "<h2>Probes: pretrained embeddings against control and baselines</h2>"
            f'<p class="note">Fit on <code>{pr["fit_split"]}</code> ({pr["n_fit"]} objects), scored on '
            f"<code>{pr['test_split']}</code> ({pr['n_test']}). R2 for continuous targets, accuracy for classes. "
            "<b>random_init</b>: the same architecture with untrained weights (the control); <b>pca_pixels</b>: PCA "
            "of arcsinh-stretched pixels; <b>photometry</b>: aperture magnitudes and colours (it sees absolute "
            "flux, which per-patch standardisation hides from AstroPT unless it reads flux-aware tokens); "
            "<b>cnn</b>: a small CNN trained "
            "end-to-end on the fit split. Bold: best column other than the supervised CNN.</p>"
            + _img(stem.with_suffix(".png"))
            + probe_tables(probe_report)
            + (
                f'<p class="note">Skipped targets: {html.escape(json.dumps(probe_report.skipped))}</p>'
                if probe_report.skipped
                else ""
            )  # fmt: skip
        )
        folder = art["probes"].parent / layout.PREDICTIONS_DIR
        probe_predictions = _predictions_beside(
            art["probes"],
            "Property predictions of the probes",
            f"Per-object test predictions of every probe ({folder / layout.PREDICTIONS_PARQUET}); figures: the "
            "pretrained embeddings' headline probe, predicted against true (hexbin density, dashed 1:1 line) with "
            "the residuals below.",
        )
        if probe_predictions:
            photo_z = photo_z_row(mt.read_metrics(folder))
        sections += probe_predictions

    if umap and art["embeddings"]:
        emb = load_embeddings(art["embeddings"])
        if len(emb) > umap_max:
            emb = emb.select(np.random.default_rng(0).permutation(len(emb))[:umap_max])
        if len(emb) >= 10:
            log.info("report: UMAP of %d embeddings", len(emb))
            coords = fg.umap_coords(emb.X)
            pu = fg.plot_umap(coords, emb.labels, figdir / "fig3_umap")
            body = _img(pu["png"], "hexbins coloured by the mean property of their galaxies (paper Fig. 3)")
            if "telescope" in emb.labels:
                tel = np.asarray(emb.labels["telescope"])
                in_map = fg.neighbour_agreement(coords, tel)
                in_emb = fg.neighbour_agreement(fg.standardised(emb.X), tel)  # as the map sees it
                log.info("report: telescope neighbour agreement: map %s, embedding %s", in_map, in_emb)
                pt = fg.plot_telescope(coords, tel, figdir / "telescope", agreement=in_map)
                body += _img(
                    pt["png"],
                    "the same map by telescope: instrument differences make islands (paper sec. 3). Of each galaxy's "
                    f"{in_map['k']} nearest neighbours, {in_map['agreement']:.2f} share its telescope in the map and "
                    f"{in_emb['agreement']:.2f} in the embedding, against {in_map['mixed']:.2f} for telescopes "
                    "assigned at random (islands: towards 1)",
                )
            sections.append(f"<h2>Embedding map (UMAP, {len(emb)} objects)</h2>" + body)

    data_path = _data_path(art, data)
    if inpainting and art["model"] and data_path:
        model, _ = load_model(str(art["model"]))
        src = open_source(data_path, spectra=False)
        try:
            split = next((s for s in ("test", "val", "train") if src.split_counts()[s]), None)
            recs = []
            for rec in RecordStream(src, split=split, shuffle=False, epochs=1):
                recs.append(rec)
                if len(recs) == 6:
                    break
        finally:
            src.close()
        shapes = {r.image.shape for r in recs}
        if recs and len(shapes) == 1:
            h, w = recs[0].image.shape[:2]
            p = model.config.patch_size
            T = min(model.config.block_size, (h // p) * (w // p))
            k = inpaint_k or max(1, T // 4)
            res = inpaint(model, np.stack([r.image for r in recs]), k)
            pi = fg.plot_inpainting(res, figdir / "inpainting", src.bands)
            sections.append(
                "<h2>Inpainting</h2>"
                f'<p class="note">The model sees the central {res["k"]} spiral tokens and generates the next '
                f"{res['generated']} autoregressively (point predictions). Generated patches are standardised; they "
                "are shown in pixel units with the <b>true</b> per-patch mean and standard deviation, so the figure "
                "shows predicted structure and colour, not predicted brightness. "
                + (
                    "This model reads flux-aware tokens: each hidden patch's true per-band brightness and contrast "
                    "features are given to it, only the standardised patch is predicted. "
                    if model.config.flux_features
                    else ""
                )
                + "Mean squared error on standardised "
                f"tokens: {res['mse']:.3f} (always predicting a flat patch: {res['mse_zero']:.3f}).</p>"
                + _img(pi["png"])
            )

    if art["scaling"]:
        summ = json.loads(art["scaling"].read_text())
        body = f"<pre>{html.escape(scaling_markdown(summ))}</pre>"
        for name in ("fig2_loss", "fig4_probe_vs_flops"):
            png = art["scaling"].parent / f"{name}.png"
            if png.exists():
                body += _img(png)
        sections.append("<h2>Scaling sweep</h2>" + body)

    columns, generations = multimodal_artifacts(art["multimodal"]) if art["multimodal"] else (None, [])
    columns = columns or art["columns"]
    if columns or generations:
        sections.append(_multimodal_section(columns, generations))
    if art["align"]:
        sections.append(_alignment_section(art["align"], figdir))
        sections += _predictions_beside(
            art["align"],
            "Alignment: property predictions",
            "Per-object test predictions of eval-align (zero-shot kNN, few-shot MLP, supervised baselines; flows: the "
            "posterior median, with half the central 68% interval as the posterior width).",
        )
    for extra_folder in predictions or []:
        heading = f"Property predictions: {Path(extra_folder).parent.name}"
        sections.append(prediction_section(Path(extra_folder), heading, f"Per-object predictions in {extra_folder}."))

    if art["outliers"]:
        res = json.loads(art["outliers"].read_text())
        rows = [
            [f"top {key.removeprefix('top_')}", str(r["n"]), f"{r['precision']:.3f}", f"{r['base_rate']:.3f}",
             f"{r['lift']:.1f}x" if r.get("lift") else "-"]
            for key, r in res.get("evaluation", {}).items()
        ]  # fmt: skip
        body = (
            f"<p>Objects ranked by the cosine distance to their {res['k']}-th neighbour in the similarity index "
            f"(<code>astrolom outliers</code>); how many of the top-ranked have a <code>{html.escape(res['label'])}"
            "</code> label, against its base rate:</p>"
            + _table(["ranked", "objects", "precision", "base rate", "lift"], rows)
        )
        png = art["outliers"].parent / "outliers.png"
        if png.exists():
            body += _img(png, "the most unusual objects (★: a contaminating star)")
        sections.append("<h2>Outliers</h2>" + body)

    if art["label_efficiency"]:
        body = f"<pre>{html.escape(art['label_efficiency'].read_text())}</pre>"
        png = art["label_efficiency"].with_suffix(".png")
        if png.exists():
            body += _img(png)
        sections.append("<h2>Fine-tuning: label efficiency</h2>" + body)
        sections += _predictions_beside(
            art["label_efficiency"],
            "Fine-tuning: property predictions",
            "Per-object test predictions of every approach at every label count (method: the labels it had).",
        )

    cfg_text = ""
    if art["run"] and (art["run"] / layout.RUN_CONFIG_YAML).exists():
        cfg_text = (art["run"] / layout.RUN_CONFIG_YAML).read_text()
    extra = f"<h3>Demo settings and timings</h3><pre>{html.escape(json.dumps(demo, indent=2))}</pre>" if demo else ""
    sections.append(
        "<h2>Configuration and environment</h2>"
        + (f"<h3>Pretraining config</h3><pre>{html.escape(cfg_text)}</pre>" if cfg_text else "")
        + extra
        + f"<h3>Environment</h3><pre>{html.escape(json.dumps(environment(), indent=2))}</pre>"
    )
    title = f"astrolom report: {root.resolve().name}"
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="note">AstroPT (Smith et al. 2024) run report, generated {time.strftime("%Y-%m-%d %H:%M")} from '
        f"<code>{html.escape(str(root.resolve()))}</code>.</p>"
        + _kpis(probe_report, metrics, demo, photo_z)
        + "\n".join(sections)
        + "</body></html>"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="pretraining RUN, demo directory or scaling sweep directory")
    parser.add_argument("--out", default=None, help="HTML file (default RUN/report.html)")
    parser.add_argument("--data", default=None, help="data set for inpainting (default: the one the model trained on)")
    parser.add_argument("--embeddings", default=None, help="embeddings Parquet for the UMAP")
    parser.add_argument("--probes", default=None, help="probes.json")
    parser.add_argument("--scaling", default=None, help="scaling.json")
    parser.add_argument(
        "--multimodal",
        default=None,
        help="folder with per-column probes (columns.json, or probes/columns.json) and `astrolom generate` outputs "
        "(metrics.json in it or its subfolders); default RUN/multimodal",
    )
    parser.add_argument("--align", default=None, help="`astrolom eval-align` output folder (default RUN/align_eval)")
    parser.add_argument(
        "--predictions",
        action="append",
        default=None,
        metavar="DIR",
        help="a predictions folder to show as well (e.g. FT/predictions of `astrolom finetune`); repeatable",
    )
    parser.add_argument("--no-umap", action="store_true")
    parser.add_argument("--no-inpainting", action="store_true")
    parser.add_argument("--inpaint-k", type=int, default=None, help="tokens the model is given (default T/4)")


def run(args: argparse.Namespace) -> int:
    if not Path(args.run).is_dir():
        raise FileNotFoundError(f"{args.run} is not a directory")
    path = build_report(
        args.run,
        args.out,
        data=args.data,
        embeddings=args.embeddings,
        probes=args.probes,
        scaling=args.scaling,
        multimodal=args.multimodal,
        align=args.align,
        predictions=args.predictions,
        umap=not args.no_umap,
        inpainting=not args.no_inpainting,
        inpaint_k=args.inpaint_k,
    )
    print(f"report: {path}")
    return 0
