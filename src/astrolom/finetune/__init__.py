"""Fine-tuning pretrained AstroPT models on labelled data (Zoobot's workflow) and label-efficiency curves."""

from astrolom.finetune.model import FinetuneModel
from astrolom.finetune.targets import Targets, TargetSpec
from astrolom.finetune.trainer import FinetuneConfig, Finetuner, FinetuneResult, LabelledSet, load_finetuned

__all__ = [
    "FinetuneConfig",
    "FinetuneModel",
    "FinetuneResult",
    "Finetuner",
    "LabelledSet",
    "TargetSpec",
    "Targets",
    "load_finetuned",
]
