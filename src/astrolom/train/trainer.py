"""The pretraining loop: `Trainer` (the `astrolom pretrain` command and its config building are in
`astrolom.train.pretrain`).

The `Trainer` owns its state (model, AdamW, schedule, step, tokens seen, RNG, data position), checkpoints all of it
(see `astrolom.train.checkpoint` for the RUN layout) and resumes exactly: same batches, same losses, same weights.

Loop facts worth knowing:
- global batch = micro batch x accumulation steps x world size (every process on every node); each micro-step's
  loss is divided by the accumulation steps, and gradients are all-reduced only on the last micro-step (`no_sync`);
- record k of the training stream goes to rank k % world, so N ranks see exactly what one process would;
- validation reads `data.val_split` (never the training stream), the same `train.eval_samples` images every time;
- the logged loss is the global mean over all ranks and micro-steps; tokens counted are predicted tokens
  (T - 1 per stamp of T); FLOPs are 6 N + attention per token (`astrolom.model.flops`);
- a background thread tokenises the next batches (`data.prefetch`); the saved data position is that of the last
  batch used, so resume stays exact;
- SIGTERM (cluster preemption) finishes the current step, checkpoints and exits with status 143; `--resume` goes on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import torch

from astrolom import layout
from astrolom.config import save_yaml, to_dict
from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.data.multimodal import to_device
from astrolom.log import progress
from astrolom.model.astropt import AstroPT
from astrolom.model.flops import flops_per_token, mfu
from astrolom.model.pretrained import model_config_json, save_pretrained
from astrolom.train import checkpoint as ckpt
from astrolom.train import parallel
from astrolom.train.config import PretrainConfig, resolve_model_config
from astrolom.train.engine import CheckpointManager, LRSchedule
from astrolom.train.fault import AFTER_STEP, fault_point
from astrolom.train.logging import MetricsLogger
from astrolom.train.pretrain_data import PretrainData


def log_spaced_steps(max_steps: int, n: int) -> set[int]:
    """`n` checkpoint steps spaced evenly in log(step) from 1 to max_steps (fewer where they round together)."""
    if n <= 0:
        return set()
    return {int(s) for s in np.unique(np.round(np.logspace(0, math.log10(max_steps), n)).astype(int))}


def build_optimizer(model: torch.nn.Module, cfg: PretrainConfig, device: torch.device, fsdp: bool):
    """AdamW; weight decay on >= 2-D weights only (matrices and embeddings, not biases or LayerNorm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = cfg.optim.fused
    if fused is None:
        fused = device.type in ("cuda", "cpu") and not fsdp
    kw = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate(),
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        **kw,
    )


class Trainer:
    """Pretraining loop that owns its state; `fit()` runs to `train.max_steps`, checkpointing and logging."""

    def __init__(self, cfg: PretrainConfig, *, resume: bool = False, env: parallel.DistEnv | None = None):
        self.cfg = cfg
        self.env = env or parallel.init_distributed(cfg.train.device)
        if not cfg.train.out_dir:
            raise ValueError("no run directory: pass --out RUN (or train.out_dir=...)")
        self.run_dir = Path(cfg.train.out_dir)
        self.micro, self.accum = cfg.train.accumulation_steps(self.env.world_size)
        if (
            cfg.data.token_format == "bfloat16"
            and parallel.resolve_precision(cfg.train.precision, self.env.device) != "bf16"
        ):
            raise ValueError(
                "data.token_format=bfloat16 needs train.precision=bf16 (the model would see rounded tokens)"
            )
        if cfg.data.augment != "none" and cfg.data.token_format == "pixels":
            raise ValueError("data.augment=d4 transforms float tokens: use data.token_format=float32 or bfloat16")
        if cfg.data.augment != "none" and tuple(cfg.model.modalities) != (IMAGES,):
            raise ValueError(f"data.augment={cfg.data.augment} is for images-only models (spectra have no rotations)")
        if cfg.data.token_format != "float32" and tuple(cfg.model.modalities) != (IMAGES,):
            raise ValueError(
                f"data.token_format={cfg.data.token_format} is for images-only models; "
                f"model.modalities={','.join(cfg.model.modalities)} trains on float32 tokens"
            )
        self.data = PretrainData(cfg, self.env, self.micro, cfg.train.eval_samples if cfg.train.eval_interval else 0)

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model_config = resolve_model_config(
            cfg.model,
            patch_size=cfg.data.patch_size,
            n_chan=self.data.n_chan,
            # a multimodal sequence needs block_size >= its length (the images-only check is on stamp - 1)
            tokens_per_stamp=self.data.sequence_length + 1,
        )
        mc = self.model_config
        resolved_model = dataclasses.replace(
            cfg.model, n_layer=mc.n_layer, n_head=mc.n_head, n_embd=mc.n_embd, block_size=mc.block_size
        )
        self.cfg = cfg = dataclasses.replace(cfg, model=resolved_model)  # what RUN/config.yaml records
        model = AstroPT(self.model_config)
        self.n_params = model.num_params()  # non-embedding, for FLOPs
        self.seq_len = self.data.sequence_length
        self.precision = parallel.resolve_precision(cfg.train.precision, self.env.device)
        parallel.configure_backends(self.env.device)
        self.model, self.strategy = parallel.parallelize(
            model,
            self.env,
            strategy=cfg.train.parallel,
            precision=self.precision,
            compile=cfg.train.compile,
        )
        self.optimizer = build_optimizer(self.model, cfg, self.env.device, self.strategy == "fsdp")
        self.schedule = LRSchedule(
            self.optimizer,
            warmup=cfg.warmup_steps(),
            decay=cfg.decay_steps(),
            min_ratio=cfg.optim.min_lr_ratio,
            ramp_to_peak=False,
        )
        torch.manual_seed(cfg.train.seed + 1 + self.env.rank)  # per-rank stream (dropout), distinct from init

        self.step = 0
        self.tokens_seen = 0
        self.flops_seen = 0.0
        self.last_val_loss: float | None = None
        self._stop = False
        self._log_steps = log_spaced_steps(cfg.train.max_steps, cfg.train.log_checkpoints)
        self.checkpoints = CheckpointManager(
            self.run_dir, keep_last=cfg.train.keep_last, protected=self._log_steps, enabled=self.env.is_main
        )
        self.resumed_from: Path | None = None
        if resume:
            self._resume()

    # ------------------------------------------------------------------------------------------------- state

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.seq_len

    def rank_state(self) -> dict:
        """What differs between ranks: RNG states and the data position."""
        return {"rng": ckpt.capture_rng_state(), "data": self.data.state_dict()}

    def state_dict(self) -> dict:
        """The trainer state other than weights and optimiser (JSON values). Collective under DDP/FSDP."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "flops": self.flops_seen,
            "world_size": self.env.world_size,
            "scheduler": self.schedule.describe(self.step),
            "last_val_loss": self.last_val_loss,
            "ranks": parallel.gather_objects(self.rank_state(), self.env),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.env.world_size:
            raise ValueError(
                f"checkpoint was written by {state['world_size']} processes, this run has {self.env.world_size}: "
                "an exact resume needs the same world size (the data position is per rank)"
            )
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.flops_seen = float(state["flops"])
        self.last_val_loss = state.get("last_val_loss")
        mine = state["ranks"][self.env.rank]
        self.data.load_state_dict(mine["data"])
        ckpt.restore_rng_state(mine["rng"])

    def config_json(self) -> dict:
        """`config.json` of checkpoints: the model, its tokeniser and the data it was trained on."""
        c = self.cfg.data
        height, width = (n * c.patch_size for n in self.data.grid)
        tokens = {
            "patch_size": c.patch_size,
            "order": "spiral",
            "standardise": "per-patch",
            "tokens_per_stamp": self.data.tokens_per_stamp,
        }
        data = {
            "image_size": height if height == width else [height, width],
            "n_chan": self.data.n_chan,
            "bands": list(c.bands) if c.bands else None,  # by name (data.bands): embedding takes the same ones
            "normalisation": "per-patch standardisation (mean 0, std 1 over each patch's values)",
            "path": c.path,
            # how objects without a split column were split, so embedding/probing keeps the same held-out sets
            "split_fractions": list(c.split_fractions),
            "split_seed": c.split_seed,
        }
        if self.data.spectra is not None:
            tokens[SPECTRA] = self.data.spectra.describe()
        out = model_config_json(self.model_config, tokens=tokens, data=data)
        out["pretrain_config"] = to_dict(self.cfg)
        return out

    def save_checkpoint(self) -> Path | None:
        """Write RUN/checkpoints/step-N (rank 0 writes; every rank takes part in gathering state)."""
        model_state = parallel.full_model_state(self.model)
        optim_state = parallel.full_optimizer_state(self.model, self.optimizer)
        state = self.state_dict()
        path = self.checkpoints.save(
            self.step,
            model_state=model_state,
            optimizer_state=optim_state,
            trainer_state=state,
            config_json=self.config_json() if self.env.is_main else {},
        )
        parallel.barrier(self.env)
        return path

    def _resume(self) -> None:
        loaded = self.checkpoints.load_latest()
        if loaded is None:
            return  # nothing saved yet: start from scratch (a run killed before its first checkpoint)
        parallel.load_full_state(self.model, self.optimizer, loaded["model"], loaded["optimizer"])
        self.load_state_dict(loaded["trainer"])
        self.resumed_from = loaded["path"]

    # -------------------------------------------------------------------------------------------------- loop

    def train_step(self) -> dict:
        """One optimiser step over the global batch; returns its metrics (one host sync)."""
        t0 = time.perf_counter()
        lr = self.schedule.apply(self.step)
        self.model.train()
        loss_sum = torch.zeros((), device=self.env.device)
        batches = [self.data.next_train() for _ in range(self.accum)]
        normaliser = self._global_loss_weight(batches)
        for i, batch in enumerate(batches):
            with parallel.grad_sync(self.model, i == self.accum - 1):
                with parallel.autocast(self.precision, self.env.device):
                    loss = self._loss(self.model, batch, normaliser)
                (loss if normaliser is not None else loss / self.accum).backward()
            loss_sum += loss.detach().float()
        if normaliser is not None:
            loss_sum = loss_sum * self.accum  # the micro-batch losses already sum to this rank's share
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # [sum over ranks of the rank's mean loss, any rank asked to stop] in one all-reduce
        stats = torch.stack([loss_sum / self.accum, torch.tensor(float(self._stop), device=self.env.device)])
        parallel.all_reduce_sum(stats, self.env)
        loss_total, stop = stats.tolist()
        norm = float(grad_norm)
        self._stop = stop > 0
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        step_flops = flops_per_token(self.model_config, self.n_params, self.seq_len) * self.tokens_per_step
        self.flops_seen += step_flops
        dt = time.perf_counter() - t0
        util = mfu(step_flops / dt / self.env.world_size, self.env.device) if self.env.device.type == "cuda" else None
        return {
            "step": self.step,
            "loss": loss_total / self.env.world_size,
            "lr": lr,
            "grad_norm": norm,
            "tokens_seen": self.tokens_seen,
            "flops": self.flops_seen,
            "tokens_per_s": self.tokens_per_step / dt,
            "step_time_s": dt,
            "mfu": util,
        }

    def _global_loss_weight(self, batches: list) -> torch.Tensor | None:
        """Multimodal: the step's total token weight over micro-batches and ranks, divided by the world size.

        Objects may lack a modality, so micro-batches hold different numbers of loss tokens: dividing each rank's
        summed micro-batch losses by this (DDP then averages over ranks) makes the gradient that of the mean over
        every token of the global batch, whatever the micro-batching and world size.
        """
        if not batches or not isinstance(batches[0], dict):
            return None
        plain = parallel.unwrap(self.model)
        total = sum(plain.loss_weight(b) for b in batches).to(self.env.device, torch.float64).reshape(1)
        parallel.all_reduce_sum(total, self.env)
        return (total / self.env.world_size).clamp_min(1e-12).float().reshape(())

    def _loss(
        self,
        model: torch.nn.Module,
        batch: torch.Tensor | dict[str, torch.Tensor],
        normaliser: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token loss of one micro-batch: shifted image tokens, or the multimodal model's own targets."""
        if isinstance(batch, dict):
            return model(to_device(batch, self.env.device), normaliser=normaliser)[1]
        tokens = batch.to(self.env.device, non_blocking=True)
        return model(tokens[:, :-1], tokens[:, 1:])[1]

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the cached validation images of every rank (weighted by images), or None without any."""
        fsdp = self.strategy == "fsdp"
        # DDP's forward would sync buffers; the plain module needs no collective. FSDP must run its own forward,
        # on every rank the same number of times, so ranks with fewer batches pad with zero-weight repeats.
        model = self.model if fsdp else parallel.unwrap(self.model)
        model.eval()
        n = parallel.all_reduce_max(len(self.data.val), self.env) if fsdp else len(self.data.val)
        total = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for i in range(n):
            real = i < len(self.data.val)
            if real:
                tokens = self.data.val[i]
            elif self.data.val:
                tokens = self.data.val[0]
            elif self.data.multimodal:
                raise ValueError("FSDP validation of a multimodal model needs validation objects on every rank")
            else:
                tokens = torch.zeros(1, self.data.tokens_per_stamp, self.model_config.token_dim)
            mm = isinstance(tokens, dict)
            with parallel.autocast(self.precision, self.env.device):
                # multimodal: summed token losses and their weight, so the mean is over every validation token
                loss = self._loss(model, tokens, torch.ones((), device=self.env.device) if mm else None)
            if real:
                n_obj = parallel.unwrap(model).loss_weight(tokens).item() if mm else tokens.shape[0]
                total[0] += loss.double() * (1 if mm else n_obj)
                total[1] += n_obj
        parallel.all_reduce_sum(total, self.env)
        if total[1] == 0:
            return None
        self.last_val_loss = float(total[0] / total[1])
        return self.last_val_loss

    def _should_checkpoint(self) -> bool:
        t = self.cfg.train
        return (
            self.step == t.max_steps
            or (t.checkpoint_interval > 0 and self.step % t.checkpoint_interval == 0)
            or self.step in self._log_steps
        )

    def fit(self) -> dict:
        """Train to `train.max_steps` (from wherever the state is), then write RUN/final. Returns a summary."""
        t = self.cfg.train
        main = self.env.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(self.cfg, self.run_dir / layout.RUN_CONFIG_YAML)
            run_json = {"config": to_dict(self.cfg), "checkpoint_config": self.config_json(), "strategy": self.strategy}
            (self.run_dir / layout.RUN_CONFIG_JSON).write_text(json.dumps(run_json, indent=2) + "\n")
        logger = MetricsLogger(
            self.run_dir,
            enabled=main,
            resume_step=self.step if self.resumed_from is not None else None,
            tensorboard=t.tensorboard,
            wandb=t.wandb,
            wandb_project=t.wandb_project,
            codecarbon=t.codecarbon,
            config=to_dict(self.cfg),
        )
        previous = signal.signal(signal.SIGTERM, self._request_stop) if main else None
        bar = None
        if main and t.progress:
            bar = progress(t.max_steps, initial=self.step, desc="pretrain", unit="step")
        last: dict = {}
        try:
            if t.eval_interval and self.step == 0:  # the untrained model's validation loss, the curve's origin
                logger.log({"step": 0, "val_loss": self.evaluate(), "tokens_seen": 0, "flops": 0.0})
            while self.step < t.max_steps and not self._stop:
                row = self.train_step()
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"loss is {row['loss']} at step {self.step}; lower optim.learning_rate")
                if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.max_steps):
                    row["val_loss"] = self.evaluate()
                logger.log(row)
                last = row
                if self._should_checkpoint() or self._stop:
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
                    val = self.last_val_loss or float("nan")
                    bar.set_postfix(loss=f"{row['loss']:.4f}", val=f"{val:.4f}", refresh=False)
                if main:
                    fault_point(AFTER_STEP, self.step)
            finished = self.step >= t.max_steps
            if finished:
                full = parallel.full_model_state(self.model)
                if main:
                    model = AstroPT(self.model_config)
                    model.load_state_dict(full)
                    cfg_json = self.config_json()
                    save_pretrained(
                        model, self.run_dir / layout.FINAL_DIR, tokens=cfg_json["tokens"], data=cfg_json["data"]
                    )
                parallel.barrier(self.env)
        finally:
            self.data.close()
            if bar is not None:
                bar.close()
            extras = logger.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return {
            "step": self.step,
            "finished": finished,
            "loss": last.get("loss"),
            "val_loss": self.last_val_loss,
            "tokens_seen": self.tokens_seen,
            "flops": self.flops_seen,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            **extras,
        }

    def _request_stop(self, signum, frame) -> None:
        # checkpoint at the end of the current step, on every rank together (the flag travels with the loss)
        self._stop = True
