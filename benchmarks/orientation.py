"""Does orientation cost anything for search? Top-1 retrieval of transformed copies, with and without D4 pooling.

For `--n` test galaxies of the mock survey, a transformed copy is embedded and searched among 2n stamps (the n
originals plus n other test galaxies); the score is how often the copy's nearest stamp (cosine) is its original.
Transforms: fresh noise only (the same galaxy re-observed: identical structure, a new noise draw), a 90° turn, a
left-right mirror, and a 90° turn of a fresh-noise copy (`--split val --noise-seed N` repeats it on other galaxies
and another noise draw). Each is measured for plain embeddings, for embeddings pooled over the 8 symmetries of the
square (`astrolom embed --symmetrize`) and for pooled multi-scale ones (`--scales 4,16,64`, what `astrolom index
--model` uses by default). Then linear-probe R² (ridge, fit on
val, scored on test) of the demo's targets with and without pooling, so that invariance is not bought with physics.

    python benchmarks/orientation.py --model /work/runs/demo/run --data /work/runs/demo/survey --n 300
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

TARGETS = ("redshift", "log_mstar", "log_ssfr", "g_minus_r", "r_minus_z", "mag_r", "r_half_arcsec", "sersic_n")


class _FreshNoise:
    """An rng that replays the survey's structure draws but takes the pixel noise from another seed."""

    def __init__(self, base: np.random.Generator, noise: np.random.Generator):
        self._base, self._noise = base, noise

    def standard_normal(self, *a, **kw):  # render_image draws pixel noise only through standard_normal
        return self._noise.standard_normal(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._base, name)


def render(row: dict, size: int, noise_seed: int | None) -> np.ndarray:
    from astrolom.mock import render_image

    base = np.random.default_rng([int(row["_seed"]), int(row["_index"]), 1])  # render_image's own default
    rng = base if noise_seed is None else _FreshNoise(base, np.random.default_rng([noise_seed, int(row["_index"])]))
    return render_image(row, size, noise=True, rng=rng)


VARIANTS = {  # name: (symmetrize, scales)
    "plain": (False, None),
    "pooled (D4)": (True, None),
    "pooled (D4), multi-scale 4,16,64": (True, (4, 16, 64)),
}


def embed(model, images: list[np.ndarray], variant: str, batch: int = 64) -> np.ndarray:
    from astrolom.data.records import Record
    from astrolom.eval.embed import embed_records

    sym, scales = VARIANTS[variant]
    recs = [Record(str(i), im) for i, im in enumerate(images)]
    return np.concatenate(
        [e for _, e in embed_records(model, recs, batch_size=batch, symmetrize=sym, scales=scales)]
    )  # fmt: skip


def top1(queries: np.ndarray, gallery: np.ndarray, standardised: bool = False) -> float:
    """Fraction of queries whose nearest gallery stamp (cosine) is their original; `standardised`: z-score every
    dimension with the gallery's statistics first, as `astrolom index` does."""
    if standardised:
        mean, std = gallery.mean(0), gallery.std(0) + 1e-12
        queries, gallery = (queries - mean) / std, (gallery - mean) / std
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return float(np.mean(np.argmax(q @ g.T, axis=1) == np.arange(len(q))))


def probe_r2(model, data: str, variant: str, max_per_split: int) -> dict[str, float]:
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    from astrolom.data.sources import open_source
    from astrolom.data.stream import RecordStream

    src = open_source(data, spectra=False)
    feats, labels = {}, {}
    for split in ("val", "test"):
        recs = []
        for r in RecordStream(src, split=split, shuffle=False, epochs=1):
            recs.append(r)
            if len(recs) == max_per_split:
                break
        feats[split] = embed(model, [r.image for r in recs], variant)
        labels[split] = {t: np.array([r.labels[t] for r in recs], float) for t in TARGETS}
    src.close()
    out = {}
    sc = StandardScaler().fit(feats["val"])
    for t in TARGETS:
        ok_v, ok_t = np.isfinite(labels["val"][t]), np.isfinite(labels["test"][t])
        m = RidgeCV(alphas=np.logspace(-3, 5, 17)).fit(sc.transform(feats["val"][ok_v]), labels["val"][t][ok_v])
        out[t] = float(r2_score(labels["test"][t][ok_t], m.predict(sc.transform(feats["test"][ok_t]))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the mock survey the model was trained on")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--probe-per-split", type=int, default=800, help="val/test objects for the probes")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--cache", default=None, help="npz of the retrieval embeddings: reused if present, else written")
    ap.add_argument("--split", default="test", help="split whose galaxies are searched for (default test)")
    ap.add_argument("--noise-seed", type=int, default=12345, help="seed of the fresh noise draw")
    args = ap.parse_args()

    import torch

    from astrolom.data.augment import d4
    from astrolom.mock import catalogue_row, sample_catalogue
    from astrolom.model.pretrained import load_model

    torch.set_num_threads(2)
    meta = json.load(open(f"{args.data}/_survey.json"))["config"]
    size, seed, n_all = int(meta["size"]), int(meta["seed"]), int(meta["n"])
    cat = sample_catalogue(n_all, seed=seed, split_fractions=tuple(meta["split_fractions"]))
    test = np.flatnonzero(cat["split"] == args.split)[: 2 * args.n]
    if len(test) < 2 * args.n:
        raise SystemExit(f"{args.data} has only {len(test)} {args.split} objects; need {2 * args.n}")
    model, _ = load_model(args.model)
    t0 = time.perf_counter()
    rows = [catalogue_row(cat, int(j)) for j in test]
    gallery_imgs = [render(r, size, None) for r in rows]  # identical to the survey's stamps
    fresh = [render(r, size, args.noise_seed) for r in rows[: args.n]]
    queries = {
        "fresh noise": fresh,
        "rotated 90°": [d4(im, 1) for im in gallery_imgs[: args.n]],
        "mirrored": [d4(im, 4) for im in gallery_imgs[: args.n]],
        "rotated + fresh noise": [d4(im, 1) for im in fresh],
    }
    render_s = time.perf_counter() - t0
    results: dict = {
        "n": args.n,
        "gallery": 2 * args.n,
        "split": args.split,
        "noise_seed": args.noise_seed,
        "model": args.model,
        "retrieval": {},
        "embed_s": {},
    }
    cache = dict(np.load(args.cache)) if args.cache and os.path.exists(args.cache) else {}
    for key in VARIANTS:
        t0 = time.perf_counter()
        for name, imgs in [("gallery", gallery_imgs), *queries.items()]:
            if f"{key}/{name}" not in cache:
                cache[f"{key}/{name}"] = embed(model, imgs, key)
        results["embed_s"][key] = round(time.perf_counter() - t0, 1)
        for std in (False, True):
            results["retrieval"][f"{key}, {'standardised' if std else 'raw'} cosine"] = {
                name: top1(cache[f"{key}/{name}"], cache[f"{key}/gallery"], std) for name in queries
            }
    if args.cache:
        np.savez(args.cache, **cache)
    results["probe_r2"] = {key: probe_r2(model, args.data, key, args.probe_per_split) for key in VARIANTS}
    results["render_s"] = round(render_s, 1)
    print(f"model {args.model}; {args.n} {args.split} galaxies; gallery of {2 * args.n} stamps\n")
    print("| embedding, similarity | " + " | ".join(queries) + " |")
    print("|---" * (len(queries) + 1) + "|")
    for key, r in results["retrieval"].items():
        print(f"| {key} | " + " | ".join(f"{v:.3f}" for v in r.values()) + " |")
    print(f"\nembedding time of the 5 x {args.n} stamps + gallery (s): {results['embed_s']}")
    print(f"\nlinear probe R² (ridge; fit on {args.probe_per_split} val, scored on {args.probe_per_split} test)\n")
    print("| embedding | " + " | ".join(TARGETS) + " |")
    print("|---" * (len(TARGETS) + 1) + "|")
    for key, r in results["probe_r2"].items():
        print(f"| {key} | " + " | ".join(f"{r[t]:.3f}" for t in TARGETS) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
