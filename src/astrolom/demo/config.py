"""The demo's settings: `DemoConfig` (the full run) and `TINY` (`astrolom demo --tiny`: the same pipeline, toy size)."""

from __future__ import annotations

from dataclasses import dataclass

from astrolom.eval.probes import DEFAULT_TARGETS


@dataclass
class DemoConfig:
    """Everything the demo decides; `--tiny` swaps in `TINY`."""

    n: int = 8000  # mock galaxies (80/10/10 train/val/test)
    size: int = 64  # stamp size in pixels
    patch_size: int = 8  # 64 px / 8 px = an 8x8 token grid, as the paper's central 64 tokens
    preset: str = "1m"
    max_steps: int = 2800
    batch_size: int = 32
    learning_rate: float = 2e-3
    embed_tokens: int = 64  # central spiral tokens averaged per embedding (paper: 64)
    embed_layer: int = -2  # penultimate block (paper)
    # flux-aware tokens (beyond the paper; README "Flux-aware tokens"): better on every probe at 3,000 steps
    flux_features: bool = True
    cnn_epochs: int = 60
    methods: tuple[str, ...] = ("linear", "knn", "mlp")
    seed: int = 0
    umap: bool = True
    inpainting: bool = True
    instrument: str = "all"  # north/south instrument differences of the mock survey (`astrolom survey --instrument`)
    # the optional multimodal stage (0: off): an images + spectra model pretrained for this many steps
    # (on by default at a size that fits the demo's budget: the central 32x32 px in 16 image tokens and 49
    # spectrum tokens of 64 px, about as many tokens per sample as the main model; README has the longer run)
    spectra_steps: int = 300
    spectra_preset: str = "1m"
    spectrum_patch: int = 64  # spectrum pixels per token (the model's default is 32)
    spectra_image_size: int | None = 32  # centre crop of the stamps for the multimodal model (None: whole stamp)
    spectra_generate: int = 32  # test objects whose spectra are generated from their images
    spectra_methods: tuple[str, ...] = ("linear", "knn")  # probes of its embedding columns (MLPs: `astrolom probe`)
    # the targets of those probes: the continuous ones of the main table (telescope and edge_on are image properties,
    # and a logistic probe of a 1,024-wide column takes 12-16 s per class target on 2 cores: 1 min for the four)
    spectra_targets: tuple[str, ...] = tuple(t for t in DEFAULT_TARGETS if t not in ("telescope", "edge_on"))
    # the optional alignment stage (0: off; needs spectra_steps > 0): heads trained this many steps on cached features
    # of the stamps (1 view: no rotation/noise copies, to fit the budget); README "Alignment" has the full-size run
    align_steps: int = 120
    align_views: int = 1
    align_batch: int = 128


TINY = DemoConfig(
    n=240,
    size=32,
    patch_size=8,
    preset="debug",
    max_steps=20,
    batch_size=16,
    learning_rate=2e-3,
    embed_tokens=16,
    cnn_epochs=3,
    methods=("linear", "knn"),
    umap=True,
    inpainting=True,
    spectra_steps=4,
    spectra_preset="debug",
    spectrum_patch=128,
    spectra_image_size=None,
    spectra_generate=4,
    align_steps=6,
    align_views=1,
    align_batch=16,
)
