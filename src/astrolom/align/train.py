"""`astrolom align`: train the alignment heads (and optionally fine-tune the encoders) with the CLIP loss.

Frozen encoders (the default): their per-token features are extracted once into `RUN/features.safetensors`
(`features.py`) and each step reads a random view per image from the cache, so head training is fast on a CPU.
`--finetune-backbones` runs both encoders live on the cached stamps and spectra (D4 + noise augmentation drawn per
step) with their own, lower learning rate.

Everything a step draws (its batch, its image views, its noise) is a function of (seed, step), so a checkpoint
needs only the step, the weights and the optimiser state, and resume is exact. Under torchrun each rank takes its
slice of the global batch and the loss all-gathers embeddings (negatives = global batch, `loss.py`); DDP averages
the gradients, which gives the single-process gradient of the global batch.

The loop runs on the shared engine (`astrolom.train.engine`): its warm-up + cosine schedule, checkpoint manager,
metrics log (cut back to the resumed step on resume) and fault switch, and `parallel.parallelize` for DDP. The heads
are small and the cached features live in host memory, so alignment trains on the CPU (gloo under torchrun).

Run layout: `RUN/config.json`, `RUN/metrics.jsonl` (loss, lr, scale per step; val_loss at each evaluation),
`RUN/checkpoints/step-N/` (train/checkpoint.py: safetensors weights + optimiser, atomic), `RUN/best/` (lowest val
loss) and `RUN/final/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from astrolom.align.encoder import (
    BEST_DIR,
    MODEL_TYPE,
    image_token_features,
    load_encoder,
    spectrum_token_features,
)
from astrolom.align.features import (
    DEFAULT_NOISE,
    DEFAULT_TOKENS,
    DEFAULT_VIEWS,
    FeatureCache,
    augment,
    extract_features,
)
from astrolom.align.model import AlignConfig, AlignModel
from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.data.records import Record
from astrolom.log import progress as progress_bar
from astrolom.train import checkpoint as ckpt
from astrolom.train import parallel
from astrolom.train.engine import CheckpointManager, LRSchedule
from astrolom.train.fault import AFTER_STEP, fault_point
from astrolom.train.logging import MetricsLogger

FEATURES_NAME = "features.safetensors"


@dataclass
class AlignTrainConfig:
    """Alignment run settings (saved in RUN/config.json)."""

    image_model: str = ""  # images-only AstroPT RUN or model directory
    spectrum_model: str = ""  # spectra-only AstroPT RUN or model directory
    data: str = ""  # data set with images and spectra
    out: str = ""  # RUN directory
    steps: int = 500
    batch_size: int = 128  # global batch (split over ranks); the negatives of each positive
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 50
    checkpoint_interval: int = 100
    seed: int = 0
    finetune_backbones: bool = False
    backbone_lr: float = 5e-5  # encoders' learning rate with finetune_backbones (AstroCLIP: much lower than heads)
    views: int = DEFAULT_VIEWS
    noise: float = DEFAULT_NOISE
    tokens: int = DEFAULT_TOKENS
    progress: bool = True
    head: AlignConfig = field(default_factory=AlignConfig)

    def __post_init__(self):
        if isinstance(self.head, dict):
            self.head = AlignConfig(**self.head)
        for name in ("steps", "batch_size", "eval_interval"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.backbone_lr <= 0:
            raise ValueError("learning rates must be positive")


class _Backbones(nn.Module):
    """The two encoders, trained live when fine-tuning."""

    def __init__(self, image_model: str, spectrum_model: str):
        super().__init__()
        from astrolom.eval.multimodal import spectrum_tokeniser_from_config

        image, spectrum = load_encoder(image_model, modality=IMAGES), load_encoder(spectrum_model, modality=SPECTRA)
        self.image, self.image_cfg, self.spectrum = image.model, image.config, spectrum.model
        self.tokeniser = spectrum_tokeniser_from_config(spectrum.config)


class AlignTrainer:
    """Owns the heads, optimiser, data order and checkpoints of one alignment run."""

    def __init__(self, cfg: AlignTrainConfig, *, resume: bool = False, env: parallel.DistEnv | None = None):
        if not cfg.out:
            raise ValueError("an alignment run needs an output directory (--out)")
        self.cfg, self.out = cfg, Path(cfg.out)
        self.env = env or parallel.init_distributed("cpu")
        if cfg.batch_size % self.env.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {self.env.world_size} ranks")
        self.cache = self._features()
        self.train_rows = self.cache.rows("train")
        self.val_rows = self.cache.rows("val")
        if len(self.train_rows) < cfg.batch_size:
            raise ValueError(f"{len(self.train_rows)} training pairs is fewer than one batch of {cfg.batch_size}")
        torch.manual_seed(cfg.seed)
        head_cfg = dataclasses.replace(
            cfg.head, image_dim=self.cache.image_tokens.shape[-1], spectrum_dim=self.cache.spectrum_tokens.shape[-1]
        )
        self.cfg.head = head_cfg
        self.model = AlignModel(head_cfg)
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": cfg.lr}]
        self.backbones = None
        if cfg.finetune_backbones:
            self.backbones = _Backbones(cfg.image_model, cfg.spectrum_model).train()
            groups.append({"params": list(self.backbones.parameters()), "lr": cfg.backbone_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.schedule = LRSchedule(
            self.optimizer, warmup=cfg.warmup_steps, decay=cfg.steps, min_ratio=cfg.min_lr_ratio, ramp_to_peak=True
        )
        self.module, _ = parallel.parallelize(_Joint(self.model, self.backbones), self.env, strategy="ddp")
        self.checkpoints = CheckpointManager(self.out, enabled=self.env.is_main)
        self.step, self.best_val = 0, math.inf
        self.resumed = False
        if resume:
            self._resume()

    # ---------------------------------------------------------------------------------------------- data

    def _features(self) -> FeatureCache:
        """RUN/features.safetensors, extracted by rank 0 on first use (barrier) and reused on resume."""
        path = self.out / FEATURES_NAME
        if not path.is_file():
            for name in ("image_model", "spectrum_model", "data"):
                if not getattr(self.cfg, name):
                    raise ValueError(f"no {path} yet: --{name.replace('_', '-')} is needed to build it")
            if self.env.is_main:
                cache = extract_features(
                    self.cfg.image_model,
                    self.cfg.spectrum_model,
                    self.cfg.data,
                    views=self.cfg.views,
                    noise=self.cfg.noise,
                    n_tokens=self.cfg.tokens,
                    seed=self.cfg.seed,
                    progress=self.cfg.progress,
                )
                cache.save(path)
            parallel.barrier(self.env)
        return FeatureCache.load(path)

    def batch_rows(self, step: int) -> np.ndarray:
        """Global batch of step `step` (0-based): consecutive slices of a per-epoch permutation of (seed, epoch)."""
        n, b = len(self.train_rows), self.cfg.batch_size
        per_epoch = n // b  # the last partial batch of an epoch is dropped: every batch has b negatives
        epoch, pos = divmod(step, per_epoch)
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
        return self.train_rows[perm[pos * b : (pos + 1) * b]]

    def _local(self, rows: np.ndarray) -> np.ndarray:
        per = len(rows) // self.env.world_size
        return rows[self.env.rank * per : (self.env.rank + 1) * per]

    def batch_views(self, step: int, n: int) -> np.ndarray:
        """Image view of each of the n objects of step `step`'s global batch (drawn from (seed, step))."""
        return np.random.default_rng([self.cfg.seed, step, 1]).integers(0, self.cache.image_tokens.shape[1], n)

    def _inputs(
        self, rows: np.ndarray, views: np.ndarray, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image token features, spectrum token features, spectrum mask) of `rows` with image `views`."""
        c = self.cache
        if self.backbones is None:
            idx = torch.from_numpy(rows)
            return c.image_tokens[idx, torch.from_numpy(views)], c.spectrum_tokens[idx], c.spectrum_mask[idx]
        sigma = np.asarray(c.meta["sky_sigma"], dtype=np.float32)
        # the noise of a fine-tuning step: from (seed, step, rank) — each rank augments its own objects
        rng = np.random.default_rng([self.cfg.seed, step, 2, self.env.rank])
        recs = [
            Record(object_id=c.object_ids[r], image=augment(c.images[r].numpy(), int(v), sigma, self.cfg.noise, rng))
            for r, v in zip(rows, views, strict=True)
        ]
        bb = self.backbones
        with torch.set_grad_enabled(self.module.training):
            img = _with_grad(image_token_features, bb.image, bb.image_cfg, recs, self.cfg.tokens)
            spec, mask = _with_grad(
                spectrum_token_features,
                bb.spectrum,
                bb.tokeniser,
                [c.spectra[r].numpy() for r in rows],
                [c.object_ids[r] for r in rows],
            )
        return img, spec, mask

    # ---------------------------------------------------------------------------------------------- steps

    def train_step(self) -> dict:
        self.module.train()
        lr = self.schedule.apply(self.step)
        rows = self.batch_rows(self.step)
        views = self.batch_views(self.step, len(rows))
        loss = self.module(*self._inputs(self._local(rows), self._local(views), self.step))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        global_loss = parallel.all_reduce_sum(loss.detach().clone(), self.env) / self.env.world_size
        self.step += 1
        return {
            "step": self.step,
            "loss": float(global_loss),
            "lr": lr,
            "scale": float(self.model.loss.scale),
        }

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean InfoNCE over val batches of `batch_size` (view 0, no gathering: every rank computes the same)."""
        rows, b = self.val_rows, self.cfg.batch_size
        if len(rows) < 2:
            return None
        self.module.eval()
        losses, weights = [], []
        for i in range(0, len(rows), b):
            chunk = rows[i : i + b]
            if len(chunk) < 2:
                continue
            img, spec, mask = self._inputs(chunk, np.zeros(len(chunk), dtype=int), 0)
            if self.backbones is not None:
                img, spec = img.detach(), spec.detach()
            a = self.model.image_head(img)
            s = self.model.spectrum_head(spec, mask)
            losses.append(float(self.model.loss(a, s, gather=False)) * len(chunk))
            weights.append(len(chunk))
        return sum(losses) / sum(weights)

    # ---------------------------------------------------------------------------------------------- checkpoints

    def config_json(self) -> dict:
        cfg = dataclasses.asdict(self.cfg)
        return {
            "model_type": MODEL_TYPE,
            "align": cfg["head"],
            "train": {k: v for k, v in cfg.items() if k != "head"},
            "features": self.cache.meta,
            "world_size": self.env.world_size,
        }

    def _model_state(self) -> dict[str, torch.Tensor]:
        return parallel.unwrap(self.module).state_dict()

    def state_dict(self) -> dict:
        """Step and best validation loss: every batch, view and noise draw is a function of (seed, step)."""
        return {"step": self.step, "best_val": self.best_val}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best_val = int(state["step"]), float(state["best_val"])

    def save_checkpoint(self) -> Path | None:
        """RUN/checkpoints/step-N (written by the main rank; None elsewhere)."""
        if not self.env.is_main:
            return None
        return self.checkpoints.save(
            self.step,
            model_state=self._model_state(),
            optimizer_state=self.optimizer.state_dict(),
            trainer_state=self.state_dict(),
            config_json=self.config_json(),
        )

    def save_model(self, name: str) -> Path:
        """RUN/<name>/: config.json + model.safetensors (heads, and encoders when fine-tuned), atomically."""
        with ckpt.atomic_directory(self.out / name) as tmp:
            (tmp / ckpt.CONFIG_NAME).write_text(json.dumps(self.config_json(), indent=2) + "\n")
            state = {k: v.detach().cpu().float().contiguous() for k, v in self._model_state().items()}
            save_file(state, str(tmp / ckpt.WEIGHTS_NAME), metadata={"format": "pt"})
        return self.out / name

    def _resume(self) -> None:
        loaded = self.checkpoints.load_latest()
        if loaded is None:
            return  # nothing saved yet: start from scratch
        parallel.unwrap(self.module).load_state_dict(loaded["model"])
        self.optimizer.load_state_dict(loaded["optimizer"])
        self.load_state_dict(loaded["trainer"])
        self.resumed = True

    # ---------------------------------------------------------------------------------------------- loop

    def fit(self) -> dict:
        main = self.env.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / ckpt.CONFIG_NAME).write_text(json.dumps(self.config_json(), indent=2) + "\n")
        metrics = MetricsLogger(
            self.out, enabled=main, resume_step=self.step if self.resumed else None, tensorboard=False, columns=None
        )
        bar = progress_bar(
            self.cfg.steps, initial=self.step, desc="align", unit="step", enabled=main and self.cfg.progress
        )
        last: dict = {}
        try:
            while self.step < self.cfg.steps:
                last = self.train_step()
                if self.step % self.cfg.eval_interval == 0 or self.step == self.cfg.steps:
                    val = self.evaluate()
                    if val is not None:
                        last["val_loss"] = val
                        if val < self.best_val:
                            self.best_val = val
                            if main:
                                self.save_model(BEST_DIR)
                metrics.log(last)
                if main:
                    shown = {k: f"{v:.3f}" for k, v in last.items() if k in ("loss", "val_loss")}
                    bar.set_postfix(shown, refresh=False)
                bar.update(1)
                if self.cfg.checkpoint_interval and self.step % self.cfg.checkpoint_interval == 0:
                    self.save_checkpoint()
                if main:
                    fault_point(AFTER_STEP, self.step)
        finally:
            bar.close()
            metrics.close()
        if main:
            self.save_model(ckpt.FINAL_DIR)
            if not (self.out / BEST_DIR).exists():
                self.save_model(BEST_DIR)
        parallel.barrier(self.env)
        return {**last, "best_val_loss": self.best_val}


class _Joint(nn.Module):
    """Heads + (fine-tuned) encoders as one module, so DDP synchronises every trained parameter."""

    def __init__(self, model: AlignModel, backbones: _Backbones | None):
        super().__init__()
        self.model = model
        if backbones is not None:
            self.backbones = backbones

    def forward(self, img: torch.Tensor, spec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(img, spec, mask)


def _with_grad(fn, *args):
    """Call a feature extractor decorated with no_grad with gradients on (fine-tuning the encoders)."""
    return fn.__wrapped__(*args) if hasattr(fn, "__wrapped__") else fn(*args)


def train_align(cfg: AlignTrainConfig, *, resume: bool = False) -> dict:
    """Python API of `astrolom align`: train (or resume) an alignment run; returns the last metrics."""
    trainer = AlignTrainer(cfg, resume=resume)
    try:
        return trainer.fit()
    finally:
        parallel.destroy_distributed()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = AlignTrainConfig()
    parser.add_argument("--image-model", required=True, help="images-only AstroPT RUN (the image encoder)")
    parser.add_argument(
        "--spectrum-model",
        required=True,
        help="spectra-only AstroPT RUN (model.modalities=spectra), or an images + spectra RUN that trained with "
        "spectra first (modality_order=random): read on spectra alone",
    )
    parser.add_argument("--data", required=True, help="data set with images and spectra (e.g. an astrolom survey)")
    parser.add_argument("--out", required=True, help="RUN directory for features, checkpoints, best/ and final/")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (default {d.steps})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch = negatives per positive")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"heads' peak learning rate (default {d.lr})")
    parser.add_argument("--embed-dim", type=int, default=d.head.embed_dim, help="shared space width (default 512)")
    parser.add_argument("--logit-scale", type=float, default=d.head.logit_scale, help="fixed (or initial) scale")
    parser.add_argument("--learnable-scale", action="store_true", help="learn the logit scale (it enters the loss)")
    parser.add_argument("--finetune-backbones", action="store_true", help="also train both encoders (lower LR)")
    parser.add_argument("--backbone-lr", type=float, default=d.backbone_lr, help="encoders' learning rate")
    parser.add_argument("--views", type=int, default=d.views, help="cached image views (D4 elements + noise)")
    parser.add_argument("--eval-interval", type=int, default=d.eval_interval)
    parser.add_argument("--checkpoint-interval", type=int, default=d.checkpoint_interval)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--resume", action="store_true", help="continue RUN from its latest checkpoint")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    head = AlignConfig(embed_dim=args.embed_dim, logit_scale=args.logit_scale, learnable_scale=args.learnable_scale)
    cfg = AlignTrainConfig(
        image_model=args.image_model,
        spectrum_model=args.spectrum_model,
        data=args.data,
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        finetune_backbones=args.finetune_backbones,
        backbone_lr=args.backbone_lr,
        views=args.views,
        eval_interval=args.eval_interval,
        checkpoint_interval=args.checkpoint_interval,
        seed=args.seed,
        progress=not args.no_progress,
        head=head,
    )
    res = train_align(cfg, resume=args.resume)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))
    return 0
