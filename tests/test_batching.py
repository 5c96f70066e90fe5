"""The batched tokeniser's buffer pool and its output modes (astrolom.data.batching)."""

from __future__ import annotations

import gc

import numpy as np
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
