"""Similarity-search index at scale: build time, memory, single-query latency and recall@10 against exact search.

Data: clustered synthetic embeddings like a survey's: `--clusters` centres in `--dim` dimensions, each object its
centre plus a variation in a shared 32-d latent subspace (galaxies vary along few physical directions) plus small
isotropic noise; queries are fresh draws from the same distribution. The index is built by `astrolom index`'s code
at its default settings (`--kind auto`: exact below 50k vectors, IVF-Flat above), and its recall@10 is measured
against exact brute-force search (`IndexFlatIP`) of the same normalised vectors, whose latency is shown beside it.

    python benchmarks/search_index.py --n 1000000 --dim 512
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def synthetic(n: int, dim: int, clusters: int, seed: int, latent: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).normal(size=(clusters, dim)).astype(np.float32)
    basis = np.random.default_rng(54321).normal(size=(latent, dim)).astype(np.float32) / np.sqrt(latent)
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        c = rng.integers(clusters, size=m)
        z = rng.normal(size=(m, latent)).astype(np.float32)
        out[i : i + m] = centres[c] + 0.6 * z @ basis + 0.15 * rng.normal(size=(m, dim)).astype(np.float32)
    return out


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return kb / 2**20


def latencies(index, queries: np.ndarray, k: int) -> np.ndarray:
    out = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], k)
        out.append(time.perf_counter() - t0)
    return np.array(out) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--kind", default="auto")
    ap.add_argument("--nprobe", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exact-latency-queries", type=int, default=100)
    args = ap.parse_args()

    import faiss

    from astrolom.search.index import build_faiss, normalise

    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    X = synthetic(args.n, args.dim, args.clusters, seed=0)
    faiss.normalize_L2(X)  # in place: one copy of 1M x 512 float32 is 2 GiB
    Q = normalise(synthetic(args.queries, args.dim, args.clusters, seed=1))
    gen_s = time.perf_counter() - t0
    rss0 = rss_gib()
    t0 = time.perf_counter()
    index, settings = build_faiss(X, args.kind, nprobe=args.nprobe, progress=True)
    build_s = time.perf_counter() - t0
    index_gib = faiss.serialize_index(index).nbytes / 2**30 if args.n <= 2_000_000 else float("nan")
    rss_build = rss_gib()

    exact = faiss.IndexFlatIP(args.dim)
    exact.add(X)
    del X
    t0 = time.perf_counter()
    _, truth = exact.search(Q, 10)
    exact_batch_s = time.perf_counter() - t0
    lat = latencies(index, Q, 10)
    _, found = index.search(Q, 10)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]))
    exact_lat = latencies(exact, Q[: args.exact_latency_queries], 10)

    print(
        f"n={args.n} dim={args.dim} clusters={args.clusters} threads={args.threads} "
        f"(data generated in {gen_s:.0f} s; RSS before build {rss0:.2f} GiB, after {rss_build:.2f} GiB)\n"
    )
    print("| index | build (train + add) | index size | p50 k=10 | p99 k=10 | recall@10 vs exact |")
    print("|---|---|---|---|---|---|")
    extra = f", nprobe {settings['nprobe']}" if "nprobe" in settings else ""
    print(
        f"| {settings['factory']}{extra} "
        f"| {build_s:.1f} s ({settings.get('train_s', 0):.1f} + {settings['add_s']:.1f}) "
        f"| {index_gib:.2f} GiB | {np.percentile(lat, 50):.2f} ms | {np.percentile(lat, 99):.2f} ms | {recall:.3f} |"
    )
    print(
        f"| exact (Flat, brute force) | - | {args.n * args.dim * 4 / 2**30:.2f} GiB "
        f"| {np.percentile(exact_lat, 50):.2f} ms "
        f"| {np.percentile(exact_lat, 99):.2f} ms | 1 (batch of {args.queries}: {exact_batch_s:.1f} s) |"
    )
    print(f"\nmax RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
