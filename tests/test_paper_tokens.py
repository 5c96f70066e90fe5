"""The paper2024 tokens preset without the oracle: what it does to pixels, and who applies it.

Bit parity with the reference's own functions is in tests/test_reference_v1.py; these check the properties every
caller relies on, on a real JPEG (matplotlib's sample_data/grace_hopper.jpg).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from astrolom.data.records import Record
from astrolom.data.tokens import eight_bit, spiral_order, tokenize_paper2024
from astrolom.model.astropt import AstroPT, ModelConfig


def _pixels() -> np.ndarray:
    import matplotlib
    from PIL import Image

    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as im:
        return np.asarray(im)[44:556].copy()  # centre 512 x 512, uint8


def test_float_images_of_8bit_files_give_the_same_tokens():
    px = _pixels()
    as_read = np.divide(px, np.float32(255), dtype=np.float32)  # what astrolom's readers make of an 8-bit file
    assert torch.equal(eight_bit(as_read), torch.from_numpy(px))
    assert torch.equal(tokenize_paper2024(as_read[None]), tokenize_paper2024(torch.from_numpy(px)[None]))
    with pytest.raises(ValueError, match="not 8-bit values"):
        eight_bit(as_read + np.float32(0.3 / 255))
    with pytest.raises(ValueError, match="not 8-bit values"):
        eight_bit(np.full((2, 2, 3), 1.5, np.float32))


def test_tokens_are_the_transposed_image_standardised_with_unbiased_std():
    px = _pixels()
    tokens = tokenize_paper2024(torch.from_numpy(px)[None])[0]
    assert tokens.shape == (1024, 768)
    assert torch.equal(tokens, tokens.half().float())  # float16 values
    # token 0 is the raster patch spiral_order(32)[0] of the *transposed* image: rows <-> columns
    j = int(spiral_order(32)[0])
    r, c = divmod(j, 32)
    patch = px.transpose(1, 0, 2)[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16].astype(np.float64).reshape(-1)
    expected = (patch - patch.mean()) / (patch.std(ddof=1) + 1e-8)
    assert np.abs(tokens[0].double().numpy() - expected).max() < 2e-3  # float16 rounding of values up to ~4
    assert abs(float(tokens[0].double().std()) - 1.0) < 1e-3  # unbiased std 1, not the biased one


def test_embedding_refuses_records_that_are_not_8bit():
    from astrolom.eval.embed import embed_records

    model = AstroPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, tokeniser="paper",
                                tokens_preset="paper2024")).eval()  # fmt: skip
    rec = Record("galaxy-7", np.random.default_rng(0).normal(size=(128, 128, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="galaxy-7: the paper2024 tokens preset reads 8-bit pixels"):
        list(embed_records(model, [rec]))


def test_finetuning_feeds_an_imported_paper_model_its_own_tokens():
    from astrolom.finetune.model import backbone_tokens

    px = _pixels()[None, :128, :128]
    paper = ModelConfig(n_layer=1, n_head=2, n_embd=16, tokeniser="paper", tokens_preset="paper2024")
    assert torch.equal(backbone_tokens(px / np.float32(255), paper), tokenize_paper2024(px))
    plain = backbone_tokens(px / np.float32(255), ModelConfig(n_layer=1, n_head=2, n_embd=16, tokeniser="paper"))
    assert (plain - tokenize_paper2024(px)).abs().max() > 1.0


def test_preset_is_validated():
    with pytest.raises(ValueError, match="tokens_preset must be one of"):
        ModelConfig(tokens_preset="paper2025")
    with pytest.raises(ValueError, match="images-only"):
        ModelConfig(tokens_preset="paper2024", modalities=("images", "spectra"))
