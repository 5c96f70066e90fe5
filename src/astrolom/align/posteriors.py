"""Posteriors from embeddings (AstroCLIP Table 3): conditional neural spline flow ensembles over the joint
(redshift, log_mstar, log_ssfr), their NLL, samples, TARP coverage and per-object summaries (`astrolom.align.evaluate`
runs them; its docstring says how they are fitted and chosen)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from astrolom.align.features import FeatureCache
from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.eval.metrics import PredictionSet
from astrolom.train.engine import EarlyStopping

FLOW_TARGETS = ("redshift", "log_mstar", "log_ssfr")


def fit_flow(
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    epochs: int = 200,
    batch_size: int = 256,
    lr: float = 1e-3,
    patience: int = 20,
    seed: int = 0,
):
    """A conditional neural spline flow p(y | x) (zuko NSF) over the joint targets; the best val epoch is kept.

    Returns (flow in eval mode, transform dict with the standardisation, per-epoch val NLL history). Inputs and
    targets are standardised with fit statistics; `flow_nll` undoes that for NLLs in the labels' units.
    """
    import zuko

    torch.manual_seed(seed)
    xm, xs = x_fit.mean(0), x_fit.std(0) + 1e-6
    ym, ys = y_fit.mean(0), y_fit.std(0) + 1e-9
    tr = {"xm": xm, "xs": xs, "ym": ym, "ys": ys}
    X, Y = _t((x_fit - xm) / xs), _t((y_fit - ym) / ys)
    Xv, Yv = _t((x_val - xm) / xs), _t((y_val - ym) / ys)
    flow = zuko.flows.NSF(Y.shape[1], X.shape[1], transforms=3, hidden_features=(64, 64))
    opt = torch.optim.AdamW(flow.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    early, history = EarlyStopping(patience), []
    for _ in range(epochs):
        flow.train()
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), batch_size):
            idx = perm[i : i + batch_size]
            loss = -flow(X[idx]).log_prob(Y[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        flow.eval()
        with torch.no_grad():
            val = float(-flow(Xv).log_prob(Yv).mean())  # the mean over every val object, not per batch
        history.append(val)
        early.update(val, flow)
        if early.stop:
            break
    early.restore(flow)
    return flow.eval(), tr, history


# candidate widths of a flow's conditioning (leading PCA components of the features, fit on the fit split; None: all
# of them), picked per feature set by validation NLL
FLOW_COMPONENTS = (16, 32, None)


@dataclass
class FlowEnsemble:
    """An equal-weight mixture of conditional flows (a deep ensemble) on a shared projection of the features.

    `members` = [(flow, transform)]; `projection` the fitted PCA the flows condition on (None: the features as they
    are), `components` its width and `selection` the validation NLL of each candidate width.
    """

    members: list
    histories: list[list[float]]
    projection: object = None
    components: int | None = None
    selection: dict | None = None

    def project(self, x: np.ndarray) -> np.ndarray:
        return x if self.projection is None else self.projection.transform(x)


def fit_flow_ensemble(
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    members: int = 4,
    components: tuple[int | None, ...] = FLOW_COMPONENTS,
    seed: int = 0,
    **kwargs,
) -> FlowEnsemble:
    """A flow per candidate conditioning width (`components`; widths >= the feature count collapse to all features)
    from seed `seed`; the width with the lowest validation NLL is kept and `members - 1` more flows (seeds seed+1..)
    are fit on it. Every flow stops at its best validation epoch."""
    from sklearn.decomposition import PCA

    if members < 1:
        raise ValueError(f"a flow ensemble needs at least one member, got {members}")
    d = x_fit.shape[1]
    widths = list(dict.fromkeys(None if k is None or k >= d else int(k) for k in components)) or [None]
    candidates = []
    for k in widths:
        proj = None if k is None else PCA(k, random_state=seed).fit(x_fit)
        ens = FlowEnsemble([], [], proj, k)
        f, tr, hist = fit_flow(ens.project(x_fit), y_fit, ens.project(x_val), y_val, seed=seed, **kwargs)
        ens.members.append((f, tr))
        ens.histories.append(hist)
        candidates.append((min(hist), ens))
    best = min(candidates, key=lambda c: c[0])[1]
    best.selection = {("all" if e.components is None else str(e.components)): v for v, e in candidates}
    xf, xv = best.project(x_fit), best.project(x_val)
    for i in range(1, members):
        f, tr, hist = fit_flow(xf, y_fit, xv, y_val, seed=seed + i, **kwargs)
        best.members.append((f, tr))
        best.histories.append(hist)
    return best


@torch.no_grad()
def ensemble_nll(ens: FlowEnsemble, x: np.ndarray, y: np.ndarray) -> float:
    """Mean test NLL (nats, labels' units) of the mixture: -mean log (1/M) sum_m p_m(y | x)."""
    x = ens.project(x)
    lps = torch.stack([_log_density(flow, tr, x, y) for flow, tr in ens.members])
    mix = torch.logsumexp(lps, 0) - np.log(len(lps))
    return float(-mix.mean())


def ensemble_samples(ens: FlowEnsemble, x: np.ndarray, n: int = 500, seed: int = 0) -> np.ndarray:
    """(n, N, D) samples of the mixture: n split as evenly as possible over the members."""
    x = ens.project(x)
    m = len(ens.members)
    counts = [n // m + (i < n % m) for i in range(m)]
    members = zip(ens.members, counts, strict=True)
    parts = [flow_samples(f, tr, x, n=c, seed=seed + i) for i, ((f, tr), c) in enumerate(members) if c]
    return np.concatenate(parts, 0)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


@torch.no_grad()
def _log_density(flow, tr: dict, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """(N,) log p(y | x) in the labels' own units (the Jacobian of the standardisation included)."""
    lp = flow(_t((x - tr["xm"]) / tr["xs"])).log_prob(_t((y - tr["ym"]) / tr["ys"]))
    return lp - float(np.log(tr["ys"]).sum())


@torch.no_grad()
def flow_nll(flow, tr: dict, x: np.ndarray, y: np.ndarray) -> float:
    """Mean test negative log-likelihood in the labels' own units (nats)."""
    return float(-_log_density(flow, tr, x, y).mean())


@torch.no_grad()
def flow_samples(flow, tr: dict, x: np.ndarray, n: int = 500, seed: int = 0) -> np.ndarray:
    """(n, N, D) posterior samples in label units."""
    torch.manual_seed(seed)
    s = flow(_t((x - tr["xm"]) / tr["xs"])).sample((n,)).numpy()
    return s * tr["ys"] + tr["ym"]


def tarp_coverage(samples: np.ndarray, truth: np.ndarray, seed: int = 0, draws: int = 5) -> dict:
    """TARP expected coverage (ECP) against credibility α, with the band a calibrated posterior stays in.

    For n test objects a calibrated ECP(α) is a binomial fraction: its standard deviation is sqrt(α(1-α)/n), so the
    band is α ± 2 sqrt(α(1-α)/n); `fraction_in_band` is the share of the α grid inside it. TARP's random reference
    points are themselves a random choice (one draw moved the fraction in band of the same samples from 0.43 to
    0.71), so the ECP is averaged over `draws` reference draws (seeds seed..seed+draws-1); the mean of calibrated
    curves is calibrated and varies less, so the binomial band stays a conservative test.
    """
    from tarp import get_tarp_coverage

    curves = []
    for i in range(draws):
        ecp, alpha = get_tarp_coverage(
            samples, truth, references="random", metric="euclidean", norm=True, seed=seed + i
        )  # fmt: skip
        curves.append(ecp)
    ecp = np.mean(curves, 0)
    band = 2 * np.sqrt(alpha * (1 - alpha) / truth.shape[0])
    inside = np.abs(ecp - alpha) <= band + 1e-12
    return {
        "alpha": alpha.tolist(),
        "ecp": ecp.tolist(),
        "band": band.tolist(),
        "max_abs_deviation": float(np.max(np.abs(ecp - alpha))),
        "fraction_in_band": float(inside.mean()),
    }


def posterior_table(
    cache: FeatureCache,
    emb: dict[str, np.ndarray],
    supervised: dict[str, np.ndarray],
    *,
    seed: int = 0,
    epochs: int = 200,
    members: int = 4,
    log=print,
) -> dict:
    """{feature set: {"nll", "tarp", "samples"(corner subset)}} for the joint flow ensemble over FLOW_TARGETS."""
    fit, val, test = cache.rows("train"), cache.rows("val"), cache.rows("test")
    y = np.stack([cache.label(t) for t in FLOW_TARGETS], 1)
    ok = np.isfinite(y).all(1)
    fit, val, test = fit[ok[fit]], val[ok[val]], test[ok[test]]
    sets = {
        "image aligned": emb[IMAGES],
        "image unaligned": cache.unaligned(IMAGES),
        "spectrum aligned": emb[SPECTRA],
        "photometry": supervised["photometry"],
        "image CNN features": supervised["image CNN"],
    }
    out = {}
    for name, x in sets.items():
        ens = fit_flow_ensemble(x[fit], y[fit], x[val], y[val], members=members, epochs=epochs, seed=seed)
        samples = ensemble_samples(ens, x[test], seed=seed)
        out[name] = {
            "nll": ensemble_nll(ens, x[test], y[test]),
            "members": members,
            "components": ens.components,  # PCA width the flows condition on (None: every feature)
            "features": int(x.shape[1]),
            "selection": ens.selection,  # validation NLL of each candidate width (seed-0 flow)
            "epochs": [len(h) for h in ens.histories],  # per member, early-stopped on val
            "best_val": [min(h) for h in ens.histories],
            "tarp": tarp_coverage(samples, y[test], seed=seed),
            "samples": samples[:, :4],
            "truth": y[test][:4],
            **posterior_summary(samples, cache.object_ids, test, y[test]),
        }
        log(f"  posteriors: {name} NLL {out[name]['nll']:.3f}")
    return out


def posterior_summary(samples: np.ndarray, object_ids, rows: np.ndarray, truth: np.ndarray) -> dict:
    """Per-object point estimates of (n, N, D) posterior samples of the objects `rows`: {"test_ids", "test_truth",
    "test_median", "test_sigma"}, sigma being half the central 68% interval (a Gaussian's standard deviation, robust
    to long tails)."""
    lo, median, hi = np.percentile(samples, (15.865, 50.0, 84.135), axis=0)
    ids = np.asarray(object_ids)[rows]
    return {"test_ids": ids, "test_truth": truth, "test_median": median, "test_sigma": (hi - lo) / 2}


def record_posteriors(record: PredictionSet, post: dict) -> None:
    """Add the flows' posterior medians and widths (`posterior_summary`) of every feature set to `record`."""
    for name, v in post.items():
        for j, t in enumerate(FLOW_TARGETS):
            record.add(name, "flow", t, v["test_ids"], v["test_truth"][:, j], v["test_median"][:, j],
                       posterior_sigma=v["test_sigma"][:, j])  # fmt: skip
