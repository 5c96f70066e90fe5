"""Fine-tuning (astrolom.finetune): losses, modes, early stopping output, exact resume, errors, reference import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from astrolom.finetune import FinetuneConfig, Finetuner, load_finetuned
from astrolom.finetune.targets import (
    MOCK_QUESTIONS,
    Targets,
    concentrations,
    dirichlet_multinomial_nll,
    vote_counts,
)
from astrolom.model.astropt import AstroPT, ModelConfig
from astrolom.train.checkpoint import from_pretrained, save_pretrained
from astrolom.train.fault import AFTER_STEP, fault_env

TARGETS = "smooth,disc,spiral,redshift,edge_on"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """160 mock galaxies (32x32 px) and a small AstroPT (8 px patches -> 16 tokens) saved as a pretrained model."""
    from astrolom.mock import generate_survey

    root = tmp_path_factory.mktemp("ft")
    generate_survey(root / "survey", n=160, size=32, seed=3, workers=1, progress=False)
    torch.manual_seed(0)
    save_pretrained(AstroPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, patch_size=8)), root / "model")
    return root


def _cfg(labelled, out=None, **kw) -> FinetuneConfig:
    base = dict(model=str(labelled / "model"), data=str(labelled / "survey"), targets=TARGETS, epochs=4, lr=3e-3,
                batch_size=16, backbone_lr=1e-3, progress=False, out=None if out is None else str(out))  # fmt: skip
    return FinetuneConfig(**{**base, **kw})


def test_vote_counts_are_rebuilt_exactly_and_the_loss_is_dirichlet_multinomial():
    from scipy.stats import dirichlet_multinomial

    # a small tree by hand: 40 volunteers; 10 say disc, 2 of those edge-on, 3 of the 8 face-on see spiral arms
    labels = {"smooth": np.array([29 / 40]), "disc": np.array([10 / 40]), "artefact": np.array([1 / 40]),
              "edge_on_vote": np.array([2 / 10]), "spiral": np.array([3 / 8]), "bar": np.array([0.0])}  # fmt: skip
    assert vote_counts(labels, "smooth_or_featured", 40).tolist() == [[29, 10, 1]]
    assert vote_counts(labels, "edge_on", 40).tolist() == [[2, 8]]
    assert vote_counts(labels, "spiral", 40).tolist() == [[3, 5]]
    with pytest.raises(ValueError, match="not a whole number of votes"):
        vote_counts({**labels, "spiral": np.array([0.3])}, "spiral", 40)
    with pytest.raises(ValueError, match="of 20 voters is not a whole number"):  # the count is the data set's
        vote_counts({**labels, "smooth": np.array([29 / 40])}, "smooth_or_featured", 20)

    alpha = torch.tensor([[2.0, 5.0, 1.5], [1.0, 1.0, 1.0]])
    counts = torch.tensor([[29.0, 10.0, 1.0], [0.0, 0.0, 0.0]])
    nll = dirichlet_multinomial_nll(alpha, counts)
    expected = -dirichlet_multinomial.logpmf([29, 10, 1], alpha[0].numpy(), 40)
    assert nll[0].item() == pytest.approx(expected, rel=1e-5)
    assert nll[1].item() == pytest.approx(0.0, abs=1e-6)  # nobody asked: no information, no loss
    assert float(concentrations(torch.tensor([-50.0, 50.0])).min()) >= 1.0


def test_targets_know_their_kinds_and_share_a_question_block(labelled):
    ft = Finetuner(_cfg(labelled, epochs=1, mode="head"))
    kinds = {s.name: s.kind for s in ft.targets.specs}
    assert kinds == {"smooth": "votes", "disc": "votes", "spiral": "votes", "redshift": "regression",
                     "edge_on": "classification"}  # fmt: skip
    # smooth and disc share the 3-answer smooth_or_featured block; spiral has yes/no; 1 redshift; 2 classes
    assert ft.targets.n_outputs == len(MOCK_QUESTIONS["smooth_or_featured"]) + 2 + 1 + 2
    regressed = Targets.build(["smooth"], ft.train.labels, votes=False)
    assert regressed.specs[0].kind == "regression"
    # the volunteer count comes from the survey's own metadata, not from the simulator's code
    assert ft.train.meta["vote_volunteers"] == 40 and ft.targets.voters == 40
    assert Targets.from_json(ft.targets.to_json()).voters == 40
    with pytest.raises(ValueError, match=r"'smooth' is a vote fraction, but elsewhere does not say how many"):
        Targets.build(["smooth"], ft.train.labels, where="elsewhere")


def test_bad_target_names_the_column_and_the_data(labelled, capsys):
    with pytest.raises(ValueError, match=r"unknown target\(s\) \['smooth_typo'\].*has no such label column"):
        Finetuner(_cfg(labelled, targets="smooth,smooth_typo"))
    from astrolom.cli import main

    rc = main(["finetune", "--model", str(labelled / "model"), "--data", str(labelled / "survey"),
               "--targets", "nosuch", "--out", str(labelled / "bad"), "--no-progress"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "redshift" in err  # names the bad target and lists what exists


def test_finetuning_beats_the_untrained_head_and_writes_a_usable_model(labelled, tmp_path):
    ft = Finetuner(_cfg(labelled, tmp_path / "full", mode="full", epochs=6, patience=6))
    untrained_val = ft.val_loss()
    untrained_test = ft.score(ft.test)
    result = ft.fit()
    assert result.best_val_loss < 0.9 * untrained_val
    assert result.test_scores["redshift"]["r2"] > untrained_test["redshift"]["r2"] + 0.1
    assert result.test_scores["smooth"]["mae"] < untrained_test["smooth"]["mae"]

    # the best epoch's weights are what is kept and written
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert result.best_val_loss == pytest.approx(min(vals))
    assert ft.val_loss() == pytest.approx(result.best_val_loss, rel=1e-5)
    model, targets, info = load_finetuned(tmp_path / "full")
    assert info["result"]["best_epoch"] == int(np.argmin(vals))
    with torch.no_grad():
        preds = targets.predict(model.forward_images(torch.from_numpy(ft.test.images[:8])))
    ref = ft.predict(ft.test.images[:8])
    np.testing.assert_allclose(preds["redshift"], ref["redshift"], rtol=1e-5)
    assert np.all((preds["spiral"] >= 0) & (preds["spiral"] <= 1))
    assert set(preds["edge_on"]) <= {"False", "True"}


@pytest.mark.slow
def test_lora_trains_only_adapters_and_head_and_merges_exactly(labelled, tmp_path):
    original = from_pretrained(labelled / "model").state_dict()
    ft = Finetuner(_cfg(labelled, tmp_path / "lora", mode="lora", lora_r=4, epochs=2))
    trainable = [n for n, p in ft.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any(".qkv.lora_A" in n for n in trainable) and any(".mlp.fc.lora_B" in n for n in trainable)
    ft.fit()
    state = ft.model.backbone.state_dict()
    for name, tensor in original.items():  # base weights untouched (peft keeps them under base_layer)
        key = name if name in state else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[key].cpu(), tensor), name
    assert any(float(v.abs().sum()) > 0 for n, v in state.items() if "lora_B" in n)  # adapters did learn

    merged = from_pretrained(tmp_path / "lora" / "final" / "backbone")
    tokens, _ = ft.model.inputs(torch.from_numpy(ft.val.images[:6]))
    with torch.no_grad():
        ft.model.eval()
        expect = ft.model.features(tokens)
        got = merged.forward_features(tokens, layer=-2).mean(1)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    assert not torch.equal(merged.blocks[0].attn.qkv.weight, original["blocks.0.attn.qkv.weight"])


def test_head_only_leaves_the_backbone_alone(labelled):
    original = from_pretrained(labelled / "model").state_dict()
    ft = Finetuner(_cfg(labelled, mode="head", epochs=2))
    assert {n.split(".")[0] for n, p in ft.model.named_parameters() if p.requires_grad} == {"head"}
    ft.fit()
    for name, tensor in ft.model.backbone.state_dict().items():
        assert torch.equal(tensor.cpu(), original[name]), name


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_losses(labelled, tmp_path):
    # three CLI runs with the same settings, each a fresh process (an in-process reference run inherits whatever
    # earlier tests left in this one): uninterrupted; a real kill (SIGKILL) mid-epoch after step 7 — the latest
    # checkpoint is step 6, so step 7 onwards is replayed — and its `--resume`
    def cmd(out: str) -> list[str]:
        return [sys.executable, "-m", "astrolom", "finetune", "--model", str(labelled / "model"), "--data",
                str(labelled / "survey"), "--targets", TARGETS, "--out", str(tmp_path / out), "--epochs", "3",
                "--batch-size", "16", "--lr", "3e-3", "--backbone-lr", "1e-3",
                "--checkpoint-every", "3", "--no-progress"]  # fmt: skip

    whole = subprocess.run(cmd("whole"), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    env = {**os.environ, **fault_env(AFTER_STEP, 7)}
    killed = subprocess.run(cmd("cut"), env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    resumed = subprocess.run([*cmd("cut"), "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "step-000006" in resumed.stdout + resumed.stderr

    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    a, b = rows(tmp_path / "whole"), rows(tmp_path / "cut")
    assert len([r for r in a if "loss" in r]) >= 9
    assert a == b  # every step loss and validation loss identical, bit for bit
    head_a = load_file(str(tmp_path / "whole" / "final" / "head.safetensors"))
    head_b = load_file(str(tmp_path / "cut" / "final" / "head.safetensors"))
    assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)


def test_finetunes_a_converted_reference_checkpoint(labelled, tmp_path):
    ref = pytest.importorskip("astropt.model")
    from astrolom.cli import main

    d = 16 * 16 * 3
    images = ref.ModalityConfig(name="images", input_size=d, pos_input_size=1, patch_size=16, embed_pos=True)
    config = ref.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, n_chan=3, bias=False, tokeniser="aim")
    config.modalities = [images]
    torch.manual_seed(0)
    gpt = ref.GPT(config, ref.ModalityRegistry([images]), master_process=False)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, n_chan=3, dropout=0.0, tokeniser="aim",
                attn_type="causal", modalities=[images])  # fmt: skip
    torch.save({"model": gpt.state_dict(), "model_args": args, "iter_num": 10}, tmp_path / "ckpt.pt")
    assert main(["convert", "--from-reference", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "imported")]) == 0

    ft = Finetuner(_cfg(labelled, tmp_path / "ft", model=str(tmp_path / "imported"), mode="lora", epochs=4))
    assert ft.patch_size == 16 and ft.train.images.shape[1:] == (32, 32, 3)
    before = ft.val_loss()
    result = ft.fit()
    assert result.best_val_loss < before
    assert (tmp_path / "ft" / "final" / "backbone" / "model.safetensors").is_file()


@pytest.mark.slow
def test_label_efficiency_curves_write_a_table_and_a_figure(labelled, tmp_path):
    from astrolom.finetune.curves import LabelCurves, label_efficiency, parse_counts

    assert parse_counts("20, all") == (20, None)
    with pytest.raises(ValueError, match="integers or 'all'"):
        parse_counts("20,lots")
    curves = label_efficiency(str(labelled / "model"), str(labelled / "survey"), ["smooth", "redshift"],
                              counts=(20, None), steps=6, out=tmp_path, progress=False, log=None)  # fmt: skip
    n_all = curves.settings["n_train_available"]
    assert curves.counts == [20, n_all] and len(curves.points) == 2 * 4 * 2
    assert all(np.isfinite(p.score) for p in curves.points)
    md = (tmp_path / "label_efficiency.md").read_text()
    assert md.count("| 20 |") == 3 and "supervised CNN" in md and "*mean*" in md
    assert (tmp_path / "label_efficiency.png").stat().st_size > 10_000
    again = LabelCurves.from_json(json.loads((tmp_path / "label_efficiency.json").read_text()))
    assert again.mean_score("cnn", 20) == pytest.approx(curves.mean_score("cnn", 20))
    assert set(again.goal()) == {"finetuned_ge_cnn_everywhere", "finetuned_ahead_at_50_200"}
    # every approach's per-object predictions of the continuous targets, scored as the curve scores them
    from astrolom.eval.metrics import PredictionSet, r2

    preds = PredictionSet.read(tmp_path / "predictions")
    assert len(preds.groups()) == 4 * 2 * 2
    for method in ("finetuned", "random_init", "linear_probe", "cnn"):
        for n in (20, n_all):
            g = preds.select(method, f"{n} labels", "redshift")
            assert len(g["object_id"]) == curves.settings["n_test"]
            assert r2(g["truth"], g["prediction"]) == pytest.approx(curves.score(method, n, "redshift"), abs=1e-9)
    assert (tmp_path / "predictions" / f"finetuned__{n_all}_labels__redshift.png").is_file()


def test_a_flux_aware_backbone_is_fed_its_flux_features(labelled, tmp_path):
    """The demo pretrains with flux-aware tokens: fine-tuning and the curves' probes must give the backbone them."""
    from astrolom.data import tokens as tok
    from astrolom.finetune.model import backbone_tokens

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, patch_size=8, flux_features=True)
    save_pretrained(AstroPT(cfg), tmp_path / "flux")
    images = torch.randn(2, 32, 32, 3) + 3.0
    tokens = backbone_tokens(images, cfg)
    batch = tok.tokenize(images, 8)
    assert tokens.shape == (2, 16, 8 * 8 * 3 + 6)
    torch.testing.assert_close(tokens[..., :192], batch.tokens)
    torch.testing.assert_close(tokens[..., 192:], tok.flux_features(batch.tokens, batch.mean, batch.std, 3, 0.01))
    ft = Finetuner(_cfg(labelled, model=str(tmp_path / "flux"), mode="head", epochs=1))
    result = ft.fit()
    assert np.isfinite(result.best_val_loss)


def test_finetune_writes_per_object_test_predictions(labelled, tmp_path, capsys):
    """`astrolom finetune` saves every continuous target's test prediction per object; the photo-z metrics in
    finetune.json are those of the saved predictions."""
    import pyarrow.parquet as pq

    from astrolom.cli import main
    from astrolom.eval import metrics as mt
    from astrolom.eval.figures import prediction_figure

    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(labelled / "model"), "--data", str(labelled / "survey"), "--targets",
                 "smooth,redshift,edge_on", "--out", str(out), "--head-only", "--epochs", "2", "--batch-size", "16",
                 "--no-progress"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    scores = json.loads((out / "final" / "finetune.json").read_text())["result"]["test_scores"]
    assert set(scores["redshift"]) == {"r2", "mae", "sigma_nmad", "bias", "eta"} and set(scores["smooth"]) == {
        "r2", "mae"}  # fmt: skip
    preds = mt.PredictionSet.read(out / "predictions")
    assert preds.groups() == [("finetuned", "head", "smooth"), ("finetuned", "head", "redshift")]  # no class target
    z = preds.select("finetuned", "head", "redshift")
    survey = pq.read_table(labelled / "survey", columns=["object_id", "split", "redshift"]).to_pydict()
    truth = {o: r for o, s, r in zip(survey["object_id"], survey["split"], survey["redshift"], strict=True)
             if s == "test"}  # fmt: skip
    assert sorted(z["object_id"]) == sorted(truth) and set(z["split"]) == {"test"}
    np.testing.assert_allclose(z["truth"], [truth[o] for o in z["object_id"]])
    assert mt.sigma_nmad(z["truth"], z["prediction"]) == pytest.approx(scores["redshift"]["sigma_nmad"], rel=1e-6)
    assert mt.r2(z["truth"], z["prediction"]) == pytest.approx(scores["redshift"]["r2"], rel=1e-6)
    smooth = preds.select("finetuned", "head", "smooth")["prediction"]
    assert np.all((smooth >= 0) & (smooth <= 1))  # the expected vote fraction
    assert f"sigma_nmad {scores['redshift']['sigma_nmad']:.4g}" in printed and "per-object test predictions" in printed
    for target in ("smooth", "redshift"):
        assert prediction_figure(out / "predictions", "finetuned", "head", target).with_suffix(".png").is_file()
