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

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from astrolom import layout
from astrolom.data.augment import d4_batch, turns_then_mirror
from astrolom.data.sources import open_source
from astrolom.eval import probes
from astrolom.eval.probe_estimators import CLASSIFICATION
from astrolom.finetune.config import FinetuneConfig
from astrolom.finetune.data import LabelledSet, load_labelled
from astrolom.finetune.model import FinetuneModel, flux_features
from astrolom.finetune.targets import Targets
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
            if kind == CLASSIFICATION:
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
