"""The embedding table on disk: `EmbeddingWriter` writes it, `load_embeddings` reads it, `split_rows` splits it.

One Parquet row per object: `object_id`, `split`, every label column of the data, and `embedding`
(fixed-size list<float32>). A multimodal model's file (`astrolom.eval.multimodal`) and an alignment's
(`astrolom embed --model ALIGN`, `astrolom eval-align`) add one column per modality, `embedding_<name>`, null where
the object lacks it; they are read into `EmbeddingTable.modalities` (NaN rows where absent), never taken for labels.
`load_embedding_columns` reads several of them on the objects that have every one. The file metadata key
`astrolom` holds JSON describing how the embeddings were made (model, layer, token count, data, split settings).
Under torchrun every rank writes its own part, `EMB.parquet/part-<rank>.parquet`; `load_embeddings` reads a file
or such a directory alike.

This module is the bottom of `astrolom.eval`: it imports nothing else from the package but the record type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from astrolom.data.records import METADATA_KEY, Record

# multi-scale embeddings (`astrolom.eval.embed`): means over the central 2x2, 4x4 and 8x8 patches; what `astrolom
# index --model` embeds with by default (here, beside the table format, so the index need not import torch)
MULTISCALE = (4, 16, 64)

EMBEDDING = "embedding"  # the column that holds the vectors
EMBEDDING_PREFIX = "embedding_"  # per-modality vectors: embedding_images, embedding_spectra, embedding_joint
_KEY_COLUMNS = ("object_id", "split")


@dataclass
class EmbeddingTable:
    """Embeddings with their object ids, splits and labels (one row per object)."""

    object_id: np.ndarray  # (N,) str
    split: np.ndarray  # (N,) str
    X: np.ndarray  # (N, D) float32
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    modalities: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N, D_m), NaN rows where absent

    def __len__(self) -> int:
        return len(self.object_id)

    def select(self, mask: np.ndarray) -> EmbeddingTable:
        """The rows `mask` (booleans or indices) selects."""
        return EmbeddingTable(
            self.object_id[mask],
            self.split[mask],
            self.X[mask],
            {k: v[mask] for k, v in self.labels.items()},
            self.metadata,
            {k: v[mask] for k, v in self.modalities.items()},
        )

    def rows_of(self, object_ids: np.ndarray) -> np.ndarray:
        """Rows of `X` in the order of `object_ids` (every id must be present)."""
        index = {oid: i for i, oid in enumerate(self.object_id)}
        missing = [oid for oid in object_ids if oid not in index]
        if missing:
            raise ValueError(f"{len(missing)} objects (e.g. {missing[0]!r}) have no row in this embedding table")
        return self.X[[index[oid] for oid in object_ids]]


def is_embedding_column(name: str) -> bool:
    """`embedding` and every `embedding_*` column hold vectors, never labels."""
    return name == EMBEDDING or name.startswith(EMBEDDING_PREFIX)


def _files(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"no embeddings at {path}")
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path} holds no .parquet files")
    return files


def embedding_columns(path: str | Path) -> list[str]:
    """The vector columns of an embedding file, in file order (reads the schema only)."""
    return [n for n in pq.read_schema(_files(Path(path))[0]).names if is_embedding_column(n)]


def choose_columns(available: list[str], columns: str | list[str] = "auto") -> list[str]:
    """The columns to probe: "auto" is every `embedding_*` column (or `embedding` when it is the only one);
    otherwise a list (or comma-separated string) of names, each of which must be present."""
    if columns == "auto":
        chosen = [c for c in available if c.startswith(EMBEDDING_PREFIX)] or [c for c in available if c == EMBEDDING]
        if not chosen:
            raise ValueError(f"no embedding columns; the file has {available}")
        return chosen
    chosen = [c.strip() for c in columns.split(",")] if isinstance(columns, str) else list(columns)
    chosen = [c for c in chosen if c]
    missing = [c for c in chosen if c not in available]
    if missing or not chosen:
        raise ValueError(f"no embedding column(s) {missing or chosen}; the file has {available}")
    return chosen


def load_embeddings(path: str | Path, column: str = EMBEDDING) -> EmbeddingTable:
    """Read an embedding Parquet file, or a directory of per-rank parts (`astrolom embed` under torchrun).

    `column` picks the vectors (default `embedding`); rows where it is null are left out.
    """
    return load_embedding_columns(path, [column])[column]


def load_embedding_columns(path: str | Path, columns: list[str]) -> dict[str, EmbeddingTable]:
    """{column: table} for several vector columns, all on the same rows: those where every column is present.

    The tables share object ids, splits, labels and metadata; only `X` differs.
    """
    path = Path(path)
    files = _files(path)
    tables = [pq.read_table(f) for f in files]
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    for col in (*columns, *_KEY_COLUMNS):
        if col not in table.column_names:
            raise ValueError(f"{path} has no {col!r} column; was it written by `astrolom embed`?")
    vectors = {c: _vectors(table.column(c)) for c in columns}
    if EMBEDDING in vectors and not vectors[EMBEDDING][1].all():  # the main column is never legitimately null
        raise ValueError(f"{path}: the {EMBEDDING!r} column is null for some objects")
    keep = np.ones(len(table), dtype=bool)
    for _, present in vectors.values():
        keep &= present
    meta_raw = (tables[0].schema.metadata or {}).get(METADATA_KEY)
    types = {f.name: f.type for f in table.schema}
    modal = [
        n
        for n in table.column_names
        if n.startswith(EMBEDDING_PREFIX) and (pa.types.is_list(types[n]) or pa.types.is_fixed_size_list(types[n]))
    ]
    labels = {
        name: _column_to_numpy(table.column(name))[keep]
        for name in table.column_names
        if not is_embedding_column(name) and name not in _KEY_COLUMNS
    }
    object_id = np.asarray(table.column("object_id").to_pylist(), dtype=str)[keep]
    split = np.asarray(table.column("split").to_pylist(), dtype=str)[keep]
    metadata = json.loads(meta_raw) if meta_raw else {}
    modalities = {
        n.removeprefix(EMBEDDING_PREFIX): (vectors[n][0] if n in vectors else _vectors(table.column(n))[0])[keep]
        for n in modal
    }
    return {c: EmbeddingTable(object_id, split, X[keep], labels, metadata, modalities) for c, (X, _) in vectors.items()}


def _vectors(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """((N, D) float32 with NaN rows where null, (N,) bool present) of a list<float> column."""
    col = col.combine_chunks()
    present = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    if not present.any():
        raise ValueError(f"embedding column of type {col.type} holds no vectors")
    dim = col.type.list_size if pa.types.is_fixed_size_list(col.type) else len(col[int(np.argmax(present))].as_py())
    X = np.full((len(col), dim), np.nan, dtype=np.float32)
    X[present] = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    return X, present


def _column_to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls become NaN
    if pa.types.is_boolean(col.type):
        return np.asarray([np.nan if v is None else float(v) for v in col.to_pylist()])
    return np.asarray(["" if v is None else str(v) for v in col.to_pylist()], dtype=object)


def split_rows(table: EmbeddingTable, fit_split: str, test_split: str) -> tuple[EmbeddingTable, EmbeddingTable]:
    """The fit and test parts of a table; an empty part is an error naming the splits the table holds."""
    fit, test = table.select(table.split == fit_split), table.select(table.split == test_split)
    for name, part in ((fit_split, fit), (test_split, test)):
        if len(part) == 0:
            have = sorted(set(table.split.tolist()))
            raise ValueError(f"no objects in split {name!r}; the embeddings hold splits {have}")
    return fit, test


def output_path(out: str | Path, rank: int, world_size: int) -> Path:
    """EMB.parquet for one process; EMB.parquet/part-<rank>.parquet (a directory) under torchrun."""
    out = Path(out)
    if world_size > 1:
        return out / f"part-{rank:05d}.parquet"
    return out


class EmbeddingWriter:
    """Parquet writer for embedding rows; the schema is fixed by the first batch (labels keep their types)."""

    def __init__(self, path: str | Path, metadata: dict):
        self.path = Path(path)
        self.metadata = metadata
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self.rows = 0

    def write(self, records: list[Record], embeddings: np.ndarray) -> None:
        dim = embeddings.shape[1]
        cols: dict[str, pa.Array] = {
            "object_id": pa.array([str(r.object_id) for r in records], pa.string()),
            "split": pa.array([r.split for r in records], pa.string()),
        }
        names = self._schema.names[2:-1] if self._schema is not None else _label_names(records)
        for name in names:
            values = [r.labels.get(name) for r in records]
            typ = self._schema.field(name).type if self._schema is not None else None
            cols[name] = pa.array(values, type=typ) if typ is not None else _infer(values)
        flat = pa.array(embeddings.reshape(-1), pa.float32())
        cols[EMBEDDING] = pa.FixedSizeListArray.from_arrays(flat, dim)
        table = pa.table(cols)
        if self._writer is None:
            meta = {METADATA_KEY: json.dumps(dict(self.metadata, embedding_dim=dim)).encode()}
            self._schema = table.schema.with_metadata(meta)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, self._schema)
        self._writer.write_table(table.cast(self._schema))
        self.rows += len(records)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _label_names(records: list[Record]) -> list[str]:
    names: list[str] = []
    for r in records:
        names += [k for k in r.labels if k not in names and k not in (*_KEY_COLUMNS, EMBEDDING)]
    return names


def _infer(values: list) -> pa.Array:
    arr = pa.array([v.item() if isinstance(v, np.generic) else v for v in values])
    return arr.cast(pa.float64()) if pa.types.is_null(arr.type) else arr
