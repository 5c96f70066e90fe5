"""Parity with the 2024-era reference AstroPT (`astropt==1.0.4`, the code that wrote the paper's checkpoints).

1.0.4 and 2.0.9 cannot share a site-packages, so the oracle runs in a subprocess (tests/oracle_astropt1.py) with
`.oracles/astropt-1.0.4` (made by `scripts/setup.sh --dev`; override with ASTROLOM_ASTROPT1_DIR) first on sys.path.
One subprocess run per module builds every reference model, saves it the way its training script does, and
reports its outputs; the tests import those files and compare within 1e-5 (predictions, loss, embeddings), and
compare the paper's preprocessing of a real JPEG (matplotlib's sample_data/grace_hopper.jpg) bit for bit.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle_astropt1 import run_oracle

from astrolom.data.tokens import tokenize, tokenize_paper2024
from astrolom.interop.astropt_v1 import export_v1_checkpoint, load_v1_checkpoint
from astrolom.interop.reference import ReferenceFormatError, load_reference_checkpoint, read_reference_checkpoint
from astrolom.model.astropt import AstroPT, ModelConfig

pytestmark = pytest.mark.slow  # each test runs astropt 1.0.4 in a subprocess

ROOT = Path(__file__).resolve().parents[1]
ORACLE = Path(os.environ.get("ASTROLOM_ASTROPT1_DIR", ROOT / ".oracles" / "astropt-1.0.4"))
TOL = 1e-5
# (name, model_args as scripts/train.py writes them (bias only where set on the command line), compiled)
VARIANTS = [
    ("rgb", dict(n_layer=3, n_head=4, n_embd=64, n_chan=3, block_size=80, dropout=0.0, patch_size=16,
                 attn_type="causal"), True),
    ("fits_bias", dict(n_layer=2, n_head=2, n_embd=32, n_chan=1, block_size=40, dropout=0.0, patch_size=8,
                       attn_type="causal", bias=True), False),
]  # fmt: skip
PAPER_ARGS = dict(n_layer=2, n_head=4, n_embd=32, n_chan=3, block_size=64, dropout=0.0, patch_size=16)


def _jpeg() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _pixels() -> np.ndarray:
    """The real JPEG decoded by PIL, centre 512 x 512 (the paper's cutout size); (H, W, 3) uint8."""
    from PIL import Image

    with Image.open(_jpeg()) as im:
        arr = np.asarray(im)  # (600, 512, 3)
    top = (arr.shape[0] - 512) // 2
    return arr[top : top + 512].copy()


def _export_model() -> AstroPT:
    torch.manual_seed(21)
    model = AstroPT(ModelConfig(n_layer=2, n_head=4, n_embd=48, block_size=36, patch_size=16, n_chan=3,
                                tokeniser="paper", bias=True)).eval()  # fmt: skip
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    if not (ORACLE / "astropt" / "model.py").is_file():
        pytest.skip(f"astropt 1.0.4 oracle not installed at {ORACLE} (run scripts/setup.sh --dev)")
    d = tmp_path_factory.mktemp("oracle")
    jobs = []
    for i, (name, args, compiled) in enumerate(VARIANTS):
        d_in = args["patch_size"] ** 2 * args["n_chan"]
        torch.save(torch.randn(3, 33, d_in, generator=torch.Generator().manual_seed(i)), d / f"{name}_tokens.pt")
        jobs.append({"kind": "train_ckpt", "name": name, "model_args": args, "seed": 10 + i, "compiled": compiled,
                     "path": str(d / f"{name}_ckpt.pt"), "tokens": str(d / f"{name}_tokens.pt")})  # fmt: skip
    torch.save(torch.randn(2, 30, 768, generator=torch.Generator().manual_seed(7)), d / "export_tokens.pt")
    export_v1_checkpoint(_export_model(), d / "exported.pt")
    jobs.append(
        {"kind": "load", "name": "export", "path": str(d / "exported.pt"), "tokens": str(d / "export_tokens.pt")}
    )
    np.save(d / "pixels.npy", _pixels())
    torch.save(torch.zeros(1, 2, 768), d / "paper_tokens.pt")
    jobs.append({"kind": "train_ckpt", "name": "paper", "model_args": PAPER_ARGS, "seed": 3, "compiled": True,
                 "path": str(d / "paper_ckpt.pt"), "tokens": str(d / "paper_tokens.pt")})  # fmt: skip
    jobs.append(
        {"kind": "preprocess", "name": "jpeg", "pixels": str(d / "pixels.npy"), "path": str(d / "paper_ckpt.pt")}
    )
    return d, run_oracle(jobs, d, ORACLE)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def _compare(model: AstroPT, out: dict, name: str, tokens: torch.Tensor) -> dict[str, float]:
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        pred, loss = model(x, y)
        hidden = model.forward_intermediates(x)[-1]  # the reference's get_embeddings: last block, before ln_f
    diffs = {
        "pred": _maxdiff(out[f"{name}/pred"], pred),
        "loss": _maxdiff(out[f"{name}/loss"], loss),
        "emb": _maxdiff(out[f"{name}/emb"], hidden),
        "mean_emb": _maxdiff(out[f"{name}/mean_emb"], hidden.mean(dim=1)),
    }
    assert all(v <= TOL for v in diffs.values()), diffs
    assert out[f"{name}/pred"].abs().max() > 0.1  # the outputs compared are not trivially zero
    return diffs


@pytest.mark.parametrize(("name", "args", "compiled"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_training_checkpoint_imports_with_reference_outputs(oracle, name, args, compiled):
    d, out = oracle
    path = d / f"{name}_ckpt.pt"
    ckpt = read_reference_checkpoint(path)  # weights-only: the optimiser state and config come back as data
    assert any(k.startswith("_orig_mod.") for k in ckpt["model"]) == compiled
    model = load_reference_checkpoint(path)
    cfg = model.config
    assert (cfg.tokeniser, cfg.tokens_preset) == ("paper", "paper2024")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == tuple(
        args[k] for k in ("n_layer", "n_head", "n_embd", "block_size")
    )
    assert (cfg.patch_size, cfg.n_chan, cfg.bias) == (args["patch_size"], args["n_chan"], args.get("bias", False))
    _compare(model, out, name, torch.load(d / f"{name}_tokens.pt", weights_only=True))


def test_exported_checkpoint_loads_in_reference_with_same_outputs(oracle):
    d, out = oracle
    model = _export_model()
    _compare(model, out, "export", torch.load(d / "export_tokens.pt", weights_only=True))
    back = load_reference_checkpoint(d / "exported.pt")  # and the round trip is exact
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_paper_preprocessing_of_a_real_jpeg_is_bit_identical(oracle):
    d, out = oracle
    pixels = _pixels()
    ours = tokenize_paper2024(torch.from_numpy(pixels.copy())[None], 16)[0]
    ref = out["jpeg/tokens"]
    assert ref.dtype == torch.float16 and ref.shape == (1024, 768)
    assert torch.equal(ours, ref.float())  # bit for bit: transpose, patching, normalisation, float16, spiral
    # the transposition matters: astrolom's own H x W tokenisation of the same pixels is another sequence
    plain = tokenize(torch.from_numpy(pixels)[None].float(), 16).tokens[0]
    assert _maxdiff(plain, ours) > 1.0
    # torchvision's reader casts uint8 to bfloat16, which is exact for 0..255; its local-file path (use_hf=False)
    # then normalises in bfloat16 and does not transpose: the same patches differ by bfloat16 rounding there
    assert bool(out["jpeg/bf16_exact"])
    untransposed = tokenize_paper2024(torch.from_numpy(pixels.transpose(1, 0, 2).copy())[None])[0]
    delta = (out["jpeg/local_tokens"].float() - untransposed).abs()
    assert 0.05 < delta.max() < 1.0 and 1e-3 < delta.mean() < 0.02, (delta.max(), delta.mean())

    model = load_reference_checkpoint(d / "paper_ckpt.pt")
    with torch.no_grad():
        emb = model.forward_intermediates(ours[None, :64])[-1].mean(dim=1)
    assert _maxdiff(out["jpeg/emb"], emb) <= TOL


def test_embedding_a_jpeg_folder_uses_the_paper_preprocessing(oracle, tmp_path):
    from PIL import Image

    from astrolom.data.sources import open_source
    from astrolom.eval.embed import embed_records, embed_tokens

    d, out = oracle
    (tmp_path / "full").mkdir()
    (tmp_path / "crop").mkdir()
    shutil.copy(_jpeg(), tmp_path / "full" / "hopper.jpg")  # the shipped file itself (600 x 512)
    Image.fromarray(_pixels()).save(tmp_path / "crop" / "hopper.png")  # its decoded 512 x 512 centre, losslessly
    model = load_reference_checkpoint(d / "paper_ckpt.pt")
    got = {}
    for name in ("full", "crop"):
        source = open_source(str(tmp_path / name))
        records = list(source.records())
        source.close()
        (emb,) = [e for _, e in embed_records(model, records, layer=-1, n_tokens=64)]
        got[name] = emb[0]
    tokens = tokenize_paper2024(torch.from_numpy(_pixels())[None])
    with torch.no_grad():
        expected = embed_tokens(model, tokens, -1, 64)[0]
    assert _maxdiff(torch.from_numpy(got["crop"]), expected) <= TOL
    # the path really is the paper's: astrolom's own tokens of the same pixels give another embedding
    with torch.no_grad():
        plain = embed_tokens(model, tokenize(torch.from_numpy(_pixels())[None].float(), 16).tokens, -1, 64)[0]
    assert _maxdiff(plain, expected) > 1e-2
    assert got["full"].shape == expected.shape  # the shipped 600 x 512 file embeds too (centre crop)


def test_v1_refusals(tmp_path, oracle):
    d, _ = oracle
    ckpt = read_reference_checkpoint(d / "rgb_ckpt.pt")
    with pytest.raises(ReferenceFormatError, match="prefix"):
        load_v1_checkpoint({**ckpt, "model_args": {**ckpt["model_args"], "attn_type": "prefix"}})
    with pytest.raises(ReferenceFormatError, match="n_layer"):
        load_v1_checkpoint({**ckpt, "model_args": {**ckpt["model_args"], "n_layer": 5}})
    with pytest.raises(ReferenceFormatError, match="bias"):
        load_v1_checkpoint({**ckpt, "model_args": {**ckpt["model_args"], "bias": True}})
    with pytest.raises(ReferenceFormatError, match="n_head"):
        load_v1_checkpoint(ckpt["model"])
    assert load_v1_checkpoint(ckpt["model"], model_args={"n_head": 4, "n_chan": 3}).config.patch_size == 16

    aim = AstroPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, patch_size=4, tokeniser="aim"))
    with pytest.raises(ReferenceFormatError, match="only the ReLU-MLP 'paper' tokeniser"):
        export_v1_checkpoint(aim, tmp_path / "x.pt")
    flux = AstroPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, patch_size=4, tokeniser="paper",
                               flux_features=True))  # fmt: skip
    with pytest.raises(ReferenceFormatError, match="flux"):
        export_v1_checkpoint(flux, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_convert_cli_imports_and_exports_v1(oracle, tmp_path, capsys):
    from astrolom.interop import convert
    from astrolom.model.pretrained import from_pretrained, read_config

    d, out = oracle
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    assert (
        convert.run(parser.parse_args(["--from-reference", str(d / "rgb_ckpt.pt"), "--out", str(tmp_path / "m")])) == 0
    )
    assert "astropt 1.0.x" in capsys.readouterr().out
    assert read_config(tmp_path / "m")["model"]["tokens_preset"] == "paper2024"
    model = from_pretrained(tmp_path / "m")
    _compare(model, out, "rgb", torch.load(d / "rgb_tokens.pt", weights_only=True))
    assert convert.run(parser.parse_args(["--to-reference", str(tmp_path / "m"), "--out", str(tmp_path / "b.pt")])) == 0
    back = torch.load(tmp_path / "b.pt", weights_only=True)
    assert "transformer.wte.0.weight" in back["model"] and back["model_args"]["patch_size"] == 16
