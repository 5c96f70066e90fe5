"""Labelled sets for fine-tuning: one split read into memory as centre crops of the tokens the model embeds, with
label columns (bool, float with NaN for missing, or str) and object ids (see `astrolom.finetune.trainer` for why
in memory)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from astrolom.data import tokens as tok
from astrolom.data.stream import RecordStream
from astrolom.log import progress as progress_bar


@dataclass
class LabelledSet:
    """Centre-cropped images (N, h, w, C) float32 with their labels and ids, in file order, and the data set's
    metadata (`vote_volunteers` for vote targets)."""

    images: np.ndarray
    labels: dict[str, np.ndarray]
    object_id: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> LabelledSet:
        idx = np.asarray(idx)
        labels = {k: v[idx] for k, v in self.labels.items()}
        return LabelledSet(self.images[idx], labels, self.object_id[idx], self.meta)


def _label_array(values: list) -> np.ndarray:
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return np.asarray(values, dtype=bool)
    try:
        return np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return np.asarray(["" if v is None else str(v) for v in values], dtype=object)


def crop_size(height: int, width: int, patch_size: int, n_tokens: int, block_size: int) -> tuple[int, int]:
    """Centre crop of a stamp holding the spiral tokens the model embeds (as `astrolom embed` crops)."""
    h, w = height - height % patch_size, width - width % patch_size
    n = min(n_tokens, block_size, (h // patch_size) * (w // patch_size))
    return tok.prefix_crop(h, w, patch_size, n)


def load_labelled(
    source, split: str, patch_size: int, n_tokens: int, block_size: int, *, limit: int | None = None, desc: str = ""
) -> LabelledSet:
    """Read one split of an open source into memory, images centre-cropped to the embedded tokens."""
    images, ids, labels = [], [], []
    crop = None
    total = source.split_counts().get(split, 0) if limit is None else min(limit, source.split_counts().get(split, 0))
    bar = progress_bar(total, desc=desc or f"read {split}", unit="img", leave=False, enabled=total >= 2000)
    for rec in RecordStream(source, split=split, shuffle=False, epochs=1):
        img = np.asarray(rec.image, np.float32)
        if crop is None:
            crop = crop_size(img.shape[0], img.shape[1], patch_size, n_tokens, block_size)
        h, w = crop
        if img.shape[0] < h or img.shape[1] < w:
            raise ValueError(
                f"record {rec.object_id}: image of {img.shape[0]}x{img.shape[1]} px is smaller than {h}x{w}"
            )
        top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
        images.append(img[top : top + h, left : left + w])
        ids.append(str(rec.object_id))
        labels.append(rec.labels)
        bar.update(1)
        if limit is not None and len(images) >= limit:
            break
    bar.close()
    if not images:
        raise ValueError(
            f"{source.location if hasattr(source, 'location') else 'the data'}: no records in split {split!r}"
        )
    names = list(dict.fromkeys(k for lab in labels for k in lab))
    cols = {k: _label_array([lab.get(k) for lab in labels]) for k in names}
    return LabelledSet(np.stack(images), cols, np.asarray(ids, dtype=object), dict(source.metadata))
