"""`astrolom finetune`: one fine-tuning run, or (`--label-curve`) label-efficiency curves.

This module holds the flags and dispatches, so that the trainer and the curves (which drive the trainer) never
import each other both ways. A run scored on a test split also writes
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
from astrolom.eval.probe_estimators import REGRESSION
from astrolom.finetune.config import FinetuneConfig
from astrolom.finetune.curves import label_efficiency, parse_counts
from astrolom.finetune.data import LabelledSet
from astrolom.finetune.targets import REGRESSION_LOSSES
from astrolom.finetune.trainer import FINAL_DIR, Finetuner

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="pretrained RUN or model directory (e.g. from astrolom convert)")
    parser.add_argument("--data", required=True, help="labelled data set")
    parser.add_argument("--targets", required=True, help="comma-separated label columns, e.g. smooth,disc,spiral")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, metrics, final/)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lora-r", type=int, default=None, help="LoRA adapters of this rank (the default, r=8)")
    mode.add_argument("--full", action="store_true", help="train every weight (backbone at --backbone-lr)")
    mode.add_argument("--head-only", action="store_true", help="freeze the backbone; train the head only")
    parser.add_argument("--lr", type=float, default=1e-3, help="head / adapter learning rate")
    parser.add_argument("--backbone-lr", type=float, default=1e-4, help="backbone learning rate with --full")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--patience", type=int, default=5, help="epochs without a better val loss before stopping")
    parser.add_argument("--n-labels", type=int, default=None, help="train on a seeded subset of N labelled objects")
    parser.add_argument("--val-split", default="val", help="early-stopping split ('none': hold out --val-fraction)")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--regression-loss", choices=REGRESSION_LOSSES, default="mse")
    parser.add_argument("--classify", default="", help="comma-separated targets to treat as classes")
    parser.add_argument("--no-vote-counts", action="store_true", help="regress vote fractions (no Dirichlet-mult.)")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--no-flux", action="store_true", help="the head sees the backbone's features only")
    parser.add_argument("--random-init", action="store_true", help="the control: a freshly initialised backbone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps (checkpoints also at epoch ends)")
    parser.add_argument("--resume", action="store_true", help="continue OUT from its latest checkpoint")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--label-curve",
        default=None,
        metavar="N,N,...",
        help="instead of one run: label-efficiency curves at these label counts (e.g. 50,200,1000,all), with "
        "--max-steps steps per run (default 300); `astrolom label-efficiency` has every option",
    )


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    mode = "full" if args.full else "head" if args.head_only else "lora"
    val_split = None if str(args.val_split).lower() in ("none", "") else args.val_split
    return FinetuneConfig(
        model=args.model,
        data=args.data,
        targets=args.targets,
        out=args.out,
        mode=mode,
        lora_r=args.lora_r or 8,
        lr=args.lr,
        backbone_lr=args.backbone_lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        patience=args.patience,
        n_labels=args.n_labels,
        val_split=val_split,
        val_fraction=args.val_fraction,
        regression_loss=args.regression_loss,
        vote_counts=not args.no_vote_counts,
        classify=comma_list(args.classify, name="--classify"),
        augment=not args.no_augment,
        flux=not args.no_flux,
        random_init=args.random_init,
        seed=args.seed,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )


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
