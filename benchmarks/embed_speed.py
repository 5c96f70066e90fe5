"""Embedding extraction: galaxies/s of `astrolom embed` beside the reference AstroPT's (`astropt==2.0.9`).

    python benchmarks/embed_speed.py --data SURVEY_DIR [--model RUN] [--n 512 --batch 64 --patch 8 --repeats 3]

Same model weights (ours exported to the reference `GPT` with `interop.reference.export_reference_checkpoint`), the
same galaxies (the first `--n` of the test split), the same torch threads, CPU fp32, interleaved repeats (medians):

- end to end, ours: `embed_dataset` from the Parquet survey to an embeddings Parquet file (read, decode, vectorised
  spiral tokens, the model up to the penultimate block on the central `--tokens` tokens, write);
- model only, ours: `embed_records` on records already in memory;
- end to end, reference: its `GalaxyImageDataset` (spiral=True, per-patch standardisation as its train script does,
  sequential) reading the same galaxies the way it reads multi-band float data (one FITS file per band), in a
  `DataLoader` (num_workers=0: the same cores), then `GPT.generate_embeddings` (its default: mean over all tokens of
  the middle block; it runs every block);
- model only, reference: `generate_embeddings` on the same tokens already batched in memory.

With 64x64 stamps and 8 px patches both sides embed 64 tokens per galaxy. Rates are galaxies per wall-clock second
and per CPU-second of the process (user + system, all threads; robust to other jobs on a shared machine).
`--data` must be an astrolom mock survey (`astrolom survey --n 2000 --size 64 --out DIR`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_throughput import _cpu_model, _ref_normalise, _reference_modules, _write_fits  # noqa: E402


def _timed(fn, n: int) -> tuple[float, float]:
    """(galaxies per wall second, galaxies per CPU-second of this process) of one call of `fn` over `n` galaxies."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def _reference_gpt(model, ref_model, tmp: Path):
    from astrolom.interop.reference import export_reference_checkpoint

    ckpt = torch.load(export_reference_checkpoint(model, tmp / "ref.pt"), weights_only=True)
    mods = [ref_model.ModalityConfig(**m) for m in ckpt["model_args"]["modalities"]]
    reg = ref_model.ModalityRegistry(mods)
    gpt = ref_model.GPT(ref_model.GPTConfig(**{**ckpt["model_args"], "modalities": mods}), reg, master_process=False)
    gpt.load_state_dict(ckpt["model"])
    return gpt.eval(), reg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="astrolom mock survey directory")
    ap.add_argument("--model", default=None, help="RUN or model directory (default: a fresh --preset model)")
    ap.add_argument("--preset", default="1m")
    ap.add_argument("--patch", type=int, default=8, help="patch size of a fresh model")
    ap.add_argument("--n", type=int, default=512, help="galaxies embedded per measurement")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from astrolom.data.sources import open_source
    from astrolom.data.stream import RecordStream
    from astrolom.eval.embed import embed_dataset, embed_records
    from astrolom.model.astropt import AstroPT
    from astrolom.model.presets import model_config
    from astrolom.model.pretrained import load_model

    ref_model, local_datasets = _reference_modules()
    source = open_source(args.data, spectra=False)
    records = []
    for r in RecordStream(source, split="test", shuffle=False, epochs=1):
        records.append(r)
        if len(records) == args.n:
            break
    source.close()
    n = len(records)
    h, w, c = records[0].image.shape
    if args.model:
        model, _ = load_model(args.model)
    else:
        p = args.patch
        torch.manual_seed(0)
        model = AstroPT(model_config(args.preset, block_size=(h // p) * (w // p), patch_size=p, n_chan=c)).eval()
    p = model.config.patch_size
    T = (h // p) * (w // p)
    if T != args.tokens or T > model.config.block_size:
        raise SystemExit(f"{h}x{w} stamps with {p} px patches make {T} tokens; the comparison needs --tokens {T}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "fits").mkdir()
        paths = _write_fits(records, tmp / "fits")
        gpt, reg = _reference_gpt(model, ref_model, tmp)
        ds = local_datasets.GalaxyImageDataset(
            paths={"images": str(paths)},
            transform={"images": _ref_normalise},
            stochastic=False,
            spiral=True,
            modality_registry=reg,
        )

        def ref_end_to_end():
            out = []
            with torch.no_grad():
                for b in torch.utils.data.DataLoader(ds, batch_size=args.batch, num_workers=0):
                    inputs = {"images": b["images"].float(), "images_positions": b["images_positions"]}
                    out.append(gpt.generate_embeddings(inputs)["images"].numpy())
            return np.concatenate(out)

        batches = []
        for b in torch.utils.data.DataLoader(ds, batch_size=args.batch, num_workers=0):
            batches.append({"images": b["images"].float(), "images_positions": b["images_positions"]})

        def ref_model_only():
            with torch.no_grad():
                return np.concatenate([gpt.generate_embeddings(x)["images"].numpy() for x in batches])

        def ours_end_to_end():
            embed_dataset(model, args.data, tmp / "emb.parquet", splits=("test",), batch_size=args.batch,
                          n_tokens=args.tokens, max_per_split=n, device="cpu", progress=False)  # fmt: skip

        def ours_model_only():
            return np.concatenate(
                [e for _, e in embed_records(model, records, batch_size=args.batch, n_tokens=args.tokens)]
            )

        assert ref_end_to_end().shape == (n, model.config.n_embd) and ours_model_only().shape[0] == n  # warm-up
        ours_end_to_end()
        runs = {
            "end to end: ours (Parquet -> embed_dataset -> Parquet)": ours_end_to_end,
            "end to end: reference (GalaxyImageDataset, FITS -> generate_embeddings)": ref_end_to_end,
            "model only: ours (embed_records, in memory)": ours_model_only,
            "model only: reference (generate_embeddings, batched tokens)": ref_model_only,
        }
        results = {k: [] for k in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                results[name].append(_timed(fn, n))

    wall = {k: statistics.median(x for x, _ in v) for k, v in results.items()}
    cpu = {k: statistics.median(y for _, y in v) for k, v in results.items()}
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {_cpu_model()}",
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "threads": args.threads,
        "model": args.model or f"fresh {args.preset}",
        "params": model.num_params(),
        "galaxies": n,
        "tokens_per_galaxy": T,
        "batch": args.batch,
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
    }
    print(json.dumps(info))
    head = f"measurement (median of {args.repeats}, {n} galaxies)"
    print(f"\n| {head} | galaxies/s wall | vs ref. | galaxies/CPU-s | vs ref. |")
    print("|---|---:|---:|---:|---:|")
    for name in results:
        peer = next(k for k in results if k.startswith(name.split(":")[0]) and "reference" in k)
        print(
            f"| {name} | {wall[name]:,.0f} | {wall[name] / wall[peer]:.2f}x | {cpu[name]:,.0f} | "
            f"{cpu[name] / cpu[peer]:.2f}x |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results, "wall": wall, "cpu": cpu}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
