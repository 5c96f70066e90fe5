"""`astrolom finetune`: one fine-tuning run, or (`--label-curve`) label-efficiency curves.

The flags are `astrolom.finetune.trainer.add_arguments`; this module only dispatches, so that the trainer and the
curves (which drive the trainer) never import each other both ways.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from astrolom.finetune.curves import label_efficiency, parse_counts
from astrolom.finetune.trainer import FINAL_DIR, Finetuner, add_arguments, config_from_args

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    if args.label_curve:
        mode = "head" if args.head_only else "lora" if args.lora_r else "full"
        curves = label_efficiency(
            args.model,
            args.data,
            [t.strip() for t in args.targets.split(",") if t.strip()],
            counts=parse_counts(args.label_curve),
            mode=mode,
            steps=args.max_steps or 300,  # --max-steps: optimiser steps per run
            patience=args.patience,
            batch_size=args.batch_size,
            lr=args.lr,
            backbone_lr=args.backbone_lr,
            seed=args.seed,
            out=args.out,
            progress=not args.no_progress,
        )
        print(curves.markdown())
        print("goal:", json.dumps(curves.goal()))
        return 0
    result = Finetuner(config_from_args(args), resume=args.resume).fit()
    print(
        f"best epoch {result.best_epoch} (val loss {result.best_val_loss:.4f}), {result.steps} steps in "
        f"{result.seconds:.0f} s -> {Path(args.out) / FINAL_DIR}"
    )
    for name, metrics in result.test_scores.items():
        print(f"  test {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return 0
