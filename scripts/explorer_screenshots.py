"""Screenshots of the explorer page for docs/explorer.md: the gallery, a tooltip, a selection and marks visible.

Serves INDEX on a free localhost port, drives headless Chromium (Debian's `chromium`, through Playwright) at each
width: clicks an object near the middle of the map, marks the query and two neighbours (keys i, i, n), box-selects a
region, hovers a point, and writes OUT/explorer-<width>.png. The marks are written next to the index (a copy is used).

    python scripts/explorer_screenshots.py --index IDX [--data DIR] --out docs/img --width 1400 800
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", required=True, help="index directory (`astrolom index`)")
    ap.add_argument("--data", default=None, help="data set with the cutouts (default: recorded in the index)")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--width", type=int, nargs="+", default=[1400, 800])
    ap.add_argument("--height", type=int, default=860)
    args = ap.parse_args()
    chromium = os.environ.get("ASTROLOM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH (apt-get install -y chromium)")
    import uvicorn
    from playwright.sync_api import sync_playwright

    from astrolom.serve.app import create_app

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for width in args.width:
        with tempfile.TemporaryDirectory() as tmp:  # marks are written next to the index: start from none
            index = shutil.copytree(args.index, Path(tmp) / "index", symlinks=True)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            server = uvicorn.Server(
                uvicorn.Config(create_app(index, args.data), host="127.0.0.1", port=port, log_level="warning")
            )
            threading.Thread(target=server.run, daemon=True).start()
            while not server.started:
                time.sleep(0.05)
            try:
                with sync_playwright() as p:
                    browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox"])
                    page = browser.new_page(viewport={"width": width, "height": args.height})
                    _session(page, f"http://127.0.0.1:{port}/")
                    _save(page.screenshot(), out / f"explorer-{width}.png")
                    browser.close()
            finally:
                server.should_exit = True
        print(f"{out / f'explorer-{width}.png'}: {(out / f'explorer-{width}.png').stat().st_size / 1024:.0f} KiB")


def _save(png: bytes, path: Path) -> None:
    """A 256-colour PNG: noisy cutouts make a full-colour screenshot several times larger, for no visible gain."""
    import io

    from PIL import Image

    Image.open(io.BytesIO(png)).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _session(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("canvas#map[data-ready='1']", timeout=120_000)
    x, y = (np.asarray(v) for v in page.evaluate("() => [Array.from(explorer.x), Array.from(explorer.y)]"))
    # the object nearest the middle of the map, then a box over the upper left quarter of the points
    row = int(np.argmin((x - np.median(x)) ** 2 + (y - np.median(y)) ** 2))
    page.mouse.click(*page.evaluate(f"() => explorer.screenOf({row})"))
    page.wait_for_function("() => document.getElementById('gallery').dataset.kind === 'neighbours'")
    if page.locator("#labelpanel").is_visible():
        for key in "iin":
            page.keyboard.press(key)
        page.wait_for_function("() => document.getElementById('markcount').textContent.startsWith('2 interesting')")
    x0, x1, y0, y1 = np.quantile(x, 0.1), np.quantile(x, 0.4), np.quantile(y, 0.6), np.quantile(y, 0.9)
    a, b = page.evaluate(f"() => [explorer.pageOf({x0}, {y1}), explorer.pageOf({x1}, {y0})]")
    page.keyboard.press("b")
    page.mouse.move(*a)
    page.mouse.down()
    page.mouse.move(*b, steps=5)
    page.mouse.up()
    # hover a point on the right of the map (away from the selection) for the tooltip
    hover = int(np.argmin((x - np.quantile(x, 0.75)) ** 2 + (y - np.median(y)) ** 2))
    page.mouse.move(*page.evaluate(f"() => explorer.screenOf({hover})"))
    page.wait_for_selector("#tip:not(.hidden)")
    page.wait_for_function("() => document.getElementById('tipimg').complete")
    page.wait_for_function(  # the cards on screen have their cutouts (the lazy ones below need not)
        "() => [...document.querySelectorAll('#gallery img')]"
        ".every((i) => i.getBoundingClientRect().top > innerHeight || (i.complete && i.naturalWidth > 0))"
    )
    page.wait_for_timeout(300)


if __name__ == "__main__":
    sys.exit(main())
