"""Which north/south instrument difference makes the telescope visible in the pixels? A cheap attribution probe.

For each setting of the mock survey's instrument differences (`astrolom survey --instrument ...`), render the same
N galaxies (only the observing conditions change) and ask a logistic regression, 5-fold cross-validated, to tell
north from south from three feature sets that need no training of a large model:

- `photometry`: the project's aperture-photometry baseline (`astrolom.eval.baselines.photometry`: asinh aperture
  magnitudes and colours), i.e. what filter curves and PSF do to fluxes and colours;
- `sky texture`: per band, the log sky sigma of the stamp border and the lag-1 / lag-2 autocorrelation of the border
  pixels (x and y), i.e. depth and correlated noise from resampling;
- `profile`: per band, the fraction of the central light within 1, 2 and 3 px of the centre (PSF width, sky-normalised
  so noise matters little for bright objects), plus the band-to-band ratios of those fractions.

Usage: `PYTHONPATH=src nice -n 5 python benchmarks/telescope_islands.py --n 800` (prints a markdown table).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from astrolom import mock as S
from astrolom.eval.baselines import aperture_fluxes, photometry

VARIANTS = {
    "all (default)": S.INSTRUMENT_EFFECTS,
    "none": (),
    **{f"only {e}": (e,) for e in S.INSTRUMENT_EFFECTS},
    **{f"all but {e}": tuple(x for x in S.INSTRUMENT_EFFECTS if x != e) for e in S.INSTRUMENT_EFFECTS},
}


def render(n: int, size: int, seed: int, instrument: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    cat = S.sample_catalogue(n, seed=seed, instrument=instrument)
    imgs = np.stack(
        [
            S.render_image(S.catalogue_row(cat, j), size)
            for j in tqdm(range(n), desc=",".join(instrument) or "none", file=sys.stderr, leave=False)
        ]  # fmt: skip
    )
    return imgs, (cat["telescope"] == "north").astype(int)


def sky_texture(images: np.ndarray) -> np.ndarray:
    """(N, 5 C): log border sigma, lag-1 and lag-2 autocorrelation along x and y of the 6-px border, per band."""
    b = 6
    feats = []
    for c in range(images.shape[-1]):
        im = images[..., c]
        strips = [im[:, :b, :], im[:, -b:, :], np.swapaxes(im[:, :, :b], 1, 2), np.swapaxes(im[:, :, -b:], 1, 2)]
        border = np.concatenate([s.reshape(len(im), -1) for s in strips], axis=1)
        med = np.median(border, axis=1, keepdims=True)
        sig = 1.4826 * np.median(np.abs(border - med), axis=1) + 1e-12
        out = [np.log(sig)]
        for lag in (1, 2):
            for axis_x in (True, False):
                num, den = 0.0, 0.0
                for s in strips[:2]:  # horizontal strips: rows of 64 px
                    x = s - s.mean(axis=(1, 2), keepdims=True)
                    a, bb = (x[:, :, lag:], x[:, :, :-lag]) if axis_x else (x[:, lag:, :], x[:, :-lag, :])
                    num = num + (a * bb).sum(axis=(1, 2))
                    den = den + 0.5 * ((a * a).sum(axis=(1, 2)) + (bb * bb).sum(axis=(1, 2)))
                out.append(num / den)
        feats.append(np.stack(out, axis=1))
    return np.concatenate(feats, axis=1)


def profile(images: np.ndarray) -> np.ndarray:
    """(N, 3 C + 3 (C-1)): light within 1, 2, 3 px over light within 6 px per band, and band ratios of those."""
    ap = aperture_fluxes(images, (1.0, 2.0, 3.0, 6.0))  # (N, 4, C)
    frac = ap[:, :3] / np.maximum(ap[:, 3:4], 1e-6)
    frac = np.clip(frac, -2, 3)
    ratio = frac[:, :, :-1] - frac[:, :, 1:]
    return np.concatenate([frac.reshape(len(images), -1), ratio.reshape(len(images), -1)], axis=1)


def probe(x: np.ndarray, y: np.ndarray) -> float:
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(clf, x, y, cv=cv, scoring="accuracy").mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=None, help="comma list of variant names (default: all)")
    args = ap.parse_args(argv)
    names = list(VARIANTS) if args.variants is None else [v.strip() for v in args.variants.split(",")]
    print(
        f"telescope from pixels, logistic regression, 5-fold CV, {args.n} galaxies",
        f"({args.size} px, seed {args.seed})",
    )
    print("| instrument differences on | photometry | sky texture | profile | all three | majority |")
    print("|---|---|---|---|---|---|")
    for name in names:
        t0 = time.perf_counter()
        imgs, y = render(args.n, args.size, args.seed, VARIANTS[name])
        half = len(imgs) // 2
        phot = np.concatenate(photometry(imgs[:half], imgs[half:]), axis=0)  # (softening from one half)
        sky, prof = sky_texture(imgs), profile(imgs)
        accs = [probe(f, y) for f in (phot, sky, prof, np.concatenate([phot, sky, prof], axis=1))]
        major = max(y.mean(), 1 - y.mean())
        cells = " | ".join(f"{a:.3f}" for a in accs)
        print(f"| {name} | {cells} | {major:.3f} |", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
