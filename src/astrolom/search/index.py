"""A FAISS similarity-search index over embeddings: `astrolom index --embeddings EMB --out IDX`, and its reader.

`astrolom.search.build` builds it (vectors streamed in chunks, the index kind chosen by size and memory budget,
map and outlier scores computed at build time; its docstring describes the vector space and the files) and
`astrolom.search.store` lays it out on disk as generations, switched with one atomic rename. `SearchIndex` opens
the live generation, checks it against its manifest, memory-maps the FAISS index and arrays (a second process
starts in seconds whatever the size), and answers batched queries.

    astrolom index --model runs/demo/run --data runs/demo/survey --out runs/demo/index   # embed (D4-pooled) + index
    astrolom index --embeddings runs/demo/embeddings.parquet --out runs/demo/index       # from existing embeddings
    astrolom index --embeddings released.npy --ids ids.parquet --id-column dr8_id --out IDX  # a released array
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from astrolom.config import comma_list
from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.eval.embeddings import MULTISCALE, EmbeddingTable  # noqa: F401  (EmbeddingTable re-exported)
from astrolom.eval.recipe import EmbeddingRecipe, recipe_of
from astrolom.log import get_logger
from astrolom.search import store
from astrolom.search.build import (  # noqa: F401  (re-exported: the index's public API lives here)
    EXACT_MAX,
    INDEX_FILE,
    KINDS,
    MAP_FILE,
    MEMORY_GB,
    META_FILE,
    OBJECTS_FILE,
    OUTLIER_K,
    REFINE,
    REFINE_K,
    REFINE_RERANK,
    RERANK,
    SCAN_MAX_MIB,
    apply_search_params,
    build_faiss,
    build_index,
    choose_kind,
    default_nlist,
    default_nprobe,
    factory_string,
    normalise,
    refine_fits,
    search_index,
    skipped_summary,
    standardise,
    standardiser,
)
from astrolom.search.vectors import npy_source

_log = get_logger(__name__)


@dataclass
class Neighbour:
    """One search result: the object, its cosine similarity to the query and its labels."""

    rank: int
    row: int
    object_id: str
    similarity: float
    split: str
    labels: dict

    def as_dict(self) -> dict:
        return {
            "rank": self.rank,
            "object_id": self.object_id,
            "similarity": round(float(self.similarity), 6),
            "split": self.split,
            "labels": self.labels,
        }


@dataclass
class _Space:
    """One searchable set of vectors: a FAISS index, the object row of each of its vectors, its standardisation."""

    index: object
    rows: np.ndarray | None  # FAISS id -> object row; None: the same (every object)
    stats: dict | None
    exact: np.ndarray | None = None  # ivfpq: the exact vectors (memory-mapped) for re-ranking and `vectors`
    rerank: int = 0
    direct_map: bool = False  # IVF indexes: made on first `vectors` call

    def ids_of(self, rows: np.ndarray, what: str) -> np.ndarray:
        """FAISS ids of object rows, or a ValueError when an object has no vector here."""
        if self.rows is None:
            return rows
        pos = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
        if len(rows) and not np.array_equal(self.rows[pos], rows):
            raise ValueError(f"object row {int(rows[self.rows[pos] != rows][0])} has no {what} embedding")
        return pos


class SearchIndex:
    """A loaded index: the live generation's FAISS index and arrays (memory-mapped), objects table and metadata.

    `path` is the index directory (where the user's files beside it, e.g. marks, live); `generation` the directory
    of the generation this reader opened: every file is read from it, so a rebuild never mixes into a reader."""

    def __init__(self, path: str | Path, *, mmap: bool = True):
        import faiss

        self.path = Path(path)
        self.generation = store.current_generation(self.path)
        self.manifest = store.verify_generation(self.generation)
        self.meta: dict = json.loads(self.file(META_FILE).read_text())
        for key in ("data", "embeddings", "embeddings_npy", "ids"):  # local paths are stored relative to the index
            if self.meta.get(key):
                self.meta[key] = _resolve(self.meta[key], self.path)
        for holder in (self.meta, self.meta.get("recipe") or {}):  # the model: in the recipe (or flat, before it)
            if holder.get("model"):
                holder["model"] = _resolve(holder["model"], self.path)
        self.recipe: EmbeddingRecipe = recipe_of(self.meta)
        # IO_FLAG_MMAP maps only inverted lists; the _IFC variant (faiss >= 1.10) maps flat and HNSW storage too
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) if mmap else 0
        self._flags = flags
        # an index with in-RAM re-scoring copies (`refine`) opens mapped too; `make_resident` reads it whole later
        self.resident = not (mmap and self.meta.get("refine"))
        self._resident_lock = threading.Lock()
        self.index = faiss.read_index(str(self.file(INDEX_FILE)), flags)
        vectors = self._array(self.meta.get("vectors"))
        self._spaces: dict[str | None, _Space] = {
            None: _Space(self.index, None, self.meta.get("standardize"), vectors, int(self.meta.get("rerank", 0)))
        }
        apply_search_params(self.index, self.meta)
        self.objects = pq.read_table(self.file(OBJECTS_FILE))
        if self.objects.num_rows != self.index.ntotal:
            raise ValueError(
                f"{self.generation}: {OBJECTS_FILE} has {self.objects.num_rows} rows but the index {self.index.ntotal}"
            )
        self.object_id = np.asarray(self.objects.column("object_id").to_numpy(zero_copy_only=False), dtype=str)
        self.split = np.asarray(self.objects.column("split").to_numpy(zero_copy_only=False), dtype=str)
        self.label_names = [c for c in self.objects.column_names if c not in ("object_id", "split")]
        self._id_order: np.ndarray | None = None  # rows by sorted id, made on the first lookup by id
        # mapped now, so that they stay readable if a rebuild prunes this generation while the reader lives
        self._map = self._array(MAP_FILE if self.meta.get("map") else None)
        self._outliers = {int(k): self._array(e["file"]) for k, e in (self.meta.get("outliers") or {}).items()}

    def make_resident(self) -> float:
        """Read an index with in-RAM re-scoring copies (`refine`: IVF-PQ + SQ8, 5 GB at 8.6M x 512) whole into
        memory and switch searches to it; returns the seconds it took (0 when there is nothing to do).

        Until then searches run on the memory-mapped file: the same results, at a speed that hangs on the page cache
        (each query touches k_factor x k scattered rows). `astrolom serve` calls this in a background thread, so the
        map is served while the file is read; a one-shot `astrolom search` never needs it.
        """
        import faiss

        with self._resident_lock:
            if self.resident:
                return 0.0
            t0 = time.perf_counter()
            try:
                index = faiss.read_index(str(self.file(INDEX_FILE)), 0)
            except (OSError, RuntimeError) as e:  # e.g. a rebuild pruned this generation: stay on the mapped file
                _log.warning(
                    "%s: could not read the index into memory (%s); searching the mapped file", self.generation, e
                )
                return 0.0
            apply_search_params(index, self.meta)
            self._spaces[None] = dataclasses.replace(self._spaces[None], index=index, direct_map=False)
            self.index = index
            self.resident = True
            return time.perf_counter() - t0

    def file(self, name: str) -> Path:
        """Path of a file of the opened generation."""
        return self.generation / name

    def _array(self, name: str | None) -> np.ndarray | None:
        if not name:
            return None
        if name not in self.manifest["files"]:
            raise ValueError(f"{self.generation}: meta.json names {name}, which the manifest does not")
        return np.load(self.file(name), mmap_mode="r")

    def stored_outliers(self, k: int) -> np.ndarray | None:
        """The outlier scores for `k` computed at index time (or kept by `keep_outliers`), else None."""
        return self._outliers.get(int(k))

    def keep_outliers(self, k: int, scores: np.ndarray) -> None:
        """Keep scores computed after loading for the life of this reader (a generation is never rewritten)."""
        self._outliers[int(k)] = scores

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def modalities(self) -> list[str]:
        """Modalities with their own index (empty for an index of one embedding column)."""
        return list(self.meta.get("modalities") or {})

    @property
    def aligned(self) -> bool:
        """Whether the modalities share one space (an alignment run), so that cross-modal search means something."""
        return self.recipe.aligned and {IMAGES, SPECTRA} <= set(self.modalities)

    @property
    def main_modality(self) -> str:
        """What the `embedding` column (index.faiss) holds: images, or the joint embedding of a multimodal model."""
        return self.recipe.main_modality

    def space(self, modality: str | None = None) -> _Space:
        """The searchable vectors of a modality (None: the `embedding` column), loaded on first use."""
        if modality in self._spaces:
            return self._spaces[modality]
        entries = self.meta.get("modalities") or {}
        if modality not in entries:
            have = f"modalities {', '.join(entries)}" if entries else "one embedding column, no per-modality indexes"
            raise ValueError(
                f"{self.path} has no {modality} index ({have}); build it with `astrolom index --embeddings` from "
                f"embeddings with an embedding_{modality} column (`astrolom embed` of a multimodal model or of an "
                "alignment run)"
            )
        import faiss

        e = entries[modality]
        index = self.index if e["file"] == INDEX_FILE else faiss.read_index(str(self.file(e["file"])), self._flags)
        if index is not self.index:
            apply_search_params(index, e)
        rows = np.load(self.file(e["rows"])) if e.get("rows") else None
        self._spaces[modality] = _Space(index, rows, e.get("standardize"))
        return self._spaces[modality]

    def check_query(self, query: str, target: str) -> None:
        """A ValueError naming what is missing when this index cannot search `target` vectors with a `query` one."""
        self.space(target)
        if query != target and not self.aligned:
            raise ValueError(
                f"cross-modal search ({query} -> {target}) needs aligned embeddings, and {self.path} is not aligned "
                f"(its {', '.join(self.modalities) or self.main_modality} embeddings are separate spaces); index the "
                "output of `astrolom embed --model ALIGN_RUN` (an `astrolom align` run)"
            )

    def row_of(self, object_id: str) -> int:
        """Row of an object id; a ValueError naming the index if it is not there."""
        # a binary search in the ids' sort order: 8 bytes an object (a dict of 8.6M ids would take about 1 GB)
        if self._id_order is None:
            self._id_order = np.argsort(self.object_id, kind="stable")
        key = str(object_id)
        pos = int(np.searchsorted(self.object_id, key, sorter=self._id_order))
        row = int(self._id_order[pos]) if pos < len(self._id_order) else None
        if row is None or self.object_id[row] != key:
            close = [o for o in self.object_id[:100_000] if str(object_id) in o][:3]
            hint = f"; similar ids: {', '.join(close)}" if close else f"; ids look like {self.object_id[0]!r}"
            raise ValueError(f"object id {object_id!r} is not in the index {self.path} ({len(self)} objects){hint}")
        return row

    def labels_of(self, row: int) -> dict:
        """The label columns of one row (read from the Arrow table row by row: no column becomes Python objects)."""
        one = self.objects.select(self.label_names).slice(int(row), 1).to_pylist()[0] if self.label_names else {}
        return {name: _json_value(value) for name, value in one.items()}

    def label_values(self, name: str) -> np.ndarray:
        if name not in self.label_names:
            raise ValueError(f"no label {name!r} in the index; labels: {', '.join(self.label_names)}")
        col = self.objects.column(name)
        if pa.types.is_floating(col.type) or pa.types.is_integer(col.type) or pa.types.is_boolean(col.type):
            return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
        return np.asarray(col.to_pylist(), dtype=object)

    def vectors(self, rows: Sequence[int], modality: str | None = None) -> np.ndarray:
        """The stored (standardised, normalised) vectors of object `rows` in `modality` (None: the `embedding`
        column); exact for product-quantised indexes too (from their memory-mapped vectors.npy)."""
        import faiss

        space = self.space(modality)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise ValueError(f"rows out of range for an index of {len(self)} objects")
        ids = np.ascontiguousarray(space.ids_of(rows, modality or self.main_modality), dtype=np.int64)
        if space.exact is not None:
            return np.asarray(space.exact[ids], dtype=np.float32)
        if not space.direct_map and faiss.try_extract_index_ivf(space.index) is not None:
            faiss.extract_index_ivf(space.index).make_direct_map()
            space.direct_map = True
        return space.index.reconstruct_batch(ids) if len(ids) else np.zeros((0, space.index.d), np.float32)

    def prepare(self, embeddings: np.ndarray, modality: str | None = None) -> np.ndarray:
        """Raw embeddings (as `astrolom embed` writes them) -> the standardised, normalised vectors the index holds."""
        return normalise(standardise(np.atleast_2d(embeddings), self.space(modality).stats))

    def search_vectors(
        self, queries: np.ndarray, k: int = 10, *, prepared: bool = False, target: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (Q, k), object rows (Q, k)) of the k nearest stored vectors to each query (rows -1 where
        fewer), among the `target` modality's vectors (None: the `embedding` column).

        queries: raw embeddings, or (prepared=True) vectors already in the index's space, e.g. from `vectors`.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        space = self.space(target)
        q = normalise(np.atleast_2d(queries)) if prepared else self.prepare(queries, target)
        if q.shape[1] != space.index.d:
            raise ValueError(f"query vectors have {q.shape[1]} dimensions but the index holds {space.index.d}")
        sims, ids = search_index(space.index, q, min(k, int(space.index.ntotal)), space.exact, space.rerank)
        if space.rows is not None:
            ids = np.where(ids >= 0, space.rows[np.maximum(ids, 0)], -1)
        return sims, ids

    def neighbours(
        self,
        queries: np.ndarray,
        k: int = 10,
        exclude: Sequence[int] | None = None,
        *,
        prepared: bool = False,
        target: str | None = None,
    ) -> list[list[Neighbour]]:
        """Neighbours of each query (raw embeddings unless prepared) among the `target` modality's vectors;
        `exclude[i]` (a row) is left out of query i's results (the query itself)."""
        extra = 1 if exclude is not None else 0
        sims, rows = self.search_vectors(queries, k + extra, prepared=prepared, target=target)
        out = []
        for i in range(len(rows)):
            hits = []
            for s, r in zip(sims[i], rows[i], strict=True):
                if r < 0 or (exclude is not None and r == exclude[i]):
                    continue
                hits.append(self._hit(len(hits) + 1, int(r), float(s)))
            out.append(hits[:k])
        return out

    def neighbours_of_id(
        self, object_id: str, k: int = 10, *, query: str | None = None, target: str | None = None
    ) -> list[Neighbour]:
        """The k nearest other objects to a stored object: its `query` vector among the `target` vectors (None: the
        `embedding` column). Across modalities the object itself stays in the results (its own partner)."""
        row = self.row_of(object_id)
        q = self.vectors([row], query)
        exclude = [row] if query == target else None
        return self.neighbours(q, k, exclude=exclude, prepared=True, target=target)[0]

    def _hit(self, rank: int, row: int, sim: float) -> Neighbour:
        return Neighbour(rank, row, str(self.object_id[row]), sim, str(self.split[row]), self.labels_of(row))

    def map_coords(self) -> np.ndarray | None:
        """(N, 2) map computed at index time (memory-mapped), or None when built with `--map none`."""
        return self._map


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v


def _resolve(path: str, root: Path) -> str:
    """A path recorded in meta.json as absolute: relative ones are relative to the index directory; URLs as is."""
    if "://" in path or path.startswith("hf:") or Path(path).is_absolute():
        return path
    return str((root / path).resolve())


def load_index(path: str | Path, *, mmap: bool = True) -> SearchIndex:
    """Open an index directory written by `build_index` (the FAISS file memory-mapped unless mmap=False)."""
    return SearchIndex(path, mmap=mmap)


# ----------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--embeddings",
        help="embedding Parquet file or directory of per-rank parts (`astrolom embed`), or an (N, D) .npy with --ids",
    )
    src.add_argument(
        "--model",
        help="embed --data with this model (multi-scale and symmetry-pooled by default) or alignment run first, "
        "then index",
    )
    parser.add_argument("--out", required=True, help="index directory to write")
    parser.add_argument(
        "--no-symmetrize", action="store_true", help="with --model: plain (orientation-aware) embeddings"
    )
    parser.add_argument(
        "--scales",
        default=",".join(map(str, MULTISCALE)),
        help="with --model: central token counts of the multi-scale embedding (default 4,16,64: a fresh-noise or "
        "rotated copy is found 0.96 of the time vs 0.85 for one 64-token mean; `none`: the paper's single mean)",
    )
    parser.add_argument("--splits", default="train,val,test", help="with --model: splits to embed")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="with --model: skip unreadable records (counted in meta.json `skipped`) instead of failing",
    )
    parser.add_argument(
        "--ids",
        default=None,
        help="with --embeddings FILE.npy: Parquet or CSV whose row i names row i of the array (its other columns "
        "become labels)",
    )
    parser.add_argument("--id-column", default=None, help="with --ids: the id column (default object_id)")
    parser.add_argument(
        "--memory-gb",
        type=float,
        default=MEMORY_GB,
        help=f"memory budget for the index's vectors (default {MEMORY_GB:g}): --kind auto keeps float32 vectors "
        f"(IVF-Flat) while they fit and a query scans at most {SCAN_MAX_MIB} MiB of them, else product quantisation "
        "(IVF-PQ) re-scored by 8-bit copies in RAM while those fit, beyond that by exact vectors read from disk",
    )
    parser.add_argument(
        "--outlier-k",
        default=",".join(map(str, OUTLIER_K)),
        help="k of the outlier scores computed and stored with the index (comma-separated; `none`: skip)",
    )
    parser.add_argument("--kind", choices=KINDS, default="auto", help="index kind (default: chosen by size)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists scanned per query (default ~1.5%%)")
    parser.add_argument("--ef-search", type=int, default=128, help="HNSW search breadth")
    parser.add_argument(
        "--map",
        choices=("umap", "pca", "none"),
        default="umap",
        help="2-D map for the explorer, fit on at most 200k objects and applied to the rest in chunks",
    )
    parser.add_argument("--data", default=None, help="data set with the cutouts (default: the one embedded)")
    parser.add_argument(
        "--raw-cosine", action="store_true", help="cosine of the raw embeddings (default: of standardised ones)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    embeddings = args.embeddings
    if args.model and not args.data:
        raise ValueError("--model needs --data (the data set to embed)")
    is_npy = bool(embeddings) and Path(embeddings).suffix.lower() == ".npy"
    if is_npy != bool(args.ids):
        raise ValueError(
            "--ids goes with --embeddings FILE.npy (a bare array has no object ids)" if is_npy
            else "--ids is only for --embeddings FILE.npy (Parquet embeddings carry their ids)"
        )  # fmt: skip
    if is_npy:
        embeddings = npy_source(embeddings, args.ids, args.id_column)
    outlier_k = () if args.outlier_k.strip().lower() == "none" else comma_list(args.outlier_k, int, "--outlier-k")
    if args.model:
        from astrolom.align.embed import embed_with
        from astrolom.align.encoder import load_encoder
        from astrolom.eval.embed import parse_scales

        encoder = load_encoder(args.model)
        # images-only models: multi-scale embeddings pooled over the 8 rotations/mirrors, so neither orientation nor
        # a new noise draw moves a galaxy away from itself (docs/embeddings.md); multimodal models and alignment
        # runs embed with their own readout, one index per modality
        plain = encoder.kind == "astropt"
        embeddings = embed_with(
            encoder,
            args.data,
            Path(args.out) / "embeddings.parquet",
            splits=list(comma_list(args.splits, name="--splits")),
            symmetrize=plain and not args.no_symmetrize,
            scales=parse_scales(args.scales) if plain else None,
            skip_bad=args.skip_bad,
            progress=not args.no_progress,
        )
    build_index(
        embeddings,
        args.out,
        kind=args.kind,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        map_method=args.map,
        data=args.data,
        standardize=not args.raw_cosine,
        memory_gb=args.memory_gb,
        outlier_k=outlier_k,
        seed=args.seed,
        progress=not args.no_progress,
    )
    return 0
