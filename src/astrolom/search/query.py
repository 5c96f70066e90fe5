"""Query an index: `astrolom search --index IDX (--id ID | --image FILE | --spectrum FILE) -k 10`.

- `--id`: the neighbours of an indexed object (the object itself left out);
- `--image`: a new cutout (any file `astrolom.data.sources` reads: FITS, PNG/JPEG, .npy, ...) is read, tokenised and
  embedded by the model recorded in the index metadata, with the same layer, token count and symmetry pooling as
  the indexed embeddings;
- `--spectrum`: only for an index made by a model with a spectrum modality (a clear error otherwise).

Output: a table (default), `--json`, and `--figure FILE` (query + neighbours as cutouts, read from the data set
recorded in the index or given with `--data`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from astrolom.data.records import Record
from astrolom.search.index import Neighbour, SearchIndex, load_index

# magic bytes of the cutout formats a query (or an upload to the web explorer) may be; content decides, not the name
MAGIC = {
    b"\x89PNG\r\n\x1a\n": ".png",
    b"\xff\xd8\xff": ".jpg",
    b"SIMPLE  =": ".fits",
    b"\x93NUMPY": ".npy",
}


def sniff_image(data: bytes) -> str | None:
    """File extension for the image format of `data` from its leading bytes, or None if not a known format."""
    return next((ext for magic, ext in MAGIC.items() if data.startswith(magic)), None)


@lru_cache(maxsize=2)
def _model(model_dir: str):
    from astrolom.model.pretrained import load_model

    model, _ = load_model(model_dir)
    return model


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
        except ValueError as err:
            raise ValueError(f"{name}: {str(err).split(': ', 1)[-1]}") from err
    image = np.asarray(rec.image, dtype=np.float32)
    if image.ndim != 3 or not np.isfinite(image).all():
        raise ValueError(f"{name}: image must be (H, W, C) with finite pixels, got shape {image.shape}")
    return Record(object_id=name, image=image)


def model_dir_of(index: SearchIndex) -> str:
    model = index.meta.get("model")
    if not model:
        raise ValueError(
            f"{index.path}: the index does not record the model that made its embeddings; "
            "query by --id, or rebuild it from embeddings written by `astrolom embed`"
        )
    if index.meta.get("random_init"):
        raise ValueError(f"{index.path}: built from random-init control embeddings; new images cannot be embedded")
    if not Path(model).exists():
        raise FileNotFoundError(f"{index.path}: the model {model} recorded in the index is not there")
    return str(model)


def embed_image(index: SearchIndex, record: Record) -> np.ndarray:
    """(D,) embedding of a new cutout, made exactly as the indexed embeddings were (model, layer, tokens, pooling)."""
    from astrolom.eval.embed import embed_records

    model = _model(model_dir_of(index))
    p = model.config.patch_size
    h, w = record.image.shape[:2]
    if h < p or w < p:
        raise ValueError(f"{record.object_id}: a {h}x{w} image is smaller than one {p}x{p} patch of the model")
    kw = {}
    if index.meta.get("layer") is not None:
        kw["layer"] = int(index.meta["layer"])
    if index.meta.get("tokens") is not None:
        kw["n_tokens"] = int(index.meta["tokens"])
    if index.meta.get("symmetrize"):
        kw["symmetrize"] = True
    (_, emb), *_ = embed_records(model, [record], batch_size=1, **kw)
    if emb.shape[1] != index.dim:
        raise ValueError(f"the model embeds to {emb.shape[1]} dimensions but the index holds {index.dim}")
    return emb[0]


def embed_spectrum(index: SearchIndex, path: str | Path) -> np.ndarray:
    """(D,) embedding of a spectrum file; only where the index's model has a spectrum modality."""
    modalities = index.meta.get("modalities") or ["images"]
    if "spectra" not in modalities and "spectrum" not in modalities:
        raise ValueError(
            f"{index.path}: the model that made this index ({index.meta.get('model')}) embeds images only, so it "
            "cannot search by spectrum; build the index from a model pretrained with spectra"
        )
    raise ValueError(f"{path}: spectrum queries need the spectrum embedding of the multimodal model (not available)")


def search_id(index: SearchIndex, object_id: str, k: int = 10) -> list[Neighbour]:
    return index.neighbours_of_id(object_id, k)


def search_image(index: SearchIndex, image: str | Path | Record, k: int = 10) -> list[Neighbour]:
    rec = image if isinstance(image, Record) else read_image_file(image)
    return index.neighbours(embed_image(index, rec)[None], k)[0]


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
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


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
    q.add_argument("--spectrum", help="a spectrum file (only for indexes made by a model with spectra)")
    parser.add_argument("-k", type=int, default=10, help="neighbours to return (10)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--figure", default=None, help="write query + neighbour cutouts to this PNG/PDF")
    parser.add_argument("--data", default=None, help="data set with the cutouts (default: recorded in the index)")
    parser.add_argument("--no-mmap", action="store_true", help="read the index into memory instead of mapping it")


def run(args: argparse.Namespace) -> int:
    from astrolom.search.cutouts import rgb_image

    index = load_index(args.index, mmap=not args.no_mmap)
    query_rgb, title = None, ""
    if args.id is not None:
        hits = search_id(index, args.id, args.k)
        title = args.id
    elif args.image is not None:
        rec = read_image_file(args.image)
        hits = search_image(index, rec, args.k)
        query_rgb, title = (
            rgb_image(rec.image, ("g", "r", "z") if rec.image.shape[-1] == 3 else None),
            Path(args.image).name,
        )
    else:
        embed_spectrum(index, args.spectrum)
        return 2
    if args.json:
        json.dump({"query": title, "k": args.k, "neighbours": [h.as_dict() for h in hits]}, sys.stdout, indent=2)
        print()
    else:
        print(format_table(hits))
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
