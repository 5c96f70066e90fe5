"""Local web explorer of an index: `astrolom serve --index IDX [--data DIR] [--port 8000]`.

A FastAPI app (JSON API described at /openapi.json) and one static page (vanilla JS + canvas, no CDN, works offline):
a zoomable 2-D map of the embeddings coloured by a label, click → cutout, spectrum, labels and nearest neighbours;
search by id; upload a cutout or (index with spectra) a spectrum to search; the outlier list. Where the index holds
aligned image and spectrum embeddings (an alignment run) every search takes `target=spectra|images`, and the page
offers a cross-modal toggle: an image query searches the spectra, a spectrum query the images. The same functions
as the `astrolom search` and `astrolom outliers` commands answer every request. Above `--points-max` objects
(200,000) the map is served by view: density images at low zoom, single points once a view holds few
(`serve.mapview`).

Labels from the person at the screen (`astrolom.search.labels`): marks of objects as interesting or not, kept in
IDX/marks.json, a classifier of them ranking the unmarked objects and suggesting the next to label, and exports of
marks, neighbour lists and selections as CSV or Parquet.

Security model (each point has a test in tests/test_serve.py or tests/test_serve_security.py):
- binds 127.0.0.1 unless --host is given, and then warns that the data is exposed to the network;
- answers only to its own host names (DNS rebinding), takes writes only from its own page, bounds every request
  body before buffering it and sends a strict Content-Security-Policy on every response (`serve.security`);
- writes nothing but the marks file: no endpoint writes the data or the index (the map and outlier scores are cached
  in memory);
- objects are addressed by id only, looked up in the index; no endpoint takes a path, no error names one;
- uploads are limited in size (--max-upload-mb, 413 beyond) and type (images PNG/JPEG/FITS/.npy, spectra FITS/.npy,
  recognised from the content's magic bytes, never the file name: 415 otherwise), and image dimensions are capped
  from the header before decoding (`serve.uploads`); an image with the wrong number of bands is a 400 naming the
  bands the model takes;
- malformed input gets a 4xx with a message; anything unexpected a 500 with a generic message, never a traceback.
"""

# no `from __future__ import annotations`: FastAPI resolves the endpoint annotations (UploadFile, imported inside
# create_app so that the rest of the package does not need fastapi) when the functions are defined
import argparse
import logging
import threading
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.search import labels as lb
from astrolom.search.cutouts import png_bytes
from astrolom.search.index import SearchIndex, load_index
from astrolom.search.query import (
    BandError,
    can_embed_spectra,
    read_image_bytes,
    read_spectrum_bytes,
    search_id,
    search_image,
    search_spectrum,
    sniff_image,
    sniff_spectrum,
)
from astrolom.serve.explorer import Explorer
from astrolom.serve.mapview import POINTS_MAX, add_routes
from astrolom.serve.security import Guard, allowed_hosts, base_name, content_security_policy, path_scrubber
from astrolom.serve.uploads import UploadError, check_dimensions

log = logging.getLogger("astrolom.serve")
MAX_UPLOAD_MB = 4.0
MAX_PIXELS = 1024 * 1024  # per band: larger uploads are refused before decoding
MAX_K = 100
THUMB_SIZES = (32, 64, 128, 256)
UPLOAD_PATHS = ("/api/search/image", "/api/search/spectrum")
MULTIPART_SLACK = 64 * 1024  # form boundaries and part headers around an upload of the maximum size
JSON_BODY_MAX = 8 * 1024 * 1024  # an export of MAX_EXPORT ids of typical length fits


def create_app(
    index: str | Path | SearchIndex,
    data: str | None = None,
    *,
    max_upload_mb: float = MAX_UPLOAD_MB,
    map_method: str = "umap",
    host: str | None = None,
    allow_hosts: tuple[str, ...] = (),
    points_max: int = POINTS_MAX,
):
    """The FastAPI app over an index directory (or loaded index) and its data set.

    Args:
        points_max: above this many objects the page shows density images of the map and the points of zoomed-in
            views only (`serve.mapview`); the map's grid order is then built in the background at start.
        host: the address the server binds (accepted in the Host header besides the loopback names).
        allow_hosts: more host names to answer to (`--allow-host`).
    """
    from fastapi import FastAPI, HTTPException, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, Field, StringConstraints

    # which modality's vectors to search; None: the query's own
    Target = Annotated[Literal["images", "spectra"] | None, Query()]
    ObjectId = Annotated[str, StringConstraints(min_length=1, max_length=lb.MAX_ID_LENGTH)]
    idx = index if isinstance(index, SearchIndex) else load_index(index)
    ex = Explorer(idx, data, map_method=map_method, points_max=points_max)
    if ex.view.dense:
        ex.view.warm()
    if not idx.resident:  # in-RAM re-scoring copies (IVF-PQ + SQ8): read whole while the map is already served
        threading.Thread(target=idx.make_resident, name="astrolom-index-resident", daemon=True).start()
    # the directory the user named, not a generation inside it: marks outlive a rebuild of the index
    marks = lb.Marks(lb.marks_path(idx.path if isinstance(index, SearchIndex) else index), idx)
    max_bytes = int(max_upload_mb * 1024 * 1024)
    html = resources.files("astrolom.serve").joinpath("static/index.html").read_text()
    scrub = path_scrubber(idx.path, ex.data, idx.meta.get("model"))

    class _App(FastAPI):
        def build_middleware_stack(self):
            # outside FastAPI's own error middleware, so that its 500s carry the security headers too
            return Guard(
                super().build_middleware_stack(),
                hosts=allowed_hosts(host, allow_hosts),
                csp=content_security_policy(html),
                body_limit=body_limit,
            )

    def body_limit(path: str) -> int:
        return max_bytes + MULTIPART_SLACK if path in UPLOAD_PATHS else JSON_BODY_MAX

    # the interactive /docs page loads Swagger UI from a CDN, which cannot work offline: serve the schema only
    app = _App(title="astrolom explorer", version="1", docs_url=None, redoc_url=None)
    app.state.explorer = ex
    app.state.marks = marks

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # never leak a traceback to the client
        log.exception("error serving %s", request.url.path)
        return JSONResponse({"detail": "internal error (see the server log)"}, status_code=500)

    @app.exception_handler(HTTPException)
    async def _refused(request: Request, exc: HTTPException):
        return JSONResponse({"detail": scrub(str(exc.detail))}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msg = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"detail": msg or "invalid request"}, status_code=422)

    def row_of(object_id: str) -> int:
        try:
            return idx.row_of(object_id)
        except ValueError as err:
            raise HTTPException(404, f"unknown object id {object_id!r}") from err

    def obj(row: int) -> dict:
        return {"object_id": str(idx.object_id[row]), "split": str(idx.split[row]), "labels": idx.labels_of(row)}

    def capable(target: str | None, query: str) -> None:
        """409 before any decoding when the index cannot search `target` with a `query` vector."""
        if target is None:
            return
        try:
            idx.check_query(query, target)
        except ValueError as err:
            raise HTTPException(409, str(err)) from err

    def read_upload(file: UploadFile) -> bytes:
        data = file.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"upload larger than the {max_upload_mb:g} MiB limit")
        if not data:
            raise HTTPException(400, "empty upload")
        return data

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return html  # the text whose inline blocks the Content-Security-Policy admits by hash

    @app.get("/api/info")
    def info():
        """Index summary: size, kind, labels (numeric or categorical), what the page can offer."""
        return {
            "n": len(idx),
            "dim": idx.dim,
            "kind": idx.meta.get("kind"),
            "factory": idx.meta.get("factory"),
            "model": base_name(idx.recipe.model),  # what it is called, never where it lives on the server
            "data": base_name(ex.data),
            "symmetrize": idx.recipe.symmetrize,
            "scales": list(idx.recipe.scales) if idx.recipe.scales else None,
            "labels": [{"name": name, "kind": kind} for name, kind in ex.view.label_kinds().items()],
            "upload_image": ex.can_embed_images(),
            "upload_spectrum": can_embed_spectra(idx),
            "modalities": ex.modalities(),
            "cross_modal": ex.cross_modal(),
            "max_upload_mb": max_upload_mb,
            "map_points_max": ex.view.points_max,
        }

    add_routes(app, ex.view)

    @app.get("/api/object/{object_id}")
    def object_info(object_id: str):
        row = row_of(object_id)
        out = obj(row)
        out["has_cutout"] = ex.store is not None
        return out

    @app.get("/api/object/{object_id}/cutout.png", responses={200: {"content": {"image/png": {}}}})
    def cutout(object_id: str, size: int = Query(128)):
        """The object's cutout rendered with the Legacy Survey colour stretch (cached)."""
        oid = str(idx.object_id[row_of(object_id)])
        if size not in THUMB_SIZES:
            raise HTTPException(422, f"size must be one of {THUMB_SIZES}")
        if ex.store is None:
            raise HTTPException(404, "no data set to read cutouts from (start the server with --data)")

        def render():
            try:
                return png_bytes(ex.store.rgb(oid), size)
            except KeyError as err:
                raise HTTPException(404, f"object {oid!r} is not in the data set") from err

        return Response(
            ex.thumbs.get((oid, size), render), media_type="image/png", headers={"Cache-Control": "max-age=3600"}
        )

    @app.get("/api/object/{object_id}/spectrum")
    def spectrum(object_id: str):
        """The object's spectrum (wavelength in Angstrom, flux), 404 where the data has none."""
        oid = str(idx.object_id[row_of(object_id)])
        if ex.store is None:
            raise HTTPException(404, "no data set to read spectra from")
        try:
            rec = ex.store.get(oid)
        except KeyError as err:
            raise HTTPException(404, f"object {oid!r} is not in the data set") from err
        if rec.spectrum is None:
            raise HTTPException(404, f"object {oid!r} has no spectrum")
        flux = np.asarray(rec.spectrum, dtype=np.float64).ravel()
        wl = ex.store.wavelength()
        wl = wl if wl is not None and len(wl) == len(flux) else np.arange(len(flux), dtype=float)
        step = max(1, len(flux) // 1500)  # enough points for a plot
        return {
            "wavelength": np.round(wl[::step], 2).tolist(),
            "flux": [None if not np.isfinite(f) else round(float(f), 5) for f in flux[::step]],
        }

    def searched(run, *args):
        """A search's JSON; the index unable to search the target (no such index, not aligned) is a 409."""
        try:
            return run(*args).as_dict()
        except ValueError as err:
            raise HTTPException(409, str(err)) from err

    @app.get("/api/neighbours/{object_id}")
    def neighbours(object_id: str, k: int = Query(10, ge=1, le=MAX_K), target: Target = None):
        """The k nearest other objects (cosine similarity of the embeddings), in the `target` modality's vectors."""
        row_of(object_id)
        return searched(search_id, idx, object_id, k, target)

    @app.post("/api/search/image")
    def search_by_image(file: UploadFile, k: int = Query(10, ge=1, le=MAX_K), target: Target = None):
        """Embed an uploaded cutout (PNG, JPEG, FITS or .npy; content-sniffed) and return its neighbours."""
        data = read_upload(file)
        ext = sniff_image(data)
        if ext is None:
            raise HTTPException(415, "unsupported content: upload a PNG, JPEG, FITS or .npy image")
        try:
            check_dimensions(data, ext, MAX_PIXELS)
        except UploadError as err:
            raise HTTPException(err.status, str(err)) from err
        if not ex.can_embed_images():
            raise HTTPException(409, "this index does not record a model that can embed new images")
        capable(target or (IMAGES if idx.modalities else None), IMAGES)
        try:
            rec = read_image_bytes(data, name="upload")
            res = search_image(idx, rec, k, target)
        except BandError as err:
            bands = f" ({', '.join(map(str, ex.bands()))})" if len(ex.bands() or ()) == err.want else ""
            raise HTTPException(
                400,
                f"cannot use the upload: it has {err.got} band(s), the model takes {err.want}"
                f"{bands}, in the order of the indexed data set",
            ) from err
        except (ValueError, OSError, KeyError, IndexError, TypeError) as err:
            raise HTTPException(400, f"cannot use the upload: {err}") from err
        return {**res.as_dict(), "format": ext.lstrip("."), "shape": list(rec.image.shape)}

    @app.post("/api/search/spectrum")
    def search_by_spectrum(file: UploadFile, k: int = Query(10, ge=1, le=MAX_K), target: Target = None):
        """Embed an uploaded spectrum (FITS or .npy; content-sniffed) and return its neighbours (index with spectra)."""
        data = read_upload(file)
        ext = sniff_spectrum(data)
        if ext is None:
            raise HTTPException(415, "unsupported content: upload a FITS (or gzipped FITS) or .npy spectrum")
        if not can_embed_spectra(idx):
            raise HTTPException(
                409,
                f"this index holds {', '.join(ex.modalities())} embeddings only: spectrum search needs an index "
                "with spectra, built from a model pretrained with spectra or an alignment run",
            )
        capable(target or SPECTRA, SPECTRA)
        try:
            spectrum = read_spectrum_bytes(data, name="upload")
            res = search_spectrum(idx, spectrum, k, target, name="upload")
        except (ValueError, OSError, KeyError, IndexError, TypeError) as err:
            raise HTTPException(400, f"cannot use the upload: {err}") from err
        return {**res.as_dict(), "format": ext.lstrip(".")}

    @app.get("/api/outliers")
    def outliers(n: int = Query(50, ge=1, le=1000), k: int = Query(20, ge=1, le=MAX_K)):
        """The n most unusual objects: cosine distance to their k-th nearest neighbour, highest first."""
        if k >= len(idx):
            raise HTTPException(422, f"k must be below the index size {len(idx)}")
        s = ex.scores(k)
        order = np.argsort(-s, kind="stable")[:n]
        return {
            "k": k,
            "outliers": [dict(obj(int(r)), rank=i + 1, score=round(float(s[r]), 6)) for i, r in enumerate(order)],
        }

    class MarkBody(BaseModel):
        id: ObjectId
        mark: Literal[0, 1] | None

    class RankBody(BaseModel):
        n: int = Field(100, ge=1, le=lb.MAX_RANK)

    class ExportBody(BaseModel):
        ids: list[ObjectId] = Field(max_length=lb.MAX_EXPORT)
        format: Literal["csv", "parquet"] = "csv"
        scores: dict[ObjectId, float] | None = Field(None, max_length=lb.MAX_EXPORT)

    @app.get("/api/marks")
    def get_marks():
        """The marks: objects flagged interesting (1) or not (0), with the count of each."""
        return marks.as_dict()

    @app.post("/api/marks")
    def set_mark(body: MarkBody):
        """Mark an object 1 (interesting) or 0 (not), or remove its mark (null); saved before the answer."""
        row_of(body.id)
        try:
            marks.set(body.id, body.mark)
        except ValueError as err:
            raise HTTPException(409, str(err)) from err
        return marks.as_dict()

    @app.post("/api/rank")
    def rank(body: RankBody):
        """The n best unmarked objects by a classifier of the marks, and the 10 to label next (most uncertain)."""
        try:
            return lb.rank(idx, marks.items(), body.n).as_dict(idx)
        except ValueError as err:
            raise HTTPException(409, str(err)) from err

    def download(table, fmt: str, stem: str):
        media = "text/csv" if fmt == "csv" else "application/vnd.apache.parquet"
        headers = {"Content-Disposition": f'attachment; filename="{stem}.{fmt}"'}
        return Response(lb.table_bytes(table, fmt), media_type=media, headers=headers)

    @app.post("/api/export", responses={200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}}})
    def export(body: ExportBody):
        """A selection or neighbour list as a CSV or Parquet download: id, ra/dec, mark, score, labels."""
        for oid in body.ids:
            row_of(oid)
        table = lb.export_table(idx, body.ids, marks=marks.items(), scores=body.scores)
        return download(table, body.format, "astrolom-selection")

    @app.get("/api/marks/export", responses={200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}}})
    def export_marks(format: Literal["csv", "parquet"] = Query("csv")):  # noqa: A002 (the query parameter's name)
        """The marks as a CSV or Parquet download, with ra/dec and the labels of each object."""
        m = marks.items()
        try:
            table = lb.export_table(idx, list(m), marks=m)
        except ValueError as err:
            raise HTTPException(409, str(err)) from err
        return download(table, format, "astrolom-marks")

    return app


# ----------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index directory (`astrolom index`)")
    parser.add_argument("--data", default=None, help="data set with the cutouts (default: recorded in the index)")
    parser.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer to this host name (repeatable); by default only loopback names and the bound address",
    )
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help="upload size limit (4 MiB)")
    parser.add_argument("--map", choices=("umap", "pca"), default="umap", help="map method if the index has none")
    parser.add_argument(
        "--points-max",
        type=int,
        default=POINTS_MAX,
        metavar="N",
        help=f"above N objects the map shows density images, and single points once a view holds at most "
        f"100,000 ({POINTS_MAX:,})",
    )


def run(args: argparse.Namespace) -> int:
    import sys

    import uvicorn

    host = args.host or "127.0.0.1"
    if args.host is not None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"astrolom serve: WARNING: binding {host}: anyone who can reach this machine can browse the index "
            "and its cutouts and run searches; there is no authentication",
            file=sys.stderr,
        )
    if host in ("0.0.0.0", "::") and not args.allow_host:
        print(
            f"astrolom serve: bound to every interface ({host}) but answering only to loopback names: pass "
            "--allow-host NAME for each name or address clients use to reach this machine",
            file=sys.stderr,
        )
    app = create_app(
        args.index,
        args.data,
        max_upload_mb=args.max_upload_mb,
        map_method=args.map,
        host=host,
        allow_hosts=tuple(args.allow_host),
        points_max=args.points_max,
    )
    print(f"astrolom explorer on http://{host}:{args.port}/  (API schema: /openapi.json)", file=sys.stderr)
    uvicorn.run(app, host=host, port=args.port, log_level="warning")
    return 0
