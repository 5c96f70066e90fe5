"""`astrolom eval-align`: what an aligned model is good for, on the test split (AstroCLIP sec. 5).

- **Retrieval**: image->spectrum and spectrum->image recall@1/5/10 and median rank of the true partner among all
  test pairs (chance: k/N and (N+1)/2), plus in-modal and cross-modal similarity search scored by how well the top
  match's redshift follows the query's (R², like AstroCLIP Fig. 3). A figure like AstroCLIP Fig. 2.
- **Properties** (AstroCLIP Table 2): zero-shot kNN (k=64, distance-weighted, standardised features) and few-shot
  MLP from the aligned and the unaligned (encoders' own mean-token) embeddings of each modality, against supervised
  baselines: the image CNN (`eval.baselines.train_cnn`), a spectrum CNN (`align.baselines`) and a photometry MLP.
  Fit on train, scored (R²) on test.
- **Posteriors** (AstroCLIP Table 3): per feature set, an equal-weight ensemble of conditional neural spline flows
  (`zuko`; `--flow-members`, default 4, seeds 0..M-1) over the *joint* (redshift, log_mstar, log_ssfr), each member
  kept at its best epoch by validation loss, conditioned on the leading 16 or 32 PCA components of the features or on
  all of them, whichever gives the seed-0 flow the lowest validation NLL; test NLL of the mixture in the labels'
  units (nats), TARP expected coverage (`tarp`; the ECP averaged over 5 draws of the random references) against the
  band a calibrated posterior stays in, with a calibration figure, corner plots for a few test galaxies. Why: one
  flow on all 512 dimensions of the aligned embeddings is over-confident (TARP in band on 0.59 of the α grid for
  spectra, 0.56 for images); ensembles on a validation-chosen width are calibrated and sharper (README "Alignment").

`--quick` (what the demo runs) keeps retrieval, similarity search and the zero-shot kNN rows of the property table:
no MLPs, supervised baselines or flows; the JSON says `"quick": true` and its posteriors are empty.

Outputs in OUT: `align_eval.json`, `align_eval.md`, `retrieval.png`, `tarp.png`, `corner.png`,
`aligned_embeddings.parquet` (shared-space embeddings of every pair, per modality; `embedding` = image) and
`predictions/` (`astrolom.eval.metrics`): every test prediction per object (feature set, method, target, truth,
prediction; for the flows the posterior median and half its central 68% interval as `posterior_sigma`), their
metrics (R2, MAE; sigma_NMAD, bias and eta for redshift, also in the JSON's `photo_z`) and predicted-vs-true figures
of the aligned image embeddings' kNN and flow predictions.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from astrolom import layout
from astrolom.align.baselines import train_spectrum_cnn
from astrolom.align.embed import aligned_recipe
from astrolom.align.encoder import has_tuned_backbones, load_aligned, load_encoder
from astrolom.align.features import TARGETS, FeatureCache
from astrolom.align.model import AlignModel
from astrolom.align.train import FEATURES_NAME
from astrolom.data.display import display_rgb
from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.eval.baselines import photometry, train_cnn
from astrolom.eval.figures import write_predictions
from astrolom.eval.metrics import PredictionSet, r2
from astrolom.eval.probes import fit_probe
from astrolom.train.engine import EarlyStopping

KNN_K = 64
RECALL_KS = (1, 5, 10)
FLOW_TARGETS = ("redshift", "log_mstar", "log_ssfr")


# ------------------------------------------------------------------------------------------------------- embeddings


@torch.no_grad()
def aligned_embeddings(model: AlignModel, cache: FeatureCache, batch_size: int = 512) -> dict[str, np.ndarray]:
    """{"images": (N, D), "spectra": (N, D)} L2-normalised shared-space embeddings of every pair (image view 0)."""
    img, spec = [], []
    for i in range(0, len(cache.object_ids), batch_size):
        sl = slice(i, i + batch_size)
        img.append(model.encode(IMAGES, cache.image_tokens[sl, 0]))
        spec.append(model.encode(SPECTRA, cache.spectrum_tokens[sl], cache.spectrum_mask[sl]))
    return {IMAGES: torch.cat(img).numpy(), SPECTRA: torch.cat(spec).numpy()}


def tuned_embeddings(encoder, cache: FeatureCache, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Like `aligned_embeddings`, for a run that fine-tuned its encoders: the cached features come from the frozen
    starting encoders, so the cached stamps (view 0) and spectra are embedded again by the run's own encoders."""
    from astrolom.data.records import Record

    img, spec = [], []
    for i in range(0, len(cache.object_ids), batch_size):
        ids = cache.object_ids[i : i + batch_size]
        records = [Record(str(o), cache.images[i + j].numpy()) for j, o in enumerate(ids)]
        img.append(encoder.embed_images(records))
        spec.append(encoder.embed_spectra(list(cache.spectra[i : i + len(ids)].numpy()), [str(o) for o in ids]))
    return {IMAGES: np.concatenate(img), SPECTRA: np.concatenate(spec)}


def write_embeddings(
    cache: FeatureCache, emb: dict[str, np.ndarray], path: str | Path, metadata: dict | None = None
) -> Path:
    """Parquet of the shared-space embeddings: object_id, split, labels, `embedding` (= image), per-modality columns.

    `embedding` holds the aligned image embedding so the tools that read that column (probe, search) use it as is;
    `metadata` (with `embed.aligned_recipe` of the run) lets `astrolom index` / `search` embed new queries with it.
    """
    from astrolom.data.records import Record
    from astrolom.eval.embeddings import EmbeddingWriter

    labels = {n: cache.label(n) for n in cache.label_names}
    records = [
        Record(oid, np.empty(0, np.float32), split, {n: float(v[i]) for n, v in labels.items()})
        for i, (oid, split) in enumerate(zip(cache.object_ids, cache.splits, strict=True))
    ]
    with EmbeddingWriter(path, metadata or {}, alias="embedding_images") as writer:
        writer.write(records, {"embedding_images": (emb[IMAGES], None), "embedding_spectra": (emb[SPECTRA], None)})
    return Path(path)


# ------------------------------------------------------------------------------------------------------- retrieval


def true_partner_ranks(queries: np.ndarray, keys: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """0-based rank of key i among all keys for query i (cosine similarity, ties counted in the query's favour).

    Exact and O(N² D) in chunks of queries (memory O(chunk N)); row i of queries is paired with row i of keys.
    """
    q, k = torch.from_numpy(np.ascontiguousarray(queries)), torch.from_numpy(np.ascontiguousarray(keys))
    ranks = []
    for i in range(0, len(q), chunk):
        sims = q[i : i + chunk] @ k.T  # (c, N)
        own = sims[torch.arange(sims.shape[0]), torch.arange(i, i + sims.shape[0])]
        ranks.append((sims > own[:, None]).sum(1))
    return torch.cat(ranks).numpy()


def retrieval_metrics(queries: np.ndarray, keys: np.ndarray) -> dict[str, float]:
    """recall@1/5/10, median rank (1-based) and their chance levels for paired rows."""
    r = true_partner_ranks(queries, keys)
    n = len(r)
    out = {f"recall@{k}": float((r < k).mean()) for k in RECALL_KS}
    out.update({f"chance@{k}": min(1.0, k / n) for k in RECALL_KS})
    out.update({"median_rank": float(np.median(r) + 1), "chance_median_rank": (n + 1) / 2, "n": n})
    return out


def neighbour_agreement(queries: np.ndarray, keys: np.ndarray, values: np.ndarray, exclude_self: bool) -> float:
    """R² of the top match's `values` against the query's (AstroCLIP Fig. 3: similarity search follows redshift)."""
    sims = queries @ keys.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    top = sims.argmax(1)
    return float(r2(values, values[top]))


# ------------------------------------------------------------------------------------------------------- properties


def knn_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, k: int = KNN_K) -> np.ndarray:
    """Zero-shot: distance-weighted kNN regression on standardised features."""
    knn = make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=min(k, len(x_fit)), weights="distance"))
    return knn.fit(x_fit, y_fit).predict(x_test)


def property_table(
    cache: FeatureCache,
    emb: dict[str, np.ndarray],
    *,
    seed: int = 0,
    cnn_epochs: int = 40,
    quick: bool = False,
    log=print,
    record: PredictionSet | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """({row: {target: test R²}}, supervised predictions per baseline for the flows) — module docstring.

    `quick`: the zero-shot kNN rows only (no MLPs, no supervised baselines; the second dict is empty). `record`
    receives every test prediction per object (feature set = the embedding or baseline, method = the row's).
    """
    ids = np.asarray(cache.object_ids)
    fit, test = cache.rows("train"), cache.rows("test")
    targets = [t for t in TARGETS if t in cache.label_names]
    ys = {t: cache.label(t) for t in targets}
    feats = {
        "image aligned": emb[IMAGES],
        "image unaligned": cache.unaligned(IMAGES),
        "spectrum aligned": emb[SPECTRA],
        "spectrum unaligned": cache.unaligned(SPECTRA),
    }
    table: dict[str, dict[str, float]] = {}
    for name, x in feats.items():
        for method in ("zero-shot kNN",) if quick else ("zero-shot kNN", "few-shot MLP"):
            row = table.setdefault(f"{name} · {method}", {})
            for t in targets:
                ok_f, ok_t = fit[np.isfinite(ys[t][fit])], test[np.isfinite(ys[t][test])]
                if method.startswith("zero"):
                    pred = knn_predict(x[ok_f], ys[t][ok_f], x[ok_t])
                else:
                    pred = fit_probe(x[ok_f], ys[t][ok_f], x[ok_t], "regression", "mlp", seed=seed)
                row[t] = float(r2(ys[t][ok_t], pred))
                if record is not None:
                    record.add(name, method, t, ids[ok_t], ys[t][ok_t], pred)
        log(f"  properties: {name} done")
    if quick:
        return table, {}
    images = cache.images.numpy()
    y_all = np.stack([ys[t] for t in targets], 1)
    supervised: dict[str, np.ndarray] = {}
    cnn_targets = {
        t: ("regression", fit[np.isfinite(ys[t][fit])], ys[t][fit][np.isfinite(ys[t][fit])]) for t in targets
    }
    # train_cnn indexes its fit images by row number within fit_images
    cnn_targets = {t: (k, np.searchsorted(fit, r), v) for t, (k, r, v) in cnn_targets.items()}
    preds = train_cnn(images[fit], images, cnn_targets, epochs=cnn_epochs, seed=seed)
    supervised["image CNN"] = np.stack([preds[t] for t in targets], 1)
    log("  properties: image CNN done")
    spectra = cache.spectra.numpy()
    supervised["spectrum CNN"] = train_spectrum_cnn(spectra[fit], y_all[fit], spectra, seed=seed)
    log("  properties: spectrum CNN done")
    ph_fit, ph_all = photometry(images[fit], images)
    phot = np.zeros((len(images), len(targets)))
    for j, t in enumerate(targets):
        ok = fit[np.isfinite(ys[t][fit])]
        phot[:, j] = fit_probe(ph_all[ok], ys[t][ok], ph_all, "regression", "mlp", seed=seed)
    supervised["photometry MLP"] = phot
    for name, pred in supervised.items():
        table[f"{name} (supervised)"] = {
            t: float(r2(ys[t][test][np.isfinite(ys[t][test])], pred[test, j][np.isfinite(ys[t][test])]))
            for j, t in enumerate(targets)
        }
        for j, t in enumerate(targets):
            ok_t = test[np.isfinite(ys[t][test])]
            if record is not None:
                record.add(name, "supervised", t, ids[ok_t], ys[t][ok_t], pred[ok_t, j])
    supervised["photometry"] = ph_all
    return table, supervised


# ------------------------------------------------------------------------------------------------------- posteriors


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


# ------------------------------------------------------------------------------------------------------- figures


def retrieval_figure(cache: FeatureCache, emb: dict[str, np.ndarray], path: Path, n_query: int = 4, top: int = 3):
    """Query galaxies (image) with their top spectrum matches (AstroCLIP Fig. 2): images and spectra of the matches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = cache.rows("test")
    rng = np.random.default_rng(0)
    queries = rng.choice(len(test), size=min(n_query, len(test)), replace=False)
    sims = emb[IMAGES][test] @ emb[SPECTRA][test].T
    z = cache.label("redshift")[test] if "redshift" in cache.label_names else np.full(len(test), np.nan)
    fig, axes = plt.subplots(
        len(queries),
        top + 2,
        figsize=(2.2 * (top + 2) + 2.5, 2.2 * len(queries)),
        gridspec_kw={"width_ratios": [1] * (top + 1) + [2.5]},
    )
    axes = np.atleast_2d(axes)
    bands = cache.meta.get("bands")  # None (caches written before bands were recorded): shown min-max scaled
    spectra = cache.spectra.numpy()[test]
    # observed-frame wavelength in Å (caches written before the grid was recorded fall back to pixel index)
    wave = np.asarray(cache.meta.get("wavelength") or np.arange(spectra.shape[1]), dtype=np.float64)
    x_label = "observed wavelength [Å]" if cache.meta.get("wavelength") else "spectrum pixel"
    for r, q in enumerate(queries):
        order = np.argsort(-sims[q])[:top]
        axes[r, 0].imshow(display_rgb(cache.images[test[q]].numpy(), bands))
        axes[r, 0].set_title(f"query z={z[q]:.3f}", fontsize=8)
        for c, m in enumerate(order, start=1):
            axes[r, c].imshow(display_rgb(cache.images[test[m]].numpy(), bands))
            hit = " ✓" if m == q else ""
            axes[r, c].set_title(f"#{c} z={z[m]:.3f}{hit}", fontsize=8)
        ax = axes[r, -1]
        ax.plot(wave, spectra[q] / np.nanmedian(np.abs(spectra[q])), color="k", lw=0.6, label="query spectrum")
        for c, m in enumerate(order, start=1):
            ax.plot(wave, spectra[m] / np.nanmedian(np.abs(spectra[m])) + 1.5 * c, lw=0.5, label=f"match #{c}")
        ax.set_yticks([])
        ax.set_xlabel(x_label, fontsize=7)
        ax.tick_params(labelsize=6)
        if r == 0:
            ax.legend(fontsize=6, loc="upper right")
        for a in axes[r, :-1]:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(
        "image → spectrum retrieval on the test split: query, top matches (images of the objects whose "
        "spectra matched) and their spectra",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tarp_figure(post: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="ideal")
    for name, r in post.items():
        a, e = np.asarray(r["tarp"]["alpha"]), np.asarray(r["tarp"]["ecp"])
        ax.plot(a, e, lw=1, label=name)
    a, band = np.asarray(r["tarp"]["alpha"]), np.asarray(r["tarp"]["band"])
    ax.fill_between(a, a - band, a + band, color="grey", alpha=0.2, label="calibrated ±2σ")
    ax.set_xlabel("credibility level α")
    ax.set_ylabel("expected coverage")
    ax.set_title("TARP coverage, joint (z, log M*, log sSFR) flows", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def corner_figure(post: dict, feature_set: str, path: Path) -> Path:
    """Corner-style plots (pairwise sample scatter + marginals, truth marked) for a few test galaxies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, truth = post[feature_set]["samples"], post[feature_set]["truth"]
    n_gal, d = s.shape[1], s.shape[2]
    fig, axes = plt.subplots(d, d * n_gal, figsize=(1.6 * d * n_gal, 1.6 * d))
    for g in range(n_gal):
        for i in range(d):
            for j in range(d):
                ax = axes[i, g * d + j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j > i:
                    ax.axis("off")
                elif i == j:
                    ax.hist(s[:, g, i], bins=30, color="C0", histtype="step")
                    ax.axvline(truth[g, i], color="C3", lw=0.8)
                else:
                    ax.scatter(s[:, g, j], s[:, g, i], s=0.5, alpha=0.3, color="C0")
                    ax.plot(truth[g, j], truth[g, i], "x", color="C3")
                if i == d - 1:
                    ax.set_xlabel(FLOW_TARGETS[j], fontsize=6)
                if j == 0 and g == 0:
                    ax.set_ylabel(FLOW_TARGETS[i], fontsize=6)
    fig.suptitle(f"posteriors from {feature_set} embeddings for {n_gal} test galaxies (red: truth)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------- driver


def evaluate_alignment(
    model_path: str,
    data: str | None,
    out: str | Path,
    *,
    seed: int = 0,
    cnn_epochs: int = 40,
    flow_epochs: int = 200,
    flow_members: int = 4,
    quick: bool = False,
    log=print,
) -> dict:
    """Run every evaluation (module docstring) and write the JSON, markdown and figures; returns the result dict."""
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, cfg = load_aligned(model_path)
    run_dir = Path(model_path)
    cache_path = run_dir / FEATURES_NAME
    trained_on = cfg.get("features", {}).get("data")
    if not cache_path.is_file() or (data and str(Path(data)) != str(Path(trained_on or ""))):
        from astrolom.align.features import extract_features

        if not data:
            raise ValueError(f"no {cache_path}: pass --data to extract features")
        enc = cfg["features"]
        cache_path = out / FEATURES_NAME
        extract_features(
            enc["image_model"], enc["spectrum_model"], data, views=1, n_tokens=int(enc["tokens"]), seed=seed
        ).save(cache_path)
    cache = FeatureCache.load(cache_path)
    # a run that fine-tuned its encoders is scored with them, not with the frozen features of the cache
    if has_tuned_backbones(model_path):
        emb = tuned_embeddings(load_encoder(model_path), cache)
    else:
        emb = aligned_embeddings(model, cache)
    meta = {"recipe": aligned_recipe(model_path, cfg).to_json(), "data": str(data or trained_on or "")}
    write_embeddings(cache, emb, out / "aligned_embeddings.parquet", meta)
    test = cache.rows("test")
    if len(test) < 2:
        raise ValueError(f"{cache_path}: fewer than 2 test pairs to evaluate")
    log(f"eval-align: {len(test)} test pairs")
    ei, es = emb[IMAGES][test], emb[SPECTRA][test]
    retrieval = {"image→spectrum": retrieval_metrics(ei, es), "spectrum→image": retrieval_metrics(es, ei)}
    similarity = {}
    if "redshift" in cache.label_names:
        z = cache.label("redshift")[test]
        similarity = {
            "image→image": neighbour_agreement(ei, ei, z, True),
            "spectrum→spectrum": neighbour_agreement(es, es, z, True),
            "image→spectrum": neighbour_agreement(ei, es, z, False),
            "spectrum→image": neighbour_agreement(es, ei, z, False),
        }
    record = PredictionSet(info={"command": "astrolom eval-align", "model": str(model_path), "quick": quick})
    properties, supervised = property_table(
        cache, emb, seed=seed, cnn_epochs=cnn_epochs, quick=quick, log=log, record=record
    )
    post = {}
    if not quick:
        post = posterior_table(cache, emb, supervised, seed=seed, epochs=flow_epochs, members=flow_members, log=log)
        record_posteriors(record, post)
    plots = [("image aligned", "zero-shot kNN"), ("image aligned", "flow")]
    predictions = write_predictions(record, out / layout.PREDICTIONS_DIR, plots)
    retrieval_png, tarp_png, corner_png = (out / name for name in layout.ALIGN_EVAL_FIGURES)
    for stale in (tarp_png, corner_png):  # a quick re-run must not leave an older run's posterior figures behind
        stale.unlink(missing_ok=True)
    figs = {"retrieval": retrieval_figure(cache, emb, retrieval_png)}
    if post:
        figs["tarp"] = tarp_figure(post, tarp_png)
        figs["corner"] = corner_figure(post, "image aligned", corner_png)
    result = {
        "model": str(Path(model_path).resolve()),  # absolute: the report finds the run's loss curves from anywhere
        "quick": quick,
        "pairs": {s: int(len(cache.rows(s))) for s in ("train", "val", "test")},
        "retrieval": retrieval,
        "similarity_redshift_r2": similarity,
        "properties_r2": properties,
        "posteriors": {
            k: {
                kk: v[kk]
                for kk in ("nll", "members", "components", "features", "selection", "epochs", "best_val", "tarp")
            }
            for k, v in post.items()
        },
        "photo_z": [
            {k: r[k] for k in ("feature_set", "method", "n", "sigma_nmad", "bias", "eta")}
            for r in record.metrics()
            if "sigma_nmad" in r
        ],
        "predictions": str(predictions["parquet"]),
        "figures": {k: str(v) for k, v in figs.items()},
        "seconds": round(time.time() - t0, 1),
    }
    (out / layout.ALIGN_EVAL_JSON).write_text(json.dumps(result, indent=1) + "\n")
    (out / "align_eval.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    """The three tables (retrieval, AstroCLIP Table 2-like properties, Table 3-like posteriors) as markdown."""
    lines = [
        f"# Alignment evaluation ({result['pairs']['test']} test pairs)",
        "",
        "## Retrieval",
        "",
        "| direction | R@1 | R@5 | R@10 | median rank | chance R@10 | chance median rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for d, r in result["retrieval"].items():
        lines.append(
            f"| {d} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['recall@10']:.3f} | "
            f"{r['median_rank']:.0f} | {r['chance@10']:.3f} | {r['chance_median_rank']:.0f} |"
        )
    if result["similarity_redshift_r2"]:
        lines += [
            "",
            "Similarity search, R² of the top match's redshift against the query's:",
            "",
            "| search | redshift R² |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.3f} |" for k, v in result["similarity_redshift_r2"].items()]
    props = result["properties_r2"]
    targets = list(next(iter(props.values())))
    lines += [
        "",
        "## Property estimation (test R²)",
        "",
        "| source · method | " + " | ".join(targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    lines += [f"| {row} | " + " | ".join(f"{v[t]:.3f}" for t in targets) + " |" for row, v in props.items()]
    if result.get("photo_z"):
        lines += [
            "",
            "## Photometric redshift (test; `astrolom.eval.metrics`: σ_NMAD, bias = median Δz/(1+z), η)",
            "",
            "| feature set | method | N | σ_NMAD | bias | η |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['feature_set']} | {r['method']} | {r['n']} | {r['sigma_nmad']:.4f} | {r['bias']:+.4f} | "
            f"{r['eta']:.3f} |"
            for r in result["photo_z"]
        ]
    if not result["posteriors"]:
        return "\n".join([*lines, "", "![retrieval](retrieval.png)", ""])
    lines += [
        "",
        f"## Posteriors: joint flow ensemble over ({', '.join(FLOW_TARGETS)})",
        "",
        "| feature set | flow input | test NLL (nats) | TARP max abs deviation | TARP fraction in 2σ band |",
        "|---|---|---|---|---|",
    ]
    from astrolom.eval.report import flow_input

    for k, v in result["posteriors"].items():
        t = v["tarp"]
        lines.append(
            f"| {k} | {flow_input(v)} | {v['nll']:.3f} | {t['max_abs_deviation']:.3f} | {t['fraction_in_band']:.2f} |"
        )
    lines += ["", "![retrieval](retrieval.png) ![tarp](tarp.png) ![corner](corner.png)", ""]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="alignment RUN (from `astrolom align`)")
    parser.add_argument("--data", default=None, help="data set (default: the one the run's features came from)")
    parser.add_argument("--out", required=True, help="output directory for JSON, markdown and figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="retrieval, similarity search and zero-shot kNN only: no MLPs, supervised baselines or flows (the demo)",
    )
    parser.add_argument(
        "--flow-members", type=int, default=4, help="conditional flows per feature set, mixed equally (default 4)"
    )


def run(args: argparse.Namespace) -> int:
    res = evaluate_alignment(
        args.model, args.data, args.out, seed=args.seed, flow_members=args.flow_members, quick=args.quick
    )
    print(markdown(res))
    return 0
