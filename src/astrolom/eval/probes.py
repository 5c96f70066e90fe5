"""Read physics out of embeddings: linear, kNN ("zero-shot") and MLP ("few-shot") probes, against controls.

Protocol (AstroPT paper sec. 3, AstroCLIP sec. 6): probes are fit on the validation split (never seen in
pretraining) and scored on the test split. Features are standardised with statistics of the fit split only.

- linear: ridge regression with the penalty chosen by efficient leave-one-out CV (`RidgeCV`); for classes
  (telescope, edge_on, ...) a cross-validated L2 logistic regression;
- knn: k-nearest-neighbour regression / classification on the standardised features (AstroCLIP's "zero-shot");
- mlp: one hidden layer of width 32 (AstroCLIP's "few-shot").

Metrics: R2 and MAE for regression, plus sigma_NMAD, bias and the outlier fraction eta for redshift
(`astrolom.eval.metrics`, which defines them); accuracy and support-weighted F1 for classes (plus the majority-class
accuracy, the score of a probe that learnt nothing). `evaluate` also keeps every regression prediction per test
object (`ProbeResult.predictions`, a `metrics.PredictionSet`; `astrolom probe` writes it as Parquet). Every table
puts the pretrained model beside a randomly initialised model of the same preset (the control), PCA of pixels,
photometry measured from the images and a supervised CNN, on the same objects and splits (`astrolom.eval.baselines`).

`evaluate` returns a `ProbeResult`: `result.score(target, feature_set, method)` is the one lookup of a score, and
`result.save(path)` / `ProbeResult.load(path)` keep the readable JSON of probes.json. A file with several embedding
columns is probed column by column with `astrolom.eval.probe_columns`. This module is a pure probe library (it
imports only `astrolom.eval.embeddings`, `astrolom.eval.metrics` and the estimators of each method,
`astrolom.eval.probe_estimators`); the `astrolom probe` command that adds the baselines and the figures is
`astrolom.eval.probe_cli`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler

from astrolom.eval.embeddings import (
    EmbeddingTable,
    load_embeddings,  # noqa: F401  (its home before issue 7; same object)
    split_rows,
)
from astrolom.eval.metrics import PredictionSet, regression_metrics
from astrolom.eval.probe_estimators import (
    CLASSIFICATION,
    KNN_K,
    METHODS,
    MLP_WIDTH,
    REGRESSION,
    make_estimator,
    target_kind,
)

SUPERVISED = "supervised"  # the "method" of a feature set that predicts the targets itself (the CNN)
# every label of the mock survey a probe can read (`astrolom probe` default)
DEFAULT_TARGETS = (
    "redshift",
    "log_mstar",
    "log_ssfr",
    "g_minus_r",
    "r_minus_z",
    "abs_mag_g",
    "abs_mag_z",
    "mag_r",
    "r_half_arcsec",
    "sersic_n",
    "axis_ratio",
    "smooth",
    "disc",
    "spiral",
    "telescope",
    "edge_on",
)
# the paper's headline physics: the demo checks that pretraining beats the control and PCA on these
KEY_TARGETS = ("redshift", "log_mstar", "g_minus_r")
# a short list for summaries and sweeps: the key targets plus a magnitude, morphology and the instrument
HEADLINE_TARGETS = (*KEY_TARGETS, "abs_mag_g", "sersic_n", "smooth", "telescope")
# column order of the tables: the model under test, then its control, then the baselines
FEATURE_SET_ORDER = ("pretrained", "random_init", "pca_pixels", "photometry", "cnn")


def _valid(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "OUS":
        return values != ""
    return np.isfinite(values.astype(np.float64))


def fit_probe(
    X_fit: np.ndarray,
    y_fit: np.ndarray,
    X_test: np.ndarray,
    kind: str,
    method: str = "linear",
    seed: int = 0,
) -> np.ndarray:
    """Fit one probe on (X_fit, y_fit) and predict X_test. Features are standardised with fit-split statistics."""
    scaler = StandardScaler().fit(X_fit)
    A, B = scaler.transform(X_fit), scaler.transform(X_test)
    counts = np.unique(y_fit, return_counts=True)[1] if kind == CLASSIFICATION else np.zeros(1, int)
    est = make_estimator(kind, method, len(X_fit), int(counts.min()), seed, A.shape[1], len(counts))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(A, y_fit)
    return est.predict(B)


def score(y_true: np.ndarray, y_pred: np.ndarray, kind: str, target: str = "") -> dict[str, float]:
    """R2 and MAE for regression (plus sigma_NMAD, bias and eta when `target` is a redshift: `eval.metrics`);
    accuracy and support-weighted F1 for classification."""
    if kind == REGRESSION:
        m = regression_metrics(y_true, y_pred, target)
        return {k: v for k, v in m.items() if k not in ("n", "n_missing")}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
    }


def primary_metric(kind: str) -> str:
    return "r2" if kind == REGRESSION else "accuracy"


@dataclass
class ProbeTask:
    """One target on fixed fit/test objects (shared by every feature set so their scores compare)."""

    name: str
    kind: str
    y_fit: np.ndarray
    y_test: np.ndarray
    fit_rows: np.ndarray  # indices into the fit-split arrays
    test_rows: np.ndarray

    def summary(self) -> dict:
        out = {"kind": self.kind, "n_fit": int(len(self.y_fit)), "n_test": int(len(self.y_test))}
        if self.kind == CLASSIFICATION:
            values, counts = np.unique(self.y_test, return_counts=True)
            out["classes"] = [str(v) for v in values]
            out["majority_accuracy"] = float(counts.max() / counts.sum())
        else:
            out["test_std"] = float(np.std(self.y_test))
        return out


def make_tasks(
    labels_fit: dict[str, np.ndarray],
    labels_test: dict[str, np.ndarray],
    targets: list[str],
    classify: tuple[str, ...] = (),
    min_objects: int = 5,
) -> tuple[list[ProbeTask], dict[str, str]]:
    """Build probe tasks; returns (tasks, skipped target -> reason)."""
    tasks, skipped = [], {}
    for name in targets:
        if name not in labels_fit or name not in labels_test:
            skipped[name] = "not a label column"
            continue
        yf, yt = labels_fit[name], labels_test[name]
        kind = CLASSIFICATION if name in classify else target_kind(np.concatenate([yf, yt]))
        fit_rows, test_rows = np.flatnonzero(_valid(yf)), np.flatnonzero(_valid(yt))
        if len(fit_rows) < min_objects or len(test_rows) < min_objects:
            skipped[name] = f"fewer than {min_objects} labelled objects in a split"
            continue
        yf, yt = yf[fit_rows], yt[test_rows]
        if kind == CLASSIFICATION:
            yf, yt = yf.astype(str), yt.astype(str)
            if np.unique(yf).size < 2:
                skipped[name] = "a single class in the fit split"
                continue
        else:
            yf, yt = yf.astype(np.float64), yt.astype(np.float64)
        tasks.append(ProbeTask(name, kind, yf, yt, fit_rows, test_rows))
    return tasks, skipped


def predict_features(
    X_fit: np.ndarray,
    X_test: np.ndarray,
    tasks: list[ProbeTask],
    methods: tuple[str, ...] = METHODS,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """Fit every (target, method) on one feature set -> {target: {method: predictions for the task's test rows}}."""
    X_fit, X_test = np.asarray(X_fit, np.float64), np.asarray(X_test, np.float64)
    out: dict[str, dict[str, np.ndarray]] = {}
    for task in tasks:
        A, B = X_fit[task.fit_rows], X_test[task.test_rows]
        out[task.name] = {m: fit_probe(A, task.y_fit, B, task.kind, m, seed) for m in methods}
    return out


def score_tasks(predictions: dict[str, dict[str, np.ndarray]], tasks: list[ProbeTask]) -> dict[str, dict]:
    """{target: {method: metrics}} of `predict_features`-shaped predictions of the tasks' test rows."""
    return {
        t.name: {m: score(t.y_test, pred, t.kind, t.name) for m, pred in predictions[t.name].items()}
        for t in tasks
        if t.name in predictions
    }


def supervised_predictions(predictions: dict[str, np.ndarray], tasks: list[ProbeTask]) -> dict[str, dict]:
    """A supervised model's predictions of every test object ({target: array over the test split}) as
    `predict_features` shapes them: {target: {SUPERVISED: predictions for the task's test rows}}."""
    return {t.name: {SUPERVISED: predictions[t.name][t.test_rows]} for t in tasks if t.name in predictions}


def run_probes(
    feature_sets: dict[str, tuple[np.ndarray, np.ndarray]],
    tasks: list[ProbeTask],
    methods: tuple[str, ...] = METHODS,
    supervised: dict[str, dict[str, np.ndarray]] | None = None,
    seed: int = 0,
    progress=None,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Probe every feature set {name: (X_fit, X_test)}; `supervised` holds {name: {target: test predictions}}.

    Returns (scores {name: {target: {method: metrics}}}, predictions {name: {target: {method: test-row array}}}).
    """
    predictions = {}
    for name, (X_fit, X_test) in feature_sets.items():
        if progress:
            progress(f"probing {name} ({X_fit.shape[1]} features)")
        predictions[name] = predict_features(X_fit, X_test, tasks, methods, seed)
    for name, preds in (supervised or {}).items():
        predictions[name] = supervised_predictions(preds, tasks)
    return {name: score_tasks(p, tasks) for name, p in predictions.items()}, predictions


def prediction_set(
    predictions: dict[str, dict], tasks: list[ProbeTask], test_ids: np.ndarray, split: str
) -> PredictionSet:
    """The regression targets' predictions of `run_probes` as a per-object `PredictionSet` (classes are scored in
    probes.json only: their truth and prediction are labels, not numbers)."""
    out = PredictionSet()
    for name, per_target in predictions.items():
        for task in tasks:
            if task.kind != REGRESSION or task.name not in per_target:
                continue
            for method, pred in per_target[task.name].items():
                out.add(name, method, task.name, test_ids[task.test_rows], task.y_test, pred, split=split)
    return out


def evaluate(
    embeddings: EmbeddingTable,
    targets: list[str],
    methods: tuple[str, ...] = METHODS,
    fit_split: str = "val",
    test_split: str = "test",
    control: EmbeddingTable | None = None,
    baselines: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    supervised: dict[str, dict[str, np.ndarray]] | None = None,
    classify: tuple[str, ...] = (),
    seed: int = 0,
    progress=None,
) -> ProbeResult:
    """Probe the embeddings, and beside them the optional control and baselines, on the same objects.

    `baselines` maps a name to (features of the fit objects, features of the test objects) in the row order of the
    embeddings' fit/test splits; `supervised` maps a name to {target: predictions for the test objects}.
    """
    fit, test = split_rows(embeddings, fit_split, test_split)
    tasks, skipped = make_tasks(fit.labels, test.labels, list(targets), classify)
    if not tasks:
        raise ValueError(f"no probe targets left: {skipped}")
    feature_sets = {"pretrained": (fit.X, test.X)}
    if control is not None:
        feature_sets["random_init"] = (control.rows_of(fit.object_id), control.rows_of(test.object_id))
    feature_sets.update(baselines or {})
    results, predictions = run_probes(feature_sets, tasks, methods, supervised, seed, progress)
    return ProbeResult(
        protocol={
            "fit_split": fit_split,
            "test_split": test_split,
            "n_fit": len(fit),
            "n_test": len(test),
            "methods": list(methods),
            "standardise": "features standardised with fit-split mean/std",
            "linear": "RidgeCV (LOO over alphas 1e-3..1e5) / LogisticRegressionCV (L2; newton-cholesky, lbfgs if huge)",
            "knn": f"k={KNN_K} nearest neighbours (zero-shot)",
            "mlp": f"one hidden layer, width {MLP_WIDTH} (few-shot)",
            "seed": seed,
        },
        targets={t.name: t.summary() for t in tasks},
        results=results,
        skipped=skipped,
        embeddings=embeddings.metadata,
        predictions=prediction_set(predictions, tasks, np.asarray(test.object_id), test_split),
    )


# ------------------------------------------------------------------------------------------------------- results


@dataclass
class ProbeResult:
    """Probe scores of several feature sets on the same targets, fit and test objects.

    `results[feature_set][target][method]` holds the metrics ({"r2", "mae"}, with "sigma_nmad", "bias" and "eta"
    for redshift, or {"accuracy", "f1"}); a supervised model (the CNN) has a single entry under `SUPERVISED` that
    stands for every probe method. Read scores with `score`, never by indexing `results`: that is where the
    supervised rule lives. `predictions` (kept by `evaluate`, not part of the JSON) are the regression targets'
    per-object test predictions.
    """

    protocol: dict
    targets: dict[str, dict]  # target -> ProbeTask.summary(): kind, n_fit, n_test, classes / majority_accuracy
    results: dict[str, dict[str, dict[str, dict[str, float]]]]
    skipped: dict[str, str] = field(default_factory=dict)
    embeddings: dict = field(default_factory=dict)  # how the probed embeddings were made
    predictions: PredictionSet | None = field(default=None, repr=False, compare=False)

    @property
    def feature_sets(self) -> list[str]:
        """Feature sets in table order: the model, its control, the baselines, then any others."""
        known = [s for s in FEATURE_SET_ORDER if s in self.results]
        return known + [s for s in self.results if s not in FEATURE_SET_ORDER]

    @property
    def methods(self) -> list[str]:
        return list(self.protocol.get("methods", METHODS))

    def kind(self, target: str) -> str:
        return self.targets[target]["kind"]

    def metric(self, target: str) -> str:
        """The headline metric of a target: R2 for regression, accuracy for classes."""
        return primary_metric(self.kind(target))

    def majority_accuracy(self, target: str) -> float | None:
        """Accuracy of always guessing the commonest class (None for regression targets)."""
        return self.targets[target].get("majority_accuracy")

    def is_supervised(self, feature_set: str) -> bool:
        entries = self.results.get(feature_set, {}).values()
        return bool(entries) and all(set(e) == {SUPERVISED} for e in entries)

    def score(
        self, target: str, feature_set: str = "pretrained", method: str = "linear", metric: str | None = None
    ) -> float | None:
        """The `metric` (default: the target's headline metric) of `method`'s probe on `feature_set`.

        None where that feature set, target or method was not scored. A supervised feature set answers with its own
        score for every method.
        """
        if target not in self.targets:
            return None
        entry = self.results.get(feature_set, {}).get(target, {})
        metrics = entry.get(method) or entry.get(SUPERVISED) or {}
        return metrics.get(metric or self.metric(target))

    def to_dict(self) -> dict:
        return {
            "protocol": self.protocol,
            "embeddings": self.embeddings,
            "targets": self.targets,
            "skipped": self.skipped,
            "results": self.results,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict, source: str = "probe result") -> ProbeResult:
        missing = [k for k in ("protocol", "targets", "results") if k not in d]
        if missing:
            raise ValueError(f"{source} is not a probe report: no {', '.join(missing)}")
        return cls(d["protocol"], d["targets"], d["results"], d.get("skipped", {}), d.get("embeddings", {}))

    @classmethod
    def from_json(cls, text: str, source: str = "probe result") -> ProbeResult:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not valid JSON: {err}") from err
        return cls.from_dict(d, source)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ProbeResult:
        """Read a probes.json."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no probe report at {path}")
        return cls.from_json(path.read_text(), str(path))


def markdown_table(result: ProbeResult) -> str:
    """Markdown: one table per probe method; rows are targets, columns feature sets (R2 or accuracy)."""
    sets, pr = result.feature_sets, result.protocol
    lines = [
        f"Probes fit on the `{pr['fit_split']}` split ({pr['n_fit']} objects), "
        f"scored on `{pr['test_split']}` ({pr['n_test']} objects). "
        "Cells: R2 for continuous targets, accuracy for classes (majority-class accuracy in brackets). "
        "`cnn` is a supervised CNN trained end-to-end on the fit split (same value in every table).",
        "",
    ]
    for method in result.methods:
        lines += [f"**{method} probe**", ""]
        lines.append("| target | metric | " + " | ".join(sets) + " |")
        lines.append("|---|---|" + "---|" * len(sets))
        for target in result.targets:
            chance = result.majority_accuracy(target)
            label = result.metric(target) + ("" if chance is None else f" ({chance:.2f})")
            values = [result.score(target, s, method) for s in sets]
            cells = ["-" if v is None else f"{v:.3f}" for v in values]
            lines.append(f"| {target} | {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
