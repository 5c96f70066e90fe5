"""The embedding table on disk: `EmbeddingWriter` writes it, `load_embeddings` reads it, `recipe_of`
(`astrolom.eval.recipe`) says how it was made, `split_rows` splits it.

One Parquet row per object: `object_id`, `split`, every label column of the data, and `embedding`
(fixed-size list<float32>). A multimodal model's file (`astrolom.eval.multimodal`) and an alignment's
(`astrolom embed --model ALIGN`, `astrolom eval-align`) add one column per modality, `embedding_<name>`, null where
the object lacks it; they are read into `EmbeddingTable.modalities` (NaN rows where absent), never taken for labels.
`load_embedding_columns` reads several of them on the objects that have every one.

The file metadata key `astrolom` holds JSON: `recipe`, the `EmbeddingRecipe` (`astrolom.eval.recipe`: everything a new
object's embedding depends on), plus provenance (data, splits, split settings, creation time). Records skipped as bad
(`astrolom embed --skip-bad`) are listed in each file's footer (`astrolom.skipped`), read into `EmbeddingTable.skipped`.

On disk an embedding set is one file (`EMB.parquet`), or a directory of parts (`--part-rows`, and always under
torchrun): `part-<rank>-<seq>.parquet`, each written to a temporary name and renamed when complete, and one
`progress-<rank>.json` per rank naming its finished parts, the stream position after them, and whether the rank is
done. A killed job resumes from the progress files (`astrolom embed --resume`); readers take only the listed parts
and refuse a set whose ranks have not all finished. Directories of plain `*.parquet` parts (older torchrun output)
still read.

Labels: every label any record carries becomes a column, null where a record lacks it (a label such as
`spectrum_coverage` or an SDSS `redshift` may first appear after many rows). A label first seen after rows were
written widens the file: the rows so far are copied, row group by row group, into a new temporary file with the
column added (logged). A part continues the label columns of the part before it; readers fill columns a part lacks
with nulls. A label whose values change type (text after numbers) is an error naming the label and the record.

This module is the bottom of `astrolom.eval`: it imports nothing else from the package but the recipe, the record
type, the comma-list parser, the atomic-write helpers and the logger.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from astrolom.config import comma_list
from astrolom.data.records import METADATA_KEY, Record
from astrolom.eval.recipe import EMBEDDING, EMBEDDING_PREFIX, EmbeddingRecipe, recipe_of
from astrolom.layout import atomic_write_text
from astrolom.log import get_logger

log = get_logger(__name__)

# multi-scale embeddings (`astrolom.eval.embed`): means over the central 2x2, 4x4 and 8x8 patches; what `astrolom
# index --model` embeds with by default (here, beside the table format, so the index need not import torch)
MULTISCALE = (4, 16, 64)

SKIPPED_KEY = b"astrolom.skipped"  # footer key: JSON list of the records skipped as bad while writing the file
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
    skipped: list[dict] = field(default_factory=list)  # records skipped as bad when the embeddings were written

    @property
    def recipe(self) -> EmbeddingRecipe:
        return recipe_of(self.metadata)

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
            self.skipped,
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
    if not path.is_dir():
        return [path]
    progress = sorted(path.glob(PROGRESS_GLOB))
    files = _finished_parts(path, progress) if progress else sorted(path.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .parquet files")
    return files


def _finished_parts(path: Path, progress: list[Path]) -> list[Path]:
    """The parts listed by the progress files of a parts directory; an error unless every rank has finished."""
    states = [read_progress(p) for p in progress]
    world = {s["world_size"] for s in states}
    if len(world) > 1:
        raise ValueError(f"{path}: progress files of runs with different world sizes {sorted(world)}")
    ranks = sorted(s["rank"] for s in states)
    missing = sorted(set(range(world.pop())) - set(ranks))
    unfinished = [s for s in states if not s.get("done")]
    if missing or unfinished:
        which = [f"rank {r} never started" for r in missing]
        which += [f"rank {s['rank']} stopped after {s['rows']} objects" for s in unfinished]
        raise ValueError(
            f"{path}: the embedding job has not finished ({'; '.join(which)}); continue it with "
            "`astrolom embed ... --resume` (same --out and world size)"
        )
    return [path / name for s in sorted(states, key=lambda s: s["rank"]) for name in s["parts"]]


def embedding_columns(path: str | Path) -> list[str]:
    """The vector columns of an embedding file, in file order (reads the schema only)."""
    return [n for n in pq.read_schema(_files(Path(path))[0]).names if is_embedding_column(n)]


def embedding_files(path: str | Path) -> list[Path]:
    """The Parquet files of an embedding set: the file itself, or the finished parts of a parts directory (an error
    while its job has not finished); what a reader streams through part by part."""
    return _files(Path(path))


def embedding_metadata(path: str | Path) -> dict:
    """The `astrolom` metadata of an embedding file or set (from any one of its files: every part has the same, so
    this reads a set whose other ranks are still writing)."""
    path = Path(path)
    first = min(path.glob("*.parquet"), default=None) if path.is_dir() else path
    if first is None or not first.exists():
        raise FileNotFoundError(f"no embeddings at {path}")
    raw = (pq.read_schema(first).metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def choose_columns(available: list[str], columns: str | list[str] = "auto") -> list[str]:
    """The columns to probe: "auto" is every `embedding_*` column (or `embedding` when it is the only one);
    otherwise a list (or comma-separated string) of names, each of which must be present."""
    if columns == "auto":
        chosen = [c for c in available if c.startswith(EMBEDDING_PREFIX)] or [c for c in available if c == EMBEDDING]
        if not chosen:
            raise ValueError(f"no embedding columns; the file has {available}")
        return chosen
    chosen = list(comma_list(columns, name="columns")) if isinstance(columns, str) else list(columns)
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
    table = _concat_parts(tables) if len(tables) > 1 else tables[0]
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
    skipped = [entry for f in files for entry in _skipped_of(f)]
    return {
        c: EmbeddingTable(object_id, split, X[keep], labels, metadata, modalities, skipped)
        for c, (X, _) in vectors.items()
    }


def _concat_parts(tables: list[pa.Table]) -> pa.Table:
    """Parts as one table: a label column a part lacks, or holds only nulls in, is null there and takes the type the
    other parts give it (integers widen to floats; a label null everywhere reads as float)."""
    untyped = []
    for t in tables:
        for i, name in enumerate(t.column_names):
            if not is_embedding_column(name) and name not in _KEY_COLUMNS and t[name].null_count == len(t):
                t = t.set_column(i, name, pa.nulls(len(t), pa.null()))
        untyped.append(t)
    table = pa.concat_tables(untyped, promote_options="permissive")
    for i, f in enumerate(table.schema):
        if pa.types.is_null(f.type):
            table = table.set_column(i, f.name, table[f.name].cast(pa.float64()))
    return table


def _skipped_of(file: Path) -> list[dict]:
    raw = (pq.ParquetFile(file).metadata.metadata or {}).get(SKIPPED_KEY)
    return json.loads(raw) if raw else []


def skipped_records(path: str | Path) -> list[dict]:
    """The records skipped as bad while writing an embedding file or parts directory (footers only, no vectors)."""
    return [entry for f in _files(Path(path)) for entry in _skipped_of(f)]


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


PROGRESS_GLOB = "progress-*.json"


def part_path(out: str | Path, rank: int, seq: int) -> Path:
    """Part `seq` of rank `rank` in a parts directory."""
    return Path(out) / f"part-{rank:05d}-{seq:05d}.parquet"


def progress_path(out: str | Path, rank: int) -> Path:
    return Path(out) / f"progress-{rank:05d}.json"


def read_progress(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable embedding progress file ({err})") from err
    for key in ("rank", "world_size", "parts", "rows"):
        if key not in state:
            raise ValueError(f"{path}: not an embedding progress file (no {key!r})")
    return state


def write_progress(out: str | Path, state: dict) -> None:
    """Replace a rank's progress file atomically (a reader sees the old state or the new one)."""
    atomic_write_text(progress_path(out, state["rank"]), json.dumps(state, indent=1))


Vectors = np.ndarray | dict[str, tuple[np.ndarray, np.ndarray | None]]


class EmbeddingWriter:
    """The one writer of embedding rows: Parquet written batch by batch to a temporary name, renamed on `close`.

    `write(records, vectors)` takes one (B, D) array for the `embedding` column, or {column: (vectors (B, D),
    present (B,) bool or None for all)} for several; `alias` names the column that `embedding` repeats (a
    multimodal model's joint one). Every label any record carries is a column, null where a record lacks it; a label
    first seen after rows were written widens the file (module docstring). `labels` (name -> type, None while only
    nulls were seen) starts from the label columns of an earlier part; `label_types` is what this writer ends with.
    The metadata goes under the `astrolom` key with the embedding width. `close(skipped=...)` lists skipped records
    in the footer. A writer that never wrote, or is left by an exception (`with` block), leaves no file.
    """

    def __init__(
        self,
        path: str | Path,
        metadata: dict,
        alias: str | None = None,
        labels: dict[str, pa.DataType | None] | None = None,
    ):
        self.path = Path(path)
        self.metadata = metadata
        self.alias = alias
        self.label_types: dict[str, pa.DataType | None] = dict(labels or {})
        self._generation = 0  # of the temporary file: each widening writes the next
        self._tmp = self._tmp_name()
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self.rows = 0

    def _tmp_name(self) -> Path:
        return self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{self._generation}"

    def write(self, records: list[Record], vectors: Vectors) -> None:
        vecs = {EMBEDDING: (vectors, None)} if isinstance(vectors, np.ndarray) else dict(vectors)
        if self.alias is not None and self.alias in vecs:
            vecs = {EMBEDDING: vecs[self.alias], **vecs}
        if EMBEDDING not in vecs:
            raise ValueError(f"no {EMBEDDING!r} vectors among {sorted(vecs)}")
        cols: dict[str, pa.Array] = {
            "object_id": pa.array([str(r.object_id) for r in records], pa.string()),
            "split": pa.array([r.split for r in records], pa.string()),
        }
        for name in _label_names(records):
            self.label_types.setdefault(name, None)
        for name in self.label_types:
            cols[name] = self._label_column(name, records)
        for name in [EMBEDDING, *(n for n in vecs if n != EMBEDDING)]:
            values, present = vecs[name]
            flat = pa.array(np.asarray(values, np.float32).reshape(-1), pa.float32())
            mask = None if present is None else pa.array(~np.asarray(present, bool))
            cols[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=mask)
        table = pa.table(cols)
        if self._writer is None:
            dim = vecs[EMBEDDING][0].shape[1]
            meta = {METADATA_KEY: json.dumps(dict(self.metadata, embedding_dim=dim)).encode()}
            self._schema = table.schema.with_metadata(meta)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._tmp, self._schema)
        elif not table.schema.equals(self._schema):  # a new label column, or the first values of an all-null one
            self._widen(table.schema.with_metadata(self._schema.metadata))
        self._writer.write_table(table.cast(self._schema))
        self.rows += len(records)

    def _label_column(self, name: str, records: list[Record]) -> pa.Array:
        """One label of a batch, typed like the rows before it (floats where earlier values were all integers)."""
        values = [r.labels.get(name) for r in records]
        try:
            arr = pa.array([v.item() if isinstance(v, np.generic) else v for v in values])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise ValueError(
                f"{self.path}: label {name!r} mixes types within records {_ids(records)} ({err})"
            ) from None
        have = self.label_types[name]
        if pa.types.is_null(arr.type):
            return pa.nulls(len(arr), have or pa.float64())  # all-null columns are stored as float (read as NaN)
        if have is None or have == arr.type:
            self.label_types[name] = arr.type
            return arr
        if pa.types.is_integer(have) and pa.types.is_floating(arr.type):
            self.label_types[name] = pa.float64()  # the integer rows so far become floats when the file widens
            return arr
        if pa.types.is_floating(have) and pa.types.is_integer(arr.type):
            return arr.cast(have)
        first = next(r.object_id for r, v in zip(records, values, strict=True) if v is not None)
        raise ValueError(
            f"{self.path}: label {name!r} of record {first!r} is {arr.type}, but earlier records gave it as {have}"
        )

    def _widen(self, schema: pa.Schema) -> None:
        """Copy the rows written so far, row group by row group, into a new temporary file with `schema`."""
        added = [n for n in schema.names if n not in self._schema.names]
        log.info("%s: label column(s) %s widened at row %d; rewriting the rows so far", self.path, added or
                 [f.name for f in schema if f.type != self._schema.field(f.name).type], self.rows)  # fmt: skip
        self._writer.close()
        self._writer = None
        self._generation += 1
        old, new = self._tmp, self._tmp_name()
        writer = pq.ParquetWriter(new, schema)
        try:
            written = pq.ParquetFile(old)
            for i in range(written.num_row_groups):
                part = written.read_row_group(i)
                columns = [
                    part[f.name].cast(f.type) if f.name in part.column_names else pa.nulls(len(part), f.type)
                    for f in schema
                ]
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))
        except BaseException:
            writer.close()
            new.unlink(missing_ok=True)
            raise
        old.unlink()
        self._writer, self._tmp, self._schema = writer, new, schema

    def close(self, skipped: list[dict] | None = None) -> None:
        """Finish the file and rename it into place (nothing is written when no row was)."""
        if self._writer is None:
            return
        if skipped:
            self._writer.add_key_value_metadata({SKIPPED_KEY: json.dumps(skipped)})
        self._writer.close()
        self._writer = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop what was written; the target path is left as it was."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _label_names(records: list[Record]) -> list[str]:
    names: list[str] = []
    for r in records:
        names += [k for k in r.labels if k not in names and k not in _KEY_COLUMNS and not is_embedding_column(k)]
    return names


def _ids(records: list[Record], n: int = 3) -> str:
    """The first object ids of a batch, for messages."""
    return ", ".join(repr(str(r.object_id)) for r in records[:n]) + (", ..." if len(records) > n else "")
