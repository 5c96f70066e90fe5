import numpy as np
import pytest
import torch
import torch.nn.functional as F

from astrolom.data.spectra import tokenize_spectra
from astrolom.model.astropt import AstroPT, ModelConfig

B, TI, TS = 3, 16, 10  # 16x16 px stamps in 4x4 patches; 80-pixel spectra in 8-pixel tokens
WAVE = 4000.0 + 10.0 * np.arange(80)


def _config(**kw):
    base = dict(
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=64,
        patch_size=4,
        n_chan=3,
        modalities=("images", "spectra"),
        spectrum_patch=8,
    )
    return ModelConfig(**{**base, **kw})


def _inputs(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    flux = 2 + torch.randn(b, 80, generator=g)
    spec = tokenize_spectra(flux, WAVE, patch=8)
    return {"images": torch.randn(b, TI, 48, generator=g), **spec.model_inputs()}


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return AstroPT(_config(**kw)).eval()


def test_images_only_model_keeps_its_modules():
    keys = set(AstroPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, patch_size=4)).state_dict())
    assert not any(k.startswith(("wave_emb", "bom_emb", "modality_emb", "tokenisers.spectra")) for k in keys)
    mm = set(_model().state_dict())
    assert {"wave_emb.0.weight", "bom_emb.weight", "modality_emb.weight", "tokenisers.spectra.0.weight"} <= mm
    assert _model().tokenisers["spectra"][0].weight.shape == (128, 9)  # 8 fluxes + log amplitude


def test_shapes_and_a_gradient_on_every_parameter():
    model = _model(modality_order="random").train()
    preds, loss = model(_inputs())
    assert preds["images"].shape == (B, TI, 48) and preds["spectra"].shape == (B, TS, 9)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_tensor_input_is_refused_by_a_multimodal_model():
    with pytest.raises(TypeError, match="pass a dict"):
        _model()(torch.zeros(1, TI, 48))


def test_fixed_order_is_causal_across_modalities():
    model = _model()
    a, b = _inputs(0), _inputs(1)
    mixed = {**a, **{k: v for k, v in b.items() if k.startswith("spectra")}}
    pa, _ = model(a)
    pm, _ = model(mixed)
    torch.testing.assert_close(pa["images"], pm["images"])  # images come first: never see the spectrum
    assert (pa["spectra"] - pm["spectra"]).abs().max() > 1e-4
    # spectra first: now the image tokens are conditioned on the spectrum and the spectrum is not on the image
    pa, _ = model(a, order=["spectra", "images"])
    pm, _ = model(mixed, order=["spectra", "images"])
    assert (pa["images"] - pm["images"]).abs().max() > 1e-4
    mixed2 = {**b, **{k: v for k, v in a.items() if k.startswith("spectra")}}
    pm2, _ = model(mixed2, order=["spectra", "images"])
    torch.testing.assert_close(pa["spectra"], pm2["spectra"])


def test_first_token_of_each_modality_is_predicted_from_its_bom():
    model = _model()
    x = _inputs()
    p1, _ = model(x)
    y = dict(x)
    y["spectra"] = x["spectra"].clone()
    y["spectra"][:, 1:] += 1.0  # change everything but the first spectrum token
    p2, _ = model(y)
    torch.testing.assert_close(p1["spectra"][:, :2], p2["spectra"][:, :2])  # token 0 and 1 predictions unchanged
    assert (p1["spectra"][:, 2:] - p2["spectra"][:, 2:]).abs().max() > 1e-4


def test_random_order_per_sample_matches_explicit_orders():
    model = _model(modality_order="random")
    x = _inputs()
    order = torch.tensor([[0, 1], [1, 0], [1, 0]])
    mixed, _ = model(x, order=order)
    fwd, _ = model(x, order=["images", "spectra"])
    rev, _ = model(x, order=["spectra", "images"])
    for m in ("images", "spectra"):
        torch.testing.assert_close(mixed[m][0], fwd[m][0])
        torch.testing.assert_close(mixed[m][1:], rev[m][1:])
    # in training mode with modality_order="random" the order is drawn per sample from the torch RNG
    model.train()
    torch.manual_seed(5)
    drawn = torch.argsort(torch.rand(64, 2), dim=1)
    torch.manual_seed(5)
    big = _inputs(b=64)
    torch.manual_seed(5)
    p_random, _ = model(big)
    p_explicit, _ = model(big, order=drawn)
    torch.testing.assert_close(p_random["images"], p_explicit["images"])
    assert 10 < int(drawn[:, 0].sum()) < 54  # both orders occur


def test_missing_modality_trains_on_what_is_there():
    model = _model()
    x = _inputs()
    x["spectra_present"] = torch.tensor([True, False, True])
    garbage = dict(x)
    garbage["spectra"] = x["spectra"].clone()
    garbage["spectra"][1] = 1e3
    p1, l1 = model(x)
    p2, l2 = model(garbage)
    torch.testing.assert_close(l1, l2)  # a missing spectrum is neither a key nor a target
    # sample 1's image predictions equal an images-only pass of that sample (same fixed order)
    alone, _ = model({"images": x["images"][1:2]})
    torch.testing.assert_close(p1["images"][1:2], alone["images"])
    # missing images: the spectrum is still predicted, from its BOM, and the loss counts only its tokens
    y = _inputs()
    y["images_present"] = torch.tensor([False, False, False])
    preds, loss = model(y)
    spec_only, _ = model({k: v for k, v in y.items() if k.startswith("spectra")})
    torch.testing.assert_close(preds["spectra"], spec_only["spectra"])
    vm = y["spectra_value_mask"].float()
    hub = F.huber_loss(preds["spectra"], y["spectra"], reduction="none")
    expected = ((hub * vm).sum(-1) / vm.sum(-1)).mean()
    torch.testing.assert_close(loss, expected)


def test_loss_is_a_weighted_mean_over_present_tokens_and_values():
    model = _model(loss_weights=(1.0, 3.0))
    x = _inputs()
    x["spectra_value_mask"] = x["spectra_value_mask"].clone()
    x["spectra_value_mask"][0, 4, :5] = False  # masked pixels
    x["spectra_mask"] = x["spectra_mask"].clone()
    x["spectra_mask"][2, 7:] = False  # padding tokens
    x["spectra_value_mask"][2, 7:] = False
    preds, loss = model(x)
    hi = F.huber_loss(preds["images"], x["images"], reduction="none").mean(-1)  # (B, TI)
    vm = x["spectra_value_mask"].float()
    hs = (F.huber_loss(preds["spectra"], x["spectra"], reduction="none") * vm).sum(-1) / vm.sum(-1).clamp_min(1)
    ws = 3.0 * x["spectra_mask"].float()
    expected = (hi.sum() + (hs * ws).sum()) / (hi.numel() + ws.sum())
    torch.testing.assert_close(loss, expected)
    # changing a masked pixel's target value or a padding token changes nothing ...
    y = dict(x)
    y["spectra"] = x["spectra"].clone()
    y["spectra"][2, 8:] = 50.0
    torch.testing.assert_close(model(y)[1], loss)


def test_token_budget_is_checked():
    model = _model(block_size=26)  # 16 + 10 + 2 BOM = 28 tokens
    with pytest.raises(ValueError, match=r"images 16, spectra 10 tokens \+ 2 begin-of-modality = 28 > block_size=26"):
        model(_inputs())


def test_unknown_keys_and_bad_shapes_are_named():
    model = _model()
    with pytest.raises(ValueError, match="spectrum_positions"):
        model({**_inputs(), "spectrum_positions": torch.zeros(B, TS)})
    x = _inputs()
    x["spectra_positions"] = x["spectra_positions"][:, :3]
    with pytest.raises(ValueError, match="spectra_positions"):
        model(x)


def test_wavelength_positions_stay_float32_under_autocast():
    model = _model()
    pos = torch.tensor([[0.5, 0.5 + 2.0 / 7000.0]])  # 2 A apart
    plain = model._positions("spectra", {"spectra_positions": pos}, 1, 2, pos.device)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model._positions("spectra", {"spectra_positions": pos}, 1, 2, pos.device)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain)
    assert (plain[0, 0] - plain[0, 1]).abs().max() > 0
    # bf16 rounding would have merged them
    assert pos.bfloat16()[0, 0] == pos.bfloat16()[0, 1]


def test_features_per_modality_and_joint():
    model = _model()
    x = _inputs()
    joint = model.forward_features(x)
    assert joint["images"].shape == (B, TI, 32) and joint["spectra"].shape == (B, TS, 32)
    img = model.forward_features({"images": x["images"]})
    spec = model.forward_features({k: v for k, v in x.items() if k.startswith("spectra")})
    assert set(img) == {"images"} and set(spec) == {"spectra"}
    torch.testing.assert_close(img["images"], joint["images"])  # images come first in the fixed order
    assert (spec["spectra"] - joint["spectra"]).abs().max() > 1e-4  # joint spectra features see the image
    last = model.forward_features(x, layer=-1)
    torch.testing.assert_close(last["images"], model.ln_f(model.forward_intermediates(x)[-1]["images"]))


def test_generate_spectrum_from_image_is_self_consistent():
    model = _model()
    x = _inputs()
    gen = model.generate_modality({"images": x["images"]}, "spectra", positions=x["spectra_positions"][0])
    assert gen.shape == (B, TS, 9)
    # teacher-forcing the generated tokens reproduces them: token k is the prediction from tokens < k
    tf = {"images": x["images"], "spectra": gen, "spectra_positions": x["spectra_positions"]}
    preds, _ = model(tf)
    torch.testing.assert_close(preds["spectra"], gen, rtol=1e-5, atol=1e-5)
    img = model.generate_modality({k: v for k, v in x.items() if k.startswith("spectra")}, "images", n_tokens=4)
    assert img.shape == (B, 4, 48)
    p, _ = model({**x, "images": torch.cat([img, torch.zeros(B, 12, 48)], 1)}, order=["spectra", "images"])
    torch.testing.assert_close(p["images"][:, :4], img, rtol=1e-5, atol=1e-5)


def test_a_tiny_two_modality_model_learns():
    torch.manual_seed(0)
    model = AstroPT(_config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = _inputs(3, b=8)
    first = None
    for _ in range(40):
        _, loss = model(x)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("bom", [True, False])
def test_loss_weight_is_the_loss_denominator(bom):
    model = _model(modality_tokens=bom, loss_weights=(1.0, 2.0))
    x = _inputs()
    x["spectra_present"] = torch.tensor([True, False, True])
    x["images_mask"] = torch.ones(B, TI, dtype=torch.bool)
    x["images_mask"][2, 5:] = False
    _, loss = model(x)
    w = model.loss_weight(x)
    # BOM: 16 + 16 + 5 image tokens, 2 x 10 spectrum tokens (weight 2); without: token 0 of the first modality has
    # no predecessor (15 + 15 + 4), and sample 2's first spectrum token follows a missing image token (10 + 9)
    assert w.item() == (37 + 2 * 20 if bom else 34 + 2 * 19)
    torch.testing.assert_close(model(x, normaliser=w)[1], loss)
    torch.testing.assert_close(model(x, normaliser=2 * w)[1], loss / 2)


def test_random_order_without_bom_tokens_is_refused():
    with pytest.raises(ValueError, match="modality_tokens=True"):
        _config(modality_order="random", modality_tokens=False)
