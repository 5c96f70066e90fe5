"""Joint vs spectrum embeddings of a multimodal AstroPT: paired bootstrap of the test R² difference.

For every object with a spectrum: the spectrum embedding (spectra-only pass), the image-conditioned spectrum tokens
(images -> spectra pass; the joint column before 2026-12-02), the mean of those two (astrolom's `embedding_joint`),
the spectra -> images concatenation (spectrum tokens, then image tokens that read the spectrum) and the two
single-modality passes concatenated (late fusion), all from the final block, spectrum tokens read out as astrolom
does (`spectrum_pool`, `--segments`). Linear probes (astrolom's RidgeCV) fit on train (or val), scored on test; the
interval is the 2.5-97.5 percentile of R²(joint) - R²(spectrum) over bootstrap resamples of the test objects.
README "Spectra" quotes its output.

    PYTHONPATH=src python benchmarks/joint_vs_spectrum.py --model mm --data demo/survey [--boot 1000]
"""

from __future__ import annotations

import argparse
from itertools import islice

import numpy as np
import torch
from sklearn.metrics import r2_score

from astrolom.eval.multimodal import (
    DEFAULT_SPECTRUM_SEGMENTS,
    _load,
    model_records,
    record_inputs,
    spectrum_pool,
    spectrum_tokeniser_from_config,
)
from astrolom.eval.probe_estimators import REGRESSION
from astrolom.eval.probes import fit_probe

TARGETS = ("redshift", "log_mstar", "log_ssfr")


@torch.no_grad()
def features(model_path: str, data: str, segments: int = DEFAULT_SPECTRUM_SEGMENTS) -> tuple[dict, dict]:
    model, cfg, _ = _load(model_path)
    model.eval()
    spec = spectrum_tokeniser_from_config(cfg)
    last = len(model.blocks) - 1

    def pool(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # astrolom's spectrum readout
        return spectrum_pool(h, m, segments)

    def final(inputs, order):
        hs, layout = model._trunk(inputs, order, last)
        return {k: model.ln_f(v) for k, v in model._split(hs[-1], layout).items()}

    feats: dict[str, list] = {}
    labels: dict[str, list] = {t: [] for t in (*TARGETS, "split")}
    records = (r for r in model_records(data, cfg, ["train", "val", "test"]) if r.spectrum is not None)
    while batch := list(islice(records, 128)):
        _, inp = record_inputs(batch, model, cfg, spec)
        s = {k: v for k, v in inp.items() if k.startswith("spectra")}
        mask = s["spectra_mask"].bool() & s["spectra_present"].bool()[:, None]
        both = {"images": inp["images"], **s}
        si = final(both, ["spectra", "images"])
        spec_only = pool(final(s, None)["spectra"], mask)
        conditioned = pool(final(both, ["images", "spectra"])["spectra"], mask)
        cols = {
            "spectrum (spectra-only pass)": spec_only,
            "image-conditioned spectrum tokens (images -> spectra)": conditioned,
            "joint: mean of the spectrum tokens of both orders (astrolom)": 0.5 * (spec_only + conditioned),
            "joint, spectra -> images concatenated": torch.cat([pool(si["spectra"], mask), si["images"].mean(1)], 1),
            "spectrum and image passes concatenated": torch.cat(
                [spec_only, final({"images": inp["images"]}, None)["images"].mean(1)], 1
            ),
        }
        for k, v in cols.items():
            feats.setdefault(k, []).append(v.float().numpy())
        for r in batch:
            for t in TARGETS:
                labels[t].append(r.labels[t])
            labels["split"].append(r.split)
    return {k: np.concatenate(v) for k, v in feats.items()}, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="images + spectra AstroPT RUN")
    ap.add_argument("--data", required=True)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--fit", default="train", choices=["train", "val"], help="split the probes are fit on")
    ap.add_argument(
        "--segments",
        type=int,
        default=DEFAULT_SPECTRUM_SEGMENTS,
        help=f"spectrum readout: wavelength segments (default {DEFAULT_SPECTRUM_SEGMENTS}; 1 = one mean over tokens)",
    )
    args = ap.parse_args()
    feats, labels = features(args.model, args.data, args.segments)
    split = np.array(labels["split"])
    fit, test = split == args.fit, split == "test"
    idx = np.random.default_rng(0).integers(0, test.sum(), size=(args.boot, test.sum()))
    print(f"fit on {fit.sum()} {args.fit} objects, {test.sum()} test objects, {args.boot} bootstrap resamples\n")
    print("| target | embedding | test R² | minus spectrum | 95% interval |\n|---|---|---|---|---|")
    base_name = next(iter(feats))
    for t in TARGETS:
        y_all = np.asarray(labels[t], dtype=np.float64)
        y = y_all[test]
        pred = {k: fit_probe(X[fit], y_all[fit], X[test], REGRESSION, "linear") for k, X in feats.items()}
        base = pred[base_name]
        for k, p in pred.items():
            d = np.array([r2_score(y[i], p[i]) - r2_score(y[i], base[i]) for i in idx])
            lo, hi = np.percentile(d, [2.5, 97.5])
            print(f"| {t} | {k} | {r2_score(y, p):.4f} | {r2_score(y, p) - r2_score(y, base):+.4f} | "
                  f"[{lo:+.4f}, {hi:+.4f}] |")  # fmt: skip


if __name__ == "__main__":
    main()
