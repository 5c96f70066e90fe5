"""Labels from the person at the screen: `astrolom marks --index IDX [--set ID=1 ...] [--rank N] [--export FILE]`.

Marks say which indexed objects are interesting (1) or not (0). They live in `IDX/marks.json`, beside the index,
rewritten whole through a temporary file and one `os.replace`, so a reader (or a restart after a crash) sees the
old marks or the new ones, never half a file. Ids must be objects of the index; their number is bounded.

From the marks, a classifier on the index's vectors (the standardised, normalised embeddings the search uses) ranks
the unmarked objects ("more like these") and picks the next ones to label:

- `logistic`: once each class has at least 2 marks, the project's logistic probe
  (`eval.probe_estimators.logistic_probe`, L2 penalty chosen by cross-validation); the score is its probability of
  "interesting"; the suggestions are the unmarked objects with the probability closest to 1/2 (uncertainty sampling);
- `knn`: while one class has fewer than 2 marks, a soft vote of the nearest mark of each class:
  p = sigmoid((cos to the nearest positive - cos to the nearest negative) / KNN_TEMPERATURE); suggestions as above;
- `similarity`: with positives only, the cosine to the nearest positive (plain similarity search from the
  positives); with no negative there is no boundary to be uncertain about, so the suggestions are the next best
  ranked objects (answering them gives the classifier its first negatives), their `p` that cosine.

Exports (CSV or Parquet): object_id, ra/dec where the index has them, the mark, a score column (similarity or
classifier score) when given, and every label column of the index. In CSV, a text cell that starts with = + - @, a
tab or a carriage return gets a leading single quote (OWASP's defence against CSV formula injection), so an id or label
from someone else's catalogue cannot run as a formula in a spreadsheet; Parquet keeps every value as it is.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from astrolom.search.index import SearchIndex, load_index

MARKS_FILE = "marks.json"
MAX_MARKS = 100_000  # more than a person labels; bounds the file and the classifier's training set
MAX_ID_LENGTH = 256
MAX_RANK = 1000
MAX_EXPORT = 200_000  # objects in one exported selection
N_SUGGEST = 10
KNN_TEMPERATURE = 0.05  # cosine differences of ~0.05 separate a near neighbour from a far one in these spaces
SCORE_CHUNK = 65_536  # index vectors scored at a time: memory stays bounded on a large index
FORMATS = ("csv", "parquet")


class Marks:
    """Marks of indexed objects (id -> 1 interesting / 0 not), kept in a JSON file written atomically.

    Args:
        path: the marks file (`marks_path(index_dir)`).
        index: ids are checked against it (None: not checked, for tools that read marks without an index).
        max_marks: how many objects may carry a mark.
    """

    def __init__(self, path: str | Path, index: SearchIndex | None = None, *, max_marks: int = MAX_MARKS):
        self.path, self.index, self.max_marks = Path(path), index, max_marks
        self._lock = threading.Lock()
        self._marks: dict[str, int] = self._read()

    def _read(self) -> dict[str, int]:
        if not self.path.is_file():
            return {}
        try:
            doc = json.loads(self.path.read_text())
            marks = doc["marks"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.path}: not a marks file written by astrolom ({err})") from err
        if not isinstance(marks, dict) or any(m not in (0, 1) or isinstance(m, bool) for m in marks.values()):
            raise ValueError(f"{self.path}: marks must map object ids to 0 or 1")
        if len(marks) > self.max_marks:
            raise ValueError(f"{self.path}: {len(marks)} marks, more than the limit of {self.max_marks}")
        return {str(k): int(v) for k, v in marks.items()}

    def set(self, object_id: str, mark: int | None) -> None:
        """Mark an object 1 (interesting) or 0 (not), or remove its mark (None); written to disk before returning."""
        object_id = str(object_id)
        if mark is not None and (mark not in (0, 1) or isinstance(mark, bool)):
            raise ValueError(f"a mark is 1 (interesting), 0 (not) or null (remove), got {mark!r}")
        if len(object_id) > MAX_ID_LENGTH:
            raise ValueError(f"object id longer than {MAX_ID_LENGTH} characters")
        if self.index is not None:
            self.index.row_of(object_id)  # a ValueError naming the index for an unknown id
        with self._lock:
            marks = dict(self._marks)
            if mark is None:
                marks.pop(object_id, None)
            else:
                if object_id not in marks and len(marks) >= self.max_marks:
                    raise ValueError(f"{self.path}: already {len(marks)} marks, the limit")
                marks[object_id] = int(mark)
            _write_atomic(self.path, json.dumps({"version": 1, "marks": marks}, indent=0))
            self._marks = marks

    def items(self) -> dict[str, int]:
        """A copy of the marks, id -> 0/1."""
        with self._lock:
            return dict(self._marks)

    def as_dict(self) -> dict:
        """`{"marks": [{"id", "mark"}], "positives", "negatives"}` (the web explorer's JSON)."""
        marks = self.items()
        pos = sum(marks.values())
        return {
            "marks": [{"id": k, "mark": v} for k, v in marks.items()],
            "positives": pos,
            "negatives": len(marks) - pos,
        }


def marks_path(index_dir: str | Path) -> Path:
    """Where the marks of the index at `index_dir` are kept."""
    return Path(index_dir) / MARKS_FILE


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and one rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------------- ranking


@dataclass
class Ranking:
    """The unmarked objects ranked by a classifier of the marks, and the ones to label next."""

    method: str  # logistic | knn | similarity
    rows: np.ndarray  # best first
    scores: np.ndarray
    suggest_rows: np.ndarray
    suggest_p: np.ndarray

    def as_dict(self, index: SearchIndex) -> dict:
        """`{"ranked": [{"id", "score"}], "suggest": [{"id", "p"}], "method"}` (the web explorer's JSON)."""
        ids = index.object_id
        return {
            "ranked": [
                {"id": str(ids[r]), "score": round(float(s), 6)} for r, s in zip(self.rows, self.scores, strict=True)
            ],
            "suggest": [
                {"id": str(ids[r]), "p": round(float(p), 6)}
                for r, p in zip(self.suggest_rows, self.suggest_p, strict=True)
            ],
            "method": self.method,
        }


class Scorer:
    """p(interesting) of index vectors from marked vectors X (unit length) and their marks y (module docstring)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, seed: int = 0):
        pos, neg = int((y == 1).sum()), int((y == 0).sum())
        if pos == 0:
            raise ValueError("mark at least one object as interesting (1) to rank the others")
        self.X_pos, self.X_neg = X[y == 1], X[y == 0]
        self.model = None
        if min(pos, neg) >= 2:
            from astrolom.eval.probe_estimators import logistic_probe

            self.method = "logistic"
            self.model = logistic_probe(X.shape[1], 2, folds=min(5, pos, neg))
            self.model.fit(X, y.astype(int))
        else:
            self.method = "knn" if neg else "similarity"

    def __call__(self, V: np.ndarray) -> np.ndarray:
        if self.model is not None:
            return self.model.predict_proba(V)[:, 1]
        s_pos = (V @ self.X_pos.T).max(axis=1)
        if self.method == "similarity":
            return s_pos
        s_neg = (V @ self.X_neg.T).max(axis=1)
        return 1.0 / (1.0 + np.exp(-(s_pos - s_neg) / KNN_TEMPERATURE))


def rank(index: SearchIndex, marks: dict[str, int], n: int = 100, n_suggest: int = N_SUGGEST) -> Ranking:
    """The `n` best unmarked objects of `index` by a classifier of `marks`, and `n_suggest` to label next."""
    if not 1 <= n <= MAX_RANK:
        raise ValueError(f"n must be between 1 and {MAX_RANK}, got {n}")
    rows = np.array([index.row_of(i) for i in marks], dtype=np.int64)
    y = np.array(list(marks.values()), dtype=np.int64)
    scorer = Scorer(index.vectors(rows), y)
    scores = np.empty(len(index), dtype=np.float64)
    for start in range(0, len(index), SCORE_CHUNK):
        chunk = np.arange(start, min(start + SCORE_CHUNK, len(index)))
        scores[chunk] = scorer(index.vectors(chunk))
    free = np.ones(len(index), dtype=bool)
    free[rows] = False
    cand = np.flatnonzero(free)
    best = cand[np.argsort(-scores[cand], kind="stable")]
    top = best[:n]
    if scorer.method == "similarity":
        suggest = best[n : n + n_suggest] if len(best) > n else best[:n_suggest]
    else:
        suggest = cand[np.argsort(np.abs(scores[cand] - 0.5), kind="stable")[:n_suggest]]
    return Ranking(scorer.method, top, scores[top], suggest, scores[suggest])


# -------------------------------------------------------------------------------------------------------- export


def export_table(
    index: SearchIndex,
    ids: Sequence[str],
    *,
    marks: dict[str, int] | None = None,
    scores: dict[str, float] | None = None,
    score_name: str = "score",
) -> pa.Table:
    """A table of `ids` (in that order): object_id, ra, dec (where the index has them), mark, `score_name` (when
    `scores` is given; null for ids it lacks) and the index's label columns. Unknown ids are a ValueError."""
    if len(ids) > MAX_EXPORT:
        raise ValueError(f"{len(ids)} objects to export, more than the limit of {MAX_EXPORT}")
    rows = np.array([index.row_of(str(i)) for i in ids], dtype=np.int64)
    marks = marks or {}
    cols: dict[str, pa.Array] = {"object_id": pa.array([str(index.object_id[r]) for r in rows], pa.string())}
    objects = index.objects.take(pa.array(rows)) if len(rows) else index.objects.slice(0, 0)
    for name in ("ra", "dec"):
        if name in index.label_names:
            cols[name] = objects.column(name)
    cols["mark"] = pa.array([marks.get(c) for c in cols["object_id"].to_pylist()], pa.int8())
    if scores is not None:
        cols[score_name] = pa.array([_finite(scores.get(i)) for i in cols["object_id"].to_pylist()], pa.float64())
    cols["split"] = objects.column("split")
    for name in index.label_names:
        if name not in cols:
            cols[name] = objects.column(name)
    return pa.table(cols)


def _finite(v) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


# a cell a spreadsheet would run as a formula (OWASP "CSV Injection"): = + - @ and tab / carriage return first
_FORMULA_START = r"^([=+\-@\t\r])"


def _neutralise_formulas(table: pa.Table) -> pa.Table:
    """Prefix text cells that start like a formula with a single quote (the spreadsheet's "this is text" mark).

    Text columns only: numbers (a negative dec) are written as numbers and stay numbers."""
    import pyarrow.compute as pc

    for i, field in enumerate(table.schema):
        kind = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            col = pc.cast(table.column(i), kind)
            safe = pc.replace_substring_regex(col, pattern=_FORMULA_START, replacement=r"'\1")
            table = table.set_column(i, field.name, safe)
    return table


def table_bytes(table: pa.Table, fmt: str) -> bytes:
    """A table as the bytes of a CSV (formula-like text cells quoted, see the module docstring) or Parquet file."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    buf = io.BytesIO()
    if fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(_neutralise_formulas(table), buf)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, buf)
    return buf.getvalue()


def write_table(table: pa.Table, path: str | Path) -> Path:
    """Write a table to `path` as CSV or Parquet (by its extension: .csv, .parquet/.pq), atomically."""
    path = Path(path)
    fmt = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: export to a .csv or .parquet file")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = table_bytes(table, fmt)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index directory (`astrolom index`); marks go to IDX/marks.json")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ID=0|1",
        help="mark an object 1 (interesting) or 0 (not); repeatable",
    )
    parser.add_argument("--unset", action="append", default=[], metavar="ID", help="remove an object's mark")
    parser.add_argument(
        "--rank",
        type=int,
        default=0,
        metavar="N",
        help="rank the unmarked objects by a classifier of the marks; print the N best and the "
        f"{N_SUGGEST} to label next",
    )
    parser.add_argument(
        "--export",
        default=None,
        metavar="FILE",
        help="write the marks (or with --rank, the ranking) to a .csv or .parquet file",
    )


def run(args: argparse.Namespace) -> int:
    index = load_index(args.index)
    marks = Marks(marks_path(args.index), index)
    for item in args.set:
        oid, _, value = item.rpartition("=")
        if value not in ("0", "1") or not oid:
            raise ValueError(f"--set {item!r}: want ID=1 or ID=0")
        marks.set(oid, int(value))
    for oid in args.unset:
        marks.set(oid, None)
    m = marks.items()
    pos = sum(m.values())
    print(f"{len(m)} marks in {marks.path}: {pos} interesting, {len(m) - pos} not")
    if args.rank:
        r = rank(index, m, args.rank)
        print(f"ranked by {r.method}:")
        for i, (row, s) in enumerate(zip(r.rows, r.scores, strict=True)):
            print(f"{i + 1:5d}  {index.object_id[row]}  {s:.4f}")
        print("label next: " + ", ".join(str(index.object_id[row]) for row in r.suggest_rows))
        ids = [str(index.object_id[row]) for row in r.rows]
        table = export_table(index, ids, marks=m, scores=dict(zip(ids, r.scores.tolist(), strict=True)))
    else:
        table = export_table(index, list(m), marks=m)
    if args.export:
        print(f"{table.num_rows} rows -> {write_table(table, args.export)}", file=sys.stderr)
    return 0
