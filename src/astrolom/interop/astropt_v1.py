"""Import and export the 2024-era AstroPT checkpoints (`astropt` 1.0.x), the layout of the paper's released models.

The paper's checkpoints (Hugging Face `Smith42/astroPT`, `models/fully_trained/*_params/*_ckpt.pt`) were written by
the training script of `astropt` 1.0.x: a `torch.save`d dict with `model` (the state dict of `astropt.model.GPT`,
keys sometimes prefixed `_orig_mod.` by `torch.compile`), `model_args` (`n_layer`, `n_head`, `n_embd`, `n_chan`,
`block_size`, `dropout`, `patch_size`, `attn_type`; `bias` is not saved and `GPTConfig` defaults it to False) and
the optimiser / config entries, which are ignored here. Reading goes through
`astrolom.interop.ckptfile.read_reference_checkpoint`, so no pickled code runs.

That GPT is astrolom's `tokeniser="paper"` model: a ReLU-MLP tokeniser and a 3-layer ReLU-MLP decoder (both always
with biases), a learned position table, pre-LayerNorm blocks with tanh-GELU MLPs and causal attention, and one
image modality. Its `get_embeddings` is the last block's output before the final LayerNorm, which is astrolom's
`forward_intermediates(x)[-1]` (`forward_features(x, layer=-1)` applies `ln_f` on top).

Name mapping (1.0.x -> astrolom):

    transformer.wte.0 / .2                   tokenisers.images.0 / .2
    transformer.wpe                          pos_emb
    transformer.h.N.*                        blocks.N.*   (as for 2.x: attn.c_attn -> attn.qkv, ...)
    transformer.ln_f                         ln_f
    lm_head.0 / .2 / .4                      decoders.images.0 / .2 / .4

An imported model's config.json carries the tokens preset "paper2024" (`astrolom.data.tokens.PAPER2024`): the
pixels as that training script fed them (see `astrolom.data.tokens.tokenize_paper2024`). Only "paper" tokeniser,
images-only, causal models without flux features can be exported back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from astrolom.data.modalities import IMAGES
from astrolom.interop.ckptfile import (
    BLOCK_RULES,
    ReferenceFormatError,
    common_model_args,
    count_blocks,
    count_layers,
    plain,
    rename_in,
    rename_out,
    save_checkpoint,
    strip_prefixes,
)
from astrolom.model.astropt import AstroPT, ModelConfig


def is_v1_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    """True for a 1.0.x GPT state dict (a Sequential tokeniser `transformer.wte.0`), prefixed or not."""
    return "transformer.wte.0.weight" in strip_prefixes(state)


def _name_table(n_layer: int) -> dict[str, str]:
    pairs = [("transformer.ln_f", "ln_f")]
    pairs += [(f"transformer.wte.{i}", f"tokenisers.images.{i}") for i in (0, 2)]
    pairs += [(f"lm_head.{i}", f"decoders.images.{i}") for i in (0, 2, 4)]
    for i in range(n_layer):
        pairs += [(f"transformer.h.{i}.{ref}", f"blocks.{i}.{ours}") for ref, ours in BLOCK_RULES]
    table = {f"{ref}.{p}": f"{ours}.{p}" for ref, ours in pairs for p in ("weight", "bias")}
    table["transformer.wpe.weight"] = "pos_emb.weight"
    return table


def v1_to_astrolom_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a 1.0.x GPT state dict to astrolom names (unknown names raise)."""
    state = strip_prefixes(state)
    return rename_in(state, _name_table(count_layers(state)), "astropt 1.0.x")


def astrolom_to_v1_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an astrolom "paper" model's state dict to 1.0.x names; tensors are copied (contiguous, detached)."""
    return rename_out(state, _name_table(count_blocks(state)), "astropt 1.0.x")


def config_from_v1(args: Mapping, state: Mapping[str, torch.Tensor]) -> ModelConfig:
    """ModelConfig from 1.0.x `model_args`, checked against (and completed from) the weights."""
    state = strip_prefixes(state)
    if args.get("attn_type", "causal") != "causal":
        raise ReferenceFormatError(
            f"attn_type={args['attn_type']!r} is not supported: only causal attention (astropt 1.0.x passes "
            "block_mask=None to every block, so its prefix models ran causal attention with a prefix-masked loss)"
        )
    if "n_head" not in args:
        raise ReferenceFormatError("n_head is not stored in the weights: pass model_args={'n_head': ...}")
    try:
        wte, wpe, ln_f = (
            state[k] for k in ("transformer.wte.0.weight", "transformer.wpe.weight", "transformer.ln_f.weight")
        )
    except KeyError as err:
        raise ReferenceFormatError(f"not an astropt 1.0.x GPT state dict: no {err.args[0]}") from err
    n_embd, input_size = wte.shape
    derived = {"n_layer": count_layers(state), "n_embd": ln_f.shape[0], "block_size": wpe.shape[0]}
    if n_embd != derived["n_embd"] or wpe.shape[1] != derived["n_embd"]:
        raise ReferenceFormatError(f"tokeniser width {n_embd} / position width {wpe.shape[1]} != {derived['n_embd']}")
    n_chan = args.get("n_chan")
    patch_size = args.get("patch_size")
    if patch_size is None and n_chan is None:
        raise ReferenceFormatError("cannot tell the patch size: pass model_args with patch_size or n_chan")
    if patch_size is None:
        patch_size = int(round((input_size / n_chan) ** 0.5))
    if n_chan is None:
        n_chan = input_size // (patch_size * patch_size)
    if patch_size * patch_size * n_chan != input_size:
        raise ReferenceFormatError(
            f"tokeniser input {input_size} != patch_size^2 * n_chan = {patch_size}^2 * {n_chan} (model_args)"
        )
    bias = "transformer.ln_f.bias" in state
    if "bias" in args and bool(args["bias"]) != bias:
        has = "have" if bias else "lack"
        raise ReferenceFormatError(f"model_args say bias={args['bias']} but the weights {has} biases")
    for key, value in derived.items():
        if key in args and args[key] != value:
            raise ReferenceFormatError(f"model_args say {key}={args[key]} but the weights give {value}")
    return ModelConfig(
        **derived,
        n_head=int(args["n_head"]),
        patch_size=int(patch_size),
        n_chan=int(n_chan),
        dropout=float(args.get("dropout", 0.0)),
        bias=bias,
        tokeniser="paper",
        tokens_preset="paper2024",
    )


def load_v1_checkpoint(ckpt: Mapping, model_args: Mapping | None = None) -> AstroPT:
    """An astrolom model holding the weights of a 1.0.x checkpoint dict (as read by `read_reference_checkpoint`).

    Args:
        ckpt: `{"model": state dict, "model_args": ...}` or a bare 1.0.x state dict.
        model_args: `GPTConfig` keyword arguments, taking precedence over the checkpoint's own.
    """
    ckpt = plain(dict(ckpt))
    if isinstance(ckpt.get("model"), Mapping):
        state, args = ckpt["model"], dict(ckpt.get("model_args") or {})
    else:
        state, args = ckpt, {}
    args.update(plain(dict(model_args or {})))
    config = config_from_v1(args, state)
    model = AstroPT(config)
    missing, unexpected = model.load_state_dict(v1_to_astrolom_state_dict(state), strict=False)
    if missing or unexpected:
        raise ReferenceFormatError(
            f"astropt 1.0.x weights do not fit the model; missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    return model.float().eval()


def export_v1_checkpoint(model: AstroPT, path: str | os.PathLike) -> Path:
    """Write `model` as an astropt 1.0.x checkpoint (`{"model", "model_args"}`, tensors and primitives only).

    `GPT(GPTConfig(**ckpt["model_args"]))` of astropt 1.0.4 then loads `ckpt["model"]` strictly.

    Raises:
        ReferenceFormatError: for anything the 1.0.x GPT cannot represent (the reason is in the message).
    """
    cfg = model.config
    if cfg.tokeniser != "paper":
        raise ReferenceFormatError(
            f"tokeniser {cfg.tokeniser!r} has no astropt 1.0.x equivalent: 1.0.x has only the ReLU-MLP 'paper' "
            "tokeniser (export 'aim'/'affine' models to astropt 2.x with --to-reference)"
        )
    if cfg.modalities != (IMAGES,):
        raise ReferenceFormatError(f"astropt 1.0.x models images only, this model has {cfg.modalities}")
    if cfg.flux_features:
        raise ReferenceFormatError(
            "flux-aware image tokens (flux_features=True) have no astropt 1.0.x equivalent: it reads standardised "
            "patches only"
        )
    ckpt = {
        "model": astrolom_to_v1_state_dict(model.state_dict()),
        "model_args": {**common_model_args(cfg), "patch_size": cfg.patch_size},  # astropt 1.0.4's GPTConfig fields
    }
    return save_checkpoint(ckpt, path)
