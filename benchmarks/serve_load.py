"""The explorer's JSON API under concurrent load, on 127.0.0.1 only: requests/s and latency of neighbour queries.

Builds an index of `--n` clustered synthetic vectors (see search_index.py) in a temporary directory, starts
`astrolom serve` on a free localhost port in a subprocess, and runs `--clients` concurrent clients (threads with
keep-alive HTTP connections) that each ask `GET /api/neighbours/{random id}?k=10` for `--seconds` (at most 60).
Every response must be 200 with 10 neighbours; anything else counts as an error.

`--peer SRC` starts a second server from another checkout's `src` (e.g. the main branch) on the same index, and every
client alternates its requests between the two, so both see the same machine load; one row each and their ratio.

    python benchmarks/serve_load.py --n 100000 --clients 16 --seconds 30
    python benchmarks/serve_load.py --n 100000 --clients 16 --seconds 30 --peer /work/main/src
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--peer", default=None, help="another checkout's src to serve the same index, side by side")
    args = ap.parse_args()
    if args.seconds > 60:
        raise SystemExit("--seconds is bounded to 60")

    import httpx

    sys.path.insert(0, str(Path(__file__).parent))
    from search_index import synthetic

    from astrolom.eval.probes import EmbeddingTable
    from astrolom.search.index import build_index

    tmp = Path(tempfile.mkdtemp(prefix="astrolom-serve-load-"))
    X = synthetic(args.n, args.dim, 1000, seed=0)
    ids = np.array([f"obj{i:07d}" for i in range(args.n)])
    table = EmbeddingTable(ids, np.array(["test"] * args.n), X, {"z": np.zeros(args.n)}, {})
    build_index(table, tmp / "index", map_method="none", progress=False, log=None)
    sources = {"this checkout": str(Path(__file__).parents[1] / "src")}
    if args.peer:
        sources[f"peer {args.peer}"] = args.peer
    servers, bases = [], []
    try:
        for src in sources.values():
            server, base = _start(src, tmp / "index")
            servers.append(server)
            bases.append(base)
        lat = [[[] for _ in range(args.clients)] for _ in bases]
        errors = [[0] * args.clients for _ in bases]
        stop = time.perf_counter() + args.seconds

        def client(c: int) -> None:
            rng = np.random.default_rng(c)
            https = [httpx.Client(base_url=b, timeout=10) for b in bases]
            i = c
            while time.perf_counter() < stop:
                s = i % len(bases)  # alternate: both servers see the same load
                i += 1
                oid = ids[rng.integers(args.n)]
                t0 = time.perf_counter()
                try:
                    r = https[s].get(f"/api/neighbours/{oid}", params={"k": args.k})
                    ok = r.status_code == 200 and len(r.json()["neighbours"]) == args.k
                except httpx.HTTPError:
                    ok = False
                lat[s][c].append(time.perf_counter() - t0)
                errors[s][c] += not ok
            for h in https:
                h.close()

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=10)
    print(
        f"index: {args.n} x {args.dim} synthetic, default kind; {args.clients} clients for {wall:.0f} s on 127.0.0.1"
        f"{', alternating between the servers' if len(bases) > 1 else ''}\n"
    )
    print("| server | requests | errors | requests/s | p50 | p99 |")
    print("|---|---|---|---|---|---|")
    p50 = []
    for name, ls, es in zip(sources, lat, errors, strict=True):
        all_lat = np.concatenate([np.array(x) for x in ls]) * 1e3
        p50.append(np.percentile(all_lat, 50))
        print(
            f"| {name} | {len(all_lat)} | {sum(es)} | {len(all_lat) / wall:.0f} | {p50[-1]:.1f} ms "
            f"| {np.percentile(all_lat, 99):.1f} ms |"
        )
    if len(p50) > 1:
        print(f"\np50 ratio, this checkout / peer: {p50[0] / p50[1]:.2f}")


def _start(src: str, index: Path):
    """`astrolom serve` of `index` from the package in `src`, on a free localhost port; (process, base URL)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=src)
    cmd = [sys.executable, "-m", "astrolom", "serve", "--index", str(index), "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/api/info", timeout=1).status_code == 200:
                return server, base
        except httpx.HTTPError:
            time.sleep(0.1)
    server.terminate()
    raise SystemExit(f"server did not start: {server.stderr.read().decode()[-2000:]}")


if __name__ == "__main__":
    main()
