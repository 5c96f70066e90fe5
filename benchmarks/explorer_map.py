"""The explorer page's map in a real browser: time to the first map and frame times while zooming and panning.

Opens each index (`--index DIR`, any size, or `--n`: builds one of clustered synthetic vectors with a PCA map per
size in a temporary directory) with `astrolom serve` on a free localhost port in a subprocess and drives the page in
headless Chromium (Debian's `chromium`, via Playwright). Per index and page it reports:

- server start: launching `astrolom serve` until /api/info answers (loading the index);
- first map: navigation to the drawn, coloured map (`explorer.readyMs`);
- frame times: the intervals between requestAnimationFrame callbacks while a script zooms in 8 wheel steps at the
  centre, drags the map 300 px, and zooms out again (p50 / p95 / max; 16.7 ms is a smooth 60 Hz frame, a long
  interval is the page busy: drawing, parsing a response);
- the map mode after zooming in (`points` once the view holds at most the cap, else `density`; small maps: `all`);
- the server's peak RSS (VmHWM) after the run.

With `--peer SRC` (another checkout's `src`, e.g. /work/main/src) the same index is also opened with that code's
server and page, side by side, where the index has at most `--peer-max` objects (the page before issue 23 asks for
every point's JSON, which does not finish at millions).

    python benchmarks/explorer_map.py --n 100000 1000000 --peer /work/main/src
    python benchmarks/explorer_map.py --index /work/scratch/scale86/index_8600000_auto
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

# frame intervals recorded from here until window.__stopFrames()
FRAMES = """() => { window.__frames = []; let last = performance.now(), on = true;
  const tick = (t) => { window.__frames.push(t - last); last = t; if (on) requestAnimationFrame(tick); };
  requestAnimationFrame(tick); window.__stopFrames = () => { on = false; return window.__frames; }; }"""
MODE = "() => document.getElementById('map').dataset.mode || 'all'"


def _serve(index: Path, src: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = [sys.executable, "-m", "astrolom", "serve", "--index", str(index), "--port", str(port)]
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    for _ in range(6000):
        try:
            with urllib.request.urlopen(base + "/api/info", timeout=60):
                return server, base, time.perf_counter() - t0
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"astrolom serve exited: {server.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.1)
    server.kill()
    raise SystemExit("astrolom serve did not start in 10 min")


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _interact(page) -> tuple[list[float], str]:
    """Zoom in, pan, zoom out with the mouse, recording frame intervals; the map mode after zooming in."""
    box = page.locator("#map").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.evaluate(FRAMES)
    for _ in range(8):
        page.mouse.wheel(0, -300)
        page.wait_for_timeout(120)
    page.wait_for_timeout(2500)  # the zoomed view's points or image arrive
    mode = page.evaluate(MODE)
    page.mouse.down()
    page.mouse.move(cx + 300, cy + 100, steps=30)
    page.mouse.up()
    page.wait_for_timeout(1500)
    for _ in range(8):
        page.mouse.wheel(0, 300)
        page.wait_for_timeout(120)
    page.wait_for_timeout(2500)
    return page.evaluate("() => window.__stopFrames()")[1:], mode


def _run(browser, index: Path, src: Path, width: int) -> dict:
    server, base, start = _serve(index, src)
    try:
        page = browser.new_page(viewport={"width": width, "height": 860})
        page.goto(base + "/")
        page.wait_for_selector("canvas#map[data-ready='1']", timeout=600_000)
        ready = page.evaluate("() => explorer.readyMs") / 1000
        frames, mode = _interact(page)
        page.close()
        rss = _peak_rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    f = np.asarray(frames)
    return {
        "start": start,
        "ready": ready,
        "p50": np.median(f),
        "p95": np.quantile(f, 0.95),
        "max": f.max(),
        "mode": mode,
        "rss": rss,
    }


def _synthetic_index(n: int, dim: int, out: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from search_index import synthetic

    from astrolom.eval.embeddings import EmbeddingTable
    from astrolom.search.index import build_index

    X = synthetic(n, dim, 50, seed=0)
    ids = np.array([f"obj{i:07d}" for i in range(n)])
    z = np.random.default_rng(0).uniform(0, 1, n)
    table = EmbeddingTable(ids, np.array(["test"] * n), X, {"redshift": z}, {})
    kind = "flat" if n <= 1_000_000 else "auto"  # the map is what is measured, not the search
    return build_index(table, out, kind=kind, map_method="pca", outlier_k=(), progress=False, log=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, nargs="*", default=[], help="existing index directories to open")
    ap.add_argument("--n", type=int, nargs="*", default=[], help="sizes of synthetic indexes to build and open")
    ap.add_argument("--dim", type=int, default=8, help="dimension of the synthetic vectors")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--peer", type=Path, default=None, help="another checkout's src/ whose page to compare with")
    ap.add_argument("--peer-max", type=int, default=300_000, help="largest index the peer page is opened on")
    args = ap.parse_args()
    if not args.index and not args.n:
        args.n = [100_000, 1_000_000]
    chromium = os.environ.get("ASTROLOM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    from astrolom.search.index import load_index

    here = Path(__file__).parents[1] / "src"
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    print("| index | points | page | server start | first map | frames p50 / p95 / max | zoomed-in mode | server RSS |")
    print("|---|---:|---|---:|---:|---:|---|---:|")
    tmp = Path(tempfile.mkdtemp(prefix="astrolom-explorer-map-"))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
            indexes = list(args.index) + [_synthetic_index(n, args.dim, tmp / f"index{n}") for n in args.n]
            for index in indexes:
                n = len(load_index(index))
                pages = [("this", here)]
                if args.peer is not None and n <= args.peer_max:
                    pages.append(("peer", args.peer))
                for name, src in pages:
                    r = _run(browser, index, src, args.width)
                    print(
                        f"| {index.name} | {n:,} | {name} | {r['start']:.1f} s | {r['ready']:.2f} s "
                        f"| {r['p50']:.0f} / {r['p95']:.0f} / {r['max']:.0f} ms | {r['mode']} | {r['rss']:,.0f} MiB |",
                        flush=True,
                    )
            browser.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
