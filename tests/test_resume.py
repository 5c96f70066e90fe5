"""Exact resume: a run SIGKILLed mid-training, then again while writing a checkpoint, and resumed with --resume,
logs the same per-step losses and ends with bit-identical weights as an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from pretrain_helpers import TINY, pretrain_here, read_metrics, run_pretrain, write_blobs
from safetensors.torch import load_file

from astrolom.layout import checkpoint_name, latest_checkpoint
from astrolom.train.fault import AFTER_STEP, IN_CHECKPOINT, fault_env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_blobs(tmp_path_factory.mktemp("blobs"), n=48, size=32)


@pytest.mark.slow  # 41-82 s on a loaded 2-core machine
def test_killed_and_resumed_run_matches_an_uninterrupted_one(data, tmp_path):
    # 30 train images, batch 8 = 2 micro-batches of 4: the stream crosses an epoch boundary at step 4
    args = ["--data", str(data), "--preset", "debug", "--max-steps", "8", *TINY]
    args += ["train.batch_size=8", "train.micro_batch_size=4", "train.checkpoint_interval=3", "train.eval_interval=4"]
    args += ["train.eval_samples=8", "optim.learning_rate=3e-3", "optim.warmup_steps=2"]
    full, broken = tmp_path / "full", tmp_path / "broken"

    assert pretrain_here([*args, "--out", str(full)]) == 0  # the uninterrupted run: in process, same bits

    killed = run_pretrain([*args, "--out", str(broken)], env=fault_env(AFTER_STEP, 5))
    assert killed.returncode == -9, killed.stderr  # SIGKILL after step 5; last checkpoint: step 3
    assert latest_checkpoint(broken).name == "step-000003"
    assert max(r["step"] for r in read_metrics(broken)) == 5

    killed = run_pretrain([*args, "--out", str(broken), "--resume"], env=fault_env(IN_CHECKPOINT, 6))
    assert killed.returncode == -9, killed.stderr  # SIGKILL halfway through writing step 6
    assert latest_checkpoint(broken).name == "step-000003"
    assert any(".tmp-" in p.name for p in (broken / "checkpoints").iterdir())

    resumed = run_pretrain([*args, "--out", str(broken), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"].endswith("step-000003")

    a, b = read_metrics(full), read_metrics(broken)
    assert [r["step"] for r in b] == list(range(0, 9))  # recomputed steps replace the killed run's rows
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    assert [r["tokens_seen"] for r in a] == [r["tokens_seen"] for r in b]
    wa = load_file(str(full / "final" / "model.safetensors"))
    wb = load_file(str(broken / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = load_file(str(full / "checkpoints" / "step-000008" / "optimizer.safetensors"))
    ob = load_file(str(broken / "checkpoints" / "step-000008" / "optimizer.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)

    # the data position is saved, not replayed: after step 8, 16 micro-batches were drawn
    state = json.loads((broken / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert state["ranks"][0]["data"]["batches"] == 16 and state["tokens_seen"] == 8 * 8 * 15
    assert len((broken / "metrics.csv").read_text().splitlines()) == 1 + 9  # header, step 0 (validation), 1..8


@pytest.mark.slow  # 41-82 s on a loaded 2-core machine
def test_sigterm_checkpoints_and_stops_then_resume_finishes(data, tmp_path):
    """Cluster preemption: SIGTERM ends the current step, writes a checkpoint, exits 143; --resume completes."""
    import signal
    import subprocess
    import sys
    import time

    from pretrain_helpers import subprocess_env

    run = tmp_path / "run"
    args = ["--data", str(data), "--preset", "debug", "--max-steps", "100000", "--out", str(run), *TINY]
    args += ["train.batch_size=4", "train.eval_interval=0", "train.checkpoint_interval=0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "astrolom", "pretrain", *args],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    stopped = json.loads(out.strip().splitlines()[-1])
    assert not stopped["finished"] and stopped["step"] >= 3
    latest = latest_checkpoint(run)
    assert latest.name == checkpoint_name(stopped["step"])
    assert max(r["step"] for r in read_metrics(run)) == stopped["step"]

    assert pretrain_here([*args[:5], str(stopped["step"] + 2), *args[6:], "--resume"]) == 0
    assert [r["step"] for r in read_metrics(run)] == list(range(1, stopped["step"] + 3))
