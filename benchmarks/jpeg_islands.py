"""Telescope islands (paper Fig. 3) on viewer-rendered JPEGs, paired with flux stamps of the same galaxies.

The paper trained on 512x512 JPEGs from the Legacy Survey viewer; the mock survey can write its stamps that way
(`astrolom survey --format jpeg`, `astrolom.data.display`: north and south both through the viewer's `ls-dr9`
rendering, the scaling the viewer applies to each of them). This benchmark renders the same mock survey (same seed,
size and instrument differences, so the same galaxies under the same noise) twice, as float32 flux stamps and as
8-bit viewer JPEGs, pretrains the same preset for the same steps on each, embeds the val and test splits, and prints
per rendering:

- the telescope's linear-probe accuracy (`astrolom probe --targets telescope --methods linear`, fit on val, scored on
  test), for the pretrained model and its random-init control, against always guessing the commonest telescope;
- the neighbour agreement the report draws (`astrolom.eval.figures.neighbour_agreement`, k=15: of each galaxy's 15
  nearest neighbours, the fraction on its own telescope) in the standardised embedding and in its UMAP map, against
  the same fraction for telescopes assigned at random; islands push it to 1.

Both models use the same tokens (`--flux-features` switches the flux-aware tokens on for both; off, the default, is
the paper's per-patch standardisation, which is what the paper's JPEG models saw). Steps already done in `--out`
(a survey, a run, embeddings) are reused.

    PYTHONPATH=src nice -n 5 python benchmarks/jpeg_islands.py --out DIR [--n 4000] [--max-steps 300]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from astrolom.eval import figures as fg
from astrolom.eval.embeddings import load_embeddings
from astrolom.eval.probes import ProbeResult

RENDERINGS = ("flux", "jpeg")
CONTROL = "random_init"


def _run(cmd: list[str], done: Path) -> None:
    """Run one CLI step unless its output `done` exists (a rerun after an interruption picks up where it stopped)."""
    if done.exists():
        print(f"reusing {done}", file=sys.stderr)
        return
    print("$ " + " ".join(cmd[2:] if cmd[1] == "-m" else cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def pipeline(out: Path, rendering: str, args: argparse.Namespace) -> dict[str, float]:
    """Survey -> pretrain -> embed -> probe for one rendering; the telescope numbers of its table row."""
    cli = [sys.executable, "-m", "astrolom"]
    base = out / rendering
    survey, run, emb, probes = base / "survey", base / "run", base / "embeddings.parquet", base / "probes"
    fmt = f"--format jpeg --jpeg-size {args.size}" if rendering == "jpeg" else ""
    survey_args = f"--n {args.n} --size {args.size} --seed {args.seed} --workers {args.workers} --no-progress {fmt}"
    _run([*cli, "survey", "--out", str(survey), *survey_args.split()], survey / "_survey.json")
    train_args = (
        f"--preset {args.preset} --max-steps {args.max_steps} train.batch_size={args.batch_size} "
        f"train.seed={args.seed} model.flux_features={str(args.flux_features).lower()} train.progress=false "
        "train.tensorboard=false"
    )
    _run([*cli, "pretrain", "--data", str(survey), "--out", str(run), *train_args.split()], run / "final")
    embed = [*cli, "embed", "--model", str(run), "--data", str(survey), "--out", str(emb), "--splits", "val,test"]
    _run([*embed, "--no-progress"], emb)
    probe_args = f"--targets telescope --methods linear --baselines {CONTROL} --seed {args.seed}"
    _run(
        [*cli, "probe", "--embeddings", str(emb), "--out", str(probes), "--model", str(run), *probe_args.split()],
        probes / "probes.json",
    )

    result = ProbeResult.from_json((probes / "probes.json").read_text(), str(probes / "probes.json"))
    row = {
        "probe": result.score("telescope", "pretrained"),
        "probe_control": result.score("telescope", CONTROL),
        "majority": result.majority_accuracy("telescope"),
    }
    control = probes / f"embeddings_{CONTROL}.parquet"
    for name, path in (("", emb), ("_control", control)):
        table = load_embeddings(path)
        tel = np.asarray(table.labels["telescope"])
        e = fg.neighbour_agreement(fg.standardised(table.X), tel)
        m = fg.neighbour_agreement(fg.umap_coords(table.X), tel)
        row |= {f"agree_emb{name}": e["agreement"], f"agree_map{name}": m["agreement"], "agree_random": e["mixed"]}
    row["objects"] = len(tel)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="working folder (surveys, runs, embeddings; reused on a rerun)")
    ap.add_argument("--n", type=int, default=4000, help="objects in the survey (default 4000)")
    ap.add_argument("--size", type=int, default=64, help="stamp and JPEG pixels per side (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="1m")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="survey rendering processes")
    ap.add_argument("--flux-features", action="store_true", help="flux-aware tokens for both models")
    ap.add_argument("--renderings", default=",".join(RENDERINGS), help="which to run (two processes can share --out)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rows = {r: pipeline(out, r, args) for r in args.renderings.split(",")}
    (out / f"jpeg_islands_{'_'.join(rows)}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))

    tokens = "flux-aware" if args.flux_features else "paper (per-patch standardised)"
    print(
        f"\ntelescope from AstroPT-{args.preset} embeddings: {args.n} galaxies, {args.size} px, seed {args.seed}, "
        f"{args.max_steps} steps x batch {args.batch_size}, {tokens} tokens; "
        f"probe fit on val, scored on test; agreement k=15 on val+test"
    )
    print(
        "| stamps | probe, pretrained | probe, random init | majority | agreement, embedding | agreement, UMAP map "
        "| agreement, random init (emb / map) | random assignment | objects |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['probe']:.3f} | {r['probe_control']:.3f} | {r['majority']:.3f} | {r['agree_emb']:.3f} "
            f"| {r['agree_map']:.3f} | {r['agree_emb_control']:.3f} / {r['agree_map_control']:.3f} "
            f"| {r['agree_random']:.3f} | {r['objects']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
