"""`astrolom inspect --data PATH`: open any supported data set and summarise it (format, count, shapes, ranges)."""

from __future__ import annotations

import argparse

from astrolom.data.sources.open import ALIASES, FORMATS, open_source
from astrolom.data.sources.parquet import ParquetSource


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data set: folder, file, glob or fsspec URL")
    parser.add_argument("--format", default=None, choices=sorted(set(FORMATS) | set(ALIASES)), help="default: detect")
    parser.add_argument("--skip-bad", action="store_true", help="skip undecodable / mismatched records (listed)")
    parser.add_argument("--manifest", default=None, help="JSONL file to which skipped records are appended")
    parser.add_argument("--image-key", default=None, help="image column / dataset / array name (default: image(s))")
    parser.add_argument("--id-column", default=None, help="object id column / dataset (default: detected)")
    parser.add_argument("--show", type=int, default=4, help="number of records whose value ranges are printed")


def run(args: argparse.Namespace) -> int:
    src = open_source(
        args.data,
        args.format,
        skip_bad=args.skip_bad,
        manifest=args.manifest,
        image_key=args.image_key,
        id_column=args.id_column,
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
    summary = src.log_summary()
    if summary:
        print(summary)
    src.close()
    return 0
