"""`astrolom <subcommand>`: one command line for the whole toolkit.

Each subcommand lives in the module that owns its stage of the data flow; that module exposes
`add_arguments(parser)` and `run(args) -> int | None`. This file only maps names to modules.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from astrolom.log import configure as configure_logging

# name -> (module, one-line help). Order is the order of the data flow.
COMMANDS: dict[str, tuple[str, str]] = {
    "survey": ("astrolom.mock.cli", "generate the embedded mock DESI Legacy Survey (GalSim)"),
    "inspect": (
        "astrolom.data.sources",
        "read any supported data set and summarise it (format, count, shapes)",
    ),
    "presets": (
        "astrolom.model.presets",
        "list the AstroPT model sizes (paper Table 1) with parameter counts",
    ),
    "pretrain": ("astrolom.train.pretrain", "pretrain AstroPT on a data set (one process, or many under torchrun)"),
    "convert": ("astrolom.interop.convert", "import/export reference AstroPT checkpoints (astropt 1.0.x, 2.x; Hub)"),
    "push": ("astrolom.interop.hub", "publish a run's model to the Hugging Face Hub with a model card"),
    "embed": (
        "astrolom.align.embed",  # an alignment run embeds into its shared space; any other model: astrolom.eval.embed
        "embed a data set: penultimate layer, mean of the central 64 spiral tokens (or an alignment run's space)",
    ),
    "generate": (
        "astrolom.eval.multimodal",
        "cross-modal generation with a multimodal model (image -> spectrum, spectrum -> image) vs a mean baseline",
    ),
    "probe": ("astrolom.eval.probe_cli", "linear / kNN / MLP probes of embeddings, with controls and baselines"),
    "metrics": (
        "astrolom.eval.metrics_cli",
        "score property predictions: R2, MAE and for redshift sigma_NMAD, bias, outlier fraction (any table)",
    ),
    "scaling": ("astrolom.eval.scaling", "pretrain a sweep of presets, fit L(C), probe each model (Figs. 2, 4)"),
    "finetune": (
        "astrolom.finetune.cli",
        "fine-tune a pretrained model on labelled data (LoRA / full / head-only), Zoobot-style",
    ),
    "label-efficiency": (
        "astrolom.finetune.curves",
        "label-efficiency curves: fine-tuned vs random init vs linear probe vs CNN at 50..all labels",
    ),
    "align": (
        "astrolom.align.train",
        "align an image and a spectrum encoder into one embedding space (AstroCLIP-style contrastive heads)",
    ),
    "eval-align": (
        "astrolom.align.evaluate",
        "evaluate an aligned model: retrieval, zero-/few-shot properties, flow posteriors with TARP calibration",
    ),
    "report": ("astrolom.eval.report", "one self-contained HTML report of a run (curves, probes, UMAP, inpainting)"),
    "index": ("astrolom.search.index", "build a FAISS similarity-search index over embeddings"),
    "search": ("astrolom.search.query", "nearest neighbours of an object id, a new cutout or a spectrum"),
    "outliers": ("astrolom.search.outliers", "rank objects by how unusual they are (k-th neighbour distance)"),
    "marks": (
        "astrolom.search.labels",
        "mark objects interesting or not, rank the rest by a classifier of the marks, export marks or rankings",
    ),
    "serve": ("astrolom.serve.app", "local web explorer of an index: map, neighbours, uploads, outliers"),
    "demo": ("astrolom.demo", "mock survey -> pretrain -> embed -> probe -> report, on a laptop CPU"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only the `selected` subcommand's module is imported (keeps `--help` fast and robust)."""
    parser = argparse.ArgumentParser(
        prog="astrolom", description="Large Observation Models for astronomy: AstroPT and beyond."
    )
    from astrolom import __version__

    parser.add_argument("--version", action="version", version=f"astrolom {__version__}")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="debug messages as well")
    noise.add_argument("-q", "--quiet", action="store_true", help="warnings and results only (no progress)")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == selected:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_module=mod)
    return parser


def _resolve_hub_models(args: argparse.Namespace) -> None:
    """`--model hf:OWNER/NAME[/PATH]` (any command): the local model directory it resolves to, converted once."""
    for key in ("model", "image_model", "spectrum_model"):
        value = getattr(args, key, None)
        if isinstance(value, str) and value.startswith("hf:"):
            from astrolom.interop.hub import resolve

            setattr(args, key, str(resolve(value)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    args = parser.parse_args(argv)
    configure_logging(1 if args.verbose else -1 if args.quiet else 0)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        _resolve_hub_models(args)
        rc = args._module.run(args)
    except (ValueError, FileNotFoundError) as err:
        # user-facing problems (bad input, bad config) get one clear line, not a traceback
        print(f"astrolom {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
