"""Fine-tune a pretrained AstroPT on labelled galaxies (Zoobot's workflow): `astrolom finetune` and `Finetuner`.

    astrolom finetune --model RUN --data DIR --targets smooth,disc,spiral --out FT [--lora-r 8 | --full | --head-only]

    from astrolom.finetune import FinetuneConfig, Finetuner
    result = Finetuner(FinetuneConfig(model="RUN", data="DIR", targets=("smooth", "disc"), out="FT")).fit()

Data. The labelled objects of the training split (optionally a seeded subset of `n_labels` of them) and of the
validation split are read once with the project's readers and held in memory as centre crops covering the tokens the
model embeds (a labelled set is thousands to a few hundred thousand stamps; pretraining-scale unlabelled data goes
through `astrolom pretrain`'s stream instead). Each step tokenises its batch (`astrolom.data.tokens`) after a random
90-degree rotation and flip per galaxy. Without a validation split (`val_split=None`) a seeded `val_fraction` of the
labels is held out.

Training (the shared engine, `astrolom.train.engine`). AdamW with linear warm-up and cosine decay to `min_lr_ratio`,
gradient clipping at 1, `epochs` passes (or `max_steps`), validation loss after every epoch, early stopping after
`patience` epochs without improvement; the best weights are restored at the end. Targets and losses:
`astrolom.finetune.targets`; modes (LoRA via peft, head-only, full): `astrolom.finetune.model`.

Checkpoints and resume. Every `checkpoint_every` steps and at every epoch end `OUT/checkpoints/step-XXXXXX/` is
written atomically (`astrolom.train.engine.CheckpointManager`): `model.safetensors` (every weight, adapters and
head included), `optimizer.safetensors` + `trainer_state.json` (optimiser, best weights so far, augmentation generator,
python/numpy/torch RNG states, step, epoch, position in the epoch, early-stopping counters). `--resume` continues
from the latest one exactly: the batches of an epoch are a permutation drawn from (seed, epoch), so the same steps
see the same galaxies, augmentations and dropout masks and give the same losses; `metrics.jsonl` is cut back to the
resumed step.

Output (`OUT/final/`, written atomically): `backbone/` (the adapted AstroPT with LoRA merged, in the pretrained
layout: `astrolom embed --model OUT/final/backbone` works), `head.safetensors`, `finetune.json` (configuration,
target encoding, best epoch, validation loss and test scores). `OUT/metrics.jsonl` has one row per step and per
epoch. `load_finetuned(OUT)` returns a model ready for `predict`.
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
from safetensors.torch import load_file, save_file

from astrolom import layout
from astrolom.data import tokens as tok
from astrolom.data.augment import d4_batch, turns_then_mirror
from astrolom.data.sources import open_source
from astrolom.data.stream import RecordStream
from astrolom.eval import probes
from astrolom.eval.embed import DEFAULT_LAYER, DEFAULT_TOKENS
from astrolom.finetune.model import MODES, FinetuneModel, flux_features
from astrolom.finetune.targets import REGRESSION_LOSSES, Targets
from astrolom.log import get_logger
from astrolom.log import progress as progress_bar
from astrolom.model import pretrained
from astrolom.train import checkpoint as train_ckpt
from astrolom.train import parallel
from astrolom.train.engine import CheckpointManager, EarlyStopping, LRSchedule
from astrolom.train.fault import AFTER_STEP, fault_point
from astrolom.train.logging import MetricsLogger

_log = get_logger(__name__)

FINAL_DIR = layout.FINAL_DIR
BACKBONE_DIR = "backbone"
HEAD_NAME = "head.safetensors"
RESULT_NAME = "finetune.json"


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on (saved with its checkpoints and output)."""

    model: str  # RUN or model directory of the pretrained AstroPT
    data: str  # labelled data set (any format astrolom reads)
    targets: tuple[str, ...]  # label columns to predict
    out: str | None = None  # run directory; None: nothing written
    mode: str = "lora"  # lora | full | head
    lora_r: int = 8
    lora_alpha: float | None = None  # default 2 * lora_r
    lr: float = 1e-3  # head and adapters
    backbone_lr: float = 1e-4  # backbone weights in full mode
    weight_decay: float = 0.01
    dropout: float = 0.1  # before the head's linear layer
    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 32
    patience: int = 5  # epochs without a better validation loss before stopping
    warmup: float = 0.05  # fraction of the steps
    min_lr_ratio: float = 0.1  # the cosine's floor, a fraction of each learning rate
    regression_loss: str = "mse"  # mse | huber
    vote_counts: bool = True  # Dirichlet-multinomial on vote counts where the data has them
    classify: tuple[str, ...] = ()
    n_labels: int | None = None  # train on a seeded subset of this many labelled training objects
    train_split: str = "train"
    val_split: str | None = "val"  # None: hold out val_fraction of the training labels
    val_fraction: float = 0.15
    max_val: int | None = 2000  # validation objects used for early stopping
    test_split: str | None = "test"  # scored at the end with the best weights (None: skip)
    layer: int = DEFAULT_LAYER
    n_tokens: int = DEFAULT_TOKENS
    augment: bool = True
    flux: bool = True  # the head also sees square-aperture fluxes (see astrolom.finetune.model)
    random_init: bool = False  # the control: same architecture, freshly initialised backbone
    seed: int = 0
    device: str | None = None
    precision: str = "auto"
    checkpoint_every: int | None = None  # steps; checkpoints are also written at every epoch end
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets, self.classify = tuple(self.targets), tuple(self.classify)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.regression_loss not in REGRESSION_LOSSES:
            raise ValueError(f"regression_loss must be one of {REGRESSION_LOSSES}, got {self.regression_loss!r}")
        for name in ("epochs", "batch_size", "lora_r", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_labels is not None and self.n_labels < 2:
            raise ValueError(f"n_labels must be at least 2, got {self.n_labels}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.backbone_lr <= 0:
            raise ValueError("learning rates must be positive")

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# ------------------------------------------------------------------------------------------------------- data


@dataclass
class LabelledSet:
    """Centre-cropped images (N, h, w, C) float32 with their labels and ids, in file order, and the data set's
    metadata (`vote_volunteers` for vote targets)."""

    images: np.ndarray
    labels: dict[str, np.ndarray]
    object_id: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> LabelledSet:
        idx = np.asarray(idx)
        labels = {k: v[idx] for k, v in self.labels.items()}
        return LabelledSet(self.images[idx], labels, self.object_id[idx], self.meta)


def _label_array(values: list) -> np.ndarray:
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return np.asarray(values, dtype=bool)
    try:
        return np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return np.asarray(["" if v is None else str(v) for v in values], dtype=object)


def crop_size(height: int, width: int, patch_size: int, n_tokens: int, block_size: int) -> tuple[int, int]:
    """Centre crop of a stamp holding the spiral tokens the model embeds (as `astrolom embed` crops)."""
    h, w = height - height % patch_size, width - width % patch_size
    n = min(n_tokens, block_size, (h // patch_size) * (w // patch_size))
    return tok.prefix_crop(h, w, patch_size, n)


def load_labelled(
    source, split: str, patch_size: int, n_tokens: int, block_size: int, *, limit: int | None = None, desc: str = ""
) -> LabelledSet:
    """Read one split of an open source into memory, images centre-cropped to the embedded tokens."""
    images, ids, labels = [], [], []
    crop = None
    total = source.split_counts().get(split, 0) if limit is None else min(limit, source.split_counts().get(split, 0))
    bar = progress_bar(total, desc=desc or f"read {split}", unit="img", leave=False, enabled=total >= 2000)
    for rec in RecordStream(source, split=split, shuffle=False, epochs=1):
        img = np.asarray(rec.image, np.float32)
        if crop is None:
            crop = crop_size(img.shape[0], img.shape[1], patch_size, n_tokens, block_size)
        h, w = crop
        if img.shape[0] < h or img.shape[1] < w:
            raise ValueError(
                f"record {rec.object_id}: image of {img.shape[0]}x{img.shape[1]} px is smaller than {h}x{w}"
            )
        top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
        images.append(img[top : top + h, left : left + w])
        ids.append(str(rec.object_id))
        labels.append(rec.labels)
        bar.update(1)
        if limit is not None and len(images) >= limit:
            break
    bar.close()
    if not images:
        raise ValueError(
            f"{source.location if hasattr(source, 'location') else 'the data'}: no records in split {split!r}"
        )
    names = list(dict.fromkeys(k for lab in labels for k in lab))
    cols = {k: _label_array([lab.get(k) for lab in labels]) for k in names}
    return LabelledSet(np.stack(images), cols, np.asarray(ids, dtype=object), dict(source.metadata))


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random one of the 8 rotations/flips per galaxy (B, H, W, C); galaxies have no preferred orientation."""
    if images.shape[1] != images.shape[2]:
        return images  # rotations only keep square stamps in shape
    turns = torch.randint(4, (len(images),), generator=gen)
    mirror = torch.randint(2, (len(images),), generator=gen).bool()
    return d4_batch(images, turns_then_mirror(turns, mirror), axes=(1, 2))


# ---------------------------------------------------------------------------------------------------- trainer


@dataclass
class FinetuneResult:
    """What `fit` returns (also written to OUT/final/finetune.json)."""

    best_epoch: int
    best_val_loss: float
    steps: int
    epochs_run: int
    stopped_early: bool
    test_scores: dict[str, dict[str, float]]
    n_train: int
    n_val: int
    trainable_params: int
    total_params: int
    seconds: float
    out: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Finetuner:
    """Owns a fine-tuning run: model, optimiser, data, position, early stopping; see the module docstring."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        *,
        train: LabelledSet | None = None,
        val: LabelledSet | None = None,
        test: LabelledSet | None = None,
        resume: bool = False,
        log=_log.info,
    ):
        self.cfg = cfg
        self.log = log or (lambda *_: None)
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = parallel.resolve_precision(cfg.precision, self.device)
        parallel.configure_backends(self.device)
        backbone, meta = pretrained.load_model(cfg.model, random_init=cfg.random_init, seed=cfg.seed)
        self.model_meta = meta
        mc = backbone.config
        self.patch_size = mc.patch_size
        self.train, self.val, self.test = self._data(train, val, test, meta, mc.block_size)
        self.targets = Targets.build(
            list(cfg.targets),
            self.train.labels,
            votes=cfg.vote_counts,
            classify=cfg.classify,
            regression_loss=cfg.regression_loss,
            voters=self.train.meta.get("vote_volunteers"),
            where=cfg.data,
        )
        self.y_train = self.targets.encode(self.train.labels)
        self.y_val = self.targets.encode(self.val.labels)
        torch.manual_seed(cfg.seed)  # the head's initialisation
        n_flux = 0
        if cfg.flux:
            probe = torch.from_numpy(self.train.images[:1])
            n_flux = flux_features(probe, mc.patch_size, cfg.n_tokens, torch.ones(mc.n_chan)).shape[1]
        self.model = FinetuneModel(backbone, self.targets.n_outputs, layer=cfg.layer, n_tokens=cfg.n_tokens,
                                   dropout=cfg.dropout, n_flux=n_flux)  # fmt: skip
        self.model.set_flux_statistics(self.train.images)
        self.model.configure(cfg.mode, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
        self.model.to(self.device)
        lr_backbone = cfg.lr if cfg.random_init else cfg.backbone_lr  # nothing to preserve in a random backbone
        self.optimizer = torch.optim.AdamW(self.model.param_groups(cfg.lr, lr_backbone, cfg.weight_decay))
        self.steps_per_epoch = math.ceil(len(self.train) / cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.schedule = LRSchedule(
            self.optimizer,
            warmup=max(1, int(cfg.warmup * self.total_steps)),
            decay=self.total_steps,
            min_ratio=cfg.min_lr_ratio,
            ramp_to_peak=True,
        )
        self.aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
        # the run's position and early-stopping state (all of it goes into checkpoints)
        self.step = 0
        self.epoch = 0
        self.early = EarlyStopping(cfg.patience, min_delta=1e-6, snapshot=FinetuneModel.trainable_state)
        self.out = Path(cfg.out) if cfg.out else None
        self.checkpoints = CheckpointManager(self.out or ".", keep_last=cfg.keep_checkpoints, enabled=bool(self.out))
        self.resumed = False
        if resume:
            self._resume()

    # ------------------------------------------------------------------------------------------------ data

    def _data(self, train, val, test, meta, block_size):
        cfg = self.cfg
        if train is None or (val is None and cfg.val_split) or (test is None and cfg.test_split):
            settings = dict(meta.get("split_settings") or {})
            if "split_fractions" in settings:
                settings["split_fractions"] = tuple(settings["split_fractions"])
            source = open_source(cfg.data, spectra=False, **settings)
            try:
                counts = source.split_counts()
                read = lambda split, limit=None: load_labelled(  # noqa: E731
                    source, split, self.patch_size, cfg.n_tokens, block_size, limit=limit, desc=f"read {split}"
                )
                if train is None:
                    if counts.get(cfg.train_split, 0) == 0:
                        raise ValueError(f"{cfg.data}: no objects in the training split {cfg.train_split!r}")
                    train = read(cfg.train_split)
                if val is None and cfg.val_split:
                    if counts.get(cfg.val_split, 0) == 0:
                        raise ValueError(f"{cfg.data}: no objects in the validation split {cfg.val_split!r}")
                    val = read(cfg.val_split, cfg.max_val)
                if test is None and cfg.test_split and counts.get(cfg.test_split, 0):
                    test = read(cfg.test_split)
            finally:
                source.close()
        rng = np.random.default_rng(cfg.seed)
        if cfg.n_labels is not None:
            if cfg.n_labels > len(train):
                raise ValueError(f"n_labels={cfg.n_labels} but the training split has {len(train)} objects")
            train = train.subset(np.sort(rng.permutation(len(train))[: cfg.n_labels]))
        if val is None:
            perm = rng.permutation(len(train))
            n_val = max(1, int(round(cfg.val_fraction * len(train))))
            val, train = train.subset(np.sort(perm[:n_val])), train.subset(np.sort(perm[n_val:]))
        return train, val, test

    def _batch_images(self, images: np.ndarray, augment: bool) -> torch.Tensor:
        x = torch.from_numpy(images)
        return _augment(x, self.aug_gen) if augment else x

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.train), generator=torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch))

    # ------------------------------------------------------------------------------------------------ steps

    def train_step(self, idx: torch.Tensor) -> float:
        self.model.train()
        self.schedule.apply(self.step)
        images = self._batch_images(self.train.images[idx.numpy()], self.cfg.augment)
        y = {k: v[idx].to(self.device) for k, v in self.y_train.items()}
        with parallel.autocast(self.precision, self.device):
            out = self.model.forward_images(images)
        loss, _ = self.targets.loss(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def outputs(self, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """Head outputs (N, n_outputs) for centre-cropped images, in eval mode, without augmentation."""
        self.model.eval()
        outs = []
        for i in range(0, len(images), batch_size):
            with parallel.autocast(self.precision, self.device):
                outs.append(self.model.forward_images(torch.from_numpy(images[i : i + batch_size])).float().cpu())
        return torch.cat(outs)

    @torch.no_grad()
    def val_loss(self) -> float:
        out = self.outputs(self.val.images)
        loss, _ = self.targets.loss(out, self.y_val)
        return float(loss)

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """{target: predictions} for centre-cropped images (see `load_labelled`)."""
        return self.targets.predict(self.outputs(images))

    def score(self, data: LabelledSet) -> dict[str, dict[str, float]]:
        """Metrics per target on a labelled set (R2/MAE for regression and vote fractions; accuracy/F1 for classes)."""
        preds = self.predict(data.images)
        out = {}
        for name in self.targets.names:
            kind = self.targets.metric_kind(name)
            y = data.labels[name]
            if kind == probes.CLASSIFICATION:
                ok = np.asarray([str(v) != "" for v in y])
                y_true = np.asarray([str(v) for v in y])
            else:
                y_true = np.asarray(y, np.float64)
                ok = np.isfinite(y_true)
            out[name] = probes.score(y_true[ok], preds[name][ok], kind, name)
        return out

    # ------------------------------------------------------------------------------------------------- fit

    def fit(self) -> FinetuneResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in self.model.parameters())
        self.log(
            f"fine-tuning ({cfg.mode}{', random init' if cfg.random_init else ''}) on {len(self.train)} labelled "
            f"objects (val {len(self.val)}): {n_train:,} of {n_total:,} parameters train; targets "
            + ", ".join(f"{s.name} [{s.kind}]" for s in self.targets.specs)
        )
        bar = progress_bar(self.total_steps, initial=self.step, desc="finetune", unit="step", enabled=cfg.progress)
        metrics = MetricsLogger(
            self.out or ".",
            enabled=self.out is not None,
            resume_step=self.step if self.resumed else None,
            tensorboard=False,
            columns=None,
        )
        try:
            while self.step < self.total_steps and not self.early.stop:
                order = self._epoch_order(self.epoch)
                first = self.step - self.epoch * self.steps_per_epoch  # > 0 when resuming mid-epoch
                for b in range(first, self.steps_per_epoch):
                    if self.step >= self.total_steps:
                        break
                    idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                    loss = self.train_step(idx)
                    metrics.log({"step": self.step, "epoch": self.epoch, "loss": loss})
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", val=f"{self.early.best:.4f}", refresh=False)
                    end_of_epoch = b == self.steps_per_epoch - 1 or self.step >= self.total_steps
                    if end_of_epoch:
                        metrics.log(self._end_epoch())
                    if end_of_epoch or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                        self.save_checkpoint()
                    fault_point(AFTER_STEP, self.step)
                    if end_of_epoch:
                        break
        finally:
            bar.close()
            metrics.close()
        self.early.restore(self.model, strict=False)
        scores = self.score(self.test) if self.test is not None else {}
        result = FinetuneResult(
            best_epoch=self.early.best_at,
            best_val_loss=self.early.best,
            steps=self.step,
            epochs_run=self.epoch,
            stopped_early=self.early.stop,
            test_scores=scores,
            n_train=len(self.train),
            n_val=len(self.val),
            trainable_params=n_train,
            total_params=n_total,
            seconds=time.perf_counter() - t0,
            out=str(self.out) if self.out else None,
        )
        if self.out is not None:
            self.save_final(result)
        return result

    def _end_epoch(self) -> dict:
        """Validate, update early stopping, move to the next epoch; returns the epoch's metrics row."""
        val = self.val_loss()
        row = {"step": self.step, "epoch": self.epoch, "val_loss": val}
        if self.early.update(val, self.model, at=self.epoch):
            row["best"] = True
        self.epoch += 1
        return row

    # -------------------------------------------------------------------------------------- checkpointing

    def config_json(self) -> dict:
        return {
            "model_type": "astrolom-finetune",
            "finetune": self.cfg.to_json(),
            "targets": self.targets.to_json(),
            "backbone": dataclasses.asdict(self.model.backbone.config),
            "backbone_source": self.model_meta.get("model"),
        }

    def state_dict(self) -> dict:
        """Position, early-stopping state, augmentation generator and RNG states (the optimiser travels beside)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "early_stopping": self.early.state_dict(),
            "aug_gen": self.aug_gen.get_state(),
            "rng": train_ckpt.capture_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.early.load_state_dict(state["early_stopping"])
        self.aug_gen.set_state(state["aug_gen"].cpu())
        train_ckpt.restore_rng_state(state["rng"])

    def save_checkpoint(self) -> Path | None:
        """OUT/checkpoints/step-N (nothing without an output directory)."""
        state = self.state_dict()
        # tensors (best weights, generator state) go to the safetensors file beside the optimiser's
        tensors = {"optimizer": self.optimizer.state_dict(), "best_state": state["early_stopping"].pop("best_state"),
                   "aug_gen": state.pop("aug_gen")}  # fmt: skip
        return self.checkpoints.save(
            self.step,
            model_state=self.model.state_dict(),
            optimizer_state=tensors,
            trainer_state=state,
            config_json=self.config_json(),
        )

    def _resume(self) -> None:
        loaded = self.checkpoints.load_latest(self.device) if self.out is not None else None
        if loaded is None:
            raise FileNotFoundError(f"nothing to resume: no complete checkpoint under {self.out}/checkpoints")
        path, saved = loaded["path"], loaded["config"]["finetune"]
        mine = self.cfg.to_json()
        defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
        # a setting added after the checkpoint was written counts as its default
        changed = [k for k in mine if k not in ("progress", "device", "out") and saved.get(k, defaults[k]) != mine[k]]
        if changed:
            raise ValueError(f"{path}: cannot resume with a different configuration ({', '.join(changed)} differ)")
        self.model.load_state_dict(loaded["model"], strict=True)
        tensors, state = loaded["optimizer"], loaded["trainer"]
        if "early_stopping" not in state:  # written before the shared engine (2026-12-04)
            state["early_stopping"] = {"best": state["best_val"], "best_at": state["best_epoch"],
                                       "since": state["since_best"], "stop": state["stopped_early"]}  # fmt: skip
            tensors["best_state"] = tensors.pop("best")
        self.optimizer.load_state_dict(tensors["optimizer"])
        state["early_stopping"]["best_state"] = tensors["best_state"]
        self.load_state_dict(dict(state, aug_gen=tensors["aug_gen"]))
        self.resumed = True
        self.log(f"resumed from {path} (step {self.step}, epoch {self.epoch})")

    def save_final(self, result: FinetuneResult) -> Path:
        target = self.out / FINAL_DIR
        with layout.atomic_directory(target) as tmp:
            backbone = self.model.merged_backbone()
            pretrained.save_pretrained(backbone, tmp / BACKBONE_DIR)
            head = {k: v.detach().cpu().contiguous() for k, v in self.model.head.state_dict().items()}
            save_file(head, str(tmp / HEAD_NAME))
            (tmp / RESULT_NAME).write_text(json.dumps(dict(self.config_json(), result=result.to_json()), indent=2))
        return target


# ------------------------------------------------------------------------------------------------- loading


def load_finetuned(path: str | Path, device: str = "cpu") -> tuple[FinetuneModel, Targets, dict]:
    """(model in eval mode, targets, finetune.json) from OUT or OUT/final; `Targets.predict(model(tokens))`."""
    path = Path(path)
    final = path / FINAL_DIR if (path / FINAL_DIR / RESULT_NAME).is_file() else path
    if not (final / RESULT_NAME).is_file():
        raise FileNotFoundError(f"{path}: no {RESULT_NAME} (not a finished astrolom finetune run)")
    info = json.loads((final / RESULT_NAME).read_text())
    backbone, _ = pretrained.load_model(str(final / BACKBONE_DIR))
    targets = Targets.from_json(info["targets"])
    cfg = info["finetune"]
    head = load_file(str(final / HEAD_NAME), device=device)
    model = FinetuneModel(backbone, targets.n_outputs, layer=cfg["layer"], n_tokens=cfg["n_tokens"],
                          n_flux=int(head["flux_mean"].numel()))  # fmt: skip
    model.head.load_state_dict(head)
    return model.to(device).eval(), targets, info


# ------------------------------------------------------------------------------------------------------ CLI


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
        classify=tuple(c.strip() for c in args.classify.split(",") if c.strip()),
        augment=not args.no_augment,
        flux=not args.no_flux,
        random_init=args.random_init,
        seed=args.seed,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )
