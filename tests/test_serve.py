"""The web explorer's JSON API and its security points, with FastAPI's TestClient (no network)."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from astrolom.serve import app as sa  # noqa: E402

BASE = "http://127.0.0.1:8000"  # a loopback name: the server answers to no other Host by default


@pytest.fixture(scope="module")
def index_dir(model_index):
    return model_index


@pytest.fixture(scope="module")
def client(index_dir):
    return TestClient(sa.create_app(index_dir, max_upload_mb=0.5), base_url=BASE, raise_server_exceptions=False)


def _png(h=32, w=32, seed=0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_page_and_schema_need_no_cdn(client):
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    schema = client.get("/openapi.json").json()
    assert "/api/neighbours/{object_id}" in schema["paths"] and "/api/search/image" in schema["paths"]
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN


def test_api_answers(client, index_dir):
    from astrolom.search.index import load_index

    idx = load_index(index_dir)
    info = client.get("/api/info").json()
    assert info["n"] == 64 and info["upload_image"] is True and info["cross_modal"] is False
    assert info["symmetrize"] is True and info["scales"] == [4, 16, 64]  # how the index embeds uploads
    assert {"name": "has_star", "kind": "categorical"} in info["labels"]
    # the model and data set by name, never by where they are on the server's disk
    assert info["model"] == "model" and info["data"] == idx.meta["data"].rstrip("/").rsplit("/", 1)[-1]
    assert "/" not in client.get("/api/info").text.replace("</", "")
    m = client.get("/api/map").json()
    assert len(m["x"]) == len(m["ids"]) == 64
    lab = client.get("/api/labels/redshift").json()
    assert lab["kind"] == "numeric" and len(lab["values"]) == 64
    oid = m["ids"][3]
    nb = client.get(f"/api/neighbours/{oid}?k=5").json()["neighbours"]
    assert [h["object_id"] for h in nb] == [h.object_id for h in idx.neighbours_of_id(oid, 5)]
    png = client.get(f"/api/object/{oid}/cutout.png?size=64")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG") and png.headers["content-type"] == "image/png"
    app = client.app
    misses = app.state.explorer.thumbs.misses
    client.get(f"/api/object/{oid}/cutout.png?size=64")
    assert app.state.explorer.thumbs.misses == misses and app.state.explorer.thumbs.hits >= 1  # cached
    sp = client.get(f"/api/object/{oid}/spectrum").json()
    assert len(sp["wavelength"]) == len(sp["flux"]) > 100 and 3500 < sp["wavelength"][0] < 3700
    out = client.get("/api/outliers?n=5&k=3").json()["outliers"]
    assert len(out) == 5 and out[0]["score"] >= out[-1]["score"]


def test_upload_search_finds_the_object(client, index_dir):
    from astrolom.search.index import load_index
    from astrolom.search.query import open_store

    idx = load_index(index_dir)
    oid = str(idx.object_id[9])
    img = open_store(idx).get(oid).image
    r = client.post("/api/search/image?k=3", files={"file": ("anything.txt", _npy(img), "text/plain")})
    assert r.status_code == 200, r.text
    assert r.json()["neighbours"][0]["object_id"] == oid and r.json()["format"] == "npy"
    r = client.post("/api/search/image", files={"file": ("c.png", _png(), "image/png")})
    assert r.status_code == 200 and len(r.json()["neighbours"]) == 10


def test_objects_are_addressed_by_id_only(client):
    for bad in ["..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "nope"]:
        for what in ("", "/cutout.png", "/spectrum"):
            r = client.get(f"/api/object/{bad}{what}")
            assert r.status_code == 404, (bad, what)
            assert "root:" not in r.text
    assert "unknown object id" in client.get("/api/neighbours/nope").json()["detail"]
    # no endpoint takes a path; the only writes are searches and the marks (tests/test_labels.py)
    schema = client.get("/openapi.json").json()
    params = [p["name"] for ops in schema["paths"].values() for op in ops.values() for p in op.get("parameters", [])]
    assert not {"path", "file_path", "data"} & set(params)
    assert {m for ops in schema["paths"].values() for m in ops} <= {"get", "post"}
    posts = {p for p, ops in schema["paths"].items() if "post" in ops}
    assert posts == {"/api/search/image", "/api/search/spectrum", "/api/marks", "/api/rank", "/api/export"}


def test_uploads_limited_in_size_and_sniffed_by_content(client):
    big = b"\x89PNG\r\n\x1a\n" + bytes(600_000)
    r = client.post("/api/search/image", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    # a text file named .png is refused by its content
    r = client.post("/api/search/image", files={"file": ("evil.png", b"<script>alert(1)</script>", "image/png")})
    assert r.status_code == 415 and "PNG, JPEG, FITS or .npy" in r.json()["detail"]
    r = client.post("/api/search/image", files={"file": ("empty.png", b"", "image/png")})
    assert r.status_code == 400
    # huge declared dimensions are refused before decoding
    r = client.post("/api/search/image", files={"file": ("wide.npy", _npy(np.zeros((2048, 2048, 1), np.uint8)), "x")})
    assert r.status_code == 413


@pytest.mark.parametrize(
    "payload",
    [
        b"\x89PNG\r\n\x1a\n" + b"garbage" * 20,  # PNG magic, broken body
        b"\xff\xd8\xff\xe0" + b"\x00" * 50,  # JPEG magic, no image
        b"SIMPLE  =                    T" + b" " * 50,  # FITS magic, truncated header
        b"\x93NUMPY\x01\x00garbage",  # npy magic, broken header
        _npy(np.array(["a", "b"])),  # npy of strings
        _npy(np.zeros((4, 4, 3), np.float32)),  # smaller than one patch
        _npy(np.full((32, 32, 3), np.nan, np.float32)),  # not finite
    ],
)
def test_malformed_uploads_get_4xx_with_a_message(client, payload):
    r = client.post("/api/search/image", files={"file": ("x.bin", payload, "application/octet-stream")})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["detail"] and "Traceback" not in r.text


def test_bad_parameters_and_spectrum_without_a_spectrum_model(client):
    r = client.get("/api/neighbours/x?k=100000")
    assert r.status_code == 422 and "k" in r.json()["detail"]
    assert client.get("/api/labels/not_a_label").status_code == 404
    assert client.get(f"/api/object/{client.get('/api/map').json()['ids'][0]}/cutout.png?size=7").status_code == 422
    r = client.post("/api/search/spectrum", files={"file": ("s.npy", _npy(np.ones(100)), "x")})
    assert r.status_code == 409 and "spectra" in r.json()["detail"]
    oid = client.get("/api/map").json()["ids"][0]
    r = client.get(f"/api/neighbours/{oid}?target=spectra")  # an image-only index has no spectra to search
    assert r.status_code == 409 and "no spectra index" in r.json()["detail"]
    r = client.post("/api/search/image?target=spectra", files={"file": ("c.png", _png(), "image/png")})
    assert r.status_code == 409
    assert client.get(f"/api/neighbours/{oid}?target=sound").status_code == 422
    r = client.post("/api/search/image")  # no file at all
    assert r.status_code == 422


def test_binds_localhost_unless_told_and_warns(monkeypatch, index_dir, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    from astrolom.cli import main

    assert main(["serve", "--index", str(index_dir)]) == 0
    assert calls[-1]["host"] == "127.0.0.1"
    assert "WARNING" not in capsys.readouterr().err
    assert main(["serve", "--index", str(index_dir), "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert calls[-1]["host"] == "0.0.0.0" and calls[-1]["port"] == 8123
    assert "WARNING: binding 0.0.0.0" in capsys.readouterr().err


# ------------------------------------------------------------------------------- an aligned (cross-modal) index


@pytest.fixture(scope="module")
def aligned(mock_survey, tmp_path_factory):
    from search_helpers import make_aligned_index

    from astrolom.search.index import load_index

    idx_dir, _ = make_aligned_index(mock_survey, tmp_path_factory.mktemp("serve_aligned"))
    client = TestClient(sa.create_app(idx_dir, max_upload_mb=0.5), base_url=BASE, raise_server_exceptions=False)
    return client, load_index(idx_dir)


def _fits_spectrum(idx, oid: str) -> bytes:
    from astropy.io import fits

    from astrolom.search.query import open_store

    store = open_store(idx)
    buf = io.BytesIO()
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(store.wavelength(), name="WAVELENGTH")]
    fits.HDUList([*hdus, fits.ImageHDU(store.get(oid).spectrum.astype(np.float32), name="FLUX")]).writeto(buf)
    return buf.getvalue()


def test_cross_modal_api(aligned):
    client, idx = aligned
    info = client.get("/api/info").json()
    assert info["cross_modal"] is True and info["upload_spectrum"] is True
    assert set(info["modalities"]) == {"images", "spectra"}
    oid = str(idx.object_id[idx.space("spectra").rows[4]])
    r = client.get(f"/api/neighbours/{oid}?k=3&target=spectra").json()
    assert (r["query_modality"], r["target_modality"]) == ("images", "spectra") and len(r["neighbours"]) == 3
    plain = client.get(f"/api/neighbours/{oid}?k=3").json()
    assert plain["target_modality"] == "images" and oid not in [h["object_id"] for h in plain["neighbours"]]
    # a spectrum upload finds its own object among the spectra, and searches the images across
    spec = _fits_spectrum(idx, oid)
    r = client.post("/api/search/spectrum?k=3", files={"file": ("anything.bin", spec, "application/octet-stream")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["neighbours"][0]["object_id"] == oid and body["format"] == "fits"
    assert body["query_modality"] == body["target_modality"] == "spectra"
    r = client.post("/api/search/spectrum?k=5&target=images", files={"file": ("s.fits", spec, "x")}).json()
    assert (r["query_modality"], r["target_modality"]) == ("spectra", "images") and len(r["neighbours"]) == 5
    # an image upload searched across to the spectra
    from astrolom.search.query import open_store

    img = open_store(idx).get(oid).image
    r = client.post("/api/search/image?k=4&target=spectra", files={"file": ("q.npy", _npy(img), "x")}).json()
    assert r["target_modality"] == "spectra" and len(r["neighbours"]) == 4


@pytest.mark.parametrize(
    "payload, status",
    [
        (b"wavelength,flux\n4000,1.0\n", 415),  # CSV: not a sniffed spectrum format
        (b"<script>alert(1)</script>", 415),
        (b"", 400),
        (b"SIMPLE  =                    T" + b" " * 50, 400),  # FITS magic, truncated header
        (b"\x1f\x8b" + b"\x00" * 40, 400),  # gzip magic, not gzip
        (b"\x93NUMPY\x01\x00garbage", 400),  # npy magic, broken header
        (_npy(np.array(["a", "b"])), 400),  # npy of strings
        (_npy(np.ones(100)), 400),  # a flux array not on the model's wavelength grid
        (_npy(np.ones((3, 4, 5))), 400),  # not a spectrum's shape
        (_npy(np.full(3101, np.nan)), 400),  # nothing usable
        (b"SIMPLE  =" + bytes(600_000), 413),  # over the size limit
    ],
)
def test_malformed_spectrum_uploads_get_4xx(aligned, payload, status):
    client, _ = aligned
    r = client.post("/api/search/spectrum", files={"file": ("s.fits", payload, "application/octet-stream")})
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["detail"] and "Traceback" not in r.text
