"""Labels from the person at the screen: marks kept atomically beside the index, the classifier ranking of the
unmarked objects with uncertainty sampling, exports, the `astrolom marks` / `search --export` commands and the
explorer's /api/marks, /api/rank and /api/export."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from astrolom.search import labels as lb
from astrolom.search.index import load_index

BASE = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def index_dir(mock_survey, tmp_path_factory):
    from search_helpers import make_model_index

    return make_model_index(mock_survey, tmp_path_factory.mktemp("labels"))


@pytest.fixture
def idx(index_dir):
    lb.marks_path(index_dir).unlink(missing_ok=True)  # every test starts without marks
    return load_index(index_dir)


def test_marks_persist_atomically_and_are_checked(idx, index_dir, monkeypatch):
    ids = [str(i) for i in idx.object_id[:3]]
    marks = lb.Marks(lb.marks_path(index_dir), idx)
    marks.set(ids[0], 1)
    marks.set(ids[1], 0)
    marks.set(ids[2], 1)
    marks.set(ids[2], None)
    again = lb.Marks(lb.marks_path(index_dir), idx)  # a restart reads what was written
    assert again.items() == {ids[0]: 1, ids[1]: 0}
    assert again.as_dict() == {
        "marks": [{"id": ids[0], "mark": 1}, {"id": ids[1], "mark": 0}],
        "positives": 1,
        "negatives": 1,
    }
    with pytest.raises(ValueError, match="not in the index"):
        marks.set("no-such-object", 1)
    with pytest.raises(ValueError, match="1 \\(interesting\\), 0"):
        marks.set(ids[0], 2)
    with pytest.raises(ValueError, match="longer than"):
        marks.set("x" * 300, 1)
    small = lb.Marks(lb.marks_path(index_dir), idx, max_marks=2)
    with pytest.raises(ValueError, match="the limit"):
        small.set(ids[2], 1)
    small.set(ids[0], 0)  # changing an existing mark is not a new one
    # a write that fails midway leaves the old file whole and no temporary file behind
    before = lb.marks_path(index_dir).read_text()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        marks.set(ids[2], 1)
    assert lb.marks_path(index_dir).read_text() == before and ids[2] not in marks.items()
    assert [p.name for p in index_dir.iterdir() if p.name.startswith(".marks")] == []


def test_a_damaged_marks_file_is_named(idx, index_dir):
    lb.marks_path(index_dir).write_text('{"marks": {"a": 7}}')
    with pytest.raises(ValueError, match=f"{lb.marks_path(index_dir)}: marks must map"):
        lb.Marks(lb.marks_path(index_dir), idx)
    lb.marks_path(index_dir).write_text("{not json")
    with pytest.raises(ValueError, match="not a marks file"):
        lb.Marks(lb.marks_path(index_dir), idx)


def test_similarity_then_knn_then_logistic(idx):
    V = idx.vectors(np.arange(len(idx)))
    ids = idx.object_id
    pos = [3, 17]
    r = lb.rank(idx, {ids[p]: 1 for p in pos}, n=10)
    expect = (V @ V[pos].T).max(axis=1)
    free = np.setdiff1d(np.arange(len(idx)), pos)
    assert r.method == "similarity"
    assert list(r.rows) == list(free[np.argsort(-expect[free], kind="stable")][:10])
    np.testing.assert_allclose(r.scores, expect[r.rows], rtol=1e-5)
    assert not set(r.rows) & set(pos) and len(r.suggest_rows) == 10
    # one negative: the soft vote of the nearest mark of each class
    r = lb.rank(idx, {ids[3]: 1, ids[17]: 1, ids[40]: 0}, n=5)
    p = 1 / (1 + np.exp(-((V @ V[pos].T).max(1) - V @ V[40]) / lb.KNN_TEMPERATURE))
    assert r.method == "knn"
    np.testing.assert_allclose(r.scores, np.sort(p[np.setdiff1d(free, [40])])[::-1][:5], rtol=1e-5)
    assert np.all(np.diff(np.abs(r.suggest_p - 0.5)) >= 0)  # the most uncertain first
    with pytest.raises(ValueError, match="at least one object as interesting"):
        lb.rank(idx, {ids[0]: 0}, n=5)
    with pytest.raises(ValueError, match="between 1 and 1000"):
        lb.rank(idx, {ids[0]: 1}, n=1001)


def test_the_logistic_ranking_finds_a_planted_class(idx):
    V = idx.vectors(np.arange(len(idx)))
    # a class the embeddings separate: the upper half along the first principal direction
    centred = V - V.mean(0)
    direction = np.linalg.svd(centred, full_matrices=False)[2][0]
    truth = centred @ direction > np.median(centred @ direction)
    rng = np.random.default_rng(0)
    marked = [
        *rng.choice(np.flatnonzero(truth), 6, replace=False),
        *rng.choice(np.flatnonzero(~truth), 6, replace=False),
    ]
    r = lb.rank(idx, {idx.object_id[m]: int(truth[m]) for m in marked}, n=10)
    assert r.method == "logistic"
    assert truth[r.rows].sum() >= 9  # base rate 0.5: the classifier's top 10 are nearly all of the class
    assert np.all(r.scores[:-1] >= r.scores[1:]) and 0 <= r.scores.min() and r.scores.max() <= 1


def test_export_tables(idx):
    ids = [str(i) for i in idx.object_id[[5, 2, 9]]]
    t = lb.export_table(idx, ids, marks={ids[1]: 1}, scores={ids[0]: 0.5, ids[1]: float("nan")})
    assert t.column_names[:6] == ["object_id", "ra", "dec", "mark", "score", "split"]
    assert "redshift" in t.column_names and "has_star" in t.column_names
    assert t.column("object_id").to_pylist() == ids and t.column("mark").to_pylist() == [None, 1, None]
    assert t.column("score").to_pylist() == [0.5, None, None]
    rows = idx.objects.take([5, 2, 9])
    assert t.column("ra").to_pylist() == rows.column("ra").to_pylist()
    back = pacsv.read_csv(io.BytesIO(lb.table_bytes(t, "csv")))
    assert back.column("object_id").cast("string").to_pylist() == ids
    assert pq.read_table(io.BytesIO(lb.table_bytes(t, "parquet"))).equals(t)
    with pytest.raises(ValueError, match="not in the index"):
        lb.export_table(idx, ["nope"])


def test_cli_marks_rank_and_search_export(idx, index_dir, tmp_path, capsys):
    from astrolom.cli import main

    a, b, c = (str(i) for i in idx.object_id[:3])
    out = tmp_path / "ranked.csv"
    assert (
        main(
            [
                "marks",
                "--index",
                str(index_dir),
                "--set",
                f"{a}=1",
                "--set",
                f"{b}=0",
                "--set",
                f"{c}=1",
                "--rank",
                "7",
                "--export",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "3 marks" in text and "2 interesting, 1 not" in text and "ranked by knn" in text
    t = pacsv.read_csv(out)
    assert t.num_rows == 7 and not {a, b, c} & set(t.column("object_id").cast("string").to_pylist())
    assert main(["marks", "--index", str(index_dir), "--unset", c, "--export", str(tmp_path / "m.parquet")]) == 0
    m = pq.read_table(tmp_path / "m.parquet")
    assert dict(zip(m.column("object_id").to_pylist(), m.column("mark").to_pylist(), strict=True)) == {a: 1, b: 0}
    assert main(["search", "--index", str(index_dir), "--id", a, "-k", "4", "--export", str(tmp_path / "nb.csv")]) == 0
    nb = pacsv.read_csv(tmp_path / "nb.csv")
    want = idx.neighbours_of_id(a, 4)
    assert nb.column("object_id").cast("string").to_pylist() == [h.object_id for h in want]
    np.testing.assert_allclose(nb.column("similarity").to_numpy(), [h.similarity for h in want], rtol=1e-6)
    assert nb.column("mark").to_pylist() == [{b: 0}.get(h.object_id) for h in want]
    assert main(["marks", "--index", str(index_dir), "--set", f"{a}=yes"]) == 2
    assert "want ID=1 or ID=0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------- API


@pytest.fixture
def client(idx, index_dir):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from astrolom.serve.app import create_app

    return TestClient(create_app(index_dir), base_url=BASE, raise_server_exceptions=False)


def test_api_marks_rank_export(client, idx, index_dir):
    ids = [str(i) for i in idx.object_id]
    assert client.get("/api/marks").json() == {"marks": [], "positives": 0, "negatives": 0}
    assert client.post("/api/rank", json={"n": 5}).status_code == 409  # nothing marked yet
    for i, m in ((0, 1), (1, 1), (2, 0), (3, 0), (4, 1)):
        r = client.post("/api/marks", json={"id": ids[i], "mark": m})
        assert r.status_code == 200
    r = client.post("/api/marks", json={"id": ids[4], "mark": None}).json()
    assert r["positives"] == 2 and r["negatives"] == 2 and {"id": ids[0], "mark": 1} in r["marks"]
    assert json.loads(lb.marks_path(index_dir).read_text())["marks"] == {ids[0]: 1, ids[1]: 1, ids[2]: 0, ids[3]: 0}
    body = client.post("/api/rank", json={"n": 20}).json()
    assert body["method"] == "logistic" and len(body["ranked"]) == 20 and len(body["suggest"]) == 10
    want = lb.rank(idx, {ids[0]: 1, ids[1]: 1, ids[2]: 0, ids[3]: 0}, 20)
    assert [h["id"] for h in body["ranked"]] == [ids[r] for r in want.rows]
    assert all(0 <= s["p"] <= 1 for s in body["suggest"])
    # a restart sees the marks
    from fastapi.testclient import TestClient

    from astrolom.serve.app import create_app

    again = TestClient(create_app(index_dir), base_url=BASE)
    assert again.get("/api/marks").json()["positives"] == 2
    # exports: a selection with scores, and the marks
    r = client.post("/api/export", json={"ids": ids[5:8], "format": "csv", "scores": {ids[5]: 0.25}})
    assert r.status_code == 200 and r.headers["content-disposition"] == 'attachment; filename="astrolom-selection.csv"'
    t = pacsv.read_csv(io.BytesIO(r.content))
    assert t.column("object_id").cast("string").to_pylist() == ids[5:8] and t.column("score").to_pylist()[0] == 0.25
    r = client.get("/api/marks/export?format=parquet")
    assert r.status_code == 200 and "astrolom-marks.parquet" in r.headers["content-disposition"]
    m = pq.read_table(io.BytesIO(r.content))
    assert sorted(zip(m.column("object_id").to_pylist(), m.column("mark").to_pylist(), strict=True)) == sorted(
        [(ids[0], 1), (ids[1], 1), (ids[2], 0), (ids[3], 0)]
    )


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/api/marks", {"id": "no-such-object", "mark": 1}, 404),
        ("/api/marks", {"id": "x", "mark": 2}, 422),
        ("/api/marks", {"id": "x" * 300, "mark": 1}, 422),
        ("/api/marks", {"mark": 1}, 422),
        ("/api/rank", {"n": 1001}, 422),
        ("/api/rank", {"n": 0}, 422),
        ("/api/export", {"ids": ["no-such-object"], "format": "csv"}, 404),
        ("/api/export", {"ids": [], "format": "xlsx"}, 422),
        ("/api/export", {"ids": ["a"] * (lb.MAX_EXPORT + 1), "format": "csv"}, 422),
    ],
)
def test_api_bounds_every_input(client, path, body, status):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["detail"]


# OWASP's CSV-injection triggers, planted in the ids and a text label of an index built from released-style .npy
# embeddings; `harmless` cells (a formula sign not at the start, a number-looking word) must stay as they are
PLANTED = ['=HYPERLINK("http://x","y")', "+1+1", "-2+3", "@SUM(A1)", "\tTAB", "\rCR", "plain-id", "a=b"]


@pytest.fixture(scope="module")
def planted_index(tmp_path_factory):
    from astrolom.cli import main

    d = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    np.save(d / "emb.npy", rng.normal(size=(len(PLANTED), 8)).astype(np.float32))
    notes = ["=cmd|' /C calc'!A0", "ok", "-x", "@x", "+x", "\tx", "2.5", "note=1"]
    dec = [-12.5, 3.0, -1.0, 0.5, -80.0, 1.0, 2.0, -3.5]  # numbers stay numbers, minus signs and all
    pq.write_table(pa.table({"object_id": PLANTED, "note": notes, "dec": dec}), d / "ids.parquet")
    out = d / "index"
    assert main(["index", "--embeddings", str(d / "emb.npy"), "--ids", str(d / "ids.parquet"), "--out", str(out),
                 "--map", "pca", "--no-progress"]) == 0  # fmt: skip
    return out, notes, dec


def _cells(csv_bytes: bytes, column: str) -> list:
    t = pacsv.read_csv(io.BytesIO(csv_bytes), convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    return t.column(column).to_pylist()


def test_csv_exports_neutralise_formulas_parquet_keeps_values(planted_index, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from astrolom.cli import main
    from astrolom.serve.app import create_app

    out, notes, dec = planted_index
    idx = load_index(out)
    quoted = ["'" + v if v[0] in "=+-@\t\r" else v for v in PLANTED]
    assert quoted[:6] == ["'" + v for v in PLANTED[:6]] and quoted[6:] == PLANTED[6:]
    t = lb.export_table(idx, PLANTED)
    csv = lb.table_bytes(t, "csv")
    assert _cells(csv, "object_id") == quoted
    assert _cells(csv, "note") == ["'=cmd|' /C calc'!A0", "ok", "'-x", "'@x", "'+x", "'\tx", "2.5", "note=1"]
    assert _cells(csv, "dec") == dec  # a numeric column is not text: no quote
    assert pq.read_table(io.BytesIO(lb.table_bytes(t, "parquet"))).column("object_id").to_pylist() == PLANTED

    # the explorer's two exports, and `astrolom marks --export`, go through the same writer
    client = TestClient(create_app(out), base_url=BASE)
    for oid in PLANTED[:3]:
        assert client.post("/api/marks", json={"id": oid, "mark": 1}).status_code == 200
    r = client.post("/api/export", json={"ids": PLANTED, "format": "csv"})
    assert r.status_code == 200 and _cells(r.content, "object_id") == quoted
    r = client.get("/api/marks/export?format=csv")
    assert r.status_code == 200 and sorted(_cells(r.content, "object_id")) == sorted(quoted[:3])
    r = client.get("/api/marks/export?format=parquet")
    assert sorted(pq.read_table(io.BytesIO(r.content)).column("object_id").to_pylist()) == sorted(PLANTED[:3])
    assert main(["marks", "--index", str(out), "--export", str(tmp_path / "marks.csv")]) == 0
    assert sorted(_cells((tmp_path / "marks.csv").read_bytes(), "object_id")) == sorted(quoted[:3])
    capsys.readouterr()
