"""`astrolom demo --out DIR`: the whole AstroPT story on a laptop CPU in about a quarter of an hour.

1. generate a mock DESI Legacy Survey (GalSim stamps with true physics, two telescopes);
2. pretrain a small AstroPT on its training split;
3. embed the validation and test splits (penultimate layer, mean of the central spiral tokens);
4. probe the embeddings (linear, kNN, MLP) against a random-init control of the same model, PCA of pixels,
   aperture photometry and a supervised CNN: fit on the validation split, score on the test split;
5. write DIR/report.html (loss curves, probe table, the photo-z panel, UMAP, telescope islands, inpainting, config,
   environment). The photo-z panel is the pretrained model's redshift probe on the test split: sigma_NMAD, bias and
   outlier fraction eta (`astrolom.eval.metrics`) beside the control and baselines, and the predicted-vs-true figure.

Then (`--spectra-steps N`, 0 turns it off): before the report, pretrain a small images + spectra model
(`model.modalities=images,spectra model.modality_order=random`) for N steps on the same survey, embed it per
modality, probe each embedding column on the same objects (the continuous targets: a logistic probe of the 8×-wide
spectrum readout costs a minute per class target, and the instrument and inclination are the main table's) and
generate spectra from images against the mean spectrum (DIR/multimodal/; the report's Multimodal section).
Then (`--align-steps N`, 0 turns it off; needs the multimodal stage): align the main image model with the
multimodal model read on spectra alone (its spectrum-first samples trained it as a spectra-only next-token model) by
training AstroCLIP-style cross-attention heads for N steps on cached features (DIR/align/), and score retrieval and
zero-shot kNN properties on the test pairs (`eval-align --quick`, DIR/align_eval/; the report's Alignment section).

It logs progress for every stage (stderr) and prints, at the end, where the report is and a table of the key numbers,
plus whether the science checks hold (pretrained beats the control and PCA on redshift, stellar mass and g - r; the
telescope is predictable). `astrolom demo` exits with status 1 when a check fails. `--tiny` runs the same pipeline
at toy size for CI (a few minutes on a loaded 2-core machine; 20 steps need not pass the checks).

Layout of DIR: survey/ (data), run/ (pretraining RUN: metrics, checkpoints, final/), embeddings.parquet,
probes/ (probes.json, probes.md, figure, control embeddings, predictions/ with the per-object test predictions, their
metrics and figures), figures/, report.html, demo.json (settings, timings, key numbers, photo-z, checks); with
`--spectra-steps`, multimodal/ (run/, embeddings.parquet, probes/ with columns.json, generate/ with metrics.json and
the generated spectra); with `--align-steps`, align/ (the alignment RUN) and align_eval/ (align_eval.json, retrieval
figure, predictions/).

Defaults and why (measured on 2 CPU cores; see the report's timings): 64x64 stamps cut into 8x8-pixel patches give
the paper's 64-token sequences (an 8x8 grid in the same centre-out spiral) at a cost a CPU can pay; 16x16 patches
leave only 16 tokens per 64 px stamp and gave clearly worse embeddings for the same time. The 1m preset (paper
Table 1) at a peak learning rate of 2e-3 (the paper's 1e-3 is tuned for far longer runs) for 2800 steps of 32 stamps
(about 14 passes over the 6400 training stamps; cut from 3000 to keep the whole demo under 15 min on a slow day)
beats the random-init control and PCA of pixels on redshift, stellar mass and g - r by a wide margin; 400 steps did
not beat PCA, 1000 steps did, narrowly.

This module is the pipeline and the CLI; `astrolom.demo.config` holds the settings (`DemoConfig`, `TINY`) and
`astrolom.demo.stages` the outlier, multimodal and alignment stages and the progress log they share.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from astrolom import layout
from astrolom.demo.config import TINY, DemoConfig
from astrolom.demo.stages import (
    alignment_stage,
    detail,
    find_outliers,
    multimodal_stage,
    stage_done,
    stage_start,
    train_config,
)
from astrolom.eval import baselines as bl
from astrolom.eval.embed import embed_dataset
from astrolom.eval.embeddings import load_embeddings
from astrolom.eval.probe_cli import write_report
from astrolom.eval.probes import DEFAULT_TARGETS, HEADLINE_TARGETS, KEY_TARGETS, ProbeResult, evaluate, markdown_table
from astrolom.eval.report import build_report
from astrolom.log import get_logger
from astrolom.mock import generate_survey, parse_instrument
from astrolom.model.pretrained import load_model
from astrolom.train.pretrain import pretrain

log = get_logger(__name__)


def checks(probes: ProbeResult, outliers: dict | None = None, alignment: dict | None = None) -> dict[str, bool]:
    """The science acceptance checks on a probe result (linear probes, test split), the outlier ranking and the
    alignment's retrieval."""
    out = {}
    for t in KEY_TARGETS:
        pre = probes.score(t, "pretrained", "linear")
        if pre is None:
            continue
        for other in ("random_init", "pca_pixels"):
            theirs = probes.score(t, other, "linear")
            if theirs is not None:
                out[f"{t}: pretrained > {other}"] = bool(pre > theirs)
    acc = probes.score("telescope", "pretrained", "linear")
    if acc is not None:
        out["telescope predictable (accuracy > majority class)"] = bool(acc > probes.majority_accuracy("telescope"))
    top = outliers["evaluation"]["top_1%"] if outliers is not None else None
    if top is not None and top["n"] >= 10:  # a precision over fewer ranked objects says little (the --tiny demo)
        name = "outliers: has_star precision in the top 1% > 3x its base rate"
        out[name] = bool(top["precision"] > 3 * top["base_rate"])
    if alignment is not None and alignment["pairs"]["test"] >= 100:  # the --tiny demo's few pairs say little
        r = alignment["retrieval"]["image→spectrum"]
        out["alignment: image -> spectrum recall@10 > 5x chance"] = bool(r["recall@10"] > 5 * r["chance@10"])
    return out


def key_table(probes: ProbeResult) -> str:
    """Plain-text table: linear-probe R2 (accuracy for classes) per feature set for the headline targets."""
    sets = [s for s in probes.feature_sets if s in ("pretrained", "random_init", "pca_pixels", "photometry", "cnn")]
    rows = [t for t in HEADLINE_TARGETS if t in probes.targets]
    lines = [f"{'target (metric)':<24}" + "".join(f"{s:>12}" for s in sets)]
    for t in rows:
        vals = [probes.score(t, s, "linear") for s in sets]
        cells = "".join(f"{'-' if v is None else f'{v:.3f}':>12}" for v in vals)
        lines.append(f"{t + ' (' + probes.metric(t) + ')':<24}" + cells)
    return "\n".join(lines)


def run_demo(out: str | Path, cfg: DemoConfig, *, fresh: bool = False) -> dict:
    """Run the five stages into `out`; returns the demo summary (also written to out/demo.json)."""
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    n_stages = 6 + (cfg.spectra_steps > 0) + (cfg.spectra_steps > 0 and cfg.align_steps > 0)
    log.info("astrolom demo -> %s\nsettings: %s", out, json.dumps(asdict(cfg)))

    survey = out / layout.DEMO_SURVEY_DIR
    t0 = stage_start(1, n_stages, f"mock Legacy Survey: {cfg.n} galaxies, {cfg.size}x{cfg.size} px g/r/z")
    instrument = list(parse_instrument(cfg.instrument))
    wanted = {"n": cfg.n, "size": cfg.size, "seed": cfg.seed, "instrument": instrument, "spectrum_aperture": "fiber"}
    if _survey_settings(survey) == wanted:
        detail(f"reusing {survey}")
    else:
        generate_survey(
            survey, n=cfg.n, size=cfg.size, seed=cfg.seed, progress=True, overwrite=True, instrument=instrument
        )
    stage_done(t0, timings, "survey")

    run_dir = out / layout.DEMO_RUN_DIR
    t0 = stage_start(
        2, n_stages, f"pretraining AstroPT-{cfg.preset} for {cfg.max_steps} steps (batch {cfg.batch_size}, CPU)"
    )
    flux = [f"model.flux_features={str(cfg.flux_features).lower()}"]
    train_cfg = train_config(survey, run_dir, cfg.preset, cfg.max_steps, cfg, flux)
    if not pretrain(train_cfg)["finished"]:
        raise RuntimeError(f"pretraining stopped before step {cfg.max_steps}; see {run_dir}")
    stage_done(t0, timings, "pretrain")

    t0 = stage_start(3, n_stages, "embedding the validation and test splits (pretrained and random-init control)")
    emb_path = out / layout.EMBEDDINGS_NAME
    model, meta = load_model(str(run_dir))
    kw = dict(splits=("val", "test"), layer=cfg.embed_layer, n_tokens=cfg.embed_tokens, batch_size=64)
    embed_dataset(model, str(survey), emb_path, metadata=meta, **kw)
    emb = load_embeddings(emb_path)
    probe_dir = out / layout.PROBES_DIR
    control = bl.random_init_embeddings(
        str(run_dir), str(survey), probe_dir / "embeddings_random_init.parquet", emb, seed=cfg.seed
    )
    stage_done(t0, timings, "embed")

    t0 = stage_start(4, n_stages, "probes: pretrained vs control vs PCA vs photometry vs supervised CNN")
    features, supervised = bl.pixel_baselines(
        str(survey),
        emb,
        targets=list(DEFAULT_TARGETS),
        pixel_crop=cfg.size,
        cnn_epochs=cfg.cnn_epochs,
        seed=cfg.seed,
        progress=detail,
    )
    probes = evaluate(
        emb,
        list(DEFAULT_TARGETS),
        cfg.methods,
        control=control,
        baselines=features,
        supervised=supervised,
        seed=cfg.seed,
        progress=detail,
    )
    write_report(probes, probe_dir)
    stage_done(t0, timings, "probes")

    t0 = stage_start(5, n_stages, "similarity index and outliers (FAISS; cosine distance to the 20th neighbour)")
    outliers = find_outliers(out, emb_path, survey)
    detail(
        "has_star precision in the top 1%: {precision:.3f} (base rate {base_rate:.3f})".format(
            **outliers["evaluation"]["top_1%"]
        )
    )
    stage_done(t0, timings, "outliers")

    multimodal = None
    if cfg.spectra_steps > 0:
        t0 = stage_start(
            6, n_stages, f"multimodal: AstroPT-{cfg.spectra_preset} on images + spectra for {cfg.spectra_steps} steps, "
            "probes per embedding column, spectra generated from images",
        )  # fmt: skip
        multimodal = multimodal_stage(out, survey, cfg)
        stage_done(t0, timings, "multimodal")

    alignment = None
    if multimodal is not None and cfg.align_steps > 0:
        t0 = stage_start(
            7, n_stages, f"alignment: image and spectrum heads for {cfg.align_steps} steps (InfoNCE), retrieval and "
            "zero-shot properties on the test pairs",
        )  # fmt: skip
        alignment = alignment_stage(out, survey, cfg)
        stage_done(t0, timings, "alignment")

    t0 = stage_start(n_stages, n_stages, "report (UMAP, inpainting, figures)")
    summary = {
        "settings": asdict(cfg),
        "timings_s": timings,
        "checks": checks(probes, outliers, alignment),
        "key_numbers": _key_numbers(probes),
        "photo_z": photo_z(probes),
        "outliers": outliers["evaluation"],
    }
    if multimodal is not None:
        summary["multimodal"] = multimodal
    if alignment is not None:
        summary["alignment"] = alignment
    (out / layout.DEMO_JSON).write_text(json.dumps(summary, indent=2))
    mm_dir = str(out / layout.MULTIMODAL_DIR) if multimodal is not None else None
    report = build_report(out, umap=cfg.umap, inpainting=cfg.inpainting, multimodal=mm_dir)
    stage_done(t0, timings, "report")
    summary["timings_s"] = timings
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    summary["report"] = str(report)
    (out / layout.DEMO_JSON).write_text(json.dumps(summary, indent=2))  # the report shows the run before this stage
    print("\n" + markdown_table(probes).split("\n\n")[0])
    print("\nlinear probes on the test split (R2; accuracy for telescope):")
    print(key_table(probes))
    if summary["photo_z"]:
        print("\nphoto-z of the linear probe on the test split (sigma_NMAD, bias = median dz/(1+z), eta):")
        for name, m in summary["photo_z"].items():
            print(f"  {name:<12} sigma_NMAD {m['sigma_nmad']:.4f}  bias {m['bias']:+.4f}  eta {m['eta']:.3f}")
    print("\nchecks:")
    for k, v in summary["checks"].items():
        print(f"  [{'ok' if v else 'FAIL'}] {k}")
    print(f"\ntotal {summary['seconds'] / 60:.1f} min; timings (s): {json.dumps(timings)}")
    print(f"report: {report}")
    return summary


def _survey_settings(survey: Path) -> dict | None:
    """(n, size, seed, instrument, spectrum_aperture) of a survey already on disk, or None."""
    try:
        c = json.loads((survey / "_survey.json").read_text())["config"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None
    return {k: c.get(k) for k in ("n", "size", "seed", "instrument", "spectrum_aperture")}


def photo_z(probes: ProbeResult, method: str = "linear") -> dict[str, dict[str, float]]:
    """{feature set: {"sigma_nmad", "bias", "eta"}} of the redshift probe (`method`; the CNN's own predictions)."""
    return {
        s: {k: probes.score("redshift", s, method, k) for k in ("sigma_nmad", "bias", "eta")}
        for s in probes.feature_sets
        if probes.score("redshift", s, method, "sigma_nmad") is not None
    }


def _key_numbers(probes: ProbeResult) -> dict:
    return {t: {s: probes.score(t, s, "linear") for s in probes.feature_sets} for t in probes.targets}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tiny", action="store_true", help="toy sizes for CI (well under 2 minutes)")
    parser.add_argument("--n", type=int, default=None, help=f"mock galaxies (default {d.n})")
    parser.add_argument("--size", type=int, default=None, help=f"stamp size in px (default {d.size})")
    parser.add_argument("--patch-size", type=int, default=None, help=f"patch size in px (default {d.patch_size})")
    parser.add_argument("--preset", default=None, help=f"model preset (default {d.preset})")
    parser.add_argument("--max-steps", type=int, default=None, help=f"pretraining steps (default {d.max_steps})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"pretraining batch (default {d.batch_size})")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.learning_rate})")
    parser.add_argument("--embed-tokens", type=int, default=None, help=f"tokens averaged (default {d.embed_tokens})")
    parser.add_argument("--cnn-epochs", type=int, default=None, help=f"CNN baseline epochs (default {d.cnn_epochs})")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-umap", action="store_true")
    parser.add_argument(
        "--flux-features",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"flux-aware image tokens for the main model (default {d.flux_features}; --no-flux-features: the "
        "paper's tokenisation)",
    )
    parser.add_argument(
        "--instrument",
        default=None,
        help="north/south instrument differences of the mock survey (default all; see `astrolom survey --help`)",
    )
    parser.add_argument(
        "--spectra-steps",
        type=int,
        default=None,
        help="pretrain an images + spectra model for this many steps, probe each modality's embeddings and "
        f"generate spectra from images (default {d.spectra_steps}; 0: skip the stage)",
    )
    parser.add_argument(
        "--align-steps",
        type=int,
        default=None,
        help="align the image model with the multimodal model's spectrum half for this many head steps and score "
        f"retrieval and zero-shot properties (default {d.align_steps}; 0: skip; needs --spectra-steps > 0)",
    )
    parser.add_argument("--fresh", action="store_true", help="delete --out first (the survey is reused otherwise)")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    base = TINY if args.tiny else DemoConfig()
    changes = {
        "n": args.n,
        "size": args.size,
        "patch_size": args.patch_size,
        "preset": args.preset,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "embed_tokens": args.embed_tokens,
        "cnn_epochs": args.cnn_epochs,
        "seed": args.seed,
        "instrument": args.instrument,
        "spectra_steps": args.spectra_steps,
        "align_steps": args.align_steps,
        "flux_features": args.flux_features,
    }
    cfg = DemoConfig(**{**asdict(base), **{k: v for k, v in changes.items() if v is not None}})
    if args.no_umap:
        cfg.umap = False
    if cfg.spectra_steps <= 0 and args.align_steps:  # the default alignment simply follows the multimodal stage off
        raise ValueError(
            "--align-steps needs the multimodal stage, whose model is the spectrum encoder (--spectra-steps)"
        )
    if cfg.size % cfg.patch_size:
        raise ValueError(f"--size {cfg.size} is not a multiple of --patch-size {cfg.patch_size}")
    return cfg


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when every science check passed, 1 when one failed (the run's outputs are written either way)."""
    summary = run_demo(args.out, config_from_args(args), fresh=args.fresh)
    failed = [k for k, ok in summary["checks"].items() if not ok]
    if failed:
        log.error("%d science check(s) failed: %s", len(failed), "; ".join(failed))
        return 1
    return 0
