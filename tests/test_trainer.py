"""Trainer: config, schedule, optimiser groups, an end-to-end run, overfitting, accumulation, stored losses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pretrain_helpers import REFERENCE, TINY, read_metrics, reference_run, torch_threads, write_blobs

from astrolom import cli
from astrolom.config import apply_overrides, load_yaml, save_yaml
from astrolom.layout import list_checkpoints
from astrolom.model.astropt import AstroPT
from astrolom.model.flops import flops_per_token
from astrolom.model.presets import get_preset
from astrolom.model.pretrained import from_pretrained, read_config
from astrolom.train import checkpoint as ckpt
from astrolom.train.config import PretrainConfig, resolve_model_config
from astrolom.train.engine import warmup_cosine
from astrolom.train.trainer import Trainer, build_optimizer, log_spaced_steps


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blobs(tmp_path_factory.mktemp("blobs"), n=48, size=32)


def _cfg(data, out, *overrides: str) -> PretrainConfig:
    return apply_overrides(PretrainConfig(), [f"data.path={data}", f"train.out_dir={out}", *TINY, *overrides])


# ---------------------------------------------------------------------------------------------------------- config


def test_config_yaml_round_trip_and_overrides(tmp_path):
    cfg = apply_overrides(PretrainConfig(), ["model.preset=1m", "optim.learning_rate=3e-4", "train.batch_size=64"])
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(PretrainConfig, tmp_path / "c.yaml") == cfg
    again = load_yaml(PretrainConfig, tmp_path / "c.yaml", ["train.micro_batch_size=8"])
    assert again.train.accumulation_steps(world_size=2) == (8, 4)  # 64 = 8 x 4 x 2
    with pytest.raises(ValueError, match="unknown key"):
        apply_overrides(cfg, ["optim.lr=1"])
    with pytest.raises(ValueError, match="unknown preset"):
        apply_overrides(cfg, ["model.preset=7b"])
    with pytest.raises(ValueError, match="val_split"):
        apply_overrides(cfg, ["data.val_split=train"])
    with pytest.raises(ValueError, match="micro_batch_size x accumulation x world size"):
        cfg.train.accumulation_steps(world_size=3)


def test_learning_rate_defaults_to_the_preset_and_block_size_to_the_data():
    cfg = apply_overrides(PretrainConfig(), ["model.preset=89m"])
    assert cfg.learning_rate() == get_preset("89m").learning_rate == 6e-4
    mc = resolve_model_config(cfg.model, patch_size=16, n_chan=3, tokens_per_stamp=256)
    assert (mc.n_layer, mc.n_embd, mc.block_size, mc.n_chan) == (12, 768, 256, 3)
    small = apply_overrides(cfg, ["model.block_size=64", "model.n_layer=2"])
    assert resolve_model_config(small.model, patch_size=16, n_chan=1, tokens_per_stamp=16).block_size == 64
    with pytest.raises(ValueError, match="block_size"):
        resolve_model_config(small.model, patch_size=16, n_chan=3, tokens_per_stamp=256)


def test_schedule_warmup_then_cosine_to_a_tenth():
    kw = dict(peak=1e-3, warmup=10, decay=100, min_ratio=0.1)
    lrs = [warmup_cosine(s, **kw) for s in range(120)]
    assert lrs[0] > 0 and all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # rising warmup
    assert max(lrs) == pytest.approx(1e-3, rel=1e-2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then non-increasing
    assert lrs[100] == lrs[119] == pytest.approx(1e-4)
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-6)  # cosine midpoint


def test_weight_decay_only_on_matrices():
    cfg = apply_overrides(PretrainConfig(), ["optim.weight_decay=0.05", "model.bias=true"])
    model = AstroPT(resolve_model_config(cfg.model, patch_size=4, n_chan=3, tokens_per_stamp=16))
    opt = build_optimizer(model, cfg, torch.device("cpu"), fsdp=False)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(no_decay["params"]) > 0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_log_spaced_checkpoints():
    assert log_spaced_steps(1000, 4) == {1, 10, 100, 1000}
    assert log_spaced_steps(1000, 0) == set()


# ---------------------------------------------------------------------------------------------------- end to end


def test_tiny_pretraining_run_writes_the_documented_layout(mock_survey, tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "--data", str(mock_survey), "--preset", "debug", "--out", str(run), "--max-steps", "6"]
    args += ["data.patch_size=8", "train.progress=false", "train.batch_size=4", "train.eval_interval=3"]
    args += ["train.checkpoint_interval=4", "train.eval_samples=8"]
    with torch_threads(1):
        assert cli.main(args) == 0
    for name in ("config.yaml", "config.json", "metrics.jsonl", "metrics.csv", "final/config.json"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000006"
    assert [p.name for p in list_checkpoints(run)] == ["step-000004", "step-000006"]
    assert sorted(p.name for p in (run / "final").iterdir()) == ["config.json", "model.safetensors"]

    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3, 6]  # step 0: the untrained model
    assert all(math.isfinite(r["loss"]) for r in rows[1:]) and "loss" not in rows[0]
    tokens_per_step = 4 * (16 - 1)  # 32x32 stamps, 8x8 patches: 16 tokens, 15 predicted
    assert rows[-1]["tokens_seen"] == 6 * tokens_per_step
    model = from_pretrained(run)
    cfg = read_config(run)
    assert model.config.block_size == cfg["model"]["block_size"] == 16  # from the data
    assert model.config.patch_size == 8 and model.config.n_chan == 3
    assert cfg["tokens"]["patch_size"] == 8 and cfg["data"]["image_size"] == 32
    per_token = flops_per_token(model.config, model.num_params(), 15)
    assert rows[-1]["flops"] == pytest.approx(6 * tokens_per_step * per_token)
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["step", "loss", "val_loss"] and "tokens_per_s" in header
    saved = load_yaml(PretrainConfig, run / "config.yaml")
    assert saved.model.n_layer == 2 and saved.model.block_size == 16 and saved.train.max_steps == 6
    assert json.loads((run / "config.json").read_text())["checkpoint_config"]["model"]["n_chan"] == 3

    # the final weights are the last checkpoint's
    last = ckpt.load_checkpoint(run / "checkpoints" / "step-000006")
    assert all(torch.equal(last["model"][k], v) for k, v in model.state_dict().items())
    # a second run into the same directory needs --resume
    assert cli.main(args) == 2


def test_prefetch_thread_changes_nothing(blobs, tmp_path):
    losses = {}
    for depth in (0, 2):
        cfg = _cfg(blobs, tmp_path / f"p{depth}", "train.max_steps=6", "train.batch_size=8", "train.eval_interval=0")
        cfg = apply_overrides(cfg, [f"data.prefetch={depth}", "train.micro_batch_size=4"])
        with torch_threads(1):
            trainer = Trainer(cfg)
            losses[depth] = [trainer.train_step()["loss"] for _ in range(6)]
            # the saved position is that of the last batch used, however far the thread has read ahead
            assert trainer.data.state_dict()["batches"] == 12
            trainer.data.close()
    assert losses[0] == losses[2]


def test_overfits_one_batch(tmp_path):
    data = write_blobs(tmp_path / "four", n=4, size=32)
    # all four objects in train: every step's batch is the same four images (in shuffled order)
    cfg = _cfg(data, tmp_path / "run", "train.max_steps=150", "train.batch_size=4", "train.eval_interval=0")
    cfg = apply_overrides(cfg, ["train.checkpoint_interval=0", "optim.learning_rate=3e-3", "optim.warmup_steps=10"])
    import pyarrow.parquet as pq

    for f in data.glob("*.parquet"):  # put everything in train
        t = pq.read_table(f)
        pq.write_table(t.set_column(t.schema.get_field_index("split"), "split", [["train"] * len(t)]), f)
    with torch_threads(1):
        Trainer(cfg).fit()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert losses[0] / losses[-1] > 10, (losses[0], losses[-1])


def test_loss_is_divided_by_accumulation_steps(blobs, tmp_path):
    """One step with batch 8 in one micro-batch or in four of 2 gives the same loss, gradient norm and weights."""
    out = {}
    for micro in (8, 2):
        cfg = _cfg(blobs, tmp_path / f"m{micro}", "train.max_steps=2", "train.batch_size=8", "train.eval_interval=0")
        cfg = apply_overrides(cfg, [f"train.micro_batch_size={micro}", "train.checkpoint_interval=0"])
        with torch_threads(1):
            trainer = Trainer(cfg)
            assert trainer.accum == 8 // micro
            rows = [trainer.train_step() for _ in range(2)]
        out[micro] = (rows, trainer.model.state_dict())
    (r8, w8), (r2, w2) = out[8], out[2]
    for a, b in zip(r8, r2, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for k in w8:
        torch.testing.assert_close(w8[k], w2[k], rtol=1e-5, atol=1e-6)


def test_validation_reads_only_the_val_split(blobs, tmp_path):
    cfg = _cfg(blobs, tmp_path / "run", "train.batch_size=4", "train.eval_samples=100")
    with torch_threads(1):
        trainer = Trainer(cfg)
    val_ids = {oid for oid in trainer.data.val_ids}
    assert val_ids == {f"blob{i:05d}" for i in range(48) if i % 4 == 3}  # every val object, nothing else
    assert sum(t.shape[0] for t in trainer.data.val) == len(val_ids)
    assert trainer.evaluate() is not None and math.isfinite(trainer.last_val_loss)
    seen = set()
    for _ in range(20):  # more than an epoch of the training stream
        seen.update(trainer.data.next_train_batch()["object_id"])
    assert seen and not seen & val_ids
    assert all(oid in {f"blob{i:05d}" for i in range(48) if i % 4 != 3 and i % 8 != 2} for oid in seen)


def test_missing_optional_logger_is_a_clear_error(blobs, tmp_path):
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    cfg = _cfg(blobs, tmp_path / "run", "train.max_steps=1", "train.wandb=true", "train.batch_size=4")
    with torch_threads(1), pytest.raises(ValueError, match="pip install wandb"):
        Trainer(cfg).fit()


def test_first_step_losses_match_the_stored_reference(tmp_path):
    """Regenerate with `python tests/pretrain_helpers.py --regenerate` after a deliberate numerical change."""
    stored = json.loads(REFERENCE.read_text())
    losses = reference_run(tmp_path)
    assert len(losses) == len(stored["losses"]) == 5
    for got, want in zip(losses, stored["losses"], strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_bf16_autocast_path_runs_on_cpu(blobs, tmp_path):
    """The GPU precision path (bf16 autocast; the Huber loss stays fp32) exercised on CPU, against fp32."""
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = _cfg(blobs, tmp_path / precision, "train.max_steps=3", "train.batch_size=8", "train.eval_interval=0")
        with torch_threads(1):
            trainer = Trainer(apply_overrides(cfg, [f"train.precision={precision}"]))
            losses[precision] = [trainer.train_step()["loss"] for _ in range(3)]
            trainer.data.close()
    assert losses["bf16"] != losses["fp32"]  # it did run in bf16
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=5e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_gpu_run(blobs, tmp_path):
    cfg = _cfg(blobs, tmp_path / "run", "train.max_steps=20", "train.batch_size=8", "train.eval_interval=10")
    cfg = apply_overrides(cfg, ["train.device=cuda", "train.precision=auto", "optim.learning_rate=3e-3"])
    trainer = Trainer(cfg)
    assert trainer.precision == "bf16"
    trainer.fit()
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]  # training rows (eval rows carry val_loss)
    assert len(rows) >= 2 and rows[-1]["loss"] < rows[0]["loss"] and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r.get("mfu") is None or 0 < r["mfu"] < 1 for r in rows)
    assert from_pretrained(tmp_path / "run").pos_emb.weight.device.type == "cpu"


def test_skip_bad_lists_skipped_records_in_the_run(tmp_path):
    """A bad record stops nothing with data.skip_bad=true, and is named in RUN/skipped.jsonl."""
    images = np.random.default_rng(0).random((40, 32, 32, 3), dtype=np.float32)
    images[3, :, :, 1] = np.nan  # an all-NaN band: a bad record
    np.save(tmp_path / "imgs.npy", images)
    run = tmp_path / "run"
    rc = cli.main(
        ["pretrain", "--data", str(tmp_path / "imgs.npy"), "--out", str(run), "--max-steps", "2",
         "data.skip_bad=true", "train.batch_size=4", "train.eval_samples=4", "train.progress=false"]
    )  # fmt: skip
    assert rc == 0
    lines = [json.loads(x) for x in (run / "skipped.jsonl").read_text().splitlines()]
    assert [(x["row"], x["object_id"]) for x in lines] == [(3, "imgs:3")]
    assert "band 1 is entirely NaN" in lines[0]["reason"]


def test_token_formats_pixels_exact_and_bf16(tmp_path):
    """data.token_format=pixels (uint8 patches standardised on the device) trains bit-identically to float32 tokens;
    bfloat16 tokens need bf16 precision and stay close to it."""
    from PIL import Image

    d = tmp_path / "jpegs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        px = np.clip(rng.normal(90, 40, (32, 32, 3)) + 80 * (i % 3), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(d / f"g{i:02d}.png")  # PNG: lossless, so the pixels are the ones drawn
    losses = {}
    for fmt, precision in (("float32", "fp32"), ("pixels", "fp32"), ("float32", "bf16"), ("bfloat16", "bf16")):
        cfg = _cfg(d, tmp_path / f"{fmt}-{precision}", "train.max_steps=3", "train.batch_size=8")
        cfg = apply_overrides(
            cfg, ["train.eval_interval=0", f"data.token_format={fmt}", f"train.precision={precision}"]
        )
        with torch_threads(1):
            trainer = Trainer(cfg)
            losses[fmt, precision] = [trainer.train_step()["loss"] for _ in range(3)]
            trainer.data.close()
    assert losses["pixels", "fp32"] == losses["float32", "fp32"]
    assert losses["bfloat16", "bf16"] == pytest.approx(losses["float32", "bf16"], abs=5e-3)
    cfg = _cfg(d, tmp_path / "bad", "data.token_format=bfloat16", "train.precision=fp32")
    with pytest.raises(ValueError, match="data.token_format=bfloat16 needs train.precision=bf16"):
        Trainer(cfg)
    with pytest.raises(ValueError, match="data.token_format must be one of"):
        _cfg(d, tmp_path / "bad", "data.token_format=fp16")
