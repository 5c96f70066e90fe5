"""The one place where search/ and serve/ reach into the evaluation stage (embedding files and models).

Kept in one file so that moving the embedding reader or the model loader changes one import here only.
"""

from __future__ import annotations

from astrolom.eval.embed import embed_dataset, embed_records, load_model
from astrolom.eval.probes import EmbeddingTable, load_embeddings

__all__ = ["EmbeddingTable", "embed_dataset", "embed_records", "load_embeddings", "load_model"]
