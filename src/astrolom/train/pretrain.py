"""Pretrain AstroPT: `astrolom pretrain --data DIR --preset NAME --out RUN --max-steps N [--resume] [key=value ...]`.

One process (CPU or GPU) or many under torchrun (DDP, or FSDP for models that do not fit one device)::

    astrolom pretrain --data mock --preset 1m --out runs/1m --max-steps 300
    torchrun --nproc_per_node 8 -m astrolom pretrain --data DIR --preset 89m --out RUN train.batch_size=512

This module builds the config (defaults < --config or RUN/config.yaml < flags < overrides) and runs one
`astrolom.train.trainer.Trainer` in this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from astrolom import layout
from astrolom.config import apply_overrides, load_yaml, to_dict
from astrolom.train import parallel
from astrolom.train.config import PretrainConfig
from astrolom.train.trainer import Trainer


def _config_epilog() -> str:
    lines = ["config keys (section.key=default); see astrolom/train/config.py for what each means:"]
    for section in dataclasses.fields(PretrainConfig):
        values = to_dict(getattr(PretrainConfig(), section.name))
        lines.append(f"  {section.name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _config_epilog()
    parser.add_argument("--data", help="data set to train on (any format astrolom reads); data.path")
    parser.add_argument("--preset", help="model size (see `astrolom presets`); model.preset")
    parser.add_argument("--out", help="run directory RUN for config, metrics, checkpoints; train.out_dir")
    parser.add_argument("--max-steps", type=int, help="optimiser steps; train.max_steps")
    parser.add_argument("--config", help="YAML file with model/data/optim/train sections (e.g. a RUN/config.yaml)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue RUN from its latest checkpoint, with RUN/config.yaml as the base config",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides applied last, e.g. train.batch_size=64 optim.learning_rate=3e-4",
    )


def make_config(
    *,
    base: PretrainConfig | None = None,
    data: str | None = None,
    preset: str | None = None,
    out: str | Path | None = None,
    max_steps: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> PretrainConfig:
    """`base` (default: the defaults) with the given settings, then `section.key=value` overrides applied last."""
    cfg = base or PretrainConfig()
    if data is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data)))
    if preset is not None and preset != cfg.model.preset:
        # a new preset: the architecture comes from it, not from another preset's resolved sizes
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, preset=preset, n_layer=None, n_head=None, n_embd=None)
        )
    if out is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(out)))
    if max_steps is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=max_steps))
    return apply_overrides(cfg, list(overrides))


def build_config(args: argparse.Namespace) -> PretrainConfig:
    """Defaults < --config (or RUN/config.yaml when resuming) < flags < overrides."""
    base = None
    run_cfg = Path(args.out) / layout.RUN_CONFIG_YAML if args.out else None
    if args.config:
        base = load_yaml(PretrainConfig, args.config)
    elif args.resume and run_cfg is not None and run_cfg.is_file():
        base = load_yaml(PretrainConfig, run_cfg)
    return make_config(
        base=base,
        data=args.data,
        preset=args.preset,
        out=args.out,
        max_steps=args.max_steps,
        overrides=args.overrides or [],
    )


def pretrain(cfg: PretrainConfig, *, resume: bool = False) -> dict:
    """Train with `cfg` in this process (one rank of torchrun, or alone); returns the `Trainer.fit` summary.

    A run directory that already holds checkpoints is continued only with `resume`, never overwritten.
    """
    run_dir = Path(cfg.train.out_dir) if cfg.train.out_dir else None
    if run_dir is not None and not resume and layout.list_checkpoints(run_dir):
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose another --out")
    trainer = Trainer(cfg, resume=resume)
    try:
        summary = trainer.fit()
    finally:
        parallel.destroy_distributed()
    return summary


def run(args: argparse.Namespace) -> int:
    summary = pretrain(build_config(args), resume=args.resume)
    if parallel.read_env().is_main:
        print(json.dumps(summary), file=sys.stdout)
    return 0 if summary["finished"] else 143
