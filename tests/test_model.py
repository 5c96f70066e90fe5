"""AstroPT model: every preset (timm-style sweep), feature API, causality, generation, configs, `astrolom presets`."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from astrolom import cli
from astrolom.model.astropt import AstroPT, ModelConfig
from astrolom.model.presets import PRESETS, count_params, get_preset, model_config

SMALL = ["debug", "1m", "5m", "12m"]  # run forward/backward on CPU
LARGE = [name for name in PRESETS if name not in SMALL]  # counted on the meta device only


def _tokens(cfg: ModelConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, cfg.input_dim, generator=g)


def _seeded_model(cfg: ModelConfig, seed: int = 0) -> AstroPT:
    torch.manual_seed(seed)
    return AstroPT(cfg).eval()


@pytest.mark.parametrize("name", SMALL)
def test_small_preset_forward_backward(name):
    cfg = model_config(name, block_size=16, patch_size=8)
    model = _seeded_model(cfg).train()
    x = _tokens(cfg, 2, 9)
    pred, loss = model(x[:, :-1], x[:, 1:])
    assert pred.shape == (2, 8, cfg.input_dim)
    assert torch.isfinite(pred).all() and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("tokeniser", ["aim", "affine", "paper"])
@pytest.mark.parametrize("bias", [False, True])
def test_tokeniser_variants_train(tokeniser, bias):
    cfg = model_config("debug", block_size=16, patch_size=4, tokeniser=tokeniser, bias=bias)
    model = _seeded_model(cfg).train()
    x = _tokens(cfg, 2, 6)
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    has_bias = any(n.endswith("ln_f.bias") for n, _ in model.named_parameters())
    assert has_bias == bias


def _paper_count(cfg: ModelConfig) -> int:
    """Independent arithmetic of the 2024 model's neural parameters (no position embeddings, bias=False)."""
    L, C, D = cfg.n_layer, cfg.n_embd, cfg.input_dim
    blocks = L * (12 * C * C + 2 * C)  # qkv 3C^2, proj C^2, MLP 8C^2, two LayerNorm weights
    tokeniser = (D * C + C) + (C * C + C)  # Linear-ReLU-Linear-ReLU, always with biases
    decoder = (C * 2 * C + 2 * C) + (2 * C * C + C) + (C * D + D)
    return blocks + C + tokeniser + decoder  # + ln_f weight


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.paper_params])
def test_preset_parameter_count_matches_table_1(name):
    preset = get_preset(name)
    cfg = model_config(name, tokeniser="paper")
    n = count_params(cfg)
    assert n == _paper_count(cfg)
    assert abs(n / preset.paper_params - 1) < 0.15, f"{name}: {n:,} vs Table 1 {preset.paper_params:,.0f}"


@pytest.mark.parametrize("name", LARGE)
def test_large_preset_builds_on_meta(name):
    cfg = model_config(name)
    with torch.device("meta"):
        model = AstroPT(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert len(model.blocks) == cfg.n_layer
    total = count_params(cfg, non_embedding=False)
    assert total - count_params(cfg) == cfg.block_size * cfg.n_embd
    assert total == sum(p.numel() for p in model.parameters())


@pytest.mark.slow  # 58 s on a loaded 2-core machine
def test_overfits_one_batch():
    cfg = model_config("debug", block_size=32, patch_size=8)
    model = _seeded_model(cfg).train()
    x = _tokens(cfg, 4, 17)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        _, loss = model(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        if loss.item() < first / 10:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, f"loss {first:.4f} -> {loss.item():.4f} after 300 steps"


def test_causal_future_tokens_do_not_change_past_predictions():
    cfg = model_config("debug", block_size=32, patch_size=4)
    model = _seeded_model(cfg)
    x = _tokens(cfg, 2, 20)
    t = 11
    y = x.clone()
    y[:, t] += 3.0 * torch.randn_like(y[:, t])
    with torch.no_grad():
        px, _ = model(x)
        py, _ = model(y)
        fx = model.forward_intermediates(x)
        fy = model.forward_intermediates(y)
    torch.testing.assert_close(py[:, :t], px[:, :t], rtol=0, atol=1e-6)
    assert (py[:, t:] - px[:, t:]).abs().amax(dim=(0, 2)).min() > 1e-4  # every later position does see it
    for hx, hy in zip(fx, fy, strict=True):
        torch.testing.assert_close(hy[:, :t], hx[:, :t], rtol=0, atol=1e-6)


def test_feature_api_matches_block_outputs():
    cfg = model_config("debug", n_layer=4, block_size=16, patch_size=4, bias=True)
    model = _seeded_model(cfg)
    x = _tokens(cfg, 3, 10)
    with torch.no_grad():
        h = model.tokenisers["images"](x) + model.pos_emb(torch.arange(10))
        expected = []
        for block in model.blocks:
            h = block(h)
            expected.append(h)
        inter = model.forward_intermediates(x)
        assert len(inter) == 4
        for got, want in zip(inter, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_features(x), expected[2], rtol=0, atol=0)  # layer -2
        torch.testing.assert_close(model.forward_features(x, layer=1), expected[1], rtol=0, atol=0)
        final = model.forward_features(x, layer=-1)
        torch.testing.assert_close(final, model.ln_f(expected[3]), rtol=0, atol=0)
        torch.testing.assert_close(model.decoders["images"](final), model(x)[0], rtol=0, atol=0)
        assert len(model.forward_intermediates(x, stop_at=1)) == 2
        assert len(model.forward_intermediates(x, stop_at=-1)) == 4
    for bad in (4, -5):
        with pytest.raises(ValueError, match="out of range"):
            model.forward_features(x, layer=bad)
        with pytest.raises(ValueError, match="out of range"):
            model.forward_intermediates(x, stop_at=bad)


def test_block_size_overflow_is_a_clear_error():
    cfg = model_config("debug", block_size=8, patch_size=4)
    model = _seeded_model(cfg)
    with pytest.raises(ValueError, match="exceeds block_size=8"):
        model(_tokens(cfg, 1, 9))
    pred, _ = model(_tokens(cfg, 1, 8))  # exactly block_size is fine
    assert pred.shape[1] == 8


def test_generate_shapes_and_determinism():
    cfg = model_config("debug", block_size=16, patch_size=4)
    model = _seeded_model(cfg)
    prefix = _tokens(cfg, 2, 5)
    out = model.generate(prefix, 4)
    assert out.shape == (2, 9, cfg.input_dim)
    torch.testing.assert_close(out[:, :5], prefix, rtol=0, atol=0)
    torch.testing.assert_close(model.generate(prefix, 4), out, rtol=0, atol=0)
    with torch.no_grad():
        for t in range(5, 9):  # each new token is the prediction after the tokens before it
            torch.testing.assert_close(out[:, t], model(out[:, :t])[0][:, -1], rtol=0, atol=1e-6)
    noisy = [model.generate(prefix, 4, temperature=0.5, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    torch.testing.assert_close(noisy[0], noisy[1], rtol=0, atol=0)
    assert not torch.allclose(noisy[0][:, 5:], out[:, 5:])
    long = model.generate(_tokens(cfg, 1, 14), 5)  # runs past block_size on a sliding window
    assert long.shape == (1, 19, cfg.input_dim) and torch.isfinite(long).all()


def test_num_params_excludes_position_embeddings():
    cfg = model_config("debug", block_size=16, patch_size=4)
    model = AstroPT(cfg)
    assert model.num_params(non_embedding=False) - model.num_params() == 16 * cfg.n_embd
    assert count_params(cfg, non_embedding=False) == model.num_params(non_embedding=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_embd": 30, "n_head": 4}, "divisible"),
        ({"tokeniser": "vqgan"}, "tokeniser"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_head": 0}, "n_head"),
        ({"dropout": 1.0}, "dropout"),
        ({"modalities": ("images", "radio")}, "unknown modalities"),
        ({"modalities": ("images", "images")}, "without repeats"),
        ({"modalities": ("images", "spectra"), "loss_weights": (1.0,)}, "loss_weights"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_config_survives_json_and_presets_validate():
    cfg = model_config("5m", block_size=64, patch_size=8, bias=True)
    assert ModelConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg  # lists from JSON become tuples again
    with pytest.raises(ValueError, match="unknown preset"):
        model_config("3m")


def test_presets_cli_lists_every_preset(capsys, monkeypatch):
    # only the presets entry: `build_parser` imports every subcommand's module, and those are tested elsewhere
    monkeypatch.setattr(cli, "COMMANDS", {"presets": cli.COMMANDS["presets"]})
    assert cli.main(["presets", "--block-size", "64"]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip() and line.split()[0] in PRESETS
    }
    assert list(rows) == list(PRESETS)
    for name, row in rows.items():
        p = get_preset(name)
        assert row[1:4] == [str(p.n_layer), str(p.n_embd), str(p.n_head)]
    assert rows["89m"][6] == "89.09M"  # paper-style count of the 89M preset, Table 1 says 89M


def test_custom_sizes_between_presets():
    p = get_preset("3x96")
    assert (p.n_layer, p.n_embd, p.n_head, p.learning_rate) == (3, 96, 6, 1e-3)
    assert get_preset("4x128h4").n_head == 4 and get_preset("2x512").n_head == 8  # 16-d heads, at most 8
    small, large = (count_params(model_config(n, patch_size=4, block_size=64)) for n in ("2x48", "3x96"))
    assert 0 < small < large
    for bad in ("3x", "x96", "3x100h8", "0x64", "4x128h0"):
        with pytest.raises(ValueError, match="preset"):
            get_preset(bad)
