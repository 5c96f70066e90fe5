"""End-to-end: the explorer on a 1M-object index in a real headless Chromium (issue 23).

Above `points_max` the page never takes the whole map: it draws the server's density image of the view, and once a
zoomed-in view holds at most `cap` points it loads those and hover, click and selection work on them. The index is
built in the test (1M 8-d vectors, exact, PCA map, no outlier scores: about 10 s on 2 cores).
"""

from __future__ import annotations

import numpy as np
import pytest
from test_serve_browser import ARGS, CHROMIUM

pytestmark = [
    pytest.mark.slow,  # builds a 1M-object index and drives a real browser
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install -y chromium)"),
]

N = 1_000_000

PAINTED = """() => { const c = document.getElementById('map');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""


@pytest.fixture(scope="module")
def million(tmp_path_factory):
    from astrolom.eval.embeddings import EmbeddingTable
    from astrolom.search.index import build_index, load_index

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 8)).astype(np.float32) * 3
    X = centres[rng.integers(0, 20, N)] + rng.normal(size=(N, 8)).astype(np.float32)
    ids = np.char.add("g", np.arange(N).astype(str))
    table = EmbeddingTable(ids, np.full(N, "test"), X, {"redshift": rng.uniform(0, 2, N)}, {})
    out = tmp_path_factory.mktemp("million") / "index"
    build_index(table, out, kind="flat", map_method="pca", outlier_k=(), progress=False, log=None)
    return out, load_index(out)


def test_a_million_points_density_then_points_on_zoom(million, record_property):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    from search_helpers import serving

    idx_dir, idx = million
    xy = np.asarray(idx.map_coords())
    with serving(idx_dir) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors, requests = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url + "/")
            page.wait_for_selector("canvas#map[data-ready='1']", timeout=60_000)
            ready = page.evaluate("() => explorer.readyMs") / 1000
            record_property("time_to_first_map_s", round(ready, 2))
            print(f"time to the first map of {N:,} points: {ready:.2f} s")
            # the first map is the density image of all points, coloured by redshift
            assert page.evaluate("() => document.getElementById('map').dataset.mode") == "density"
            assert page.locator("#status").inner_text().startswith(f"density view: {N} points")
            assert page.evaluate("() => explorer.raster.total") == N and page.evaluate("() => explorer.n") == 0
            assert page.evaluate(PAINTED) > 20_000
            assert page.locator("#legend").inner_text().startswith("redshift:")
            # never the whole map: no /api/map or /api/labels request
            assert not [r for r in requests if r.endswith("/api/map") or "/api/labels/" in r], requests
            # zoom into the position of one object with the mouse wheel until its neighbourhood's points load
            row = 123_457
            x, y = page.evaluate(f"() => explorer.pageOf({float(xy[row, 0])}, {float(xy[row, 1])})")
            page.mouse.move(x, y)
            for _ in range(16):
                page.mouse.wheel(0, -400)
                page.wait_for_timeout(250)
                if page.evaluate("() => document.getElementById('map').dataset.mode") == "points":
                    break
            page.wait_for_function("() => document.getElementById('map').dataset.mode === 'points'", timeout=30_000)
            page.wait_for_function("() => explorer.settled", timeout=30_000)  # no reload of the points pending
            shown = page.evaluate("() => explorer.n")
            assert 0 < shown <= 100_000
            assert page.locator("#status").inner_text().startswith(f"showing {shown} of {N}")
            # the loaded points are the index's: rows, ids and coordinates agree with the map on disk
            # (read in one go, with the version of the loaded points: a reload in between would mix two sets)
            snap = page.evaluate(
                "() => ({v: explorer.pointsVersion, rows: Array.from(explorer.rows), x: Array.from(explorer.x),"
                " ids: explorer.ids.slice(0, 50)})"
            )
            rows, sx = np.asarray(snap["rows"]), np.asarray(snap["x"])
            assert snap["ids"] == [f"g{r}" for r in rows[:50]]
            np.testing.assert_allclose(sx, xy[rows, 0], atol=1e-4)
            assert row in set(rows.tolist())
            # hover and click the object zoomed into
            i = int(np.flatnonzero(rows == row)[0])
            page.wait_for_timeout(300)
            # mouse events carry whole CSS pixels: the mouse goes to the pixel the object is drawn on
            x, y = (round(v) for v in page.evaluate(f"() => explorer.screenOf({i})"))
            page.mouse.move(x, y)
            page.wait_for_selector("#tip:not(.hidden)")
            # the tooltip names the point nearest to the mouse (100k points in the view: maybe a neighbour on the
            # same pixel, not the object zoomed into, which is within a pixel)
            d2, hovered, version = page.evaluate(
                f"""() => [explorer.ids.map((id, j) => {{ const [a, b] = explorer.screenOf(j);
                    return (a - {x}) ** 2 + (b - {y}) ** 2; }}),
                    document.getElementById('tipid').textContent, explorer.pointsVersion]"""
            )
            assert version == snap["v"], "the points were reloaded after the view settled"
            d2 = np.asarray(d2)
            assert d2[i] <= 0.5 and hovered == f"g{rows[int(np.argmin(d2))]}"
            assert page.locator("#tipval").inner_text().startswith("redshift ")
            page.mouse.click(x, y)
            page.wait_for_function(f"() => document.getElementById('objtitle').textContent === {hovered!r}")
            page.wait_for_function("() => document.getElementById('gallery').dataset.kind === 'neighbours'")
            # a box around the object selects the loaded points inside it, as counted from the map on disk
            page.click("#mode-box")
            page.mouse.move(x - 30, y - 30)
            page.mouse.down()
            page.mouse.move(x + 30, y + 30, steps=4)
            page.mouse.up()
            count = """(h) => { let n = 0; for (let i = 0; i < explorer.n; i++) {
                 const [a, b] = explorer.pageOf(explorer.x[i], explorer.y[i]);
                 if (Math.abs(a - X) <= h && Math.abs(b - Y) <= h) n++; } return n; }"""
            count = count.replace("X", repr(x)).replace("Y", repr(y))
            low, high = page.evaluate(count, 29.5), page.evaluate(count, 30.5)  # mouse positions are rounded
            selected = int(page.locator("#selcount").inner_text().split()[0])
            assert 1 <= low <= selected <= high
            # back to the whole map: the density image again
            page.click("#reset")
            page.wait_for_function("() => document.getElementById('map').dataset.mode === 'density'", timeout=30_000)
            assert page.evaluate("() => explorer.raster.total") == N
            assert errors == []
        finally:
            browser.close()
