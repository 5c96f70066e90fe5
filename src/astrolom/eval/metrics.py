"""Point-estimate metrics of property predictions, scored the way papers report them, and per-object predictions.

The one home of these numbers (`astrolom probe`, `eval-align`, `finetune` and the report all call it). For
predictions y_hat of a property y over n objects:

- R2 = 1 - sum (y_hat - y)^2 / sum (y - mean y)^2 (NaN when y is constant or n < 2);
- MAE = mean |y_hat - y|;

and, for redshift (targets named in `REDSHIFT_TARGETS`), with dz = z_hat - z:

- sigma_NMAD = 1.4826 * median(|dz - median dz| / (1 + z)), the normalised median absolute deviation as Brammer
  et al. 2008 (EAZY) and most photo-z papers write it (1.4826 makes it the standard deviation for a Gaussian);
- bias = median(dz / (1 + z)), the median normalised residual (signed: positive means over-predicted);
- eta = the fraction of objects with |dz| / (1 + z) > 0.15, the catastrophic-outlier fraction.

Pairs with a non-finite truth or prediction are left out and counted (`n_missing`), never dropped silently.

`PredictionSet` keeps the per-object predictions of several (feature set, method, target) on one split and writes
them as one long-format Parquet table (one row per object per prediction; columns in `COLUMNS`), with the metrics
of every group beside it (`metrics.json`). `write` puts both, and any figures the caller draws, into one directory
switched in by an atomic rename, so a reader sees the previous generation or the new one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from astrolom import layout

NMAD_SCALE = 1.4826  # 1 / Phi^-1(3/4): a Gaussian's standard deviation from its median absolute deviation
OUTLIER_THRESHOLD = 0.15  # |dz| / (1 + z) above this is a catastrophic outlier
REDSHIFT_TARGETS = ("redshift", "z", "z_spec", "zspec", "photo_z")
# columns of the predictions table, in order
COLUMNS = ("object_id", "split", "feature_set", "method", "target", "truth", "prediction", "posterior_sigma")


def is_redshift(target: str) -> bool:
    """Whether a property is scored with the photo-z metrics as well."""
    return target.lower() in REDSHIFT_TARGETS


def _pairs(y_true, y_pred) -> tuple[np.ndarray, np.ndarray, int]:
    """(finite truths, finite predictions, pairs left out) of two equal-length arrays."""
    t, p = np.asarray(y_true, np.float64).ravel(), np.asarray(y_pred, np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"{len(t)} true values but {len(p)} predictions")
    ok = np.isfinite(t) & np.isfinite(p)
    return t[ok], p[ok], int((~ok).sum())


def r2(y_true, y_pred) -> float:
    """Coefficient of determination, 1 - SS_res / SS_tot (NaN for fewer than 2 objects or a constant truth)."""
    t, p, _ = _pairs(y_true, y_pred)
    ss_tot = float(np.sum((t - t.mean()) ** 2)) if len(t) else 0.0
    if len(t) < 2 or ss_tot == 0.0:
        return float("nan")
    return 1.0 - float(np.sum((p - t) ** 2)) / ss_tot


def mae(y_true, y_pred) -> float:
    """Mean absolute error (NaN without objects)."""
    t, p, _ = _pairs(y_true, y_pred)
    return float(np.mean(np.abs(p - t))) if len(t) else float("nan")


def _normalised_residuals(z_true, z_pred) -> tuple[np.ndarray, np.ndarray]:
    z, zp, _ = _pairs(z_true, z_pred)
    if np.any(z <= -1):
        raise ValueError(f"redshifts must be > -1 to normalise by 1 + z; got a minimum of {z.min():g}")
    return zp - z, 1.0 + z


def sigma_nmad(z_true, z_pred) -> float:
    """1.4826 * median(|dz - median dz| / (1 + z)) with dz = z_pred - z_true (NaN without objects)."""
    dz, one_plus_z = _normalised_residuals(z_true, z_pred)
    if not len(dz):
        return float("nan")
    return NMAD_SCALE * float(np.median(np.abs(dz - np.median(dz)) / one_plus_z))


def bias(z_true, z_pred) -> float:
    """median(dz / (1 + z)), dz = z_pred - z_true: the signed, normalised median offset (NaN without objects)."""
    dz, one_plus_z = _normalised_residuals(z_true, z_pred)
    return float(np.median(dz / one_plus_z)) if len(dz) else float("nan")


def outlier_fraction(z_true, z_pred, threshold: float = OUTLIER_THRESHOLD) -> float:
    """eta: the fraction of objects with |dz| / (1 + z) > `threshold` (NaN without objects)."""
    dz, one_plus_z = _normalised_residuals(z_true, z_pred)
    return float(np.mean(np.abs(dz) / one_plus_z > threshold)) if len(dz) else float("nan")


def regression_metrics(y_true, y_pred, target: str = "") -> dict[str, float]:
    """{"n", "n_missing", "r2", "mae"}, plus {"sigma_nmad", "bias", "eta"} when `target` is a redshift."""
    t, p, missing = _pairs(y_true, y_pred)
    out = {"n": len(t), "n_missing": missing, "r2": r2(t, p), "mae": mae(t, p)}
    if is_redshift(target):
        out.update(sigma_nmad=sigma_nmad(t, p), bias=bias(t, p), eta=outlier_fraction(t, p))
    return out


# ------------------------------------------------------------------------------------------------- per object


@dataclass
class PredictionSet:
    """Per-object point predictions (and posterior widths where a flow gives them) of several feature sets, methods
    and targets; one row per object per prediction. Read it back with `PredictionSet.read`."""

    columns: dict[str, list[np.ndarray]] = field(default_factory=lambda: {c: [] for c in COLUMNS})
    info: dict = field(default_factory=dict)  # what produced the predictions (command, protocol), kept in metrics

    def add(
        self,
        feature_set: str,
        method: str,
        target: str,
        object_id,
        truth,
        prediction,
        *,
        posterior_sigma=None,
        split: str = "test",
    ) -> None:
        """Append the predictions of one (feature set, method, target); `posterior_sigma` per object or None."""
        ids = np.asarray(object_id).astype(str)
        truth = np.asarray(truth, np.float64).ravel()
        prediction = np.asarray(prediction, np.float64).ravel()
        sigma = np.full(len(ids), np.nan) if posterior_sigma is None else np.asarray(posterior_sigma, np.float64)
        if not len(ids) == len(truth) == len(prediction) == len(sigma.ravel()):
            raise ValueError(
                f"{feature_set}/{method}/{target}: {len(ids)} ids, {len(truth)} truths, {len(prediction)} "
                f"predictions and {len(sigma.ravel())} posterior widths must be equal in number"
            )
        n = len(ids)
        for name, value in (("split", split), ("feature_set", feature_set), ("method", method), ("target", target)):
            self.columns[name].append(np.full(n, value, dtype=object))
        for name, value in (("object_id", ids), ("truth", truth), ("prediction", prediction)):
            self.columns[name].append(value)
        self.columns["posterior_sigma"].append(sigma.ravel())

    def __len__(self) -> int:
        return sum(len(a) for a in self.columns["object_id"])

    def arrays(self) -> dict[str, np.ndarray]:
        """Every column concatenated (object arrays for strings, float64 for numbers)."""
        out = {}
        for name in COLUMNS:
            parts = self.columns[name]
            kind = object if name in ("object_id", "split", "feature_set", "method", "target") else np.float64
            out[name] = np.concatenate(parts).astype(kind) if parts else np.zeros(0, kind)
        return out

    def groups(self) -> list[tuple[str, str, str]]:
        """(feature set, method, target) in the order they were added."""
        a = self.arrays()
        keys = zip(a["feature_set"], a["method"], a["target"], strict=True)
        return list(dict.fromkeys((str(f), str(m), str(t)) for f, m, t in keys))

    def select(self, feature_set: str, method: str, target: str) -> dict[str, np.ndarray]:
        """The rows of one group as arrays (object_id, truth, prediction, posterior_sigma, split)."""
        a = self.arrays()
        sel = (a["feature_set"] == feature_set) & (a["method"] == method) & (a["target"] == target)
        if not sel.any():
            raise KeyError(f"no predictions for {feature_set}/{method}/{target}; have {self.groups()}")
        return {k: v[sel] for k, v in a.items()}

    def metrics(self) -> list[dict]:
        """`regression_metrics` of every group, with the group's names and the mean posterior width where given."""
        rows = []
        for fs, method, target in self.groups():
            g = self.select(fs, method, target)
            row = {"feature_set": fs, "method": method, "target": target, "split": str(g["split"][0])}
            row.update(regression_metrics(g["truth"], g["prediction"], target))
            sigma = g["posterior_sigma"][np.isfinite(g["posterior_sigma"])]
            if len(sigma):
                row["median_posterior_sigma"] = float(np.median(sigma))
            rows.append(row)
        return rows

    def to_table(self):
        import pyarrow as pa

        return pa.table({k: pa.array(v, pa.string() if v.dtype == object else pa.float64())
                         for k, v in self.arrays().items()})  # fmt: skip

    def write(
        self, folder: str | Path, figures: Callable[[PredictionSet, Path], object] | None = None
    ) -> dict[str, Path]:
        """Write folder/predictions.parquet and folder/metrics.json (and whatever `figures(self, tmp_folder)` draws)
        as one new generation of `folder`, switched in by an atomic rename. Returns the paths of the two files."""
        import pyarrow.parquet as pq

        folder = Path(folder)
        doc = {"definitions": DEFINITIONS, "info": self.info, "metrics": self.metrics()}
        with layout.atomic_directory(folder) as tmp:
            pq.write_table(self.to_table(), tmp / layout.PREDICTIONS_PARQUET)
            (tmp / layout.PREDICTION_METRICS_JSON).write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
            if figures is not None:
                figures(self, tmp)
        return {"parquet": folder / layout.PREDICTIONS_PARQUET, "metrics": folder / layout.PREDICTION_METRICS_JSON}

    @classmethod
    def read(cls, path: str | Path) -> PredictionSet:
        """A predictions.parquet (or the folder holding one), checked for the columns `COLUMNS` names."""
        import pyarrow.parquet as pq

        path = Path(path)
        if path.is_dir():
            path = path / layout.PREDICTIONS_PARQUET
        if not path.is_file():
            raise FileNotFoundError(f"no predictions table at {path}")
        table = pq.read_table(path)
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{path} is not a predictions table: no column(s) {', '.join(missing)}")
        out = cls()
        for name in COLUMNS:
            kind = np.float64 if name in ("truth", "prediction", "posterior_sigma") else object
            out.columns[name] = [table.column(name).to_numpy(zero_copy_only=False).astype(kind)]
        return out


DEFINITIONS = {
    "dz": "prediction - truth",
    "r2": "1 - sum(dz^2) / sum((truth - mean truth)^2)",
    "mae": "mean |dz|",
    "sigma_nmad": f"{NMAD_SCALE} * median(|dz - median(dz)| / (1 + z))",
    "bias": "median(dz / (1 + z))",
    "eta": f"fraction with |dz| / (1 + z) > {OUTLIER_THRESHOLD}",
    "redshift": f"sigma_nmad, bias and eta are given for targets named {', '.join(REDSHIFT_TARGETS)}",
    "n_missing": "objects left out for a non-finite truth or prediction",
    "median_posterior_sigma": "median over objects of half the central 68% interval of the posterior (flows only)",
}


def read_metrics(folder: str | Path) -> dict:
    """The metrics.json a `PredictionSet.write` left in `folder` (definitions, info, metrics rows)."""
    path = Path(folder) / layout.PREDICTION_METRICS_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no prediction metrics at {path}")
    doc = json.loads(path.read_text())
    if "metrics" not in doc:
        raise ValueError(f"{path} holds no 'metrics' rows")
    return doc
