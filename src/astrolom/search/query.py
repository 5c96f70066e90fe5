"""Query an index: `astrolom search --index IDX (--id ID | --image FILE | --spectrum FILE) [--target M] -k 10`.

- `--id`: the neighbours of an indexed object (the object itself left out);
- `--image`: a new cutout (any file `astrolom.data.sources` reads: FITS, PNG/JPEG, .npy, ...) is read, tokenised and
  embedded by the model recorded in the index metadata, with the same layer, token count and symmetry pooling as
  the indexed embeddings (for an alignment run: its image encoder and head);
- `--spectrum`: a spectrum file (FITS as the spectrum readers of `astrolom.data.sources` take it, or a .npy of the
  flux on the model's grid, or of (wavelength, flux) rows) is put on the model's wavelength grid (flux-conserving),
  tokenised and embedded: by the spectrum part of a multimodal AstroPT, or an alignment run's spectrum encoder and
  head. Only for an index with a spectra modality (a clear error otherwise).

`--target images|spectra` picks the vectors searched; the default is the query's own modality (`--id`: the
`embedding` column, or the object's vector in the target modality). With aligned embeddings (an alignment run) an
image query can search the spectra and a spectrum query the images (cross-modal); `--id ID --target spectra` then
starts from the object's image, and its own spectrum is a result like any other.

Output: a table (default), `--json` (with the query and target modality), and `--figure FILE` (query + neighbours
as cutouts, read from the data set recorded in the index or given with `--data`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from astrolom.data.modalities import ALL, IMAGES, SPECTRA
from astrolom.data.records import Record
from astrolom.search.index import Neighbour, SearchIndex, load_index

# magic bytes of the cutout formats a query (or an upload to the web explorer) may be; content decides, not the name
MAGIC = {
    b"\x89PNG\r\n\x1a\n": ".png",
    b"\xff\xd8\xff": ".jpg",
    b"SIMPLE  =": ".fits",
    b"\x93NUMPY": ".npy",
}


# a spectrum query: FITS (also gzipped) or .npy, again by content
SPECTRUM_MAGIC = {b"SIMPLE  =": ".fits", b"\x1f\x8b": ".fits.gz", b"\x93NUMPY": ".npy"}


def sniff_image(data: bytes) -> str | None:
    """File extension for the image format of `data` from its leading bytes, or None if not a known format."""
    return next((ext for magic, ext in MAGIC.items() if data.startswith(magic)), None)


def sniff_spectrum(data: bytes) -> str | None:
    """File extension for the spectrum format of `data` from its leading bytes, or None if not a known format."""
    return next((ext for magic, ext in SPECTRUM_MAGIC.items() if data.startswith(magic)), None)


@dataclass
class SearchResult:
    """The neighbours of one query, and which vectors were compared: the query's modality and the target's."""

    query: str
    query_modality: str
    target_modality: str
    neighbours: list[Neighbour]

    @property
    def cross_modal(self) -> bool:
        return self.query_modality != self.target_modality

    def as_dict(self) -> dict:
        return {
            "query": self.query,
            "query_modality": self.query_modality,
            "target_modality": self.target_modality,
            "k": len(self.neighbours),
            "neighbours": [h.as_dict() for h in self.neighbours],
        }


@lru_cache(maxsize=2)
def _encoder(path: str):
    from astrolom.align.encoder import load_encoder

    return load_encoder(path)


@lru_cache(maxsize=2)
def _spectrum_tokeniser(model_dir: str):
    """The spectrum tokeniser of a multimodal AstroPT's directory."""
    from astrolom.eval.multimodal import spectrum_tokeniser_from_config

    return spectrum_tokeniser_from_config(_encoder(model_dir).config)


def read_image_file(path: str | Path) -> Record:
    """The first record of an image file (FITS, PNG/JPEG, .npy, ...), or a ValueError naming the file."""
    from astrolom.data.sources import open_source

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    if path.suffix.lower() == ".npy":
        # one cutout (H, W, C), or a stack whose first is taken; a data-set .npy reader would read rows as records
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"{path}: cannot read as a .npy array ({err})") from err
        arr = arr[0] if arr.ndim == 4 else arr
        arr = arr[..., None] if arr.ndim == 2 else arr
        if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{path}: want a numeric (H, W, C) image array, got {arr.dtype} {arr.shape}")
        return Record(object_id=path.stem, image=arr.astype(np.float32))
    try:
        src = open_source(str(path))
        try:
            rec = next(iter(src.records()), None)
        finally:
            src.close()
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: cannot read as an image ({err})") from err
    if rec is None:
        raise ValueError(f"{path}: holds no readable image")
    return rec


def read_image_bytes(data: bytes, name: str = "upload") -> Record:
    """A record from the bytes of an image file whose format is sniffed from its content."""
    ext = sniff_image(data)
    if ext is None:
        raise ValueError(f"{name}: not a PNG, JPEG, FITS or .npy image (unrecognised content)")
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / f"query{ext}"
        f.write_bytes(data)
        try:
            rec = read_image_file(f)
        except ValueError as err:  # the temporary file is ours, not the caller's: never name it
            raise ValueError(f"{name}: {str(err).split(': ', 1)[-1]}".replace(str(f), name).replace(tmp, "")) from err
    image = np.asarray(rec.image, dtype=np.float32)
    if image.ndim != 3 or not np.isfinite(image).all():
        raise ValueError(f"{name}: image must be (H, W, C) with finite pixels, got shape {image.shape}")
    return Record(object_id=name, image=image)


def model_dir_of(index: SearchIndex) -> str:
    """The model directory or alignment run that made an index's embeddings (its recipe), or an error saying why new
    objects cannot be embedded for it."""
    recipe = index.recipe
    if not recipe.model:
        raise ValueError(
            f"{index.path}: the index does not record the model that made its embeddings; "
            "query by --id, or rebuild it from embeddings written by `astrolom embed`"
        )
    if recipe.random_init:
        raise ValueError(f"{index.path}: built from random-init control embeddings; new images cannot be embedded")
    if not Path(recipe.model).exists():
        raise FileNotFoundError(f"{index.path}: the model {recipe.model} recorded in the index is not there")
    return str(recipe.model)


def embed_image(index: SearchIndex, record: Record) -> np.ndarray:
    """(D,) embedding of a new cutout, made exactly as the indexed embeddings were (the index's recipe: model,
    layer, tokens, pooling); for a multimodal model, its image embedding (the `images` modality)."""
    from astrolom.eval.embed import embed_records
    from astrolom.eval.multimodal import embed_multimodal, record_inputs

    recipe = index.recipe
    enc = _encoder(model_dir_of(index))
    if recipe.aligned:
        _check_size(record, enc.patch_size, enc.image.config.n_chan)
        return enc.embed_images([record])[0]
    _check_size(record, enc.model.config.patch_size, enc.model.config.n_chan)
    if recipe.encoder == "multimodal":
        tokeniser = _spectrum_tokeniser(model_dir_of(index)) if SPECTRA in enc.model.config.modalities else None
        _, inputs = record_inputs([record], enc.model, enc.config, tokeniser)
        embs = embed_multimodal(enc.model, inputs, recipe.layer, recipe.tokens, recipe.spectrum_segments or 1)
        return embs["embedding_images"][0][0].numpy()
    (_, emb), *_ = embed_records(
        enc.model, [record], batch_size=1, layer=recipe.layer, n_tokens=recipe.tokens,
        symmetrize=recipe.symmetrize, scales=recipe.scales,
    )  # fmt: skip
    if emb.shape[1] != index.dim:
        raise ValueError(f"the model embeds to {emb.shape[1]} dimensions but the index holds {index.dim}")
    return emb[0]


class BandError(ValueError):
    """An image with another number of bands than the model embeds (`got`, `want`)."""

    def __init__(self, name: str, got: int, want: int):
        super().__init__(f"{name}: a {got}-band image, but the model embeds {want}-band images")
        self.got, self.want = got, want


def _check_size(record: Record, p: int, bands: int) -> None:
    h, w, c = record.image.shape
    if c != bands:
        raise BandError(str(record.object_id), c, bands)
    if h < p or w < p:
        raise ValueError(f"{record.object_id}: a {h}x{w} image is smaller than one {p}x{p} patch of the model")


def read_spectrum_bytes(data: bytes, name: str = "spectrum"):
    """A `Spectrum` (FITS, plain or gzipped) or a flux array (.npy: (L,) flux, or (2, L) wavelength and flux) from
    the bytes of a spectrum file, its format sniffed from the content; a ValueError naming `name` otherwise."""
    import io

    from astrolom.data.sources import read_fits_spectrum
    from astrolom.data.sources.spectra import make_spectrum

    ext = sniff_spectrum(data)
    if ext is None:
        raise ValueError(f"{name}: not a FITS or .npy spectrum (unrecognised content)")
    try:
        if ext != ".npy":
            return read_fits_spectrum(data, name)
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, KeyError, IndexError, TypeError, EOFError) as err:
        why = str(err).split(": ", 1)[-1]
        raise ValueError(f"{name}: cannot read as a {ext.lstrip('.')} spectrum ({why})") from err
    if not np.issubdtype(arr.dtype, np.number) or arr.ndim not in (1, 2) or (arr.ndim == 2 and arr.shape[0] != 2):
        raise ValueError(
            f"{name}: want a numeric (L,) flux or (2, L) wavelength/flux array, got {arr.dtype} {arr.shape}"
        )
    return make_spectrum(arr[0], arr[1], file=name) if arr.ndim == 2 else arr.astype(np.float32)


def read_spectrum_file(path: str | Path):
    """`read_spectrum_bytes` of a file (its content decides the format, not its name)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no spectrum file at {path}")
    return read_spectrum_bytes(path.read_bytes(), str(path))


def spectrum_on_grid(spectrum, wavelength: np.ndarray, name: str = "spectrum") -> np.ndarray:
    """(L,) flux on `wavelength` (flux-conserving resampling when the spectrum has its own grid), NaN at bad pixels.

    A bare flux array must already be on the grid.
    """
    from astrolom.data.sources.spectra import SpectrumGrid

    flux, _, _ = SpectrumGrid(wavelength).flux_on_grid(spectrum, name)
    return flux


def can_embed_spectra(index: SearchIndex) -> bool:
    """Whether new spectra can be embedded for this index (a spectra index and the model that made it)."""
    try:
        _spectrum_embedder(index)
    except (ValueError, FileNotFoundError):
        return False
    return True


def _spectrum_embedder(index: SearchIndex) -> str:
    """The model directory or alignment run that embeds spectra for this index, or a ValueError saying what lacks."""
    if SPECTRA not in index.modalities:
        raise ValueError(
            f"{index.path} has no spectra index (it holds {', '.join(index.modalities) or index.main_modality} "
            f"embeddings of {index.recipe.model}); build it from embeddings with an embedding_spectra column: "
            "`astrolom embed` of a model pretrained with spectra or of an alignment run"
        )
    return model_dir_of(index)


def embed_spectrum(index: SearchIndex, spectrum, name: str = "spectrum") -> np.ndarray:
    """(D,) spectra-space embedding of a spectrum (a file path, `Spectrum` or flux array), made as the indexed
    spectra were: an alignment run's spectrum encoder and head, or a multimodal AstroPT's spectrum pass."""
    from astrolom.eval.multimodal import embed_multimodal

    model_dir = _spectrum_embedder(index)
    if isinstance(spectrum, str | Path):
        name, spectrum = str(spectrum), read_spectrum_file(spectrum)
    enc, recipe = _encoder(model_dir), index.recipe
    if recipe.aligned:
        return enc.embed_spectra([spectrum_on_grid(spectrum, enc.wavelength, name)], [name])[0]
    tokeniser = _spectrum_tokeniser(model_dir)
    inputs = tokeniser([spectrum_on_grid(spectrum, tokeniser.wavelength, name)], [name])
    segments = recipe.spectrum_segments or 1
    emb, _ = embed_multimodal(enc.model, inputs, layer=recipe.layer, spectrum_segments=segments)["embedding_spectra"]
    return emb[0].numpy()


def _target(index: SearchIndex, query: str, target: str | None) -> str:
    target = target or query
    if target not in ALL:
        raise ValueError(f"unknown target {target!r}; choose from {', '.join(ALL)}")
    index.check_query(query, target)
    return target


def search_id(index: SearchIndex, object_id: str, k: int = 10, target: str | None = None) -> SearchResult:
    """Neighbours of an indexed object: by its `embedding` vector, or (target) among the target modality's vectors,
    starting from its image vector when the index is aligned, from its own target vector otherwise."""
    if target is None:
        return SearchResult(object_id, index.main_modality, index.main_modality, index.neighbours_of_id(object_id, k))
    query = IMAGES if index.aligned else target
    target = _target(index, query, target)
    return SearchResult(object_id, query, target, index.neighbours_of_id(object_id, k, query=query, target=target))


def search_image(
    index: SearchIndex, image: str | Path | Record, k: int = 10, target: str | None = None
) -> SearchResult:
    """Neighbours of a new cutout among the target modality's vectors (default: images, or the `embedding` column
    of an index without per-modality ones)."""
    rec = image if isinstance(image, Record) else read_image_file(image)
    name = str(rec.object_id)
    if target is None and IMAGES not in index.modalities:  # an index of one image embedding column
        hits = index.neighbours(embed_image(index, rec)[None], k)[0]
        return SearchResult(name, IMAGES, index.main_modality, hits)
    target = _target(index, IMAGES, target)
    return SearchResult(name, IMAGES, target, index.neighbours(embed_image(index, rec)[None], k, target=target)[0])


def search_spectrum(
    index: SearchIndex, spectrum, k: int = 10, target: str | None = None, name: str = ""
) -> SearchResult:
    """Neighbours of a spectrum (file path, `Spectrum` or flux array) among the target modality's vectors."""
    name = name or (Path(spectrum).name if isinstance(spectrum, str | Path) else "spectrum")
    _spectrum_embedder(index)  # says what is missing for any spectrum query, before the target's own checks
    target = _target(index, SPECTRA, target)
    vec = embed_spectrum(index, spectrum, name)
    return SearchResult(name, SPECTRA, target, index.neighbours(vec[None], k, target=target)[0])


def format_table(hits: list[Neighbour], labels: list[str] | None = None) -> str:
    """Plain-text table of neighbours with a few label columns."""
    labels = (
        labels
        if labels is not None
        else [n for n in ("redshift", "log_mstar", "has_star") if hits and n in hits[0].labels]
    )
    head = ["rank", "object_id", "similarity", "split", *labels]
    rows = [
        [str(h.rank), h.object_id, f"{h.similarity:.4f}", h.split, *(_fmt(h.labels.get(n)) for n in labels)]
        for h in hits
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows])


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def neighbours_figure(
    query_rgb: np.ndarray | None,
    query_title: str,
    hits: list[Neighbour],
    store,
    out: str | Path,
) -> Path:
    """Query + neighbours as cutouts in one row-wrapped grid (PNG/PDF by the extension of `out`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(query_rgb, f"query\n{query_title}")]
    for h in hits:
        try:
            rgb = store.rgb(h.object_id) if store is not None else None
        except KeyError:
            rgb = None
        panels.append((rgb, f"#{h.rank} {h.object_id}\ncos {h.similarity:.3f}"))
    cols = min(len(panels), 6)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (rgb, title) in zip(axes.ravel(), panels, strict=False):
        if rgb is not None:
            ax.imshow(rgb, origin="lower", interpolation="nearest")
        else:
            ax.text(0.5, 0.5, "no cutout", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=7)
    from astrolom.eval.figures import save_figure

    return save_figure(fig, out)


def open_store(index: SearchIndex, data: str | None = None):
    """CutoutStore of the data set given or recorded in the index, or None if there is none."""
    from astrolom.search.cutouts import CutoutStore

    data = data or index.meta.get("data")
    if not data:
        return None
    if "://" not in str(data) and not Path(data).exists():
        raise FileNotFoundError(f"the data set {data} (for cutouts) is not there; pass --data")
    return CutoutStore(data)


# ----------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index directory (`astrolom index`)")
    q = parser.add_mutually_exclusive_group(required=True)
    q.add_argument("--id", help="object id of an indexed object")
    q.add_argument("--image", help="a cutout file (FITS, PNG/JPEG, .npy) to embed and search with")
    q.add_argument("--spectrum", help="a spectrum file (FITS or .npy) to embed and search with (index with spectra)")
    parser.add_argument(
        "--target",
        choices=ALL,
        default=None,
        help="modality searched (default: the query's); across modalities needs aligned embeddings",
    )
    parser.add_argument("-k", type=int, default=10, help="neighbours to return (10)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--figure", default=None, help="write query + neighbour cutouts to this PNG/PDF")
    parser.add_argument(
        "--export", default=None, help="write the neighbours (id, ra/dec, similarity, mark, labels) to a .csv/.parquet"
    )
    parser.add_argument("--data", default=None, help="data set with the cutouts (default: recorded in the index)")
    parser.add_argument("--no-mmap", action="store_true", help="read the index into memory instead of mapping it")


def run(args: argparse.Namespace) -> int:
    from astrolom.search.cutouts import rgb_image

    index = load_index(args.index, mmap=not args.no_mmap)
    query_rgb, title = None, ""
    if args.id is not None:
        res = search_id(index, args.id, args.k, args.target)
        title = args.id
    elif args.image is not None:
        rec = read_image_file(args.image)
        rec.object_id = Path(args.image).name
        res = search_image(index, rec, args.k, args.target)
        query_rgb, title = (
            rgb_image(rec.image, ("g", "r", "z") if rec.image.shape[-1] == 3 else None),
            Path(args.image).name,
        )
    else:
        res = search_spectrum(index, args.spectrum, args.k, args.target)
        title = Path(args.spectrum).name
    hits = res.neighbours
    if args.json:
        json.dump(res.as_dict(), sys.stdout, indent=2)
        print()
    else:
        if res.cross_modal:
            print(f"# {res.query_modality} -> {res.target_modality} (cross-modal)")
        print(format_table(hits))
    if args.export:
        from astrolom.search.labels import Marks, export_table, marks_path, write_table

        sims = {h.object_id: h.similarity for h in hits}
        marks = Marks(marks_path(args.index)).items()
        table = export_table(index, list(sims), marks=marks, scores=sims, score_name="similarity")
        print(f"{table.num_rows} neighbours -> {write_table(table, args.export)}", file=sys.stderr)
    if args.figure:
        store = open_store(index, args.data)
        if args.id is not None and store is not None:
            try:
                query_rgb = store.rgb(args.id)
            except KeyError:
                query_rgb = None
        path = neighbours_figure(query_rgb, title, hits, store, args.figure)
        print(f"figure -> {path}", file=sys.stderr)
    return 0
