"""Shared fixtures. Keep them cheap: the whole suite runs on 2 CPU cores."""

from __future__ import annotations

import os

import pytest

# One compute thread per process, set before torch, numpy or faiss is imported (nothing is at this point; the test
# modules import them after conftest): the suite's models are tiny, and with any other job on the cores OpenMP's
# spinning threads make a step several times slower (on the loaded 2-core box the alignment evaluation test took
# 93 s with torch's default two threads and 24 s with one; tests/test_scaling.py 631 s and 176 s). Subprocesses
# inherit it, as `run_pretrain` already set for its children. An explicit OMP_NUM_THREADS still wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def mock_survey(tmp_path_factory):
    """64 objects of the embedded mock Legacy Survey, 32x32 px, g/r/z (about 2 s on one core)."""
    from astrolom.mock import generate_survey

    return generate_survey(tmp_path_factory.mktemp("mock_survey"), n=64, size=32, seed=1, workers=1, progress=False)


@pytest.fixture(scope="session")
def model_index(mock_survey, tmp_path_factory):
    """An index of `mock_survey` embedded by a random 2-layer AstroPT (search_helpers.make_model_index), read-only:
    shared by the explorer's tests."""
    from search_helpers import make_model_index

    return make_model_index(mock_survey, tmp_path_factory.mktemp("model_index"))
