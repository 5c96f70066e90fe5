"""The batched tokeniser's buffer pool and its output modes (astrolom.data.batching)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from astrolom.data.batching import BufferPool


def _addr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_buffer_pool_reuses_only_released_buffers():
    pool = BufferPool(3)
    a = pool.get((4, 8, 12))
    first = _addr(a)
    view = a[1:, :3]  # a view outlives the tensor it came from
    arr = a.numpy()[2]  # and so does a numpy array made from it
    del a
    gc.collect()
    b = pool.get((4, 8, 12))
    assert _addr(b) != first  # still referenced through `view` and `arr`: not handed out again
    del view
    c = pool.get((4, 8, 12))
    assert _addr(c) not in (first, _addr(b))  # `arr` alone still holds the first buffer
    del arr, c
    d = pool.get((4, 8, 12))
    assert _addr(d) == first  # everything made from it released: reused
    assert _addr(pool.get((4, 8, 13))) not in (first, _addr(b))  # another shape never shares memory


def test_buffer_pool_sizes_and_dtypes():
    pool = BufferPool(1)
    x = pool.get((2, 3), torch.bfloat16)
    assert x.dtype == torch.bfloat16 and x.shape == (2, 3)
    ptr = _addr(x)
    del x
    assert _addr(pool.get((2, 3), torch.bfloat16)) == ptr
    assert pool.get((2, 3), torch.float32).dtype == torch.float32  # other dtype: fresh memory, evicts the slot
    off = BufferPool(0)
    keep = off.get((5,))  # size 0 keeps nothing: every buffer is fresh
    assert np.asarray(keep).shape == (5,) and len(off._slots) == 0


def _jpeg_records(n=6, size=48, seed=0):
    from PIL import Image

    from astrolom.data.sources.decode import PixelRecord

    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        px = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        px[:16, :16] = 77  # a flat patch: zero tokens, std = eps
        recs.append(PixelRecord(f"g{i}", None, "train", {"z": i / 10}, pixels=np.asarray(Image.fromarray(px))))
    return recs


def test_pixels_output_standardised_later_is_bit_identical():
    from astrolom.data.batching import batch_tokens, standardise_pixels, tokenize_records

    recs = _jpeg_records()
    ref = tokenize_records(recs, 16)
    px = tokenize_records(recs, 16, output="pixels")
    assert "tokens" not in px and px["pixels"].dtype == torch.uint8 and px["pixels"].shape == ref["tokens"].shape
    assert px["object_id"] == ref["object_id"] and px["labels"] == ref["labels"] and px["grid"] == ref["grid"]
    tokens, mean, std = standardise_pixels(px["pixels"], px["scale"])
    assert torch.equal(tokens, ref["tokens"]) and torch.equal(mean, ref["mean"]) and torch.equal(std, ref["std"])
    assert torch.equal(batch_tokens(px, "cpu"), ref["tokens"]) and batch_tokens(ref) is ref["tokens"]
    assert (std == 1e-6).any()  # the flat corner patch went through the eps convention on both paths


def test_bfloat16_output_is_the_rounded_float32_tokens():
    from astrolom.data.batching import tokenize_records

    recs = _jpeg_records()
    ref = tokenize_records(recs, 16)
    bf = tokenize_records(recs, 16, output="bfloat16")
    assert bf["tokens"].dtype == torch.bfloat16
    assert torch.equal(bf["tokens"], ref["tokens"].to(torch.bfloat16))  # one rounding of the exact tokens
    assert torch.equal(bf["mean"], ref["mean"]) and torch.equal(bf["std"], ref["std"])


def test_pixels_output_needs_8bit_pixels():
    from astrolom.data.batching import tokenize_records
    from astrolom.data.records import Record

    with pytest.raises(ValueError, match="record f: output='pixels' .* needs 8-bit JPEG/PNG pixels"):
        tokenize_records([Record("f", np.zeros((32, 32, 3), np.float32))], 16, output="pixels")
    with pytest.raises(ValueError, match="output must be one of"):
        tokenize_records(_jpeg_records(1), 16, output="float16")
