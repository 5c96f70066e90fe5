"""Checkpoint format: safetensors + JSON, exact round trips, atomic writes, no unpickling."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from astrolom.layout import atomic_directory, checkpoint_name, latest_checkpoint, list_checkpoints
from astrolom.model.astropt import AstroPT
from astrolom.model.presets import model_config
from astrolom.model.pretrained import from_pretrained, model_config_json, save_pretrained
from astrolom.train import checkpoint as ckpt
from astrolom.train.fault import IN_CHECKPOINT, fault_env


def _model(seed: int = 0) -> AstroPT:
    torch.manual_seed(seed)
    return AstroPT(model_config("debug", block_size=16, patch_size=4, n_chan=3))


def _trained_optimizer(model: AstroPT, steps: int = 2) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.dim() >= 2]},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-3,
        betas=(0.9, 0.95),
    )
    x = torch.randn(2, 16, 48)
    for _ in range(steps):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def _fake_state(step: int) -> dict:
    return {"step": step, "tokens_seen": 10 * step, "flops": 1.0, "world_size": 1, "ranks": []}


def test_save_pretrained_round_trip_is_exact_and_hub_layout(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "m", tokens={"patch_size": 4}, data={"image_size": 16})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "astropt" and cfg["model"]["n_layer"] == 2 and cfg["tokens"] == {"patch_size": 4}
    loaded = from_pretrained(tmp_path / "m")
    assert not loaded.training
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(3, 10, 48)
    assert torch.equal(model.eval()(x)[0], loaded(x)[0])


def test_save_pretrained_takes_the_plain_model_that_unwrap_returns(tmp_path):
    from astrolom.train.parallel import unwrap

    class Compiled(torch.nn.Module):  # like torch.compile's wrapper: the model under `_orig_mod`
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    model = _model()
    compiled = Compiled(Compiled(model))
    with pytest.raises(TypeError, match="unwrap it first"):
        save_pretrained(compiled, tmp_path / "m")
    assert unwrap(compiled) is model and unwrap(model) is model
    save_pretrained(unwrap(compiled), tmp_path / "m")
    assert torch.equal(from_pretrained(tmp_path / "m").pos_emb.weight, model.pos_emb.weight)


def test_from_pretrained_finds_final_then_latest_in_a_run_dir(tmp_path):
    run = tmp_path / "run"
    a, b = _model(0), _model(1)
    opt = _trained_optimizer(a)
    path = run / "checkpoints" / checkpoint_name(5)
    ckpt.save_checkpoint(
        path,
        model_state=a.state_dict(),
        optimizer_state=opt.state_dict(),
        trainer_state=_fake_state(5),
        config_json=model_config_json(a.config),
    )
    ckpt.mark_latest(run, path)
    assert torch.equal(from_pretrained(run).pos_emb.weight, a.pos_emb.weight)
    save_pretrained(b, run / "final")
    assert torch.equal(from_pretrained(run).pos_emb.weight, b.pos_emb.weight)
    with pytest.raises(FileNotFoundError):
        from_pretrained(tmp_path / "nothing")


def test_training_checkpoint_round_trip_is_exact(tmp_path):
    model = _model()
    opt = _trained_optimizer(model)
    state = opt.state_dict()
    ckpt.save_checkpoint(
        tmp_path / "c",
        model_state=model.state_dict(),
        optimizer_state=state,
        trainer_state=_fake_state(2),
        config_json=model_config_json(model.config),
    )
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == ["config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"]
    loaded = ckpt.load_checkpoint(tmp_path / "c")
    assert loaded["trainer"]["step"] == 2 and loaded["trainer"]["tokens_seen"] == 20
    got = loaded["optimizer"]
    assert got["param_groups"] == state["param_groups"]  # tuples (betas) and int ids survive JSON
    assert set(got["state"]) == set(state["state"])
    for i, s in state["state"].items():
        for name, value in s.items():
            assert torch.equal(got["state"][i][name], value)
    # the loaded state drives an identical next step
    model2 = _model(1)
    model2.load_state_dict(loaded["model"])
    opt2 = torch.optim.AdamW(
        [
            {"params": [p for p in model2.parameters() if p.dim() >= 2]},
            {"params": [p for p in model2.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    opt2.load_state_dict(got)
    for m, o in ((model, opt), (model2, opt2)):
        x = torch.ones(2, 16, 48).cumsum(1).sin()
        m(x[:, :-1], x[:, 1:])[1].backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model = _model()
    opt = _trained_optimizer(model)
    ckpt.save_checkpoint(
        tmp_path / "c",
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        trainer_state=_fake_state(1),
        config_json=model_config_json(model.config),
    )
    save_pretrained(model, tmp_path / "m")

    def forbidden(*a, **k):
        raise AssertionError("pickle-based loading used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("pickle.load", forbidden)
    monkeypatch.setattr("pickle.loads", forbidden)
    ckpt.load_checkpoint(tmp_path / "c")
    from_pretrained(tmp_path / "m")
    for f in list((tmp_path / "c").iterdir()) + list((tmp_path / "m").iterdir()):
        assert f.suffix in (".json", ".safetensors")


def test_flatten_rejects_objects_that_json_cannot_hold():
    with pytest.raises(TypeError, match="cannot store"):
        ckpt.flatten_state({"x": object()})
    with pytest.raises(TypeError, match="dict keys"):
        ckpt.flatten_state({"a": 1, 2: 3})
    state = {"s": {0: {"t": torch.arange(3)}, 7: {"t": torch.ones(1)}}, "g": [{"betas": (0.9, 0.95), "x": None}]}
    skeleton, tensors = ckpt.flatten_state(state)
    back = ckpt.unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["g"] == state["g"] and set(back["s"]) == {0, 7}
    assert torch.equal(back["s"][0]["t"], torch.arange(3))


def test_rng_state_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = json.loads(json.dumps(ckpt.capture_rng_state()))  # must survive JSON
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_atomic_directory_keeps_the_old_one_on_error(tmp_path):
    target = tmp_path / "d"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary left behind
    with atomic_directory(target) as tmp:  # replacing an existing directory
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_the_last_good_one(tmp_path):
    """A process SIGKILLed halfway through writing step 2 leaves step 1 complete and `latest` pointing at it."""
    run = tmp_path / "run"
    code = f"""
import torch
from astrolom.model.astropt import AstroPT
from astrolom.model.presets import model_config
from astrolom.model.pretrained import model_config_json
from astrolom.train import checkpoint as ckpt
m = AstroPT(model_config("debug", block_size=16, patch_size=4, n_chan=3))
opt = torch.optim.AdamW(m.parameters())
for step in (1, 2):
    p = ckpt.save_checkpoint({str(run)!r} + f"/checkpoints/step-{{step:06d}}", model_state=m.state_dict(),
        optimizer_state=opt.state_dict(), config_json=model_config_json(m.config),
        trainer_state={{"step": step, "tokens_seen": 0, "flops": 0.0, "world_size": 1, "ranks": []}})
    ckpt.mark_latest({str(run)!r}, p)
"""
    proc = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, **fault_env(IN_CHECKPOINT, 2)})
    assert proc.returncode == -9  # SIGKILL
    assert latest_checkpoint(run).name == "step-000001"
    assert [p.name for p in list_checkpoints(run)] == ["step-000001"]
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers and all(".tmp-" in n for n in leftovers)  # the half-written step 2
    assert not (run / "checkpoints" / leftovers[0] / "optimizer.safetensors").exists()
    ckpt.load_checkpoint(latest_checkpoint(run))


def test_latest_falls_back_to_newest_complete_checkpoint(tmp_path):
    model = _model()
    opt = _trained_optimizer(model, 1)
    for step in (1, 2):
        ckpt.save_checkpoint(
            tmp_path / "checkpoints" / checkpoint_name(step),
            model_state=model.state_dict(),
            optimizer_state=opt.state_dict(),
            trainer_state=_fake_state(step),
            config_json=model_config_json(model.config),
        )
    (tmp_path / "checkpoints" / "latest").write_text("step-000099\n")  # dangling pointer
    assert latest_checkpoint(tmp_path).name == "step-000002"
    ckpt.mark_latest(tmp_path, tmp_path / "checkpoints" / "step-000001")
    assert latest_checkpoint(tmp_path).name == "step-000001"


def test_prune_keeps_newest_protected_and_latest(tmp_path):
    model = _model()
    opt = _trained_optimizer(model, 1)
    for step in (1, 2, 3, 4, 5):
        p = ckpt.save_checkpoint(
            tmp_path / "checkpoints" / checkpoint_name(step),
            model_state=model.state_dict(),
            optimizer_state=opt.state_dict(),
            trainer_state=_fake_state(step),
            config_json=model_config_json(model.config),
        )
        ckpt.mark_latest(tmp_path, p)
    ckpt.prune_checkpoints(tmp_path, keep_last=2, protected={1})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000004", "step-000005"]
