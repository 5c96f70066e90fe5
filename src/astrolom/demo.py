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
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from astrolom import layout
from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.data.sources import open_source
from astrolom.eval import baselines as bl
from astrolom.eval.embed import embed_dataset
from astrolom.eval.embeddings import load_embeddings
from astrolom.eval.multimodal import embed_multimodal_dataset, evaluate_generation
from astrolom.eval.probe_cli import write_column_reports, write_report
from astrolom.eval.probe_columns import best_column, probe_columns
from astrolom.eval.probes import (
    DEFAULT_TARGETS,
    HEADLINE_TARGETS,
    KEY_TARGETS,
    ProbeResult,
    evaluate,
    markdown_table,
)
from astrolom.eval.report import build_report
from astrolom.log import get_logger
from astrolom.mock import generate_survey, parse_instrument
from astrolom.model.pretrained import load_model
from astrolom.search.index import build_index, load_index
from astrolom.search.outliers import outlier_scores, outliers_figure, precision_at, top_outliers
from astrolom.search.query import open_store
from astrolom.train.pretrain import make_config, pretrain

log = get_logger(__name__)

ALIGN_RUN_DIR = "align"  # the demo's alignment RUN (its evaluation goes to layout.ALIGN_EVAL_DIR)


@dataclass
class DemoConfig:
    """Everything the demo decides; `--tiny` swaps in `TINY`."""

    n: int = 8000  # mock galaxies (80/10/10 train/val/test)
    size: int = 64  # stamp size in pixels
    patch_size: int = 8  # 64 px / 8 px = an 8x8 token grid, as the paper's central 64 tokens
    preset: str = "1m"
    max_steps: int = 2800
    batch_size: int = 32
    learning_rate: float = 2e-3
    embed_tokens: int = 64  # central spiral tokens averaged per embedding (paper: 64)
    embed_layer: int = -2  # penultimate block (paper)
    # flux-aware tokens (beyond the paper; README "Flux-aware tokens"): better on every probe at 3,000 steps
    flux_features: bool = True
    cnn_epochs: int = 60
    methods: tuple[str, ...] = ("linear", "knn", "mlp")
    seed: int = 0
    umap: bool = True
    inpainting: bool = True
    instrument: str = "all"  # north/south instrument differences of the mock survey (`astrolom survey --instrument`)
    # the optional multimodal stage (0: off): an images + spectra model pretrained for this many steps
    # (on by default at a size that fits the demo's budget: the central 32x32 px in 16 image tokens and 49
    # spectrum tokens of 64 px, about as many tokens per sample as the main model; README has the longer run)
    spectra_steps: int = 300
    spectra_preset: str = "1m"
    spectrum_patch: int = 64  # spectrum pixels per token (the model's default is 32)
    spectra_image_size: int | None = 32  # centre crop of the stamps for the multimodal model (None: whole stamp)
    spectra_generate: int = 32  # test objects whose spectra are generated from their images
    spectra_methods: tuple[str, ...] = ("linear", "knn")  # probes of its embedding columns (MLPs: `astrolom probe`)
    # the targets of those probes: the continuous ones of the main table (telescope and edge_on are image properties,
    # and a logistic probe of a 1,024-wide column takes 12-16 s per class target on 2 cores: 1 min for the four)
    spectra_targets: tuple[str, ...] = tuple(t for t in DEFAULT_TARGETS if t not in ("telescope", "edge_on"))
    # the optional alignment stage (0: off; needs spectra_steps > 0): heads trained this many steps on cached features
    # of the stamps (1 view: no rotation/noise copies, to fit the budget); README "Alignment" has the full-size run
    align_steps: int = 120
    align_views: int = 1
    align_batch: int = 128


TINY = DemoConfig(
    n=240,
    size=32,
    patch_size=8,
    preset="debug",
    max_steps=20,
    batch_size=16,
    learning_rate=2e-3,
    embed_tokens=16,
    cnn_epochs=3,
    methods=("linear", "knn"),
    umap=True,
    inpainting=True,
    spectra_steps=4,
    spectra_preset="debug",
    spectrum_patch=128,
    spectra_image_size=None,
    spectra_generate=4,
    align_steps=6,
    align_views=1,
    align_batch=16,
)


def _stage(i: int, n: int, text: str) -> float:
    log.info("\n[%d/%d] %s", i, n, text)
    return time.perf_counter()


def _done(t0: float, timings: dict, key: str) -> None:
    timings[key] = round(time.perf_counter() - t0, 1)
    log.info("      done in %.1f s", timings[key])


def _detail(text: str) -> None:
    log.info("      %s", text)


def find_outliers(out: Path, embeddings: Path, survey: Path, k: int = 20, label: str = "has_star") -> dict:
    """Index the demo's embeddings, rank them by k-th-neighbour distance, and score the ranking against `label`.

    Writes out/index/ and out/outliers/{outliers.json, outliers.png}; returns the JSON content.
    """
    index = load_index(build_index(embeddings, out / layout.INDEX_DIR, map_method="pca", data=str(survey),
                                   progress=False, log=None))  # fmt: skip
    scores = outlier_scores(index, k, progress=False)
    positive = np.nan_to_num(index.label_values(label).astype(float)) > 0.5
    evaluation = {}
    for frac in (0.01, 0.05):
        p, base, m = precision_at(scores, positive, frac)
        evaluation[f"top_{frac:.0%}"] = {"n": m, "precision": p, "base_rate": base, "lift": p / base if base else None}
    result = {"k": k, "label": label, "evaluation": evaluation}
    folder = out / layout.OUTLIERS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / layout.OUTLIERS_JSON).write_text(json.dumps(result, indent=2))
    outliers_figure(top_outliers(index, 24, k, progress=False), open_store(index, str(survey)), folder / "outliers.png")
    return result


def _train_config(survey: Path, run_dir: Path, preset: str, steps: int, cfg: DemoConfig, extra: list[str]):
    """The demo's pretraining config for one model (a fresh `run_dir`): its shared settings plus `extra` overrides."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return make_config(
        data=survey,
        preset=preset,
        out=run_dir,
        max_steps=steps,
        overrides=[
            f"data.patch_size={cfg.patch_size}",
            *extra,
            f"train.batch_size={cfg.batch_size}",
            f"optim.learning_rate={cfg.learning_rate}",
            f"train.seed={cfg.seed}",
            f"train.eval_interval={max(1, steps // 10)}",
            "train.eval_samples=256",
            "train.checkpoint_interval=0",
            "train.tensorboard=false",
        ],
    )


def multimodal_stage(out: Path, survey: Path, cfg: DemoConfig) -> dict | None:
    """Pretrain an images + spectra model for `cfg.spectra_steps`, embed it per modality, probe each embedding column
    on the same objects and generate spectra from images; everything in out/multimodal/. None without spectra."""
    source = open_source(str(survey), spectra=True)
    try:
        has_spectra = bool(source.metadata.get("wavelength"))
    finally:
        source.close()
    if not has_spectra:
        _detail(f"{survey} has no spectra: multimodal stage skipped")
        return None
    folder = out / layout.MULTIMODAL_DIR
    run_dir = folder / layout.DEMO_RUN_DIR
    spectra_overrides = [
        "model.modalities=images,spectra",
        "model.modality_order=random",
        f"model.spectrum_patch={cfg.spectrum_patch}",
        *([f"data.image_size={cfg.spectra_image_size}"] if cfg.spectra_image_size else []),
    ]
    train_cfg = _train_config(survey, run_dir, cfg.spectra_preset, cfg.spectra_steps, cfg, spectra_overrides)
    if not pretrain(train_cfg)["finished"]:
        raise RuntimeError(f"multimodal pretraining stopped before step {cfg.spectra_steps}; see {run_dir}")
    emb_path = folder / layout.EMBEDDINGS_NAME
    embed_multimodal_dataset(
        str(run_dir), str(survey), emb_path, splits=("val", "test"), n_tokens=cfg.embed_tokens, progress=False,
    )  # fmt: skip
    results = probe_columns(emb_path, "auto", cfg.spectra_targets, cfg.spectra_methods, seed=cfg.seed, progress=_detail)
    write_column_reports(results, folder / layout.PROBES_DIR)
    gen = evaluate_generation(
        str(run_dir), str(survey), IMAGES, SPECTRA, folder / "generate", n=cfg.spectra_generate,
        n_baseline=max(64, 8 * cfg.spectra_generate),
    )  # fmt: skip
    _detail(
        f"images -> spectra on {gen['objects']} test objects: Huber {gen['huber_model']:.4f} "
        f"(mean-spectrum baseline {gen['huber_mean_baseline']:.4f})"
    )
    first = next(iter(results.values()))
    return {
        "rows": first.protocol["rows"],
        "linear": {c: {t: r.score(t, "pretrained", "linear") for t in KEY_TARGETS} for c, r in results.items()},
        "best_column": {t: best_column(results, t) for t in KEY_TARGETS},
        "generation": {k: gen[k] for k in ("objects", "huber_model", "huber_mean_baseline")},
    }


def alignment_stage(out: Path, survey: Path, cfg: DemoConfig) -> dict:
    """Align the main image model with the multimodal model's spectrum half (module docstring): out/align/ holds the
    run, out/align_eval/ the quick evaluation (retrieval, similarity, zero-shot kNN) the report reads."""
    from astrolom.align.evaluate import evaluate_alignment
    from astrolom.align.train import AlignTrainConfig, train_align

    run_dir = out / ALIGN_RUN_DIR
    if run_dir.exists():
        shutil.rmtree(run_dir)
    train_align(
        AlignTrainConfig(
            image_model=str(out / layout.DEMO_RUN_DIR),
            spectrum_model=str(out / layout.MULTIMODAL_DIR / layout.DEMO_RUN_DIR),
            data=str(survey),
            out=str(run_dir),
            steps=cfg.align_steps,
            batch_size=cfg.align_batch,
            views=cfg.align_views,
            eval_interval=max(1, cfg.align_steps // 4),
            checkpoint_interval=0,
            seed=cfg.seed,
        )
    )
    res = evaluate_alignment(str(run_dir), None, out / layout.ALIGN_EVAL_DIR, seed=cfg.seed, quick=True, log=_detail)
    i2s = res["retrieval"]["image→spectrum"]
    props = res["properties_r2"]
    knn = {
        f"image {kind}": {t: props[f"image {kind} · zero-shot kNN"].get(t) for t in ("redshift", "log_ssfr")}
        for kind in ("aligned", "unaligned")
    }
    _detail(
        f"image -> spectrum on {res['pairs']['test']} test pairs: R@10 {i2s['recall@10']:.3f} "
        f"(chance {i2s['chance@10']:.3f}), median rank {i2s['median_rank']:.0f}; image kNN redshift R2 "
        f"{knn['image unaligned']['redshift']:.3f} unaligned -> {knn['image aligned']['redshift']:.3f} aligned"
    )
    return {"pairs": res["pairs"], "retrieval": res["retrieval"], "image_knn_r2": knn}


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
    t0 = _stage(1, n_stages, f"mock Legacy Survey: {cfg.n} galaxies, {cfg.size}x{cfg.size} px g/r/z")
    instrument = list(parse_instrument(cfg.instrument))
    wanted = {"n": cfg.n, "size": cfg.size, "seed": cfg.seed, "instrument": instrument, "spectrum_aperture": "fiber"}
    if _survey_settings(survey) == wanted:
        _detail(f"reusing {survey}")
    else:
        generate_survey(
            survey, n=cfg.n, size=cfg.size, seed=cfg.seed, progress=True, overwrite=True, instrument=instrument
        )
    _done(t0, timings, "survey")

    run_dir = out / layout.DEMO_RUN_DIR
    t0 = _stage(
        2, n_stages, f"pretraining AstroPT-{cfg.preset} for {cfg.max_steps} steps (batch {cfg.batch_size}, CPU)"
    )
    flux = [f"model.flux_features={str(cfg.flux_features).lower()}"]
    train_cfg = _train_config(survey, run_dir, cfg.preset, cfg.max_steps, cfg, flux)
    if not pretrain(train_cfg)["finished"]:
        raise RuntimeError(f"pretraining stopped before step {cfg.max_steps}; see {run_dir}")
    _done(t0, timings, "pretrain")

    t0 = _stage(3, n_stages, "embedding the validation and test splits (pretrained and random-init control)")
    emb_path = out / layout.EMBEDDINGS_NAME
    model, meta = load_model(str(run_dir))
    kw = dict(splits=("val", "test"), layer=cfg.embed_layer, n_tokens=cfg.embed_tokens, batch_size=64)
    embed_dataset(model, str(survey), emb_path, metadata=meta, **kw)
    emb = load_embeddings(emb_path)
    probe_dir = out / layout.PROBES_DIR
    control = bl.random_init_embeddings(
        str(run_dir), str(survey), probe_dir / "embeddings_random_init.parquet", emb, seed=cfg.seed
    )
    _done(t0, timings, "embed")

    t0 = _stage(4, n_stages, "probes: pretrained vs control vs PCA vs photometry vs supervised CNN")
    features, supervised = bl.pixel_baselines(
        str(survey),
        emb,
        targets=list(DEFAULT_TARGETS),
        pixel_crop=cfg.size,
        cnn_epochs=cfg.cnn_epochs,
        seed=cfg.seed,
        progress=_detail,
    )
    probes = evaluate(
        emb,
        list(DEFAULT_TARGETS),
        cfg.methods,
        control=control,
        baselines=features,
        supervised=supervised,
        seed=cfg.seed,
        progress=_detail,
    )
    write_report(probes, probe_dir)
    _done(t0, timings, "probes")

    t0 = _stage(5, n_stages, "similarity index and outliers (FAISS; cosine distance to the 20th neighbour)")
    outliers = find_outliers(out, emb_path, survey)
    _detail(
        "has_star precision in the top 1%: {precision:.3f} (base rate {base_rate:.3f})".format(
            **outliers["evaluation"]["top_1%"]
        )
    )
    _done(t0, timings, "outliers")

    multimodal = None
    if cfg.spectra_steps > 0:
        t0 = _stage(
            6, n_stages, f"multimodal: AstroPT-{cfg.spectra_preset} on images + spectra for {cfg.spectra_steps} steps, "
            "probes per embedding column, spectra generated from images",
        )  # fmt: skip
        multimodal = multimodal_stage(out, survey, cfg)
        _done(t0, timings, "multimodal")

    alignment = None
    if multimodal is not None and cfg.align_steps > 0:
        t0 = _stage(
            7, n_stages, f"alignment: image and spectrum heads for {cfg.align_steps} steps (InfoNCE), retrieval and "
            "zero-shot properties on the test pairs",
        )  # fmt: skip
        alignment = alignment_stage(out, survey, cfg)
        _done(t0, timings, "alignment")

    t0 = _stage(n_stages, n_stages, "report (UMAP, inpainting, figures)")
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
    _done(t0, timings, "report")
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
