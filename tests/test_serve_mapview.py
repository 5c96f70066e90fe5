"""The explorer's map at scale (`astrolom.serve.mapview`): the grid order's range queries and density images against
brute force over every point, and the view endpoints through FastAPI's TestClient."""

from __future__ import annotations

import numpy as np
import pytest

from astrolom.serve.mapview import GridOrder, LabelColumn, View, label_column, label_kind

BASE = "http://127.0.0.1:8000"


def _points(n: int, seed: int = 0) -> np.ndarray:
    """Clustered 2-D points (dense cores, empty gaps), a few rows with a NaN coordinate."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-10, 10, (12, 2))
    xy = centres[rng.integers(0, 12, n)] + rng.normal(0, rng.uniform(0.1, 1.5, (n, 1)), (n, 2))
    xy[rng.choice(n, 7, replace=False), rng.integers(0, 2, 7)] = np.nan
    return xy.astype(np.float32)


def _brute_inside(xy: np.ndarray, v: View) -> np.ndarray:
    x, y = xy[:, 0], xy[:, 1]
    return np.flatnonzero((x >= v.x0) & (x <= v.x1) & (y >= v.y0) & (y <= v.y1))


def _brute_pixels(xy: np.ndarray, rows: np.ndarray, v: View, w: int, h: int) -> np.ndarray:
    x, y = xy[rows, 0].astype(np.float64), xy[rows, 1].astype(np.float64)
    px = np.minimum(np.floor((x - v.x0) * w / (v.x1 - v.x0)), w - 1).astype(int)
    py = np.minimum(np.floor((v.y1 - y) * h / (v.y1 - v.y0)), h - 1).astype(int)
    return py * w + px


def _views(xy: np.ndarray, rng) -> list[View]:
    lo, hi = np.nanmin(xy, 0), np.nanmax(xy, 0)
    views = [View(lo[0], hi[0], lo[1], hi[1]), View(lo[0] - 50, hi[0] + 50, lo[1] - 3, hi[1] + 7)]  # all, wider
    views.append(View(hi[0] + 1, hi[0] + 2, lo[1], hi[1]))  # beside the map: empty
    views.append(View(float(xy[5, 0]), float(xy[5, 0]) + 1e-3, float(xy[5, 1]), float(xy[5, 1]) + 1e-3))  # tiny
    for _ in range(40):
        a, b = np.sort(rng.uniform(lo[0] - 2, hi[0] + 2, 2)), np.sort(rng.uniform(lo[1] - 2, hi[1] + 2, 2))
        views.append(View(a[0], a[1], b[0], b[1]))
    return views


def test_grid_order_range_queries_match_brute_force():
    xy = _points(60_000)
    g = GridOrder(xy, grid=256)
    assert g.missing == 7 and len(g.rows) == 60_000 - 7
    lo, hi = np.nanmin(xy, 0), np.nanmax(xy, 0)
    assert g.bounds.astuple() == pytest.approx((lo[0], hi[0], lo[1], hi[1]))
    assert g.offsets[-1] == 60_000 - 7 and np.all(np.diff(g.offsets) >= 0)
    rng = np.random.default_rng(1)
    counts = []
    for v in _views(xy, rng):
        want = _brute_inside(xy, v)
        got = np.sort(g.rows[g.inside(v)])
        np.testing.assert_array_equal(got, want)
        low, high = g.count_range(v)
        assert low <= len(want) <= high, v
        counts.append(len(want))
    assert counts[0] == counts[1] == 60_000 - 7 and counts[2] == 0 and counts[3] >= 1
    assert len({c for c in counts[4:]}) > 20  # the random views really differ


def test_points_of_a_view_respect_the_cap_and_the_padding():
    xy = _points(20_000, seed=2)
    g = GridOrder(xy, grid=128)
    v = View(-2.0, 2.0, -2.0, 2.0)
    n = len(_brute_inside(xy, v))
    wide = v.padded(0.25)
    n_wide = len(_brute_inside(xy, wide))
    assert wide.astuple() == pytest.approx((-3, 3, -3, 3)) and n_wide > n > 10
    p = g.points(v, cap=n_wide, pad=0.25)  # the widened view fits: it is the one answered
    assert p.view == wide and p.total == n_wide and len(p.pos) == n_wide
    p = g.points(v, cap=n, pad=0.25)  # only the view itself fits
    assert p.view == v and p.total == n
    np.testing.assert_array_equal(np.sort(g.rows[p.pos]), _brute_inside(xy, v))
    p = g.points(v, cap=n - 1)  # over the cap: counted, no points
    assert p.total == n and p.pos is None
    everything = View(-100, 100, -100, 100)
    p = g.points(everything, cap=10)  # the cells wholly inside already hold more: not even counted
    assert p.total is None and p.pos is None


def test_density_image_counts_means_and_categories_match_brute_force():
    xy = _points(50_000, seed=3)
    g = GridOrder(xy, grid=200)
    rng = np.random.default_rng(4)
    z = rng.uniform(0, 3, len(xy))
    z[rng.choice(len(xy), 500, replace=False)] = np.nan
    cats = rng.choice(["a", "b", "c"], len(xy), p=[0.5, 0.3, 0.2])
    num, cat = label_column(z), label_column(cats.astype(object))
    assert num.kind == "numeric" and cat.kind == "categorical" and cat.categories == ["a", "b", "c"]
    for v, (w, h) in [(g.bounds, (64, 48)), (View(-5, 3, -4, 6), (50, 70)), (View(0, 0.5, 0, 0.5), (7, 5))]:
        rows = _brute_inside(xy, v)
        pix = _brute_pixels(xy, rows, v, w, h)
        counts, _ = g.raster(v, w, h)
        assert counts.shape == (h, w) and counts.dtype == np.float32
        np.testing.assert_array_equal(counts.ravel(), np.bincount(pix, minlength=w * h))
        assert counts.sum() == len(rows)
        # numeric: the mean of the finite values in each pixel
        counts2, mean = g.raster(v, w, h, num, g.in_order(num.values))
        np.testing.assert_array_equal(counts2, counts)
        ok = np.isfinite(z[rows])
        s = np.bincount(pix[ok], weights=z[rows][ok], minlength=w * h)
        c = np.bincount(pix[ok], minlength=w * h)
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(mean.ravel(), s / c, rtol=1e-5, equal_nan=True)
        assert np.isnan(mean.ravel()[c == 0]).all()
        # categorical: the most frequent code, ties to the lowest
        _, best = g.raster(v, w, h, cat, g.in_order(cat.values))
        table = np.zeros((w * h, 3), int)
        np.add.at(table, (pix, cat.values[rows]), 1)
        want = np.where(table.sum(1) > 0, table.argmax(1), np.nan)
        np.testing.assert_array_equal(best.ravel(), want)


def test_label_kinds_and_colour_range():
    assert label_kind(np.array([0.0, 1.0, np.nan] * 100)) == "categorical"
    assert label_kind(np.linspace(0, 1, 1000)) == "numeric"
    # decided on the whole column where the sample is not enough: 24 values in the first 100k rows, 25 in all
    v = np.concatenate([np.arange(200_000) % 24, [99.0]]).astype(float)
    assert label_kind(v) == "numeric" and label_kind(v[:-1]) == "categorical"
    lo, hi = LabelColumn("numeric", np.arange(101.0)).colour_range()
    assert (lo, hi) == pytest.approx((2.0, 98.0))
    assert LabelColumn("numeric", np.full(5, np.nan)).colour_range() == (None, None)


def test_one_point_and_points_on_a_line_still_make_a_map():
    g = GridOrder(np.array([[1.0, 2.0]], np.float32))
    assert g.bounds.astuple() == (0.5, 1.5, 1.5, 2.5) and g.points(g.bounds, 10).total == 1
    line = np.stack([np.arange(10.0), np.zeros(10)], 1)
    assert GridOrder(line, grid=8).points(View(2, 5, -1, 1), 10).total == 4
    with pytest.raises(ValueError, match="empty view"):
        View(1, 1, 0, 1)
    with pytest.raises(ValueError, match="finite"):
        View(0, float("nan"), 0, 1)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        GridOrder(np.zeros((4, 3)))


# ---------------------------------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 5,000-object index (8-d, PCA map) with a numeric label with gaps and a string label; served with
    points_max=1000, so that the page would ask for views."""
    from astrolom.eval.embeddings import EmbeddingTable
    from astrolom.search.index import build_index, load_index

    n, rng = 5000, np.random.default_rng(5)
    X = (rng.normal(size=(8, 8))[rng.integers(0, 8, n)] * 3 + rng.normal(size=(n, 8))).astype(np.float32)
    z = rng.uniform(0, 2, n)
    z[::50] = np.nan
    kind = rng.choice(["disc", "<b>bulge</b>"], n)
    table = EmbeddingTable(np.array([f"g{i}" for i in range(n)]), np.full(n, "test"), X, {"z": z, "kind": kind}, {})
    out = build_index(
        table,
        tmp_path_factory.mktemp("mapview") / "index",
        kind="flat",
        map_method="pca",
        outlier_k=(),
        progress=False,
        log=None,
    )
    return out, load_index(out)


@pytest.fixture(scope="module")
def client(big):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from astrolom.serve.app import create_app

    return TestClient(create_app(big[0], points_max=1000), base_url=BASE, raise_server_exceptions=False)


def _q(v: View) -> str:
    return f"x0={v.x0!r}&x1={v.x1!r}&y0={v.y0!r}&y1={v.y1!r}"


def test_view_endpoints_answer_from_the_grid(client, big):
    _, idx = big
    xy = np.asarray(idx.map_coords(), np.float32)
    info = client.get("/api/info").json()
    assert info["n"] == 5000 and info["map_points_max"] == 1000
    assert {"name": "z", "kind": "numeric"} in info["labels"] and {"name": "kind", "kind": "categorical"} in info[
        "labels"
    ]
    # the whole map is refused (413) above points_max: the page asks for views
    assert client.get("/api/map").status_code == 413 and client.get("/api/labels/z").status_code == 413
    view = client.get("/api/map/view").json()
    assert view["density"] is True and view["n"] == view["mapped"] == 5000 and view["cap"] == 100_000
    assert view["bounds"] == pytest.approx([xy[:, 0].min(), xy[:, 0].max(), xy[:, 1].min(), xy[:, 1].max()])
    full = View(*view["bounds"])
    # density of the whole map: counts per pixel, then the label's per-pixel mean
    r = client.get(f"/api/map/density?{_q(full)}&w=40&h=30")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    counts = np.frombuffer(r.content, "<f4")
    assert counts.shape == (1200,) and counts.sum() == 5000 and r.headers["x-points"] == "5000"
    np.testing.assert_array_equal(counts, np.bincount(_brute_pixels(xy, np.arange(5000), full, 40, 30), minlength=1200))
    r = client.get(f"/api/map/density?{_q(full)}&w=40&h=30&label=z")
    counts2, mean = np.frombuffer(r.content, "<f4").reshape(2, 1200)
    np.testing.assert_array_equal(counts2, counts)
    assert np.isfinite(mean[counts > 0]).mean() > 0.9 and np.isnan(mean[counts == 0]).all()
    assert np.nanmin(mean) >= 0 and np.nanmax(mean) <= 2
    # the points of a small view: rows, ids, coordinates and label values of exactly the points inside
    v = View(float(np.quantile(xy[:, 0], 0.4)), float(np.quantile(xy[:, 0], 0.6)), float(xy[:, 1].min()), 0.0)
    want = _brute_inside(xy, v)
    p = client.get(f"/api/map/points?{_q(v)}&label=z").json()
    assert p["capped"] is False and p["total"] == len(want) > 100 and p["bounds"] == pytest.approx(v.astuple())
    order = np.argsort(p["rows"])
    np.testing.assert_array_equal(np.asarray(p["rows"])[order], want)
    assert [p["ids"][i] for i in order] == [f"g{r}" for r in want]
    np.testing.assert_allclose(np.asarray(p["x"])[order], xy[want, 0], atol=1e-4)
    z = idx.label_values("z")[want]
    got = np.array([np.nan if a is None else a for a in p["values"]])[order]
    np.testing.assert_allclose(got, z, atol=1e-5, equal_nan=True)
    # categorical values are codes into the label's categories, which are data: sent as JSON strings
    lab = client.get("/api/map/label/kind").json()
    assert lab["kind"] == "categorical" and lab["categories"] == ["<b>bulge</b>", "disc"]
    p = client.get(f"/api/map/points?{_q(v)}&label=kind").json()
    kinds = idx.label_values("kind")
    assert [lab["categories"][c] for c in p["values"]] == [kinds[r] for r in p["rows"]]
    zl = client.get("/api/map/label/z").json()
    assert zl["kind"] == "numeric" and 0 < zl["lo"] < 0.1 and 1.9 < zl["hi"] < 2
    # over the cap: the count only, and not even that where the cells wholly inside the view hold more
    p = client.get(f"/api/map/points?{_q(v)}&cap={len(want) - 1}").json()
    assert p == {"bounds": pytest.approx(list(v.astuple())), "total": len(want), "capped": True}
    p = client.get(f"/api/map/points?{_q(v)}&cap=10").json()
    assert p["total"] is None and p["capped"] is True and "ids" not in p


@pytest.mark.parametrize(
    "query",
    [
        "x0=0&x1=0&y0=0&y1=1&w=10&h=10",  # empty view
        "x0=1&x1=0&y0=0&y1=1&w=10&h=10",  # reversed
        "x0=nan&x1=1&y0=0&y1=1&w=10&h=10",
        "x0=0&x1=inf&y0=0&y1=1&w=10&h=10",
        "x0=0&x1=1&y0=0&y1=1&w=0&h=10",
        "x0=0&x1=1&y0=0&y1=1&w=5000&h=1",  # a side over 4096
        "x0=0&x1=1&y0=0&y1=1&w=4096&h=2048",  # over 2048 x 2048 pixels
    ],
)
def test_density_requests_are_bounded(client, query):
    r = client.get("/api/map/density?" + query)
    assert r.status_code == 400, r.text
    assert "view" in r.json()["detail"] or "image size" in r.json()["detail"]


def test_bad_view_requests(client):
    assert client.get("/api/map/points?x0=0&x1=1&y0=1&y1=1").status_code == 400
    assert client.get("/api/map/points?x0=0&x1=1&y0=0&y1=1&cap=0").status_code == 422
    assert client.get("/api/map/points?x0=0&x1=1&y0=0&y1=1&cap=200001").status_code == 422
    assert client.get("/api/map/points?x0=0&x1=1&y0=0&y1=1&label=nope").status_code == 404
    assert client.get("/api/map/density?x0=0&x1=1&y0=0&y1=1&w=4&h=4&label=nope").status_code == 404
    assert client.get("/api/map/label/nope").status_code == 404


def test_small_index_keeps_the_whole_map(big):
    """At or below points_max the page's old requests answer as before."""
    from fastapi.testclient import TestClient

    from astrolom.serve.app import create_app

    c = TestClient(create_app(big[0]), base_url=BASE)
    m = c.get("/api/map").json()
    assert len(m["x"]) == len(m["ids"]) == 5000 and c.get("/api/map/view").json()["density"] is False
    lab = c.get("/api/labels/kind").json()
    assert lab["kind"] == "categorical" and len(lab["values"]) == 5000


@pytest.mark.slow
def test_server_reads_an_in_ram_rescoring_index_whole_while_it_already_answers(tmp_path):
    """IVF-PQ + Refine(SQ8) opens memory-mapped; the server reads it whole in the background and answers the same."""
    import time

    from fastapi.testclient import TestClient

    from astrolom.eval.embeddings import EmbeddingTable
    from astrolom.search.index import build_index, load_index
    from astrolom.serve.app import create_app

    n, rng = 6000, np.random.default_rng(2)
    X = (rng.normal(size=(40, 32))[rng.integers(0, 40, n)] * 2 + rng.normal(size=(n, 32))).astype(np.float32)
    table = EmbeddingTable(np.array([f"g{i}" for i in range(n)]), np.full(n, "test"), X, {}, {})
    out = build_index(table, tmp_path / "idx", kind="ivfpq", map_method="pca", outlier_k=(), progress=False, log=None)
    idx = load_index(out)
    assert idx.meta.get("refine") and not idx.resident
    before = idx.neighbours_of_id("g7", 10)
    client = TestClient(create_app(idx), base_url=BASE)
    deadline = time.monotonic() + 60
    while not idx.resident and time.monotonic() < deadline:
        time.sleep(0.05)
    assert idx.resident  # the server's background read finished
    got = client.get("/api/neighbours/g7?k=10").json()
    assert [h["object_id"] for h in got["neighbours"]] == [h.object_id for h in before]
