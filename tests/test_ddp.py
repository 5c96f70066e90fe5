"""torchrun + DDP on CPU (gloo): 2 processes give the losses of 1 process at the same global batch."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from pretrain_helpers import TINY, read_metrics, run_pretrain, write_blobs
from safetensors.torch import load_file

from astrolom.train import checkpoint as ckpt


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
def test_two_ranks_match_one_process(tmp_path):
    data = write_blobs(tmp_path / "blobs", n=48, size=32)
    args = ["--data", str(data), "--preset", "debug", "--max-steps", "6", *TINY, "train.batch_size=8"]
    args += ["train.eval_interval=3", "train.eval_samples=10", "train.checkpoint_interval=0"]
    args += ["optim.learning_rate=3e-3", "optim.warmup_steps=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    # one process: 2 micro-batches of 4; two ranks: 2 micro-batches of 2 each (no_sync on the first)
    single = run_pretrain([*args, "train.micro_batch_size=4", "--out", str(one)])
    assert single.returncode == 0, single.stderr
    multi = run_pretrain([*args, "train.micro_batch_size=2", "--out", str(two)], nproc=2)
    assert multi.returncode == 0, multi.stdout + multi.stderr

    a, b = [r for r in read_metrics(one) if "loss" in r], [r for r in read_metrics(two) if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5, (ra["step"], ra["loss"], rb["loss"])
        assert ra["tokens_seen"] == rb["tokens_seen"]  # global batch counts both ranks
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) <= 1e-5  # same 10 val images, split over the ranks
    assert a[-1]["loss"] < a[0]["loss"]

    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(two))["trainer"]
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    wa, wb = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-4, k
