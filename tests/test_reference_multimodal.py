"""Two-modality (images + spectra) interop with the reference AstroPT (`astropt==2.0.9`, a test oracle only).

The reference concatenates images then spectra (alphabetical), places spectrum tokens with an MLP of the wavelength
and predicts the first spectrum token from the last image token. Shared weights must give the same predictions
(float64, <= 1e-5) in both directions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

ref = pytest.importorskip("astropt.model")

from astrolom.interop.reference import (  # noqa: E402
    ReferenceFormatError,
    export_reference_checkpoint,
    load_reference_checkpoint,
)
from astrolom.model.astropt import AstroPT, ModelConfig  # noqa: E402

TOL = 1e-5
PATCH, BANDS, W = 4, 3, 8
D = PATCH * PATCH * BANDS
TI, TS = 16, 12


def _mods(loss_weight=1.0):
    images = ref.ModalityConfig(name="images", input_size=D, pos_input_size=1, patch_size=PATCH, embed_pos=True)
    spectra = ref.ModalityConfig(
        name="spectra", input_size=W, pos_input_size=1, patch_size=W, embed_pos=False, loss_weight=loss_weight
    )
    return [images, spectra]


def _reference_gpt(tokeniser="aim", bias=False, seed=0, loss_weight=1.0):
    mods = _mods(loss_weight)
    config = ref.GPTConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=40, n_chan=BANDS, bias=bias, tokeniser=tokeniser, modalities=mods
    )
    torch.manual_seed(seed)
    gpt = ref.GPT(config, ref.ModalityRegistry(mods), master_process=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return gpt.eval()


def _args(gpt) -> dict:
    c = gpt.config
    return dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size, n_chan=c.n_chan,
                tokeniser=c.tokeniser, bias=c.bias, modalities=c.modalities)  # fmt: skip


def _batch(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, TI, D, generator=g, dtype=torch.float64)
    spectra = torch.randn(b, TS, W, generator=g, dtype=torch.float64)
    # token wavelengths 3600 + 16 A * (k + 0.5), normalised as the reference does: (lambda - 3000) / 7000
    pos = ((3600 + 16.0 * (torch.arange(TS) + 0.5) - 3000) / 7000).to(torch.float64).expand(b, TS)
    theirs = {
        "images": images,
        "images_positions": torch.arange(TI).expand(b, TI),
        "spectra": spectra,
        "spectra_positions": pos[..., None],
    }
    ours = {"images": images, "spectra": spectra, "spectra_positions": pos}
    return theirs, ours


def _compare(gpt, model) -> float:
    gpt, model = gpt.double(), model.double().eval()
    theirs, ours = _batch()
    targets = {"images": theirs["images"][:, 1:], "spectra": theirs["spectra"]}
    with torch.no_grad():
        out, ref_loss = gpt(theirs, targets=targets)
        preds, _ = model(ours)
    diffs = [
        (out["images"] - preds["images"][:, 1:]).abs().max().item(),
        (out["spectra"] - preds["spectra"]).abs().max().item(),
    ]
    # the reference's loss (mean of per-modality means) from our predictions: the targets line up
    w = {m.name: m.loss_weight for m in gpt.modality_registry.modalities.values()}
    our_ref_loss = (
        F.huber_loss(preds["images"][:, 1:], targets["images"]) * w["images"]
        + F.huber_loss(preds["spectra"], targets["spectra"]) * w["spectra"]
    ) / 2
    diffs.append(abs(our_ref_loss.item() - ref_loss.item()))
    return max(diffs)


@pytest.mark.parametrize(("tokeniser", "bias"), [("aim", False), ("affine", True)])
def test_reference_two_modality_weights_give_reference_outputs(tokeniser, bias):
    gpt = _reference_gpt(tokeniser, bias)
    model = load_reference_checkpoint({"model": gpt.state_dict(), "model_args": _args(gpt)})
    cfg = model.config
    assert cfg.modalities == ("images", "spectra") and not cfg.modality_tokens and not cfg.spectrum_amplitude
    assert cfg.spectrum_patch == W and cfg.patch_size == PATCH and cfg.block_size == 40
    assert cfg.spectrum_wavelength_range == (3000.0, 10000.0)
    assert _compare(gpt, model) <= TOL


def test_reference_loss_weights_are_imported():
    gpt = _reference_gpt(loss_weight=0.5)
    model = load_reference_checkpoint({"model": gpt.state_dict(), "model_args": _args(gpt)})
    assert model.config.loss_weights == (1.0, 0.5)
    assert _compare(gpt, model) <= TOL


def test_exported_two_modality_model_runs_in_the_reference(tmp_path):
    torch.manual_seed(3)
    cfg = ModelConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=40, patch_size=PATCH, n_chan=BANDS,
        modalities=("images", "spectra"), modality_tokens=False, spectrum_patch=W, spectrum_amplitude=False,
    )  # fmt: skip
    model = AstroPT(cfg)
    path = export_reference_checkpoint(model, tmp_path / "mm.pt")
    ckpt = torch.load(path, weights_only=True)
    assert [m["name"] for m in ckpt["model_args"]["modalities"]] == ["images", "spectra"]
    assert ckpt["model_args"]["modalities"][1]["embed_pos"] is False
    mods = [ref.ModalityConfig(**m) for m in ckpt["model_args"]["modalities"]]
    gpt = ref.GPT(ref.GPTConfig(**{**ckpt["model_args"], "modalities": mods}), ref.ModalityRegistry(mods), False)
    gpt.load_state_dict(ckpt["model"])
    assert _compare(gpt.eval(), model) <= TOL
    back = load_reference_checkpoint(path)
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a.float(), b), name


def test_models_the_reference_cannot_hold_are_refused(tmp_path):
    base = dict(n_layer=1, n_head=2, n_embd=16, block_size=40, patch_size=PATCH, spectrum_patch=W)
    with pytest.raises(ReferenceFormatError, match="begin-of-modality"):
        export_reference_checkpoint(AstroPT(ModelConfig(**base, modalities=("images", "spectra"))), tmp_path / "a.pt")
    with pytest.raises(ReferenceFormatError, match="log-amplitude"):
        export_reference_checkpoint(
            AstroPT(ModelConfig(**base, modalities=("images", "spectra"), modality_tokens=False)), tmp_path / "b.pt"
        )
    with pytest.raises(ReferenceFormatError, match="alphabetical"):
        export_reference_checkpoint(
            AstroPT(ModelConfig(**base, modalities=("spectra", "images"), modality_tokens=False)), tmp_path / "c.pt"
        )
    assert not list(tmp_path.iterdir())
