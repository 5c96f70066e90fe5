"""Logistic linear probes: lbfgs vs exact Newton (scikit-learn's "newton-cholesky") on the same embeddings.

`astrolom probe`'s classification probe is LogisticRegressionCV (L2, 7 penalties from 1e-4 to 1e2, 5 folds, log-loss
scoring) on standardised features. On wide embeddings (the 1,024-wide multimodal spectrum readout) lbfgs spends up
to its 2,000 iterations at the weak-penalty end of the grid and can stop unconverged; Newton steps on the exact
Hessian reach the optimum in a few iterations while the Hessian is small. This prints, per embedding column and
classification target, the fit time, the chosen penalty, the test accuracy and the number of fits that stopped
unconverged for each solver, and which solver astrolom's probe picks (`astrolom.eval.probe_estimators.logistic_solver`).

    PYTHONPATH=src python benchmarks/probe_solvers.py EMBEDDINGS.parquet [--columns auto] \
        [--targets telescope,edge_on] [--fit val --test test]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.preprocessing import StandardScaler

from astrolom.eval.embeddings import choose_columns, embedding_columns, load_embedding_columns, split_rows
from astrolom.eval.probe_estimators import CLASSIFICATION, logistic_probe, logistic_solver
from astrolom.eval.probes import make_tasks

SOLVERS = ("lbfgs", "newton-cholesky")


def fit_once(A: np.ndarray, y: np.ndarray, solver: str) -> tuple[LogisticRegressionCV, float, int]:
    """The probe's LogisticRegressionCV with one solver: (model, seconds, fits that stopped unconverged)."""
    counts = np.unique(y, return_counts=True)[1]
    est = logistic_probe(A.shape[1], len(counts), min(5, int(counts.min())), solver=solver)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        t0 = time.perf_counter()
        est.fit(A, y)
        seconds = time.perf_counter() - t0
    return est, seconds, sum(issubclass(w.category, ConvergenceWarning) for w in caught)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("embeddings")
    p.add_argument("--columns", default="auto")
    p.add_argument("--targets", default="telescope,edge_on")
    p.add_argument("--fit", default="val")
    p.add_argument("--test", default="test")
    args = p.parse_args(argv)

    columns = choose_columns(embedding_columns(args.embeddings), args.columns)
    targets = [t for t in args.targets.split(",") if t]
    tables = load_embedding_columns(args.embeddings, columns)
    print(
        f"{'column':<20} {'width':>5} {'target':<10} {'solver':<16} {'seconds':>8} {'C':>7} {'accuracy':>8} "
        f"{'unconverged':>11}  astrolom"
    )
    for column, table in tables.items():
        fit, test = split_rows(table, args.fit, args.test)
        tasks, skipped = make_tasks(fit.labels, test.labels, targets, classify=tuple(targets))
        for name, why in skipped.items():
            print(f"{column:<20} {'':>5} {name:<10} skipped: {why}")
        for task in tasks:
            assert task.kind == CLASSIFICATION
            scaler = StandardScaler().fit(fit.X[task.fit_rows])
            A, B = scaler.transform(fit.X[task.fit_rows]), scaler.transform(test.X[task.test_rows])
            picked = logistic_solver(A.shape[1], len(np.unique(task.y_fit)))
            for solver in SOLVERS:
                est, seconds, unconverged = fit_once(A, task.y_fit, solver)
                acc = float(np.mean(est.predict(B) == task.y_test))
                mark = "<- used" if solver == picked else ""
                print(
                    f"{column:<20} {A.shape[1]:>5} {task.name:<10} {solver:<16} {seconds:>8.1f} "
                    f"{float(np.ravel(est.C_)[0]):>7.0e} {acc:>8.4f} {unconverged:>11}  {mark}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
