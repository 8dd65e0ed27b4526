"""What the web adapter refuses before, or instead of, a handler's work.

* ``HttpProblem``: a refusal decided in the adapter; the app renders it as ``{"detail"}``.
* ``same_origin``: a state-changing request sent by another site's page gets 403.
* ``reading_body`` and ``read_json``: a body must arrive within the app's read timeout and
  must decode; a slow or garbled one is a 4xx with one sentence, never a 500.
* ``GuardedSite``: listens like ``web.TCPSite``, but request headers must arrive within the
  read timeout too, and HTTP that aiohttp cannot parse is answered with one JSON sentence
  and an info line in the log instead of aiohttp's text, echo of the input and traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError, LineTooLong
from yarl import URL

logger = logging.getLogger(__name__)

# Seconds a client has to send a request's headers, and then again its body.
READ_TIMEOUT_S = web.AppKey("read_timeout_s", float)
# Methods a page on any site may send: they change nothing, and without CORS headers the
# browser does not let that page read the answer.
SAFE_METHODS = frozenset({"GET", "HEAD"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpProblem(Exception):
    """A refusal decided here, in the adapter; ``detail`` is shown to the user as it is."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


# -- cross-site requests -------------------------------------------------------------------


@web.middleware
async def same_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a state-changing request that a page on another origin sent."""
    if request.method not in SAFE_METHODS and _cross_site(request):
        raise HttpProblem(403, "This server does not take requests from other websites' pages.")
    return await handler(request)


def _cross_site(request: web.Request) -> bool:
    # Browsers send Origin with every POST; scripts and curl usually send neither header,
    # and they are not a page that someone else's site could aim at this server.
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return True
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None:
        return False
    try:
        sent, own = URL(origin), request.url
        # "null" (a sandboxed frame, a file: page) parses as a relative URL: no scheme.
        return (sent.scheme, sent.host, sent.port) != (own.scheme, own.host, own.port)
    except ValueError:
        return True


# -- request bodies ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def reading_body(request: web.Request) -> AsyncIterator[None]:
    """Bound the reads inside to the read timeout; a body that cannot be decoded is a 400."""
    timeout_s = request.app[READ_TIMEOUT_S]
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError:
        raise HttpProblem(
            408, f"The request body did not arrive within {timeout_s:g} seconds."
        ) from None
    except web.RequestPayloadError as exc:
        # aiohttp decodes Content-Encoding and chunks as the body streams in, and reports
        # a failure as this error, caused by what went wrong.
        if isinstance(exc.__cause__ or exc.__context__, ContentEncodingError):
            raise HttpProblem(
                400, "The request body could not be decoded from its Content-Encoding."
            ) from None
        raise HttpProblem(400, "The request body is malformed.") from None
    except LineTooLong:
        # The multipart reader parses each part's headers like HTTP headers.
        raise HttpProblem(400, "A header of a form part is too long.") from None
    except HttpProcessingError:
        raise HttpProblem(400, "The headers of a form part are malformed.") from None


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; a slow, garbled or pathological body is a 4xx."""
    async with reading_body(request):
        raw = await request.read()
    try:
        # JSON between systems is UTF-8 (RFC 8259), whatever charset the header names.
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpProblem(400, "The body is not UTF-8 text.") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise HttpProblem(400, "The JSON body is nested too deeply.") from None
    except ValueError:
        raise HttpProblem(400, "The body is not valid JSON.") from None


def is_utf8(text: str | None) -> bool:
    """Whether ``text`` came from valid UTF-8 (aiohttp keeps invalid bytes as surrogates)."""
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- connections ---------------------------------------------------------------------------


class _GuardedHandler(web.RequestHandler):
    """aiohttp's connection handler, answering unparsable HTTP with one JSON sentence."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        # Below 500 aiohttp could not parse the request: the client's fault, not ours.
        if isinstance(exc, LineTooLong):
            status, detail = 431, "A request header (or the request line) is too long."
        elif isinstance(exc, ContentEncodingError):
            detail = "The request body could not be decoded from its Content-Encoding."
        else:
            detail = "The request is not well-formed HTTP."
        # The type, not the message: aiohttp's messages quote the input, cookies included.
        kind = type(exc).__name__
        logger.info(
            "refused malformed HTTP from %s (%d, %s): %s", request.remote, status, kind, detail
        )
        response = web.json_response({"detail": detail}, status=status)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        # After a handler answers early, aiohttp reads and drops the rest of the body; a
        # body that fails to decode there is the client's fault, reported as "Unhandled".
        exc = kwargs.get("exc_info")
        if isinstance(exc, web.RequestPayloadError | HttpProcessingError):
            logger.info(
                "closed a connection whose request body is malformed (%s)", type(exc).__name__
            )
            return
        super().log_exception(*args, **kwargs)


class GuardedSite(web.BaseSite):
    """Like ``web.TCPSite``, with each connection handled by ``_GuardedHandler``.

    Request headers must arrive within the app's read timeout: aiohttp's keep-alive timer,
    started when a connection opens and again after each response, closes a connection
    that is still waiting for a whole request when it fires.
    """

    __slots__ = ("_host", "_port")

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        assert isinstance(self._runner, web.AppRunner) and self._runner.server is not None
        server, timeout_s = self._runner.server, self._runner.app[READ_TIMEOUT_S]
        loop = asyncio.get_running_loop()

        def connection() -> _GuardedHandler:
            return _GuardedHandler(server, loop=loop, keepalive_timeout=timeout_s)

        self._server = await loop.create_server(connection, self._host, self._port)
