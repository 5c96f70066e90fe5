"""The modality names: the one registry of what a record, a model, an embedding file and an index can carry.

The names are also the keys of model inputs and outputs (`forward_features(...)["spectra"]`), of embedding columns
(`embedding_<name>`) and of a paired data set's sub-folders, so they are spelled here once and used by constant.
"""

from __future__ import annotations

IMAGES = "images"
SPECTRA = "spectra"
ALL = (IMAGES, SPECTRA)  # the fixed sequence order of a multimodal model: images first, then spectra
