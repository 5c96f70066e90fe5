"""How to read a spectrum embedding out of a causal multimodal AstroPT: pooled readouts, linear-probe R² side by side.

In a causal decoder the i-th spectrum token has read only the first i tokens of the spectrum (the blue end), so the
plain mean over tokens averages representations that saw 64 Å with ones that saw the whole spectrum. This benchmark
runs the spectra-only pass once per object with a spectrum and compares readouts of the same hidden states, from the
final and the penultimate block:

- `mean`: the mean over the spectrum's present tokens (astrolom's `embedding_spectra`);
- `last`: the last present token (the GPT convention: the only token that has read everything);
- `mean of the last half`, `mean of the last quarter`;
- `mean, last concatenated` (twice the width);
- `K wavelength segments` (K = 2, 4, 8 or `--segments`): the mean over each of K equal wavelength ranges,
  concatenated (K× the width; position-aware; astrolom's `spectrum_pool`, whose default is 8).

Linear probes (astrolom's RidgeCV on standardised features) fit on val (or train), scored on test. `--random-init`
reads the same readouts out of a freshly initialised model of the same config (the control: what the readout gives
any network).

    PYTHONPATH=src python benchmarks/spectrum_readout.py --model mm --data survey [--fit val] [--targets ...] \
        [--segments 2,4,8,12,16] [--method knn] [--random-init]
"""

from __future__ import annotations

import argparse
from itertools import islice

import numpy as np
import torch
from sklearn.metrics import r2_score

from astrolom.eval.multimodal import (
    _load,
    model_records,
    record_inputs,
    spectrum_pool,
    spectrum_tokeniser_from_config,
)
from astrolom.eval.probe_estimators import REGRESSION
from astrolom.eval.probes import fit_probe
from astrolom.model.pretrained import load_model

TARGETS = ("redshift", "log_mstar", "log_ssfr", "age_mw_gyr", "log_zstar")


def _segment_means(h: torch.Tensor, m: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Mean of h over present tokens with lo <= rank < hi (rank = position among the present tokens)."""
    rank = m.long().cumsum(1) - 1
    w = (m & (rank >= lo[:, None]) & (rank < hi[:, None])).float()[..., None]
    return (h * w).sum(1) / w.sum(1).clamp_min(1)


def readouts(h: torch.Tensor, m: torch.Tensor, segments: tuple[int, ...] = (2, 4, 8)) -> dict[str, torch.Tensor]:
    n = m.sum(1)
    mean = spectrum_pool(h, m, 1)
    last_idx = (m.long() * torch.arange(m.shape[1])[None]).argmax(1)
    last = h[torch.arange(h.shape[0]), last_idx]
    return {
        "mean": mean,
        "last": last,
        "mean of the last half": _segment_means(h, m, n // 2, n),
        "mean of the last quarter": _segment_means(h, m, (3 * n) // 4, n),
        "mean, last concatenated": torch.cat([mean, last], 1),
        **{f"{k} wavelength segments": spectrum_pool(h, m, k) for k in segments},
    }


@torch.no_grad()
def features(
    model_path: str,
    data: str,
    targets: tuple[str, ...],
    random_init: bool = False,
    segments: tuple[int, ...] = (2, 4, 8),
) -> tuple[dict, dict]:
    model, cfg, _ = _load(model_path)
    if random_init:  # the control: the same architecture from its own init (astrolom's random-init baseline)
        model = load_model(model_path, random_init=True)[0]
    model.eval()
    spec = spectrum_tokeniser_from_config(cfg)
    blocks = {"final": -1, "penultimate": -2}
    feats: dict[str, list] = {}
    labels: dict[str, list] = {t: [] for t in (*targets, "split")}
    records = (r for r in model_records(data, cfg, ["train", "val", "test"]) if r.spectrum is not None)
    while batch := list(islice(records, 128)):
        _, inp = record_inputs(batch, model, cfg, spec)
        s = {k: v for k, v in inp.items() if k.startswith("spectra")}
        mask = s["spectra_mask"].bool() & s["spectra_present"].bool()[:, None]
        for block, layer in blocks.items():
            h = model.forward_features(s, layer=layer)["spectra"].float()
            for k, v in readouts(h, mask, segments).items():
                feats.setdefault(f"{block} block, {k}", []).append(v.numpy())
        for r in batch:
            for t in targets:
                labels[t].append(r.labels[t])
            labels["split"].append(r.split)
    return {k: np.concatenate(v) for k, v in feats.items()}, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an AstroPT RUN with spectra among its modalities")
    ap.add_argument("--data", required=True)
    ap.add_argument("--fit", default="val", choices=["train", "val"], help="split the probes are fit on")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--random-init", action="store_true", help="the control: the model's architecture, fresh weights")
    ap.add_argument("--segments", default="2,4,8", help="segment counts to compare (comma-separated)")
    ap.add_argument("--method", default="linear", choices=["linear", "knn"], help="probe (astrolom's)")
    args = ap.parse_args()
    targets = tuple(args.targets.split(","))
    segments = tuple(int(k) for k in args.segments.split(","))
    feats, labels = features(args.model, args.data, targets, args.random_init, segments)
    split = np.array(labels["split"])
    fit, test = split == args.fit, split == "test"
    print(f"{args.method} probes fit on {fit.sum()} {args.fit} objects, scored on {test.sum()} test objects\n")
    print("| readout | width | " + " | ".join(targets) + " |\n|---|---|" + "---|" * len(targets))
    for k, X in feats.items():
        row = []
        for t in targets:
            y = np.asarray(labels[t], dtype=np.float64)
            row.append(r2_score(y[test], fit_probe(X[fit], y[fit], X[test], REGRESSION, args.method)))
        print(f"| {k} | {X.shape[1]} | " + " | ".join(f"{v:.3f}" for v in row) + " |")


if __name__ == "__main__":
    main()
