"""Training checkpoints: safetensors + JSON, written atomically, loaded without unpickling anything.

Loading a trained model is `astrolom.model.pretrained` (`from_pretrained`, `load_model`); a training checkpoint is a
model directory (config.json + model.safetensors) plus the trainer state, so that `astrolom pretrain --resume`
continues exactly:

    optimizer.safetensors   AdamW moments and step counts (tensors only)
    trainer_state.json      step, tokens seen, FLOPs, scheduler, the optimiser's non-tensor state, and per rank the RNG
                            states (python, numpy, torch CPU and CUDA) and the data stream position

A run directory (`astrolom pretrain --out RUN`; the names live in `astrolom.layout`):

    RUN/config.yaml              resolved PretrainConfig (reload with --config); config.json the same as JSON
                                 plus what the data decided (model block_size / n_chan, image size)
    RUN/metrics.jsonl            one JSON object per step (loss, val_loss, lr, grad_norm, tokens, FLOPs, tokens/s, MFU)
    RUN/metrics.csv              the same as a table
    RUN/tb/                      TensorBoard events
    RUN/checkpoints/step-000100/ training checkpoints (every train.checkpoint_interval steps, log-spaced ones, the end)
    RUN/checkpoints/latest       text file naming the newest complete checkpoint (replaced atomically)
    RUN/final/                   the trained model in the pretrained layout

Every directory is written under a temporary name, flushed to disk and renamed, and `latest` is rewritten by rename
only afterwards, so a process killed at any moment leaves the previous checkpoint intact and `latest` pointing at a
complete directory. Leftover temporary directories are ignored and cleared on the next save.

Fault injection for tests: ``ASTROLOM_FAULT=in-checkpoint:<step>`` (`astrolom.train.fault`) SIGKILLs the process
halfway through writing the checkpoint of that step (weights written, optimiser state not yet).
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# FINAL_DIR, checkpoint_name and the pretrained-model functions live in astrolom.layout / astrolom.model.pretrained
# since issue 7; they stay importable from here (same objects) for code written against their old home.
from astrolom.layout import (
    CHECKPOINT_FILES,
    CHECKPOINTS_DIR,
    CONFIG_NAME,
    FINAL_DIR,  # noqa: F401
    LATEST_NAME,
    OPTIMIZER_NAME,
    TRAINER_STATE_NAME,
    WEIGHTS_NAME,
    atomic_directory,
    atomic_write_text,
    checkpoint_name,  # noqa: F401
    latest_checkpoint,
    list_checkpoints,
    write_text_synced,
)
from astrolom.model.pretrained import (
    from_pretrained,  # noqa: F401
    model_config_json,  # noqa: F401
    read_config,  # noqa: F401
    resolve_model_dir,  # noqa: F401
    save_pretrained,  # noqa: F401
    write_model_files,
)
from astrolom.train.fault import IN_CHECKPOINT, fault_point

# ------------------------------------------------------------------------------- nested state <-> safetensors + JSON


def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, scalars) into a JSON skeleton and a tensor dict.

    Tensors are replaced by ``{"__tensor__": key}``; tuples and dicts with non-string keys are tagged so that
    `unflatten_state` rebuilds exactly what `optimizer.state_dict()` returned.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(o, key):
        if isinstance(o, torch.Tensor):
            tensors[key] = o.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(o, dict):
            if all(isinstance(k, str) for k in o):
                return {k: walk(v, f"{key}.{k}" if key else k) for k, v in o.items()}
            if all(isinstance(k, int) for k in o):
                return {"__intkeys__": {str(k): walk(v, f"{key}.{k}" if key else str(k)) for k, v in o.items()}}
            raise TypeError(f"cannot store dict keys of types {sorted({type(k).__name__ for k in o})} at {key!r}")
        if isinstance(o, tuple):
            return {"__tuple__": [walk(v, f"{key}.{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(o)]
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        if isinstance(o, (np.integer, np.floating, np.bool_)):
            return o.item()
        raise TypeError(f"cannot store {type(o).__name__} at {key!r} in a checkpoint (only tensors and JSON values)")

    return walk(obj, prefix), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        if set(skeleton) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if set(skeleton) == {"__intkeys__"}:
            return {int(k): unflatten_state(v, tensors) for k, v in skeleton["__intkeys__"].items()}
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


# ------------------------------------------------------------------------------------------------------ RNG states


def capture_rng_state() -> dict:
    """RNG states of python, numpy, torch CPU and (if present) every CUDA device, as JSON values."""
    np_state = np.random.get_state()
    state = {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_from_json(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        states = [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])


def _to_json(o):
    if isinstance(o, tuple):
        return {"__tuple__": [_to_json(v) for v in o]}
    return o


def _from_json(o):
    if isinstance(o, dict) and set(o) == {"__tuple__"}:
        return tuple(_from_json(v) for v in o["__tuple__"])
    return o


# --------------------------------------------------------------------------------------------- training checkpoints


def save_checkpoint(
    directory: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    trainer_state: dict,
    config_json: dict,
) -> Path:
    """Write a complete training checkpoint atomically. Call on one rank only (with full, gathered states)."""
    directory = Path(directory)
    step = int(trainer_state["step"])
    opt_skeleton, opt_tensors = flatten_state(optimizer_state, "optimizer")
    with atomic_directory(directory) as tmp:
        write_model_files(tmp, model_state, config_json)
        fault_point(IN_CHECKPOINT, step)
        save_file(opt_tensors, str(tmp / OPTIMIZER_NAME))
        state = dict(trainer_state, optimizer=opt_skeleton)
        write_text_synced(tmp / TRAINER_STATE_NAME, json.dumps(state) + "\n")
    return directory


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> dict:
    """Read a training checkpoint: {"model": state dict, "optimizer": state dict, "trainer": dict, "config": dict}."""
    d = Path(directory)
    missing = [n for n in CHECKPOINT_FILES if not (d / n).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {d} is incomplete (missing {', '.join(missing)})")
    trainer = json.loads((d / TRAINER_STATE_NAME).read_text())
    opt_tensors = load_file(str(d / OPTIMIZER_NAME), device=str(device))
    # fine-tuning checkpoints written before the shared engine (2026-12-04) named the skeleton "state"
    skeleton = trainer.pop("optimizer") if "optimizer" in trainer else trainer.pop("state")
    optimizer = unflatten_state(skeleton, opt_tensors)
    return {
        "model": load_file(str(d / WEIGHTS_NAME), device=str(device)),
        "optimizer": optimizer,
        "trainer": trainer,
        "config": json.loads((d / CONFIG_NAME).read_text()),
    }


def mark_latest(run_dir: str | Path, checkpoint: str | Path) -> None:
    root = Path(run_dir) / CHECKPOINTS_DIR
    atomic_write_text(root / LATEST_NAME, Path(checkpoint).name + "\n")


def prune_checkpoints(run_dir: str | Path, keep_last: int, protected: set[int]) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, sparing steps in `protected` and the latest."""
    found = list_checkpoints(run_dir)
    latest = latest_checkpoint(run_dir)
    removed = []
    for d in found[: max(0, len(found) - keep_last)]:
        if int(d.name.split("-")[1]) in protected or d == latest:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed
