"""`astrolom metrics`: score property predictions the way papers report them (`astrolom.eval.metrics`).

    astrolom metrics DIR/predictions                                   # a predictions folder astrolom wrote
    astrolom metrics catalogue.parquet --truth z_spec --prediction z_phot --redshift --out DIR

A predictions folder (or its predictions.parquet) is rescored group by group: each (feature set, method, target).
Any other Parquet or CSV table needs `--truth` and `--prediction` columns. `--redshift` adds sigma_NMAD, bias and
eta, and so does a truth column with a redshift's name. `--out DIR` writes the predictions as a predictions folder,
with the metrics and the predicted-vs-true figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from astrolom import layout
from astrolom.eval import metrics as mt
from astrolom.eval.figures import write_predictions


def _read_table(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix.lower() in (".csv", ".txt"):
        import pyarrow.csv as pv

        return pv.read_csv(path)
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _numeric(table, name: str, path: Path) -> np.ndarray:
    if name not in table.column_names:
        raise ValueError(f"{path}: no column {name!r}; it has {', '.join(table.column_names)}")
    try:
        return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: column {name!r} is not numeric ({table.schema.field(name).type})") from err


def catalogue_predictions(
    path: str | Path, truth: str, prediction: str, *, target: str | None = None, object_id: str | None = None
) -> mt.PredictionSet:
    """A `PredictionSet` of one table's (truth, prediction) columns: feature set = the file's name, method = the
    prediction column, target = `target` (default: the truth column's name), ids from `object_id` (default: rows)."""
    path = Path(path)
    table = _read_table(path)
    t, p = _numeric(table, truth, path), _numeric(table, prediction, path)
    if object_id is None:
        ids = np.arange(len(t)).astype(str)
    elif object_id not in table.column_names:
        raise ValueError(f"{path}: no column {object_id!r}; it has {', '.join(table.column_names)}")
    else:
        ids = np.asarray(table.column(object_id).to_pylist()).astype(str)
    out = mt.PredictionSet(info={"command": "astrolom metrics", "source": str(path), "truth": truth})
    out.add(path.stem, prediction, target or truth, ids, t, p, split="all")
    return out


def metrics_markdown(rows: list[dict]) -> str:
    """Markdown table of `PredictionSet.metrics` rows (photo-z columns where any row has them)."""
    photo_z = any("sigma_nmad" in r for r in rows)
    head = ["feature set", "method", "target", "split", "N", "missing", "R2", "MAE"]
    head += ["sigma_NMAD", "bias", "eta"] if photo_z else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["feature_set"], r["method"], r["target"], r["split"], str(r["n"]), str(r["n_missing"]),
                 f"{r['r2']:.4f}", f"{r['mae']:.4g}"]  # fmt: skip
        if photo_z:
            cells += [f"{r[k]:{f}}" if k in r else "-" for k, f in (("sigma_nmad", ".4f"), ("bias", "+.4f"),
                                                                      ("eta", ".4f"))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", metavar="PATH", help="a predictions folder / predictions.parquet, or any Parquet/CSV")
    parser.add_argument("--truth", default=None, help="column of true values (tables astrolom did not write)")
    parser.add_argument("--prediction", default=None, help="column of predicted values")
    parser.add_argument("--id", default=None, help="column of object ids (default: row numbers)")
    parser.add_argument(
        "--redshift", action="store_true", help="score as redshift (sigma_NMAD, bias, eta) whatever the column name"
    )
    parser.add_argument("--out", default=None, help="write a predictions folder (table, metrics, figures) here")


def run(args: argparse.Namespace) -> int:
    path = Path(args.table)
    own = path.is_dir() or path.name == layout.PREDICTIONS_PARQUET
    if own:
        preds = mt.PredictionSet.read(path)
    elif args.truth and args.prediction:
        preds = catalogue_predictions(path, args.truth, args.prediction, object_id=args.id,
                                      target="redshift" if args.redshift else None)  # fmt: skip
    else:
        raise ValueError(f"{path} is not a predictions table astrolom wrote: give --truth and --prediction columns")
    print(metrics_markdown(preds.metrics()), end="")
    if args.out:
        paths = write_predictions(preds, args.out, [(fs, m) for fs, m, _ in preds.groups()])
        print(f"wrote {paths['parquet']}, {paths['metrics']} and the figures")
    return 0
