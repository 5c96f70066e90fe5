"""The index on disk: generations switched atomically (a rebuild killed anywhere is never a torn index), paths
that work from any directory, released .npy embeddings + ids, streamed Parquet parts, IVF-PQ with re-ranking."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from astrolom.search import index as si
from astrolom.search import outliers as so
from astrolom.search import store
from astrolom.search.outlier_scores import JOIN_LISTS

N, D = 400, 16


def clustered(n: int, d: int, clusters: int = 12, spread: float = 0.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    return (centres[rng.integers(clusters, size=n)] + spread * rng.normal(size=(n, d))).astype(np.float32)


def write_npy(tmp: Path, X: np.ndarray, name: str, z: np.ndarray) -> tuple[Path, Path]:
    """A released-style array and its ids table (row i names row i), with one label column."""
    np.save(tmp / f"{name}.npy", X)
    ids = pa.table({"object_id": [f"obj{i:04d}" for i in range(len(X))], "z": z})
    pq.write_table(ids, tmp / f"{name}_ids.parquet")
    return tmp / f"{name}.npy", tmp / f"{name}_ids.parquet"


def answer(path: Path) -> tuple:
    """Everything a reader serves, from one load: neighbours, a label, the map and the stored outlier scores."""
    idx = si.load_index(path)
    hits = idx.neighbours_of_id("obj0001", k=5)
    return [
        [h.object_id for h in hits],
        [round(float(h.similarity), 5) for h in hits],
        float(idx.labels_of(1)["z"]),
        np.round(np.asarray(idx.map_coords()[:5], np.float64).ravel(), 4).tolist(),
        np.round(np.asarray(idx.stored_outliers(20)[:5], np.float64), 5).tolist(),
    ]


def _kill_each_boundary(idx_dir: str, npy: str, ids: str) -> list:
    """Rebuild idx_dir from (npy, ids) in a forked child killed (SIGKILL) at its 1st, 2nd, ... file boundary, until
    a child finishes; after each, this process reads the index. Returns [(killed, answer), ...].

    Run in a fresh single-threaded process (see the test): forking after OpenMP started threads is unsafe."""
    results, step = [], 0
    while True:
        step += 1
        pid = os.fork()
        if pid == 0:  # the child: build with the fault switch set
            os.environ[store.FAULT_ENV] = str(step)
            si.build_index(si.npy_source(npy, ids), idx_dir, map_method="pca", progress=False, log=None)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
        results.append((killed, answer(Path(idx_dir))))
        if not killed:
            return results


@pytest.mark.slow
def test_a_rebuild_killed_at_every_file_boundary_leaves_the_old_or_the_new_index(tmp_path):
    a_npy, a_ids = write_npy(tmp_path, clustered(N, D, seed=0), "a", np.zeros(N))
    b_npy, b_ids = write_npy(tmp_path, clustered(N, D, seed=1), "b", np.ones(N))
    idx_dir = tmp_path / "idx"
    si.build_index(si.npy_source(a_npy, a_ids), idx_dir, map_method="pca", progress=False, log=None)
    (idx_dir / "marks.json").write_text('{"obj0001": 1}')  # the explorer's file beside the index
    old = answer(idx_dir)
    assert old[2] == 0.0
    driver = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_search_store as t; "
        "print(json.dumps(t._kill_each_boundary(*sys.argv[2:])))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(Path(__file__).parent), str(idx_dir), str(b_npy), str(b_ids)]
    run = subprocess.run([sys.executable, "-c", driver, *args], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert [k for k, _ in results] == [True] * (len(results) - 1) + [False]
    # boundaries: vectors, index, objects, map, outliers, meta, manifest (all before the switch), switch (after it)
    assert len(results) - 1 >= 8
    for step, (_, now) in enumerate(results, 1):  # never a mix: all of the answer is the old index's or the new's
        assert now == old or now[2] == 1.0, f"killed at boundary {step}: a torn answer {now}"
    seen = ["old" if now == old else "new" for _, now in results]
    assert seen == ["old"] * (len(results) - 2) + ["new", "new"]  # the switch is the one moment that changes it
    new = answer(idx_dir)
    assert new[2] == 1.0 and new[0] != old[0] and new == results[-1][1]
    assert [p.name for p in idx_dir.glob("gen-*")] == [(idx_dir / store.CURRENT).read_text().strip()]  # pruned
    assert (idx_dir / "marks.json").read_text() == '{"obj0001": 1}'


def test_readers_refuse_a_damaged_generation_and_keep_their_own(tmp_path, capsys):
    from astrolom.cli import main

    X = clustered(N, D)
    out = si.build_index(X_table(X), tmp_path / "i", map_method="pca", progress=False, log=None)
    reader = si.load_index(out)
    before = reader.neighbours_of_id("obj0003", 4)
    si.build_index(X_table(X[::-1].copy()), out, map_method="pca", progress=False, log=None)  # prunes its generation
    assert not reader.generation.exists()
    after = reader.neighbours_of_id("obj0003", 4)  # mapped files stay readable
    assert [h.object_id for h in after] == [h.object_id for h in before] and reader.map_coords().shape == (N, 2)
    gen = si.load_index(out).generation
    with open(gen / si.MAP_FILE, "ab") as f:
        f.write(b"\0" * 8)  # a file changed after the build
    with pytest.raises(ValueError, match=r"map.npy: \d+ bytes, but the manifest says \d+"):
        si.load_index(out)
    assert main(["search", "--index", str(out), "--id", "obj0003"]) == 2
    assert "the manifest says" in capsys.readouterr().err
    (gen / si.MAP_FILE).unlink()
    with pytest.raises(ValueError, match="map.npy is named by the manifest but missing"):
        si.load_index(out)
    (out / store.CURRENT).write_text("gen-000099\n")
    with pytest.raises(FileNotFoundError, match="names gen-000099, which is not there"):
        si.load_index(out)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "index.faiss").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="written by an older astrolom"):
        si.load_index(legacy)


def X_table(X: np.ndarray, meta: dict | None = None):
    from astrolom.eval.embeddings import EmbeddingTable

    ids = np.array([f"obj{i:04d}" for i in range(len(X))])
    return EmbeddingTable(ids, np.array(["val"] * len(X)), X, {"z": np.arange(len(X), dtype=float)}, meta or {})


def test_relative_model_and_data_work_from_another_directory(tmp_path, monkeypatch, capsys):
    from astrolom.cli import main
    from astrolom.search.query import model_dir_of

    project = tmp_path / "project"
    (project / "runs" / "model").mkdir(parents=True)
    (project / "runs" / "survey").mkdir()
    monkeypatch.chdir(project)
    meta = {"model": "runs/model", "data": "runs/survey"}  # as `astrolom embed` records what it was given
    si.build_index(X_table(clustered(N, D), meta), "runs/index", map_method="none", progress=False, log=None)
    raw = si.load_index("runs/index").file(si.META_FILE).read_text()
    assert '"model": "../model"' in raw and '"data": "../survey"' in raw  # relative to the index directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    idx = si.load_index(project / "runs" / "index")
    assert idx.recipe.model == str(project / "runs" / "model") and model_dir_of(idx) == idx.recipe.model
    assert idx.meta["data"] == str(project / "runs" / "survey")
    moved = tmp_path / "moved"
    shutil.move(project, moved)  # the project moved as a whole: still found
    assert si.load_index(moved / "runs" / "index").recipe.model == str(moved / "runs" / "model")
    assert main(["search", "--index", str(moved / "runs" / "index"), "--id", "obj0002", "-k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_npy_embeddings_index_like_native_ones(tmp_path, capsys, monkeypatch):
    from fastapi.testclient import TestClient

    from astrolom.cli import main
    from astrolom.eval.embeddings import EmbeddingWriter
    from astrolom.serve.app import create_app

    X = clustered(N, D)
    npy, ids = write_npy(tmp_path, X, "rel", np.linspace(0, 1, N))
    csv = tmp_path / "ids.csv"
    csv.write_text("dr8_id,z\n" + "".join(f"obj{i:04d},{z}\n" for i, z in enumerate(np.linspace(0, 1, N))))
    assert main(["index", "--embeddings", str(npy), "--ids", str(csv), "--id-column", "dr8_id", "--out",
                 str(tmp_path / "from_npy"), "--map", "pca", "--no-progress"]) == 0  # fmt: skip
    from astrolom.data.records import Record

    emb = tmp_path / "native.parquet"
    with EmbeddingWriter(emb, {}) as w:
        w.write([Record(f"obj{i:04d}", None, "all", {"z": float(z)})
                 for i, z in enumerate(np.linspace(0, 1, N))], X)  # fmt: skip
    native = si.load_index(si.build_index(emb, tmp_path / "native", map_method="pca", progress=False, log=None))
    from_npy = si.load_index(tmp_path / "from_npy")
    assert from_npy.meta["ids"] == str(csv.resolve()) and len(from_npy) == N
    for oid in ("obj0000", "obj0123"):
        a, b = native.neighbours_of_id(oid, 6), from_npy.neighbours_of_id(oid, 6)
        assert [h.object_id for h in a] == [h.object_id for h in b]
        np.testing.assert_allclose([h.similarity for h in a], [h.similarity for h in b], atol=1e-6)
    assert from_npy.labels_of(7)["z"] == pytest.approx(7 / (N - 1))
    np.testing.assert_allclose(native.map_coords(), from_npy.map_coords(), atol=1e-4)
    np.testing.assert_allclose(native.stored_outliers(20), from_npy.stored_outliers(20), atol=1e-6)
    top = so.top_outliers(from_npy, 3, progress=False)
    assert [t["object_id"] for t in top] == [t["object_id"] for t in so.top_outliers(native, 3, progress=False)]

    def no_recompute(*a, **kw):
        raise AssertionError("the server recomputed outlier scores stored with the index")

    monkeypatch.setattr(so, "kth_neighbour_scores", no_recompute)  # the first request reads the stored scores
    # a loopback Host: the server answers to no other by default
    client = TestClient(
        create_app(tmp_path / "from_npy"), base_url="http://127.0.0.1:8000", raise_server_exceptions=False
    )
    assert client.get("/api/info").json()["n"] == N
    assert [o["object_id"] for o in client.get("/api/outliers?n=3").json()["outliers"]] == [t["object_id"] for t in top]
    # a count mismatch names both files; a missing id column lists what is there
    short = tmp_path / "short.parquet"
    pq.write_table(pa.table({"object_id": ["a", "b"]}), short)
    assert main(["index", "--embeddings", str(npy), "--ids", str(short), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{npy} holds {N} embeddings but {short} has 2 ids" in err
    with pytest.raises(ValueError, match=r"has no 'object_id' column \(name it with --id-column\); its columns: dr8"):
        si.npy_source(npy, csv)
    assert main(["index", "--embeddings", str(npy), "--out", str(tmp_path / "y")]) == 2
    assert "--ids goes with --embeddings FILE.npy" in capsys.readouterr().err
    X[5, 3] = np.nan
    bad, _ = write_npy(tmp_path, X, "bad", np.zeros(N))
    with pytest.raises(ValueError, match=r"bad.npy: the vector of row 5 holds NaN or infinity"):
        si.build_index(si.npy_source(bad, ids), tmp_path / "z", map_method="none", progress=False, log=None)
    assert not (tmp_path / "z" / store.CURRENT).exists()


def test_parquet_parts_are_streamed_in_chunks(tmp_path, monkeypatch):
    from astrolom.data.records import Record
    from astrolom.eval.embeddings import EmbeddingWriter, part_path, write_progress
    from astrolom.search import vectors

    X = clustered(N, D)
    parts = tmp_path / "emb.parquet"
    for rank, rows in enumerate(np.array_split(np.arange(N), 3)):  # as three torchrun ranks write them
        with EmbeddingWriter(part_path(parts, rank, 0), {"layer": -2}) as w:
            w.write([Record(f"obj{i:04d}", None, "val") for i in rows], X[rows])
        state = {"rank": rank, "world_size": 3, "parts": [part_path(parts, rank, 0).name], "rows": len(rows)}
        write_progress(parts, {**state, "done": True})
    monkeypatch.setattr(vectors, "CHUNK", 37)  # many chunks, crossing part boundaries
    src = vectors.ParquetSource(parts)
    assert (src.n, src.dim, src.metadata["layer"]) == (N, D, -2)
    assert sum(len(c) for _, c in src.chunks()) == N and len(list(src.chunks())) >= 11
    np.testing.assert_array_equal(src.take(np.array([0, 36, 37, 200, N - 1])), X[[0, 36, 37, 200, N - 1]])
    streamed = si.load_index(si.build_index(parts, tmp_path / "s", map_method="pca", progress=False, log=None))
    monkeypatch.setattr(vectors, "CHUNK", 1 << 16)
    whole = si.load_index(si.build_index(X_table(X), tmp_path / "w", map_method="pca", progress=False, log=None))
    np.testing.assert_allclose(streamed.meta["standardize"]["mean"], whole.meta["standardize"]["mean"], atol=1e-6)
    np.testing.assert_allclose(streamed.vectors(np.arange(N)), whole.vectors(np.arange(N)), atol=1e-6)
    np.testing.assert_allclose(streamed.stored_outliers(20), whole.stored_outliers(20), atol=1e-6)


def test_ivfflat_lists_sized_before_the_add_hold_what_faiss_add_puts_there():
    import faiss

    from astrolom.search.build import build_faiss
    from astrolom.search.vectors import normalise

    X = clustered(5000, 32, clusters=40)
    index, _ = build_faiss(X, "ivfflat", progress=False, log=None)  # lists found first, then added to
    ref = faiss.clone_index(index)
    ref.reset()  # the same trained quantiser, empty lists
    ref.add(normalise(X))  # FAISS's own add, list by list as vectors arrive
    assert index.ntotal == ref.ntotal == 5000
    a, b = index.invlists, ref.invlists
    sizes = [a.list_size(no) for no in range(index.nlist)]
    assert sizes == [b.list_size(no) for no in range(index.nlist)] and max(sizes) > 2 * min(sizes)
    for no in range(index.nlist):
        m = sizes[no]
        ids_a, ids_b = (faiss.rev_swig_ptr(x.get_ids(no), m).copy() for x in (a, b))
        np.testing.assert_array_equal(ids_a, ids_b)
        rows_a, rows_b = (faiss.rev_swig_ptr(x.get_codes(no), m * a.code_size).view(np.float32) for x in (a, b))
        np.testing.assert_allclose(rows_a, rows_b, atol=1e-6)  # the build normalises its rows once more
    q = normalise(clustered(50, 32, clusters=40, seed=1))
    np.testing.assert_array_equal(index.search(q, 10)[1], ref.search(q, 10)[1])


@pytest.mark.slow
def test_ivfpq_reranks_exactly_from_the_memory_mapped_vectors(tmp_path):
    X = clustered(6000, 32, clusters=50)
    q = clustered(200, 32, clusters=50, seed=1)
    t = X_table(X)
    exact = si.load_index(si.build_index(t, tmp_path / "f", kind="flat", map_method="none", progress=False, log=None))
    # 6000 x 32 float32 = 0.7 MB: a budget below that makes --kind auto pick product quantisation
    assert si.choose_kind(60_000, 32, memory_gb=0.005) == "ivfpq" and si.choose_kind(60_000, 32) == "ivfflat"
    # a budget too small for the 8-bit copies: re-ranked from the vectors on disk
    build = dict(kind="ivfpq", map_method="none", outlier_k=(), progress=False, log=None)
    pq_idx = si.load_index(si.build_index(t, tmp_path / "p", memory_gb=0.0001, **build))
    assert pq_idx.meta["rerank"] == si.RERANK and "vectors.npy" in pq_idx.manifest["files"]
    assert pq_idx.meta["factory"] == "IVF64,PQ4" and "refine" not in pq_idx.meta
    _, e = exact.search_vectors(q, 10)
    s, a = pq_idx.search_vectors(q, 10)
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, e, strict=True)])
    assert recall >= 0.9  # 0.35 without re-ranking (tests/test_search.py)
    cos = np.einsum("qkd,qd->qk", exact.vectors(a.ravel()).reshape(200, 10, 32), exact.prepare(q))
    np.testing.assert_allclose(s, cos, atol=1e-5)  # re-scored exactly, not the PQ estimate
    np.testing.assert_allclose(pq_idx.vectors([5, 9]), exact.vectors([5, 9]), atol=1e-6)  # exact, not decoded


@pytest.mark.slow
def test_ivfpq_within_the_budget_rescores_by_8_bit_copies_in_ram(tmp_path):
    import faiss

    X = clustered(6000, 32, clusters=50)
    q = clustered(200, 32, clusters=50, seed=1)
    t = X_table(X)
    exact = si.load_index(si.build_index(t, tmp_path / "f", kind="flat", map_method="none", progress=False, log=None))
    assert si.refine_fits(6000, 32) and not si.refine_fits(6000, 32, memory_gb=0.0001)
    idx = si.load_index(
        si.build_index(t, tmp_path / "r", kind="ivfpq", map_method="none", outlier_k=(), progress=False, log=None)
    )
    assert idx.meta["factory"] == "IVF64,PQ4,Refine(SQ8)" and idx.meta["k_factor"] == si.REFINE_K
    assert idx.meta["rerank"] == idx._spaces[None].rerank == si.REFINE_RERANK and idx.meta["nprobe"] == 16
    _, e = exact.search_vectors(q, 10)
    # opened memory-mapped (a server starts without reading the copies), then read whole: the same answers
    assert not idx.resident and faiss.downcast_index(idx.index).k_factor == si.REFINE_K
    s_mapped, a_mapped = idx.search_vectors(q, 10)
    assert idx.make_resident() > 0 and idx.resident and idx.make_resident() == 0.0
    refine = faiss.downcast_index(idx.index)
    assert isinstance(refine, faiss.IndexRefine) and refine.k_factor == si.REFINE_K
    assert idx._spaces[None].index is idx.index
    s, a = idx.search_vectors(q, 10)
    np.testing.assert_array_equal(a, a_mapped)
    np.testing.assert_array_equal(s, s_mapped)
    rec = lambda found: np.mean([len(set(x) & set(y)) / 10 for x, y in zip(found, e, strict=True)])  # noqa: E731
    recall = rec(a)
    assert recall >= 0.95  # 0.35 on the PQ codes alone (tests/test_search.py)
    # the last stage re-scores the 8-bit copies' best 2k exactly from vectors.npy: the exact cosines
    cos = np.einsum("qkd,qd->qk", exact.vectors(a.ravel()).reshape(200, 10, 32), exact.prepare(q))
    np.testing.assert_allclose(s, cos, atol=1e-5)
    idx._spaces[None].rerank = 1  # the 8-bit copies' order alone: their cosines, within a quantisation step
    s8, a8 = idx.search_vectors(q, 10)
    cos8 = np.einsum("qkd,qd->qk", exact.vectors(a8.ravel()).reshape(200, 10, 32), exact.prepare(q))
    assert 0 < np.abs(s8 - cos8).max() < 0.02 and rec(a8) <= recall
    refine.k_factor = 1  # no re-scoring by the copies: the PQ order alone
    assert rec(idx.search_vectors(q, 10)[1]) < recall - 0.2
    np.testing.assert_allclose(idx.vectors([5, 9]), exact.vectors([5, 9]), atol=1e-6)  # exact rows from disk


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivfflat", "ivfpq"])
def test_ivf_outliers_by_list_join_agree_with_exact_search(tmp_path, kind):
    rng = np.random.default_rng(3)
    X = clustered(3000, 32, clusters=20, spread=0.2)
    odd = rng.choice(3000, 60, replace=False)  # 2% planted anomalies
    X[odd] = rng.normal(size=(60, 32)) * 1.5
    is_odd = np.zeros(3000, bool)
    is_odd[odd] = True
    t = X_table(X)
    build = dict(map_method="none", outlier_k=(10,), progress=False, log=None)
    exact = si.load_index(si.build_index(t, tmp_path / "flat", kind="flat", **build))
    approx = si.load_index(si.build_index(t, tmp_path / kind, kind=kind, **build))
    assert exact.meta["outliers"]["10"]["method"] == "search"
    assert approx.meta["outliers"]["10"]["method"] == f"list-join({JOIN_LISTS})"
    e, a = np.asarray(exact.stored_outliers(10)), np.asarray(approx.stored_outliers(10))
    assert np.isfinite(a).all() and (a >= e - 1e-5).all()  # a subset of the candidates: never closer than exact
    assert np.corrcoef(e, a)[0, 1] > 0.97 and np.median(a - e) < 0.01
    assert so.precision_at(a, is_odd, 0.01)[0] == so.precision_at(e, is_odd, 0.01)[0] == 1.0  # 50x the base rate
