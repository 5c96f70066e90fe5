"""The shared training engine: schedule, checkpoint manager, early stopping, metrics log, fault switch."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from astrolom.layout import list_checkpoints
from astrolom.model.astropt import AstroPT
from astrolom.model.presets import model_config
from astrolom.model.pretrained import model_config_json
from astrolom.train.engine import CheckpointManager, EarlyStopping, LRSchedule, Stateful, warmup_cosine
from astrolom.train.fault import AFTER_STEP, IN_CHECKPOINT, fault_env
from astrolom.train.logging import MetricsLogger


def _old_finetune_factor(step: int, warm: int, total: int) -> float:
    """Fine-tuning's schedule before the engine (its own copy, floor hard-coded to 0.1)."""
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def test_schedule_keeps_each_callers_numbers():
    # fine-tuning and alignment: the last warm-up step reaches the peak (every step a run trains: s < total)
    for warm, total in ((5, 40), (1, 7), (3, 3), (50, 30)):
        for s in range(total):
            got = warmup_cosine(s, peak=2e-3, warmup=warm, decay=total, min_ratio=0.1, ramp_to_peak=True)
            assert got == pytest.approx(2e-3 * _old_finetune_factor(s, warm, total), rel=1e-12), (warm, total, s)
    # pretraining: (s + 1) / (warmup + 1), so step `warmup` (the cosine's first) is the peak
    assert warmup_cosine(3, peak=1.0, warmup=4, decay=10, min_ratio=0.0) == pytest.approx(0.8)
    assert warmup_cosine(4, peak=1.0, warmup=4, decay=10, min_ratio=0.0) == 1.0
    assert warmup_cosine(0, peak=1.0, warmup=0, decay=10, min_ratio=0.2) == 1.0  # no warm-up


def test_lr_schedule_peaks_per_group_survive_an_optimizer_reload():
    w1, w2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [w1], "lr": 1e-3}, {"params": [w2], "lr": 1e-4}])
    sched = LRSchedule(opt, warmup=2, decay=10, min_ratio=0.1, ramp_to_peak=True)
    assert sched.apply(1) == pytest.approx(1e-3) and opt.param_groups[1]["lr"] == pytest.approx(1e-4)
    saved = opt.state_dict()  # carries step 9's rates, not the peaks
    sched.apply(9)
    fresh = torch.optim.AdamW([{"params": [w1], "lr": 1e-3}, {"params": [w2], "lr": 1e-4}])
    resumed = LRSchedule(fresh, warmup=2, decay=10, min_ratio=0.1, ramp_to_peak=True)
    fresh.load_state_dict(saved)
    assert resumed.apply(10) == pytest.approx(1e-4)  # the floor of group 0, from its peak
    assert fresh.param_groups[1]["lr"] == pytest.approx(1e-5)
    assert sched.describe(10)["last_lr"] == pytest.approx(warmup_cosine(9, peak=1e-3, warmup=2, decay=10,
                                                                        min_ratio=0.1, ramp_to_peak=True))  # fmt: skip


def test_early_stopping_restores_the_best_weights():
    net = torch.nn.Linear(2, 1)
    early = EarlyStopping(patience=2, min_delta=0.01)
    history = []
    for epoch, val in enumerate([3.0, 2.0, 1.995, float("nan"), 1.0]):
        with torch.no_grad():
            net.weight.fill_(float(epoch))
        history.append(early.update(val, net, at=epoch))
        if early.stop:
            break
    # 1.995 does not beat 2.0 by more than 0.01 and NaN never improves: stop after epoch 3, best is epoch 1
    assert history == [True, True, False, False]
    assert early.stop and early.best == 2.0 and early.best_at == 1 and early.since == 2
    assert float(net.weight.detach()[0, 0]) == 3.0
    assert early.restore(net) and torch.equal(net.weight, torch.ones(1, 2))

    again = EarlyStopping(patience=2)
    again.load_state_dict(early.state_dict())
    assert (again.best, again.best_at, again.stop) == (2.0, 1, True)
    assert not EarlyStopping(patience=1).restore(net)  # nothing improved yet: the module is left as it is
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)


def test_early_stopping_keeps_only_what_the_snapshot_takes():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    early = EarlyStopping(patience=1, snapshot=lambda m: {k: v.clone() for k, v in m.state_dict().items() if
                                                           k.startswith("1.")})  # fmt: skip
    early.update(1.0, net)
    frozen = net[0].weight.detach().clone()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    early.restore(net, strict=False)
    assert torch.equal(net[0].weight, frozen + 1.0)  # not in the snapshot: untouched
    assert set(early.best_state) == {"1.weight", "1.bias"}


def _save(manager: CheckpointManager, step: int, model: AstroPT) -> None:
    manager.save(
        step,
        model_state=model.state_dict(),
        optimizer_state={"state": {}, "param_groups": []},
        trainer_state={"note": f"at {step}"},
        config_json=model_config_json(model.config),
    )


def test_checkpoint_manager_saves_prunes_and_loads_the_latest(tmp_path):
    model = AstroPT(model_config("debug", block_size=16, patch_size=4, n_chan=3))
    manager = CheckpointManager(tmp_path, keep_last=2, protected={1})
    assert manager.load_latest() is None
    for step in (1, 2, 3, 4):
        _save(manager, step, model)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000003", "step-000004"]
    loaded = manager.load_latest()
    assert loaded["path"].name == "step-000004" and loaded["trainer"] == {"note": "at 4", "step": 4}
    want = model.state_dict()
    assert loaded["model"].keys() == want.keys() and all(torch.equal(loaded["model"][k], want[k]) for k in want)

    quiet = CheckpointManager(tmp_path / "other", enabled=False)  # another rank: writes nothing
    _save(quiet, 5, model)
    assert not (tmp_path / "other").exists()
    assert isinstance(TrainerLike(), Stateful)


class TrainerLike:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_metrics_log_without_csv_is_cut_back_to_the_resumed_step(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False, columns=None)
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step, "scale": 2.0})
    log.close()
    assert not (tmp_path / "metrics.csv").exists()
    log = MetricsLogger(tmp_path, tensorboard=False, columns=None, resume_step=3)
    log.log({"step": 4, "loss": 0.5})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.5
    MetricsLogger(tmp_path, tensorboard=False, columns=None).close()  # a fresh run starts an empty log
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_one_fault_switch_kills_at_the_named_point_only():
    code = "from astrolom.train.fault import fault_point as f; f('in-checkpoint', 3); f('after-step', 2); print('ok')"
    for env, rc in ((fault_env(AFTER_STEP, 2), -9), (fault_env(AFTER_STEP, 3), 0), (fault_env(IN_CHECKPOINT, 3), -9)):
        done = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, **env}, timeout=60)
        assert done.returncode == rc, env
    with pytest.raises(ValueError, match="fault point"):
        fault_env("before-step", 1)
