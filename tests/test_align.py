"""Alignment (issue 9): InfoNCE values, the learnable scale's gradient, heads, exact resume and DDP parity."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from pretrain_helpers import read_metrics, subprocess_env, torch_threads
from safetensors.torch import load_file

from astrolom.align.encoder import load_aligned
from astrolom.align.features import FeatureCache, augment, view_element
from astrolom.align.loss import ContrastiveLoss, clip_loss
from astrolom.align.model import AlignConfig, AlignModel, AttentionPool
from astrolom.align.train import FEATURES_NAME, AlignTrainConfig, AlignTrainer
from astrolom.eval.recipe import recipe_of
from astrolom.train import checkpoint as ckpt
from astrolom.train.fault import AFTER_STEP, fault_env


def test_infonce_known_values():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    a = torch.stack([e1, e2])
    # perfectly paired orthonormal rows: each direction is log(1 + e^{-s})
    assert clip_loss(a, a, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # b = [e1, e1]: a->b gives log 2 per row; b->a gives log(1+e^-1) and log(1+e)
    b = torch.stack([e1, 3 * e1])  # scale of a row must not matter (L2-normalised inside)
    want = 0.5 * (math.log(2) + 0.5 * (math.log(1 + math.exp(-1)) + math.log(1 + math.e)))
    assert clip_loss(a, b, 1.0).item() == pytest.approx(want, abs=1e-6)
    # the default fixed scale is 15.5
    s = 15.5
    want = 0.5 * (math.log(2) + 0.5 * (math.log(1 + math.exp(-s)) + math.log(1 + math.exp(s))))
    assert ContrastiveLoss()(a, b).item() == pytest.approx(want, rel=1e-5)


def test_learnable_scale_enters_the_loss():
    torch.manual_seed(0)
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    fixed = ContrastiveLoss(15.5)
    assert not any(p.requires_grad for p in fixed.parameters())
    learn = ContrastiveLoss(15.5, learnable=True)
    loss = learn(a, b)
    assert loss.item() == pytest.approx(fixed(a, b).item(), rel=1e-6)  # same scale at initialisation
    loss.backward()
    g = learn.log_scale.grad
    assert g is not None and abs(g.item()) > 1e-4
    # the gradient is the loss's derivative in log(scale): compare with a finite difference
    eps = 1e-3
    up = clip_loss(a, b, math.exp(math.log(15.5) + eps)).item()
    down = clip_loss(a, b, math.exp(math.log(15.5) - eps)).item()
    assert g.item() == pytest.approx((up - down) / (2 * eps), rel=1e-2)


def test_attention_pool_ignores_padding():
    torch.manual_seed(0)
    pool = AttentionPool(8, 16, 4).eval()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y = pool(x, mask)
    x2 = x.clone()
    x2[0, 3:] = 1e3  # padded tokens changed: row 0 must not move
    assert torch.allclose(pool(x2, mask)[0], y[0], atol=1e-6)
    with pytest.raises(ValueError, match="no real token"):
        pool(x, torch.zeros(2, 5, dtype=torch.bool))


def test_heads_shapes_and_gradients():
    torch.manual_seed(0)
    model = AlignModel(AlignConfig(image_dim=8, spectrum_dim=6, embed_dim=32, head_dim=16, n_heads=2))
    loss = model(torch.randn(4, 5, 8), torch.randn(4, 7, 6), torch.ones(4, 7, dtype=torch.bool))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    z = model.encode("images", torch.randn(3, 5, 8))
    assert z.shape == (3, 32) and torch.allclose(z.norm(dim=-1), torch.ones(3))


def test_sky_respecting_augmentations():
    img = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)
    assert sorted(view_element(v) for v in range(8)) == list(range(8))  # views 0..7 are the eight D4 elements
    assert view_element(1) == 1 and view_element(5) == 7  # one quarter turn; one turn, then a mirror
    zero_noise = np.random.default_rng(0)
    views = {augment(img, v, np.ones(2), 0.0, zero_noise).tobytes() for v in range(8)}
    assert len(views) == 8  # the eight D4 elements are distinct
    for v in range(8):  # no element moves the centre: the central 2x2 block keeps its pixels
        view = augment(img, v, np.ones(2), 0.0, zero_noise)
        assert sorted(view[1:3, 1:3].ravel()) == sorted(img[1:3, 1:3].ravel())
    rng = np.random.default_rng(0)
    assert augment(img, 0, np.ones(2), 0.5, rng) is img  # view 0 is the stamp itself
    noisy = augment(img, 8, np.array([1.0, 2.0]), 0.5, rng)  # element 0 (identity) + noise
    resid = noisy - img
    assert resid.std(axis=(0, 1))[1] > resid.std(axis=(0, 1))[0]  # noise scales with each band's sky sigma


def _synthetic_cache(path: Path, n: int = 96, seed: int = 0, size: int = 4) -> Path:
    """Pairs whose image and spectrum tokens share a latent vector: alignable, like real paired data."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g)
    wi, ws = torch.randn(4, 8, generator=g), torch.randn(4, 6, generator=g)
    img = (z @ wi)[:, None, None, :] + 0.3 * torch.randn(n, 2, 3, 8, generator=g)
    spec = (z @ ws)[:, None, :] + 0.3 * torch.randn(n, 5, 6, generator=g)
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[::3, 4] = False
    splits = ["train"] * (n - 32) + ["val"] * 16 + ["test"] * 16
    images = torch.randn(n, size, size, 3, generator=g) + z[:, :1, None, None]
    spectra = torch.randn(n, 64, generator=g) + z[:, 1:2]
    names = ["redshift", "log_mstar", "log_ssfr"]
    ids = [f"o{i}" for i in range(n)]
    cache = FeatureCache(
        img, spec, mask, z[:, :3].clone(), images, spectra, ids, splits, names, {"sky_sigma": [1.0] * 3}
    )
    return cache.save(path / FEATURES_NAME)


def _cfg(out: Path, **kw) -> AlignTrainConfig:
    head = AlignConfig(embed_dim=16, head_dim=16, n_heads=2)
    base = dict(
        out=str(out),
        steps=6,
        batch_size=16,
        lr=3e-3,
        warmup_steps=2,
        eval_interval=3,
        checkpoint_interval=3,
        progress=False,
        head=head,
    )
    return AlignTrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_training_lowers_loss_and_keeps_best(tmp_path):
    _synthetic_cache(tmp_path)
    res = AlignTrainer(_cfg(tmp_path, steps=30, eval_interval=10)).fit()
    rows = read_metrics(tmp_path)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] and vals[0] < math.log(16)  # chance is log(batch)
    assert res["best_val_loss"] == pytest.approx(min(vals))
    model, cfg = load_aligned(tmp_path)
    assert cfg["model_type"] == "astrolom-align" and model.config.embed_dim == 16


def test_resume_is_exact(tmp_path):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    for d in (straight, resumed):
        d.mkdir()
        _synthetic_cache(d)
    AlignTrainer(_cfg(straight)).fit()
    AlignTrainer(_cfg(resumed)).fit()
    # throw away everything after step 3, then resume from the step-3 checkpoint
    import shutil

    shutil.rmtree(resumed / "checkpoints" / ckpt.checkpoint_name(6))
    ckpt.mark_latest(resumed, ckpt.list_checkpoints(resumed)[-1])
    assert ckpt.latest_checkpoint(resumed).name == ckpt.checkpoint_name(3)
    shutil.rmtree(resumed / "final")
    trainer = AlignTrainer(_cfg(resumed), resume=True)
    assert trainer.step == 3
    trainer.fit()
    wa = load_file(str(straight / "final" / ckpt.WEIGHTS_NAME))
    wb = load_file(str(resumed / "final" / ckpt.WEIGHTS_NAME))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _align_args(out: Path, *extra: str) -> list[str]:
    return ["align", "--image-model", "-", "--spectrum-model", "-", "--data", "-", "--out", str(out), "--steps", "6",
            "--batch-size", "16", "--lr", "3e-3", "--embed-dim", "16", "--eval-interval", "3",
            "--checkpoint-interval", "2", "--no-progress", *extra]  # fmt: skip


def _align_cli(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "astrolom", *_align_args(out, *extra)]
    return subprocess.run(cmd, env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=180)


def _align_here(out: Path) -> int:
    """The same command in this process, on one thread like the subprocesses: the uninterrupted run to compare with."""
    from astrolom.cli import main

    with torch_threads(1):
        return main(_align_args(out))


@pytest.mark.slow
def test_sigkill_and_resume_is_exact_and_logs_every_step_once(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for d in (whole, cut):
        d.mkdir()
        _synthetic_cache(d)
    assert _align_here(whole) == 0
    killed = _align_cli(cut, env=fault_env(AFTER_STEP, 5))
    assert killed.returncode == -9, killed.stderr  # SIGKILL after step 5: the latest checkpoint is step 4
    assert ckpt.latest_checkpoint(cut).name == ckpt.checkpoint_name(4)
    assert [r["step"] for r in read_metrics(cut)] == [1, 2, 3, 4, 5]
    resumed = _align_cli(cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_metrics(whole), read_metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # step 5 recomputed, its killed row dropped, not repeated
    assert a == b  # losses, learning rates and validation losses bit for bit
    wa = load_file(str(whole / "final" / ckpt.WEIGHTS_NAME))
    wb = load_file(str(cut / "final" / ckpt.WEIGHTS_NAME))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_two_ranks_match_one_process(tmp_path):
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        out.mkdir()
        _synthetic_cache(out)
        args = [
            "--image-model",
            "-",
            "--spectrum-model",
            "-",
            "--data",
            "-",
            "--out",
            str(out),
            "--steps",
            "4",
            "--batch-size",
            "16",
            "--lr",
            "3e-3",
            "--embed-dim",
            "16",
            "--eval-interval",
            "2",
            "--checkpoint-interval",
            "0",
            "--no-progress",
        ]
        if nproc == 1:  # the one-process run in this process (one thread, as the ranks): no interpreter start-up
            from astrolom.cli import main

            with torch_threads(1):
                assert main(["align", *args]) == 0
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            cmd += ["-m", "astrolom", "align", *args]
            done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=180, check=False)
            assert done.returncode == 0, done.stdout + done.stderr
        runs[nproc] = out
    a, b = read_metrics(runs[1]), read_metrics(runs[2])
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], abs=1e-5)
    assert json.loads((runs[2] / "config.json").read_text())["world_size"] == 2
    wa, wb = (
        load_file(str(runs[1] / "final" / "model.safetensors")),
        load_file(str(runs[2] / "final" / "model.safetensors")),
    )
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-4, k


@pytest.fixture(scope="module")
def aligned_run(tmp_path_factory):
    """160 synthetic pairs (16 test) and 20 steps of heads, read-only: both eval-align tests score this one run."""
    run = tmp_path_factory.mktemp("aligned_run")
    _synthetic_cache(run, n=160, size=16)
    AlignTrainer(_cfg(run, steps=20, eval_interval=10)).fit()
    return run


@pytest.mark.slow
def test_eval_align_end_to_end(aligned_run, tmp_path):
    from astrolom.align.evaluate import evaluate_alignment

    # two flows per ensemble, not the default four: the mixture itself is checked in test_align_eval.py
    res = evaluate_alignment(str(aligned_run), None, tmp_path / "eval", cnn_epochs=2, flow_epochs=3, flow_members=2,
                             log=lambda m: None)  # fmt: skip
    r = res["retrieval"]["image→spectrum"]
    assert r["n"] == 16 and r["chance@10"] == pytest.approx(10 / 16)
    assert r["recall@1"] > 3 * r["chance@1"]  # the synthetic pairs share a latent: aligned far above chance
    assert set(res["posteriors"]) >= {"image aligned", "image unaligned", "spectrum aligned", "photometry"}
    assert "image CNN (supervised)" in res["properties_r2"] and "spectrum CNN (supervised)" in res["properties_r2"]
    import pyarrow.parquet as pq

    emb = pq.read_table(tmp_path / "eval" / "aligned_embeddings.parquet")
    assert emb.num_rows == 160 and len(emb["embedding_spectra"][0]) == 16
    recipe = recipe_of(json.loads(emb.schema.metadata[b"astrolom"]))  # the run, so that its index embeds queries
    assert recipe.aligned and recipe.model == str(aligned_run.resolve()) and recipe.main_modality == "images"
    for name in ("align_eval.json", "align_eval.md", "retrieval.png", "tarp.png", "corner.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    md = (tmp_path / "eval" / "align_eval.md").read_text()
    assert "| image→spectrum |" in md and "test NLL" in md
    # per-object predictions: every property row, the supervised baselines and the flows' posterior medians/widths
    from astrolom.eval import metrics as mt
    from astrolom.eval.figures import prediction_figure

    preds = mt.PredictionSet.read(tmp_path / "eval" / "predictions")
    groups = set(preds.groups())
    for row, r2s in res["properties_r2"].items():
        fs, method = row.replace(" (supervised)", " · supervised").split(" · ")
        for t, r2 in r2s.items():
            g = preds.select(fs, method, t)
            assert mt.r2(g["truth"], g["prediction"]) == pytest.approx(r2, abs=1e-9), (row, t)
            assert len(g["object_id"]) == 16 and np.isnan(g["posterior_sigma"]).all()
    flow = preds.select("image aligned", "flow", "redshift")
    assert len(flow["object_id"]) == 16 and (flow["posterior_sigma"] > 0).all()
    assert {(fs, "flow", "log_ssfr") for fs in res["posteriors"]} <= groups
    photo_z = {(r["feature_set"], r["method"]): r for r in res["photo_z"]}
    z = preds.select("image aligned", "zero-shot kNN", "redshift")
    assert photo_z["image aligned", "zero-shot kNN"]["sigma_nmad"] == pytest.approx(
        mt.sigma_nmad(z["truth"], z["prediction"])
    )
    assert "## Photometric redshift" in md and "| image aligned | flow | 16 |" in md
    for method in ("zero-shot kNN", "flow"):
        stem = prediction_figure(tmp_path / "eval" / "predictions", "image aligned", method, "redshift")
        assert stem.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_eval_align_quick_keeps_retrieval_and_zero_shot_only(aligned_run, tmp_path):
    from astrolom.align.evaluate import evaluate_alignment, markdown

    out = tmp_path / "eval"
    out.mkdir()
    (out / "tarp.png").write_bytes(b"stale")  # a full run's figure from before must not survive a quick one
    res = evaluate_alignment(str(aligned_run), None, out, quick=True, log=lambda m: None)
    assert res["quick"] is True and res["posteriors"] == {}
    r = res["retrieval"]["image→spectrum"]
    assert r["recall@1"] > 3 * r["chance@1"]
    assert set(res["properties_r2"]) == {
        f"{m} {k} · zero-shot kNN" for m in ("image", "spectrum") for k in ("aligned", "unaligned")
    }
    assert all(-1.0 < v <= 1.0 for row in res["properties_r2"].values() for v in row.values())
    assert (out / "retrieval.png").stat().st_size > 0
    assert not (out / "tarp.png").exists() and not (out / "corner.png").exists()
    assert "test NLL" not in markdown(res) and "| image→spectrum |" in markdown(res)
    from astrolom.eval.metrics import PredictionSet

    methods = {m for _, m, _ in PredictionSet.read(out / "predictions").groups()}
    assert methods == {"zero-shot kNN"} and {r["method"] for r in res["photo_z"]} == {"zero-shot kNN"}


def test_posterior_summary_is_the_median_and_half_the_central_68_percent():
    from astrolom.align.posteriors import posterior_summary

    rng = np.random.default_rng(0)
    mu, sd = np.array([[0.3, 10.0], [1.2, 9.0]]), np.array([[0.05, 0.2], [0.1, 0.4]])
    samples = mu + sd * rng.standard_normal((40000, 2, 2))
    out = posterior_summary(samples, ["a", "b", "c"], np.array([2, 0]), mu)
    assert list(out["test_ids"]) == ["c", "a"]
    np.testing.assert_allclose(out["test_median"], mu, rtol=0, atol=0.01)
    np.testing.assert_allclose(out["test_sigma"], sd, rtol=0.03)


def test_spectrum_encoder_may_be_a_multimodal_model_that_saw_spectra_first():
    from astrolom.align.encoder import reads_alone
    from astrolom.model.astropt import ModelConfig

    def cfg(mods, order="fixed"):
        return ModelConfig(n_layer=1, n_head=1, n_embd=8, modalities=mods, modality_order=order)

    assert reads_alone(cfg(("spectra",)), "spectra") and reads_alone(cfg(("images",)), "images")
    assert reads_alone(cfg(("images", "spectra"), "random"), "spectra")  # half its samples began with the spectrum
    assert reads_alone(cfg(("spectra", "images")), "spectra")  # fixed order, spectra first
    assert not reads_alone(cfg(("images", "spectra")), "spectra")  # spectra always came after the image
    assert not reads_alone(cfg(("images", "spectra"), "random"), "images")  # image encoders stay images-only
    assert not reads_alone(cfg(("images",)), "spectra")
