"""Rows of a memory-mapped embeddings file read by positioned reads (`astrolom.search.vectors.read_rows`)."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pytest

from astrolom.search.vectors import ArraySource, read_rows


def _npy(path, n=4096, d=16):
    X = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    np.save(path, X)
    return X, np.load(path, mmap_mode="r")


def test_rows_equal_fancy_indexing_runs_and_singles(tmp_path):
    X, M = _npy(tmp_path / "x.npy")
    rows = np.unique(np.r_[0, 1, 2, 3, 100, 2000:2050, np.random.default_rng(1).choice(4096, 300), 4095])
    got = read_rows(M, rows)
    np.testing.assert_array_equal(got, X[rows])
    assert read_rows(M, np.zeros(0, np.int64)).shape == (0, 16)
    np.testing.assert_array_equal(ArraySource(M, pa.table({})).take(rows), X[rows])


def test_bad_rows_and_a_truncated_file_are_refused(tmp_path):
    _, M = _npy(tmp_path / "x.npy")
    for bad in ([3, 2], [1, 1], [-1, 2], [4096]):
        with pytest.raises(ValueError, match="rows must be sorted"):
            read_rows(M, np.array(bad))
    with open(tmp_path / "x.npy", "r+b") as f:
        f.truncate(M.offset + 100 * 16 * 4)
    with pytest.raises(ValueError, match=r"x\.npy: short read"):
        read_rows(M, np.array([5, 4000]))


def _rss_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise RuntimeError("no RssFile")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_sample_does_not_pull_the_file_into_the_resident_set(tmp_path):
    # a 128 MiB file, cached by writing it; a sample of 1 row in 32, as the index build trains on
    path = tmp_path / "big.npy"
    np.save(path, np.ones((65536, 512), np.float32))
    rows = np.arange(0, 65536, 32)
    M = np.load(path, mmap_mode="r")
    before = _rss_file_kb()
    sample = ArraySource(M, pa.table({})).take(rows)
    grew = _rss_file_kb() - before
    assert sample.shape == (2048, 512) and float(sample.sum()) == 2048 * 512
    assert grew < 8 * 1024, f"the sample mapped {grew} kB of the file"
    # the control: fancy indexing the map (what take did before) maps far more than the 4 MiB it reads
    held = np.load(path, mmap_mode="r")
    before = _rss_file_kb()
    _ = np.asarray(held[rows])
    if _rss_file_kb() - before < 16 * 1024:
        pytest.skip("this kernel maps no pages around a fault (the control shows nothing to guard)")
