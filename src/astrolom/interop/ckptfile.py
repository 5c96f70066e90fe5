"""Reading reference AstroPT checkpoint files (every generation) without executing pickled code.

Loading policy: files are read with `torch.load(weights_only=True)` only. The reference's training scripts also
pickle their own classes (`ModalityConfig` objects inside `model_args`, a `ModalityRegistry`, numpy scalars such as
`best_val_loss`), which `weights_only` refuses. For those, every global the file names outside torch's weights-only
allowlist is bound, for the duration of that one load, to an inert stand-in class of this module: it records the
constructor arguments and pickled state and runs nothing else. Nothing from the file's modules is imported or
called. Stand-ins whose state is an attribute dict become plain dicts (so a `ModalityConfig` reads back as
`{"name": "images", "input_size": 768, ...}`); any other becomes a `ForeignObject` record.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

COMPILE_PREFIXES = ("_orig_mod.", "module.")
# (reference name, astrolom name) inside transformer.h.N / blocks.N
BLOCK_RULES = (
    ("ln_1", "ln_1"),
    ("attn.c_attn", "attn.qkv"),
    ("attn.c_proj", "attn.proj"),
    ("ln_2", "ln_2"),
    ("mlp.c_fc", "mlp.fc"),
    ("mlp.c_proj", "mlp.proj"),
)


class ReferenceFormatError(ValueError):
    """A reference checkpoint that astrolom cannot represent, or a model that the reference cannot."""


@dataclass(frozen=True)
class ForeignObject:
    """What was pickled for a global that is neither a tensor, a primitive nor a plain attribute holder."""

    name: str  # the pickled global's "module.qualname"
    args: tuple
    state: Any


class _StandIn:
    """Inert stand-in for a global named in a checkpoint: keeps arguments and state, executes nothing."""

    global_name = ""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj._args = args
        obj._state = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self._state = state


def _stand_in_for(name: str) -> type:
    return type("StandIn", (_StandIn,), {"global_name": name})


def plain(obj: Any) -> Any:
    """Replace stand-ins by dicts / ForeignObject records, recursively through containers."""
    if isinstance(obj, _StandIn):
        state = obj._state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict) and state[1] is None:
            state = state[0]  # (dict_state, slot_state) form of BUILD
        if isinstance(state, dict) and not obj._args:
            return {k: plain(v) for k, v in state.items()}
        return ForeignObject(obj.global_name, tuple(plain(a) for a in obj._args), plain(state))
    if isinstance(obj, dict):
        return type(obj)((k, plain(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    return obj


def read_reference_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a reference checkpoint file without executing pickled code (see the module docstring).

    Returns:
        The checkpoint dict, with reference-class objects turned into plain dicts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reference checkpoint at {path}")
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError:  # pre-1.6 (non-zip) torch.save format: cannot be scanned, try a plain weights-only load
        foreign = []
    stand_ins = [(_stand_in_for(name), name) for name in foreign]
    try:
        with torch.serialization.safe_globals(stand_ins):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError and friends: say what we refused and how to get around it
        raise ReferenceFormatError(
            f"{path} could not be read with torch.load(weights_only=True) ({err}). astrolom never unpickles "
            "arbitrary code; re-save the state dict alone (torch.save(model.state_dict(), ...)) and pass "
            "model_args= to load_reference_checkpoint"
        ) from err
    return plain(ckpt)


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        for prefix in COMPILE_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        out[name] = tensor
    return out


def count_layers(state: Mapping[str, torch.Tensor]) -> int:
    idx = [int(m.group(1)) for k in state if (m := re.match(r"transformer\.h\.(\d+)\.", k))]
    return 1 + max(idx, default=-1)


def rename_in(state: Mapping[str, torch.Tensor], table: Mapping[str, str], generation: str) -> dict[str, torch.Tensor]:
    """Reference names -> astrolom names through `table` (the reference's causal-mask buffers are dropped)."""
    out = {}
    for name, tensor in strip_prefixes(state).items():
        if re.fullmatch(r"transformer\.h\.\d+\.attn\.bias", name) and tensor.dim() == 4:
            continue  # causal-mask buffer of the reference's non-SDPA fallback, not a weight
        if name not in table:
            raise ReferenceFormatError(f"{generation} parameter {name!r} has no astrolom equivalent")
        out[table[name]] = tensor
    return out


def rename_out(state: Mapping[str, torch.Tensor], table: Mapping[str, str], generation: str) -> dict[str, torch.Tensor]:
    """astrolom names -> reference names, inverting `table`; tensors are copied (contiguous, detached)."""
    inverse = {ours: ref for ref, ours in table.items()}
    out = {}
    for name, tensor in state.items():
        if name not in inverse:
            raise ReferenceFormatError(f"astrolom parameter {name!r} has no {generation} equivalent")
        out[inverse[name]] = tensor.detach().clone().contiguous()
    return out


def count_blocks(state: Mapping[str, torch.Tensor]) -> int:
    """Transformer blocks in an astrolom state dict."""
    return 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)


def common_model_args(cfg) -> dict:
    """The `GPTConfig` fields every astropt generation shares, from an astrolom `ModelConfig`."""
    return {
        "block_size": cfg.block_size,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_chan": cfg.n_chan,
        "dropout": cfg.dropout,
        "bias": cfg.bias,
        "attn_type": "causal",
    }


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> Path:
    """`torch.save` to a temporary name, then rename: a half-written file never carries the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path
