"""Alignment evaluation (issue 9): retrieval ranks on a constructed set, flow NLL, TARP calibration, kNN."""

from __future__ import annotations

import numpy as np
import pytest

from astrolom.align.evaluate import fit_flow, flow_nll, flow_samples, knn_predict, retrieval_metrics, tarp_coverage


def test_retrieval_on_a_constructed_aligned_set():
    n = 20
    q = np.eye(n, dtype=np.float32)
    k = np.eye(n, dtype=np.float32)
    for i in range(10, n):  # second half: one wrong key beats the true partner
        k[i, i] = 0.5
        k[(i + 1) % n, i] = 1.0
    r = retrieval_metrics(q, k)
    assert r["recall@1"] == pytest.approx(0.5)
    assert r["recall@5"] == pytest.approx(1.0) and r["recall@10"] == pytest.approx(1.0)
    assert r["median_rank"] == pytest.approx(1.5)
    assert r["chance@10"] == pytest.approx(10 / 20) and r["chance_median_rank"] == pytest.approx(10.5)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perfect = retrieval_metrics(x, x)
    assert perfect["recall@1"] == 1.0 and perfect["median_rank"] == 1.0
    shuffled = retrieval_metrics(x, x[rng.permutation(400)])
    assert shuffled["recall@10"] < 0.1 and shuffled["median_rank"] > 100  # chance: 0.025 and 200.5


def test_knn_is_distance_weighted():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = x[:, 0] * 2.0
    assert np.allclose(knn_predict(x, y, x[:5]), y[:5])  # a training point is its own (infinitely close) neighbour


def test_flow_learns_a_joint_posterior():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 4))
    y = np.stack([x[:, 0] + 0.1 * rng.normal(size=800), x[:, 0] * x[:, 1] + 0.1 * rng.normal(size=800)], 1)
    flow, tr, hist = fit_flow(x[:600], y[:600], x[600:700], y[600:700], epochs=25, patience=25)
    assert len(hist) == 25 and min(hist) < hist[0] - 0.5  # validation NLL decreases
    informed = flow_nll(flow, tr, x[700:], y[700:])
    blind = flow_nll(flow, tr, x[700:][::-1], y[700:])  # contexts that do not belong to the targets
    assert informed < blind - 1.0
    s = flow_samples(flow, tr, x[700:710], n=200)
    assert s.shape == (200, 10, 2)
    assert np.abs(s.mean(0)[:, 0] - x[700:710, 0]).mean() < 0.3


def test_tarp_separates_calibrated_from_overconfident():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(300, 2))
    truth = mu + rng.normal(size=mu.shape)
    good = tarp_coverage(mu[None] + rng.normal(size=(400, 300, 2)), truth)
    bad = tarp_coverage(mu[None] + 0.2 * rng.normal(size=(400, 300, 2)), truth)
    assert good["max_abs_deviation"] < 0.1 and good["fraction_in_band"] > 0.8
    assert bad["max_abs_deviation"] > 0.2 and bad["fraction_in_band"] < 0.5
