"""Building an index: vectors streamed in chunks into FAISS, a 2-D map and outlier scores
(`astrolom.search.outlier_scores`), one new generation.

Similarity is the cosine of standardised embeddings: each dimension is centred and scaled by the mean and standard
deviation of the indexed set (stored in meta.json and applied to every query), then vectors are L2-normalised and
searched by inner product, so a score of 1 is the same direction and the distance `1 - score` lies in [0, 2].
Standardising first stops a few high-variance directions (overall brightness, size) from deciding every
neighbourhood, as the probes do: on the demo survey it lifts the outlier ranking's precision for stamps with a
contaminating star from 0.15 to 0.71 at the top 1% (base rate 0.12; see README).

Vectors are never all in memory: a `VectorSource` (an in-memory table, a memory-mapped `.npy`, or Parquet files
and per-rank parts read one record batch at a time) is read in passes of `CHUNK` rows: statistics, a training
sample, adding, the map, the outlier scores. The index kind follows the size and the memory budget
(`--kind auto`, `--memory-gb`, default 6 GiB):

- `flat` (exact, `IndexFlatIP`) up to 50k vectors: brute force is fast enough and never misses;
- `ivfflat` (`IVF{nlist},Flat`) while the float32 vectors fit the budget and a query's scan of `nprobe` lists
  reads at most `SCAN_MAX_MIB` of them: k-means coarse quantiser with nlist ≈ sqrt(N) (a power of two) trained on a
  sample of 64 points per list; the lists are sized before the add (grown by doubling they took twice the room);
- `ivfpq` (`IVF{nlist},PQ{d/8}`) beyond: 8-bit product quantisation, d/8 bytes per vector in memory (64 B for
  512-d). The `k_factor` x k best PQ candidates are re-scored: while d + d/8 bytes per vector fit the budget, by
  8-bit scalar-quantised copies held in RAM (`IVF{nlist},PQ{d/8},Refine(SQ8)`, FAISS's `IndexRefine`: 4.4 GB at
  8.6M x 512), whose latency does not depend on the page cache; beyond it, by the exact vectors in a
  memory-mapped `vectors.npy` (`rerank` x k, fast only while the pages read are cached);
- `hnsw` (`HNSW32,Flat`) on request: the lowest latency at high recall, no training, but slow to build.

The files of one generation (see `astrolom.search.store` for the directory layout):

    index.faiss         the FAISS index (row i = row i of objects.parquet); memory-mapped on load
    objects.parquet     object_id, split and every label column of the embeddings (or of the --ids file)
    meta.json           kind, factory string, search settings, standardisation, where the vectors came from: their
                        `recipe` (`astrolom.eval.recipe.EmbeddingRecipe`: the model, with which new images or
                        spectra are embedded, layer, tokens, scales, pooling), the data set (local paths relative
                        to the index directory), the records skipped as bad while embedding (`skipped`)
    map.npy             (N, 2) map for the web explorer (UMAP or PCA fit on a sample, applied in chunks)
    outliers-k<k>.npy   (N,) k-th neighbour cosine distance (`astrolom.search.outliers`), computed here in chunks
    vectors.npy         (ivfpq) the exact standardised, normalised vectors, for re-ranking
    index-<m>.faiss, rows-<m>.npy
                        (embeddings with per-modality columns, `embedding_<m>`) one index per modality m over the
                        objects that have it (rows-<m>.npy: their rows of objects.parquet, absent when all do); a
                        modality whose vectors are the `embedding` column reuses index.faiss. meta.json `modalities`
                        lists them; an alignment run's recipe says they share one space (cross-modal search).
                        Aligned spaces are searched by the raw cosine, the similarity their heads were
                        trained for: z-scoring each modality on its own would move the two apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from astrolom.data.modalities import ALL
from astrolom.eval.embeddings import EmbeddingTable, embedding_columns, load_embeddings, skipped_records
from astrolom.eval.recipe import EMBEDDING, recipe_of
from astrolom.log import get_logger
from astrolom.log import progress as progress_bar
from astrolom.search import store
from astrolom.search.maps import map_prepared
from astrolom.search.outlier_scores import JOIN_LISTS, kth_by_search, kth_neighbour_scores, list_join_scores
from astrolom.search.vectors import (
    ArraySource,
    ParquetSource,
    VectorSource,
    _Prepared,
    _table_objects,
    normalise,
    read_rows,
    standardise,
    standardiser,
)

_log = get_logger(__name__)

KINDS = ("auto", "flat", "ivfflat", "ivfpq", "hnsw")
INDEX_FILE, OBJECTS_FILE, META_FILE, MAP_FILE = "index.faiss", "objects.parquet", "meta.json", "map.npy"
VECTORS_FILE = "vectors.npy"
EXACT_MAX = 50_000  # above this, an approximate index
# ivfflat while a query scans at most this many MiB of float32 vectors, the list scan being its time: on a 2-core box
# 30.5 MiB (1M x 512, 16 of 1024 lists) took 2.4 ms a query and 91.5 MiB (3M, 32 of 2048) 7.7 ms (BENCHMARKS.md)
SCAN_MAX_MIB = 48
MEMORY_GB = 6.0  # default budget for the vectors held in memory: above it, product quantisation
TRAIN_PER_LIST = 64  # k-means training points per inverted list (faiss wants >= 39)
OUTLIER_K = (20,)
RERANK = 20  # ivfpq: exact re-scoring of rerank x k PQ candidates (recall@10 0.92 at 10, 0.96 at 20: BENCHMARKS)
# ivfpq within the budget: the k_factor x (REFINE_RERANK x k) best PQ candidates re-scored by in-RAM 8-bit copies,
# then their REFINE_RERANK x k best exactly from vectors.npy (at 8.6M x 512, recall@10 0.94 from the copies alone,
# 0.98 with the 20 exact rows: BENCHMARKS.md)
REFINE, REFINE_K, REFINE_RERANK, REFINE_NPROBE = "SQ8", 40, 2, 16


def outliers_file(k: int) -> str:
    return f"outliers-k{int(k)}.npy"


# ----------------------------------------------------------------------------------------------------- FAISS


def choose_kind(n: int, dim: int, memory_gb: float = MEMORY_GB) -> str:
    """The default index kind for n vectors of `dim` float32 under a memory budget (see the module docstring)."""
    if n <= EXACT_MAX:
        return "flat"
    nlist = default_nlist(n)
    scan = n * default_nprobe(nlist) / nlist * dim * 4
    fits = n * dim * 4 <= memory_gb * (1 << 30)
    return "ivfflat" if fits and scan <= SCAN_MAX_MIB * (1 << 20) else "ivfpq"


def default_nlist(n: int) -> int:
    """Inverted lists for n vectors: sqrt(n) rounded to a power of two, within [16, 65536] and <= n / 39."""
    nlist = 2 ** round(math.log2(max(math.sqrt(n), 1)))
    return int(min(max(nlist, 16), 65536, max(16, n // 39)))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: ~1.5% of them, at least 16 (recall@10 >= 0.95 on clustered data, see BENCHMARKS)."""
    return int(min(nlist, max(16, nlist // 64)))


def refine_fits(n: int, dim: int, memory_gb: float = MEMORY_GB) -> bool:
    """Whether n PQ codes (d/8 bytes) plus their 8-bit re-scoring copies (d bytes) fit the memory budget."""
    return n * (dim + dim // 8) <= memory_gb * (1 << 30)


def factory_string(kind: str, n: int, dim: int, memory_gb: float = MEMORY_GB) -> str:
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return "HNSW32,Flat"
    nlist = default_nlist(n)
    if kind == "ivfflat":
        return f"IVF{nlist},Flat"
    if kind == "ivfpq":
        m = next(m for m in (dim // 8, dim // 4, dim // 2, dim, 1) if m >= 1 and dim % m == 0)
        return f"IVF{nlist},PQ{m}" + (f",Refine({REFINE})" if refine_fits(n, dim, memory_gb) else "")
    raise ValueError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")


def apply_search_params(index, meta: dict) -> None:
    import faiss

    if "nprobe" in meta:
        faiss.extract_index_ivf(index).nprobe = int(meta["nprobe"])
    if "ef_search" in meta:
        faiss.downcast_index(index).hnsw.efSearch = int(meta["ef_search"])
    if "k_factor" in meta:
        faiss.downcast_index(index).k_factor = float(meta["k_factor"])


def search_index(index, q: np.ndarray, k: int, vectors: np.ndarray | None = None, rerank: int = 0):
    """(similarities, FAISS ids) of the k best of prepared queries `q`; with `vectors` (the exact stored vectors,
    memory-mapped) the rerank x k best candidates of an approximate index are re-scored exactly."""
    if vectors is None or rerank <= 1:
        return index.search(q, k)
    _, cand = index.search(q, min(k * rerank, int(index.ntotal)))
    sims = np.full(cand.shape, -np.inf, np.float32)
    for i in range(0, len(q), 256):  # bounded memory: 256 queries x rerank*k candidates x D at a time
        c = cand[i : i + 256]
        ok = c >= 0
        rows, inverse = np.unique(c[ok], return_inverse=True)  # sorted rows: sequential reads of the memory map
        # a file-backed array by positioned reads: only the rows asked for are read (a map faults in 64 kB around each)
        mapped = isinstance(vectors, np.memmap) and vectors.filename
        V = (read_rows(vectors, rows) if mapped else np.asarray(vectors[rows], dtype=np.float32))[inverse]
        s = np.full(c.shape, -np.inf, np.float32)
        s[ok] = np.einsum("md,md->m", V, np.repeat(q[i : i + 256], ok.sum(1), axis=0))
        sims[i : i + 256] = s
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(sims, top, 1)
    ids = np.where(np.isfinite(best), np.take_along_axis(cand, top, 1), -1)
    return best, ids


def build_faiss(
    X: np.ndarray | _Prepared,
    kind: str = "auto",
    *,
    nprobe: int | None = None,
    ef_search: int = 128,
    memory_gb: float = MEMORY_GB,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = _log.info,
    vectors_out: Path | None = None,
) -> tuple[object, dict]:
    """A trained and filled FAISS index of L2-normalised vectors (an array, normalised here, or a prepared source
    read in chunks); returns (index, settings for meta.json). For ivfpq with `vectors_out`, the exact vectors are
    written there as they stream past (a memory-mapped .npy for re-ranking)."""
    import faiss

    src = _Prepared(ArraySource(normalise(X), pa.table({})), None) if isinstance(X, np.ndarray) else X
    n, dim = src.n, src.dim
    if n == 0:
        raise ValueError("no vectors to index")
    kind = choose_kind(n, dim, memory_gb) if kind == "auto" else kind
    factory = factory_string(kind, n, dim, memory_gb)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    settings: dict = {"kind": kind, "factory": factory, "dim": dim, "n": n, "metric": "cosine"}
    if kind in ("ivfflat", "ivfpq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        n_train = min(n, TRAIN_PER_LIST * ivf.nlist)
        if kind == "ivfpq":
            n_train = min(n, max(n_train, 256 * 39))  # the PQ codebooks (256 centroids each) need samples too
        sample = src.take(np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False)))
        t0 = time.perf_counter()
        if log:
            log(f"training {factory} on a sample of {n_train} vectors ...")
        index.train(sample)
        del sample
        settings["train_size"] = n_train
        settings["train_s"] = round(time.perf_counter() - t0, 2)
        settings["nprobe"] = int(nprobe or default_nprobe(ivf.nlist))
        if "Refine" in factory:
            settings["refine"], settings["k_factor"] = REFINE, REFINE_K
            # the re-scoring recovers what fewer lists miss: at 8.6M, recall@10 0.963 / 0.971 / 0.972 at nprobe
            # 16 / 32 / 64, while the list scan is most of a query's time (BENCHMARKS.md)
            settings["nprobe"] = int(nprobe or min(ivf.nlist, REFINE_NPROBE))
            # room for every 8-bit copy now: grown by doubling, the copy array's last move would hold old and new
            # (8 of 4.4 GiB at 8.6M x 512; measured 10.4 GiB peak RSS for the build)
            copies = faiss.downcast_index(faiss.downcast_index(index).refine_index)
            copies.codes.resize(n * copies.code_size)
            copies.codes.resize(0)
    if kind == "hnsw":
        # the faiss default (40) loses neighbours in tight clusters, where many distances are nearly equal
        faiss.downcast_index(index).hnsw.efConstruction = 200
        settings["ef_search"] = int(ef_search)
    offset = None
    if kind == "ivfpq" and vectors_out is not None:
        # written through a file handle, not a map: dirty mapped pages would count as resident memory
        header = np.lib.format.open_memmap(vectors_out, mode="w+", dtype=np.float32, shape=(n, dim))
        offset = header.offset
        del header
        settings["vectors"] = vectors_out.name  # exact rows for `vectors` and the outlier join
        settings["rerank"] = REFINE_RERANK if "refine" in settings else RERANK
    t0 = time.perf_counter()
    # IVF-Flat lists hold the float32 vectors; grown by doubling as vectors arrive they took up to twice that (8.2 GiB
    # of anonymous memory for 5.75 GiB of lists at 3M x 512: measured), so each vector's list is found first and every
    # list is given its final size before the add
    assign = assign_lists(ivf, src, progress) if kind == "ivfflat" else None
    bar = progress_bar(n, desc=f"index[{kind}]", unit="vec", enabled=progress)
    with bar, open(vectors_out, "r+b") if offset is not None else contextlib.nullcontext() as keep:
        for start, V in src.chunks():
            if assign is None:
                index.add(V)
            else:  # the lists found above (the same search FAISS's add runs)
                a = assign[start : start + len(V)]
                ivf.add_core(len(V), faiss.swig_ptr(V), None, faiss.swig_ptr(a))
            if keep is not None:
                keep.seek(offset + start * dim * 4)
                keep.write(np.ascontiguousarray(V, dtype=np.float32).tobytes())
            bar.update(len(V))
    settings["add_s"] = round(time.perf_counter() - t0, 2)
    apply_search_params(index, settings)
    return index, settings


def assign_lists(ivf, src: _Prepared, progress: bool = True) -> np.ndarray:
    """The inverted list of every vector of `src` (a pass of the trained coarse quantiser, in chunks); each list of
    `ivf` is given room for exactly its vectors, so adding them never moves a list."""
    assign = np.empty(src.n, np.int64)
    with progress_bar(src.n, desc="lists", unit="vec", enabled=progress) as bar:
        for start, V in src.chunks():
            assign[start : start + len(V)] = ivf.quantizer.search(V, 1)[1][:, 0]
            bar.update(len(V))
    lists = ivf.invlists
    for no, size in enumerate(np.bincount(assign, minlength=ivf.nlist).tolist()):
        lists.resize(no, size)  # allocates; resizing to 0 keeps the room
        lists.resize(no, 0)
    return assign


def write_faiss(index, path: Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


# --------------------------------------------------------------------------------------------------- the build


def _portable(path: str | None, root: Path) -> str | None:
    """A local path resolved now (against the working directory) and stored relative to the index root, so the
    index can be served and searched from anywhere, and moved together with what it points to; URLs unchanged."""
    if not path or "://" in str(path) or str(path).startswith("hf:"):
        return path
    p = Path(path).expanduser().resolve()
    if not p.exists():
        _log.warning("%s does not exist; recorded as given", path)
        return str(p)
    return os.path.relpath(p, root.resolve())


def build_index(
    embeddings: str | Path | EmbeddingTable | VectorSource,
    out: str | Path,
    *,
    kind: str = "auto",
    nprobe: int | None = None,
    ef_search: int = 128,
    map_method: str = "umap",
    data: str | None = None,
    standardize: bool = True,
    memory_gb: float = MEMORY_GB,
    outlier_k: tuple[int, ...] = OUTLIER_K,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = _log.info,
) -> Path:
    """Build an index at `out` as a new generation and switch to it; returns `out`.

    `embeddings`: an embedding Parquet file or directory of parts (streamed unless it has per-modality columns),
    an `EmbeddingTable`, or a `VectorSource` (e.g. `npy_source` for a released `.npy` + ids).
    `data` overrides the data set recorded in the embeddings' metadata (where cutouts are read from).
    `standardize`: z-score each dimension before the cosine (see the module docstring); False: raw cosine.
    `outlier_k`: the k of the outlier scores stored with the index (those the explorer and `outliers` read).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    table, source, skipped = None, embeddings, []
    if isinstance(embeddings, str | Path):
        skipped = skipped_records(embeddings)
        columns = embedding_columns(embeddings)
        if any(c != EMBEDDING for c in columns):  # per-modality columns: built in memory, one index per modality
            table = load_embeddings(embeddings)
        else:
            source = ParquetSource(embeddings)
    elif isinstance(embeddings, EmbeddingTable):
        table = embeddings
    if table is not None:
        name = str(embeddings) if isinstance(embeddings, str | Path) else "embeddings"
        source = ArraySource(table.X, _table_objects(table), table.metadata, name)
        skipped = table.skipped
    objects = source.objects()
    _check_ids(objects, source)
    root = Path(out)
    t0 = time.perf_counter()
    emb_meta = source.metadata or {}
    modalities = table.modalities if table is not None else {}
    recipe = recipe_of(emb_meta)
    recipe = dataclasses.replace(recipe, model=_portable(recipe.model, root))  # usable from any directory
    aligned = recipe.aligned and set(ALL) <= set(modalities)
    if aligned and standardize:
        standardize = False
        if log:
            log("aligned embeddings: searched by the raw cosine of the shared space (not standardised)")
    if log and recipe.encoder == "astropt" and recipe.model and not recipe.symmetrize:
        log(
            "note: these embeddings are not pooled over rotations/mirrors, so a rotated copy of a galaxy may not be "
            "its neighbour; `astrolom embed --symmetrize` (or `astrolom index --model`) makes them invariant"
        )
    stats = standardiser(source, progress=progress) if standardize else None
    prepared = _Prepared(source, stats)
    gen = store.new_generation(root)
    build = dict(nprobe=nprobe, ef_search=ef_search, memory_gb=memory_gb, seed=seed, progress=progress)
    index, settings = build_faiss(prepared, kind, log=log, vectors_out=gen / VECTORS_FILE, **build)
    store.boundary("vectors")
    import faiss

    meta = {
        **settings,
        "faiss_version": faiss.__version__,
        "embeddings": _portable(str(embeddings), root) if isinstance(embeddings, str | Path) else None,
        **{k: _portable(v, root) for k, v in emb_meta.items() if k in ("embeddings_npy", "ids")},
        "recipe": recipe.to_json(),  # read back with `recipe_of` (SearchIndex.recipe)
        "data": _portable(data or emb_meta.get("data"), root),
        "labels": [c for c in objects.column_names if c not in ("object_id", "split")],
        "standardize": stats,
        "skipped": skipped_summary(skipped),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if modalities:
        meta["modalities"] = {
            name: _build_modality(gen, name, V, table.X, settings, stats, kind, standardize, build, log)
            for name, V in modalities.items()
        }
    write_faiss(index, gen / INDEX_FILE)
    store.boundary(INDEX_FILE)
    pq.write_table(objects, gen / OBJECTS_FILE)
    store.boundary(OBJECTS_FILE)
    if map_method != "none":
        if log:
            log(f"computing the 2-D map ({map_method}) of {source.n} embeddings ...")
        t1 = time.perf_counter()
        out_map = np.lib.format.open_memmap(gen / MAP_FILE, mode="w+", dtype=np.float32, shape=(source.n, 2))
        map_prepared(prepared, out_map, map_method, seed, progress=progress)
        out_map.flush()
        del out_map
        meta["map"], meta["map_s"] = map_method, round(time.perf_counter() - t1, 2)
        store.boundary(MAP_FILE)
    meta["outliers"] = {}
    for k in outlier_k:
        if not 1 <= k < source.n:
            if log:
                log(f"outlier scores with k={k} skipped: the index holds {source.n} objects")
            continue
        t1 = time.perf_counter()

        def exact_rows(rows):  # positioned reads: no map, so the pages read never enter the resident set
            return read_rows(np.load(gen / VECTORS_FILE, mmap_mode="r"), rows)

        def search(q, kk):
            vectors = np.load(gen / VECTORS_FILE, mmap_mode="r") if settings.get("vectors") else None
            return search_index(index, q, kk, vectors, settings.get("rerank", 0))

        scores = list_join_scores(index, k, exact_rows if settings.get("vectors") else None, progress=progress)
        method = f"list-join({JOIN_LISTS})"
        if scores is None:
            scores, method = kth_neighbour_scores(search, prepared.chunks(), source.n, k, progress=progress), "search"
        elif np.isnan(scores).any():  # lists too small to hold k others: searched
            rows = np.flatnonzero(np.isnan(scores))
            scores[rows] = kth_by_search(search, rows, prepared.take(rows), k)
        np.save(gen / outliers_file(k), scores)
        meta["outliers"][str(k)] = {"file": outliers_file(k), "method": method, "s": round(time.perf_counter() - t1, 2)}
        store.boundary(outliers_file(k))
    meta["build_s"] = round(time.perf_counter() - t0, 2)
    (gen / META_FILE).write_text(json.dumps(meta, indent=2))
    store.boundary(META_FILE)
    store.commit_generation(gen)
    if log:
        log(f"indexed {settings['n']} vectors ({settings['factory']}, {settings['dim']}-d) in {meta['build_s']} s "
            f"-> {root} ({gen.name})")  # fmt: skip
    return root


def skipped_summary(skipped: list[dict], keep: int = 1000) -> dict:
    """meta.json's account of the records skipped as bad when the embeddings were made (`astrolom embed
    --skip-bad`): counts, and the first `keep` entries (all of them stay in the embedding files)."""
    return {
        "records": sum(e.get("dropped", "record") == "record" for e in skipped),
        "spectra": sum(e.get("dropped") == "spectrum" for e in skipped),
        "entries": skipped[:keep],
    }


def _check_ids(objects: pa.Table, source: VectorSource) -> None:
    if objects.num_rows != source.n:
        raise ValueError(f"{source.name}: {source.n} vectors but {objects.num_rows} objects")
    ids = objects.column("object_id").combine_chunks()
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        raise ValueError(f"{source.name}: duplicate object ids, e.g. {dup.field('values')[:3].to_pylist()}")


def _build_modality(
    gen: Path, name: str, V: np.ndarray, X: np.ndarray, main: dict, main_stats, kind, standardize, build, log
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
    write_faiss(index, gen / entry["file"])
    store.boundary(entry["file"])
    if len(rows) < len(V):
        entry["rows"] = f"rows-{name}.npy"
        np.save(gen / entry["rows"], rows.astype(np.int64))
    if log:
        log(f"indexed {len(rows)} {name} vectors ({settings['factory']}, {settings['dim']}-d)")
    return entry
