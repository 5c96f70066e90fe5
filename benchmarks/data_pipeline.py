"""Data pipeline throughput: 512x512 JPEG cutouts -> spiral-ordered, per-patch standardised tokens.

Three paths over the same generated files, in the same run, single-threaded (torch.set_num_threads(1), one decode
thread), so the numbers are images/s per core:

* decode      read the file + PIL decode to a uint8 numpy array: the ceiling for any JPEG pipeline.
* ours        astrolom: open_source(dir) -> RecordStream -> TokenBatches(batch, patch 16): float32 tokens (B, T, 768)
              in spiral order with per-patch mean/std, exactly what the trainer consumes (data.token_format=float32);
              also with output="bfloat16" (half the bytes written), output="pixels" (uint8 spiral patches: the
              standardisation moves to the training device, `batching.standardise_pixels`, timed separately on
              this CPU), and with the token-buffer pool off (recycle=0), to show what the pool saves.
* reference   astropt==2.0.9 `GalaxyImageDataset.process_galaxy` (spiral=True) with a per-patch standardisation
              transform like the reference train script's `normalise` (torch.std_mean over each patch, float16 out).
              The reference reads JPEGs with torchvision.io, which does not import beside torch 2.13 CPU: we
              decode with PIL instead, give it the (C, H, W) tensor cast to bfloat16 as its loader does, and put a
              dummy `torchvision` module in sys.modules so that `astropt.local_datasets` imports.

Each repeat times every path once, in turn, so that a shared machine's changing load hits all of them alike; the
ratios are computed per repeat (paired) and reported as median and range.

Run: python benchmarks/data_pipeline.py [--n 200] [--size 512] [--batch 32] [--repeats 5] [--markdown]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm


def make_cutouts(d: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """Galaxy-like RGB JPEGs: a Sersic-ish bulge + inclined exponential disc with spiral modulation, a couple of
    field stars, sky noise; colours vary with the bulge fraction. Quality 90, like survey viewer cutouts."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    paths = []
    for i in range(n):
        c = size / 2 + rng.normal(0, 3, 2)
        q, pa = rng.uniform(0.3, 1.0), rng.uniform(0, np.pi)
        dx, dy = xx - c[1], yy - c[0]
        u = dx * np.cos(pa) + dy * np.sin(pa)
        v = (-dx * np.sin(pa) + dy * np.cos(pa)) / q
        r = np.hypot(u, v) + 1e-3
        rd = rng.uniform(8, 40) * size / 256
        bt = rng.uniform(0, 1)
        bulge = np.exp(-7.67 * ((r / (0.4 * rd)) ** 0.25))
        disc = np.exp(-r / rd) * (1 + 0.4 * np.cos(2 * np.arctan2(v, u) - 2 * np.log(r / rd + 1e-3)))
        gal = bt * bulge / max(bulge.max(), 1e-6) + (1 - bt) * disc
        colour = np.array([0.55 + 0.4 * bt, 0.75, 1.0 - 0.3 * bt], np.float32)
        img = gal[..., None] * colour * rng.uniform(120, 230)
        for _ in range(rng.integers(0, 4)):
            sy, sx = rng.uniform(0, size, 2)
            img += (np.exp(-((yy - sy) ** 2 + (xx - sx) ** 2) / (2 * 2.0**2)) * rng.uniform(50, 250))[..., None]
        img += 12 + rng.normal(0, 5, img.shape)
        p = d / f"gal{i:04d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, format="JPEG", quality=90)
        paths.append(p)
    return paths


def bench(fn, n_images: int, repeats: int) -> tuple[float, float]:
    """(best, median) images per CPU-second over `repeats` runs of fn() (which processes n_images).

    CPU time of this process (user + system, so page faults count), not wall time: on a shared machine the wall
    clock also counts the time other processes hold the core. With one thread this is images/s per core.
    """
    rates = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        rates.append(n_images / (time.process_time() - t))
    return max(rates), float(np.median(rates))


def decode_only(paths):
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        a = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert a.shape[2] == 3


def ours_pass(data_dir: str, batch: int, threads: int = 1) -> int:
    """One cold pass: open the folder, stream it once, tokenise every batch."""
    from astrolom.data.sources import open_source
    from astrolom.data.stream import RecordStream, TokenBatches

    src = open_source(data_dir, threads=threads)
    n = 0
    for b in TokenBatches(RecordStream(src, split=None, shuffle=False, epochs=1), batch, patch_size=16):
        n += b["tokens"].shape[0]
    src.close()
    return n


def ours_steady(data_dir: str, batch: int, n_images: int, threads: int = 1, output: str = "float32", recycle: int = 2):
    """Steady state, as in training: one open source and an endless shuffled stream; returns a function that
    pulls the next n_images worth of batches (warmed up by two batches first)."""
    from astrolom.data.sources import open_source
    from astrolom.data.stream import RecordStream, TokenBatches

    src = open_source(data_dir, threads=threads)
    stream = RecordStream(src, split=None, shuffle=True, epochs=None)
    it = iter(TokenBatches(stream, batch, patch_size=16, output=output, recycle=recycle))
    for _ in range(2):
        next(it)
    n_batches = -(-n_images // batch)

    def run():
        for _ in range(n_batches):
            b = next(it)
            assert len(b["object_id"]) == batch

    return run, n_batches * batch


def standardise_fn(data_dir: str, batch: int):
    """(images, fn): fn runs `standardise_pixels` on one output="pixels" batch a few times (what the device does)."""
    from astrolom.data.batching import standardise_pixels
    from astrolom.data.sources import open_source
    from astrolom.data.stream import RecordStream, TokenBatches

    src = open_source(data_dir)
    b = next(iter(TokenBatches(RecordStream(src, split=None, shuffle=False, epochs=1), batch, output="pixels")))
    src.close()
    reps = 3
    return reps * batch, lambda: [standardise_pixels(b["pixels"], b["scale"]) for _ in range(reps)]


def reference_dataset():
    if "torchvision" not in sys.modules:
        tv = types.ModuleType("torchvision")
        tv.io = types.ModuleType("torchvision.io")
        sys.modules["torchvision"], sys.modules["torchvision.io"] = tv, tv.io
    from astropt.local_datasets import GalaxyImageDataset
    from astropt.model import ModalityConfig, ModalityRegistry

    def standardise_patches(x):  # per-patch standardisation, as the reference train script's transform
        std, mean = torch.std_mean(x, dim=1, keepdim=True)
        return ((x - mean) / (std + 1e-8)).to(torch.float16)

    registry = ModalityRegistry(
        [ModalityConfig(name="images", input_size=16 * 16 * 3, pos_input_size=1, patch_size=16, embed_pos=True)]
    )
    return GalaxyImageDataset(
        paths=None, spiral=True, transform={"images": standardise_patches}, modality_registry=registry
    )


def reference(paths, ds):
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        a = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        x = torch.from_numpy(a.copy()).permute(2, 0, 1).to(torch.bfloat16)  # (C, H, W) as torchvision.io gives
        tokens = ds.process_galaxy(x)
        assert tokens.shape[1] == 768


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="number of JPEG cutouts")
    ap.add_argument("--size", type=int, default=512, help="cutout size in pixels")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-n", type=int, default=50, help="images for the (slow) reference path")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "cutouts"
        d.mkdir()
        paths = make_cutouts(d, args.n, args.size)
        mb = sum(p.stat().st_size for p in paths) / 2**20
        decode_only(paths)  # warm the page cache and PIL
        ours_pass(str(d), args.batch)

        # every path once per repeat, in turn: the load of a shared machine then hits all of them alike, and the
        # ratios are taken per repeat (paired), not between runs minutes apart
        paths_to_time = [("decode", "JPEG decode alone (PIL -> uint8 numpy)", lambda: decode_only(paths), args.n)]
        for key, output, recycle, label in (
            ("ours", "float32", 2, f"ours, steady state: RecordStream -> TokenBatches(b={args.batch}), float32"),
            ("bfloat16", "bfloat16", 2, "ours, steady state, output=bfloat16 (bfloat16 tokens)"),
            ("pixels", "pixels", 2, "ours, steady state, output=pixels (uint8 patches for the device)"),
            ("no_pool", "float32", 0, "ours, steady state, float32, buffer pool off (recycle=0)"),
        ):
            run, n_run = ours_steady(str(d), args.batch, args.n, output=output, recycle=recycle)
            paths_to_time.append((key, label, run, n_run))
        paths_to_time.append(
            ("cold", "ours, one cold pass (open + stream + tokens, fresh buffers)",
             lambda: ours_pass(str(d), args.batch), args.n)
        )  # fmt: skip
        n_std, std_fn = standardise_fn(str(d), args.batch)
        paths_to_time.append(
            ("device", f"standardise_pixels on this CPU (the device half of output=pixels, b={args.batch})",
             std_fn, n_std)
        )  # fmt: skip
        ds = None
        try:
            ds = reference_dataset()
            ref_paths = paths[: args.ref_n]
            reference(ref_paths[:2], ds)
            paths_to_time.append(
                ("ref", "reference astropt 2.0.9 process_galaxy(spiral=True)",
                 lambda: reference(ref_paths, ds), len(ref_paths))
            )  # fmt: skip
        except ImportError as err:
            print(f"(reference path skipped: {err})", file=sys.stderr)
        rates: dict[str, list[float]] = {key: [] for key, *_ in paths_to_time}
        for _ in tqdm(range(args.repeats), desc="repeats", unit="repeat"):
            for key, _, fn, n_images in paths_to_time:
                rates[key].append(bench(fn, n_images, 1)[0])
        rows = [(label, n_images, rates[key]) for key, label, _, n_images in paths_to_time]
        steady2, n2 = ours_steady(str(d), args.batch, args.n, threads=2)
        t = time.perf_counter()
        steady2()
        wall2 = n2 / (time.perf_counter() - t)

        # sanity: both paths compute the same tokens (up to the reference's bfloat16/float16 rounding)
        check = ""
        if ds is not None:
            from astrolom.data.batching import tokenize_records
            from astrolom.data.sources import open_source

            rec = next(open_source(str(paths[0])).records())
            mine = tokenize_records([rec], 16)["tokens"][0]
            a = np.asarray(Image.open(paths[0]).convert("RGB"))
            theirs = ds.process_galaxy(torch.from_numpy(a.copy()).permute(2, 0, 1).to(torch.bfloat16)).float()
            check = f"max |ours - reference| token difference on one image: {(mine - theirs).abs().max():.3f}"

    header = (
        f"{args.n} JPEG cutouts {args.size}x{args.size} RGB ({mb:.1f} MiB), patch 16, 1 thread; images per CPU-second "
        f"(= img/s per core), best and median of {args.repeats} repeats (all paths in turn in each repeat)"
    )
    if args.markdown:
        print(f"{header}\n")
        print("| path | images | best img/s/core | median img/s/core |")
        print("|---|---:|---:|---:|")
        for name, n, r in rows:
            print(f"| {name} | {n} | {max(r):.1f} | {statistics.median(r):.1f} |")
    else:
        print(header)
        print(f"{'path':<80} {'images':>6} {'best img/s':>11} {'median':>8}")
        for name, n, r in rows:
            print(f"{name:<80} {n:>6} {max(r):>11.1f} {statistics.median(r):>8.1f}")
    print()

    def ratio(key: str, over: str = "decode") -> str:
        per_repeat = [a / b for a, b in zip(rates[key], rates[over], strict=True)]
        lo, hi = min(per_repeat), max(per_repeat)
        return f"{statistics.median(per_repeat):.2f} (range {lo:.2f}-{hi:.2f} over {len(per_repeat)} paired repeats)"

    print(f"ours / decode, float32 tokens   = {ratio('ours')}; goal >= 0.8")
    print(f"ours / decode, bfloat16 tokens  = {ratio('bfloat16')}")
    print(f"ours / decode, pixels (device)  = {ratio('pixels')}; goal >= 0.8")
    print(f"ours / decode, cold pass        = {ratio('cold')}")
    print(f"buffer pool: float32 with / without = {ratio('ours', 'no_pool')}")
    if "ref" in rates:
        print(f"ours / reference, float32       = {ratio('ours', 'ref')}; goal >= 3")
        print(f"ours / reference, pixels        = {ratio('pixels', 'ref')}")
    print(f"note: ours with 2 decode threads, wall clock: {wall2:.1f} img/s (whole machine, load-dependent)")
    if check:
        print(check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
