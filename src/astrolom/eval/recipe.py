"""The embedding recipe: how a set of embeddings was made (`EmbeddingRecipe`: encoder, model, layer, tokens, scales,
symmetry pooling, spectrum segments, and what each vector column holds), and `recipe_of`, its one reader.

The recipe is written into every embedding file (`astrolom.eval.embeddings`) and index meta.json
(`astrolom.search`), so that a new object is embedded exactly as the stored ones. `recipe_of` also reads the flat
metadata keys of files written before the typed recipe existed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from astrolom.data.modalities import IMAGES

EMBEDDING = "embedding"  # the column that holds the vectors
EMBEDDING_PREFIX = "embedding_"  # per-modality vectors: embedding_images, embedding_spectra, embedding_joint
ENCODERS = ("astropt", "multimodal", "aligned")
RECIPE_VERSION = 1


@dataclass(frozen=True)
class EmbeddingRecipe:
    """How embeddings were made: embedding a new object the same way needs exactly these settings.

    encoder: `astropt` (a one-modality AstroPT: the paper's readout), `multimodal` (an images + spectra AstroPT:
    per-modality and joint columns, `astrolom.eval.multimodal`) or `aligned` (an alignment run's shared space).
    model: the model directory or alignment run that made them (None: unknown).
    layer / tokens: the block read out and the central spiral tokens averaged; scales: multi-scale token counts
    (`tokens` is then their maximum); symmetrize: averaged over the D4 rotations/mirrors.
    spectrum_segments: wavelength ranges of the spectrum readout (multimodal models).
    columns: vector column -> what it holds (images, spectra or joint); `embedding` is always present.
    random_init / seed: a randomly initialised control of the model's config (new objects cannot be embedded).
    """

    encoder: str = "astropt"
    model: str | None = None
    layer: int = -2
    tokens: int = 64
    scales: tuple[int, ...] | None = None
    symmetrize: bool = False
    spectrum_segments: int | None = None
    columns: dict[str, str] = field(default_factory=lambda: {EMBEDDING: IMAGES})
    random_init: bool = False
    seed: int | None = None

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder kind {self.encoder!r}; choose from {', '.join(ENCODERS)}")
        if EMBEDDING not in self.columns:
            raise ValueError(f"an embedding recipe must say what its {EMBEDDING!r} column holds: {self.columns}")
        if self.scales is not None:
            object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))

    @property
    def aligned(self) -> bool:
        """Whether the modalities share one space (an alignment run): cross-modal search means something."""
        return self.encoder == "aligned"

    @property
    def main_modality(self) -> str:
        """What the `embedding` column holds: images, or the joint embedding of a multimodal model."""
        return self.columns[EMBEDDING]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["scales"] = list(self.scales) if self.scales else None
        return {"version": RECIPE_VERSION, **out}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EmbeddingRecipe:
        version = data.get("version", RECIPE_VERSION)
        if version > RECIPE_VERSION:
            raise ValueError(f"embedding recipe version {version} is newer than this astrolom ({RECIPE_VERSION})")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def recipe_of(metadata: dict[str, Any]) -> EmbeddingRecipe:
    """The recipe recorded in an embedding file's metadata or an index's meta.json.

    Metadata written before the typed recipe (flat keys `layer`, `tokens`, `scales`, `symmetrize`,
    `spectrum_segments`, `columns`, `aligned`, `model`; an index's `embedding_modality` and `modalities`) is read
    here and nowhere else.
    """
    if metadata.get("recipe"):
        return EmbeddingRecipe.from_json(metadata["recipe"])
    m = metadata
    columns = dict(m.get("columns") or {})
    if not columns:  # an index meta.json: what its main index holds, and one index per modality
        columns = {EMBEDDING: m.get("embedding_modality") or IMAGES}
        columns.update({EMBEDDING_PREFIX + name: name for name in m.get("modalities") or {}})
    if m.get("aligned"):
        encoder = "aligned"
    elif columns[EMBEDDING] == "joint" or m.get("spectrum_segments") is not None:
        encoder = "multimodal"
    else:
        encoder = "astropt"
    if encoder == "multimodal":
        layer_default, segments = -1, int(m.get("spectrum_segments") or 1)  # before segments: one mean
    else:
        layer_default, segments = -2, None
    return EmbeddingRecipe(
        encoder=encoder,
        model=m.get("model") or m.get("aligned") or None,
        layer=int(m["layer"]) if m.get("layer") is not None else layer_default,
        tokens=int(m.get("tokens") or 64),
        scales=tuple(m["scales"]) if m.get("scales") else None,
        symmetrize=bool(m.get("symmetrize", False)),
        spectrum_segments=segments,
        columns=columns,
        random_init=bool(m.get("random_init", False)),
        seed=m.get("seed") if m.get("random_init") else None,
    )
