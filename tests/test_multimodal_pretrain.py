"""`astrolom pretrain model.modalities=images,spectra`: trains, checkpoints, resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from pretrain_helpers import TINY, pretrain_here, read_metrics, run_pretrain, write_blobs
from safetensors.torch import load_file

from astrolom.data.multimodal import MultimodalBatches, SpectrumTokeniser, spectrum_matrix
from astrolom.data.sources import open_source
from astrolom.data.stream import RecordStream, TokenBatches
from astrolom.mock import generate_survey
from astrolom.train import checkpoint as ckpt
from astrolom.train.fault import AFTER_STEP, fault_env

MM = ["model.modalities=images,spectra", "model.modality_order=random", "model.spectrum_patch=64"]


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    out = tmp_path_factory.mktemp("mm") / "survey"
    generate_survey(out, n=48, size=32, seed=2, workers=1, progress=False)
    return out


def test_batches_carry_spectrum_tokens_and_missing_flags(survey):
    source = open_source(str(survey), spectra=True)
    grid = source.metadata["wavelength"]
    batches = MultimodalBatches(
        TokenBatches(RecordStream(source, split="train", shuffle=False, epochs=1), 16, patch_size=8),
        ("images", "spectra"),
        SpectrumTokeniser(grid, patch=64),
    )
    batch = next(iter(batches))
    x = batch["inputs"]
    assert x["images"].shape == (16, 16, 192) and x["spectra"].shape == (16, 49, 65)
    has = torch.tensor(batch["labels"]["has_spectrum"])
    assert torch.equal(x["spectra_present"], has) and 0 < int(has.sum()) < 16
    assert not x["spectra_mask"][~has].any() and torch.isfinite(x["spectra"]).all()
    # the masked sky-line pixels (NaN in the shards) are never targets
    assert int((~x["spectra_value_mask"][has][..., :-1]).sum()) >= 20 * int(has.sum())


def test_spectrum_of_the_wrong_length_is_named():
    with pytest.raises(ValueError, match="obj7: spectrum has 10 pixels .* grid has 3101"):
        spectrum_matrix([None, [1.0] * 10], 3101, ["obj6", "obj7"])


@pytest.mark.slow
def test_killed_and_resumed_multimodal_run_matches_an_uninterrupted_one(survey, tmp_path):
    args = ["--data", str(survey), "--preset", "debug", "--max-steps", "6", *TINY, *MM]
    args += ["train.batch_size=8", "train.micro_batch_size=4", "train.checkpoint_interval=3", "train.eval_interval=3"]
    args += ["train.eval_samples=4", "optim.learning_rate=3e-3", "optim.warmup_steps=1"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert pretrain_here([*args, "--out", str(full)]) == 0  # the uninterrupted run: in process, same bits
    killed = run_pretrain([*args, "--out", str(broken)], env=fault_env(AFTER_STEP, 4))
    assert killed.returncode == -9, killed.stderr
    assert ckpt.latest_checkpoint(broken).name == "step-000003"
    resumed = run_pretrain([*args, "--out", str(broken), "--resume"])
    assert resumed.returncode == 0, resumed.stderr

    a, b = read_metrics(full), read_metrics(broken)
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    assert a[-1]["loss"] < a[1]["loss"]
    # 16 image tokens + 49 spectrum tokens + 2 begin-of-modality tokens per object
    assert a[-1]["tokens_seen"] == 6 * 8 * (16 + 49 + 2)
    wa = load_file(str(full / "final" / "model.safetensors"))
    wb = load_file(str(broken / "final" / "model.safetensors"))
    assert "wave_emb.0.weight" in wa and "bom_emb.weight" in wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    cfg = json.loads((full / "final" / "config.json").read_text())
    assert cfg["model"]["modalities"] == ["images", "spectra"] and cfg["model"]["block_size"] == 68  # sequence + 1
    assert cfg["tokens"]["spectra"]["tokens"] == 49 and len(cfg["tokens"]["spectra"]["wavelength"]) == 3101


@pytest.mark.slow
def test_spectra_model_on_data_without_spectra_is_refused(tmp_path):
    data = write_blobs(tmp_path / "blobs", n=16, size=32)
    run = run_pretrain(["--data", str(data), "--max-steps", "1", "--out", str(tmp_path / "r"), *TINY, *MM])
    assert run.returncode != 0
    assert "no spectrum wavelength grid" in run.stderr


def _fixed_order_args(survey) -> list[str]:
    # fixed order: a random order is drawn from each rank's own RNG, so it differs between world sizes by design
    mm = ["model.modalities=images,spectra", "model.spectrum_patch=64"]
    args = ["--data", str(survey), "--preset", "debug", "--max-steps", "3", *TINY, *mm, "train.batch_size=8"]
    return [*args, "train.eval_interval=3", "train.eval_samples=4", "train.checkpoint_interval=0"]


@pytest.fixture(scope="module")
def one_process(survey, tmp_path_factory):
    """The one-process run both strategies are compared with: 2 micro-batches of 4 per step, read-only."""
    out = tmp_path_factory.mktemp("mm_one") / "one"
    assert pretrain_here([*_fixed_order_args(survey), "train.micro_batch_size=4", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_two_modalities(survey, one_process, tmp_path, strategy):
    args = [*_fixed_order_args(survey), "train.micro_batch_size=2", f"train.parallel={strategy}"]
    two = run_pretrain([*args, "--out", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stdout + two.stderr
    a = [r for r in read_metrics(one_process) if "loss" in r]
    b = [r for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5, (ra["step"], ra["loss"], rb["loss"])
