"""The explorer's trust boundary (issue 22 #3-#6, #10, and the server half of #1): security headers, the Host
allow-list, same-origin writes, bodies bounded before buffering, uploads with the wrong bands or too many pixels,
and error texts that never name a server path."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import re
import select
import socket
import tempfile
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from astrolom.serve import app as sa  # noqa: E402

BASE = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def client(model_index):
    return TestClient(sa.create_app(model_index, max_upload_mb=0.5), base_url=BASE, raise_server_exceptions=False)


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _fits(*planes: np.ndarray) -> bytes:
    from astropy.io import fits

    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(planes[0]), *(fits.ImageHDU(p) for p in planes[1:])]).writeto(buf)
    return buf.getvalue()


def _upload(client, payload: bytes, **headers):
    return client.post(
        "/api/search/image", files={"file": ("x.bin", payload, "application/octet-stream")}, headers=headers
    )


# ------------------------------------------------------------------------------------------------------- headers


def _page_hashes(html: str, tag: str) -> set[str]:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    assert blocks, f"the page has no inline <{tag}>"
    return {"'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'" for b in blocks}


def test_every_response_carries_a_strict_csp_admitting_the_page_blocks_by_hash(client, monkeypatch):
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in csp.split("; ")}
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert _page_hashes(page.text, "script") <= set(directives["script-src"])
    assert _page_hashes(page.text, "style") <= set(directives["style-src"])
    assert directives["default-src"] == ["'none'"] and directives["img-src"] == ["'self'", "data:", "blob:"]
    assert directives["connect-src"] == ["'self'"] and directives["frame-ancestors"] == ["'none'"]
    assert directives["base-uri"] == ["'none'"] and directives["form-action"] == ["'self'"]
    # the same headers on JSON, on 404s, on refusals made before the app and on internal errors
    monkeypatch.setattr(client.app.state.explorer, "map", lambda: 1 / 0)
    responses = [
        client.get("/api/info"),
        client.get("/api/object/nope"),
        client.get("/api/map"),
        client.get("/api/info", headers={"host": "evil.example"}),
    ]
    assert [r.status_code for r in responses] == [200, 404, 500, 400]
    for r in [page, *responses]:
        assert r.headers["content-security-policy"] == csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-frame-options"] == "DENY"


def test_csp_hashes_follow_the_served_html():
    from astrolom.serve.security import content_security_policy

    html = '<style>b{}</style><p style="color:red">x</p><script>go()</script>\r\n<script src="/a.js"></script>'
    csp = content_security_policy(html)
    sha = "'sha256-" + base64.b64encode(hashlib.sha256(b"go()").digest()).decode() + "'"
    assert f"script-src 'self' {sha};" in csp  # the external script adds no hash; 'self' admits it
    assert "style-src-attr 'unsafe-hashes' 'sha256-" in csp  # the static style attribute, by its value
    assert "style-src-attr" not in content_security_policy("<script>go()</script>")


# -------------------------------------------------------------------------------------------- hosts and origins


@pytest.mark.parametrize(
    "host, status",
    [
        ("evil.example", 400),
        ("127.0.0.1.evil.example", 400),
        ("", 400),
        ("127.0.0.1:8000", 200),
        ("localhost:1234", 200),
        ("[::1]:8000", 200),
        ("LOCALHOST", 200),
    ],
)
def test_host_allow_list(client, host, status):
    r = client.get("/api/info", headers={"host": host})
    assert r.status_code == status, r.text
    if status == 400:
        assert "--allow-host" in r.json()["detail"] and "evil" not in r.text and "n" not in r.json()


def test_allow_host_widens_the_list(model_index, monkeypatch):
    import uvicorn

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    from astrolom.cli import main

    assert main(["serve", "--index", str(model_index), "--allow-host", "astro.lan", "--allow-host", "10.0.0.7"]) == 0
    client = TestClient(apps[-1], base_url=BASE)
    assert client.get("/api/info", headers={"host": "astro.lan:8000"}).status_code == 200
    assert client.get("/api/info", headers={"host": "10.0.0.7"}).status_code == 200
    assert client.get("/api/info", headers={"host": "other.lan"}).status_code == 400
    assert main(["serve", "--index", str(model_index), "--host", "192.168.1.5"]) == 0  # the bound address is allowed
    assert TestClient(apps[-1], base_url="http://192.168.1.5:8000").get("/api/info").status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "http://evil.example"},
        {"origin": "null"},
        {"origin": "http://127.0.0.1:9999"},  # another port is another origin
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},  # e.g. another app on localhost
        {"origin": BASE, "sec-fetch-site": "cross-site"},
    ],
)
def test_cross_origin_posts_are_refused_before_the_upload_runs(client, headers):
    calls = []
    with _spy(client, calls):
        r = _upload(client, _npy(np.zeros((32, 32, 3), np.float32)), **headers)
    assert r.status_code == 403 and "refused" in r.json()["detail"]
    assert calls == []  # the endpoint never ran


def test_same_origin_and_non_browser_posts_pass(client):
    img = _npy(np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32))
    for headers in ({"origin": BASE, "sec-fetch-site": "same-origin"}, {}):
        assert _upload(client, img, **headers).status_code == 200


@contextlib.contextmanager
def _spy(client, calls):
    ex = client.app.state.explorer
    real = ex.can_embed_images
    ex.can_embed_images = lambda: calls.append(1) or real()
    try:
        yield
    finally:
        ex.can_embed_images = real


# ------------------------------------------------------------------------------------------------ bounded bodies


def _asgi_post(app, path: str, headers: dict[str, str], chunks) -> tuple[int, bytes, int]:
    """POST through the ASGI app directly: (status, body, bytes the app pulled from `chunks`)."""
    pulled = 0
    sent: list[dict] = []
    it = iter(chunks)

    async def receive():
        nonlocal pulled
        chunk = next(it, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"127.0.0.1:8000")] + [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), pulled


def _endless(chunk: int = 64 * 1024):
    while True:
        yield b"\x00" * chunk


def test_a_huge_declared_length_is_refused_before_reading(client):
    status, body, pulled = _asgi_post(
        client.app,
        "/api/search/image",
        {"content-length": str(50 << 30), "content-type": "multipart/form-data; b=x"},
        _endless(),
    )
    assert status == 413 and b"limit" in body and pulled == 0


def test_a_body_without_length_stops_at_the_cap(client):
    limit = int(0.5 * 2**20) + sa.MULTIPART_SLACK
    status, _, pulled = _asgi_post(
        client.app, "/api/search/image", {"content-type": "multipart/form-data; b=x"}, _endless()
    )
    assert status == 413 and limit < pulled <= limit + 64 * 1024  # never more than the cap and one chunk
    status, _, pulled = _asgi_post(client.app, "/api/marks", {"content-type": "application/json"}, _endless())
    assert status == 413 and pulled <= sa.JSON_BODY_MAX + 64 * 1024


def _raw(port: int, head: str, body_chunks=(), timeout: float = 10.0) -> tuple[bytes, int]:
    """Send a raw HTTP request, its body chunks until the server answers; (the response head, body bytes sent).
    Every socket operation times out after `timeout` seconds (a server that waits for the body fails the test)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode())
        for chunk in body_chunks:
            if select.select([s], [], [], 0)[0]:  # the server has answered (or closed): stop sending
                break
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):  # it stopped reading
                break
            sent += len(chunk)
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n\r\n" not in reply:
                more = s.recv(65536)
                if not more:
                    break
                reply += more
    return reply, sent


def test_real_server_refuses_huge_and_endless_uploads(model_index):
    head = (
        "POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n{}\r\n"
    )
    from search_helpers import serving

    with serving(model_index, max_upload_mb=0.5) as url:
        port = int(url.rsplit(":", 1)[1])
        t0 = time.perf_counter()
        reply, _ = _raw(port, head.format("Content-Length: 53687091200\r\n"), timeout=5)
        assert reply.startswith(b"HTTP/1.1 413") and time.perf_counter() - t0 < 5
        chunk = b"%x\r\n%s\r\n" % (65536, b"\x00" * 65536)
        reply, sent = _raw(port, head.format("Transfer-Encoding: chunked\r\n"), (chunk for _ in range(3200)))
        assert reply.startswith(b"HTTP/1.1 413")
        assert sent < 64 << 20  # refused while the client still had ~200 MiB to send


# ---------------------------------------------------------------------------------------------- what is uploaded


@pytest.mark.parametrize(
    "payload",
    [
        _png(np.full((32, 32), 120, np.uint8)),  # greyscale
        _png(np.full((32, 32), 30000, np.uint16)),  # 16-bit
        _fits(np.ones((32, 32), np.float32)),  # one band
        _fits(*[np.ones((32, 32), np.float32)] * 4),  # four HDUs
        _npy(np.ones((32, 32, 1), np.float32)),
        _npy(np.ones((32, 32, 2), np.float32)),
        _npy(np.ones((32, 32, 5), np.float32)),
    ],
    ids=["grey-png", "png16", "fits-1band", "fits-4hdu", "npy-c1", "npy-c2", "npy-c5"],
)
def test_wrong_band_count_is_a_400_naming_the_bands(client, payload):
    r = _upload(client, payload)
    assert r.status_code == 400, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert "the model takes 3 (g, r, z)" in detail, detail


def test_fits_uploads_are_under_the_pixel_cap(model_index):
    big = TestClient(sa.create_app(model_index, max_upload_mb=8), base_url=BASE)
    r = _upload(big, _fits(np.zeros((3, 1100, 1000), np.uint8)))  # 3 x 1.1 Mpx, 3.3 MB: under the size limit
    assert r.status_code == 413 and "1000x1100 pixels exceeds" in r.json()["detail"]
    # a header that declares a huge image is refused from the header, before its (absent) data is read
    from astropy.io import fits

    header = fits.Header({"SIMPLE": True, "BITPIX": 8, "NAXIS": 2, "NAXIS1": 100_000, "NAXIS2": 100_000})
    r = _upload(big, header.tostring().encode())
    assert r.status_code == 413 and "100000x100000" in r.json()["detail"]
    r = _upload(big, _fits(np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32)))
    assert r.status_code == 200, r.text  # a cutout under the cap still works


@pytest.mark.parametrize(
    "payload",
    [
        _png(np.zeros((32, 32, 3), np.uint8))[:60],  # truncated PNG
        _png(np.zeros((32, 32, 3), np.uint8))[:-20],
        b"\xff\xd8\xff\xe0" + b"\x00" * 50,
        _fits(np.ones((3, 32, 32), np.float32))[:3000],  # truncated FITS
    ],
    ids=["png-head", "png-tail", "jpeg", "fits"],
)
def test_error_texts_never_name_server_paths(client, model_index, payload):
    r = _upload(client, payload)
    assert 400 <= r.status_code < 500, r.text
    for place in (tempfile.gettempdir(), str(model_index), "query.", "tmp"):
        assert place not in r.text, (place, r.text)


def test_refusals_from_the_library_do_not_name_the_index_directory(client, model_index):
    oid = client.get("/api/map").json()["ids"][0]
    r = client.get(f"/api/neighbours/{oid}?target=spectra")
    assert r.status_code == 409 and "no spectra index" in r.json()["detail"]
    assert str(model_index) not in r.text and "the index" in r.text
