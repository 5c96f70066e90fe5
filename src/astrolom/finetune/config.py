"""`FinetuneConfig`: everything a fine-tuning run depends on, validated on construction and saved with its
checkpoints and output."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from astrolom.config import comma_list
from astrolom.eval.embed import DEFAULT_LAYER, DEFAULT_TOKENS
from astrolom.finetune.model import MODES
from astrolom.finetune.targets import REGRESSION_LOSSES


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on (saved with its checkpoints and output)."""

    model: str  # RUN or model directory of the pretrained AstroPT
    data: str  # labelled data set (any format astrolom reads)
    targets: tuple[str, ...]  # label columns to predict
    out: str | None = None  # run directory; None: nothing written
    mode: str = "lora"  # lora | full | head
    lora_r: int = 8
    lora_alpha: float | None = None  # default 2 * lora_r
    lr: float = 1e-3  # head and adapters
    backbone_lr: float = 1e-4  # backbone weights in full mode
    weight_decay: float = 0.01
    dropout: float = 0.1  # before the head's linear layer
    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 32
    patience: int = 5  # epochs without a better validation loss before stopping
    warmup: float = 0.05  # fraction of the steps
    min_lr_ratio: float = 0.1  # the cosine's floor, a fraction of each learning rate
    regression_loss: str = "mse"  # mse | huber
    vote_counts: bool = True  # Dirichlet-multinomial on vote counts where the data has them
    classify: tuple[str, ...] = ()
    n_labels: int | None = None  # train on a seeded subset of this many labelled training objects
    train_split: str = "train"
    val_split: str | None = "val"  # None: hold out val_fraction of the training labels
    val_fraction: float = 0.15
    max_val: int | None = 2000  # validation objects used for early stopping
    test_split: str | None = "test"  # scored at the end with the best weights (None: skip)
    layer: int = DEFAULT_LAYER
    n_tokens: int = DEFAULT_TOKENS
    augment: bool = True
    flux: bool = True  # the head also sees square-aperture fluxes (see astrolom.finetune.model)
    random_init: bool = False  # the control: same architecture, freshly initialised backbone
    seed: int = 0
    device: str | None = None
    precision: str = "auto"
    checkpoint_every: int | None = None  # steps; checkpoints are also written at every epoch end
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = comma_list(self.targets, name="targets")
        self.targets, self.classify = tuple(self.targets), tuple(self.classify)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.regression_loss not in REGRESSION_LOSSES:
            raise ValueError(f"regression_loss must be one of {REGRESSION_LOSSES}, got {self.regression_loss!r}")
        for name in ("epochs", "batch_size", "lora_r", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_labels is not None and self.n_labels < 2:
            raise ValueError(f"n_labels must be at least 2, got {self.n_labels}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.backbone_lr <= 0:
            raise ValueError("learning rates must be positive")

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
