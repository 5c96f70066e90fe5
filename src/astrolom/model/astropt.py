"""AstroPT: a GPT-2-style decoder that predicts the next 16x16 patch of a spiral-ordered galaxy image.

One file, plain PyTorch (no parallelism, precision or compile logic: those are applied from outside, see
`astrolom.train.parallel`). Shapes follow nanoGPT: B batch, T tokens, C model width, D patch values (P*P*bands).

    patches (B, T, D) --tokeniser--> (B, T, C) + position embedding
      --> n_layer x [x + attn(ln_1(x)); x + mlp(ln_2(x))] --> ln_f --> decoder --> (B, T, D)
    loss = Huber(delta=1)(prediction at t, standardised patch t+1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

TOKENISERS = ("aim", "affine", "paper")


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
    modalities: tuple[str, ...] = ("images",)

    def __post_init__(self):
        # JSON/YAML configs give lists; a tuple keeps configs comparable with the default
        self.modalities = tuple(self.modalities)
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
        if self.modalities != ("images",):
            raise ValueError("only the 'images' modality is implemented so far")

    @property
    def input_dim(self) -> int:
        return self.patch_size * self.patch_size * self.n_chan


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # SDPA dispatches to flash / memory-efficient kernels on GPU
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class AstroPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.input_dim
        self.tokenisers = nn.ModuleDict({m: _tokeniser(config, d) for m in config.modalities})
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.decoders = nn.ModuleDict({m: _decoder(config, d) for m in config.modalities})
        self.reset_parameters()

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
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def _embed(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        T = x.shape[1]
        if T > self.config.block_size:
            raise ValueError(
                f"sequence of {T} tokens exceeds block_size={self.config.block_size}; "
                "crop the stamp or pass only the first block_size spiral tokens (they are the centre)"
            )
        pos = torch.arange(T, device=x.device)
        return self.drop(self.tokenisers[modality](x) + self.pos_emb(pos))  # (B, T, C)

    def forward_intermediates(
        self, x: torch.Tensor, modality: str = "images", stop_at: int | None = None
    ) -> list[torch.Tensor]:
        """Hidden states (B, T, C) after each transformer block (index i = output of block i).

        `stop_at` ends the pass after that block (negative counts from the end), so early-layer features cost
        only the layers they need.
        """
        last = len(self.blocks) - 1 if stop_at is None else self._block_index(stop_at)
        h = self._embed(x, modality)
        out = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            out.append(h)
            if i == last:
                break
        return out

    def forward_features(self, x: torch.Tensor, layer: int = -2, modality: str = "images") -> torch.Tensor:
        """Per-token features (B, T, C) from one block; the default -2 is the penultimate layer (paper, sec. 3).

        `layer=-1` returns the final block after the final LayerNorm (what the decoder sees).
        """
        idx = self._block_index(layer)
        h = self.forward_intermediates(x, modality, stop_at=idx)[-1]
        return self.ln_f(h) if idx == len(self.blocks) - 1 else h

    def _block_index(self, layer: int) -> int:
        """Python-style block index (negative counts from the end) -> 0..n_layer-1, or a ValueError."""
        n = len(self.blocks)
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} out of range for {n} blocks (valid: {-n}..{n - 1})")
        return layer + n if layer < 0 else layer

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None, modality: str = "images"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predict token t+1 from tokens <= t.

        Args:
            x: (B, T, D) standardised spiral-ordered patches.
            targets: (B, T, D) the next patches (x shifted by one), or None.

        Returns:
            (prediction (B, T, D), Huber loss averaged over all values or None)
        """
        h = self._embed(x, modality)
        for block in self.blocks:
            h = block(h)
        pred = self.decoders[modality](self.ln_f(h))  # (B, T, D)
        loss = None if targets is None else F.huber_loss(pred, targets, delta=1.0)
        return pred, loss

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
