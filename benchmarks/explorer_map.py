"""The explorer page's map in a real browser: time to the first map and time to draw it, by number of points.

For each `--n`, builds an index of clustered synthetic vectors (see search_index.py; PCA map) in a temporary
directory, starts `astrolom serve` on a free localhost port in a subprocess and opens the page in headless Chromium
(Debian's `chromium`, driven by Playwright). Reports the size of `/api/map`, the time from navigation to the drawn,
coloured map (`explorer.readyMs`), the median of 5 redraws at the fitted view and zoomed in 8x, and the point radius
the page chose. The page holds every point in the browser, so these numbers say where a density image has to take
over (issue 23).

    python benchmarks/explorer_map.py --n 1000 10000 100000 300000
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

DRAW = """() => { const t = []; for (let k = 0; k < 5; k++) { const t0 = performance.now(); explorer.draw();
  t.push(performance.now() - t0); } t.sort((a, b) => a - b); return t[2]; }"""


def _serve(index: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    cmd = [sys.executable, "-m", "astrolom", "serve", "--index", str(index), "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(base + "/api/info", timeout=1):
                return server, base
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"astrolom serve exited: {server.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.1)
    server.kill()
    raise SystemExit("astrolom serve did not start in 60 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--width", type=int, default=1400)
    args = ap.parse_args()
    chromium = os.environ.get("ASTROLOM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(Path(__file__).parent))
    from search_index import synthetic

    from astrolom.eval.embeddings import EmbeddingTable
    from astrolom.search.index import build_index

    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    print("| points | /api/map | first map | draw (fit) | draw (8x zoom) | radius fit / zoom |")
    print("|---:|---:|---:|---:|---:|---:|")
    tmp = Path(tempfile.mkdtemp(prefix="astrolom-explorer-map-"))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
            for n in args.n:
                X = synthetic(n, args.dim, 50, seed=0)
                ids = np.array([f"obj{i:07d}" for i in range(n)])
                z = np.random.default_rng(0).uniform(0, 1, n)
                table = EmbeddingTable(ids, np.array(["test"] * n), X, {"redshift": z}, {})
                build_index(table, tmp / f"index{n}", map_method="pca", progress=False, log=None)
                server, base = _serve(tmp / f"index{n}")
                try:
                    with urllib.request.urlopen(base + "/api/map", timeout=120) as r:
                        map_mb = len(r.read()) / 2**20
                    page = browser.new_page(viewport={"width": args.width, "height": 860})
                    page.goto(base + "/")
                    page.wait_for_selector("canvas#map[data-ready='1']", timeout=300_000)
                    ready = page.evaluate("() => explorer.readyMs")
                    fit_ms, r_fit = page.evaluate(DRAW), page.evaluate("() => explorer.radius()")
                    page.evaluate("() => { explorer.view.s *= 8; }")
                    zoom_ms, r_zoom = page.evaluate(DRAW), page.evaluate("() => explorer.radius()")
                    page.close()
                finally:
                    server.terminate()
                    server.wait(timeout=30)
                print(
                    f"| {n:,} | {map_mb:.1f} MiB | {ready / 1000:.2f} s | {fit_ms:.0f} ms | {zoom_ms:.0f} ms "
                    f"| {r_fit:.1f} / {r_zoom:.1f} px |",
                    flush=True,
                )
            browser.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
