"""Read physics out of embeddings: linear, kNN ("zero-shot") and MLP ("few-shot") probes, against controls.

Protocol (AstroPT paper sec. 3, AstroCLIP sec. 6): probes are fit on the validation split (never seen in
pretraining) and scored on the test split. Features are standardised with statistics of the fit split only.

- linear: ridge regression with the penalty chosen by efficient leave-one-out CV (`RidgeCV`); for classes
  (telescope, edge_on, ...) a cross-validated L2 logistic regression;
- knn: k-nearest-neighbour regression / classification on the standardised features (AstroCLIP's "zero-shot");
- mlp: one hidden layer of width 32 (AstroCLIP's "few-shot").

Metrics: R2 and MAE for regression; accuracy and support-weighted F1 for classes (plus the majority-class accuracy,
the score of a probe that learnt nothing). Every table puts the pretrained model beside a randomly initialised model
of the same preset (the control), PCA of pixels, photometry measured from the images and a supervised CNN, on the
same objects and splits (`astrolom.eval.baselines`).

`astrolom probe --embeddings EMB.parquet --targets redshift,log_mstar --out DIR [--model RUN --data DIR]`
writes DIR/probes.json, DIR/probes.md and DIR/probes.{png,pdf}.
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, r2_score
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.preprocessing import StandardScaler

from astrolom.data.records import METADATA_KEY

METHODS = ("linear", "knn", "mlp")
REGRESSION, CLASSIFICATION = "regression", "classification"
EMBEDDING = "embedding"
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
# column order of the tables: the model under test, then its control, then the baselines
FEATURE_SET_ORDER = ("pretrained", "random_init", "pca_pixels", "photometry", "cnn")
RIDGE_ALPHAS = np.logspace(-3, 5, 17)
LOGISTIC_CS = np.logspace(-4, 2, 7)
KNN_K = 16
MLP_WIDTH = 32


@dataclass
class EmbeddingTable:
    """Embeddings with their object ids, splits and labels (one row per object)."""

    object_id: np.ndarray  # (N,) str
    split: np.ndarray  # (N,) str
    X: np.ndarray  # (N, D) float32
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.object_id)

    def select(self, mask: np.ndarray) -> EmbeddingTable:
        return EmbeddingTable(
            self.object_id[mask],
            self.split[mask],
            self.X[mask],
            {k: v[mask] for k, v in self.labels.items()},
            self.metadata,
        )


def load_embeddings(path: str | Path) -> EmbeddingTable:
    """Read an embedding Parquet file, or a directory of per-rank parts (`astrolom embed` under torchrun)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no embeddings at {path}")
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path} holds no .parquet files")
    tables = [pq.read_table(f) for f in files]
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    if EMBEDDING not in table.column_names:
        raise ValueError(f"{path} has no {EMBEDDING!r} column; was it written by `astrolom embed`?")
    col = table.column(EMBEDDING).combine_chunks()
    dim = col.type.list_size if pa.types.is_fixed_size_list(col.type) else len(col[0].as_py())
    X = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(table), dim)
    meta_raw = (tables[0].schema.metadata or {}).get(METADATA_KEY)
    labels = {
        name: _column_to_numpy(table.column(name))
        for name in table.column_names
        if name not in (EMBEDDING, "object_id", "split")
    }
    return EmbeddingTable(
        object_id=np.asarray(table.column("object_id").to_pylist(), dtype=str),
        split=np.asarray(table.column("split").to_pylist(), dtype=str),
        X=X,
        labels=labels,
        metadata=json.loads(meta_raw) if meta_raw else {},
    )


def _column_to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls become NaN
    if pa.types.is_boolean(col.type):
        return np.asarray([np.nan if v is None else float(v) for v in col.to_pylist()])
    return np.asarray(["" if v is None else str(v) for v in col.to_pylist()], dtype=object)


def target_kind(values: np.ndarray) -> str:
    """Regression for continuous numbers; classification for strings, booleans and small integer label sets."""
    if values.dtype.kind in "OUSb":
        return CLASSIFICATION
    finite = values[np.isfinite(values)]
    if finite.size and np.all(finite == np.round(finite)) and np.unique(finite).size <= 10:
        return CLASSIFICATION
    return REGRESSION


def _valid(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "OUS":
        return values != ""
    return np.isfinite(values.astype(np.float64))


class _MLPProbe:
    """One hidden layer of width 32 (GELU), AdamW, early stopping on 20% of the fit split with the best weights kept.

    Plain torch rather than scikit-learn's MLP: its early stopping on a 10% split still overfits small fit splits
    (R2 of about -0.6 on pure noise with 400 objects), while choosing its penalty by CV costs minutes per target.
    """

    def __init__(self, kind: str, seed: int = 0, max_epochs: int = 1000, patience: int = 50, holdout: float = 0.2):
        self.kind, self.seed, self.max_epochs, self.patience, self.holdout = kind, seed, max_epochs, patience, holdout

    def fit(self, X: np.ndarray, y: np.ndarray) -> _MLPProbe:
        import torch

        threads = torch.get_num_threads()
        # a 32-wide MLP is all per-op overhead: several threads only contend (17x slower on 2 busy cores)
        torch.set_num_threads(1)
        try:
            return self._fit(torch, X, y)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, torch, X: np.ndarray, y: np.ndarray) -> _MLPProbe:
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.as_tensor(X, dtype=torch.float32)
        if self.kind == REGRESSION:
            self.mu, self.sd = float(np.mean(y)), float(np.std(y)) or 1.0
            t = torch.as_tensor((y - self.mu) / self.sd, dtype=torch.float32)[:, None]
            n_out, loss_fn = 1, torch.nn.functional.mse_loss
        else:
            self.classes, codes = np.unique(y, return_inverse=True)
            t = torch.as_tensor(codes, dtype=torch.long)
            n_out, loss_fn = len(self.classes), torch.nn.functional.cross_entropy
        perm = torch.randperm(len(x), generator=gen)
        n_hold = max(1, int(self.holdout * len(x))) if len(x) >= 10 else 0
        hold, train = perm[:n_hold], perm[n_hold:]
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(x.shape[1], MLP_WIDTH), torch.nn.GELU(), torch.nn.Linear(MLP_WIDTH, n_out)
            )
        opt = torch.optim.AdamW(self.net.parameters(), lr=1e-2, weight_decay=1e-2)
        best, best_state, since = float("inf"), None, 0
        batch = 256
        for _ in range(self.max_epochs):
            self.net.train()
            order = train[torch.randperm(len(train), generator=gen)]
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                opt.zero_grad()
                loss_fn(self.net(x[idx]), t[idx]).backward()
                opt.step()
            if n_hold == 0:
                continue
            with torch.no_grad():
                val = float(loss_fn(self.net(x[hold]), t[hold]))
            if val < best - 1e-5:
                best, since = val, 0
                best_state = {k: v.clone() for k, v in self.net.state_dict().items()}
            else:
                since += 1
                if since >= self.patience:
                    break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.net(torch.as_tensor(X, dtype=torch.float32))
        if self.kind == REGRESSION:
            return out[:, 0].numpy().astype(np.float64) * self.sd + self.mu
        return self.classes[out.argmax(1).numpy()]


def _make_estimator(kind: str, method: str, n_fit: int, min_class: int, seed: int):
    if method == "linear":
        if kind == REGRESSION:
            return RidgeCV(alphas=RIDGE_ALPHAS)
        folds = min(5, min_class)
        if folds < 2:
            return LogisticRegression(C=1.0, max_iter=2000)
        return LogisticRegressionCV(
            Cs=LOGISTIC_CS,
            cv=folds,
            max_iter=2000,
            l1_ratios=(0.0,),
            scoring="neg_log_loss",
            use_legacy_attributes=False,
        )
    if method == "knn":
        k = max(1, min(KNN_K, n_fit - 1))
        return KNeighborsRegressor(n_neighbors=k) if kind == REGRESSION else KNeighborsClassifier(n_neighbors=k)
    if method == "mlp":
        return _MLPProbe(kind, seed=seed)
    raise ValueError(f"unknown probe method {method!r}; choose from {METHODS}")


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
    min_class = int(np.unique(y_fit, return_counts=True)[1].min()) if kind == CLASSIFICATION else 0
    est = _make_estimator(kind, method, len(X_fit), min_class, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(A, y_fit)
    return est.predict(B)


def score(y_true: np.ndarray, y_pred: np.ndarray, kind: str) -> dict[str, float]:
    """R2 and MAE for regression; accuracy and support-weighted F1 for classification."""
    if kind == REGRESSION:
        return {
            "r2": float(r2_score(y_true, y_pred)),
            "mae": float(mean_absolute_error(y_true, y_pred)),
        }
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


def probe_features(
    X_fit: np.ndarray,
    X_test: np.ndarray,
    tasks: list[ProbeTask],
    methods: tuple[str, ...] = METHODS,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """Score every (target, method) on one feature set -> {target: {method: metrics}}."""
    X_fit, X_test = np.asarray(X_fit, np.float64), np.asarray(X_test, np.float64)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task in tasks:
        A, B = X_fit[task.fit_rows], X_test[task.test_rows]
        out[task.name] = {
            m: score(task.y_test, fit_probe(A, task.y_fit, B, task.kind, m, seed), task.kind) for m in methods
        }
    return out


def score_predictions(predictions: dict[str, np.ndarray], tasks: list[ProbeTask]) -> dict[str, dict]:
    """Scores of a model that predicts the targets itself (the supervised CNN), on the test objects of each task."""
    return {
        t.name: {"supervised": score(t.y_test, predictions[t.name][t.test_rows], t.kind)}
        for t in tasks
        if t.name in predictions
    }


def split_rows(table: EmbeddingTable, fit_split: str, test_split: str) -> tuple[EmbeddingTable, EmbeddingTable]:
    fit, test = table.select(table.split == fit_split), table.select(table.split == test_split)
    for name, part in ((fit_split, fit), (test_split, test)):
        if len(part) == 0:
            have = sorted(set(table.split.tolist()))
            raise ValueError(f"no objects in split {name!r}; the embeddings hold splits {have}")
    return fit, test


def align(table: EmbeddingTable, object_ids: np.ndarray) -> np.ndarray:
    """Rows of `table.X` in the order of `object_ids` (every id must be present)."""
    index = {oid: i for i, oid in enumerate(table.object_id)}
    missing = [oid for oid in object_ids if oid not in index]
    if missing:
        raise ValueError(f"{len(missing)} objects (e.g. {missing[0]!r}) have no row in the control/baseline table")
    return table.X[[index[oid] for oid in object_ids]]


def run_probes(
    feature_sets: dict[str, tuple[np.ndarray, np.ndarray]],
    tasks: list[ProbeTask],
    methods: tuple[str, ...] = METHODS,
    supervised: dict[str, dict[str, np.ndarray]] | None = None,
    seed: int = 0,
    progress=None,
) -> dict[str, dict]:
    """Probe every feature set {name: (X_fit, X_test)}; `supervised` holds {name: {target: test predictions}}."""
    results = {}
    for name, (X_fit, X_test) in feature_sets.items():
        if progress:
            progress(f"probing {name} ({X_fit.shape[1]} features)")
        results[name] = probe_features(X_fit, X_test, tasks, methods, seed)
    for name, preds in (supervised or {}).items():
        results[name] = score_predictions(preds, tasks)
    return results


def markdown_table(report: dict) -> str:
    """Markdown: one table per probe method; rows are targets, columns feature sets (R2 or accuracy)."""
    results, targets = report["results"], report["targets"]
    sets = [s for s in FEATURE_SET_ORDER if s in results] + [s for s in results if s not in FEATURE_SET_ORDER]
    lines = [
        f"Probes fit on the `{report['protocol']['fit_split']}` split ({report['protocol']['n_fit']} objects), "
        f"scored on `{report['protocol']['test_split']}` ({report['protocol']['n_test']} objects). "
        "Cells: R2 for continuous targets, accuracy for classes (majority-class accuracy in brackets). "
        "`cnn` is a supervised CNN trained end-to-end on the fit split (same value in every table).",
        "",
    ]
    for method in report["protocol"]["methods"]:
        lines += [f"**{method} probe**", ""]
        lines.append("| target | metric | " + " | ".join(sets) + " |")
        lines.append("|---|---|" + "---|" * len(sets))
        for target, info in targets.items():
            metric = primary_metric(info["kind"])
            label = metric + (f" ({info['majority_accuracy']:.2f})" if "majority_accuracy" in info else "")
            cells = []
            for s in sets:
                entry = results[s].get(target, {})
                value = (entry.get(method) or entry.get("supervised") or {}).get(metric)
                cells.append("-" if value is None else f"{value:.3f}")
            lines.append(f"| {target} | {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


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
) -> dict:
    """Full probe report (a JSON-able dict) for embeddings plus optional control and baselines.

    `baselines` maps a name to (features of the fit objects, features of the test objects) in the row order of the
    embeddings' fit/test splits; `supervised` maps a name to {target: predictions for the test objects}.
    """
    fit, test = split_rows(embeddings, fit_split, test_split)
    tasks, skipped = make_tasks(fit.labels, test.labels, list(targets), classify)
    if not tasks:
        raise ValueError(f"no probe targets left: {skipped}")
    feature_sets = {"pretrained": (fit.X, test.X)}
    if control is not None:
        feature_sets["random_init"] = (align(control, fit.object_id), align(control, test.object_id))
    feature_sets.update(baselines or {})
    results = run_probes(feature_sets, tasks, methods, supervised, seed, progress)
    return {
        "protocol": {
            "fit_split": fit_split,
            "test_split": test_split,
            "n_fit": len(fit),
            "n_test": len(test),
            "methods": list(methods),
            "standardise": "features standardised with fit-split mean/std",
            "linear": "RidgeCV (LOO over alphas 1e-3..1e5) / LogisticRegressionCV (L2)",
            "knn": f"k={KNN_K} nearest neighbours (zero-shot)",
            "mlp": f"one hidden layer, width {MLP_WIDTH} (few-shot)",
            "seed": seed,
        },
        "embeddings": embeddings.metadata,
        "targets": {t.name: t.summary() for t in tasks},
        "skipped": skipped,
        "results": results,
    }


def write_report(report: dict, out: str | Path) -> dict[str, Path]:
    """probes.json, probes.md and the bar-chart figure probes.{png,pdf} in `out`."""
    from astrolom.eval.figures import plot_probe_summary

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "probes.json", "markdown": out / "probes.md"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["markdown"].write_text(markdown_table(report))
    paths.update(plot_probe_summary(report, out / "probes"))
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, help="Parquet file (or directory of parts) from astrolom embed")
    parser.add_argument("--out", required=True, help="output directory for probes.json / probes.md / figure")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated label columns (missing ones are listed as skipped)",
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
    from astrolom.eval import baselines as bl

    emb = load_embeddings(args.embeddings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = {b.strip() for b in args.baselines.split(",") if b.strip()}
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
            targets=[t.strip() for t in args.targets.split(",") if t.strip()],
            classify=tuple(c.strip() for c in args.classify.split(",") if c.strip()),
            pixel_crop=args.pixel_crop,
            cnn_epochs=args.cnn_epochs,
            seed=args.seed,
            progress=print,
        )
    report = evaluate(
        emb,
        [t.strip() for t in args.targets.split(",") if t.strip()],
        tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        args.fit_split,
        args.test_split,
        control=control,
        baselines=baselines,
        supervised=supervised,
        classify=tuple(c.strip() for c in args.classify.split(",") if c.strip()),
        seed=args.seed,
        progress=print,
    )
    paths = write_report(report, out)
    print(markdown_table(report))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
