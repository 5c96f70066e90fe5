"""The probe estimators: which kind a target is (regression or classification) and, per method, the model that
`astrolom.eval.probes.fit_probe` fits on standardised features.

- linear: `RidgeCV` over `RIDGE_ALPHAS` (efficient leave-one-out CV); for classes an L2 logistic regression with its
  penalty chosen by CV (`logistic_probe`, solver by `logistic_solver`);
- knn: k-nearest neighbours with k = `KNN_K` (AstroCLIP's "zero-shot");
- mlp: one hidden layer of `MLP_WIDTH` in plain torch with early stopping (AstroCLIP's "few-shot"); torch is
  imported only when an MLP probe is fitted, so the probe library stays light.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

METHODS = ("linear", "knn", "mlp")
REGRESSION, CLASSIFICATION = "regression", "classification"
RIDGE_ALPHAS = np.logspace(-3, 5, 17)
LOGISTIC_CS = np.logspace(-4, 2, 7)
# Logistic probes solve with Newton steps on the exact Hessian (scikit-learn's "newton-cholesky") while it is small:
# lbfgs crawls on wide embeddings at the weak-penalty end of the CV grid (the demo's 1,024-wide multimodal columns:
# 45-120 s per class target against 12-16 s to the same penalty and accuracy; benchmarks/probe_solvers.py). The
# Hessian has (features x coefficient vectors)^2 entries, so past this many coefficients (4,096^2 doubles = 134 MB)
# lbfgs takes over.
NEWTON_MAX_COEFS = 4096
KNN_K = 16
MLP_WIDTH = 32


def target_kind(values: np.ndarray) -> str:
    """Regression for continuous numbers; classification for strings, booleans and small integer label sets."""
    if values.dtype.kind in "OUSb":
        return CLASSIFICATION
    finite = values[np.isfinite(values)]
    if finite.size and np.all(finite == np.round(finite)) and np.unique(finite).size <= 10:
        return CLASSIFICATION
    return REGRESSION


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
        from astrolom.train.engine import EarlyStopping  # torch only where an MLP probe runs

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
        early = EarlyStopping(self.patience, min_delta=1e-5)
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
            early.update(val, self.net)
            if early.stop:
                break
        early.restore(self.net)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.net(torch.as_tensor(X, dtype=torch.float32))
        if self.kind == REGRESSION:
            return out[:, 0].numpy().astype(np.float64) * self.sd + self.mu
        return self.classes[out.argmax(1).numpy()]


def logistic_solver(n_features: int, n_classes: int) -> str:
    """The scikit-learn solver of a logistic probe: exact Newton while its Hessian is small, else lbfgs."""
    coefs = (n_features + 1) * (1 if n_classes <= 2 else n_classes)
    return "newton-cholesky" if coefs <= NEWTON_MAX_COEFS else "lbfgs"


def logistic_probe(n_features: int, n_classes: int, folds: int, solver: str | None = None):
    """The linear classification probe: L2 logistic regression, its penalty chosen by `folds`-fold CV on log loss
    (a fixed C = 1 when a class has fewer than 2 objects); `solver` defaults to `logistic_solver`'s choice."""
    solver = solver or logistic_solver(n_features, n_classes)
    if folds < 2:
        return LogisticRegression(C=1.0, max_iter=2000, solver=solver)
    return LogisticRegressionCV(
        Cs=LOGISTIC_CS,
        cv=folds,
        solver=solver,
        max_iter=2000,
        l1_ratios=(0.0,),
        scoring="neg_log_loss",
        use_legacy_attributes=False,
    )


def make_estimator(kind: str, method: str, n_fit: int, min_class: int, seed: int, n_features: int, n_classes: int):
    if method == "linear":
        if kind == REGRESSION:
            return RidgeCV(alphas=RIDGE_ALPHAS)
        return logistic_probe(n_features, n_classes, min(5, min_class))
    if method == "knn":
        k = max(1, min(KNN_K, n_fit - 1))
        return KNeighborsRegressor(n_neighbors=k) if kind == REGRESSION else KNeighborsClassifier(n_neighbors=k)
    if method == "mlp":
        return _MLPProbe(kind, seed=seed)
    raise ValueError(f"unknown probe method {method!r}; choose from {METHODS}")
