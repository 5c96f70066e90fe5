"""`astrolom finetune`: one fine-tuning run, or (`--label-curve`) label-efficiency curves.

The flags are `astrolom.finetune.trainer.add_arguments`; this module only dispatches, so that the trainer and the
curves (which drive the trainer) never import each other both ways. A run scored on a test split also writes
OUT/predictions/ (`astrolom.eval.metrics`): the fine-tuned model's per-object test predictions of every continuous
target (vote fractions included; classes are scored in finetune.json), their metrics (R2, MAE; sigma_NMAD, bias and
eta for redshift) and a predicted-vs-true figure per property.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from astrolom import layout
from astrolom.config import comma_list
from astrolom.eval.figures import write_predictions
from astrolom.eval.metrics import PredictionSet
from astrolom.eval.probes import REGRESSION
from astrolom.finetune.curves import label_efficiency, parse_counts
from astrolom.finetune.trainer import FINAL_DIR, Finetuner, LabelledSet, add_arguments, config_from_args

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    if args.label_curve:
        mode = "head" if args.head_only else "lora" if args.lora_r else "full"
        curves = label_efficiency(
            args.model,
            args.data,
            list(comma_list(args.targets, name="--targets")),
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
    ft = Finetuner(config_from_args(args), resume=args.resume)
    result = ft.fit()
    print(
        f"best epoch {result.best_epoch} (val loss {result.best_val_loss:.4f}), {result.steps} steps in "
        f"{result.seconds:.0f} s -> {Path(args.out) / FINAL_DIR}"
    )
    for name, metrics in result.test_scores.items():
        print(f"  test {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if ft.test is not None:
        preds = finetune_predictions(ft, ft.test, ft.cfg.test_split or "test")
        feature_set, method = finetune_group(ft)
        paths = write_predictions(preds, Path(args.out) / layout.PREDICTIONS_DIR, [(feature_set, method)])
        print(f"  per-object test predictions: {paths['parquet']}")
    return 0


def finetune_group(ft: Finetuner) -> tuple[str, str]:
    """(feature set, method) naming a fine-tuned model's predictions: how the backbone started, how it was tuned."""
    return ("random_init" if ft.cfg.random_init else "finetuned"), ft.cfg.mode


def finetune_predictions(ft: Finetuner, data: LabelledSet, split: str) -> PredictionSet:
    """The fine-tuned model's predictions of every continuous target (vote fractions: the expected fraction) of the
    labelled objects of `data`, per object."""
    feature_set, method = finetune_group(ft)
    preds = ft.predict(data.images)
    out = PredictionSet(info={"command": "astrolom finetune", "model": ft.cfg.model, "mode": ft.cfg.mode})
    for name in ft.targets.names:
        if ft.targets.metric_kind(name) == REGRESSION:
            out.add(feature_set, method, name, data.object_id, data.labels[name], preds[name], split=split)
    return out
