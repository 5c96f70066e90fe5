"""Pretraining configuration: `PretrainConfig` nests model / data / optim / train sections.

Precedence, lowest first: dataclass defaults < `--config cfg.yaml` < command-line flags (`--data`, `--preset`,
`--out`, `--max-steps`) < `section.key=value` overrides. Unknown keys are errors (see `astrolom.config`).

The `model` section names a preset (paper Table 1) and optionally overrides its fields; `None` means "from the preset"
(n_layer, n_head, n_embd) or "from the data" (block_size = tokens per stamp). `n_chan` always comes from the data and
`patch_size` from `data.patch_size`, so the model and its tokeniser cannot disagree. `resolve_model_config` turns the
section into the model's own `ModelConfig`; the run directory stores the resolved values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from astrolom.data.batching import OUTPUTS
from astrolom.data.modalities import IMAGES
from astrolom.data.records import DEFAULT_SPLIT_FRACTIONS, check_split_fractions
from astrolom.model.astropt import TOKENISERS, ModelConfig
from astrolom.model.presets import get_preset, model_config


@dataclass
class ModelSection:
    """Which AstroPT to train: a preset plus optional overrides of its architecture."""

    preset: str = "debug"
    n_layer: int | None = None  # None: from the preset
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None  # None: tokens per stamp, (image_size / patch_size)^2
    dropout: float = 0.0
    bias: bool = False
    tokeniser: str = "aim"
    # multimodal (see astrolom.model.astropt): e.g. modalities=images,spectra needs data with spectra
    modalities: tuple[str, ...] = (IMAGES,)
    modality_order: str = "fixed"  # fixed | random (per sample, so both conditionals are learned)
    modality_tokens: bool = True  # begin-of-modality tokens and a modality embedding
    loss_weights: tuple[float, ...] = ()  # one per modality; () = all 1
    spectrum_patch: int = 32  # pixels per spectrum token
    spectrum_amplitude: bool = True  # spectrum tokens carry log10 of the spectrum's scale
    # flux-aware image tokens: per-band asinh(mean / s), asinh(std / s) of each patch enter the embedding (the loss
    # stays on standardised patches); false = the paper's tokenisation. s = flux_softening, in the pixels' units
    flux_features: bool = False
    flux_softening: float = 0.01

    def __post_init__(self):
        get_preset(self.preset)  # raises on an unknown name
        self.modalities = tuple(self.modalities)
        self.loss_weights = tuple(self.loss_weights)
        # the model's own checks (names, order, weights) with the section's values, so errors come early
        ModelConfig(modalities=self.modalities, modality_order=self.modality_order, loss_weights=self.loss_weights,
                    spectrum_patch=self.spectrum_patch, flux_features=self.flux_features,
                    flux_softening=self.flux_softening)  # fmt: skip
        if self.tokeniser not in TOKENISERS:
            raise ValueError(f"model.tokeniser must be one of {TOKENISERS}, got {self.tokeniser!r}")
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"model.{name} must be positive, got {v}")


@dataclass
class DataConfig:
    """Where the images come from and how they become tokens."""

    path: str = ""  # directory / file / fsspec URL of any format `astrolom.data.sources` reads
    format: str | None = None  # None: detect from the path
    image_size: int | None = None  # centre-crop stamps to this many pixels; None: the stamps' own size
    patch_size: int = 16
    shuffle: bool = True
    seed: int = 0  # data-order seed (independent of the model-init seed)
    skip_bad: bool = False  # skip unreadable records instead of failing
    resample_spectra: bool = True  # spectra on another wavelength grid: resample (flux-conserving); false: bad record
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS  # for data without a split column
    split_seed: int = 0
    val_split: str = "val"  # the split validation is computed on; training reads only "train"
    prefetch: int = 2  # training batches prepared ahead by a background thread; 0: prepare in the training loop
    # training batches as float32 tokens (exact), bfloat16 tokens (half the bytes; needs train.precision=bf16) or
    # pixels: 8-bit JPEG/PNG patches standardised on the training device (the CPU only decodes; see data.batching)
    token_format: str = "float32"
    augment: str = "none"  # "d4": a random rotation/mirror (astrolom.data.augment) per training sample
    bands: tuple[str, ...] | None = None  # image bands to use, by name (g,r,z of griz data); None: all, as stored

    def __post_init__(self):
        if self.patch_size <= 0:
            raise ValueError(f"data.patch_size must be positive, got {self.patch_size}")
        if self.image_size is not None and self.image_size % self.patch_size:
            raise ValueError(f"data.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.token_format not in OUTPUTS:
            raise ValueError(f"data.token_format must be one of {OUTPUTS}, got {self.token_format!r}")
        if self.prefetch < 0:
            raise ValueError(f"data.prefetch must be >= 0, got {self.prefetch}")
        if self.augment not in ("none", "d4"):
            raise ValueError(f"data.augment must be 'none' or 'd4', got {self.augment!r}")
        if self.val_split == "train":
            raise ValueError("data.val_split must not be 'train': validation uses data training never sees")
        self.split_fractions = check_split_fractions(self.split_fractions, "data.split_fractions")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * learning_rate`."""

    learning_rate: float | None = None  # None: the preset's (paper Table 1)
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # None: 5% of train.max_steps (at least 1)
    decay_steps: int | None = None  # step at which the cosine reaches its floor; None: train.max_steps
    weight_decay: float = 0.1  # applied to >= 2-D weights only (no biases, LayerNorm gains)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    fused: bool | None = None  # fused AdamW kernel; None: use it where the device supports it

    def __post_init__(self):
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"optim.learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("optim.grad_clip and optim.weight_decay must be >= 0")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainConfig:
    """Loop, batch, precision, parallelism, logging and checkpoint settings."""

    out_dir: str = ""  # the run directory (RUN); see astrolom.train.checkpoint for its layout
    max_steps: int = 1000
    batch_size: int = 32  # global batch: micro_batch_size x accumulation steps x world size
    micro_batch_size: int | None = None  # per rank and forward pass; None: batch_size / world size (no accumulation)
    seed: int = 0  # model-init seed
    eval_interval: int = 100  # steps between validation passes (and one at the end); 0 disables validation
    eval_samples: int = 512  # validation images (all ranks together; cached, the same images every time)
    checkpoint_interval: int = 1000  # 0: only the final checkpoint
    log_checkpoints: int = 0  # additionally keep this many checkpoints log-spaced over training (paper-style release)
    keep_last: int | None = None  # prune interval checkpoints beyond the newest N (log-spaced ones are kept)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model (GPU)
    parallel: str = "auto"  # auto | none | ddp | fsdp (auto: DDP under torchrun, FSDP if the model does not fit)
    tensorboard: bool = True
    wandb: bool = False  # needs `pip install wandb`
    wandb_project: str = "astrolom"
    codecarbon: bool = False  # needs `pip install codecarbon`
    progress: bool = True  # tqdm bar with ETA on the main rank

    def __post_init__(self):
        if self.max_steps <= 0:
            raise ValueError(f"train.max_steps must be positive, got {self.max_steps}")
        if self.batch_size <= 0 or (self.micro_batch_size is not None and self.micro_batch_size <= 0):
            raise ValueError("train.batch_size and train.micro_batch_size must be positive")
        if self.eval_interval < 0 or self.checkpoint_interval < 0 or self.log_checkpoints < 0:
            raise ValueError("train.eval_interval, checkpoint_interval and log_checkpoints must be >= 0")
        if self.eval_interval and self.eval_samples <= 0:
            raise ValueError("train.eval_samples must be positive when validation is enabled")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1 or null, got {self.keep_last}")
        choices = {"device": ("auto", "cpu", "cuda"), "precision": ("auto", "fp32", "bf16")}
        choices["parallel"] = ("auto", "none", "ddp", "fsdp")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"train.{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def accumulation_steps(self, world_size: int) -> tuple[int, int]:
        """(micro_batch_size, accumulation steps) for a world size; the global batch must split evenly."""
        micro = self.micro_batch_size or self.batch_size // world_size
        if micro <= 0 or self.batch_size % (micro * world_size):
            raise ValueError(
                f"train.batch_size={self.batch_size} is not micro_batch_size x accumulation x world size "
                f"(micro_batch_size={micro}, world size={world_size})"
            )
        return micro, self.batch_size // (micro * world_size)


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def learning_rate(self) -> float:
        return self.optim.learning_rate or get_preset(self.model.preset).learning_rate

    def warmup_steps(self) -> int:
        if self.optim.warmup_steps is not None:
            return self.optim.warmup_steps
        return max(1, self.train.max_steps // 20)

    def decay_steps(self) -> int:
        return self.optim.decay_steps or self.train.max_steps


def resolve_model_config(section: ModelSection, *, patch_size: int, n_chan: int, tokens_per_stamp: int) -> ModelConfig:
    """The model's `ModelConfig` from the preset, the section's overrides and what the data says."""
    overrides = {
        f.name: getattr(section, f.name)
        for f in fields(ModelSection)
        if f.name not in ("preset", "block_size") and getattr(section, f.name) is not None
    }
    block_size = section.block_size or tokens_per_stamp
    if block_size < tokens_per_stamp - 1:
        raise ValueError(
            f"model.block_size={block_size} is shorter than the {tokens_per_stamp - 1} input tokens of a stamp; "
            "raise it or crop the stamps (data.image_size)"
        )
    return model_config(section.preset, block_size=block_size, patch_size=patch_size, n_chan=n_chan, **overrides)
