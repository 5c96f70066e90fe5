"""Label-efficiency curves: how good is each approach with 50, 200, 1,000 or all labels?

    astrolom label-efficiency --model RUN --data DIR --targets smooth,disc,spiral --out DIR --counts 50,200,1000,all
    astrolom finetune --label-curve 50,200,1000,all --model RUN --data DIR --targets smooth,disc,spiral --out DIR

Four approaches get the same labelled objects: the first N of one seeded permutation of the training split (so the
sets are nested: the 200 contain the 50), and are scored on the same test split:

- **finetuned**: the pretrained AstroPT fine-tuned with a head (`Finetuner`, `--mode`, default full with a lower
  backbone learning rate);
- **random_init**: the same architecture and recipe from a freshly initialised backbone (all weights at the head's
  learning rate);
- **linear_probe**: ridge / logistic regression (`astrolom.eval.probes.fit_probe`, CV-chosen penalty) on the frozen
  pretrained embeddings (penultimate layer, mean of the central tokens);
- **cnn**: the supervised CNN baseline of `astrolom.eval.baselines.train_cnn`, trained from scratch on the N labels.

Every approach sees only its N labels: those that early-stop (fine-tuning, CNN) hold out 15% of them. Training length
is set in optimiser steps so that small label sets get many epochs: `steps` for the fine-tuned models (capped at
`max_epochs` epochs), as many epochs as make `cnn_steps` (at least one) for the CNN. Scores: R2 for regression and
vote fractions (the expected fraction of the Dirichlet-multinomial head for the fine-tuned models; a regression on
the fractions for the probe and the CNN), accuracy for classes. On a shared CPU set OMP_NUM_THREADS=1: with more
threads than free cores, torch's thread pool spins and a step can take 5x longer.

Writes OUT/label_efficiency.{json,md,png}: the table and figure are self-contained for the README and the report;
and OUT/predictions/ (`astrolom.eval.metrics`): every approach's per-object test predictions of the continuous
targets at every label count (feature set = the approach, method = "N labels"), their metrics (sigma_NMAD, bias, eta
for redshift) and predicted-vs-true figures of the fine-tuned model with the most labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from astrolom import layout
from astrolom.config import comma_list
from astrolom.data.sources import open_source
from astrolom.eval import probes
from astrolom.eval.baselines import train_cnn
from astrolom.eval.embed import DEFAULT_LAYER, DEFAULT_TOKENS
from astrolom.eval.figures import write_predictions
from astrolom.eval.metrics import PredictionSet
from astrolom.eval.probe_estimators import CLASSIFICATION, REGRESSION, target_kind
from astrolom.finetune.config import FinetuneConfig
from astrolom.finetune.data import LabelledSet, load_labelled
from astrolom.finetune.model import MODES, backbone_tokens
from astrolom.finetune.trainer import Finetuner
from astrolom.log import get_logger
from astrolom.model import pretrained

_log = get_logger(__name__)

METHODS = ("finetuned", "random_init", "linear_probe", "cnn")
LABELS = {"finetuned": "fine-tuned (pretrained)", "random_init": "same arch., random init",
          "linear_probe": "linear probe (pretrained emb.)", "cnn": "supervised CNN"}  # fmt: skip
DEFAULT_COUNTS = (50, 200, 1000, None)  # None: all training labels
JSON_NAME, MD_NAME, PNG_NAME = "label_efficiency.json", layout.LABEL_EFFICIENCY_MD, "label_efficiency.png"


@dataclass
class CurvePoint:
    method: str
    n_labels: int
    target: str
    metric: str
    score: float
    seconds: float


@dataclass
class LabelCurves:
    """Scores of every (method, label count, target); serialises to JSON, a markdown table and a figure."""

    targets: list[str]
    counts: list[int]
    methods: list[str]
    points: list[CurvePoint] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    # per-object test predictions of the continuous targets (kept by `label_efficiency`, not part of the JSON)
    predictions: PredictionSet | None = field(default=None, repr=False, compare=False)

    def score(self, method: str, n_labels: int, target: str) -> float:
        return next(p.score for p in self.points if (p.method, p.n_labels, p.target) == (method, n_labels, target))

    def mean_score(self, method: str, n_labels: int) -> float:
        return float(np.mean([self.score(method, n_labels, t) for t in self.targets]))

    def seconds(self, method: str, n_labels: int) -> float:
        return sum(p.seconds for p in self.points if (p.method, p.n_labels) == (method, n_labels)) / len(self.targets)

    def goal(self) -> dict[str, bool]:
        """The issue's goal: fine-tuned >= CNN (mean score) at every count, and ahead by >= 0.02 at <= 200 labels."""
        if not {"finetuned", "cnn"} <= set(self.methods):
            return {}
        diff = {n: self.mean_score("finetuned", n) - self.mean_score("cnn", n) for n in self.counts}
        return {
            "finetuned_ge_cnn_everywhere": all(v >= 0 for v in diff.values()),
            "finetuned_ahead_at_50_200": all(v >= 0.02 for n, v in diff.items() if n <= 200),
        }

    def to_json(self) -> dict:
        return {
            "targets": self.targets,
            "counts": self.counts,
            "methods": self.methods,
            "points": [dataclasses.asdict(p) for p in self.points],
            "settings": self.settings,
            "goal": self.goal(),
        }

    @classmethod
    def from_json(cls, data: dict) -> LabelCurves:
        return cls(data["targets"], data["counts"], data["methods"], [CurvePoint(**p) for p in data["points"]],
                   data.get("settings", {}))  # fmt: skip

    def markdown(self) -> str:
        metric = {p.target: p.metric for p in self.points}
        head = "| labels | target | " + " | ".join(LABELS[m] for m in self.methods) + " |"
        lines = [head, "|" + "---|" * (2 + len(self.methods))]
        for n in self.counts:
            for t in self.targets:
                cells = [self.score(m, n, t) for m in self.methods]
                best = max(cells)
                row = " | ".join(f"**{c:.3f}**" if c == best else f"{c:.3f}" for c in cells)
                lines.append(f"| {n} | {t} ({metric[t]}) | {row} |")
            means = [self.mean_score(m, n) for m in self.methods]
            row = " | ".join(f"**{c:.3f}**" if c == max(means) else f"{c:.3f}" for c in means)
            lines.append(f"| {n} | *mean* | {row} |")
        secs = " | ".join(f"{sum(self.seconds(m, n) for n in self.counts):.0f} s" for m in self.methods)
        lines.append(f"| all counts | *train time* | {secs} |")
        return "\n".join(lines) + "\n"

    def figure(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [*self.targets, "mean"]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
        for ax, t in zip(axes[0], panels, strict=True):
            for m in self.methods:
                ys = [self.mean_score(m, n) if t == "mean" else self.score(m, n, t) for n in self.counts]
                ax.plot(self.counts, ys, marker="o", label=LABELS[m])
            ax.set_xscale("log")
            ax.set_xlabel("labelled galaxies")
            ax.set_title(t)
            ax.grid(alpha=0.3)
        metric = next((p.metric for p in self.points), "score")
        axes[0][0].set_ylabel(f"test {metric}")
        axes[0][-1].legend(fontsize=7, loc="lower right")
        from astrolom.eval.figures import save_figure

        return save_figure(fig, path)

    def write(self, out: str | Path) -> dict[str, Path]:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / JSON_NAME).write_text(json.dumps(self.to_json(), indent=2) + "\n")
        (out / MD_NAME).write_text(self.markdown())
        paths = {"json": out / JSON_NAME, "md": out / MD_NAME, "png": self.figure(out / PNG_NAME)}
        if self.predictions is not None and len(self.predictions):
            plots = [("finetuned", labels_method(max(self.counts)))]
            paths["predictions"] = write_predictions(self.predictions, out / layout.PREDICTIONS_DIR, plots)["parquet"]
        return paths


def labels_method(n_labels: int) -> str:
    """The `method` of a label curve's predictions in its PredictionSet: how many labels the approach had."""
    return f"{n_labels} labels"


def _epochs_for(n_fit: int, batch_size: int, steps: int, max_epochs: int) -> int:
    return int(min(max_epochs, max(1, math.ceil(steps / max(1, math.ceil(n_fit / batch_size))))))


@torch.no_grad()
def _embeddings(backbone, images: np.ndarray, patch_size: int, layer: int, n_tokens: int) -> np.ndarray:
    backbone.eval()
    out = []
    for i in range(0, len(images), 256):
        tokens = backbone_tokens(images[i : i + 256], backbone.config)
        n = min(n_tokens, backbone.config.block_size, tokens.shape[1])
        out.append(backbone.forward_features(tokens[:, :n], layer=layer).float().mean(1).numpy())
    return np.concatenate(out)


def _truth(data: LabelledSet, name: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows with a label, labels) of one target, as the probes and the CNN take them."""
    y = data.labels[name]
    if kind == CLASSIFICATION:
        ok = np.asarray([str(v) != "" for v in y])
        return np.flatnonzero(ok), np.asarray([str(v) for v in y])[ok]
    y = np.asarray(y, np.float64)
    ok = np.isfinite(y)
    return np.flatnonzero(ok), y[ok]


def label_efficiency(
    model: str,
    data: str,
    targets: list[str],
    *,
    counts: tuple[int | None, ...] = DEFAULT_COUNTS,
    methods: tuple[str, ...] = METHODS,
    mode: str = "full",
    steps: int = 300,
    max_epochs: int = 100,
    batch_size: int = 32,
    lr: float = 1e-3,
    backbone_lr: float = 3e-4,
    patience: int = 10,
    cnn_steps: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
    log=_log.info,
) -> LabelCurves:
    """Train and score every method at every label count; see the module docstring. `None` in counts = all labels."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {METHODS}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    log = log or (lambda *_: None)
    t_start = time.perf_counter()
    backbone, meta = pretrained.load_model(model)
    mc = backbone.config
    settings = dict(meta.get("split_settings") or {})
    if "split_fractions" in settings:
        settings["split_fractions"] = tuple(settings["split_fractions"])
    source = open_source(data, spectra=False, **settings)
    try:
        train_all = load_labelled(source, "train", mc.patch_size, DEFAULT_TOKENS, mc.block_size)
        test = load_labelled(source, "test", mc.patch_size, DEFAULT_TOKENS, mc.block_size, limit=max_test)
    finally:
        source.close()
    log(f"read {len(train_all)} training and {len(test)} test objects ({time.perf_counter() - t_start:.0f} s)")
    ns = sorted({len(train_all) if c is None else int(c) for c in counts})
    if ns[0] < 10 or ns[-1] > len(train_all):
        raise ValueError(f"label counts must be between 10 and the {len(train_all)} training objects, got {ns}")
    order = np.random.default_rng(seed).permutation(len(train_all))

    base = FinetuneConfig(
        model=model,
        data=data,
        targets=tuple(targets),
        mode=mode,
        lr=lr,
        backbone_lr=backbone_lr,
        batch_size=batch_size,
        patience=patience,
        val_split=None,
        seed=seed,
        progress=progress,
    )
    curves = LabelCurves(list(targets), ns, list(methods))
    curves.predictions = PredictionSet(info={"command": "astrolom label-efficiency", "model": model, "mode": mode})

    def record(method: str, n: int, target: str, kind: str, rows: np.ndarray, truth, pred) -> None:
        if kind == REGRESSION:
            curves.predictions.add(method, labels_method(n), target, test.object_id[rows], truth, pred)

    kinds: dict[str, str] = {}
    emb_train = emb_test = None
    for n in ns:
        subset = train_all.subset(np.sort(order[:n]))
        n_fit = n - max(1, int(round(base.val_fraction * n)))
        epochs = _epochs_for(n_fit, batch_size, steps, max_epochs)
        for method in methods:
            t0 = time.perf_counter()
            if method in ("finetuned", "random_init"):
                cfg = dataclasses.replace(base, epochs=epochs, max_steps=steps, random_init=method == "random_init",
                                          mode="full" if method == "random_init" else mode)  # fmt: skip
                ft = Finetuner(cfg, train=subset, val=None, test=test, log=None)
                kinds = {t: ft.targets.metric_kind(t) for t in targets}
                result = ft.fit()
                scores = {t: result.test_scores[t][probes.primary_metric(kinds[t])] for t in targets}
                predicted = ft.predict(test.images)
                for t in targets:
                    trows, ty = _truth(test, t, kinds[t])
                    record(method, n, t, kinds[t], trows, ty, predicted[t][trows])
                extra = f"{result.steps} steps, best epoch {result.best_epoch}"
            elif method == "linear_probe":
                if emb_train is None:
                    emb_train = _embeddings(backbone, train_all.images, mc.patch_size, DEFAULT_LAYER,
                                            DEFAULT_TOKENS)  # fmt: skip
                    emb_test = _embeddings(backbone, test.images, mc.patch_size, DEFAULT_LAYER, DEFAULT_TOKENS)
                X = emb_train[np.sort(order[:n])]
                scores = {}
                for t in targets:
                    kind = kinds.get(t) or target_kind(np.asarray(subset.labels[t]))
                    rows, y = _truth(subset, t, kind)
                    trows, ty = _truth(test, t, kind)
                    pred = probes.fit_probe(X[rows], y, emb_test[trows], kind, "linear", seed)
                    scores[t] = probes.score(ty, pred, kind)[probes.primary_metric(kind)]
                    record(method, n, t, kind, trows, ty, pred)
                extra = "ridge/logistic CV"
            else:
                spec = {}
                for t in targets:
                    kind = kinds.get(t) or target_kind(np.asarray(subset.labels[t]))
                    rows, y = _truth(subset, t, kind)
                    spec[t] = (kind, rows, y)
                cnn_epochs = _epochs_for(n_fit, 64, cnn_steps or steps, max_epochs)
                preds = train_cnn(subset.images, test.images, spec, epochs=cnn_epochs, seed=seed)
                scores = {}
                for t in targets:
                    trows, ty = _truth(test, t, spec[t][0])
                    scores[t] = probes.score(ty, preds[t][trows], spec[t][0])[probes.primary_metric(spec[t][0])]
                    record(method, n, t, spec[t][0], trows, ty, preds[t][trows])
                extra = f"{cnn_epochs} epochs"
            dt = time.perf_counter() - t0
            for t in targets:
                metric = probes.primary_metric(kinds.get(t) or REGRESSION)
                curves.points.append(CurvePoint(method, n, t, metric, float(scores[t]), dt))
            log(f"  {n:>5} labels  {method:<13} mean {np.mean(list(scores.values())):.3f}  "
                + "  ".join(f"{t} {s:.3f}" for t, s in scores.items()) + f"  ({dt:.0f} s, {extra})")  # fmt: skip
    curves.settings = {
        "model": model, "data": data, "mode": mode, "steps": steps, "cnn_steps": cnn_steps or steps,
        "max_epochs": max_epochs, "batch_size": batch_size, "lr": lr, "backbone_lr": backbone_lr,
        "patience": patience, "seed": seed, "n_test": len(test), "n_train_available": len(train_all),
        "seconds": time.perf_counter() - t_start,
    }  # fmt: skip
    if out is not None:
        paths = curves.write(out)
        log(f"wrote {paths['md']}, {paths['png']} ({curves.settings['seconds']:.0f} s in all)")
    return curves


def parse_counts(text: str) -> tuple[int | None, ...]:
    """'50,200,1000,all' -> (50, 200, 1000, None)."""
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part == "all":
            out.append(None)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ValueError(f"label counts must be integers or 'all', got {part!r}")
    if not out:
        raise ValueError("no label counts given")
    return tuple(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="pretrained RUN or model directory")
    parser.add_argument("--data", required=True, help="labelled data set with train and test splits")
    parser.add_argument("--targets", default="smooth,disc,spiral", help="comma-separated label columns")
    parser.add_argument("--out", required=True, help="directory for label_efficiency.{json,md,png}")
    parser.add_argument("--counts", default="50,200,1000,all", help="label counts ('all': the whole train split)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--mode", choices=MODES, default="full", help="how the pretrained model is fine-tuned")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per run (capped by --max-epochs)")
    parser.add_argument("--cnn-steps", type=int, default=None, help="steps for the CNN (default: --steps)")
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backbone-lr", type=float, default=3e-4)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--max-test", type=int, default=None, help="score on the first N test objects")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    curves = label_efficiency(
        args.model,
        args.data,
        list(comma_list(args.targets, name="--targets")),
        counts=parse_counts(args.counts),
        methods=comma_list(args.methods, name="--methods"),
        mode=args.mode,
        steps=args.steps,
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        backbone_lr=args.backbone_lr,
        patience=args.patience,
        cnn_steps=args.cnn_steps,
        max_test=args.max_test,
        seed=args.seed,
        out=args.out,
        progress=not args.no_progress,
    )
    print(curves.markdown())
    print("goal:", json.dumps(curves.goal()))
    return 0
