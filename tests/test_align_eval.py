"""Alignment evaluation (issue 9): retrieval ranks on a constructed set, flow NLL, TARP calibration, kNN."""

from __future__ import annotations

import numpy as np
import pytest

from astrolom.align.evaluate import knn_predict, retrieval_metrics
from astrolom.align.posteriors import (
    ensemble_nll,
    ensemble_samples,
    fit_flow,
    fit_flow_ensemble,
    flow_nll,
    flow_samples,
    tarp_coverage,
)


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_flow_ensemble_is_the_mixture_of_its_members():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 3))
    y = np.stack([x[:, 0] + 0.2 * rng.normal(size=500), x[:, 1] - x[:, 2] + 0.2 * rng.normal(size=500)], 1)
    ens = fit_flow_ensemble(x[:300], y[:300], x[300:400], y[300:400], members=3, epochs=8, patience=8)
    assert len(ens.members) == 3 and [len(h) for h in ens.histories] == [8, 8, 8]
    xt, yt = x[400:], y[400:]
    # members differ (seeds 0, 1, 2), and the mixture's NLL is -mean log of the mean of their densities
    nlls = [flow_nll(f, tr, xt, yt) for f, tr in ens.members]
    assert len({round(v, 6) for v in nlls}) == 3
    # each member's density of each object on its own (one flow call per object and member: 20 objects keep it short)
    xs, ys = xt[:20], yt[:20]
    lps = np.stack([
        -np.asarray([flow_nll(f, tr, xs[i : i + 1], ys[i : i + 1]) for i in range(len(xs))]) for f, tr in ens.members
    ])  # fmt: skip
    mix = np.log(np.exp(lps).mean(0))
    assert ensemble_nll(ens, xs, ys) == pytest.approx(-mix.mean(), abs=1e-4)
    assert ensemble_nll(ens, xt, yt) <= np.mean(nlls) + 1e-6  # Jensen: the mixture is never worse than the mean
    s = ensemble_samples(ens, xt[:5], n=100)
    assert s.shape == (100, 5, 2)  # 34 + 33 + 33 samples
    with pytest.raises(ValueError, match="at least one member"):
        fit_flow_ensemble(x[:300], y[:300], x[300:400], y[300:400], members=0)


def test_tarp_averages_over_reference_draws():
    rng = np.random.default_rng(2)
    mu = rng.normal(size=(200, 2))
    truth = mu + rng.normal(size=mu.shape)
    samples = mu[None] + rng.normal(size=(300, 200, 2))
    one = [np.asarray(tarp_coverage(samples, truth, seed=s, draws=1)["ecp"]) for s in range(3)]
    avg = tarp_coverage(samples, truth, seed=0, draws=3)
    np.testing.assert_allclose(avg["ecp"], np.mean(one, 0))
    assert not np.allclose(one[0], one[1])  # the draws differ: that noise is what the average removes


def test_flow_ensemble_picks_its_conditioning_width_by_validation_nll():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(700, 2))
    # 40 features: two informative directions spread over all of them, plus noise the flow could overfit
    x = z @ rng.normal(size=(2, 40)) + 0.3 * rng.normal(size=(700, 40))
    y = z + 0.1 * rng.normal(size=z.shape)
    ens = fit_flow_ensemble(
        x[:400], y[:400], x[400:550], y[400:550], members=2, components=(4, 64), epochs=6, patience=6
    )
    assert set(ens.selection) == {"4", "all"}  # 64 >= 40 features collapses to all of them
    assert ens.components == (4 if ens.selection["4"] < ens.selection["all"] else None)
    assert len(ens.members) == 2 and ens.members[0][1]["xm"].shape == (ens.components or 40,)
    s = ensemble_samples(ens, x[550:560], n=20)  # new contexts are projected like the fit ones
    assert s.shape == (20, 10, 2) and np.isfinite(ensemble_nll(ens, x[550:], y[550:]))
    only_all = fit_flow_ensemble(x[:400], y[:400], x[400:550], y[400:550], members=1, components=(None,), epochs=2)
    assert only_all.components is None and only_all.projection is None and list(only_all.selection) == ["all"]
