"""`astrolom convert`: reference AstroPT checkpoints (astropt 1.0.x and 2.x, local or on the Hub) <-> astrolom models.

astrolom convert --from-reference ckpt.pt --out models/imported
astrolom convert --from-hub Smith42/astroPT --file models/fully_trained/0089M_params/030000_ckpt.pt --out m89
astrolom convert --to-reference models/imported --out back.pt   # 1.0.x layout for "paper" models, else 2.x
"""

from __future__ import annotations

import argparse
from pathlib import Path

from astrolom.interop import hub
from astrolom.interop.astropt_v1 import export_v1_checkpoint
from astrolom.interop.reference import export_reference_checkpoint
from astrolom.model.astropt import AstroPT
from astrolom.model.pretrained import from_pretrained, read_config, save_pretrained


def _generation(model: AstroPT) -> str:
    return "astropt 1.0.x" if model.config.tokeniser == "paper" else "astropt 2.x"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--from-reference", metavar="CKPT", help="reference AstroPT checkpoint (.pt) to import")
    group.add_argument("--from-hub", metavar="REPO", help="hub repository OWNER/NAME holding a reference checkpoint")
    group.add_argument("--to-reference", metavar="DIR", help="astrolom model (or RUN) directory to export")
    parser.add_argument("--file", help="with --from-hub: the checkpoint's path in the repository")
    parser.add_argument("--revision", help="with --from-hub: branch, tag or commit (default: main)")
    parser.add_argument(
        "--out",
        help="astrolom model directory (import) or reference .pt file (export); with --from-hub optional: the "
        "converted model then stays in the hub cache only (its path is printed)",
    )


def run(args: argparse.Namespace) -> int:
    if args.from_hub:
        if not args.file:
            raise SystemExit("astrolom convert: --from-hub needs --file (the checkpoint's path in the repository)")
        spec = f"hf:{args.from_hub}/{args.file}" + (f"@{args.revision}" if args.revision else "")
        where = hub.resolve(spec)
        model = from_pretrained(where)
        if args.out:  # a copy of the cached conversion, written whole and renamed into place
            save_pretrained(model, args.out, data=read_config(where).get("data"))
            where = args.out
        print(f"{spec} -> {where}: {_summary(model)}")
        return 0
    if not args.out:
        raise SystemExit("astrolom convert: --out is required with --from-reference / --to-reference")
    if args.from_reference:
        model = hub.convert_file(Path(args.from_reference), Path(args.out), source=str(args.from_reference))
        print(f"imported {args.from_reference} -> {args.out}: {_summary(model)}")
    else:
        model = from_pretrained(args.to_reference)
        write = export_v1_checkpoint if model.config.tokeniser == "paper" else export_reference_checkpoint
        write(model, args.out)
        print(f"exported {args.to_reference} -> {args.out} ({_generation(model)} GPT state dict + model_args)")
    return 0


def _summary(model: AstroPT) -> str:
    cfg = model.config
    return (
        f"{_generation(model)} layout, {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, tokeniser "
        f"{cfg.tokeniser}, tokens preset {cfg.tokens_preset}, {model.num_params(non_embedding=False):,} parameters"
    )
