"""Import and export checkpoints of the reference AstroPT implementation (`astropt` 2.x, `astropt.model.GPT`).

A reference checkpoint is a `torch.save`d dict with `model` (the GPT state dict, sometimes with the `_orig_mod.`
prefix that `torch.compile` adds) and `model_args` (the `GPTConfig` keyword arguments). Models with causal
attention, the "aim" or "affine" tokeniser and the modalities `"images"` (learned positions, `embed_pos=True`),
`"spectra"` (positions from an MLP of the wavelength, `embed_pos=False`, `pos_input_size=1`) or both have an
astrolom equivalent; anything else (other modalities, prefix attention, LoRA adapters, a fine-tuning task head) is
refused with a `ReferenceFormatError` that says why.

Two-modality models: the reference concatenates the modalities in alphabetical order (images, then spectra) with
no begin-of-modality token and no modality embedding, and the last image token predicts the first spectrum token.
An imported model therefore gets `modalities=("images", "spectra")`, `modality_order="fixed"`,
`modality_tokens=False` (that same layout) and `spectrum_amplitude=False` (the reference's spectrum tokens are the W
fluxes alone); its predictions equal the reference's (`outputs["images"]` = ours `[:, 1:]`, `outputs["spectra"]`
= ours). Spectrum positions are the reference's normalised wavelengths, (λ - 3000) / 7000, which is astrolom's
default `spectrum_wavelength_range`. Only models of exactly that layout can be exported.

Files are read without unpickling code (`astrolom.interop.ckptfile`). A bare state dict (no `model_args`) can be
imported by passing `model_args=` explicitly. `load_reference_checkpoint` also imports the 2024-era layout of
`astropt` 1.0.x (the paper's released checkpoints), handing it to `astrolom.interop.astropt_v1`.

Name mapping (reference -> astrolom):

    transformer.wte.images.c_fc / c_proj     tokenisers.images.0 / .2   ("affine": c_fc -> .0 only)
    transformer.wpe.images.wpe               pos_emb
    transformer.h.N.ln_1 / ln_2              blocks.N.ln_1 / ln_2
    transformer.h.N.attn.c_attn / c_proj     blocks.N.attn.qkv / attn.proj
    transformer.h.N.mlp.c_fc / c_proj        blocks.N.mlp.fc / mlp.proj
    transformer.ln_f                         ln_f
    lm_head.images.c_fc / c_proj             decoders.images.0 / .2     ("affine": c_fc -> .0 only)
    transformer.wte.spectra / lm_head.spectra  tokenisers.spectra / decoders.spectra (as for images)
    transformer.wpe.spectra.c_fc / c_proj    wave_emb.0 / .2            ("affine": c_fc -> .0 only)

Exported files hold only tensors and primitives (model_args["modalities"] is a list of plain dicts), so they load
with `weights_only=True`. To build the reference model from one:

    ckpt = torch.load(path, weights_only=True)
    mods = [ModalityConfig(**m) for m in ckpt["model_args"]["modalities"]]
    gpt = GPT(GPTConfig(**{**ckpt["model_args"], "modalities": mods}), ModalityRegistry(mods))
    gpt.load_state_dict(ckpt["model"])

The "paper" tokeniser (2024-era ReLU MLPs) has no equivalent in astropt 2.x, so exporting such a model here
raises; `astrolom.interop.astropt_v1.export_v1_checkpoint` writes it in the 1.0.x layout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.interop.astropt_v1 import is_v1_state_dict, load_v1_checkpoint
from astrolom.interop.ckptfile import (  # noqa: F401  (ForeignObject, read_reference_checkpoint: this module's API)
    BLOCK_RULES,
    ForeignObject,
    ReferenceFormatError,
    common_model_args,
    count_blocks,
    count_layers,
    plain,
    read_reference_checkpoint,
    rename_in,
    rename_out,
    save_checkpoint,
    strip_prefixes,
)
from astrolom.model.astropt import AstroPT, ModelConfig

MODALITY = IMAGES
SUPPORTED = (IMAGES, SPECTRA)  # alphabetical: the reference's sequence order


def load_reference_checkpoint(
    path_or_dict: str | os.PathLike | Mapping,
    model_args: Mapping | None = None,
) -> AstroPT:
    """Build an astrolom `AstroPT` holding the weights of a reference AstroPT checkpoint (astropt 2.x or 1.0.x).

    Args:
        path_or_dict: a checkpoint file, an already loaded checkpoint dict (`{"model": ..., "model_args": ...}`),
            or a bare reference state dict.
        model_args: `GPTConfig` keyword arguments; they take precedence over the checkpoint's own `model_args`
            and are required for a bare state dict. `modalities` entries may be dicts or objects with
            `name`, `input_size`, `patch_size`, `embed_pos` attributes.

    Returns:
        The model in eval mode, on CPU, in float32.
    """
    if isinstance(path_or_dict, Mapping):
        ckpt = plain(dict(path_or_dict))
    else:
        ckpt = read_reference_checkpoint(path_or_dict)
    if is_v1_state_dict(ckpt["model"] if isinstance(ckpt.get("model"), Mapping) else ckpt):
        return load_v1_checkpoint(ckpt, model_args)
    if "model" in ckpt and isinstance(ckpt["model"], Mapping):
        state = ckpt["model"]
        args = dict(ckpt.get("model_args") or {})
        registry = ckpt.get("modality_registry")
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, args, registry = ckpt, {}, None
    else:
        raise ReferenceFormatError("expected a reference checkpoint dict with a 'model' state dict")
    if model_args is not None:
        args.update(plain(dict(model_args)))
    registered = registry.get("modalities") if isinstance(registry, Mapping) else None
    if not args.get("modalities") and isinstance(registered, Mapping):
        args["modalities"] = list(registered.values())
    state = strip_prefixes(state)
    config = _config_from_reference(args, state)
    model = AstroPT(config)
    ours = reference_to_astrolom_state_dict(state, config.tokeniser)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise ReferenceFormatError(
            f"reference weights do not fit the {config.tokeniser!r} model; missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return model.float().eval()


def export_reference_checkpoint(model: AstroPT, path: str | os.PathLike) -> Path:
    """Write `model` as a reference AstroPT checkpoint (`{"model", "model_args"}`, tensors and primitives only).

    Raises:
        ReferenceFormatError: for the "paper" tokeniser (write it with `astropt_v1.export_v1_checkpoint`) or
            anything else astropt 2.x cannot represent.
    """
    cfg = model.config
    if cfg.tokeniser not in ("aim", "affine"):
        raise ReferenceFormatError(
            f"tokeniser {cfg.tokeniser!r} has no equivalent in the reference astropt 2.x (only 'aim' and 'affine'); "
            "'paper' models export to the astropt 1.0.x layout (astrolom.interop.astropt_v1)"
        )
    _check_exportable(cfg)
    state = astrolom_to_reference_state_dict(model.state_dict(), cfg.tokeniser)
    return save_checkpoint({"model": state, "model_args": _model_args(cfg)}, path)


def _check_exportable(cfg: ModelConfig) -> None:
    """Raise unless the reference can represent `cfg` exactly (see the module docstring)."""
    if any(m not in SUPPORTED for m in cfg.modalities) or list(cfg.modalities) != sorted(cfg.modalities):
        raise ReferenceFormatError(
            f"modalities {cfg.modalities} cannot be exported: the reference supports {SUPPORTED} in alphabetical order"
        )
    if len(cfg.modalities) > 1:
        if cfg.modality_tokens:
            raise ReferenceFormatError(
                "the reference has no begin-of-modality tokens or modality embedding; only models trained with "
                "modality_tokens=False (the reference layout) can be exported"
            )
        if cfg.modality_order != "fixed":
            raise ReferenceFormatError(
                "the reference always uses the alphabetical order; modality_order='random' models"
            )
    if SPECTRA in cfg.modalities and cfg.spectrum_amplitude:
        raise ReferenceFormatError(
            "spectrum tokens with the log-amplitude value (spectrum_amplitude=True) have no reference equivalent: "
            "its data pipeline feeds the W fluxes only"
        )
    if cfg.flux_features:
        raise ReferenceFormatError(
            "flux-aware image tokens (flux_features=True) have no reference equivalent: the reference tokenises "
            "standardised patches only"
        )


def _modalities_in(state: Mapping[str, torch.Tensor], prefix: str, position: int) -> tuple[str, ...]:
    return tuple(sorted({k.split(".")[position] for k in state if k.startswith(prefix)}))


def reference_to_astrolom_state_dict(state: Mapping[str, torch.Tensor], tokeniser: str) -> dict[str, torch.Tensor]:
    """Rename a reference GPT state dict to astrolom names (unknown names raise)."""
    state = strip_prefixes(state)
    mods = _modalities_in(state, "transformer.wte.", 2) or (MODALITY,)
    return rename_in(state, _name_table(tokeniser, count_layers(state), mods), "reference")


def astrolom_to_reference_state_dict(state: Mapping[str, torch.Tensor], tokeniser: str) -> dict[str, torch.Tensor]:
    """Rename an astrolom state dict to reference GPT names; tensors are copied (contiguous, detached)."""
    mods = _modalities_in(state, "tokenisers.", 1) or (MODALITY,)
    return rename_out(state, _name_table(tokeniser, count_blocks(state), mods), "reference")


def _name_table(tokeniser: str, n_layer: int, modalities: tuple[str, ...] = (MODALITY,)) -> dict[str, str]:
    """Every reference parameter name -> astrolom name, weights and biases (bias entries may go unused)."""
    pairs = [("transformer.ln_f", "ln_f")]
    for m in modalities:
        pairs += [(f"transformer.wte.{m}.c_fc", f"tokenisers.{m}.0"), (f"lm_head.{m}.c_fc", f"decoders.{m}.0")]
        if tokeniser == "aim":
            pairs += [(f"transformer.wte.{m}.c_proj", f"tokenisers.{m}.2"), (f"lm_head.{m}.c_proj", f"decoders.{m}.2")]
        if m == SPECTRA:
            pairs.append(("transformer.wpe.spectra.c_fc", "wave_emb.0"))
            if tokeniser == "aim":
                pairs.append(("transformer.wpe.spectra.c_proj", "wave_emb.2"))
    for i in range(n_layer):
        pairs += [(f"transformer.h.{i}.{ref}", f"blocks.{i}.{ours}") for ref, ours in BLOCK_RULES]
    table = {f"{ref}.{p}": f"{ours}.{p}" for ref, ours in pairs for p in ("weight", "bias")}
    if MODALITY in modalities:
        table[f"transformer.wpe.{MODALITY}.wpe.weight"] = "pos_emb.weight"
    return table


def _field(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _config_from_reference(args: Mapping, state: Mapping[str, torch.Tensor]) -> ModelConfig:
    """ModelConfig from reference model_args, checked against (and completed from) the weights."""
    for key in state:
        if key.startswith("task_head."):
            raise ReferenceFormatError("checkpoints with a fine-tuning task head (output_dim) are not supported")
        if "lora_" in key:
            raise ReferenceFormatError("checkpoints with LoRA adapters are not supported; merge them first")
    if args.get("attn_type", "causal") != "causal":
        raise ReferenceFormatError(
            f"attn_type={args['attn_type']!r} is not supported: only causal attention (astropt 2.0.9 builds the "
            "prefix mask and then drops it, so prefix models were trained on an unintended mask)"
        )
    names = sorted({k.split(".")[2] for k in state if k.startswith("transformer.wte.")})
    mods = list(args.get("modalities") or [])
    by_name = {_field(mc, "name"): mc for mc in mods}
    mod_names = sorted(by_name) if mods else names
    if not mod_names or any(m not in SUPPORTED for m in mod_names) or (names and names != mod_names):
        raise ReferenceFormatError(
            f"only 'images' and/or 'spectra' checkpoints are supported, this one has {mod_names or names}"
            + (f" (weights for {names})" if names and names != mod_names else "")
        )
    tokeniser = "aim" if f"transformer.wte.{mod_names[0]}.c_proj.weight" in state else "affine"
    if args.get("tokeniser", tokeniser) != tokeniser:
        raise ReferenceFormatError(f"model_args say tokeniser={args['tokeniser']!r} but the weights are {tokeniser!r}")
    bias = "transformer.ln_f.bias" in state
    if "bias" in args and bool(args["bias"]) != bias:
        has = "have" if bias else "lack"
        raise ReferenceFormatError(f"model_args say bias={args['bias']} but the weights {has} biases")
    if "n_head" not in args:
        raise ReferenceFormatError("n_head is not stored in the weights: pass model_args={'n_head': ...}")
    ln_f = state.get("transformer.ln_f.weight")
    if ln_f is None:
        raise ReferenceFormatError("no transformer.ln_f.weight in the checkpoint: not an astropt 2.x GPT state dict")
    derived: dict = {"n_layer": count_layers(state), "n_embd": ln_f.shape[0]}
    kw: dict = {}
    if MODALITY in mod_names:
        kw.update(_images_fields(args, state, by_name.get(MODALITY, {}), derived))
    elif "block_size" in args:
        derived["block_size"] = int(args["block_size"])
    if SPECTRA in mod_names:
        kw.update(_spectra_fields(state, by_name.get(SPECTRA, {})))
    for key, value in derived.items():
        if key in args and args[key] != value:
            raise ReferenceFormatError(f"model_args say {key}={args[key]} but the weights give {value}")
    if len(mod_names) > 1:
        weights = tuple(float(_field(by_name.get(m, {}), "loss_weight", 1.0)) for m in mod_names)
        # the reference layout: alphabetical order, no BOM tokens or modality embedding
        kw.update(modality_tokens=False, modality_order="fixed", loss_weights=() if set(weights) == {1.0} else weights)
    return ModelConfig(
        **derived,
        **kw,
        n_head=int(args["n_head"]),
        dropout=float(args.get("dropout", 0.0)),
        bias=bias,
        tokeniser=tokeniser,
        modalities=tuple(mod_names),
    )


def _images_fields(args: Mapping, state: Mapping[str, torch.Tensor], mc: Any, derived: dict) -> dict:
    """patch_size / n_chan of the images modality (and block_size from its position table)."""
    wte = state.get(f"transformer.wte.{MODALITY}.c_fc.weight")
    wpe = state.get(f"transformer.wpe.{MODALITY}.wpe.weight")
    if wte is None or wpe is None:
        raise ReferenceFormatError(
            f"no {MODALITY} tokeniser or learned position embedding (embed_pos=True) in the checkpoint; "
            "not an astropt 2.x images model"
        )
    if mc and not _field(mc, "embed_pos", True):
        raise ReferenceFormatError("only learned position embeddings (embed_pos=True) are supported for images")
    input_size = wte.shape[1]
    derived["block_size"] = wpe.shape[0]
    if wpe.shape[1] != derived["n_embd"]:
        raise ReferenceFormatError(f"position table width {wpe.shape[1]} != model width {derived['n_embd']}")
    patch_size = _field(mc, "patch_size")
    n_chan = args.get("n_chan")
    if patch_size is None:
        if n_chan is None:
            raise ReferenceFormatError("cannot tell the patch size: pass model_args with modalities or n_chan")
        patch_size = math.isqrt(input_size // n_chan)
    if input_size % (patch_size * patch_size):
        raise ReferenceFormatError(f"input size {input_size} is not patch_size^2 * bands with patch_size={patch_size}")
    if _field(mc, "input_size", input_size) != input_size:
        raise ReferenceFormatError(f"modality input_size {_field(mc, 'input_size')} != tokeniser input {input_size}")
    return {"patch_size": int(patch_size), "n_chan": int(input_size // (patch_size * patch_size))}


def _spectra_fields(state: Mapping[str, torch.Tensor], mc: Any) -> dict:
    """spectrum_patch of the spectra modality; its positions must be the MLP of one wavelength value."""
    wte = state.get("transformer.wte.spectra.c_fc.weight")
    pos = state.get("transformer.wpe.spectra.c_fc.weight")
    if wte is None:
        raise ReferenceFormatError("no spectra tokeniser (transformer.wte.spectra) in the checkpoint")
    if pos is None or (mc and _field(mc, "embed_pos", False)):
        raise ReferenceFormatError(
            "spectra with learned index positions (embed_pos=True) are not supported: astrolom places spectrum "
            "tokens by wavelength (embed_pos=False, an MLP of pos_input_size=1)"
        )
    if pos.shape[1] != 1 or _field(mc, "pos_input_size", 1) != 1:
        raise ReferenceFormatError(f"spectra positions must be one wavelength value per token, got {pos.shape[1]}")
    width = wte.shape[1]
    if _field(mc, "input_size", width) != width:
        raise ReferenceFormatError(f"spectra input_size {_field(mc, 'input_size')} != tokeniser input {width}")
    return {"spectrum_patch": int(width), "spectrum_amplitude": False}


def _model_args(cfg: ModelConfig) -> dict:
    weights = cfg.loss_weights or (1.0,) * len(cfg.modalities)
    modalities = []
    for m, w in zip(cfg.modalities, weights, strict=True):
        if m == MODALITY:
            modalities.append(
                {
                    "name": m,
                    "input_size": cfg.input_dim,
                    "pos_input_size": 1,
                    "patch_size": cfg.patch_size,
                    "embed_pos": True,
                    "loss_weight": w,
                }  # fmt: skip
            )
        else:
            modalities.append(
                {
                    "name": m,
                    "input_size": cfg.spectrum_patch,
                    "pos_input_size": 1,
                    "patch_size": cfg.spectrum_patch,
                    "embed_pos": False,
                    "loss_weight": w,
                }  # fmt: skip
            )
    # exactly the GPTConfig fields of astropt 2.0.9, so that `GPTConfig(**model_args)` works
    args = {
        **common_model_args(cfg),
        "tokeniser": cfg.tokeniser,
        "lora_r": 0,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "modalities": modalities,
    }
    return args
