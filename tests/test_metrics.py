"""The field's metrics on hand-computable inputs and against independent implementations; per-object predictions
as Parquet with their metrics and figures; `astrolom probe` writes them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.stats import mad_std
from sklearn.metrics import mean_absolute_error, r2_score

from astrolom.eval import metrics as mt

# dz = [0.1, -0.2, 0.15, 0.3, 0.0]; 1 + z = [1, 2, 1.5, 1, 2]
Z_TRUE = np.array([0.0, 1.0, 0.5, 0.0, 1.0])
Z_PRED = np.array([0.1, 0.8, 0.65, 0.3, 1.0])


def test_photo_z_metrics_by_hand():
    # median dz = 0.1; |dz - 0.1| / (1 + z) = [0, 0.15, 0.0333, 0.2, 0.05] -> median 0.05
    assert mt.sigma_nmad(Z_TRUE, Z_PRED) == pytest.approx(1.4826 * 0.05, abs=1e-12)
    # dz / (1 + z) = [0.1, -0.1, 0.1, 0.3, 0] -> median 0.1
    assert mt.bias(Z_TRUE, Z_PRED) == pytest.approx(0.1, abs=1e-12)
    # |dz| / (1 + z) > 0.15: only the 0.3
    assert mt.outlier_fraction(Z_TRUE, Z_PRED) == pytest.approx(0.2)
    # SS_tot = 4 * 0.25 = 1; SS_res = 0.01 + 0.04 + 0.0225 + 0.09 = 0.1625
    assert mt.r2(Z_TRUE, Z_PRED) == pytest.approx(0.8375, abs=1e-12)
    assert mt.mae(Z_TRUE, Z_PRED) == pytest.approx(0.15, abs=1e-12)
    m = mt.regression_metrics(Z_TRUE, Z_PRED, "redshift")
    assert m == pytest.approx(
        {"n": 5, "n_missing": 0, "r2": 0.8375, "mae": 0.15, "sigma_nmad": 0.07413, "bias": 0.1, "eta": 0.2}
    )
    # other properties get R2 and MAE only
    assert set(mt.regression_metrics(Z_TRUE, Z_PRED, "log_mstar")) == {"n", "n_missing", "r2", "mae"}


def test_outlier_threshold_is_strict_and_bias_is_signed():
    z = np.zeros(4)
    assert mt.outlier_fraction(z, np.array([0.15, -0.15, 0.1500001, 0.0])) == pytest.approx(0.25)
    assert mt.bias(Z_TRUE, Z_TRUE - 0.05 * (1 + Z_TRUE)) == pytest.approx(-0.05)


def test_against_independent_implementations():
    rng = np.random.default_rng(0)
    z = rng.uniform(0.0, 1.5, 5000)
    pred = z + 0.03 * (1 + z) * rng.standard_normal(5000)
    # R2 and MAE: scikit-learn
    assert mt.r2(z, pred) == pytest.approx(r2_score(z, pred), rel=1e-12)
    assert mt.mae(z, pred) == pytest.approx(mean_absolute_error(z, pred), rel=1e-12)
    # NMAD: at a fixed redshift the normalisation is a constant, so sigma_NMAD = astropy's mad_std(dz) / (1 + z)
    dz = 0.03 * rng.standard_normal(2000) + 0.01
    z_fixed = np.full(2000, 0.5)
    assert mt.sigma_nmad(z_fixed, z_fixed + dz) == pytest.approx(mad_std(dz) / 1.5, rel=1e-5)
    # and on Gaussian scatter of 0.03 (1 + z) it recovers 0.03
    assert mt.sigma_nmad(z, pred) == pytest.approx(0.03, rel=0.05)
    assert abs(mt.bias(z, pred)) < 0.003 and mt.outlier_fraction(z, pred) < 0.001


def test_missing_values_are_counted_and_bad_input_refused():
    t, p = Z_TRUE.copy(), Z_PRED.copy()
    t[0], p[3] = np.nan, np.inf
    m = mt.regression_metrics(t, p, "redshift")
    assert m["n"] == 3 and m["n_missing"] == 2
    assert m["mae"] == pytest.approx((0.2 + 0.15 + 0.0) / 3)
    with pytest.raises(ValueError, match="5 true values but 4 predictions"):
        mt.regression_metrics(Z_TRUE, Z_PRED[:4])
    with pytest.raises(ValueError, match="must be > -1"):
        mt.sigma_nmad(np.array([-1.0, 0.2]), np.array([0.0, 0.2]))
    assert np.isnan(mt.r2(np.ones(3), np.arange(3.0)))  # constant truth: R2 undefined


def _prediction_set() -> mt.PredictionSet:
    ps = mt.PredictionSet(info={"command": "test"})
    ids = [f"g{i}" for i in range(5)]
    ps.add("pretrained", "linear", "redshift", ids, Z_TRUE, Z_PRED)
    ps.add("pretrained", "linear", "log_mstar", ids, np.arange(5.0), np.arange(5.0) + 0.5)
    ps.add("image aligned", "flow", "redshift", ids, Z_TRUE, Z_TRUE, posterior_sigma=[0.1, 0.2, 0.3, 0.4, 0.5])
    return ps


def test_prediction_set_round_trip_and_generations(tmp_path):
    from astrolom.eval.figures import prediction_figure, write_predictions

    ps = _prediction_set()
    folder = tmp_path / "predictions"
    paths = write_predictions(ps, folder, [("pretrained", "linear")])
    table = pq.read_table(paths["parquet"])
    assert table.column_names == list(mt.COLUMNS) and table.num_rows == 15
    back = mt.PredictionSet.read(folder)
    assert back.groups() == ps.groups()
    g = back.select("image aligned", "flow", "redshift")
    np.testing.assert_allclose(g["posterior_sigma"], [0.1, 0.2, 0.3, 0.4, 0.5])
    assert list(g["object_id"]) == ["g0", "g1", "g2", "g3", "g4"]
    assert np.isnan(back.select("pretrained", "linear", "redshift")["posterior_sigma"]).all()

    doc = mt.read_metrics(folder)
    assert doc["info"] == {"command": "test"} and "sigma_nmad" in doc["definitions"]
    rows = {(r["feature_set"], r["method"], r["target"]): r for r in doc["metrics"]}
    assert rows["pretrained", "linear", "redshift"]["sigma_nmad"] == pytest.approx(0.07413)
    assert rows["pretrained", "linear", "log_mstar"] == pytest.approx(
        {"feature_set": "pretrained", "method": "linear", "target": "log_mstar", "split": "test", "n": 5,
         "n_missing": 0, "r2": 1 - 1.25 / 10, "mae": 0.5}
    )  # fmt: skip
    assert rows["image aligned", "flow", "redshift"]["median_posterior_sigma"] == pytest.approx(0.3)
    # one figure per property of the requested group, none for the others
    for target in ("redshift", "log_mstar"):
        assert prediction_figure(folder, "pretrained", "linear", target).with_suffix(".png").stat().st_size > 0
    assert not prediction_figure(folder, "image aligned", "flow", "redshift").with_suffix(".png").exists()
    assert prediction_figure(folder, "image aligned", "flow", "z").name == "image_aligned__flow__z"

    # a rewrite is a new generation: nothing of the old one is left, no temporary folders beside it
    small = mt.PredictionSet()
    small.add("cnn", "supervised", "redshift", ["a", "b"], [0.1, 0.2], [0.1, 0.3])
    write_predictions(small, folder, [])
    assert sorted(p.name for p in folder.iterdir()) == ["prediction_metrics.json", "predictions.parquet"]
    assert [p.name for p in tmp_path.iterdir()] == ["predictions"]
    assert len(mt.PredictionSet.read(folder)) == 2


def test_a_failed_write_leaves_the_previous_generation(tmp_path):
    folder = tmp_path / "predictions"
    _prediction_set().write(folder)

    def crash(preds, tmp):
        (tmp / "half.png").write_bytes(b"x")
        raise RuntimeError("killed while drawing")

    newer = mt.PredictionSet()
    newer.add("cnn", "supervised", "redshift", ["a"], [0.1], [0.2])
    with pytest.raises(RuntimeError, match="killed while drawing"):
        newer.write(folder, crash)
    assert len(mt.PredictionSet.read(folder)) == 15 and not (folder / "half.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["predictions"]


def test_prediction_set_refuses_bad_input(tmp_path):
    ps = mt.PredictionSet()
    with pytest.raises(ValueError, match="3 ids, 2 truths"):
        ps.add("a", "b", "redshift", ["x", "y", "z"], [0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(KeyError, match="no predictions for a/b/redshift"):
        ps.select("a", "b", "redshift")
    pq.write_table(_prediction_set().to_table().drop(["truth"]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet is not a predictions table: no column.s. truth"):
        mt.PredictionSet.read(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError, match="no predictions table"):
        mt.PredictionSet.read(tmp_path / "missing")


def test_probe_writes_predictions_scored_like_probes_json(tmp_path):
    """`astrolom probe`: per-object predictions of every feature set and method, their metrics agree with probes.json
    and with a recomputation from the Parquet; one figure per regression property."""
    from astrolom.cli import main
    from astrolom.data.records import Record
    from astrolom.eval.embeddings import EmbeddingWriter
    from astrolom.eval.figures import prediction_figure

    rng = np.random.default_rng(0)
    n, dim = 300, 8
    X = rng.normal(size=(n, dim)).astype(np.float32)
    z = np.clip(0.5 + 0.2 * X[:, 0] + 0.02 * rng.normal(size=n), 0.01, None)
    labels = {"redshift": z, "mass": X[:, 1] + 0.1 * rng.normal(size=n),
              "side": np.where(X[:, 2] > 0, "north", "south").astype(object)}  # fmt: skip
    split = np.array(["val"] * 150 + ["test"] * 150)
    ids = np.array([f"o{i}" for i in range(n)])
    w = EmbeddingWriter(tmp_path / "emb.parquet", {"layer": -2})
    w.write([Record(ids[i], np.zeros((1, 1, 1), np.float32), split[i], {k: v[i] for k, v in labels.items()})
             for i in range(n)], X)  # fmt: skip
    w.close()
    out = tmp_path / "probes"
    assert main(["probe", "--embeddings", str(tmp_path / "emb.parquet"), "--out", str(out), "--targets",
                 "redshift,mass,side", "--methods", "linear,knn", "--baselines", ""]) == 0  # fmt: skip
    report = json.loads((out / "probes.json").read_text())
    linear_z = report["results"]["pretrained"]["redshift"]["linear"]
    assert set(linear_z) == {"r2", "mae", "sigma_nmad", "bias", "eta"} and linear_z["r2"] > 0.95
    assert set(report["results"]["pretrained"]["mass"]["linear"]) == {"r2", "mae"}

    preds = mt.PredictionSet.read(out / "predictions")
    assert set(preds.groups()) == {("pretrained", m, t) for m in ("linear", "knn") for t in ("redshift", "mass")}
    g = preds.select("pretrained", "linear", "redshift")
    test_ids = ids[split == "test"]
    assert list(g["object_id"]) == list(test_ids) and set(g["split"]) == {"test"}
    np.testing.assert_allclose(g["truth"], z[split == "test"])
    # scores recomputed from the saved per-object predictions equal the probe report's
    assert mt.sigma_nmad(g["truth"], g["prediction"]) == pytest.approx(linear_z["sigma_nmad"], rel=1e-12)
    assert r2_score(g["truth"], g["prediction"]) == pytest.approx(linear_z["r2"], rel=1e-9)
    rows = {(r["method"], r["target"]): r for r in mt.read_metrics(out / "predictions")["metrics"]}
    assert rows["knn", "redshift"]["eta"] == report["results"]["pretrained"]["redshift"]["knn"]["eta"]
    assert mt.read_metrics(out / "predictions")["info"]["command"] == "astrolom probe"
    for target in ("redshift", "mass"):
        assert prediction_figure(out / "predictions", "pretrained", "linear", target).with_suffix(".pdf").is_file()
    assert not prediction_figure(out / "predictions", "pretrained", "knn", "redshift").with_suffix(".png").exists()


def test_metrics_command_scores_any_catalogue_and_astrolom_predictions(tmp_path, capsys):
    import pyarrow as pa

    from astrolom.cli import main

    pq.write_table(pa.table({"id": ["a", "b", "c", "d", "e"], "z_spec": Z_TRUE, "z_phot": Z_PRED}), tmp_path / "c.pq")
    assert main(["metrics", str(tmp_path / "c.pq"), "--truth", "z_spec", "--prediction", "z_phot", "--id", "id",
                 "--out", str(tmp_path / "scored")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    # the hand-computed numbers of test_photo_z_metrics_by_hand; z_spec is a redshift's name
    assert "| c | z_phot | z_spec | all | 5 | 0 | 0.8375 | 0.15 | 0.0741 | +0.1000 | 0.2000 |" in out
    back = mt.PredictionSet.read(tmp_path / "scored")
    assert list(back.select("c", "z_phot", "z_spec")["object_id"]) == ["a", "b", "c", "d", "e"]
    assert (tmp_path / "scored" / "c__z_phot__z_spec.png").is_file()
    # a CSV whose columns do not say redshift: --redshift asks for the photo-z metrics
    (tmp_path / "c.csv").write_text("t,p\n" + "".join(f"{a},{b}\n" for a, b in zip(Z_TRUE, Z_PRED, strict=True)))
    assert main(["metrics", str(tmp_path / "c.csv"), "--truth", "t", "--prediction", "p"]) == 0
    assert "sigma_NMAD" not in capsys.readouterr().out
    assert main(["metrics", str(tmp_path / "c.csv"), "--truth", "t", "--prediction", "p", "--redshift"]) == 0
    assert "| c | p | redshift | all | 5 | 0 | 0.8375 | 0.15 | 0.0741 |" in capsys.readouterr().out
    # an astrolom predictions folder is rescored group by group
    _prediction_set().write(tmp_path / "predictions")
    assert main(["metrics", str(tmp_path / "predictions")]) == 0
    assert capsys.readouterr().out.count("\n") == 2 + 3
    # errors name the file and the problem
    assert main(["metrics", str(tmp_path / "c.csv"), "--truth", "zz", "--prediction", "p"]) == 2
    assert "c.csv: no column 'zz'; it has t, p" in capsys.readouterr().err
    assert main(["metrics", str(tmp_path / "c.pq")]) == 2
    assert "give --truth and --prediction" in capsys.readouterr().err
    assert main(["metrics", str(tmp_path / "c.pq"), "--truth", "id", "--prediction", "z_phot"]) == 2
    assert "column 'id' is not numeric" in capsys.readouterr().err
