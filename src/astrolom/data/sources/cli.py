"""`astrolom inspect --data PATH`: open any supported data set and summarise it (format, count, shapes, ranges, and
spectra: how many objects have one, the grid, wavelength coverage, the fraction of pixels and objects missing)."""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import numpy as np

from astrolom.data.sources.open import ALIASES, FORMATS, open_source
from astrolom.data.sources.parquet import ParquetSource
from astrolom.data.spectra import describe_grid


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data set: folder, file, glob or fsspec URL")
    parser.add_argument("--format", default=None, choices=sorted(set(FORMATS) | set(ALIASES)), help="default: detect")
    parser.add_argument("--skip-bad", action="store_true", help="skip undecodable / mismatched records (listed)")
    parser.add_argument("--manifest", default=None, help="JSONL file listing skipped records and dropped spectra")
    parser.add_argument("--image-key", default=None, help="image column / dataset / array name (default: image(s))")
    parser.add_argument("--id-column", default=None, help="object id column / dataset (default: detected)")
    parser.add_argument("--show", type=int, default=4, help="number of records whose value ranges are printed")
    parser.add_argument("--spectra-dir", default=None, help="folder of FITS spectra paired with the images by id")
    parser.add_argument(
        "--no-resample", action="store_true", help="refuse spectra on another grid instead of resampling them"
    )
    parser.add_argument("--sample", type=int, default=2000, help="records read for the spectra statistics")
    parser.add_argument(
        "--bands", default=None, help="keep these image bands, by name and in this order (e.g. g,r,z of griz data)"
    )


def spectra_summary(source, records) -> dict[str, Any] | None:
    """Spectrum statistics of `records` (read from `source`): None when the data set has no spectra.

    Returns:
        records, with (objects that have a spectrum), grid (`describe_grid` of the reference grid), coverage
        (median first/last wavelength with a good pixel), good_fraction (of pixels of the spectra present),
        missing_fraction (objects without a spectrum), resampled (count) and foreign grids {grid: count}.
    """
    n = with_spec = good = pixels = 0
    lo, hi = [], []
    wave = source.spectrum_grid.wavelength
    for rec in records:
        n += 1
        if rec.spectrum is None:
            continue
        with_spec += 1
        ok = np.isfinite(rec.spectrum)
        good += int(ok.sum())
        pixels += ok.size
        if wave is not None and ok.any() and ok.size == wave.size:
            idx = np.flatnonzero(ok)
            lo.append(wave[idx[0]])
            hi.append(wave[idx[-1]])
    if with_spec == 0 and wave is None:
        return None
    return {
        "records": n,
        "with": with_spec,
        "grid": describe_grid(wave) if wave is not None else "unknown",
        "coverage": (float(np.median(lo)), float(np.median(hi))) if lo else None,
        "good_fraction": good / pixels if pixels else 0.0,
        "missing_fraction": 1 - with_spec / n if n else 0.0,
        "resampled": source.spectrum_grid.resampled,
        "grids": dict(source.spectrum_grid.grids),
    }


def run(args: argparse.Namespace) -> int:
    src = open_source(
        args.data,
        args.format,
        skip_bad=args.skip_bad,
        manifest=args.manifest,
        image_key=args.image_key,
        id_column=args.id_column,
        spectra_dir=args.spectra_dir,
        resample_spectra=not args.no_resample,
        bands=args.bands,
    )
    print(f"data:          {args.data}")
    print(f"format:        {src.format}" + (f" ({src.layout})" if isinstance(src, ParquetSource) else ""))
    print(f"files:         {len(src.files)}")
    print(f"records:       {len(src)} in {src.num_chunks} chunks")
    counts = src.split_counts()
    print("splits:        " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"image shape:   {src.image_shape} (H, W, C), dtype float32")
    print(f"bands:         {', '.join(map(str, src.bands)) if src.bands else 'unknown'}")
    print(f"label columns: {', '.join(src.label_columns) if src.label_columns else 'none'}")
    shown = 0
    for rec in src.records():
        if shown >= args.show:
            break
        img = rec.image
        ranges = ", ".join(f"[{img[..., c].min():.4g}, {img[..., c].max():.4g}]" for c in range(img.shape[2]))
        spec = "" if rec.spectrum is None else f", spectrum {rec.spectrum.shape[0]} px"
        print(f"  {rec.object_id} ({rec.split}): {tuple(img.shape)} per band min/max {ranges}{spec}")
        shown += 1
    spec = spectra_summary(src, itertools.islice(src.records(), max(1, args.sample)))
    if spec is not None:
        read = "" if spec["records"] >= len(src) else f" [first {spec['records']} of {len(src)} read]"
        print(
            f"spectra:       {spec['with']} of {spec['records']} records have one "
            f"({100 * spec['missing_fraction']:.1f}% without){read}"
        )
        print(f"  grid:        {spec['grid']}")
        if spec["coverage"] is not None:
            a, b = spec["coverage"]
            print(
                f"  coverage:    good pixels span {a:g}-{b:g} A (median); {100 * spec['good_fraction']:.1f}% of "
                f"pixels good, {100 * (1 - spec['good_fraction']):.1f}% masked / no information"
            )
        if spec["resampled"]:
            grids = ", ".join(f"{g} ({k})" for g, k in spec["grids"].items())
            print(f"  resampled:   {spec['resampled']} spectra from other grids (flux-conserving): {grids}")
        if src.partial_spectra:
            cov = [e["coverage"] for e in src.partial_spectra]
            print(
                f"  partial:     {len(cov)} spectra cover part of the grid (label spectrum_coverage): "
                f"median {100 * float(np.median(cov)):.1f}%, least {100 * min(cov):.1f}%"
            )
    summary = src.log_summary()
    if summary:
        print(summary)
    src.close()
    return 0
