"""Probing each embedding column of one file (a multimodal model's per-modality columns) on the same objects."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from astrolom.eval import probe_columns as pc
from astrolom.eval import probes as pr
from astrolom.eval.embeddings import choose_columns, embedding_columns, load_embedding_columns, load_embeddings

N = 400


@pytest.fixture(scope="module")
def columns_file(tmp_path_factory):
    """Three vector columns: `good` reads redshift and side, `noise` reads nothing, `sparse` is null for ~30%."""
    rng = np.random.default_rng(0)
    z = rng.uniform(0, 0.5, N)
    u = rng.normal(size=N)
    good = np.stack([z, u, rng.normal(size=N), rng.normal(size=N)], 1) + 0.002 * rng.normal(size=(N, 4))
    noise = rng.normal(size=(N, 4))
    sparse = np.stack([z + 0.05 * rng.normal(size=N), rng.normal(size=N)], 1)
    has = rng.uniform(size=N) > 0.3
    split = np.array(["train", "val", "test", "val", "test"] * (N // 5))

    def vec(a, present=None):
        rows = [list(v) if present is None or p else None for v, p in zip(a.astype(np.float32), present
                                                                            if present is not None else [True] * N,
                                                                            strict=True)]  # fmt: skip
        return pa.array(rows, pa.list_(pa.float32(), a.shape[1]))

    table = pa.table({
        "object_id": [f"o{i}" for i in range(N)],
        "split": split.tolist(),
        "redshift": z,
        "side": np.where(u > 0, "north", "south").tolist(),
        "embedding": vec(good),  # the joint column of a multimodal file: `auto` leaves it out beside the others
        "embedding_good": vec(good),
        "embedding_noise": vec(noise),
        "embedding_sparse": vec(sparse, has),
    })  # fmt: skip
    path = tmp_path_factory.mktemp("columns") / "emb.parquet"
    pq.write_table(table, path)
    return path, has, split


def test_column_choice():
    names = ["embedding", "embedding_good", "embedding_noise"]
    assert choose_columns(names) == ["embedding_good", "embedding_noise"]
    assert choose_columns(["embedding"]) == ["embedding"]  # a single-column file: today's behaviour
    assert choose_columns(names, "embedding_noise, embedding") == ["embedding_noise", "embedding"]
    with pytest.raises(ValueError, match="no embedding column.*embedding_x"):
        choose_columns(names, "embedding_x")


def test_columns_load_on_the_rows_that_have_every_column(columns_file):
    path, has, _ = columns_file
    assert embedding_columns(path) == ["embedding", "embedding_good", "embedding_noise", "embedding_sparse"]
    tables = load_embedding_columns(path, ["embedding_good", "embedding_sparse"])
    assert len(tables["embedding_good"]) == len(tables["embedding_sparse"]) == int(has.sum())
    np.testing.assert_array_equal(tables["embedding_good"].object_id, tables["embedding_sparse"].object_id)
    assert tables["embedding_sparse"].X.shape == (int(has.sum()), 2) and np.isfinite(tables["embedding_sparse"].X).all()
    assert set(tables["embedding_good"].labels) == {"redshift", "side"}  # vector columns are never labels
    # one column alone keeps every row where it is present
    assert len(load_embeddings(path)) == N and len(load_embeddings(path, "embedding_sparse")) == int(has.sum())


def test_probe_columns_scores_each_column_on_the_same_objects(columns_file):
    path, has, split = columns_file
    res = pc.probe_columns(path, "auto", ["redshift", "side"], ("linear",))
    assert list(res) == ["embedding_good", "embedding_noise", "embedding_sparse"]
    for r in res.values():
        assert r.protocol["rows"] == int(has.sum())
        assert r.protocol["n_fit"] == int((has & (split == "val")).sum())
        assert r.protocol["n_test"] == int((has & (split == "test")).sum())
    good, noise, sparse = (res[c].score("redshift") for c in res)
    assert good > 0.99 and noise < 0.05 and 0.7 < sparse < good
    assert res["embedding_good"].score("side") > 0.95 and res["embedding_noise"].score("side") < 0.65
    assert pc.best_column(res, "redshift") == "embedding_good" and pc.best_column(res, "side") == "embedding_good"
    assert pc.best_column(res, "redshift", "knn") is None  # not run
    tie = {"embedding_b": res["embedding_noise"], "embedding_a": res["embedding_noise"]}
    assert pc.best_column(tie, "redshift") == "embedding_b"  # a tie goes to the first column, not the name
    md = pc.columns_markdown(res)
    assert f"on the same {int(has.sum())} objects" in md
    assert "| target | metric | embedding_good | embedding_noise | embedding_sparse | best |" in md
    row = next(line for line in md.splitlines() if line.startswith("| redshift"))
    assert row.startswith(f"| redshift | r2 | **{good:.3f}** | {noise:.3f} | {sparse:.3f} |")
    assert row.endswith("| embedding_good |")


def test_probe_modalities_is_probe_columns(tmp_path, columns_file):
    from astrolom.eval.multimodal import probe_modalities

    path, has, split = columns_file
    t = pq.read_table(path)
    t = t.rename_columns([{"embedding_good": "embedding_images", "embedding_sparse": "embedding_spectra"}.get(c, c)
                          for c in t.column_names])  # fmt: skip
    pq.write_table(t, tmp_path / "mm.parquet")
    out = probe_modalities(tmp_path / "mm.parquet", ["redshift"])
    with pytest.raises(ValueError, match="no embedding column"):
        probe_modalities(path, ["redshift"])  # no embedding_images/spectra/joint in this file
    mm = ["embedding_images", "embedding_spectra"]
    full = pc.probe_columns(tmp_path / "mm.parquet", mm, ["redshift"], ("linear",))
    assert out["embedding_images"]["redshift"] == full["embedding_images"].score("redshift")
    assert out["embedding_spectra"]["redshift"] == full["embedding_spectra"].score("redshift")
    assert out["_objects"] == {"fit": full["embedding_images"].protocol["n_fit"],
                               "test": full["embedding_images"].protocol["n_test"]}  # fmt: skip


@pytest.mark.slow
def test_probe_cli_writes_one_result_per_column_and_the_comparison(columns_file, tmp_path, capsys):
    from astrolom.cli import main

    path, has, _ = columns_file
    out = tmp_path / "probes"
    rc = main(["probe", "--embeddings", str(path), "--out", str(out), "--targets", "redshift,side",
               "--methods", "linear"])  # fmt: skip
    assert rc == 0
    for c in ("embedding_good", "embedding_noise", "embedding_sparse"):
        result = pr.ProbeResult.load(out / c / "probes.json")
        assert result.protocol["column"] == c and result.protocol["rows"] == int(has.sum())
        assert (out / c / "probes.md").is_file() and (out / c / "probes.png").stat().st_size > 0
    back = pc.load_columns(out / "columns.json")
    assert list(back) == ["embedding_good", "embedding_noise", "embedding_sparse"]
    assert back["embedding_good"].score("redshift") > 0.99
    md = (out / "columns.md").read_text()
    assert md == pc.columns_markdown(back) and md.strip() in capsys.readouterr().out
    assert not (out / "probes.json").exists()
    # one chosen column: today's single-result layout, on that column's rows
    rc = main(["probe", "--embeddings", str(path), "--out", str(tmp_path / "one"), "--targets", "redshift",
               "--methods", "linear", "--columns", "embedding_sparse"])  # fmt: skip
    assert rc == 0
    one = json.loads((tmp_path / "one" / "probes.json").read_text())
    assert one["protocol"]["n_fit"] == back["embedding_sparse"].protocol["n_fit"]
    rc = main(["probe", "--embeddings", str(path), "--out", str(tmp_path / "x"), "--data", str(tmp_path)])
    assert rc == 2 and "baselines run beside one embedding column" in capsys.readouterr().err
