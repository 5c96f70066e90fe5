"""AstroPT: a GPT-2-style decoder that predicts the next 16x16 patch of a spiral-ordered galaxy image.

One file, plain PyTorch (no parallelism, precision or compile logic: those are applied from outside, see
`astrolom.train.parallel`). Shapes follow nanoGPT: B batch, T tokens, C model width, D patch values (P*P*bands).

    patches (B, T, D) --tokeniser--> (B, T, C) + position embedding
      --> n_layer x [x + attn(ln_1(x)); x + mlp(ln_2(x))] --> ln_f --> decoder --> (B, T, D)
    loss = Huber(delta=1)(prediction at t, standardised patch t+1)

With `flux_features` (beyond the paper) each image token also carries its patch's per-band asinh mean and std after
the D standardised values; a Linear adds them to the token embedding, and the loss stays on the D values.

Several modalities (`ModelConfig.modalities`, e.g. ("images", "spectra")) share the transformer; each has its own
tokeniser and decoder. A multimodal model takes a dict of tensors (`forward(inputs)`, keys below) and lays every
sample out as one sequence of segments, one per modality:

    [BOM_images, img_0 .. img_{Ti-1}, BOM_spectra, spec_0 .. spec_{Ts-1}]     (order fixed or random per sample)

A learned begin-of-modality (BOM) vector opens each segment and a learned modality embedding is added to every
token of a segment, so a model can be prompted to start any modality (`generate_modality`). Token j of a modality is
predicted from the hidden state just before it (its BOM for j = 0), so no value is ever predicted across a modality
boundary and both conditionals image->spectrum and spectrum->image are learned when the order is random. Image
tokens take learned positions 0..Ti-1 (`pos_emb`, as in the images-only model); spectrum tokens take an MLP of their
normalised wavelength (`wave_emb`), evaluated in float32 even under autocast. Missing modalities, padding tokens and
masked values are excluded from attention (as keys) and from the loss. Input keys, per modality `m`:

    m                (B, Tm, Dm) tokens                         m_mask        (B, Tm) bool, token present
    m_positions      (B, Tm) float32 wavelength (spectra)       m_value_mask  (B, Tm, Dm) bool, value in the loss
    m_present        (B,) bool, object has the modality (default: any token present); a missing key m = absent.

A model with `modalities=("images",)` has exactly the images-only modules and behaviour (tensor in, tensor out).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from astrolom.data.modalities import ALL, IMAGES, SPECTRA

TOKENISERS = ("aim", "affine", "paper")
ORDERS = ("fixed", "random")
TOKEN_PRESETS = ("astrolom", "paper2024")


@dataclass
class ModelConfig:
    """AstroPT architecture. Presets live in `astrolom.model.presets`."""

    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 128
    block_size: int = 1024  # maximum number of tokens (patches) in a sequence
    patch_size: int = 16
    n_chan: int = 3
    dropout: float = 0.0
    bias: bool = False  # bias in Linear/LayerNorm of the transformer; the "paper" tokeniser always has biases
    # "aim": Linear-GELU-Linear (4x hidden); "affine": one Linear; "paper": 2024 ReLU MLPs
    tokeniser: str = "aim"
    modalities: tuple[str, ...] = (IMAGES,)  # any non-empty subset of data.modalities.ALL, in that order
    # "fixed": segments in `modalities` order; "random": a random order per sample while training (eval: fixed)
    modality_order: str = "fixed"
    # BOM tokens + modality embedding for multimodal models; False is the reference astropt layout (import only)
    modality_tokens: bool = True
    loss_weights: tuple[float, ...] = ()  # one per modality (default all 1): weights of a token-weighted mean
    spectrum_patch: int = 32  # pixels per spectrum token (see astrolom.data.spectra for the choice)
    spectrum_amplitude: bool = True  # spectrum tokens carry log10 of the spectrum's scale as one extra value
    spectrum_wavelength_range: tuple[float, float] = (3000.0, 10000.0)  # Angstrom mapped to positions 0 and 1
    # flux-aware image tokens (beyond the paper): each image token carries 2 * n_chan extra values after its
    # D standardised ones, the per-band asinh(mean / s) and asinh(std / s) of the raw patch
    # (`astrolom.data.tokens.flux_features`), added to the token embedding through one Linear; the loss stays on
    # the standardised values. False is the paper's tokenisation (and the images-only modules exactly).
    flux_features: bool = False
    flux_softening: float = 0.01  # s, in the pixels' units (nanomaggies: about the Legacy Survey's sky sigma)
    # how images become tokens when embedding: "astrolom" (`data.tokens.tokenize`) or "paper2024", the training-time
    # preprocessing of astropt 1.0.x (`data.tokens.tokenize_paper2024`), which imported paper checkpoints carry
    tokens_preset: str = "astrolom"

    def __post_init__(self):
        # JSON/YAML configs give lists; a tuple keeps configs comparable with the default
        self.modalities = tuple(self.modalities)
        self.loss_weights = tuple(float(w) for w in self.loss_weights)
        self.spectrum_wavelength_range = tuple(float(w) for w in self.spectrum_wavelength_range)
        for name in ("n_layer", "n_head", "n_embd", "block_size", "patch_size", "n_chan"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.tokeniser not in TOKENISERS:
            raise ValueError(f"tokeniser must be one of {TOKENISERS}, got {self.tokeniser!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be a non-empty list without repeats, got {self.modalities}")
        unknown = [m for m in self.modalities if m not in ALL]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; choose from {ALL}")
        if self.modality_order not in ORDERS:
            raise ValueError(f"modality_order must be one of {ORDERS}, got {self.modality_order!r}")
        if self.modality_order == "random" and not self.modality_tokens and len(self.modalities) > 1:
            # without BOM tokens a modality's first token is predicted across the boundary from whichever
            # modality happens to precede it; that layout exists for reference checkpoints (fixed order) only
            raise ValueError("modality_order='random' needs modality_tokens=True")
        if self.loss_weights and (len(self.loss_weights) != len(self.modalities) or min(self.loss_weights) < 0):
            raise ValueError(
                f"loss_weights must give one non-negative weight per modality {self.modalities}, "
                f"got {self.loss_weights}"
            )
        if isinstance(self.spectrum_patch, bool) or not isinstance(self.spectrum_patch, int) or self.spectrum_patch < 1:
            raise ValueError(f"spectrum_patch must be a positive integer, got {self.spectrum_patch!r}")
        if self.flux_features and self.multimodal:
            raise ValueError("flux_features is implemented for images-only models (modalities=('images',))")
        if self.tokens_preset not in TOKEN_PRESETS:
            raise ValueError(f"tokens_preset must be one of {TOKEN_PRESETS}, got {self.tokens_preset!r}")
        if self.tokens_preset != "astrolom" and (self.multimodal or self.flux_features):
            raise ValueError(f"tokens_preset={self.tokens_preset!r} is for images-only models without flux features")
        if not self.flux_softening > 0:
            raise ValueError(f"flux_softening must be positive, got {self.flux_softening}")
        lo, hi = self.spectrum_wavelength_range
        if not hi > lo:
            raise ValueError(f"spectrum_wavelength_range must be (low, high) with high > low, got {(lo, hi)}")

    @property
    def input_dim(self) -> int:
        return self.patch_size * self.patch_size * self.n_chan

    @property
    def n_flux(self) -> int:
        """Flux values appended to each image token (0 for the paper's tokenisation)."""
        return 2 * self.n_chan if self.flux_features else 0

    @property
    def token_dim(self) -> int:
        """Values per image token the model reads: the standardised patch plus any flux features."""
        return self.input_dim + self.n_flux

    @property
    def multimodal(self) -> bool:
        """True when the model takes dict inputs (more than one modality, or spectra)."""
        return self.modalities != (IMAGES,)

    @property
    def bom_tokens(self) -> bool:
        return self.modality_tokens and len(self.modalities) > 1

    def modality_dim(self, modality: str) -> int:
        """Values per token of a modality (what its tokeniser reads and its decoder writes)."""
        if modality == IMAGES:
            return self.input_dim
        return self.spectrum_patch + int(self.spectrum_amplitude)

    def loss_weight(self, modality: str) -> float:
        return self.loss_weights[self.modalities.index(modality)] if self.loss_weights else 1.0


def _tokeniser(cfg: ModelConfig, d_in: int) -> nn.Module:
    c = cfg.n_embd
    if cfg.tokeniser == "aim":
        return nn.Sequential(
            nn.Linear(d_in, 4 * c, bias=cfg.bias),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * c, c, bias=cfg.bias),
        )
    if cfg.tokeniser == "affine":
        return nn.Sequential(nn.Linear(d_in, c, bias=cfg.bias))
    return nn.Sequential(nn.Linear(d_in, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU())


def _decoder(cfg: ModelConfig, d_out: int) -> nn.Module:
    c = cfg.n_embd
    if cfg.tokeniser == "aim":
        return nn.Sequential(
            nn.Linear(c, 4 * c, bias=cfg.bias),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * c, d_out, bias=cfg.bias),
        )
    if cfg.tokeniser == "affine":
        return nn.Sequential(nn.Linear(c, d_out, bias=cfg.bias))
    return nn.Sequential(nn.Linear(c, 2 * c), nn.ReLU(), nn.Linear(2 * c, c), nn.ReLU(), nn.Linear(c, d_out))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # SDPA dispatches to flash / memory-efficient kernels on GPU; an explicit (B, 1, T, T) mask (causal and
        # valid keys only, multimodal batches with missing tokens) takes the memory-efficient / math kernels
        p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class AstroPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        mods = config.modalities
        self.tokenisers = nn.ModuleDict({m: _tokeniser(config, config.modality_dim(m)) for m in mods})
        if IMAGES in mods:
            self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        if SPECTRA in mods:
            # an MLP of the normalised wavelength (the reference's layout: same structure as a tokeniser of 1 value)
            self.wave_emb = _tokeniser(config, 1)
        if config.bom_tokens:
            self.modality_emb = nn.Embedding(len(mods), config.n_embd)
            self.bom_emb = nn.Embedding(len(mods), config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.decoders = nn.ModuleDict({m: _decoder(config, config.modality_dim(m)) for m in mods})
        self.reset_parameters()
        if config.flux_features:  # after the others' init: the paper's modules draw the same weights either way
            self.flux_emb = nn.Linear(config.n_flux, config.n_embd, bias=config.bias)
            nn.init.normal_(self.flux_emb.weight, mean=0.0, std=0.02)
            if self.flux_emb.bias is not None:
                nn.init.zeros_(self.flux_emb.bias)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 * n_layer)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (the paper's 'neural' parameter count)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding and hasattr(self, "pos_emb") else n

    def _embed(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        T = x.shape[1]
        if T > self.config.block_size:
            raise ValueError(
                f"sequence of {T} tokens exceeds block_size={self.config.block_size}; "
                "crop the stamp or pass only the first block_size spiral tokens (they are the centre)"
            )
        pos = torch.arange(T, device=x.device)
        if self.config.flux_features:
            d = self.config.input_dim
            if x.shape[-1] != d + self.config.n_flux:
                raise ValueError(
                    f"a flux-aware model reads tokens of {d} standardised + {self.config.n_flux} flux values, got "
                    f"{x.shape[-1]}; make them with astrolom.data.batching.batch_tokens(batch, flux_softening=...)"
                )
            h = self.tokenisers[modality](x[..., :d]) + self.flux_emb(x[..., d:])  # (B, T, C)
            return self.drop(h + self.pos_emb(pos))
        return self.drop(self.tokenisers[modality](x) + self.pos_emb(pos))  # (B, T, C)

    def forward_intermediates(
        self, x: torch.Tensor | Mapping[str, torch.Tensor], modality: str = IMAGES, stop_at: int | None = None
    ) -> list[torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Hidden states (B, T, C) after each transformer block (index i = output of block i).

        `stop_at` ends the pass after that block (negative counts from the end), so early-layer features cost
        only the layers they need. With dict inputs (multimodal) each entry is a dict {modality: (B, Tm, C)} of the
        hidden states at that modality's tokens (BOM tokens left out), from one joint pass in the fixed order.
        """
        last = len(self.blocks) - 1 if stop_at is None else self._block_index(stop_at)
        if isinstance(x, Mapping):
            hs, layout = self._trunk(x, None, last)
            return [self._split(h, layout) for h in hs]
        self._tensor_input_check()
        h = self._embed(x, modality)
        out = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            out.append(h)
            if i == last:
                break
        return out

    def forward_features(
        self, x: torch.Tensor | Mapping[str, torch.Tensor], layer: int = -2, modality: str = IMAGES
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Per-token features (B, T, C) from one block; the default -2 is the penultimate layer (paper, sec. 3).

        `layer=-1` returns the final block after the final LayerNorm (what the decoder sees). With dict inputs the
        result is {modality: (B, Tm, C)} for every modality given: pass one modality's keys for single-modality
        features, several for joint ones (`m_mask` says which tokens are real).
        """
        idx = self._block_index(layer)
        h = self.forward_intermediates(x, modality, stop_at=idx)[-1]
        if isinstance(h, dict):
            return {m: self.ln_f(v) for m, v in h.items()} if idx == len(self.blocks) - 1 else h
        return self.ln_f(h) if idx == len(self.blocks) - 1 else h

    def _block_index(self, layer: int) -> int:
        """Python-style block index (negative counts from the end) -> 0..n_layer-1, or a ValueError."""
        n = len(self.blocks)
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} out of range for {n} blocks (valid: {-n}..{n - 1})")
        return layer + n if layer < 0 else layer

    def forward(
        self,
        x: torch.Tensor | Mapping[str, torch.Tensor],
        targets: torch.Tensor | None = None,
        modality: str = IMAGES,
        order: list[str] | torch.Tensor | None = None,
        normaliser: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor | None]:
        """Predict token t+1 from tokens <= t.

        Args:
            x: (B, T, D) standardised spiral-ordered patches ((B, T, D + 2 * n_chan) with `flux_features`).
            targets: the next patches (x shifted by one; flux values there are ignored), or None.

        Returns:
            (prediction (B, T, D), Huber loss averaged over all values or None)

        With dict inputs (see the module docstring) it returns ({modality: (B, Tm, Dm) prediction *of* each token},
        loss): the Huber loss of each token averaged over its `m_value_mask` values, then a mean over the tokens
        whose value and context exist, weighted per modality by `loss_weights`. `order` overrides the segment
        order: a list of modality names, or a (B, n) tensor of indices into the modalities given, per sample.
        `normaliser` replaces the batch's own total token weight (`loss_weight(x)`) as the denominator, so that
        gradient accumulation and data parallelism can divide by the weight of the whole global batch.
        """
        if isinstance(x, Mapping):
            if targets is not None:
                raise ValueError(
                    "multimodal inputs carry their own targets (each token is predicted); pass targets=None"
                )
            return self._forward_multi(x, order, normaliser)
        self._tensor_input_check()
        h = self._embed(x, modality)
        for block in self.blocks:
            h = block(h)
        pred = self.decoders[modality](self.ln_f(h))  # (B, T, D)
        if targets is not None and self.config.flux_features:
            targets = targets[..., : self.config.input_dim]  # the loss stays on the standardised patch
        loss = None if targets is None else F.huber_loss(pred, targets, delta=1.0)
        return pred, loss

    # --- multimodal ----------------------------------------------------------------------------------------------
    def _tensor_input_check(self) -> None:
        if self.config.multimodal:
            raise TypeError(
                f"this model has modalities {self.config.modalities}: pass a dict of tensors "
                "({'images': ..., 'spectra': ..., 'spectra_positions': ...}), see astrolom.model.astropt"
            )

    def _positions(self, m: str, inputs: Mapping[str, torch.Tensor], B: int, T: int, device) -> torch.Tensor:
        if m == IMAGES:
            if T > self.config.block_size:
                raise ValueError(f"{T} image tokens exceed block_size={self.config.block_size}")
            return self.pos_emb(torch.arange(T, device=device))  # (T, C)
        pos = inputs.get(f"{m}_positions")
        if pos is None or tuple(pos.shape) != (B, T):
            got = None if pos is None else tuple(pos.shape)
            raise ValueError(f"'{m}_positions' must be (B, T) = {(B, T)} normalised wavelengths, got {got}")
        weight = self.wave_emb[0].weight
        # float32 wavelengths stay float32 under autocast (bf16 would round them to 16-64 A steps)
        with torch.autocast(device_type=device.type, enabled=False):
            return self.wave_emb(pos.to(weight.dtype)[..., None])  # (B, T, C)

    def _trunk(
        self, inputs: Mapping[str, torch.Tensor], order: list[str] | torch.Tensor | None, last: int
    ) -> tuple[list[torch.Tensor], dict]:
        """Embed, lay out and run blocks 0..last; hidden states in sequence order plus the layout to undo it."""
        cfg = self.config
        known = {f"{m}{s}" for m in cfg.modalities for s in ("", "_positions", "_mask", "_value_mask", "_present")}
        unknown = sorted(set(inputs) - known)
        if unknown:
            raise ValueError(
                f"unknown input keys {unknown} for modalities {cfg.modalities}; expected some of {sorted(known)}"
            )
        mods = [m for m in cfg.modalities if m in inputs]
        if not mods:
            raise ValueError(f"inputs hold none of the model's modalities {cfg.modalities}")
        B = inputs[mods[0]].shape[0]
        device = inputs[mods[0]].device
        embs, valid, tok_masks, segs = [], [], {}, []
        start = 0
        for m in mods:
            x = inputs[m]
            if x.dim() != 3 or x.shape[0] != B or x.shape[-1] != cfg.modality_dim(m):
                raise ValueError(f"'{m}' must be (B={B}, T, {cfg.modality_dim(m)}), got {tuple(x.shape)}")
            T = x.shape[1]
            tok = inputs.get(f"{m}_mask")
            tok = torch.ones(B, T, dtype=torch.bool, device=device) if tok is None else tok.to(torch.bool)
            present = inputs.get(f"{m}_present")
            present = tok.any(1) if present is None else present.to(torch.bool)
            tok = tok & present[:, None]
            e = self.tokenisers[m](x) + self._positions(m, inputs, B, T, device)  # (B, T, C)
            if cfg.bom_tokens:
                k = cfg.modalities.index(m)
                e = torch.cat([self.bom_emb.weight[k].expand(B, 1, -1).to(e.dtype), e], dim=1)
                e = e + self.modality_emb.weight[k].to(e.dtype)
                v = torch.cat([present[:, None], tok], dim=1)
            else:
                v = tok
            embs.append(e)
            valid.append(v)
            tok_masks[m] = tok
            segs.append((m, start, e.shape[1]))
            start += e.shape[1]
        if start > cfg.block_size:
            counts = ", ".join(f"{m} {inputs[m].shape[1]}" for m in mods)
            bom = f" + {len(mods)} begin-of-modality" if cfg.bom_tokens else ""
            raise ValueError(
                f"token budget exceeded: {counts} tokens{bom} = {start} > block_size={cfg.block_size}; "
                "use larger patches, smaller stamps or a larger block_size"
            )
        h = torch.cat(embs, dim=1)  # (B, T, C) canonical order
        key_valid = torch.cat(valid, dim=1)  # (B, T)
        perm = self._permutation(segs, order, B, device)
        if perm is not None:
            h = h.gather(1, perm[..., None].expand(-1, -1, h.shape[-1]))
            key_valid = key_valid.gather(1, perm)
        T = h.shape[1]
        attn_mask = None
        if not bool(key_valid.all()):
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=device)
            # a query never sees a missing key; it always sees itself, so no row is empty (NaN-free softmax)
            attn_mask = ((causal & key_valid[:, None, :]) | eye)[:, None]  # (B, 1, T, T)
        h = self.drop(h)
        out = []
        for i, block in enumerate(self.blocks):
            h = block(h, attn_mask)
            out.append(h)
            if i == last:
                break
        layout = {"segs": segs, "perm": perm, "key_valid": key_valid, "tok_masks": tok_masks}
        return out, layout

    def _permutation(self, segs: list, order, B: int, device) -> torch.Tensor | None:
        """(B, T) gather index from the canonical layout to each sample's segment order; None for the canonical."""
        names = [m for m, _, _ in segs]
        n = len(names)
        if order is None:
            if self.config.modality_order == "random" and self.training and n > 1:
                order = torch.argsort(torch.rand(B, n), dim=1)  # global torch RNG: saved with trainer state
            else:
                return None
        elif not isinstance(order, torch.Tensor):
            if sorted(order) != sorted(names):
                raise ValueError(f"order {list(order)} must name exactly the modalities given, {names}")
            order = torch.tensor([names.index(m) for m in order]).expand(B, n)
        order = order.to("cpu", torch.long)
        if order.shape != (B, n) or not bool((order.sort(1).values == torch.arange(n)).all()):
            raise ValueError(f"order must be (B={B}, {n}) permutations of 0..{n - 1}, got {tuple(order.shape)}")
        if bool((order == torch.arange(n)).all()):
            return None
        uniq, inverse = torch.unique(order, dim=0, return_inverse=True)
        table = torch.stack(
            [torch.cat([torch.arange(segs[k][1], segs[k][1] + segs[k][2]) for k in row.tolist()]) for row in uniq]
        )
        return table[inverse].to(device)

    def _canonical(self, h: torch.Tensor, layout: dict) -> torch.Tensor:
        perm = layout["perm"]
        if perm is None:
            return h
        inv = torch.argsort(perm, dim=1)
        return h.gather(1, inv[..., None].expand(-1, -1, h.shape[-1])) if h.dim() == 3 else h.gather(1, inv)

    def _split(self, h: torch.Tensor, layout: dict) -> dict[str, torch.Tensor]:
        """Sequence-order hidden states -> {modality: (B, Tm, C)} at its data tokens."""
        h = self._canonical(h, layout)
        off = int(self.config.bom_tokens)
        return {m: h[:, s + off : s + n] for m, s, n in layout["segs"]}

    def loss_weight(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Total weight of the tokens that enter the loss of `inputs` (the loss's denominator), without a forward.

        A token counts when it has a value in the loss and its predecessor (its BOM, or the previous token of the
        fixed sequence without BOM tokens) is present; each counts with its modality's loss weight.
        """
        total = torch.zeros((), dtype=torch.float32)
        prev_last = None
        for m in (m for m in self.config.modalities if m in inputs):
            x = inputs[m]
            B, T = x.shape[:2]
            tok = inputs.get(f"{m}_mask")
            tok = torch.ones(B, T, dtype=torch.bool, device=x.device) if tok is None else tok.to(torch.bool)
            present = inputs.get(f"{m}_present")
            present = tok.any(1) if present is None else present.to(torch.bool)
            tok = tok & present[:, None]
            vm = inputs.get(f"{m}_value_mask")
            has = tok if vm is None else tok & vm.any(-1)
            if self.config.bom_tokens:
                first = present
            else:
                first = torch.zeros_like(present) if prev_last is None else prev_last
            src = torch.cat([first[:, None], tok[:, :-1]], dim=1)
            total = total + self.config.loss_weight(m) * (has & src).sum().float().cpu()
            prev_last = tok[:, -1]
        return total

    def _forward_multi(
        self, inputs: Mapping[str, torch.Tensor], order, normaliser: torch.Tensor | float | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        hs, layout = self._trunk(inputs, order, len(self.blocks) - 1)
        h = self.ln_f(hs[-1])  # (B, T, C) sequence order
        kv = layout["key_valid"]
        # the token at sequence position p is predicted from the hidden state at p - 1 (its BOM or its predecessor)
        src = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        src_valid = torch.cat([torch.zeros_like(kv[:, :1]), kv[:, :-1]], dim=1)
        src = self._canonical(src, layout)
        src_valid = self._canonical(src_valid, layout)
        off = int(self.config.bom_tokens)
        preds: dict[str, torch.Tensor] = {}
        num = h.new_zeros((), dtype=torch.float32)
        den = h.new_zeros((), dtype=torch.float32)
        for m, s, n in layout["segs"]:
            pred = self.decoders[m](src[:, s + off : s + n])  # (B, Tm, Dm)
            preds[m] = pred
            target = inputs[m]
            vm = inputs.get(f"{m}_value_mask")
            vm = torch.ones_like(target, dtype=torch.float32) if vm is None else vm.to(torch.float32)
            hub = F.huber_loss(pred.float(), target.float(), reduction="none", delta=1.0)
            tok_loss = (hub * vm).sum(-1) / vm.sum(-1).clamp_min(1.0)  # (B, Tm)
            w = (layout["tok_masks"][m] & src_valid[:, s + off : s + n] & (vm.sum(-1) > 0)).to(torch.float32)
            w = w * self.config.loss_weight(m)
            num = num + (tok_loss * w).sum()
            den = den + w.sum()
        return preds, num / (den.clamp_min(1e-12) if normaliser is None else normaliser)

    @torch.no_grad()
    def generate_modality(
        self,
        inputs: Mapping[str, torch.Tensor],
        target: str,
        n_tokens: int | None = None,
        positions: torch.Tensor | None = None,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generate `target` tokens (B, n, Dm) from the other modalities in `inputs` (prompted by its BOM token).

        Args:
            inputs: conditioning modalities (dict inputs as for `forward`); keys of `target` are ignored.
            target: the modality to generate.
            n_tokens: how many tokens (images); for spectra it is the length of `positions`.
            positions: (B, n) or (n,) normalised wavelengths of the spectrum tokens to generate.
            temperature: standard deviation of Gaussian noise added to each generated token.
        """
        cfg = self.config
        if target not in cfg.modalities:
            raise ValueError(f"target {target!r} is not one of the model's modalities {cfg.modalities}")
        cond = {k: v for k, v in inputs.items() if k != target and not k.startswith(f"{target}_")}
        given = [m for m in cfg.modalities if m in cond]
        if not given:
            raise ValueError(
                f"nothing to condition on: inputs hold none of {[m for m in cfg.modalities if m != target]}"
            )
        B, device = cond[given[0]].shape[0], cond[given[0]].device
        if target == SPECTRA:
            if positions is None:
                raise ValueError("generating spectra needs the token wavelengths: positions=(n,) or (B, n)")
            positions = positions.to(device).expand(B, -1) if positions.dim() == 1 else positions.to(device)
            n_tokens = positions.shape[1]
        elif n_tokens is None:
            raise ValueError("generating images needs n_tokens")
        d = cfg.modality_dim(target)
        order = [*given, target]
        out = torch.zeros(B, 0, d, device=device)
        for k in range(n_tokens):
            x = torch.cat([out, torch.zeros(B, 1, d, device=device)], dim=1)
            mask = torch.ones(B, k + 1, dtype=torch.bool, device=device)
            mask[:, -1] = False  # the placeholder is predicted, never attended to
            step = {
                **cond,
                target: x,
                f"{target}_mask": mask,
                f"{target}_present": torch.ones(B, dtype=torch.bool, device=device),
            }
            if target == SPECTRA:
                step[f"{target}_positions"] = positions[:, : k + 1]
            preds, _ = self._forward_multi(step, order)
            nxt = preds[target][:, -1:]
            if temperature > 0:
                nxt = nxt + temperature * torch.randn(nxt.shape, generator=generator, device=device, dtype=nxt.dtype)
            out = torch.cat([out, nxt], dim=1)
        return out

    @torch.no_grad()
    def generate(
        self,
        prefix: torch.Tensor,
        n_new: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue a spiral token sequence (B, T0, D) by `n_new` tokens -> (B, T0 + n_new, D).

        The prediction is a point estimate (the Huber-loss optimum); `temperature` adds Gaussian noise of that
        standard deviation to each generated token.
        """
        x = prefix
        for _ in range(n_new):
            pred, _ = self(x[:, -self.config.block_size :])
            nxt = pred[:, -1:]
            if temperature > 0:
                noise = torch.randn(nxt.shape, generator=generator, device=nxt.device, dtype=nxt.dtype)
                nxt = nxt + temperature * noise
            x = torch.cat([x, nxt], dim=1)
        return x
