"""The explorer's trust boundary: one ASGI middleware in front of every request, before FastAPI sees it.

- `Host` allow-list (DNS rebinding: a page on evil.example that re-points its name at 127.0.0.1 sends
  `Host: evil.example`): loopback names and the bound address by default, widened with `--allow-host`; 400 otherwise.
- Writes (POST) only from this origin: a browser names the page that sent a request in `Origin` and
  `Sec-Fetch-Site`, so a cross-site form post or `no-cors` fetch is refused (403). Clients that send neither (curl,
  scripts) are not browsers and cannot be driven by another site.
- Bodies bounded before they are buffered: a declared `Content-Length` above the route's limit is refused before
  one byte is read (413), and the body is read with a running count, refused as soon as it passes the limit, so a
  body without a length (chunked) can never put more than the limit in memory or on disk.
- Security headers on every response, errors included: a Content-Security-Policy that admits only this server's
  scripts and the inline blocks of the served page, by their sha256 (no 'unsafe-inline'); nosniff; no referrer;
  no framing; no cross-origin reads of the API's responses.
- No server path in what a client reads: error texts name the index, data set and model by what they are
  (`path_scrubber`), and /api/info gives their base names only (`base_name`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Iterable
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# what a browser says in Sec-Fetch-Site for a request this page made itself ("none": typed into the address bar)
SAME_SITE_FETCH = frozenset({"same-origin", "none"})


class _InlineBlocks(HTMLParser):
    """Collects the text of inline <script> and <style> elements and the values of `style` attributes."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.style_attrs: list[str] = []
        self._open: tuple[list[str], list[str]] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("style") is not None:
            self.style_attrs.append(attrs["style"])
        if tag == "script" and "src" not in attrs:
            self._open = (self.scripts, [])
        elif tag == "style":
            self._open = (self.styles, [])

    def handle_data(self, data):
        if self._open is not None:
            self._open[1].append(data)

    def handle_endtag(self, tag):
        if self._open is not None and tag in ("script", "style"):
            blocks, parts = self._open
            blocks.append("".join(parts))
            self._open = None


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def content_security_policy(html: str) -> str:
    """The CSP header for a page: its inline scripts and styles admitted by hash, nothing inline besides.

    Static `style="..."` attributes of the page are admitted by hash too ('unsafe-hashes' admits exactly those
    values); attributes set later from script are not, so the page styles dynamic elements through the CSSOM
    (`el.style.x = ...`), which CSP does not govern. Inline event handlers (`onclick=`) never run.
    """
    # the HTML parser of a browser turns CR LF into LF before it hashes a block: do the same
    blocks = _InlineBlocks()
    blocks.feed(html.replace("\r\n", "\n").replace("\r", "\n"))
    blocks.close()
    scripts = " ".join(sorted({_sha256(s) for s in blocks.scripts}))
    styles = " ".join(sorted({_sha256(s) for s in blocks.styles}))
    directives = [
        "default-src 'none'",
        f"script-src 'self' {scripts}".strip(),
        f"style-src 'self' {styles}".strip(),
    ]
    if blocks.style_attrs:
        attrs = " ".join(sorted({_sha256(s) for s in blocks.style_attrs}))
        directives.append(f"style-src-attr 'unsafe-hashes' {attrs}")
    directives += [
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "font-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    ]
    return "; ".join(directives)


def security_headers(csp: str) -> list[tuple[bytes, bytes]]:
    """The headers every response carries."""
    return [
        (b"content-security-policy", csp.encode("ascii")),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
        (b"cross-origin-resource-policy", b"same-origin"),
    ]


def host_name(host: str) -> str:
    """The name part of a Host header or an origin's netloc: lower case, without port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts(bound: str | None, extra: Iterable[str] = ()) -> frozenset[str]:
    """Loopback names, the address the server is bound to (unless a wildcard) and `extra` names."""
    names = {*LOOPBACK, *(host_name(h) for h in extra)}
    if bound and bound not in ("0.0.0.0", "::", ""):
        names.add(host_name(bound))
    return frozenset(names)


class Guard:
    """ASGI middleware: Host allow-list, same-origin writes, bounded bodies, security headers (module docstring).

    Args:
        app: the ASGI app to guard.
        hosts: Host header names accepted (see `allowed_hosts`).
        csp: the Content-Security-Policy header value (see `content_security_policy`).
        body_limit: bytes a request body to a path may have.
    """

    def __init__(self, app, *, hosts: frozenset[str], csp: str, body_limit: Callable[[str], int]):
        self.app, self.hosts, self.body_limit = app, hosts, body_limit
        self.headers = security_headers(csp)
        self._names = {name for name, _ in self.headers}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_secured(message):
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in self._names]
                message = {**message, "headers": kept + self.headers}
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if host_name(host) not in self.hosts:
            # the Host header is not echoed: it is attacker-chosen text
            return await _refuse(
                send_secured,
                400,
                "this server answers only to its own host names (Host header "
                "refused; start it with --allow-host NAME to serve another name)",
            )
        if scope["method"] in WRITE_METHODS:
            why = _cross_origin(headers, host)
            if why:
                return await _refuse(send_secured, 403, why)
            limit = self.body_limit(scope["path"])
            declared = headers.get("content-length")
            if declared is not None:
                if not declared.strip().isdigit():
                    return await _refuse(send_secured, 400, "malformed Content-Length header")
                if int(declared) > limit:
                    return await _refuse(send_secured, 413, _too_large(limit))
            body = await _read_bounded(receive, limit)
            if body is None:
                return await _refuse(send_secured, 413, _too_large(limit))
            receive = _replay(body, receive)
        return await self.app(scope, receive, send_secured)


def _cross_origin(headers: dict[str, str], host: str) -> str | None:
    """Why a write request did not come from this origin, or None when it did (or no browser sent it)."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in SAME_SITE_FETCH:
        return f"cross-site request refused (Sec-Fetch-Site: {site[:20]}); post from the explorer's own page"
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if origin == "null" or parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
            return "cross-origin request refused (Origin is not this server); post from the explorer's own page"
    return None


def _too_large(limit: int) -> str:
    return f"request body larger than the {limit / 2**20:.2f} MiB limit of this endpoint"


async def _read_bounded(receive, limit: int) -> bytes | None:
    """The request body, or None as soon as more than `limit` bytes have arrived (the rest is never read)."""
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that hands the app the buffered body, then waits on the real channel (for disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def base_name(path: str | None) -> str | None:
    """The last part of a path or URL (a model's or data set's name), never the directories above it."""
    if not path:
        return None
    return str(path).rstrip("/").rsplit("/", 1)[-1] or None


def path_scrubber(index: Path, data: str | None, model: str | None) -> Callable[[str], str]:
    """A function that replaces the server's paths (index, data set, model, temporary directory) in an error text
    with what they are: a message to a client never names a place on the server's disk."""
    places = {str(index.resolve()): "the index", str(index): "the index"}
    for path, what in ((data, "the data set"), (model, "the model")):
        if path and "://" not in str(path):
            places[str(Path(path).resolve())] = what
            if "/" in str(path):  # a bare relative name ("survey") is a word, not a place
                places[str(path)] = what
    places[tempfile.gettempdir()] = "a temporary file"
    roots = sorted((p for p in places if len(p) > 1), key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(r) + r"[^\s'\"),;]*" for r in roots))

    def scrub(text: str) -> str:
        return pattern.sub(lambda m: next(places[r] for r in roots if m.group().startswith(r)), text)

    return scrub
