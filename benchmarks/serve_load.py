"""The explorer's JSON API under concurrent load, on 127.0.0.1 only: requests/s and latency of neighbour queries.

Builds an index of `--n` clustered synthetic vectors (see search_index.py) in a temporary directory, starts
`astrolom serve` on a free localhost port in a subprocess, and runs `--clients` concurrent clients (threads with
keep-alive HTTP connections) that each ask `GET /api/neighbours/{random id}?k=10` for `--seconds` (at most 60).
Every response must be 200 with 10 neighbours; anything else counts as an error.

    python benchmarks/serve_load.py --n 100000 --clients 16 --seconds 30
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    cmd = [sys.executable, "-m", "astrolom", "serve", "--index", str(tmp / "index"), "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/api/info", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit(f"server did not start: {server.stderr.read().decode()[-2000:]}")
        lat: list[list[float]] = [[] for _ in range(args.clients)]
        errors = [0] * args.clients
        stop = time.perf_counter() + args.seconds

        def client(c: int) -> None:
            rng = np.random.default_rng(c)
            with httpx.Client(base_url=base, timeout=10) as http:
                while time.perf_counter() < stop:
                    oid = ids[rng.integers(args.n)]
                    t0 = time.perf_counter()
                    try:
                        r = http.get(f"/api/neighbours/{oid}", params={"k": args.k})
                        ok = r.status_code == 200 and len(r.json()["neighbours"]) == args.k
                    except httpx.HTTPError:
                        ok = False
                    lat[c].append(time.perf_counter() - t0)
                    errors[c] += not ok

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=10)
    all_lat = np.concatenate([np.array(x) for x in lat]) * 1e3
    print(
        f"index: {args.n} x {args.dim} synthetic, default kind; {args.clients} clients for {wall:.0f} s on 127.0.0.1\n"
    )
    print("| requests | errors | requests/s | p50 | p99 |")
    print("|---|---|---|---|---|")
    print(
        f"| {len(all_lat)} | {sum(errors)} | {len(all_lat) / wall:.0f} | {np.percentile(all_lat, 50):.1f} ms "
        f"| {np.percentile(all_lat, 99):.1f} ms |"
    )


if __name__ == "__main__":
    main()
