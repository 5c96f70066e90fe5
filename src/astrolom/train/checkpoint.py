"""Checkpoints: safetensors + JSON, written atomically, loaded without unpickling anything.

`from_pretrained` is the one way to load a trained AstroPT (for embedding, probing, fine-tuning)::

    from astrolom.train.checkpoint import from_pretrained
    model = from_pretrained("RUN/final")  # or RUN itself, or any RUN/checkpoints/step-XXXXXX

A pretrained model directory has the Hugging Face hub layout (upload it as is; nothing here touches the network):

    config.json          {"model_type": "astropt", "model": ModelConfig, "tokens": tokeniser, "data": normalisation}
    model.safetensors    the weights (fp32, names as in `AstroPT.state_dict()`)

A training checkpoint adds the trainer state, so that `astrolom pretrain --resume` continues exactly:

    optimizer.safetensors   AdamW moments and step counts (tensors only)
    trainer_state.json      step, tokens seen, FLOPs, scheduler, the optimiser's non-tensor state, and per rank the RNG
                            states (python, numpy, torch CPU and CUDA) and the data stream position

A run directory (`astrolom pretrain --out RUN`):

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

Fault injection for tests: ``ASTROLOM_FAULT_KILL_IN_CHECKPOINT=<step>`` SIGKILLs the process halfway through writing
the checkpoint of that step (weights written, optimiser state not yet).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from astrolom.model.astropt import AstroPT, ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
LATEST_NAME = "latest"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
MODEL_TYPE = "astropt"
FAULT_ENV = "ASTROLOM_FAULT_KILL_IN_CHECKPOINT"
_TMP_MARK = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


# --------------------------------------------------------------------------------------------------- atomic writing


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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
            _fsync_path(f)
        _fsync_path(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}{_TMP_MARK}old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_path(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}{_TMP_MARK}{os.getpid()}"
    _write_text(tmp, text)
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _maybe_fault(step: int) -> None:
    if os.environ.get(FAULT_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


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


# ---------------------------------------------------------------------------------------------- pretrained models


def model_config_json(config: ModelConfig, *, tokens: dict | None = None, data: dict | None = None) -> dict:
    """The `config.json` of a model directory."""
    from astrolom import __version__

    return {
        "model_type": MODEL_TYPE,
        "architectures": ["AstroPT"],
        "astrolom_version": __version__,
        "model": dataclasses.asdict(config),
        "tokens": tokens or {"patch_size": config.patch_size, "order": "spiral", "standardise": "per-patch"},
        "data": data or {},
    }


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _write_model_files(directory: Path, state: dict[str, torch.Tensor], config_json: dict) -> None:
    _write_text(directory / CONFIG_NAME, json.dumps(config_json, indent=2) + "\n")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def save_pretrained(
    model: AstroPT, directory: str | Path, *, tokens: dict | None = None, data: dict | None = None
) -> Path:
    """Write `config.json` + `model.safetensors` atomically (Hugging Face hub layout)."""
    model = _unwrapped(model)
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        _write_model_files(tmp, model.state_dict(), model_config_json(model.config, tokens=tokens, data=data))
    return directory


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory from itself, a RUN directory (its `final/`, else its latest checkpoint)."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file():
        return path
    if (path / FINAL_DIR / WEIGHTS_NAME).is_file():
        return path / FINAL_DIR
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path} (nor a final/ or checkpoints/ run layout under it)")


def read_config(path: str | Path) -> dict:
    """The `config.json` of a model directory (or RUN directory): model, tokeniser and data settings."""
    d = resolve_model_dir(path)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    if cfg.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{d / CONFIG_NAME} is not an astrolom AstroPT config (model_type={cfg.get('model_type')!r})")
    return cfg


def from_pretrained(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> AstroPT:
    """Load an AstroPT from a model directory, a training checkpoint, or a RUN directory; returns it in eval mode."""
    d = resolve_model_dir(path)
    cfg = read_config(d)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model_kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg["model"].items() if k in fields}
    with torch.device("meta"):
        model = AstroPT(ModelConfig(**model_kw))
    state = load_file(str(d / WEIGHTS_NAME), device=str(device))
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


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
        _write_model_files(tmp, model_state, config_json)
        _maybe_fault(step)
        save_file(opt_tensors, str(tmp / OPTIMIZER_NAME))
        state = dict(trainer_state, optimizer=opt_skeleton)
        _write_text(tmp / TRAINER_STATE_NAME, json.dumps(state) + "\n")
    return directory


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> dict:
    """Read a training checkpoint: {"model": state dict, "optimizer": state dict, "trainer": dict, "config": dict}."""
    d = Path(directory)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME, OPTIMIZER_NAME, TRAINER_STATE_NAME) if not (d / n).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {d} is incomplete (missing {', '.join(missing)})")
    trainer = json.loads((d / TRAINER_STATE_NAME).read_text())
    opt_tensors = load_file(str(d / OPTIMIZER_NAME), device=str(device))
    optimizer = unflatten_state(trainer.pop("optimizer"), opt_tensors)
    return {
        "model": load_file(str(d / WEIGHTS_NAME), device=str(device)),
        "optimizer": optimizer,
        "trainer": trainer,
        "config": json.loads((d / CONFIG_NAME).read_text()),
    }


def _is_complete(d: Path) -> bool:
    return all((d / n).is_file() for n in (CONFIG_NAME, WEIGHTS_NAME, OPTIMIZER_NAME, TRAINER_STATE_NAME))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and _TMP_MARK not in p.name and _is_complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `RUN/checkpoints/latest` names; if that is missing or broken, the newest complete one."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_NAME
    if pointer.is_file():
        d = root / pointer.read_text().strip()
        if d.is_dir() and _is_complete(d):
            return d
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def mark_latest(run_dir: str | Path, checkpoint: str | Path) -> None:
    root = Path(run_dir) / CHECKPOINTS_DIR
    _atomic_write_text(root / LATEST_NAME, Path(checkpoint).name + "\n")


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
