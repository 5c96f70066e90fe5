"""The machinery every training loop shares: schedule, checkpoints, resume state, early stopping.

Pretraining (`train/trainer.py`), fine-tuning (`finetune/trainer.py`), alignment (`align/train.py`) and the small
supervised models (probe MLPs, baseline CNNs, flows) keep only their step and evaluation code; what they have in
common lives here or next door:

- `warmup_cosine` / `LRSchedule`: linear warm-up, cosine decay to a floor, flat afterwards;
- `CheckpointManager`: `RUN/checkpoints/step-N` written atomically (`train/checkpoint.py`), `latest`, pruning and
  loading the newest complete one for `--resume`;
- `Stateful`: what a trainer hands the checkpoint beside weights and optimiser (step, RNG, data position, ...);
- `EarlyStopping`: patience on a validation number, with the best state kept and restored;
- the metrics log is `train/logging.MetricsLogger` (truncated to the resumed step), the fault switch for tests
  `train/fault.py`, and DDP/FSDP wrapping `train/parallel.parallelize`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from astrolom import layout
from astrolom.train import checkpoint as ckpt


@runtime_checkable
class Stateful(Protocol):
    """Anything whose state goes into a checkpoint and comes back on resume (JSON values and tensors)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# ------------------------------------------------------------------------------------------------------ schedule


def warmup_cosine(
    step: int, *, peak: float, warmup: int, decay: int, min_ratio: float, ramp_to_peak: bool = False
) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warm-up, cosine to `min_ratio * peak`, then flat.

    Args:
        warmup: warm-up steps.
        decay: the step at which the cosine reaches its floor (usually the last step).
        ramp_to_peak: the last warm-up step reaches the peak, (step + 1) / warmup (fine-tuning, alignment);
            otherwise (step + 1) / (warmup + 1) and the first cosine step is the peak (pretraining).
    """
    if step < warmup:
        return peak * (step + 1) / (warmup if ramp_to_peak else warmup + 1)
    floor = peak * min_ratio
    if step >= decay:
        return floor
    progress = (step - warmup) / max(1, decay - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


class LRSchedule:
    """`warmup_cosine` driving an optimiser: each parameter group peaks at the learning rate it was built with."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, warmup: int, decay: int, min_ratio: float, ramp_to_peak: bool
    ):
        self.optimizer = optimizer
        # read before any resume: a loaded optimiser state carries the last learning rate, not the peak
        self.peaks = [float(g["lr"]) for g in optimizer.param_groups]
        self.warmup, self.decay, self.min_ratio, self.ramp_to_peak = warmup, decay, min_ratio, ramp_to_peak

    def lr(self, step: int, group: int = 0) -> float:
        return warmup_cosine(
            step,
            peak=self.peaks[group],
            warmup=self.warmup,
            decay=self.decay,
            min_ratio=self.min_ratio,
            ramp_to_peak=self.ramp_to_peak,
        )

    def apply(self, step: int) -> float:
        """Set every group's learning rate for step `step`; returns the first group's."""
        for i, g in enumerate(self.optimizer.param_groups):
            g["lr"] = self.lr(step, i)
        return self.optimizer.param_groups[0]["lr"]

    def describe(self, step: int) -> dict:
        """The schedule as recorded in a checkpoint (informative: resume rebuilds it from the configuration)."""
        return {
            "peak_lr": self.peaks[0],
            "warmup_steps": self.warmup,
            "decay_steps": self.decay,
            "min_lr_ratio": self.min_ratio,
            "last_lr": self.lr(max(0, step - 1)),
        }


# --------------------------------------------------------------------------------------------------- checkpoints


class CheckpointManager:
    """`RUN/checkpoints/step-N/` of one run: atomic save, `latest`, pruning, loading the newest for resume.

    Args:
        run_dir: the run directory RUN.
        keep_last: keep the newest N checkpoints (None: keep all); the latest and `protected` steps are never pruned.
        protected: steps never pruned (e.g. pretraining's log-spaced release checkpoints).
        enabled: False on ranks that do not write (saving is then a no-op; loading still works).
    """

    def __init__(
        self, run_dir: str | Path, *, keep_last: int | None = None, protected: Iterable[int] = (), enabled=True
    ):
        self.run_dir = Path(run_dir)
        self.keep_last, self.protected, self.enabled = keep_last, set(protected), enabled

    def path(self, step: int) -> Path:
        return self.run_dir / layout.CHECKPOINTS_DIR / layout.checkpoint_name(step)

    def save(
        self, step: int, *, model_state: dict, optimizer_state: dict, trainer_state: dict, config_json: dict
    ) -> Path | None:
        """Write step `step`'s checkpoint (temp dir + rename), point `latest` at it, prune; None if not enabled."""
        if not self.enabled:
            return None
        path = self.path(step)
        ckpt.save_checkpoint(
            path,
            model_state=model_state,
            optimizer_state=optimizer_state,
            trainer_state=dict(trainer_state, step=step),
            config_json=config_json,
        )
        ckpt.mark_latest(self.run_dir, path)
        if self.keep_last:
            ckpt.prune_checkpoints(self.run_dir, self.keep_last, self.protected)
        return path

    def latest(self) -> Path | None:
        return layout.latest_checkpoint(self.run_dir)

    def load_latest(self, device: str | torch.device = "cpu") -> dict | None:
        """`checkpoint.load_checkpoint` of the newest complete checkpoint plus its "path"; None if there is none."""
        path = self.latest()
        if path is None:
            return None
        return dict(ckpt.load_checkpoint(path, device), path=path)


# ------------------------------------------------------------------------------------------------ early stopping


def _clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class EarlyStopping:
    """Stop after `patience` evaluations without a better validation number; keep and restore the best state.

    Args:
        patience: evaluations without improvement before `stop` turns True.
        min_delta: an improvement must beat the best by more than this.
        snapshot: what to keep of the module at a new best (default: a copy of its whole state dict).
    """

    def __init__(
        self,
        patience: int,
        min_delta: float = 0.0,
        snapshot: Callable[[torch.nn.Module], dict[str, torch.Tensor]] = _clone_state,
    ):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience, self.min_delta, self._snapshot = patience, min_delta, snapshot
        self.best = math.inf
        self.best_at = -1  # the caller's counter (epoch or step) at the best value
        self.since = 0
        self.stop = False
        self.best_state: dict[str, torch.Tensor] = {}

    def update(self, value: float, module: torch.nn.Module, at: int = -1) -> bool:
        """Record one validation value (NaN never improves); True if it is a new best (its state is kept)."""
        if value < self.best - self.min_delta:
            self.best, self.best_at, self.since = value, at, 0
            self.best_state = self._snapshot(module)
            return True
        self.since += 1
        self.stop = self.since >= self.patience
        return False

    def restore(self, module: torch.nn.Module, strict: bool = True) -> bool:
        """Load the best state into `module`; False (module unchanged) if no value ever improved."""
        if not self.best_state:
            return False
        module.load_state_dict(self.best_state, strict=strict)
        return True

    _STATE = ("best", "best_at", "since", "stop", "best_state")

    def state_dict(self) -> dict:
        """The counters (JSON values) and the best state (tensors)."""
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_at = float(state["best"]), int(state["best_at"])
        self.since, self.stop = int(state["since"]), bool(state["stop"])
        self.best_state = dict(state["best_state"])
