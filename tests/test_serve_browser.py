"""End-to-end: a real headless Chromium (Debian's `chromium`, driven by Playwright) through the explorer page.

The page's jobs, each asserted on numbers and ids the page shows: the map (points sized for zoom and count, hover
tooltips, box selection), the neighbour gallery (search, pivot), uploads, outliers, the spectrum's axes, the layout
from 800 px to wide screens, data shown as text and never as markup (stored XSS, issue 22 #1), and a labelling
round (search -> pivot -> select -> export -> label -> rank). Skipped, with the reason, only where no Chromium binary
or no Playwright is installed (.ci/run installs both).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import urllib.request

import numpy as np
import pytest
from search_helpers import serving

CHROMIUM = os.environ.get("ASTROLOM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.slow,  # drives a real browser
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install -y chromium)"),
]


@contextlib.contextmanager
def _page(url: str, width: int = 1200, height: int = 800, scale: float = 1):
    """A page of a fresh Chromium at `url` once the map is drawn (`scale`: device pixels per CSS pixel);
    `page.errors` collects page errors."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            viewport = {"width": width, "height": height}
            page = browser.new_page(viewport=viewport, device_scale_factor=scale, accept_downloads=True)
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("canvas#map[data-ready='1']", timeout=30_000)
            yield page
        finally:
            browser.close()


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _gallery_ids(page) -> list[str]:
    return page.eval_on_selector_all("#gallery .thumb:not(.query)", "els => els.map(e => e.dataset.id)")


@pytest.fixture(scope="module")
def server(model_index):
    with serving(model_index) as url:
        yield url, model_index


def test_explore_click_and_upload_in_a_real_browser(server, tmp_path):
    from astrolom.search.index import load_index
    from astrolom.search.query import open_store, search_id

    url, idx_dir = server
    idx = load_index(idx_dir)
    query = tmp_path / "query.npy"
    np.save(query, open_store(idx).get(str(idx.object_id[2])).image)
    with _page(url) as page:
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        assert page.locator("#xmodal").is_hidden() and page.locator("#specwrap").is_hidden()  # images only
        # the map is drawn: count painted pixels on the canvas
        painted = page.evaluate(
            """() => { const c = document.getElementById('map');
               const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
               let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""
        )
        # 64 points of the radius the page reports: at least 3 px discs for so few points
        r0 = page.evaluate("() => explorer.radius()")
        assert r0 >= 3 and painted >= 64 * 20
        # click a point: its screen position comes from the page's own transform
        x, y = page.evaluate("() => explorer.screenOf(5)")
        page.mouse.click(x, y)
        oid = str(idx.object_id[5])
        page.wait_for_function("() => document.getElementById('gallery').dataset.kind === 'neighbours'")
        expected = [h.object_id for h in search_id(idx, oid, 24).neighbours]
        assert _gallery_ids(page) == expected  # the default k is 24, in the library's order
        assert page.locator("#gallery .thumb.query").get_attribute("data-id") == oid
        assert page.locator("#objtitle").inner_text() == oid
        assert page.locator("#labels dt").count() > 10
        ra = idx.labels_of(5)["ra"]  # to 7 significant digits: 1e-4 degree at ra ~ 100 deg
        assert page.locator("#labels").get_by_text("ra", exact=True).evaluate("e => e.nextSibling.textContent") == repr(
            float(f"{ra:.7g}")
        )
        # cutout thumbnails actually load
        page.wait_for_function("() => document.getElementById('cutout').naturalWidth > 0", timeout=30_000)
        # pivot: click a neighbour, its own neighbours fill the gallery
        page.click(f"#gallery .thumb[data-id='{expected[2]}']")
        page.wait_for_function(f"() => document.getElementById('objtitle').textContent === {expected[2]!r}")
        page.wait_for_function(
            f"() => document.querySelector('#gallery .thumb.query').dataset.id === {expected[2]!r}", timeout=30_000
        )
        assert _gallery_ids(page) == [h.object_id for h in search_id(idx, expected[2], 24).neighbours]
        # upload a cutout: results appear, the object itself first
        page.set_input_files("#upload", str(query))
        page.wait_for_function("() => document.getElementById('gallery').dataset.kind === 'results'", timeout=60_000)
        assert _gallery_ids(page)[0] == str(idx.object_id[2])
        # outliers list
        page.click("#loadout")
        page.wait_for_function("() => document.getElementById('gallery').dataset.kind === 'outliers'")
        assert len(_gallery_ids(page)) == 24
        assert page.errors == []
        assert all(r.startswith(url) for r in requests), [r for r in requests if not r.startswith(url)]


def test_points_tooltip_and_spectrum_axes(server):
    """On a high-density screen (2 device pixels per CSS pixel, the map drawn at full resolution): points grow with
    the zoom; hovering a point shows its id, thumbnail and colour value; the spectrum's axis labels are distinct
    round wavelengths inside the plotted range that do not overlap; a lasso selects the points inside it."""
    from astrolom.search.index import load_index
    from astrolom.search.query import open_store

    url, idx_dir = server
    idx = load_index(idx_dir)
    with _page(url, scale=2) as page:
        css = page.locator("#map").bounding_box()
        assert page.evaluate("() => document.getElementById('map').width") == round(2 * css["width"])
        r0 = page.evaluate("() => explorer.radius()")
        box = page.locator("#map").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(3):
            page.mouse.wheel(0, -400)  # zoom in
        page.wait_for_function(f"() => explorer.radius() > {r0} * 1.5")
        page.click("#reset")
        assert page.evaluate("() => explorer.radius()") == pytest.approx(r0)
        # hover
        x, y = page.evaluate("() => explorer.screenOf(7)")
        page.mouse.move(x, y)
        page.wait_for_selector("#tip:not(.hidden)")
        oid = str(idx.object_id[7])
        assert page.locator("#tipid").inner_text() == oid
        z = idx.labels_of(7)["redshift"]
        assert page.locator("#tipval").inner_text() == f"redshift {float(f'{z:.4g}'):g}"
        page.wait_for_function("() => document.getElementById('tipimg').naturalWidth > 0")
        # the spectrum
        page.mouse.click(x, y)
        page.wait_for_function("() => explorer.axes !== null && explorer.axes.x.length >= 2")
        axes = page.evaluate("() => explorer.axes")
        wl = open_store(idx).wavelength()
        ticks = [float(a["text"]) for a in axes["x"]]
        assert ticks == sorted(set(ticks)) and wl.min() <= ticks[0] and ticks[-1] <= wl.max()
        assert all(a["right"] < b["left"] for a, b in zip(axes["x"], axes["x"][1:], strict=False))  # no overlap
        assert len(axes["y"]) >= 2 and len({a["text"] for a in axes["y"]}) == len(axes["y"])
        # a lasso drawn around a region of the map selects the points inside it, and Escape clears it
        m = _get(url + "/api/map")
        mx, my = np.asarray(m["x"]), np.asarray(m["y"])
        xa, xb, ya, yb = _gap_edges(mx, 8, 24), _gap_edges(mx, 40, 56), _gap_edges(my, 8, 24), _gap_edges(my, 40, 56)
        inside = int(((mx > xa) & (mx < xb) & (my > ya) & (my < yb)).sum())
        corners = page.evaluate(
            f"() => [[{xa}, {yb}], [{xb}, {yb}], [{xb}, {ya}], [{xa}, {ya}]].map(p => explorer.pageOf(...p))"
        )
        page.keyboard.press("l")
        page.mouse.move(*corners[0])
        page.mouse.down()
        for corner in [*corners[1:], corners[0]]:
            page.mouse.move(*corner, steps=4)
        page.mouse.up()
        assert page.locator("#selcount").inner_text() == f"{inside} selected" and 4 <= inside < 64
        page.keyboard.press("Escape")
        assert page.locator("#selbar").is_hidden() and page.evaluate("() => explorer.selection") is None
        assert page.errors == []


def test_layout_from_800_px_to_wide_screens(server):
    """The toolbar sits above the map, never over it; the side panel is beside the map; the gallery is the centre
    column on a wide screen and under the map at 800 px; the status line stays in view when the page scrolls."""
    url, _ = server
    with _page(url, width=1400, height=800) as page:
        x, y = page.evaluate("() => explorer.screenOf(3)")
        page.mouse.click(x, y)
        page.wait_for_function("() => document.getElementById('gallery').dataset.kind === 'neighbours'")
        for width in (1400, 1100, 800):
            page.set_viewport_size({"width": width, "height": 800})
            page.evaluate("() => window.scrollTo(0, 0)")
            bar, cmap, side, gallery = (
                page.locator(sel).bounding_box() for sel in ("#bar", "#map", "#side", "#gallerypanel")
            )
            assert bar["y"] + bar["height"] <= cmap["y"] + 0.5, width
            assert cmap["width"] >= 300 and cmap["height"] >= 300, width
            assert side["x"] >= cmap["x"] + cmap["width"] - 0.5, width  # beside the map
            assert gallery["width"] >= 380, width
            if width > 1100:  # map | gallery | side
                assert (
                    cmap["x"] + cmap["width"] <= gallery["x"] + 0.5
                    and gallery["x"] + gallery["width"] <= side["x"] + 0.5
                )
            else:  # the gallery under the map, at full width
                assert gallery["y"] >= cmap["y"] + cmap["height"] - 0.5 and gallery["width"] >= width - 20
            assert page.evaluate("() => document.documentElement.scrollWidth") <= width  # no sideways scrolling
            page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
            status = page.locator("#status").bounding_box()
            assert 0 <= status["y"] and status["y"] + status["height"] <= 800, width
            assert page.locator("#status").inner_text().endswith("24 neighbours")
        assert page.errors == []


PAYLOADS = {
    "id": "<img src=x onerror=pwned('id')>",
    "name": "<img src=x onerror=pwned('name')>",
    "value": "<img src=x onerror=pwned('value')>",
    "script": "<script>pwned('script')</script>",
    "category": "<img src=x onerror=pwned('category')>",
    "file": "<img src=x onerror=pwned('file')>.npy",
    "missing": "<img src=x onerror=pwned('missing')>",
}


@pytest.fixture(scope="module")
def hostile_index(model_index, tmp_path_factory):
    """The model index's embeddings with markup in an object id, a label column name, string label values and a
    category value, indexed again (the Parquet file a hostile or careless catalogue would give)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from astrolom.search.index import build_index

    table = pq.read_table(model_index.parent / "emb.parquet")
    n = table.num_rows
    ids = table.column("object_id").to_pylist()
    ids[3] = PAYLOADS["id"]
    comment = [f"note {i}" for i in range(n)]
    comment[3], comment[4] = PAYLOADS["value"], PAYLOADS["script"]
    kind = [("a", "b", PAYLOADS["category"])[i % 3] for i in range(n)]
    kind[3] = PAYLOADS["category"]
    table = table.set_column(table.schema.get_field_index("object_id"), "object_id", pa.array(ids))
    table = table.append_column("comment", pa.array(comment)).append_column("kind", pa.array(kind))
    table = table.append_column(PAYLOADS["name"], pa.array(np.arange(n, dtype=np.float64) / n))
    tmp = tmp_path_factory.mktemp("hostile")
    pq.write_table(table, tmp / "emb.parquet")
    return build_index(tmp / "emb.parquet", tmp / "index", map_method="pca", progress=False, log=None)


def test_data_is_shown_as_text_never_run(hostile_index, model_index, tmp_path):
    """Stored XSS (issue 22 #1): markup in ids, label names, label values, categories, upload names and error texts
    is shown literally and never runs (no handler fires, no element is made from it)."""
    from astrolom.search.index import load_index
    from astrolom.search.query import open_store

    base = load_index(model_index)
    upload = tmp_path / PAYLOADS["file"]
    np.save(upload, open_store(base).get(str(base.object_id[2])).image)
    with serving(hostile_index) as url, _page(url) as page:
        dialogs, console = [], []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.on("console", lambda m: console.append(m.text))
        # anything that runs calls pwned(); a fresh load with the hook in place
        page.add_init_script("window.__pwned = []; window.pwned = (what) => window.__pwned.push(what);")
        page.reload()
        page.wait_for_selector("canvas#map[data-ready='1']", timeout=30_000)
        # colour by the column with the hostile name, then by the hostile category
        page.select_option("#colour", PAYLOADS["name"])
        page.wait_for_function(f"() => document.getElementById('legend').textContent.startsWith({PAYLOADS['name']!r})")
        page.select_option("#colour", "kind")
        page.wait_for_function(
            f"() => document.getElementById('legend').textContent.includes({PAYLOADS['category']!r})"
        )
        # hover and select the hostile object, whose neighbours open in the gallery
        x, y = page.evaluate("() => explorer.screenOf(3)")
        page.mouse.move(x, y)
        page.wait_for_selector("#tip:not(.hidden)")
        assert page.locator("#tipid").inner_text() == PAYLOADS["id"]
        page.mouse.click(x, y)
        page.wait_for_function("() => document.getElementById('gallery').dataset.kind === 'neighbours'")
        assert page.locator("#objtitle").inner_text() == PAYLOADS["id"]
        assert page.locator("#gallery .thumb.query").get_attribute("data-id") == PAYLOADS["id"]
        labels = page.locator("#labels").inner_text()
        for text in (PAYLOADS["name"], PAYLOADS["value"], PAYLOADS["category"]):
            assert text in labels
        # a neighbour carrying the script variant, and the hostile id as a neighbour of another object
        page.fill("#idbox", str(base.object_id[4]))
        page.press("#idbox", "Enter")
        page.wait_for_function(f"() => document.getElementById('objtitle').textContent === {str(base.object_id[4])!r}")
        assert PAYLOADS["script"] in page.locator("#labels").inner_text()
        # an error text that repeats the id searched for, and an upload with a hostile file name
        page.fill("#idbox", PAYLOADS["missing"])
        page.press("#idbox", "Enter")
        page.wait_for_function(f"() => document.getElementById('status').textContent.includes({PAYLOADS['missing']!r})")
        page.set_input_files("#upload", str(upload))
        page.wait_for_function("() => document.getElementById('gallery').dataset.kind === 'results'", timeout=60_000)
        assert PAYLOADS["file"] in page.locator("#gtitle").inner_text()
        page.wait_for_timeout(300)  # let any error event of an injected <img src=x> fire
        assert page.evaluate("() => window.__pwned") == []
        assert dialogs == []
        # nothing was made from data: no <img src=x>, no second <script>, no CSP report of a blocked handler
        assert page.evaluate("() => document.querySelectorAll('img[src=\"x\"]').length") == 0
        assert page.evaluate("() => document.scripts.length") == 1
        assert not [m for m in console if "Content Security Policy" in m or "inline" in m], console
        assert page.errors == []


def _post(url: str, body: dict):
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", "Origin": url.split("/api/")[0]}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _gap_edges(v: np.ndarray, lo: int, hi: int) -> float:
    """A cut between two sorted values of `v` (ranks lo..hi) at their widest gap: no point sits near the edge."""
    s = np.sort(v)
    k = lo + int(np.argmax(np.diff(s[lo : hi + 1])))
    return float((s[k] + s[k + 1]) / 2)


def test_labelling_round_search_pivot_select_export_label_rank(model_index, tmp_path_factory):
    """One session as an astronomer would click it: search an id, pivot to a neighbour, export the neighbour list,
    box-select a region, show and export it, mark galaxies with the keyboard and a button, rank ("more like these")
    and ask what to label next, export the marks; every step checked against the library and the API."""
    import pyarrow.parquet as pq

    from astrolom.search.index import load_index
    from astrolom.search.query import search_id

    # a copy of the index: the marks are written next to it and must start empty
    idx_dir = shutil.copytree(model_index, tmp_path_factory.mktemp("labelling") / "index", symlinks=True)
    idx = load_index(idx_dir)
    ids = [str(i) for i in idx.object_id]
    with serving(idx_dir) as url, _page(url) as page:
        # search by id
        query = ids[10]
        page.fill("#idbox", query)
        page.press("#idbox", "Enter")
        page.wait_for_function(f"() => document.querySelector('#gallery .thumb.query')?.dataset.id === {query!r}")
        assert _gallery_ids(page) == [h.object_id for h in search_id(idx, query, 24).neighbours]
        # pivot to the third neighbour, export its neighbour list with the similarities
        pivot = _gallery_ids(page)[2]
        page.click(f"#gallery .thumb[data-id='{pivot}']")
        page.wait_for_function(f"() => document.querySelector('#gallery .thumb.query')?.dataset.id === {pivot!r}")
        nb = search_id(idx, pivot, 24).neighbours
        assert _gallery_ids(page) == [h.object_id for h in nb]
        with page.expect_download() as dl:
            page.click("#exppq")
        table = pq.read_table(dl.value.path()).to_pandas()
        assert table["object_id"].tolist() == [h.object_id for h in nb]
        np.testing.assert_allclose(table["score"], [h.similarity for h in nb], atol=1e-4)
        row = idx.row_of(nb[0].object_id)
        assert table["ra"][0] == pytest.approx(idx.labels_of(row)["ra"]) and "dec" in table
        # box selection of a region of the map, cut at wide gaps so that no point lies on an edge
        m = _get(url + "/api/map")
        x, y = np.asarray(m["x"]), np.asarray(m["y"])
        xa, xb, ya, yb = _gap_edges(x, 8, 24), _gap_edges(x, 40, 56), _gap_edges(y, 8, 24), _gap_edges(y, 40, 56)
        inside = {m["ids"][i] for i in np.flatnonzero((x > xa) & (x < xb) & (y > ya) & (y < yb))}
        assert 4 <= len(inside) < 64
        page.click("#mode-box")
        top_left, bottom_right = page.evaluate(f"() => [explorer.pageOf({xa}, {yb}), explorer.pageOf({xb}, {ya})]")
        page.mouse.move(*top_left)
        page.mouse.down()
        page.mouse.move(*bottom_right, steps=5)
        page.mouse.up()
        assert page.locator("#selcount").inner_text() == f"{len(inside)} selected"
        page.click("#selshow")
        page.wait_for_function("() => document.getElementById('gallery').dataset.kind === 'selection'")
        selected = _gallery_ids(page)
        assert set(selected) == inside and len(selected) == len(inside)
        with page.expect_download() as dl:
            page.click("#expcsv")
        with open(dl.value.path(), newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["object_id"] for r in rows] == selected
        assert float(rows[0]["dec"]) == pytest.approx(idx.labels_of(idx.row_of(selected[0]))["dec"], abs=1e-6)
        # label: the focused card (the first of the selection) with the keyboard, focus moving on after each mark,
        # then the fourth card with the button
        page.keyboard.press("i")
        page.keyboard.press("i")
        page.keyboard.press("n")
        page.click("#markyes")
        page.wait_for_function("() => document.getElementById('markcount').textContent === '3 interesting · 1 not'")
        expected = {selected[0]: 1, selected[1]: 1, selected[2]: 0, selected[3]: 1}
        assert {m["id"]: m["mark"] for m in _get(url + "/api/marks")["marks"]} == expected
        assert page.locator("#gallery .thumb.m1").count() == 3 and page.locator("#gallery .thumb.m0").count() == 1
        # more like these: the classifier's ranking of the unmarked objects, as the API gives it
        page.keyboard.press("r")
        page.wait_for_function("() => document.getElementById('gallery').dataset.kind === 'ranked'")
        ranking = _post(url + "/api/rank", {"n": 24})
        assert _gallery_ids(page) == [r["id"] for r in ranking["ranked"]]
        assert len(ranking["ranked"]) == 24 and not set(_gallery_ids(page)) & set(expected)
        assert ranking["method"] in page.locator("#gtitle").inner_text()
        # label these next: the suggestions
        page.keyboard.press("s")
        page.wait_for_function("() => document.getElementById('gallery').dataset.kind === 'suggest'")
        assert _gallery_ids(page) == [r["id"] for r in ranking["suggest"]] and len(ranking["suggest"]) > 1
        # the keyboard walks the list: the second suggestion, Enter pivots to it
        page.keyboard.press("ArrowRight")
        page.keyboard.press("Enter")
        second = ranking["suggest"][1]["id"]
        page.wait_for_function(f"() => document.querySelector('#gallery .thumb.query')?.dataset.id === {second!r}")
        # export the marks
        with page.expect_download() as dl:
            page.click("#markcsv")
        with open(dl.value.path(), newline="") as f:
            assert {r["object_id"]: int(r["mark"]) for r in csv.DictReader(f)} == expected
        assert page.errors == []


def test_cross_modal_toggle_and_spectrum_upload(mock_survey, tmp_path_factory, tmp_path):
    """An aligned index: the page offers the spectrum upload and the cross-modal toggle, and both reach the API."""
    from search_helpers import make_aligned_index, write_fits_spectrum

    from astrolom.search.index import load_index
    from astrolom.search.query import open_store

    idx_dir, _ = make_aligned_index(mock_survey, tmp_path_factory.mktemp("browser_aligned"))
    idx = load_index(idx_dir)
    row = int(idx.space("spectra").rows[1])
    oid, store = str(idx.object_id[row]), open_store(idx)
    spec = write_fits_spectrum(tmp_path / "s.fits", store.wavelength(), store.get(oid).spectrum)
    with serving(idx_dir) as url, _page(url) as page:
        assert page.locator("#xmodal").is_visible() and page.locator("#specwrap").is_visible()
        # a spectrum upload, in-modal: the object whose spectrum it is comes first
        page.set_input_files("#specupload", str(spec))
        page.wait_for_function("() => document.getElementById('gallery').dataset.kind === 'results'", timeout=60_000)
        assert _gallery_ids(page)[0] == oid
        # cross-modal: the same upload searches the images; a clicked object's neighbours are spectra
        page.check("#crossmodal")
        page.set_input_files("#specupload", [])
        page.set_input_files("#specupload", str(spec))
        page.wait_for_function(
            "() => document.getElementById('gtitle').textContent.includes('spectra → images')", timeout=60_000
        )
        x, y = page.evaluate(f"() => explorer.screenOf({row})")
        page.mouse.click(x, y)
        page.wait_for_function(
            "() => document.getElementById('gtitle').textContent.includes('images → spectra')", timeout=30_000
        )
        assert len(_gallery_ids(page)) > 0
        assert page.errors == []
