"""Probes on synthetic embeddings: a known linear signal is read out (R2 near 1), pure noise is not (R2 near 0)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from astrolom.data.records import Record
from astrolom.eval import probe_estimators as est
from astrolom.eval import probes as pr
from astrolom.eval.embeddings import EmbeddingTable, EmbeddingWriter, load_embeddings, split_rows
from astrolom.eval.probes import ProbeResult


def _table(n_fit=300, n_test=300, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    n = n_fit + n_test
    X = rng.normal(size=(n, dim)).astype(np.float32)
    w = rng.normal(size=dim)
    labels = {
        "linear": X @ w + 0.01 * rng.normal(size=n),  # R2 ~ 1 for a linear probe
        "noise": rng.normal(size=n),  # independent of X
        "side": np.where(X[:, 0] - X[:, 1] > 0, "north", "south").astype(object),
        "flag": (X[:, 2] > 0.5).astype(float),  # 0/1 floats: a class
    }
    labels["linear"][:5] = np.nan  # missing labels are dropped per target
    split = np.array(["val"] * n_fit + ["test"] * n_test)
    ids = np.array([f"obj{i}" for i in range(n)])
    return EmbeddingTable(ids, split, X, labels, {"layer": -2})


def test_linear_signal_and_noise():
    t = _table()
    result = pr.evaluate(t, ["linear", "noise", "side", "flag"], seed=0)
    assert result.score("linear", "pretrained", "linear") > 0.99
    assert result.score("linear", "pretrained", "mlp") > 0.9
    assert result.score("linear", "pretrained", "knn") > 0.3  # kNN in 24-D is weaker, but clearly informative
    for method in pr.METHODS:
        assert abs(result.score("noise", "pretrained", method)) < 0.1, method
    assert result.metric("side") == "accuracy" and result.score("side", "pretrained", "linear") > 0.9
    assert result.kind("side") == pr.CLASSIFICATION
    assert result.kind("flag") == pr.CLASSIFICATION
    assert result.targets["linear"]["n_fit"] == 295  # five NaN labels dropped
    assert 0.5 <= result.majority_accuracy("side") <= 0.6
    assert result.majority_accuracy("linear") is None


@pytest.mark.slow
def test_wide_logistic_probe_solves_exactly_and_falls_back_to_lbfgs():
    # more features than objects (the multimodal spectrum readout is 1,024 wide): the exact-Newton solver reaches
    # the same optimum as a long lbfgs run, so the probe's predictions agree with it; huge Hessians go to lbfgs
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 600))
    y = np.where(X[:, :3].sum(1) + 0.5 * rng.normal(size=400) > 0, "north", "south")
    pred = pr.fit_probe(X[:200], y[:200], X[200:], pr.CLASSIFICATION, "linear")
    acc = pr.score(y[200:], pred, pr.CLASSIFICATION)["accuracy"]
    assert 0.6 < acc < 1.0  # 3 informative of 600 features, 200 objects: informative but far from perfect
    sc = StandardScaler().fit(X[:200])
    lbfgs = est.logistic_probe(600, 2, 5, solver="lbfgs").set_params(tol=1e-8, max_iter=20000)
    lbfgs.fit(sc.transform(X[:200]), y[:200])
    assert np.mean(lbfgs.predict(sc.transform(X[200:])) == pred) >= 0.99
    assert est.logistic_solver(1024, 2) == "newton-cholesky"
    assert est.logistic_solver(1024, 3) == "newton-cholesky"  # (1024 + 1) * 3 coefficients
    assert est.logistic_solver(2048, 3) == "lbfgs"
    assert est.logistic_solver(8192, 2) == "lbfgs"


def test_knn_reads_low_dimensional_signal():
    rng = np.random.default_rng(1)
    X = rng.uniform(-2, 2, size=(800, 2))
    y = np.sin(2 * X[:, 0]) + X[:, 1] ** 2  # nonlinear: kNN and the MLP get it, a linear probe cannot
    p_knn = pr.fit_probe(X[:400], y[:400], X[400:], pr.REGRESSION, "knn")
    p_lin = pr.fit_probe(X[:400], y[:400], X[400:], pr.REGRESSION, "linear")
    assert pr.score(y[400:], p_knn, pr.REGRESSION)["r2"] > 0.9
    assert pr.score(y[400:], p_lin, pr.REGRESSION)["r2"] < 0.5


def test_standardisation_uses_fit_split_only():
    # a feature scaled by 1e6 must not drown the others: scaling is fit on the fit split
    t = _table()
    t.X[:, 0] *= 1e6
    assert pr.evaluate(t, ["linear"], ("linear",)).score("linear") > 0.99


def test_control_and_baselines_are_aligned_by_object_id():
    t = _table()
    rng = np.random.default_rng(5)
    perm = rng.permutation(len(t))
    control = EmbeddingTable(t.object_id[perm], t.split[perm], t.X[perm], {}, {})  # same features, shuffled rows
    fit, test = split_rows(t, "val", "test")
    noise = (rng.normal(size=(len(fit), 4)), rng.normal(size=(len(test), 4)))
    cnn = {"linear": np.asarray(test.labels["linear"], float), "side": test.labels["side"]}
    result = pr.evaluate(t, ["linear", "side"], ("linear",), control=control, baselines={"noise": noise},
                         supervised={"cnn": cnn})  # fmt: skip
    # identical features after alignment -> identical scores
    assert result.score("linear", "random_init") == pytest.approx(result.score("linear", "pretrained"))
    assert result.score("linear", "noise") < 0.1
    # a supervised model answers for every probe method with its own score; perfect predictions score 1
    assert result.score("linear", "cnn", "linear") == pytest.approx(1.0)
    assert result.score("linear", "cnn", "knn") == pytest.approx(1.0)
    assert result.score("side", "cnn") == 1.0
    assert result.is_supervised("cnn") and not result.is_supervised("pretrained")
    assert result.feature_sets == ["pretrained", "random_init", "cnn", "noise"]  # table order, then the others
    assert result.score("side", "pretrained", "linear", "f1") > 0.9
    assert result.score("side", "pretrained", "mlp") is None  # not run
    assert result.score("nonexistent") is None
    md = pr.markdown_table(result)
    assert "| target | metric | pretrained | random_init | cnn | noise |" in md
    missing = EmbeddingTable(t.object_id[:10], t.split[:10], t.X[:10], {}, {})
    with pytest.raises(ValueError, match="no row"):
        pr.evaluate(t, ["linear"], ("linear",), control=missing)


def test_skips_and_errors():
    t = _table()
    result = pr.evaluate(t, ["linear", "nonexistent"], ("linear",))
    assert result.skipped == {"nonexistent": "not a label column"}
    with pytest.raises(ValueError, match="no objects in split"):
        pr.evaluate(t, ["linear"], fit_split="train")
    with pytest.raises(ValueError, match="no probe targets"):
        pr.evaluate(t, ["nonexistent"])


def _write(path, t: EmbeddingTable, rows=slice(None)):
    w = EmbeddingWriter(path, {"layer": -2, "tokens": 64})
    recs = [
        Record(str(t.object_id[i]), np.zeros((1, 1, 1), np.float32), str(t.split[i]),
               {k: (None if isinstance(v[i], float) and np.isnan(v[i]) else v[i]) for k, v in t.labels.items()})
        for i in np.arange(len(t))[rows]
    ]  # fmt: skip
    w.write(recs, t.X[rows])
    w.close()


def test_parquet_roundtrip_and_cli(tmp_path):
    from astrolom.cli import main

    t = _table(n_fit=120, n_test=120)
    _write(tmp_path / "emb.parquet", t)
    back = load_embeddings(tmp_path / "emb.parquet")
    np.testing.assert_array_equal(back.X, t.X)
    np.testing.assert_array_equal(back.object_id, t.object_id)
    assert np.isnan(back.labels["linear"][:5]).all()  # nulls come back as NaN
    assert back.metadata["embedding_dim"] == t.X.shape[1]
    # a directory of per-rank parts reads as one table
    (tmp_path / "parts").mkdir()
    _write(tmp_path / "parts" / "part-00000.parquet", t, slice(0, 100))
    _write(tmp_path / "parts" / "part-00001.parquet", t, slice(100, None))
    both = load_embeddings(tmp_path / "parts")
    assert len(both) == len(t)
    np.testing.assert_array_equal(both.X, t.X)

    out = tmp_path / "probes"
    rc = main(["probe", "--embeddings", str(tmp_path / "emb.parquet"), "--out", str(out), "--targets",
               "linear,noise,side", "--methods", "linear,knn", "--baselines", ""])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "probes.json").read_text())  # readable JSON, same layout as before the dataclass
    assert set(report) >= {"protocol", "targets", "results", "skipped", "embeddings"}
    assert report["protocol"]["methods"] == ["linear", "knn"]
    assert report["results"]["pretrained"]["linear"]["linear"]["r2"] > 0.99
    result = ProbeResult.load(out / "probes.json")
    assert result.score("linear", "pretrained", "linear") == report["results"]["pretrained"]["linear"]["linear"]["r2"]
    assert result.methods == ["linear", "knn"]
    assert (out / "probes.md").read_text().count("| linear |") == 2
    assert (out / "probes.png").stat().st_size > 0 and (out / "probes.pdf").stat().st_size > 0


def test_probe_result_json_round_trip_and_bad_files(tmp_path):
    t = _table(n_fit=100, n_test=100)
    result = pr.evaluate(t, ["linear", "side"], ("linear", "knn"))
    back = ProbeResult.from_json(result.to_json())
    assert back == result
    assert back.score("side", "pretrained", "knn") == result.score("side", "pretrained", "knn")
    path = result.save(tmp_path / "p" / "probes.json")
    assert ProbeResult.load(path) == result
    (tmp_path / "bad.json").write_text('{"protocol": {}}')
    with pytest.raises(ValueError, match=r"bad.json is not a probe report: no targets, results"):
        ProbeResult.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        ProbeResult.load(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="no probe report"):
        ProbeResult.load(tmp_path / "missing.json")
