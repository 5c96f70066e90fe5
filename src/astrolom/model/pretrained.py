"""Pretrained AstroPT models on disk: `save_pretrained`, `from_pretrained`, `load_model` (safetensors + JSON).

`from_pretrained` is the one way to load a trained AstroPT (for embedding, probing, fine-tuning)::

    from astrolom.model.pretrained import from_pretrained
    model = from_pretrained("RUN/final")  # or RUN itself, or any RUN/checkpoints/step-XXXXXX

A model directory has the Hugging Face hub layout (upload it as is; nothing here touches the network):

    config.json          {"model_type": "astropt", "model": ModelConfig, "tokens": tokeniser, "data": normalisation}
    model.safetensors    the weights (fp32, names as in `AstroPT.state_dict()`)

Training checkpoints (`astrolom.train.checkpoint`) are model directories plus the trainer state, so everything
here reads them too. Nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from astrolom.layout import (
    CONFIG_NAME,
    FINAL_DIR,
    RUN_CONFIG_YAML,
    WEIGHTS_NAME,
    atomic_directory,
    latest_checkpoint,
    write_text_synced,
)
from astrolom.model.astropt import AstroPT, ModelConfig

MODEL_TYPE = "astropt"


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


def write_model_files(directory: Path, state: dict[str, torch.Tensor], config_json: dict) -> None:
    """`config.json` + fp32 `model.safetensors` into an existing directory (fsynced, not yet renamed)."""
    write_text_synced(directory / CONFIG_NAME, json.dumps(config_json, indent=2) + "\n")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def save_pretrained(
    model: AstroPT, directory: str | Path, *, tokens: dict | None = None, data: dict | None = None
) -> Path:
    """Write `config.json` + `model.safetensors` atomically (Hugging Face hub layout).

    Takes the plain model: unwrap DDP / compiled models first (`astrolom.train.parallel.unwrap`).
    """
    if not isinstance(model, AstroPT):
        raise TypeError(f"save_pretrained takes an AstroPT, got {type(model).__name__}: unwrap it first")
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_model_files(tmp, model.state_dict(), model_config_json(model.config, tokens=tokens, data=data))
    return directory


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory from itself, a RUN directory (its `final/`, else its latest checkpoint)."""
    if str(path).startswith("hf:"):
        raise FileNotFoundError(
            f"{path} is a Hub spec: load it with astrolom.interop.hub.from_pretrained (the model layer does not "
            "download); on the command line --model hf:... works as is"
        )
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


def load_model(path: str | Path, *, random_init: bool = False, seed: int = 0) -> tuple[AstroPT, dict]:
    """A pretrained model from a RUN or model directory, or (random_init) a fresh one of its config and `seed`.

    Returns (model in eval mode, metadata for an embedding file: the model directory, the data it trained on and
    the split settings of that run, so that data without a split column is split the same way).
    """
    model_dir = resolve_model_dir(path)
    model = from_pretrained(model_dir)
    meta = {"model": str(model_dir), "random_init": random_init}
    meta["trained_on"] = read_config(model_dir).get("data", {})
    meta["split_settings"] = split_settings(model_dir)
    if random_init:
        # the control: same architecture, weights from the model's own init with a fixed seed
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AstroPT(model.config).eval()
        meta["seed"] = seed
    return model, meta


def split_settings(model_dir: str | Path) -> dict:
    """How the run a model came from read its data, as `open_source` keywords (`data_settings`), or {} if unknown.

    Read from the model's config.json (written since the trainer records it there), else from RUN/config.yaml.
    """
    model_dir = Path(model_dir)
    cfg_json = model_dir / CONFIG_NAME
    cfg = json.loads(cfg_json.read_text()) if cfg_json.is_file() else {}
    runs = [
        (yaml.safe_load((d / RUN_CONFIG_YAML).read_text()) or {}).get("data", {})
        for d in (model_dir.parent, model_dir.parent.parent)
        if (d / RUN_CONFIG_YAML).is_file()
    ]
    return data_settings(cfg, *runs)


def data_settings(cfg_json: dict, *run_data: dict) -> dict:
    """`open_source` keywords that read data as a model's run did, from its config.json (and the `data` sections of
    its run's config.yaml): `split_fractions` / `split_seed` (data without a split column is split the same way)
    and `bands` (`data.bands`: a g,r,z model takes g, r and z by name from griz cutouts; a file without one of them
    is a bad record naming the file and the bands it has). Keys the run did not record are left out."""
    candidates = [cfg_json.get("data") or {}, (cfg_json.get("pretrain_config") or {}).get("data") or {}, *run_data]
    settings: dict = {}
    for data in candidates:
        if "split_fractions" in data:
            settings = {"split_fractions": tuple(data["split_fractions"]), "split_seed": int(data.get("split_seed", 0))}
            break
    bands = next((data["bands"] for data in candidates if "bands" in data), None)
    if bands:
        settings["bands"] = tuple(bands)
    return settings
