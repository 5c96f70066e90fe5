"""Files on disk: the names astrolom writes, atomic directory writes, and finding the newest checkpoint of a run.

One place for them, so that the trainer that writes a run and the commands that read it (embed, report, scaling,
demo) cannot disagree. Standard library only: every layer may import it.

A model directory (Hugging Face hub layout): `config.json` + `model.safetensors`. A run directory
(`astrolom pretrain --out RUN`)::

    RUN/config.yaml  RUN/config.json  RUN/metrics.jsonl  RUN/metrics.csv  RUN/tb/
    RUN/checkpoints/step-000100/   model files + optimizer.safetensors + trainer_state.json
    RUN/checkpoints/latest         names the newest complete checkpoint
    RUN/final/                     the trained model (a model directory)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
LATEST_NAME = "latest"

RUN_CONFIG_YAML = "config.yaml"
RUN_CONFIG_JSON = "config.json"
METRICS_NAME = "metrics.jsonl"
METRICS_CSV_NAME = "metrics.csv"
TENSORBOARD_DIR = "tb"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"

# the demo's output directory (`astrolom demo --out DIR`); `astrolom report` finds the same names
DEMO_SURVEY_DIR = "survey"
DEMO_RUN_DIR = "run"
EMBEDDINGS_NAME = "embeddings.parquet"
PROBES_DIR = "probes"
PROBES_JSON = "probes.json"
SCALING_JSON = "scaling.json"
DEMO_JSON = "demo.json"
REPORT_NAME = "report.html"
INDEX_DIR = "index"  # `astrolom index` output inside a demo directory
OUTLIERS_DIR = "outliers"  # outliers.json + outliers.png (demo); the report shows them
OUTLIERS_JSON = "outliers.json"
LABEL_EFFICIENCY_MD = "label_efficiency.md"  # `astrolom label-efficiency --out ROOT/label_efficiency`
# `astrolom probe` on a file with several embedding columns: DIR/<column>/probes.json and, comparing them,
COLUMNS_JSON = "columns.json"
COLUMNS_MD = "columns.md"
# the multimodal part of a demo (or any folder given to `astrolom report --multimodal`): a run, embeddings, per-column
# probes in probes/, and `astrolom generate` outputs (GENERATION_JSON + GENERATED_SPECTRA_PNG) in generate*/
MULTIMODAL_DIR = "multimodal"
GENERATION_JSON = "metrics.json"
GENERATED_SPECTRA_PNG = "generated_spectra.png"
# `astrolom eval-align --out DIR`; the report looks in ROOT/align_eval/ (or `--align DIR`)
ALIGN_EVAL_DIR = "align_eval"
ALIGN_EVAL_JSON = "align_eval.json"
ALIGN_EVAL_FIGURES = ("retrieval.png", "tarp.png", "corner.png")
# per-object property predictions (`astrolom probe`, `eval-align`, `finetune`): OUT/predictions/ holds the table, the
# metrics of every (feature set, method, target) and a predicted-vs-true figure per property (`eval.metrics`)
PREDICTIONS_DIR = "predictions"
PREDICTIONS_PARQUET = "predictions.parquet"
PREDICTION_METRICS_JSON = "prediction_metrics.json"

CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, OPTIMIZER_NAME, TRAINER_STATE_NAME)
_TMP_MARK = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def is_complete_checkpoint(d: Path) -> bool:
    return all((d / n).is_file() for n in CHECKPOINT_FILES)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written temporary directories are ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and _TMP_MARK not in p.name and is_complete_checkpoint(p)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `RUN/checkpoints/latest` names; if that is missing or broken, the newest complete one."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_NAME
    if pointer.is_file():
        d = root / pointer.read_text().strip()
        if d.is_dir() and is_complete_checkpoint(d):
            return d
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# --------------------------------------------------------------------------------------------------- atomic writing


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` by rename, so that a reader sees the old or the new text, never a torn one."""
    tmp = path.parent / f".{path.name}{_TMP_MARK}{os.getpid()}"
    write_text_synced(tmp, text)
    os.replace(tmp, path)
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it is fsynced and renamed to `target`.

    An existing `target` is replaced (moved aside first, deleted after the rename). On an exception the temporary
    directory is removed and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}{_TMP_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed writer
    tmp = target.parent / f".{target.name}{_TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}{_TMP_MARK}old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_path(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
