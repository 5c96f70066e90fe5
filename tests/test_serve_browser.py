"""End-to-end: a real headless Chromium (Debian's `chromium`, driven by Playwright) through the explorer page.

load page -> map drawn -> click a point -> neighbours shown -> upload a file -> results shown. Skipped, with the
reason, only where no Chromium binary or no Playwright is installed (.ci/run installs both).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest

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
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install -y chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(idx):
    import uvicorn

    from astrolom.serve.app import create_app

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(idx), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):  # wait until it accepts connections (bounded)
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(mock_survey, tmp_path_factory):
    from search_helpers import make_model_index

    idx = make_model_index(mock_survey, tmp_path_factory.mktemp("browser_model"))
    with _serve(idx) as url:
        yield url, idx


def test_explore_click_and_upload_in_a_real_browser(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    from astrolom.search.index import load_index
    from astrolom.search.query import open_store

    url, idx_dir = server
    idx = load_index(idx_dir)
    query = tmp_path / "query.npy"
    np.save(query, open_store(idx).get(str(idx.object_id[2])).image)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("canvas#map[data-ready='1']", timeout=30_000)
            assert page.locator("#xmodal").is_hidden() and page.locator("#specwrap").is_hidden()  # images only
            # the map is drawn: count painted pixels on the canvas
            painted = page.evaluate(
                """() => { const c = document.getElementById('map');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""
            )
            assert painted >= 64  # 64 points of at least one pixel each
            # click a point: its screen position comes from the page's own transform
            x, y = page.evaluate("() => explorer.screenOf(5)")
            page.mouse.click(x, y)
            page.wait_for_selector("#neighbours .thumb", timeout=30_000)
            assert page.locator("#neighbours .thumb").count() == 12
            assert page.locator("#objtitle").inner_text().startswith(str(idx.object_id[5]))
            assert page.locator("#labels tr").count() > 10
            # cutout thumbnails actually load
            page.wait_for_function("() => document.getElementById('cutout').naturalWidth > 0", timeout=30_000)
            # upload a cutout: results appear, the object itself first
            page.set_input_files("#upload", str(query))
            page.wait_for_selector("#results .thumb", timeout=60_000)
            assert page.locator("#results .thumb").first.get_attribute("data-id") == str(idx.object_id[2])
            # outliers list
            page.click("#loadout")
            page.wait_for_selector("#outliers .thumb", timeout=30_000)
            assert errors == []
            assert all(r.startswith(url) for r in requests), [r for r in requests if not r.startswith(url)]
        finally:
            browser.close()


def test_cross_modal_toggle_and_spectrum_upload(mock_survey, tmp_path_factory, tmp_path):
    """An aligned index: the page offers the spectrum upload and the cross-modal toggle, and both reach the API."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    from search_helpers import make_aligned_index, write_fits_spectrum

    from astrolom.search.index import load_index
    from astrolom.search.query import open_store

    idx_dir, _ = make_aligned_index(mock_survey, tmp_path_factory.mktemp("browser_aligned"))
    idx = load_index(idx_dir)
    row = int(idx.space("spectra").rows[1])
    oid, store = str(idx.object_id[row]), open_store(idx)
    spec = write_fits_spectrum(tmp_path / "s.fits", store.wavelength(), store.get(oid).spectrum)
    with _serve(idx_dir) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("canvas#map[data-ready='1']", timeout=30_000)
            assert page.locator("#xmodal").is_visible() and page.locator("#specwrap").is_visible()
            # a spectrum upload, in-modal: the object whose spectrum it is comes first
            page.set_input_files("#specupload", str(spec))
            page.wait_for_selector("#results .thumb", timeout=60_000)
            assert page.locator("#results .thumb").first.get_attribute("data-id") == oid
            # cross-modal: the same upload searches the images; a clicked object's neighbours are spectra
            page.check("#crossmodal")
            page.set_input_files("#specupload", [])
            page.set_input_files("#specupload", str(spec))
            page.wait_for_function(
                "() => document.getElementById('restitle').textContent.includes('spectra → images')", timeout=60_000
            )
            x, y = page.evaluate(f"() => explorer.screenOf({row})")
            page.mouse.click(x, y)
            page.wait_for_function(
                "() => document.getElementById('nbtitle').textContent.includes('images → spectra')", timeout=30_000
            )
            assert page.locator("#neighbours .thumb").count() > 0
            assert errors == []
        finally:
            browser.close()
