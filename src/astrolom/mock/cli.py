"""`astrolom survey`: generate the embedded mock DESI Legacy Survey (see `astrolom.mock`) and print its summary."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from astrolom.data.records import DEFAULT_SPLIT_FRACTIONS
from astrolom.mock.instruments import INSTRUMENT_EFFECTS, SPECTRUM_APERTURES, parse_instrument
from astrolom.mock.writer import IMAGE_FORMATS, SurveyConfig, write_survey


def _print_summary(out: Path, summary: dict[str, Any]) -> None:
    c = summary["counts"]
    print(f"astrolom survey: {c['total']} objects -> {out}")
    print(f"  {'split':<6} {'total':>7} {'north':>7} {'south':>7}")
    for s in ("train", "val", "test"):
        print(f"  {s:<6} {c[s]['total']:>7} {c[s]['north']:>7} {c[s]['south']:>7}")
    print(f"  {'label':<14} {'min':>9} {'mean':>9} {'max':>9}")
    for k, v in summary["label_stats"].items():
        print(f"  {k:<14} {v['min']:>9.3f} {v['mean']:>9.3f} {v['max']:>9.3f}")
    files = summary["files"]
    total = sum(p.stat().st_size for p in files)
    shown = ", ".join(p.name for p in files[:3]) + (f", ... ({len(files)} files)" if len(files) > 3 else "")
    print(f"  files: {shown} + _survey.json, {total / 2**20:.1f} MiB")
    secs = summary["seconds"]
    print(f"  time: {secs:.1f} s ({c['total'] / max(secs, 1e-9):.3g} objects/s, {summary['workers']} workers)")


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from err
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return parts  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=2000, help="number of objects (default 2000)")
    parser.add_argument("--size", type=int, default=64, help="stamp size in pixels, even, 32..512 (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, help="output directory for the Parquet shards")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    parser.add_argument(
        "--split-fractions",
        type=_fractions,
        default=DEFAULT_SPLIT_FRACTIONS,
        help="train,val,test fractions (default 0.8,0.1,0.1; the paper used 0.98,0.01,0.01)",
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="objects per Parquet shard (default 1000)")
    parser.add_argument(
        "--instrument",
        default="all",
        help="north/south instrument differences to simulate: 'all' (default), 'none', a comma list of "
        f"{','.join(INSTRUMENT_EFFECTS)}, or all but some (--instrument=-pixels,-psf)",
    )
    parser.add_argument(
        "--spectrum-aperture",
        choices=SPECTRUM_APERTURES,
        default="fiber",
        help="light the spectra carry: 'fiber' (default; a 1.5\" DESI fibre in the seeing of the night, "
        "flux-calibrated on point sources, label fiber_frac) or 'total' (the whole galaxy, as before 2026-12-02)",
    )
    parser.add_argument(
        "--format",
        choices=IMAGE_FORMATS,
        default="flux",
        help="stamps as 'flux' (default: float32 g, r, z in nanomaggies) or 'jpeg': 8-bit RGB JPEGs rendered as the "
        "Legacy Survey viewer renders g, r, z (as the paper's training data were made; Smith42/galaxies Parquet "
        "layout, image column {bytes, path})",
    )
    parser.add_argument(
        "--jpeg-size",
        type=int,
        default=None,
        help="JPEG pixels per side (the paper's: 512; default: --size). Another size resamples the stamp, so the "
        "pixel scale becomes 0.262 * size / jpeg-size arcsec; --size 512 renders the paper's 512x512 at 0.262\"/px",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a survey already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    cfg = SurveyConfig(
        n=args.n,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        split_fractions=tuple(args.split_fractions),
        shard_size=args.shard_size,
        instrument=parse_instrument(args.instrument),
        spectrum_aperture=args.spectrum_aperture,
        image_format=args.format,
        jpeg_size=args.jpeg_size,
    ).validate()
    out, summary = write_survey(cfg, Path(args.out), progress=not args.no_progress, overwrite=args.overwrite)
    _print_summary(out, summary)
    return 0
