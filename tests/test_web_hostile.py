"""The web server against hostile and broken clients: raw bytes over a socket on 127.0.0.1.

Every refusal must be a 4xx with one sentence (JSON ``{"detail"}``), never a 500, and the
log must stay free of tracebacks and errors: a client's mistake is not the bot's fault. A
client too slow with its headers or its body is cut off after the read timeout, and a page
on another site cannot make the browser spend the bot's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from adapters.memory import MemoryStore
from adapters.web import create_app, serve
from bot.config import load_settings
from bot.wiring import build_tasks
from core.engine import Engine
from core.service import Service
from core.settings import EngineSettings, ServiceSettings
from tests import imagekit

pytestmark = pytest.mark.asyncio(loop_scope="module")

READ_TIMEOUT_S = 1.0
# Long enough for any refusal here; a server that waits for a slow client forever fails.
PATIENCE_S = 8.0
BOUNDARY = "hostile-boundary"
RATING = {"sha256": "ab" * 32, "task": "caption", "score": 1}


@dataclass(frozen=True)
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def detail(self) -> str:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        body = json.loads(self.body)
        assert set(body) == {"detail"}, body
        detail: str = body["detail"]
        return detail


@dataclass(frozen=True)
class Server:
    host: str
    port: int

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body and "Content-Length" not in headers:
            lines.append(f"Content-Length: {len(body)}")
        return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(model_cache: Path) -> AsyncIterator[Server]:
    """A real service on the tiny profile; no request here gets as far as a model."""
    settings = load_settings(None, "tiny")
    engine_settings = EngineSettings(device="cpu", model_cache=model_cache)
    async with Engine(build_tasks(settings, ["caption"]), engine_settings) as engine:
        service = Service(engine, MemoryStore(), ServiceSettings())
        app = create_app(service, max_upload_bytes=256 * 1024, read_timeout_s=READ_TIMEOUT_S)
        runner = await serve(app, "127.0.0.1", 0)
        try:
            host, port = runner.addresses[0][:2]
            yield Server(host, port)
        finally:
            await runner.cleanup()


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def assert_clean(log: pytest.LogCaptureFixture) -> None:
    """Nothing at ERROR or above, and no traceback at any level."""
    bad = [r for r in log.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


def assert_sentence(detail: str) -> None:
    assert "\n" not in detail and len(detail) < 120 and detail.endswith("."), detail
    assert "b'" not in detail and "aaaa" not in detail, detail  # no echo of the input


async def exchange(server: Server, data: bytes, *, whole_reply: bool = True) -> Raw:
    """Send ``data`` and read the reply.

    ``whole_reply``: read until the server closes, so every log line it writes about this
    connection is in; otherwise stop after the response, while the server may still wait.
    """
    async with asyncio.timeout(PATIENCE_S):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            writer.write(data)
            await writer.drain()
            return await _read_reply(reader, whole_reply)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _read_reply(reader: asyncio.StreamReader, whole: bool) -> Raw:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    if whole:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
    return Raw(int(status_line.split()[1]), headers, body)


def multipart(*parts: bytes) -> tuple[dict[str, str], bytes]:
    """A form body from raw parts (each: header lines, a blank line, the content)."""
    body = b"".join(b"--" + BOUNDARY.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    body += b"--" + BOUNDARY.encode() + b"--\r\n"
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Connection": "close"}
    return headers, body


QUESTION = b'Content-Disposition: form-data; name="question"\r\n'


@pytest.mark.parametrize(
    ("label", "part", "phrase"),
    [
        ("control character", QUESTION + b"X-Note: a\x01b\r\n\r\nwhat?", "form part"),
        ("no colon", QUESTION + b"no colon here\r\n\r\nwhat?", "form part"),
        ("10 KB header", QUESTION + b"X-Long: " + b"a" * 10240 + b"\r\n\r\nwhat?", "too long"),
        (
            "name not UTF-8",
            b'Content-Disposition: form-data; name="q\xffuestion"\r\n\r\nwhat?',
            "not UTF-8",
        ),
        (
            "file name not UTF-8",
            b'Content-Disposition: form-data; name="image"; filename="\xff.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + imagekit.blank_png(),
            "not UTF-8",
        ),
        ("value not UTF-8", QUESTION + b"\r\n\xff\xfe what?", "not UTF-8"),
    ],
)
async def test_malformed_form_parts_are_400(
    server: Server, log: pytest.LogCaptureFixture, label: str, part: bytes, phrase: str
) -> None:
    headers, body = multipart(part)
    reply = await exchange(server, server.request("POST", "/api/ask", headers, body))
    assert reply.status == 400, (label, reply)
    detail = reply.detail()
    assert phrase in detail, (label, detail)
    assert_sentence(detail)
    assert_clean(log)


@pytest.mark.parametrize(
    ("label", "request_bytes", "status", "phrase"),
    [
        (
            "10 KB header",
            b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 10240 + b"\r\n\r\n",
            431,
            "too long",
        ),
        (
            "address not UTF-8",
            b"GET /\xff\xfe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            400,
            "not well-formed HTTP",
        ),
        (
            "bad chunk size",
            b"POST /api/rate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
            400,
            "not well-formed HTTP",
        ),
        (
            "brotli body, no brotli decoder",
            b"POST /api/rate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Encoding: br\r\nContent-Length: 6\r\n\r\nnot br",
            400,
            "Content-Encoding",
        ),
    ],
)
async def test_unparsable_http_is_4xx_with_one_json_sentence(
    server: Server,
    log: pytest.LogCaptureFixture,
    label: str,
    request_bytes: bytes,
    status: int,
    phrase: str,
) -> None:
    reply = await exchange(server, request_bytes)
    assert reply.status == status, (label, reply)
    detail = reply.detail()
    assert phrase in detail, (label, detail)
    assert_sentence(detail)
    assert_clean(log)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("path", ["/api/rate", "/api/ask"])
async def test_bodies_that_do_not_decode_are_400(
    server: Server, log: pytest.LogCaptureFixture, encoding: str, path: str
) -> None:
    if path == "/api/rate":
        headers = {"Content-Type": "application/json", "Connection": "close"}
        body = b"this is not " + encoding.encode()
    else:
        headers, body = multipart(QUESTION + b"\r\nwhat?")
    headers["Content-Encoding"] = encoding
    reply = await exchange(server, server.request("POST", path, headers, body))
    assert reply.status == 400, reply
    detail = reply.detail()
    assert "Content-Encoding" in detail
    assert_sentence(detail)
    assert_clean(log)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_decode_is_read(
    server: Server, log: pytest.LogCaptureFixture, encoding: str
) -> None:
    packed = gzip.compress(b"[1, 2]") if encoding == "gzip" else zlib.compress(b"[1, 2]")
    headers = {
        "Content-Type": "application/json",
        "Content-Encoding": encoding,
        "Connection": "close",
    }
    reply = await exchange(server, server.request("POST", "/api/rate", headers, packed))
    assert reply.status == 400 and "must be a JSON object" in reply.detail()  # decoded
    assert_clean(log)


@pytest.mark.parametrize(
    ("label", "content_type", "body", "phrase"),
    [
        ("100,000 nested brackets", "application/json", b"[" * 100_000 + b"]" * 100_000, "deep"),
        ("not UTF-8", "application/json", b'{"task": "\xff\xfe"}', "not UTF-8"),
        ("unknown charset", "application/json; charset=no-such-charset", b"{}", "missing"),
    ],
)
async def test_pathological_json_is_400(
    server: Server,
    log: pytest.LogCaptureFixture,
    label: str,
    content_type: str,
    body: bytes,
    phrase: str,
) -> None:
    headers = {"Content-Type": content_type, "Connection": "close"}
    reply = await exchange(server, server.request("POST", "/api/rate", headers, body))
    assert reply.status == 400, (label, reply)
    detail = reply.detail()
    assert phrase in detail, (label, detail)
    assert_sentence(detail)
    assert_clean(log)


@pytest.mark.parametrize("drip_s", [0.0, 0.3])
async def test_a_client_that_never_finishes_its_headers_is_cut_off(
    server: Server, log: pytest.LogCaptureFixture, drip_s: float
) -> None:
    # Dripping a header line now and then does not keep the connection open either.
    partial = b"POST /api/rate HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: 1\r\n" * 20
    started = time.monotonic()
    async with asyncio.timeout(PATIENCE_S):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            for line in partial.splitlines(keepends=True):
                writer.write(line)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                if drip_s:
                    await asyncio.sleep(drip_s)
                if reader.at_eof():
                    break
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""  # closed by the server, no reply
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    assert time.monotonic() - started < READ_TIMEOUT_S + 2.0
    assert_clean(log)


@pytest.mark.parametrize("path", ["/api/rate", "/api/ask"])
async def test_a_client_that_never_finishes_its_body_gets_408(
    server: Server, log: pytest.LogCaptureFixture, path: str
) -> None:
    if path == "/api/rate":
        headers, body = {"Content-Type": "application/json"}, b'{"sha256": "'
    else:
        headers, body = multipart(QUESTION + b"\r\nwhat is")
        body = body[: len(body) // 2]
    headers["Content-Length"] = "100000"  # promised, never sent
    started = time.monotonic()
    reply = await exchange(server, server.request("POST", path, headers, body), whole_reply=False)
    assert reply.status == 408, reply
    detail = reply.detail()
    assert "did not arrive" in detail
    assert_sentence(detail)
    assert time.monotonic() - started < READ_TIMEOUT_S + 2.0
    assert_clean(log)


# -- cross-site requests -------------------------------------------------------------------


async def send(server: Server, method: str, path: str, **kwargs: Any) -> tuple[int, Any, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.base + path, **kwargs) as response,
    ):
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body, response.headers.get("Set-Cookie", "")


@pytest.mark.parametrize(
    ("label", "headers"),
    [
        ("another site", {"Origin": "http://evil.example"}),
        ("another port", {"Origin": "http://127.0.0.1:1"}),
        ("another scheme", {"Origin": "https://127.0.0.1:{port}"}),
        ("an opaque origin", {"Origin": "null"}),
        ("a cross-site fetch", {"Sec-Fetch-Site": "cross-site"}),
    ],
)
async def test_posts_from_other_origins_are_403(
    server: Server, log: pytest.LogCaptureFixture, label: str, headers: dict[str, str]
) -> None:
    headers = {name: value.format(port=server.port) for name, value in headers.items()}
    status, body, cookie = await send(server, "POST", "/api/forget", headers=headers)
    assert status == 403, label
    assert "other websites" in body["detail"]
    assert_sentence(body["detail"])
    assert cookie == ""  # refused before a session starts
    # The expensive endpoints are refused before the upload is even read.
    form = aiohttp.FormData()
    form.add_field("image", imagekit.blank_png(), filename="a.png", content_type="image/png")
    status, body, _ = await send(server, "POST", "/api/describe", headers=headers, data=form)
    assert status == 403, label
    assert_clean(log)


@pytest.mark.parametrize(
    ("label", "headers"),
    [
        ("no Origin (curl, scripts)", {}),
        ("this server's own origin", {"Origin": "http://127.0.0.1:{port}"}),
        (
            "own origin, same-origin fetch",
            {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
        ),
    ],
)
async def test_posts_from_this_origin_or_none_are_served(
    server: Server, label: str, headers: dict[str, str]
) -> None:
    headers = {name: value.format(port=server.port) for name, value in headers.items()}
    status, body, _ = await send(server, "POST", "/api/forget", headers=headers)
    assert status == 200 and body["images"] == 0, label


async def test_reads_from_other_origins_are_served(server: Server) -> None:
    # A GET changes nothing, and without CORS headers the other page cannot read it.
    status, body, _ = await send(
        server, "GET", "/api/openapi.json", headers={"Origin": "http://evil.example"}
    )
    assert status == 200 and body["openapi"].startswith("3.1")
