"""The demo's stages beside the main pipeline (`astrolom.demo.run_demo`): the outlier search, the multimodal model,
the alignment, the pretraining config they share, and the progress log of every stage."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from astrolom import layout
from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.data.sources import open_source
from astrolom.demo.config import DemoConfig
from astrolom.eval.multimodal import embed_multimodal_dataset, evaluate_generation
from astrolom.eval.probe_cli import write_column_reports
from astrolom.eval.probe_columns import best_column, probe_columns
from astrolom.eval.probes import KEY_TARGETS
from astrolom.log import get_logger
from astrolom.search.index import build_index, load_index
from astrolom.search.outliers import outlier_scores, outliers_figure, precision_at, top_outliers
from astrolom.search.query import open_store
from astrolom.train.pretrain import make_config, pretrain

log = get_logger(__name__)

ALIGN_RUN_DIR = "align"  # the demo's alignment RUN (its evaluation goes to layout.ALIGN_EVAL_DIR)


def stage_start(i: int, n: int, text: str) -> float:
    log.info("\n[%d/%d] %s", i, n, text)
    return time.perf_counter()


def stage_done(t0: float, timings: dict, key: str) -> None:
    timings[key] = round(time.perf_counter() - t0, 1)
    log.info("      done in %.1f s", timings[key])


def detail(text: str) -> None:
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


def train_config(survey: Path, run_dir: Path, preset: str, steps: int, cfg: DemoConfig, extra: list[str]):
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
        detail(f"{survey} has no spectra: multimodal stage skipped")
        return None
    folder = out / layout.MULTIMODAL_DIR
    run_dir = folder / layout.DEMO_RUN_DIR
    spectra_overrides = [
        "model.modalities=images,spectra",
        "model.modality_order=random",
        f"model.spectrum_patch={cfg.spectrum_patch}",
        *([f"data.image_size={cfg.spectra_image_size}"] if cfg.spectra_image_size else []),
    ]
    train_cfg = train_config(survey, run_dir, cfg.spectra_preset, cfg.spectra_steps, cfg, spectra_overrides)
    if not pretrain(train_cfg)["finished"]:
        raise RuntimeError(f"multimodal pretraining stopped before step {cfg.spectra_steps}; see {run_dir}")
    emb_path = folder / layout.EMBEDDINGS_NAME
    embed_multimodal_dataset(
        str(run_dir), str(survey), emb_path, splits=("val", "test"), n_tokens=cfg.embed_tokens, progress=False,
    )  # fmt: skip
    results = probe_columns(emb_path, "auto", cfg.spectra_targets, cfg.spectra_methods, seed=cfg.seed, progress=detail)
    write_column_reports(results, folder / layout.PROBES_DIR)
    gen = evaluate_generation(
        str(run_dir), str(survey), IMAGES, SPECTRA, folder / "generate", n=cfg.spectra_generate,
        n_baseline=max(64, 8 * cfg.spectra_generate),
    )  # fmt: skip
    detail(
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
    res = evaluate_alignment(str(run_dir), None, out / layout.ALIGN_EVAL_DIR, seed=cfg.seed, quick=True, log=detail)
    i2s = res["retrieval"]["image→spectrum"]
    props = res["properties_r2"]
    knn = {
        f"image {kind}": {t: props[f"image {kind} · zero-shot kNN"].get(t) for t in ("redshift", "log_ssfr")}
        for kind in ("aligned", "unaligned")
    }
    detail(
        f"image -> spectrum on {res['pairs']['test']} test pairs: R@10 {i2s['recall@10']:.3f} "
        f"(chance {i2s['chance@10']:.3f}), median rank {i2s['median_rank']:.0f}; image kNN redshift R2 "
        f"{knn['image unaligned']['redshift']:.3f} unaligned -> {knn['image aligned']['redshift']:.3f} aligned"
    )
    return {"pairs": res["pairs"], "retrieval": res["retrieval"], "image_knn_r2": knn}
