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
from astrolom.align.figures import corner_figure, retrieval_figure, tarp_figure
from astrolom.align.model import AlignModel
from astrolom.align.posteriors import FLOW_TARGETS, posterior_table, record_posteriors
from astrolom.align.train import FEATURES_NAME
from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.eval.baselines import photometry, train_cnn
from astrolom.eval.figures import write_predictions
from astrolom.eval.metrics import PredictionSet, r2
from astrolom.eval.probes import fit_probe

KNN_K = 64
RECALL_KS = (1, 5, 10)


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
    from astrolom.eval.report_html import flow_input

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
