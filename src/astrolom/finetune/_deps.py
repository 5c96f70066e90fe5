"""The project pieces fine-tuning reuses, imported in one place.

Model loading and the data readers are being moved between modules; keeping every cross-package import here means a
rename touches one file.
"""

from __future__ import annotations

from astrolom.data import tokens as tok
from astrolom.data.sources import open_source
from astrolom.data.stream import RecordStream
from astrolom.data.survey import N_VOLUNTEERS
from astrolom.eval.baselines import train_cnn
from astrolom.eval.embed import DEFAULT_LAYER, DEFAULT_TOKENS, load_model, prefix_crop
from astrolom.eval.probes import CLASSIFICATION, REGRESSION, fit_probe, primary_metric, score, target_kind
from astrolom.model.astropt import AstroPT
from astrolom.train.checkpoint import (
    atomic_directory,
    capture_rng_state,
    checkpoint_name,
    flatten_state,
    latest_checkpoint,
    mark_latest,
    prune_checkpoints,
    restore_rng_state,
    save_pretrained,
    unflatten_state,
)
from astrolom.train.parallel import autocast, configure_backends, resolve_precision

__all__ = [
    "AstroPT",
    "CLASSIFICATION",
    "DEFAULT_LAYER",
    "DEFAULT_TOKENS",
    "N_VOLUNTEERS",
    "REGRESSION",
    "RecordStream",
    "atomic_directory",
    "autocast",
    "capture_rng_state",
    "checkpoint_name",
    "configure_backends",
    "fit_probe",
    "flatten_state",
    "latest_checkpoint",
    "load_model",
    "mark_latest",
    "open_source",
    "prefix_crop",
    "primary_metric",
    "prune_checkpoints",
    "resolve_precision",
    "restore_rng_state",
    "save_pretrained",
    "score",
    "target_kind",
    "tok",
    "train_cnn",
    "unflatten_state",
]
