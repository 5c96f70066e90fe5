"""Survey scale: `astrolom index` on millions of 512-d embeddings, out of core, as a user runs it.

Writes N synthetic embeddings to a `.npy` (and their ids to Parquet) under `--scratch`, chunk by chunk, then runs
`astrolom index --embeddings X.npy --ids ids.parquet` in a child process (its peak RSS is the build's), opens the
index in this process (load time: memory-mapped; an index with in-RAM re-scoring copies, IVF-PQ + Refine(SQ8), is
then read whole, as the server does in the background: `+ N s` in the load column) and measures single-query and
batched latency, recall@10 against exact search on held-out queries (the exact answer is brute force over the
memory-mapped vectors in chunks), index size on disk, and the map and outlier times the build recorded. Prints one
Markdown table row per run.

Structure, so that recall is not trivially high: points are drawn around `--anchors` anchor embeddings (a Parquet
of real embeddings, e.g. `astrolom embed` of the demo survey; their dimension must be --dim), or, without one,
around a hierarchy of synthetic anchors (64 superclusters, 40 sub-anchors each); anchor popularity follows a
power law, each anchor has its own width, every point varies in a 24-d subspace shared by all anchors (the few
physical directions galaxies vary along) and in an 8-d subspace of its supercluster, plus isotropic noise. Held-out
queries are fresh draws from the same mixture (not indexed).

    python benchmarks/survey_scale.py --n 1000000 --scratch /work/scratch/scale
    python benchmarks/survey_scale.py --n 1000000 --kind ivfpq --scratch /work/scratch/scale   # the 8.6M recipe
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LATENT, LOCAL, SUPER, SUB = 24, 8, 64, 40


def mixture(dim: int, anchors: str | None, seed: int = 7) -> dict:
    """The fixed parts of the distribution: anchors, their weights and widths, the shared and local subspaces."""
    rng = np.random.default_rng(seed)
    if anchors:
        import pyarrow.parquet as pq

        col = pq.read_table(anchors, columns=["embedding"]).column("embedding").combine_chunks()
        A = np.asarray(col.flatten().to_numpy(), np.float32).reshape(len(col), -1)
        if A.shape[1] != dim:
            raise SystemExit(f"{anchors}: {A.shape[1]}-d embeddings, but --dim is {dim}")
        A = (A - A.mean(0)) / (A.std(0) + 1e-6)
        group = np.arange(len(A)) % SUPER
    else:
        tops = rng.normal(size=(SUPER, dim)).astype(np.float32)
        group = np.repeat(np.arange(SUPER), SUB)
        A = tops[group] + 0.55 * rng.normal(size=(len(group), dim)).astype(np.float32)
    weights = 1.0 / np.arange(1, len(A) + 1) ** 0.8
    return {
        "anchors": A,
        "group": group,
        "p": rng.permutation(weights / weights.sum()),
        "width": np.exp(rng.normal(-0.2, 0.35, len(A))).astype(np.float32),
        "shared": rng.normal(size=(LATENT, dim)).astype(np.float32) / np.sqrt(LATENT),
        "local": rng.normal(size=(SUPER, LOCAL, dim)).astype(np.float32) / np.sqrt(LOCAL),
    }


def draw(mix: dict, m: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.choice(len(mix["anchors"]), m, p=mix["p"])
    w = mix["width"][a, None]
    x = mix["anchors"][a] + 0.5 * w * (rng.normal(size=(m, LATENT)).astype(np.float32) @ mix["shared"])
    z = 0.4 * w * rng.normal(size=(m, LOCAL)).astype(np.float32)
    g = mix["group"][a]
    for s in np.unique(g):  # each supercluster's own directions
        x[g == s] += z[g == s] @ mix["local"][s]
    return x + 0.25 * w * rng.normal(size=x.shape).astype(np.float32)


def write_data(scratch: Path, n: int, dim: int, mix: dict) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    npy, ids = scratch / f"emb_{n}x{dim}.npy", scratch / f"ids_{n}.parquet"
    if npy.is_file() and ids.is_file():
        return npy, ids
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(n, dim))
    for i in range(0, n, 100_000):
        out[i : i + 100_000] = draw(mix, min(100_000, n - i), np.random.default_rng([0, i]))
    out.flush()
    del out
    pq.write_table(pa.table({"object_id": [f"g{i:08d}" for i in range(n)]}), ids)
    return npy, ids


def exact_top10(idx, Q: np.ndarray, chunk: int = 131_072) -> np.ndarray:
    """Rows of the 10 best cosines of prepared queries Q over every indexed vector, in chunks (brute force)."""
    from astrolom.search.vectors import ArraySource, _Prepared

    src = idx._spaces[None].exact
    prepared = (
        _Prepared(ArraySource(src, None), None)
        if src is not None
        else _Prepared(ArraySource(np.load(idx.meta["embeddings_npy"], mmap_mode="r"), None), idx.meta["standardize"])
    )
    best_s = np.full((len(Q), 10), -np.inf, np.float32)
    best_i = np.zeros((len(Q), 10), np.int64)
    for start, V in prepared.chunks(chunk):
        S = Q @ V.T
        top = np.argpartition(-S, 10, axis=1)[:, :10]
        s = np.concatenate([best_s, np.take_along_axis(S, top, 1)], 1)
        i = np.concatenate([best_i, top + start], 1)
        keep = np.argsort(-s, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    return best_i


def sweep(idx, Q: np.ndarray, truth: np.ndarray) -> None:
    """Recall@10 and single-query latency of an IVF-PQ index over nprobe x re-scoring depth (set at query time):
    FAISS's `k_factor` for in-RAM 8-bit copies (`Refine(SQ8)`), else the re-rank depth from the vectors on disk."""
    import faiss

    space, ivf = idx.space(None), faiss.extract_index_ivf(idx.index)
    refine = faiss.downcast_index(idx.index) if idx.meta.get("refine") else None
    if refine is not None and space.rerank > 1:
        print(f"\n(then the {space.rerank}·k best by the 8-bit copies re-scored exactly from vectors.npy)")
    print(f"\n| nprobe | {'k_factor' if refine else 're-rank'} | recall@10 | p50 | p99 |\n|---:|---:|---:|---:|---:|")
    for nprobe in (16, 32, 64):
        ivf.nprobe = nprobe
        for depth in (20, 40, 80):
            if refine is not None:
                refine.k_factor = depth
            else:
                space.rerank = depth
            lat = []
            for q in Q[:200]:
                t = time.perf_counter()
                idx.search_vectors(q[None], 10)
                lat.append((time.perf_counter() - t) * 1e3)
            _, found = idx.search_vectors(Q, 10)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
            print(f"| {nprobe} | {depth}·k | {recall:.3f} | {np.percentile(lat, 50):.2f} ms "
                  f"| {np.percentile(lat, 99):.1f} ms |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--kind", default="auto")
    ap.add_argument("--memory-gb", type=float, default=None, help="the build's budget (default: astrolom's)")
    ap.add_argument("--map", default="pca", choices=("pca", "umap", "none"))
    ap.add_argument("--outlier-k", default="20", help="k stored at build time (`none`: time a sample instead)")
    ap.add_argument("--outlier-sample", type=int, default=20_000, help="with --outlier-k none: rows timed")
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries for latency")
    ap.add_argument("--recall-queries", type=int, default=300, help="of those, checked against exact search")
    ap.add_argument("--anchors", default=None, help="Parquet of real embeddings to draw around")
    ap.add_argument("--scratch", required=True, help="where the vectors and the index go (not the repository)")
    ap.add_argument("--keep", action="store_true", help="keep the vectors and index afterwards")
    ap.add_argument("--reuse", action="store_true", help="measure the index a previous --keep run left (no build)")
    ap.add_argument("--sweep", action="store_true", help="ivfpq: recall and latency over nprobe x re-rank depth")
    ap.add_argument("--nprobe", type=int, default=None, help="lists scanned at query time (default: the index's)")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="empty the page cache before opening the index (root: writes /proc/sys/vm/drop_caches), so that the "
        "latency pass reads the index and the re-ranked rows from disk",
    )
    args = ap.parse_args()

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    mix = mixture(args.dim, args.anchors)
    t0 = time.perf_counter()
    npy, ids = write_data(scratch, args.n, args.dim, mix)
    gen_s = time.perf_counter() - t0
    out = scratch / f"index_{args.n}_{args.kind}"
    cmd = [sys.executable, "-m", "astrolom", "index", "--embeddings", str(npy), "--ids", str(ids), "--out", str(out)]
    cmd += ["--kind", args.kind, "--map", args.map, "--outlier-k", args.outlier_k]
    cmd += ["--memory-gb", str(args.memory_gb)] if args.memory_gb is not None else []
    stats = out.parent / f"{out.name}.build.json"
    if args.reuse and stats.is_file():
        wall_s, peak_gib = (json.loads(stats.read_text())[k] for k in ("wall_s", "peak_gib"))
    else:
        t0 = time.perf_counter()
        # the child's peak RSS, read by GNU time (ru_maxrss of this process's children would include the generator);
        # its progress bars go to a log beside the index, so that a run of an hour can be followed
        log = out.parent / f"{out.name}.log"
        with open(log, "w") as fh:
            run = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=fh, stderr=subprocess.STDOUT, text=True)
        wall_s = time.perf_counter() - t0
        text = log.read_text(errors="replace")
        if run.returncode != 0:
            raise SystemExit(text[-3000:])
        peak_gib = next(int(x.split()[-1]) for x in text.splitlines() if "Maximum resident" in x) / 2**20
        stats.write_text(json.dumps({"wall_s": wall_s, "peak_gib": peak_gib, "command": cmd}))

    from astrolom.search.index import load_index

    if args.cold:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    t0 = time.perf_counter()
    idx = load_index(out)
    load_s = time.perf_counter() - t0
    resident_s = idx.make_resident()  # 0 unless the index keeps re-scoring copies in RAM
    meta = dict(idx.meta)
    if args.nprobe:
        import faiss

        faiss.extract_index_ivf(idx.index).nprobe = meta["nprobe"] = args.nprobe
    size_gib = sum(e["bytes"] for e in idx.manifest["files"].values()) / 2**30
    faiss_gib = idx.manifest["files"]["index.faiss"]["bytes"] / 2**30

    Qraw = draw(mix, args.queries, np.random.default_rng(99))  # held out: never indexed
    idx.search_vectors(Qraw[:20], 10)  # warm the page cache of the lists these touch
    lat = []
    for q in Qraw:
        t = time.perf_counter()
        idx.search_vectors(q[None], 10)
        lat.append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    for i in range(0, len(Qraw), 64):
        idx.search_vectors(Qraw[i : i + 64], 10)
    batched_ms = (time.perf_counter() - t) * 1e3 / len(Qraw)
    R = args.recall_queries
    _, found = idx.search_vectors(Qraw[:R], 10)
    truth = exact_top10(idx, idx.prepare(Qraw[:R]))
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]))
    outl = ", ".join(f"k={k}: {e['s']:.0f} s" for k, e in meta.get("outliers", {}).items())
    if not outl:  # not stored: time the same k-NN pass on the first rows and scale to N (a lower bound, no writes)
        from astrolom.search.outlier_scores import kth_neighbour_scores

        m = min(args.outlier_sample, args.n)
        t = time.perf_counter()
        chunks = ((i, idx.vectors(np.arange(i, min(i + 4096, m)))) for i in range(0, m, 4096))
        kth_neighbour_scores(lambda q, kk: idx.search_vectors(q, kk, prepared=True), chunks, m, 20, progress=False)
        per = (time.perf_counter() - t) / m
        outl = f"k=20: {per * 1e3:.2f} ms/object on {m:,} rows, est. {per * args.n:.0f} s for all"
    extra = f", nprobe {meta['nprobe']}" + (f", rerank {meta['rerank']}x" if meta.get("rerank") else "")
    extra += f", k_factor {meta['k_factor']:g}" if meta.get("k_factor") else ""
    print(f"data: {args.n} x {args.dim} written in {gen_s:.0f} s to {npy}; build command: {' '.join(cmd)}")
    print(json.dumps({k: meta.get(k) for k in ("train_s", "add_s", "map_s", "build_s")}))
    print(
        "\n| N x D | index | build (wall) | peak RSS build | on disk (index.faiss) | load | p50 / p99 single "
        "| batched (64) | recall@10 | map | outliers |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.n:,} x {args.dim} | {meta['factory']}{extra} | {wall_s:.0f} s | {peak_gib:.2f} GiB "
        f"| {size_gib:.2f} GiB ({faiss_gib:.2f}) | {load_s:.1f} s{f' + {resident_s:.1f} s' if resident_s else ''} "
        f"| {np.percentile(lat, 50):.2f} / {np.percentile(lat, 99):.2f} ms | {batched_ms:.2f} ms/query "
        f"| {recall:.3f} ({R} queries) | {meta.get('map', '-')} {meta.get('map_s', 0):.0f} s | {outl} |"
    )
    if args.sweep and (meta.get("rerank") or meta.get("refine")):
        sweep(idx, Qraw[:R], truth)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
        npy.unlink(missing_ok=True)
        ids.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
