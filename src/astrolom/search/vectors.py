"""Embedding vectors as the index builder reads them: in chunks, from memory, a memory-mapped `.npy` or Parquet.

A `VectorSource` gives N raw vectors chunk by chunk (never all at once), a sorted sample of rows, its objects
table (object_id, split, labels) and the metadata of how the vectors were made. `_Prepared` views a source in
the index's space: each dimension standardised by statistics of the whole set, then each row L2-normalised.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from astrolom.data.records import METADATA_KEY
from astrolom.eval.embeddings import EmbeddingTable, _vectors, embedding_files
from astrolom.eval.recipe import EMBEDDING
from astrolom.log import progress as progress_bar

CHUNK = 65_536  # rows per pass step: 128 MiB of 512-d float32


# ------------------------------------------------------------------------------------------------- vector sources


class VectorSource:
    """N raw embedding vectors read in chunks, with their objects table (object_id, split, labels) and metadata."""

    name: str
    n: int
    dim: int
    metadata: dict

    def chunks(self, size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, (m, D) float32 block) over all rows in order."""
        raise NotImplementedError

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) float32 of sorted `rows` (a sample)."""
        out = np.empty((len(rows), self.dim), np.float32)
        for start, X in self.chunks():
            lo, hi = np.searchsorted(rows, [start, start + len(X)])
            out[lo:hi] = X[rows[lo:hi] - start]
        return out

    def objects(self) -> pa.Table:
        raise NotImplementedError


class ArraySource(VectorSource):
    """An (N, D) array, in memory or memory-mapped (a `.npy`), with its objects table."""

    def __init__(self, X: np.ndarray, objects: pa.Table, metadata: dict | None = None, name: str = "embeddings"):
        if X.ndim != 2:
            raise ValueError(f"{name}: expected an (N, D) array of vectors, got shape {X.shape}")
        if not np.issubdtype(X.dtype, np.floating):
            raise ValueError(f"{name}: expected floating-point vectors, got {X.dtype}")
        self.X, self._objects, self.metadata, self.name = X, objects, metadata or {}, name
        self.n, self.dim = X.shape

    def _array(self) -> np.ndarray:
        # a file-backed array is mapped afresh for each read and unmapped after it: pages read through one long-lived
        # map stay in this process's resident set, so reading 17 GB once would count 17 GB of RSS
        if isinstance(self.X, np.memmap) and self.X.filename:
            return np.load(self.X.filename, mmap_mode="r")
        return self.X

    def chunks(self, size: int | None = None):
        size = size or CHUNK
        for i in range(0, self.n, size):
            yield i, np.array(self._array()[i : i + size], dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        if isinstance(self.X, np.memmap) and self.X.filename:
            return read_rows(self.X, rows).astype(np.float32, copy=False)
        return np.array(self.X[rows], dtype=np.float32)

    def objects(self) -> pa.Table:
        return self._objects


def read_rows(X: np.memmap, rows: np.ndarray) -> np.ndarray:
    """Sorted `rows` of a file-backed (N, D) array, read with positioned reads (one per run of consecutive rows).

    Fancy indexing through a map makes the kernel map the cached pages around every row touched ("fault-around",
    64 kB by default), so a training sample of 1 row in 32 of a 17.6 GB file would put most of the file into this
    process's resident set (measured: 13.7 GiB peak RSS for an 8.6M x 512 build); reads land in the output only.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if X.ndim != 2 or not X.flags.c_contiguous:
        raise ValueError(f"{X.filename}: expected a C-ordered (N, D) array, got shape {X.shape}")
    out = np.empty((len(rows), X.shape[1]), X.dtype)
    if not len(rows):
        return out
    if rows[0] < 0 or rows[-1] >= len(X) or (np.diff(rows) <= 0).any():
        raise ValueError(f"{X.filename}: rows must be sorted, distinct and within 0..{len(X) - 1}")
    row_bytes = X.shape[1] * X.dtype.itemsize
    starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)  # the first index of each run
    ends = np.append(starts[1:], len(rows))
    buf = memoryview(out).cast("B")
    with open(X.filename, "rb", buffering=0) as f:
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            want, at = (b - a) * row_bytes, X.offset + int(rows[a]) * row_bytes
            got = os.preadv(f.fileno(), [buf[a * row_bytes : b * row_bytes]], at)
            if got != want:
                raise ValueError(f"{X.filename}: short read at byte {at} (the file is truncated?)")
    return out


class ParquetSource(VectorSource):
    """The `embedding` column of an embedding Parquet file or a directory of per-rank parts, one batch at a time."""

    def __init__(self, path: str | Path, column: str = EMBEDDING):
        self.name, self.column = str(path), column
        self.files = embedding_files(path)  # a file, or the finished parts of a parts directory
        schema = pq.read_schema(self.files[0])
        for col in ("object_id", "split", column):
            if col not in schema.names:
                raise ValueError(f"{self.files[0]} has no {col!r} column; was it written by `astrolom embed`?")
        raw = (schema.metadata or {}).get(METADATA_KEY)
        self.metadata = json.loads(raw) if raw else {}
        self.n = sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)
        first = next(self.chunks(1), None)
        if first is None:
            raise ValueError(f"{path}: no rows")
        self.dim = first[1].shape[1]

    def chunks(self, size: int | None = None):
        start, size = 0, size or CHUNK
        for f in self.files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=size, columns=[self.column]):
                X, present = _vectors(pa.chunked_array([batch.column(0)]))
                if not present.all():
                    raise ValueError(f"{f}: the {self.column!r} column is null for some objects")
                yield start, X
                start += len(X)

    def objects(self) -> pa.Table:
        keep = [n for n in pq.read_schema(self.files[0]).names if n != self.column and not n.startswith("embedding_")]
        tables = [pq.read_table(f, columns=keep) for f in self.files]
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def npy_source(vectors: str | Path, ids: str | Path, id_column: str | None = None) -> ArraySource:
    """A released `.npy` of embeddings (memory-mapped) with its ids from a Parquet or CSV file (row i = id i).

    The other columns of the ids file become labels (and `split`, when it has one)."""
    vectors, ids = Path(vectors), Path(ids)
    try:
        X = np.load(vectors, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{vectors}: cannot read as a .npy array ({err})") from err
    if X.ndim != 2 or not np.issubdtype(X.dtype, np.floating):
        raise ValueError(f"{vectors}: want an (N, D) float array of embeddings, got {X.dtype} {X.shape}")
    if not ids.is_file():
        raise FileNotFoundError(f"no ids file at {ids}")
    try:
        if ids.suffix.lower() in (".csv", ".gz") or ids.name.lower().endswith(".csv.gz"):
            from pyarrow import csv

            table = csv.read_csv(ids, convert_options=csv.ConvertOptions(strings_can_be_null=True))
        else:
            table = pq.read_table(ids)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"{ids}: cannot read as Parquet or CSV ({err})") from err
    column = id_column or "object_id"
    if column not in table.column_names:
        hint = "" if id_column else " (name it with --id-column)"
        raise ValueError(f"{ids} has no {column!r} column{hint}; its columns: {', '.join(table.column_names)}")
    if table.num_rows != len(X):
        raise ValueError(
            f"{vectors} holds {len(X)} embeddings but {ids} has {table.num_rows} ids: row i of the array must be "
            "id i of the table"
        )
    if table.column(column).null_count:
        raise ValueError(f"{ids}: the {column!r} column has {table.column(column).null_count} empty ids")
    object_id = pc.cast(table.column(column), pa.string())
    split = table.column("split") if "split" in table.column_names else pa.array(["all"] * table.num_rows)
    cols = {"object_id": object_id, "split": pc.cast(split, pa.string())}
    for name in table.column_names:
        if name not in (column, "split", "object_id"):
            cols[name] = table.column(name)
    meta = {"embeddings_npy": str(vectors.resolve()), "ids": str(ids.resolve())}
    return ArraySource(X, pa.table(cols), meta, name=str(vectors))


def _table_objects(table: EmbeddingTable) -> pa.Table:
    cols = {"object_id": pa.array(table.object_id.astype(str)), "split": pa.array(table.split.astype(str))}
    for name, values in table.labels.items():
        cols[name] = pa.array(values.tolist() if values.dtype == object else values)
    return pa.table(cols)


# ------------------------------------------------------------------------------------------------- the vector space


def normalise(x: np.ndarray) -> np.ndarray:
    """Float32, C-contiguous, each row scaled to unit length (zero rows stay zero)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    if x.ndim != 2:
        raise ValueError(f"expected a (N, D) array of vectors, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or infinity")
    faiss.normalize_L2(x)
    return x


def standardiser(X: np.ndarray | VectorSource, *, progress: bool = False) -> dict:
    """Per-dimension mean and standard deviation of a set of embeddings (float64 accumulation, in chunks)."""
    source = X if isinstance(X, VectorSource) else ArraySource(X, pa.table({}))
    mean, sq, n = np.zeros(source.dim), np.zeros(source.dim), 0
    with progress_bar(source.n, desc="statistics", unit="vec", enabled=progress) as bar:
        for start, c in source.chunks():
            _accumulate(source, start, c, mean, sq)
            n += len(c)
            bar.update(len(c))
    mean /= n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0))
    std[std < 1e-12 * max(std.max(), 1e-30)] = 1.0  # constant dimensions: leave them unscaled
    return {"mean": mean.astype(np.float32).tolist(), "std": std.astype(np.float32).tolist()}


def _accumulate(source: VectorSource, start: int, c: np.ndarray, mean: np.ndarray, sq: np.ndarray) -> None:
    c = c.astype(np.float64)
    if not np.isfinite(c).all():
        bad = start + int(np.flatnonzero(~np.isfinite(c).all(1))[0])
        raise ValueError(f"{source.name}: the vector of row {bad} holds NaN or infinity")
    mean += c.sum(0)
    sq += (c * c).sum(0)


def standardise(X: np.ndarray, stats: dict | None) -> np.ndarray:
    """Apply `standardiser` statistics (no-op for None)."""
    if not stats:
        return X
    mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
    X = np.atleast_2d(np.asarray(X, dtype=np.float32))
    if X.shape[1] != len(mean):
        raise ValueError(f"query vectors have {X.shape[1]} dimensions but the index holds {len(mean)}")
    return (X - mean) / std


class _Prepared:
    """A source seen through the index's space: standardised, then L2-normalised, chunk by chunk."""

    def __init__(self, source: VectorSource, stats: dict | None):
        self.source, self.stats, self.n, self.dim = source, stats, source.n, source.dim

    def chunks(self, size: int | None = None):
        for start, X in self.source.chunks(size):  # size None: the module's CHUNK
            yield start, normalise(standardise(X, self.stats))

    def take(self, rows: np.ndarray) -> np.ndarray:
        return normalise(standardise(self.source.take(rows), self.stats))
