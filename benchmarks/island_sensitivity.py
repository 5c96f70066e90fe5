"""How large must the north/south difference be for telescope islands? The demo on a counterfactual mock survey.

The mock's north differs from the south only as BASS/MzLS and DECam do (`astrolom.mock.instruments`, "Two
telescopes"); with those differences the demo's embedding tells the telescopes apart linearly (≈ 0.92-0.94) but its
UMAP shows no islands. This benchmark makes one difference larger than the real surveys' — the north's seeing
multiplied by `--fwhm-scale` in every band, and/or its 5σ depths made `--depth-shift` mag shallower — renders the
demo's survey with it (8,000 galaxies, seed 0, one worker: the change is a module-level edit that spawned workers
would not see), runs `astrolom demo` on it without the multimodal and alignment stages, and prints the telescope's
linear-probe accuracy per feature set and the neighbour agreement (of each galaxy's 15 nearest neighbours, the
fraction on its own telescope; islands push it to 1) in the standardised embedding and in its UMAP map, for the
pretrained model and its random-init control. `--fwhm-scale 1 --depth-shift 0` is the real mock.

It is a counterfactual, not a mock to train on: a north twice as blurred as BASS is not a survey that exists.

    PYTHONPATH=src python benchmarks/island_sensitivity.py --out DIR --fwhm-scale 2 [--depth-shift 0] [--n 8000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from mock_fibre_islands import islands  # the neighbour-agreement table (benchmarks/ is on sys.path)

from astrolom import layout
from astrolom import mock as S


def render(out: Path, n: int, fwhm_scale: float, depth_shift: float) -> None:
    """The demo's survey (n, 64 px, seed 0, every instrument difference) with the north's seeing and depth changed."""
    marker = out / "counterfactual.json"
    wanted = {"n": n, "fwhm_scale": fwhm_scale, "depth_shift": depth_shift}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        print(f"reusing {out / layout.DEMO_SURVEY_DIR}")
        return
    north = S.TELESCOPES["north"]
    north["fwhm"] = tuple(f * fwhm_scale for f in north["fwhm"])
    north["depth"] = tuple(d - depth_shift for d in north["depth"])
    print(f"north: seeing {north['fwhm']} arcsec, depth {north['depth']} (south {S.TELESCOPES['south']['fwhm']}, "
          f"{S.TELESCOPES['south']['depth']})", flush=True)  # fmt: skip
    S.generate_survey(out / layout.DEMO_SURVEY_DIR, n=n, size=64, seed=0, workers=1, overwrite=True)
    marker.write_text(json.dumps(wanted))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="demo output folder (its survey is reused when the settings match)")
    ap.add_argument("--fwhm-scale", type=float, default=2.0, help="north seeing = BASS/MzLS seeing x this")
    ap.add_argument("--depth-shift", type=float, default=0.0, help="north 5-sigma depths this many mag shallower")
    ap.add_argument("--n", type=int, default=8000)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    render(out, args.n, args.fwhm_scale, args.depth_shift)
    demo = [sys.executable, "-m", "astrolom", "demo", "--out", str(out), "--n", str(args.n), "--spectra-steps", "0"]
    subprocess.run(demo, check=True)

    tel = json.loads((out / layout.DEMO_JSON).read_text())["key_numbers"]["telescope"]
    print(f"\nnorth seeing x{args.fwhm_scale:g}, depths {args.depth_shift:g} mag shallower: telescope linear accuracy")
    print("| " + " | ".join(tel) + " |\n|" + "---|" * len(tel))
    print("| " + " | ".join(f"{v:.3f}" for v in tel.values()) + " |")
    islands([str(out / layout.EMBEDDINGS_NAME), str(out / layout.PROBES_DIR / "embeddings_random_init.parquet")])


if __name__ == "__main__":
    main()
