"""The explorer's map at millions of points: density images of a view, and the points of a view that holds few.

Below `POINTS_MAX` objects the page takes every point once (`/api/map`) and draws them itself. Above it that would
be hundreds of MB of JSON and a canvas drawing every point on each frame, so the server answers for the view only:

- `GridOrder` sorts the map's points by the cell of a fine grid (`GRID` x `GRID` over the map's bounds), with the
  offset of each cell, so that the points of any rectangle are one contiguous slice per grid row it covers; a 2-D
  prefix sum of the cell counts bounds how many a rectangle holds before a point is read;
- `/api/map/density` bins the points of a view into a w x h image of counts, and, coloured by a label, each pixel's
  mean value (numeric) or most frequent category (categorical), as little-endian float32 arrays;
- `/api/map/points` returns the points of a view (coordinates, rows, ids, the label's values) when it holds at most
  a cap of them, otherwise only their count; `/api/map/label/{name}` the label's kind, categories and colour range.

Every size is bounded (image sides, pixels, cap) and every view is checked (finite, non-empty): 400 otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("astrolom.serve")

GRID = 1024  # cells per side of the grid order: 1M cells, 8 MB of offsets
POINTS_MAX = 200_000  # above this many objects the page shows density images and the points of zoomed-in views
POINTS_CAP = 100_000  # a view's points are sent when it holds at most this many
MAX_CAP = 200_000
MAX_SIDE = 4096  # density image: at most this many pixels a side ...
MAX_PIXELS = 2048 * 2048  # ... and in all
CATEGORICAL_MAX = 24  # a label with at most this many distinct values is coloured by category
_SAMPLE = 100_000  # distinct values counted on a sample first: more than CATEGORICAL_MAX there settles it


@dataclass(frozen=True)
class View:
    """A closed rectangle of the map, [x0, x1] x [y0, y1]."""

    x0: float
    x1: float
    y0: float
    y1: float

    def __post_init__(self):
        if not all(np.isfinite([self.x0, self.x1, self.y0, self.y1])):
            raise ValueError("the view's bounds must be finite numbers")
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(f"an empty view: need x0 < x1 and y0 < y1, got {self.astuple()}")

    def astuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.x1, self.y0, self.y1)

    def padded(self, frac: float) -> View:
        dx, dy = frac * (self.x1 - self.x0), frac * (self.y1 - self.y0)
        return View(self.x0 - dx, self.x1 + dx, self.y0 - dy, self.y1 + dy)


@dataclass
class LabelColumn:
    """A label as the map colours it: numbers (float64, NaN where missing), or category codes into `categories`."""

    kind: str  # "numeric" | "categorical"
    values: np.ndarray
    categories: list[str] | None = None

    def colour_range(self) -> tuple[float | None, float | None]:
        """The 2nd and 98th percentiles of a numeric label (the ends of the colour ramp); None for categories."""
        if self.kind != "numeric":
            return None, None
        v = self.values
        if len(v) > 1_000_000:  # a regular sample is plenty for two percentiles
            v = v[:: len(v) // 1_000_000]
        v = v[np.isfinite(v)]
        if not len(v):
            return None, None
        lo, hi = np.quantile(v, [0.02, 0.98])
        return float(lo), float(hi)


def label_kind(values: np.ndarray) -> str:
    """`categorical` for strings and for numbers with at most CATEGORICAL_MAX distinct finite values, else
    `numeric`; decided on a sample first when that sample alone has too many distinct values."""
    if values.dtype == object:
        return "categorical"
    for v in (values[:_SAMPLE], values) if len(values) > _SAMPLE else (values,):
        if len(np.unique(v[np.isfinite(v)])) > CATEGORICAL_MAX:
            return "numeric"
    return "categorical"


def label_column(values: np.ndarray) -> LabelColumn:
    """A label's values (`SearchIndex.label_values`) as the map colours them."""
    if label_kind(values) == "numeric":
        return LabelColumn("numeric", np.asarray(values, dtype=np.float64))
    names, codes = np.unique(np.asarray([str(x) for x in values]), return_inverse=True)
    return LabelColumn("categorical", codes.astype(np.int32), names.tolist())


@dataclass
class Points:
    """The points of a view: `total` of them (None: more than the cap, not counted exactly); `pos` their positions
    in the grid order, None when more than the cap."""

    view: View
    total: int | None
    pos: np.ndarray | None


class GridOrder:
    """The map's points sorted by grid cell, for range queries (see the module docstring).

    Points with a non-finite coordinate are left out and counted in `missing`.
    """

    def __init__(self, xy: np.ndarray, grid: int = GRID):
        xy = np.asarray(xy, dtype=np.float32)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"map coordinates must be an (N, 2) array, got shape {xy.shape}")
        self.n, self.grid = len(xy), grid
        ok = np.isfinite(xy).all(axis=1)
        rows = np.flatnonzero(ok) if not ok.all() else None
        self.missing = int(self.n - ok.sum())
        x, y = (xy[:, 0], xy[:, 1]) if rows is None else (xy[rows, 0], xy[rows, 1])
        if len(x):
            self.bounds = View(*_span(float(x.min()), float(x.max())), *_span(float(y.min()), float(y.max())))
        else:
            self.bounds = View(0.0, 1.0, 0.0, 1.0)
        cell = self._iy(y) * grid + self._ix(x)
        order = np.argsort(cell)  # within a cell the order does not matter
        counts = np.bincount(cell, minlength=grid * grid)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        # counts of the cells [0, i) x [0, j): the count of any block of cells in four look-ups
        self._prefix = np.zeros((grid + 1, grid + 1), dtype=np.int64)
        self._prefix[1:, 1:] = counts.reshape(grid, grid).cumsum(0).cumsum(1)
        index_type = np.int32 if self.n < 2**31 else np.int64
        self.rows = (order if rows is None else rows[order]).astype(index_type)
        self.xs, self.ys = x[order], y[order]

    def _ix(self, x) -> np.ndarray:
        b = self.bounds
        i = np.floor((np.asarray(x, np.float64) - b.x0) * (self.grid / (b.x1 - b.x0)))
        return np.clip(i, 0, self.grid - 1).astype(np.int64)

    def _iy(self, y) -> np.ndarray:
        b = self.bounds
        i = np.floor((np.asarray(y, np.float64) - b.y0) * (self.grid / (b.y1 - b.y0)))
        return np.clip(i, 0, self.grid - 1).astype(np.int64)

    def _cells(self, v: View) -> tuple[int, int, int, int] | None:
        """The block of cells [ix0, ix1] x [iy0, iy1] that may hold points of `v`; None if `v` misses the map."""
        b = self.bounds
        if v.x1 < b.x0 or v.x0 > b.x1 or v.y1 < b.y0 or v.y0 > b.y1:
            return None
        ix0, ix1 = (int(i) for i in self._ix([v.x0, v.x1]))
        iy0, iy1 = (int(i) for i in self._iy([v.y0, v.y1]))
        return ix0, ix1, iy0, iy1

    def _block(self, ix0: int, ix1: int, iy0: int, iy1: int) -> int:
        """Points in the cells [ix0, ix1] x [iy0, iy1] (0 for an empty block)."""
        if ix1 < ix0 or iy1 < iy0:
            return 0
        p = self._prefix
        return int(p[iy1 + 1, ix1 + 1] - p[iy0, ix1 + 1] - p[iy1 + 1, ix0] + p[iy0, ix0])

    def count_range(self, v: View) -> tuple[int, int]:
        """(at least, at most) the number of points in `v`, from the cell counts alone: the cells wholly inside it,
        and every cell it touches."""
        c = self._cells(v)
        if c is None:
            return 0, 0
        ix0, ix1, iy0, iy1 = c
        return self._block(ix0 + 1, ix1 - 1, iy0 + 1, iy1 - 1), self._block(ix0, ix1, iy0, iy1)

    def candidates(self, v: View) -> slice | np.ndarray:
        """Positions (in the grid order) of the points of the cells `v` touches: a superset of its points."""
        c = self._cells(v)
        if c is None:
            return slice(0, 0)
        ix0, ix1, iy0, iy1 = c
        g, off = self.grid, self.offsets
        if ix0 == 0 and ix1 == g - 1:  # whole grid rows are one slice
            return slice(int(off[iy0 * g]), int(off[(iy1 + 1) * g]))
        starts = off[np.arange(iy0, iy1 + 1) * g + ix0]
        ends = off[np.arange(iy0, iy1 + 1) * g + ix1 + 1]
        lengths = ends - starts
        total = int(lengths.sum())
        # one arange shifted per run: the concatenation of the ranges [start, end) without a Python loop
        shift = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return shift + np.arange(total, dtype=np.int64)

    def _select(self, v: View) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions (in the grid order) and x, y of the points in the closed rectangle `v`."""
        cand = self.candidates(v)
        x, y = self.xs[cand], self.ys[cand]
        keep = (x >= v.x0) & (x <= v.x1) & (y >= v.y0) & (y <= v.y1)
        pos = np.flatnonzero(keep) + cand.start if isinstance(cand, slice) else cand[keep]
        return pos, x[keep], y[keep]

    def inside(self, v: View) -> np.ndarray:
        """Positions (in the grid order) of the points in the closed rectangle `v`."""
        return self._select(v)[0]

    def points(self, v: View, cap: int, pad: float = 0.0) -> Points:
        """The points of `v` widened by `pad` (a fraction of its sides) if those are at most `cap`, else of `v`
        itself if those are, else their count (None where the cell counts alone show it is over the cap)."""
        if pad > 0:
            wide = v.padded(pad)
            if self.count_range(wide)[0] <= cap:
                pos = self.inside(wide)
                if len(pos) <= cap:
                    return Points(wide, len(pos), pos)
        if self.count_range(v)[0] > cap:
            return Points(v, None, None)
        pos = self.inside(v)
        return Points(v, len(pos), pos if len(pos) <= cap else None)

    def raster(
        self, v: View, w: int, h: int, label: LabelColumn | None = None, sorted_values: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """A w x h image of `v` (row 0 at the top, y1): the count of points in each pixel, and with a label each
        pixel's mean (numeric; NaN where no point has a value) or most frequent category (ties: the lowest code;
        NaN where empty). `sorted_values`: the label's values in the grid order (`in_order`)."""
        pos, x, y = self._select(v)
        x, y = x.astype(np.float64), y.astype(np.float64)
        px = np.minimum(np.floor((x - v.x0) * (w / (v.x1 - v.x0))), w - 1).astype(np.int64)
        py = np.minimum(np.floor((v.y1 - y) * (h / (v.y1 - v.y0))), h - 1).astype(np.int64)
        pix = py * w + px
        counts = np.bincount(pix, minlength=w * h).astype(np.float32)
        if label is None:
            return counts.reshape(h, w), None
        vals = sorted_values[pos]
        if label.kind == "numeric":
            ok = np.isfinite(vals)
            n = np.bincount(pix[ok], minlength=w * h)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.bincount(pix[ok], weights=vals[ok], minlength=w * h) / n
            return counts.reshape(h, w), mean.astype(np.float32).reshape(h, w)
        best = np.full(w * h, np.nan, dtype=np.float32)
        most = np.zeros(w * h, dtype=np.int64)
        for code in np.unique(vals):  # a pass per category present: K <= CATEGORICAL_MAX
            c = np.bincount(pix[vals == code], minlength=w * h)
            better = c > most
            best[better], most[better] = code, c[better]
        return counts.reshape(h, w), best.reshape(h, w)

    def in_order(self, values: np.ndarray) -> np.ndarray:
        """Per-object values rearranged into the grid order (rows left out of the map dropped)."""
        return np.asarray(values)[self.rows]


def _span(lo: float, hi: float) -> tuple[float, float]:
    """A non-empty interval around [lo, hi] (one point, or all points on a line, still get a map)."""
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


class MapView:
    """The map endpoints' state: the grid order (built once, on first use or ahead by `warm`) and label columns."""

    def __init__(self, index, coords: Callable[[], np.ndarray], points_max: int = POINTS_MAX):
        self.index, self.coords, self.points_max = index, coords, points_max
        self._grid: GridOrder | None = None
        self._labels: dict[str, tuple[LabelColumn, np.ndarray]] = {}
        self._kinds: dict[str, str] | None = None
        self._lock = threading.Lock()
        self.build_seconds: float | None = None

    @property
    def dense(self) -> bool:
        """Whether the page shows density images rather than taking every point."""
        return len(self.index) > self.points_max

    def grid(self) -> GridOrder:
        with self._lock:
            if self._grid is None:
                t0 = time.perf_counter()
                self._grid = GridOrder(self.coords())
                self.build_seconds = time.perf_counter() - t0
                log.info("map grid of %d points built in %.1f s", self._grid.n, self.build_seconds)
        return self._grid

    def warm(self) -> None:
        """Build the grid order in a background thread, so that the page's first request finds it ready."""
        threading.Thread(target=self.grid, name="astrolom-map-grid", daemon=True).start()

    def label_kinds(self) -> dict[str, str]:
        """Each label's kind (`label_kind`), worked out once."""
        with self._lock:
            if self._kinds is None:
                self._kinds = {name: label_kind(self.index.label_values(name)) for name in self.index.label_names}
        return self._kinds

    def label(self, name: str) -> tuple[LabelColumn, np.ndarray]:
        """A label's column and its values in the grid order (made once per label)."""
        grid = self.grid()
        with self._lock:
            if name not in self._labels:
                col = label_column(self.index.label_values(name))
                self._labels[name] = (col, grid.in_order(col.values))
        return self._labels[name]


def add_routes(app, mv: MapView) -> None:
    """The map endpoints of the explorer app (`/api/map`, `/api/labels/{name}` for small indexes; the view
    endpoints for any)."""
    from fastapi import HTTPException, Query
    from fastapi.responses import Response

    idx = mv.index

    def small_only(what: str) -> None:
        if mv.dense:
            raise HTTPException(
                413,
                f"{what} of all {len(idx)} objects is too large to send (more than {mv.points_max}): ask for a view "
                "with /api/map/density and /api/map/points",
            )

    def known_label(name: str) -> None:
        if name not in idx.label_names:
            raise HTTPException(404, f"unknown label {name!r}")

    def view_of(x0: float, x1: float, y0: float, y1: float) -> View:
        try:
            return View(x0, x1, y0, y1)
        except ValueError as err:
            raise HTTPException(400, str(err)) from err

    @app.get("/api/map")
    def map_points():
        """2-D map: x, y (rounded) and the object id of every point, in index row order (small indexes only)."""
        small_only("the map")
        xy = mv.coords()
        return {
            "x": np.round(xy[:, 0].astype(float), 4).tolist(),
            "y": np.round(xy[:, 1].astype(float), 4).tolist(),
            "ids": idx.object_id.tolist(),
        }

    @app.get("/api/labels/{name}")
    def label(name: str):
        """One label for every point: numbers (null where missing), or category codes with their names (small
        indexes only)."""
        known_label(name)
        small_only(f"label {name!r}")
        col = label_column(idx.label_values(name))
        if col.kind == "categorical":
            return {"kind": "categorical", "categories": col.categories, "values": col.values.tolist()}
        return {"kind": "numeric", "values": [None if not np.isfinite(x) else round(float(x), 5) for x in col.values]}

    @app.get("/api/map/view")
    def map_view():
        """The map's extent and what the page should ask for: `density` true when it has more than `points_max`
        objects (then it asks for density images and the points of views holding at most `cap`)."""
        g = mv.grid()
        return {
            "n": len(idx),
            "mapped": g.n - g.missing,
            "bounds": list(g.bounds.astuple()),
            "density": mv.dense,
            "points_max": mv.points_max,
            "cap": POINTS_CAP,
            "grid_seconds": round(mv.build_seconds, 3),  # how long building the grid order took
        }

    @app.get("/api/map/label/{name}")
    def map_label(name: str):
        """How the map colours a label: its kind, categories (in code order) and the numeric colour range (2nd to
        98th percentile)."""
        known_label(name)
        col, _ = mv.label(name)
        lo, hi = col.colour_range()
        return {"name": name, "kind": col.kind, "categories": col.categories, "lo": lo, "hi": hi}

    @app.get(
        "/api/map/density",
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    def density(x0: float, x1: float, y0: float, y1: float, w: int, h: int, label: str | None = None):
        """The view [x0, x1] x [y0, y1] as a w x h image, row 0 at the top: float32 little-endian counts per
        pixel, followed (with `label`) by each pixel's mean value or most frequent category code (NaN: none).
        The header X-Points gives the number of points in the view."""
        v = view_of(x0, x1, y0, y1)
        if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE and w * h <= MAX_PIXELS):
            raise HTTPException(400, f"image size {w} x {h}: each side 1..{MAX_SIDE}, at most {MAX_PIXELS} pixels")
        col = sorted_values = None
        if label:
            known_label(label)
            col, sorted_values = mv.label(label)
        counts, values = mv.grid().raster(v, w, h, col, sorted_values)
        body = counts.astype("<f4").tobytes() + (values.astype("<f4").tobytes() if values is not None else b"")
        return Response(body, media_type="application/octet-stream", headers={"X-Points": str(int(counts.sum()))})

    @app.get("/api/map/points")
    def view_points(
        x0: float,
        x1: float,
        y0: float,
        y1: float,
        cap: int = Query(POINTS_CAP, ge=1, le=MAX_CAP),
        pad: float = Query(0.0, ge=0, le=1),
        label: str | None = None,
    ):
        """The points of the view [x0, x1] x [y0, y1] (widened by `pad` of its sides where that still holds at
        most `cap`): `bounds` (the view answered), `total`, and unless `capped`: x, y, index rows, ids and (with
        `label`) the label's values (numbers or category codes, null where missing). Over the cap: `total` only
        (null where the cell counts alone show it is over)."""
        v = view_of(x0, x1, y0, y1)
        if label:
            known_label(label)
        g = mv.grid()
        p = g.points(v, cap, pad)
        out: dict = {"bounds": list(p.view.astuple()), "total": p.total, "capped": p.pos is None}
        if p.pos is not None:
            rows = g.rows[p.pos]
            # 4 decimals for a view 10 wide, more for smaller ones: the points of a deep zoom stay apart
            side = min(p.view.x1 - p.view.x0, p.view.y1 - p.view.y0)
            digits = int(np.clip(5 - np.floor(np.log10(side)), 4, 10))
            out["x"] = np.round(g.xs[p.pos].astype(float), digits).tolist()
            out["y"] = np.round(g.ys[p.pos].astype(float), digits).tolist()
            out["rows"] = rows.tolist()
            out["ids"] = idx.object_id[rows].tolist()
            if label:
                col, sorted_values = mv.label(label)
                vals = sorted_values[p.pos]
                if col.kind == "numeric":
                    out["values"] = [None if not np.isfinite(a) else round(a, 5) for a in vals.tolist()]
                else:
                    out["values"] = vals.tolist()
        # serialised here: FastAPI's encoder walks every element of a list, ~10x slower for 100k points
        return Response(json.dumps(out, separators=(",", ":")), media_type="application/json")
