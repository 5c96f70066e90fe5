"""The explorer's grid order of a 2-D map (`astrolom.serve.mapview.GridOrder`) at survey scale, in one process.

For N clustered 2-D points (or `--map IDX/.../map.npy`, memory-mapped): the time to build the grid order, and for
views from the whole map down to 1/64 of its side the time of a density image (900 x 800 pixels) beside the peer,
`np.histogram2d` over every point (what a server without the grid order would do), and of the points of the view.

    python benchmarks/map_grid.py --n 8600000
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np


def _timed(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    from astrolom.serve.mapview import GridOrder, View

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8_600_000)
    ap.add_argument("--map", default=None, help="an index's map.npy instead of synthetic points")
    ap.add_argument("--w", type=int, default=900)
    ap.add_argument("--h", type=int, default=800)
    args = ap.parse_args()
    if args.map:
        xy = np.load(args.map, mmap_mode="r")
    else:
        rng = np.random.default_rng(0)
        centres = rng.uniform(-10, 10, (40, 2))
        xy = (centres[rng.integers(0, 40, args.n)] + rng.normal(0, 1, (args.n, 2))).astype(np.float32)
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs); {len(xy):,} points")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    g = GridOrder(xy)
    build = time.perf_counter() - t0
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(f"grid order built in {build:.2f} s (peak RSS +{rss:.0f} MiB)")
    print("| view (side of the map) | points in view | density image | np.histogram2d (peer) | ratio | view points |")
    print("|---|---:|---:|---:|---:|---:|")
    b = g.bounds
    cx, cy = float(np.median(xy[::97, 0])), float(np.median(xy[::97, 1]))
    x, y = np.asarray(xy[:, 0]), np.asarray(xy[:, 1])
    for frac in (1, 1 / 4, 1 / 16, 1 / 64):
        hw, hh = frac * (b.x1 - b.x0) / 2, frac * (b.y1 - b.y0) / 2
        v = b if frac == 1 else View(cx - hw, cx + hw, cy - hh, cy + hh)
        t_img, (counts, _) = _timed(lambda v=v: g.raster(v, args.w, args.h))
        rng_ = [[v.x0, v.x1], [v.y0, v.y1]]
        t_peer, _ = _timed(lambda rng_=rng_: np.histogram2d(x, y, bins=(args.w, args.h), range=rng_))
        t_pts, p = _timed(lambda v=v: g.points(v, 100_000))
        pts = f"{t_pts * 1000:.0f} ms" + ("" if p.pos is not None else " (over the cap)")
        print(
            f"| 1/{round(1 / frac)} | {int(counts.sum()):,} | {t_img * 1000:.0f} ms | {t_peer * 1000:.0f} ms "
            f"| {t_peer / t_img:.1f}x | {pts} |",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
