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
import html
import json
import time
from pathlib import Path

import numpy as np

from astrolom import layout
from astrolom.data.sources import open_source
from astrolom.data.stream import RecordStream
from astrolom.eval import figures as fg
from astrolom.eval import metrics as mt
from astrolom.eval.embeddings import load_embeddings
from astrolom.eval.inpaint import inpaint
from astrolom.eval.probes import ProbeResult
from astrolom.eval.report_html import (
    alignment_section,
    environment,
    img_html,
    kpis,
    multimodal_section,
    photo_z_row,
    prediction_section,
    predictions_beside,
    probe_tables,
    table_html,
    training_curves,
)
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
        p1 = training_curves(metrics, figdir / "training_curves")
        p2 = fg.plot_loss_curves({art["run"].name: metrics}, figdir / "fig2_loss")
        sections.append(
            "<h2>Pretraining</h2>"
            + img_html(p1["png"], "training loss (per step) and validation loss (held-out split)")
            + img_html(p2["png"], "validation loss against training FLOPs and tokens seen (paper Fig. 2)")
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
            + img_html(stem.with_suffix(".png"))
            + probe_tables(probe_report)
            + (
                f'<p class="note">Skipped targets: {html.escape(json.dumps(probe_report.skipped))}</p>'
                if probe_report.skipped
                else ""
            )  # fmt: skip
        )
        folder = art["probes"].parent / layout.PREDICTIONS_DIR
        probe_predictions = predictions_beside(
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
            body = img_html(pu["png"], "hexbins coloured by the mean property of their galaxies (paper Fig. 3)")
            if "telescope" in emb.labels:
                tel = np.asarray(emb.labels["telescope"])
                in_map = fg.neighbour_agreement(coords, tel)
                in_emb = fg.neighbour_agreement(fg.standardised(emb.X), tel)  # as the map sees it
                log.info("report: telescope neighbour agreement: map %s, embedding %s", in_map, in_emb)
                pt = fg.plot_telescope(coords, tel, figdir / "telescope", agreement=in_map)
                body += img_html(
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
                + img_html(pi["png"])
            )

    if art["scaling"]:
        summ = json.loads(art["scaling"].read_text())
        body = f"<pre>{html.escape(scaling_markdown(summ))}</pre>"
        for name in ("fig2_loss", "fig4_probe_vs_flops"):
            png = art["scaling"].parent / f"{name}.png"
            if png.exists():
                body += img_html(png)
        sections.append("<h2>Scaling sweep</h2>" + body)

    columns, generations = multimodal_artifacts(art["multimodal"]) if art["multimodal"] else (None, [])
    columns = columns or art["columns"]
    if columns or generations:
        sections.append(multimodal_section(columns, generations))
    if art["align"]:
        sections.append(alignment_section(art["align"], figdir))
        sections += predictions_beside(
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
            + table_html(["ranked", "objects", "precision", "base rate", "lift"], rows)
        )
        png = art["outliers"].parent / "outliers.png"
        if png.exists():
            body += img_html(png, "the most unusual objects (★: a contaminating star)")
        sections.append("<h2>Outliers</h2>" + body)

    if art["label_efficiency"]:
        body = f"<pre>{html.escape(art['label_efficiency'].read_text())}</pre>"
        png = art["label_efficiency"].with_suffix(".png")
        if png.exists():
            body += img_html(png)
        sections.append("<h2>Fine-tuning: label efficiency</h2>" + body)
        sections += predictions_beside(
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
        + kpis(probe_report, metrics, demo, photo_z)
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
