"""Fine-tuning pretrained AstroPT models on labelled data (Zoobot's workflow) and label-efficiency curves."""

from astrolom.finetune.config import FinetuneConfig
from astrolom.finetune.data import LabelledSet
from astrolom.finetune.model import FinetuneModel
from astrolom.finetune.targets import Targets, TargetSpec
from astrolom.finetune.trainer import Finetuner, FinetuneResult, load_finetuned

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
