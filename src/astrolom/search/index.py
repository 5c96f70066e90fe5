"""A FAISS similarity-search index over embeddings: `astrolom index --embeddings EMB --out IDX`.

Similarity is the cosine of standardised embeddings: each dimension is centred and scaled by the mean and standard
deviation of the indexed set (stored in meta.json and applied to every query), then vectors are L2-normalised and
searched by inner product, so a score of 1 is the same direction and the distance `1 - score` lies in [0, 2].
Standardising first stops a few high-variance directions (overall brightness, size) from deciding every
neighbourhood, as the probes do: on the demo survey it lifts the outlier ranking's precision for stamps with a
contaminating star from 0.15 to 0.71 at the top 1% (base rate 0.12; see README). The index kind follows the size
(`--kind auto`):

- `flat` (exact, `IndexFlatIP`) up to 50k vectors: brute force is fast enough and never misses;
- `ivfflat` (`IVF{nlist},Flat`) up to 4 GiB of float32 vectors: k-means coarse quantiser with nlist ≈ sqrt(N)
  (a power of two) trained on a sample of 64 points per list, and `nprobe` lists scanned per query;
- `ivfpq` (`IVF{nlist},PQ{d/8}`) beyond that: 8-bit product quantisation, d/8 bytes per vector (64 B for 512-d),
  the only kind whose memory stays bounded for billions of vectors;
- `hnsw` (`HNSW32,Flat`) on request: the lowest latency at high recall, no training, but slow to build and ~1.2x
  the flat memory.

An index is a directory:

    IDX/index.faiss    the FAISS index (row i = row i of objects.parquet); memory-mapped on load (IO_FLAG_MMAP_IFC)
    IDX/objects.parquet object_id, split and every label column of the embeddings
    IDX/meta.json      kind, factory string, search settings, and where the vectors came from: the embedding file,
                       their `recipe` (`astrolom.eval.embeddings.EmbeddingRecipe`: the model that made them, with
                       which queries by new image or spectrum are embedded, its layer, tokens, scales, symmetry
                       pooling), the data set (cutouts for figures and the web explorer), and the records skipped
                       as bad while embedding (`skipped`: counts and entries)
    IDX/map.npy        (optional) 2-D map of the embeddings (UMAP) for the web explorer
    IDX/index-<m>.faiss, IDX/rows-<m>.npy
                       (embeddings with per-modality columns, `embedding_<m>`) one index per modality m over the
                       objects that have it (rows-<m>.npy: their rows of objects.parquet, absent when all do); a
                       modality whose vectors are the `embedding` column reuses index.faiss. meta.json `modalities`
                       lists them; an alignment run's recipe says they share one space (cross-modal search).
                       Aligned spaces are searched by the raw cosine, the similarity their heads were trained for:
                       z-scoring each modality on its own would move the two apart.

    astrolom index --model runs/demo/run --data runs/demo/survey --out runs/demo/index   # embed (D4-pooled) + index
    astrolom index --embeddings runs/demo/embeddings.parquet --out runs/demo/index       # from existing embeddings
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from astrolom.eval.embeddings import MULTISCALE, EmbeddingRecipe, EmbeddingTable, load_embeddings, recipe_of
from astrolom.log import get_logger
from astrolom.log import progress as progress_bar

_log = get_logger(__name__)

KINDS = ("auto", "flat", "ivfflat", "ivfpq", "hnsw")
INDEX_FILE, OBJECTS_FILE, META_FILE, MAP_FILE = "index.faiss", "objects.parquet", "meta.json", "map.npy"
EXACT_MAX = 50_000  # above this, an approximate index
IVFPQ_BYTES = 4 << 30  # above this much float32, product quantisation
TRAIN_PER_LIST = 64  # k-means training points per inverted list (faiss wants >= 39)
ADD_BATCH = 65_536
MAP_MAX_DEFAULT = 200_000


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


def choose_kind(n: int, dim: int) -> str:
    """The default index kind for n vectors of `dim` float32 (see the module docstring)."""
    if n <= EXACT_MAX:
        return "flat"
    return "ivfpq" if n * dim * 4 > IVFPQ_BYTES else "ivfflat"


def default_nlist(n: int) -> int:
    """Inverted lists for n vectors: sqrt(n) rounded to a power of two, within [16, 65536] and <= n / 39."""
    nlist = 2 ** round(math.log2(max(math.sqrt(n), 1)))
    return int(min(max(nlist, 16), 65536, max(16, n // 39)))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: ~1.5% of them, at least 16 (recall@10 >= 0.95 on clustered data, see BENCHMARKS)."""
    return int(min(nlist, max(16, nlist // 64)))


def factory_string(kind: str, n: int, dim: int) -> str:
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return "HNSW32,Flat"
    nlist = default_nlist(n)
    if kind == "ivfflat":
        return f"IVF{nlist},Flat"
    if kind == "ivfpq":
        m = next(m for m in (dim // 8, dim // 4, dim // 2, dim, 1) if m >= 1 and dim % m == 0)
        return f"IVF{nlist},PQ{m}"
    raise ValueError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")


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


def _apply_search_params(index, meta: dict) -> None:
    import faiss

    if "nprobe" in meta:
        faiss.extract_index_ivf(index).nprobe = int(meta["nprobe"])
    if "ef_search" in meta:
        faiss.downcast_index(index).hnsw.efSearch = int(meta["ef_search"])


def build_faiss(
    X: np.ndarray,
    kind: str = "auto",
    *,
    nprobe: int | None = None,
    ef_search: int = 128,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = _log.info,
) -> tuple[object, dict]:
    """A trained and filled FAISS index of the L2-normalised rows of X; returns (index, settings for meta.json)."""
    import faiss

    X = normalise(X)
    n, dim = X.shape
    if n == 0:
        raise ValueError("no vectors to index")
    kind = choose_kind(n, dim) if kind == "auto" else kind
    factory = factory_string(kind, n, dim)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    settings: dict = {"kind": kind, "factory": factory, "dim": dim, "n": n, "metric": "cosine"}
    if kind in ("ivfflat", "ivfpq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        n_train = min(n, TRAIN_PER_LIST * ivf.nlist)
        if kind == "ivfpq":
            n_train = min(n, max(n_train, 256 * 39))  # the PQ codebooks (256 centroids each) need samples too
        sample = X[np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))]
        t0 = time.perf_counter()
        if log:
            log(f"training {factory} on a sample of {n_train} vectors ...")
        index.train(sample)
        settings["train_size"] = n_train
        settings["train_s"] = round(time.perf_counter() - t0, 2)
        settings["nprobe"] = int(nprobe or default_nprobe(ivf.nlist))
    if kind == "hnsw":
        # the faiss default (40) loses neighbours in tight clusters, where many distances are nearly equal
        faiss.downcast_index(index).hnsw.efConstruction = 200
        settings["ef_search"] = int(ef_search)
    t0 = time.perf_counter()
    with progress_bar(n, desc=f"index[{kind}]", unit="vec", enabled=progress) as bar:
        for i in range(0, n, ADD_BATCH):
            index.add(X[i : i + ADD_BATCH])
            bar.update(min(ADD_BATCH, n - i))
    settings["add_s"] = round(time.perf_counter() - t0, 2)
    _apply_search_params(index, settings)
    return index, settings


def standardiser(X: np.ndarray) -> dict:
    """Per-dimension mean and standard deviation of a set of embeddings (float64 accumulation, in chunks)."""
    n = len(X)
    mean = np.zeros(X.shape[1])
    sq = np.zeros(X.shape[1])
    for i in range(0, n, 65_536):
        c = np.asarray(X[i : i + 65_536], dtype=np.float64)
        mean += c.sum(0)
        sq += (c * c).sum(0)
    mean /= n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0))
    std[std < 1e-12 * max(std.max(), 1e-30)] = 1.0  # constant dimensions: leave them unscaled
    return {"mean": mean.astype(np.float32).tolist(), "std": std.astype(np.float32).tolist()}


def standardise(X: np.ndarray, stats: dict | None) -> np.ndarray:
    """Apply `standardiser` statistics (no-op for None)."""
    if not stats:
        return X
    mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
    X = np.atleast_2d(np.asarray(X, dtype=np.float32))
    if X.shape[1] != len(mean):
        raise ValueError(f"query vectors have {X.shape[1]} dimensions but the index holds {len(mean)}")
    return (X - mean) / std


def compute_map(X: np.ndarray, method: str = "umap", seed: int = 0, max_fit: int = MAP_MAX_DEFAULT) -> np.ndarray:
    """(N, 2) float32 map of the embeddings for display: UMAP (cosine), or PCA (fast, for tests and huge sets).

    UMAP is fit on at most `max_fit` rows (a fixed random sample) and the rest are placed with `transform`.
    """
    X = normalise(X)
    if method == "pca" or len(X) < 16:
        from sklearn.decomposition import PCA

        if len(X) < 3:
            return np.zeros((len(X), 2), np.float32)
        return PCA(2, random_state=seed).fit_transform(X).astype(np.float32)
    if method != "umap":
        raise ValueError(f"unknown map method {method!r}; choose umap, pca or none")
    import umap

    reducer = umap.UMAP(n_neighbors=15, min_dist=0.1, metric="cosine", random_state=seed, low_memory=True)
    if len(X) <= max_fit:
        return reducer.fit_transform(X).astype(np.float32)
    fit = np.random.default_rng(seed).choice(len(X), max_fit, replace=False)
    out = np.empty((len(X), 2), np.float32)
    out[fit] = reducer.fit_transform(X[fit])
    rest = np.setdiff1d(np.arange(len(X)), fit)
    for i in range(0, len(rest), 50_000):
        out[rest[i : i + 50_000]] = reducer.transform(X[rest[i : i + 50_000]])
    return out


def _objects_table(table: EmbeddingTable) -> pa.Table:
    cols = {"object_id": pa.array(table.object_id.astype(str)), "split": pa.array(table.split.astype(str))}
    for name, values in table.labels.items():
        cols[name] = pa.array(values.tolist() if values.dtype == object else values)
    return pa.table(cols)


def build_index(
    embeddings: str | Path | EmbeddingTable,
    out: str | Path,
    *,
    kind: str = "auto",
    nprobe: int | None = None,
    ef_search: int = 128,
    map_method: str = "umap",
    data: str | None = None,
    standardize: bool = True,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = _log.info,
) -> Path:
    """Build an index directory at `out` from an embedding file (or table); returns `out`.

    `data` overrides the data set recorded in the embeddings' metadata (where cutouts are read from).
    `standardize`: z-score each dimension before the cosine (see the module docstring); False: raw cosine.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    source = str(embeddings) if not isinstance(embeddings, EmbeddingTable) else None
    table = load_embeddings(embeddings) if source is not None else embeddings
    ids, counts = np.unique(table.object_id, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{source or 'embeddings'}: duplicate object ids, e.g. {ids[counts > 1][:3].tolist()}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    emb_meta = table.metadata or {}
    recipe = table.recipe
    aligned = recipe.aligned and {"images", "spectra"} <= set(table.modalities)
    if aligned and standardize:
        standardize = False
        if log:
            log("aligned embeddings: searched by the raw cosine of the shared space (not standardised)")
    stats = standardiser(table.X) if standardize else None
    X = standardise(table.X, stats)
    build = dict(nprobe=nprobe, ef_search=ef_search, seed=seed, progress=progress)
    index, settings = build_faiss(X, kind, **build)
    import faiss

    if log and recipe.encoder == "astropt" and recipe.model and not recipe.symmetrize:
        log(
            "note: these embeddings are not pooled over rotations/mirrors, so a rotated copy of a galaxy may not be "
            "its neighbour; `astrolom embed --symmetrize` (or `astrolom index --model`) makes them invariant"
        )
    meta = {
        **settings,
        "faiss_version": faiss.__version__,
        "embeddings": str(Path(source).resolve()) if source else None,
        "recipe": recipe.to_json(),  # read back with `recipe_of` (SearchIndex.recipe)
        "data": data or emb_meta.get("data"),
        "labels": list(table.labels),
        "standardize": stats,
        "skipped": skipped_summary(table.skipped),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if table.modalities:
        meta["modalities"] = {
            name: _build_modality(out, name, V, table.X, settings, stats, kind, standardize, build, log)
            for name, V in table.modalities.items()
        }
    _write_faiss(index, out / INDEX_FILE)
    pq.write_table(_objects_table(table), out / OBJECTS_FILE)
    if map_method != "none":
        if log:
            log(f"computing the 2-D map ({map_method}) of {len(table)} embeddings ...")
        np.save(out / MAP_FILE, compute_map(X, map_method, seed))
        meta["map"] = map_method
    meta["build_s"] = round(time.perf_counter() - t0, 2)
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    if log:
        log(
            f"indexed {settings['n']} vectors ({settings['factory']}, {settings['dim']}-d) "
            f"in {meta['build_s']} s -> {out}"
        )
    return out


def skipped_summary(skipped: list[dict], keep: int = 1000) -> dict:
    """meta.json's account of the records skipped as bad when the embeddings were made (`astrolom embed
    --skip-bad`): counts, and the first `keep` entries (all of them stay in the embedding files)."""
    return {
        "records": sum(e.get("dropped", "record") == "record" for e in skipped),
        "spectra": sum(e.get("dropped") == "spectrum" for e in skipped),
        "entries": skipped[:keep],
    }


def _write_faiss(index, path: Path) -> None:
    import faiss

    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)


def _build_modality(
    out: Path, name: str, V: np.ndarray, X: np.ndarray, main: dict, main_stats, kind, standardize, build, log
) -> dict:
    """The index of one modality column over the objects that have it; its meta.json entry."""
    rows = np.flatnonzero(~np.isnan(V).any(axis=1))
    if len(rows) == len(V) and np.array_equal(V, X):  # the `embedding` column itself: share its index
        return {"file": INDEX_FILE, "rows": None, "n": main["n"], "dim": main["dim"], "kind": main["kind"],
                "standardize": main_stats}  # fmt: skip
    if len(rows) == 0:
        raise ValueError(f"the embedding_{name} column is null for every object: nothing to index")
    stats = standardiser(V[rows]) if standardize else None
    index, settings = build_faiss(standardise(V[rows], stats), kind, log=log, **build)
    entry = {**settings, "file": f"index-{name}.faiss", "rows": None, "standardize": stats}
    _write_faiss(index, out / entry["file"])
    if len(rows) < len(V):
        entry["rows"] = f"rows-{name}.npy"
        np.save(out / entry["rows"], rows.astype(np.int64))
    if log:
        log(f"indexed {len(rows)} {name} vectors ({settings['factory']}, {settings['dim']}-d)")
    return entry


@dataclass
class _Space:
    """One searchable set of vectors: a FAISS index, the object row of each of its vectors, its standardisation."""

    index: object
    rows: np.ndarray | None  # FAISS id -> object row; None: the same (every object)
    stats: dict | None
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
    """A loaded index directory: the FAISS index (memory-mapped), the objects table and the metadata."""

    def __init__(self, path: str | Path, *, mmap: bool = True):
        import faiss

        self.path = Path(path)
        for name in (INDEX_FILE, OBJECTS_FILE, META_FILE):
            if not (self.path / name).is_file():
                raise FileNotFoundError(
                    f"{self.path} is not an astrolom index (no {name}); build one with `astrolom index`"
                )
        self.meta: dict = json.loads((self.path / META_FILE).read_text())
        # IO_FLAG_MMAP maps only inverted lists; the _IFC variant (faiss >= 1.10) maps flat and HNSW storage too
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) if mmap else 0
        self._flags = flags
        self.index = faiss.read_index(str(self.path / INDEX_FILE), flags)
        self._spaces: dict[str | None, _Space] = {None: _Space(self.index, None, self.meta.get("standardize"))}
        _apply_search_params(self.index, self.meta)
        self.objects = pq.read_table(self.path / OBJECTS_FILE)
        if self.objects.num_rows != self.index.ntotal:
            raise ValueError(
                f"{self.path}: {OBJECTS_FILE} has {self.objects.num_rows} rows but the index {self.index.ntotal}"
            )
        self.object_id = np.asarray(self.objects.column("object_id").to_pylist(), dtype=str)
        self.split = np.asarray(self.objects.column("split").to_pylist(), dtype=str)
        self.label_names = [c for c in self.objects.column_names if c not in ("object_id", "split")]
        self._row = {oid: i for i, oid in enumerate(self.object_id)}
        self._labels: dict[str, list] | None = None
        self.recipe: EmbeddingRecipe = recipe_of(self.meta)

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
        return self.recipe.aligned and {"images", "spectra"} <= set(self.modalities)

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
        index = self.index if e["file"] == INDEX_FILE else faiss.read_index(str(self.path / e["file"]), self._flags)
        if index is not self.index:
            _apply_search_params(index, e)
        rows = np.load(self.path / e["rows"]) if e.get("rows") else None
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
        row = self._row.get(str(object_id))
        if row is None:
            close = [o for o in self.object_id[:100_000] if str(object_id) in o][:3]
            hint = f"; similar ids: {', '.join(close)}" if close else f"; ids look like {self.object_id[0]!r}"
            raise ValueError(f"object id {object_id!r} is not in the index {self.path} ({len(self)} objects){hint}")
        return row

    def labels_of(self, row: int) -> dict:
        if self._labels is None:
            self._labels = {name: self.objects.column(name).to_pylist() for name in self.label_names}
        return {name: _json_value(values[row]) for name, values in self._labels.items()}

    def label_values(self, name: str) -> np.ndarray:
        if name not in self.label_names:
            raise ValueError(f"no label {name!r} in the index; labels: {', '.join(self.label_names)}")
        col = self.objects.column(name)
        if pa.types.is_floating(col.type) or pa.types.is_integer(col.type) or pa.types.is_boolean(col.type):
            return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
        return np.asarray(col.to_pylist(), dtype=object)

    def vectors(self, rows: Sequence[int], modality: str | None = None) -> np.ndarray:
        """The stored (standardised, normalised) vectors of object `rows` in `modality` (None: the `embedding`
        column); approximate for product-quantised indexes."""
        import faiss

        space = self.space(modality)
        if not space.direct_map and faiss.try_extract_index_ivf(space.index) is not None:
            faiss.extract_index_ivf(space.index).make_direct_map()
            space.direct_map = True
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise ValueError(f"rows out of range for an index of {len(self)} objects")
        ids = np.ascontiguousarray(space.ids_of(rows, modality or self.main_modality), dtype=np.int64)
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
        sims, ids = space.index.search(q, min(k, int(space.index.ntotal)))
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
        f = self.path / MAP_FILE
        return np.load(f, mmap_mode="r") if f.is_file() else None


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v


def load_index(path: str | Path, *, mmap: bool = True) -> SearchIndex:
    """Open an index directory written by `build_index` (the FAISS file memory-mapped unless mmap=False)."""
    return SearchIndex(path, mmap=mmap)


# ----------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--embeddings", help="embedding Parquet file or directory (`astrolom embed`)")
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
    parser.add_argument("--kind", choices=KINDS, default="auto", help="index kind (default: chosen by size)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists scanned per query (default ~1.5%%)")
    parser.add_argument("--ef-search", type=int, default=128, help="HNSW search breadth")
    parser.add_argument("--map", choices=("umap", "pca", "none"), default="umap", help="2-D map for the explorer")
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
            splits=[s.strip() for s in args.splits.split(",") if s.strip()],
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
        seed=args.seed,
        progress=not args.no_progress,
    )
    return 0
