"""`astrolom probe`: probe embeddings beside the random-init control and the pixel baselines, and write the report.

    astrolom probe --embeddings EMB.parquet --targets redshift,log_mstar --out DIR [--model RUN --data DIR]

writes DIR/probes.json (a `ProbeResult`), DIR/probes.md and the bar chart DIR/probes.{png,pdf}, and
DIR/predictions/: every regression target's per-object test predictions of every feature set and method
(predictions.parquet), their metrics (prediction_metrics.json: R2, MAE, and sigma_NMAD, bias, eta for redshift; see
`astrolom.eval.metrics`) and a predicted-vs-true figure per property for the pretrained embeddings' headline probe
(linear when run). The probes are `astrolom.eval.probes`, the control and baselines `astrolom.eval.baselines`, the
figures `astrolom.eval.figures`.

A file with several embedding columns (a multimodal model's `embedding_images`, `embedding_spectra`,
`embedding_joint`; an alignment's `embedding_images`, `embedding_spectra`) is probed column by column
(`--columns auto`, or a list) on the objects that have every chosen column: DIR/<column>/probes.{json,md,png,pdf}
per column and DIR/columns.{json,md}, the target x column table with the best column per target marked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from astrolom.config import comma_list
from astrolom.eval import baselines as bl
from astrolom.eval.embeddings import choose_columns, embedding_columns, load_embedding_columns, load_embeddings
from astrolom.eval.figures import plot_probe_summary, write_predictions
from astrolom.eval.probe_columns import columns_markdown, evaluate_columns, save_columns
from astrolom.eval.probe_estimators import METHODS
from astrolom.eval.probes import DEFAULT_TARGETS, ProbeResult, evaluate, markdown_table
from astrolom.layout import COLUMNS_JSON, COLUMNS_MD, PREDICTIONS_DIR, PROBES_JSON
from astrolom.log import get_logger

log = get_logger(__name__)


def headline_method(result: ProbeResult) -> str:
    """The probe method whose predictions are drawn: linear when it ran, else the first one."""
    return "linear" if "linear" in result.methods else result.methods[0]


def write_report(result: ProbeResult, out: str | Path) -> dict[str, Path]:
    """probes.json, probes.md and the bar-chart figure probes.{png,pdf} in `out`; with the result's per-object
    predictions, out/predictions/ (table, metrics and a figure per property of the pretrained headline probe)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": result.save(out / PROBES_JSON), "markdown": out / "probes.md"}
    paths["markdown"].write_text(markdown_table(result))
    paths.update(plot_probe_summary(result, out / "probes"))
    if result.predictions is not None and len(result.predictions):
        result.predictions.info = {"command": "astrolom probe", **{k: result.protocol.get(k) for k in
                                   ("fit_split", "test_split", "n_fit", "n_test", "column", "seed")}}  # fmt: skip
        plots = [("pretrained", headline_method(result))]
        written = write_predictions(result.predictions, out / PREDICTIONS_DIR, plots)
        paths.update(predictions=written["parquet"], prediction_metrics=written["metrics"])
    return paths


def write_column_reports(results: dict[str, ProbeResult], out: str | Path, method: str = "linear") -> dict[str, Path]:
    """`write_report` for each column in out/<column>/, plus out/columns.json and out/columns.md (the comparison)."""
    out = Path(out)
    for column, result in results.items():
        write_report(result, out / column)
    paths = {"json": save_columns(results, out / COLUMNS_JSON), "markdown": out / COLUMNS_MD}
    paths["markdown"].write_text(columns_markdown(results, method))
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, help="Parquet file (or directory of parts) from astrolom embed")
    parser.add_argument(
        "--out",
        required=True,
        help="output directory for probes.json / probes.md / figure and predictions/ (per-object test predictions, "
        "their metrics with sigma_NMAD / bias / eta for redshift, predicted-vs-true figures)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated label columns (missing ones are listed as skipped)",
    )
    parser.add_argument(
        "--columns",
        default="auto",
        help="embedding columns to probe, each on the objects that have all of them: auto (every embedding_* "
        "column, or embedding when it is the only one) or a comma-separated list",
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="subset of linear,knn,mlp")
    parser.add_argument("--classify", default="", help="targets to treat as classes even if numeric")
    parser.add_argument("--fit-split", default="val")
    parser.add_argument("--test-split", default="test")
    parser.add_argument(
        "--model", default=None, help="pretrained RUN (or RUN/final): enables the random-init control of its config"
    )
    parser.add_argument(
        "--control-embeddings", default=None, help="precomputed random-init embeddings (skips computing them)"
    )
    parser.add_argument("--data", default=None, help="data set of the embeddings: enables the pixel baselines")
    parser.add_argument(
        "--baselines",
        default="random_init,pca_pixels,photometry,cnn",
        help="which of random_init,pca_pixels,photometry,cnn to run when --model/--data allow",
    )
    parser.add_argument("--seed", type=int, default=0, help="probe seed; also seeds the random-init control")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size for control embeddings")
    parser.add_argument("--cnn-epochs", type=int, default=40, help="epochs of the supervised CNN baseline")
    parser.add_argument(
        "--pixel-crop", type=int, default=64, help="central pixels the PCA / photometry / CNN baselines see"
    )
    parser.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    columns = choose_columns(embedding_columns(args.embeddings), args.columns)
    if len(columns) > 1:
        return _run_columns(args, columns)
    emb = load_embeddings(args.embeddings, columns[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(comma_list(args.baselines, name="--baselines"))
    unknown = wanted - set(bl.BASELINES)
    if unknown:
        raise ValueError(f"unknown baseline(s) {sorted(unknown)}; choose from {bl.BASELINES}")
    control = None
    if args.control_embeddings:
        control = load_embeddings(args.control_embeddings)
    elif args.model and "random_init" in wanted:
        control = bl.random_init_embeddings(
            args.model,
            args.data or emb.metadata.get("data"),
            out / "embeddings_random_init.parquet",
            emb,
            splits=(args.fit_split, args.test_split),
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
        )
    baselines, supervised = {}, {}
    if args.data:
        baselines, supervised = bl.pixel_baselines(
            args.data,
            emb,
            fit_split=args.fit_split,
            test_split=args.test_split,
            which=wanted,
            targets=list(comma_list(args.targets, name="--targets")),
            classify=comma_list(args.classify, name="--classify"),
            pixel_crop=args.pixel_crop,
            cnn_epochs=args.cnn_epochs,
            seed=args.seed,
            progress=log.info,
        )
    report = evaluate(
        emb,
        list(comma_list(args.targets, name="--targets")),
        comma_list(args.methods, name="--methods"),
        args.fit_split,
        args.test_split,
        control=control,
        baselines=baselines,
        supervised=supervised,
        classify=comma_list(args.classify, name="--classify"),
        seed=args.seed,
        progress=log.info,
    )
    paths = write_report(report, out)
    print(markdown_table(report))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0


def _run_columns(args: argparse.Namespace, columns: list[str]) -> int:
    if args.model or args.data or args.control_embeddings:
        raise ValueError(
            f"the control and pixel baselines run beside one embedding column; this file has {columns}: "
            "pass --columns NAME with --model/--data/--control-embeddings"
        )
    methods = comma_list(args.methods, name="--methods")
    results = evaluate_columns(
        load_embedding_columns(args.embeddings, columns),
        list(comma_list(args.targets, name="--targets")),
        methods,
        args.fit_split,
        args.test_split,
        classify=comma_list(args.classify, name="--classify"),
        seed=args.seed,
        progress=log.info,
    )
    method = "linear" if "linear" in methods else methods[0]
    paths = write_column_reports(results, args.out, method)
    print(columns_markdown(results, method))
    log.info("wrote %s and %s/<column>/probes.json", ", ".join(str(p) for p in paths.values()), args.out)
    return 0
