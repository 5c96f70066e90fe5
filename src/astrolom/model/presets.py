"""Named AstroPT sizes: the paper's Table 1 plus a tiny `debug` preset.

`astrolom presets` prints them with parameter counts. Counts quoted by the paper are 'neural' parameters (no
position embeddings) of the 2024 model, whose tokeniser is the ReLU MLP kept here as `tokeniser="paper"`; the
default tokeniser ("aim", Linear-GELU-Linear with a 4x hidden layer) adds parameters that matter only for the
smallest sizes.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import torch

from astrolom.model.astropt import AstroPT, ModelConfig


@dataclass(frozen=True)
class Preset:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    learning_rate: float
    paper_params: float | None  # Table 1 'N params', None for presets not in the paper


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("debug", 2, 32, 2, 1e-3, None),
        Preset("1m", 4, 128, 8, 10e-4, 1e6),
        Preset("5m", 6, 256, 8, 10e-4, 5e6),
        Preset("12m", 6, 384, 8, 10e-4, 12e6),
        Preset("21m", 6, 512, 8, 10e-4, 21e6),
        Preset("89m", 12, 768, 12, 6e-4, 89e6),
        Preset("309m", 24, 1024, 16, 3e-4, 309e6),
        Preset("830m", 16, 2048, 8, 3e-4, 830e6),
        Preset("2.1b", 26, 2560, 32, 1.6e-4, 2.1e9),
    ]
}


# A size between the named ones: LAYERSxWIDTH, e.g. "3x96", heads of 16 dimensions (at most 8, as the paper's small
# sizes), or LAYERSxWIDTHhHEADS, e.g. "4x128h8". CPU-sized scaling sweeps need more than the five small presets.
_CUSTOM = re.compile(r"^(\d+)x(\d+)(?:h(\d+))?$")


def get_preset(name: str) -> Preset:
    if name.lower() in PRESETS:
        return PRESETS[name.lower()]
    m = _CUSTOM.match(name.lower())
    if m is None:
        raise ValueError(
            f"unknown preset {name!r}; choose from {', '.join(PRESETS)} or give LAYERSxWIDTH[hHEADS], e.g. 3x96"
        )
    n_layer, n_embd = int(m.group(1)), int(m.group(2))
    n_head = int(m.group(3)) if m.group(3) else max(1, min(8, n_embd // 16))
    if n_layer < 1 or n_embd < 1 or n_head < 1 or n_embd % n_head:
        raise ValueError(f"preset {name!r}: need at least one layer and a width divisible by the {n_head} heads")
    return Preset(name.lower(), n_layer, n_embd, n_head, 1e-3, None)


def model_config(name: str, **overrides) -> ModelConfig:
    """ModelConfig of a preset; `overrides` set any field (patch_size, block_size, tokeniser, even n_layer, ...)."""
    p = get_preset(name)
    return ModelConfig(**{"n_layer": p.n_layer, "n_embd": p.n_embd, "n_head": p.n_head, **overrides})


def count_params(config: ModelConfig, non_embedding: bool = True) -> int:
    """Parameter count without allocating memory (meta device), so 2.1B costs nothing."""
    with torch.device("meta"):
        model = AstroPT(config)
    return model.num_params(non_embedding=non_embedding)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--n-chan", type=int, default=3, help="bands per image (3 for g, r, z)")
    parser.add_argument("--block-size", type=int, default=1024)


def run(args: argparse.Namespace) -> int:
    kw = dict(patch_size=args.patch_size, n_chan=args.n_chan, block_size=args.block_size)
    header = (
        f"{'preset':>7} {'layers':>6} {'width':>6} {'heads':>5} {'lr':>8} {'params(aim)':>12} "
        f"{'params(paper tok.)':>18} {'paper':>7}"
    )
    print(header)
    print("-" * len(header))
    for p in PRESETS.values():
        aim = count_params(model_config(p.name, **kw), non_embedding=False)
        paper_tok = count_params(model_config(p.name, tokeniser="paper", **kw))
        quoted = "-" if p.paper_params is None else _human(p.paper_params)
        print(
            f"{p.name:>7} {p.n_layer:>6} {p.n_embd:>6} {p.n_head:>5} {p.learning_rate:>8.1e} "
            f"{_human(aim):>12} {_human(paper_tok):>18} {quoted:>7}"
        )
    print(
        "\nparams(aim): all parameters with the default tokeniser; params(paper tok.): neural parameters (no "
        "position embeddings) with the 2024 tokeniser, the paper's way of counting (Table 1)."
    )
    return 0


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
