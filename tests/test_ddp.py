"""torchrun on CPU (gloo): 2 processes (DDP, or FSDP2) give the losses of 1 process at the same global batch."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist
from pretrain_helpers import TINY, pretrain_here, read_metrics, run_pretrain, write_blobs
from safetensors.torch import load_file

from astrolom.layout import latest_checkpoint
from astrolom.train import checkpoint as ckpt

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)

ARGS = ["--preset", "debug", "--max-steps", "6", *TINY, "train.batch_size=8", "train.eval_interval=3"]
ARGS += ["train.eval_samples=10", "train.checkpoint_interval=0", "optim.learning_rate=3e-3", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process: 2 micro-batches of 4 per step."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_blobs(tmp / "blobs", n=48, size=32)
    assert pretrain_here(["--data", str(data), *ARGS, "train.micro_batch_size=4", "--out", str(tmp / "one")]) == 0
    return data, tmp / "one"


@pytest.mark.slow  # two gloo ranks: 34-44 s each (plus a 23 s shared set-up) on a loaded 2-core machine
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(single, tmp_path, strategy):
    data, one = single
    two = tmp_path / "two"
    # two ranks: 2 micro-batches of 2 each, gradients synchronised only on the second (no_sync / FSDP equivalent)
    args = ["--data", str(data), *ARGS, "train.micro_batch_size=2", f"train.parallel={strategy}", "--out", str(two)]
    multi = run_pretrain(args, nproc=2)
    assert multi.returncode == 0, multi.stdout + multi.stderr
    assert json.loads((two / "config.json").read_text())["strategy"] == strategy

    a, b = [r for r in read_metrics(one) if "loss" in r], [r for r in read_metrics(two) if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5, (ra["step"], ra["loss"], rb["loss"])
        assert ra["tokens_seen"] == rb["tokens_seen"]  # the global batch counts both ranks
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) <= 1e-5  # the same 10 val images, split over the ranks
    assert a[-1]["loss"] < a[0]["loss"]

    state = ckpt.load_checkpoint(latest_checkpoint(two))["trainer"]
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    wa, wb = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-4, k
