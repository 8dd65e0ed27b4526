"""The web adapter: a local playground page and a JSON API over ``core.service``.

Handlers are thin translators: read the form, call the service, render the result. Errors
become JSON ``{"detail": ...}`` with a status chosen by the error's type (the core writes
its messages for users); anything unexpected is logged and answered with one generic
sentence, so no traceback or path ever reaches a client.

A browser is one user and one chat: a random session cookie names both, so "the last
image" means the last image this browser sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http.cookies import Morsel
from ipaddress import IPv4Network, IPv6Network, ip_address
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapters.web.guards import (
    READ_TIMEOUT_S,
    GuardedSite,
    HttpProblem,
    is_utf8,
    read_json,
    reading_body,
    same_origin,
)
from adapters.web.openapi import openapi_spec
from core import metrics
from core.errors import (
    CaptionbotError,
    ContentFlagged,
    EngineDead,
    InvalidRequest,
    LimitReached,
    Overloaded,
    ShuttingDown,
    TaskUnavailable,
)
from core.ports import ChatRef, UserRef
from core.service import RATED, Service
from core.types import (
    Answer,
    Caption,
    GeneratedImage,
    ImageInput,
    Link,
    OcrResult,
    Origin,
    Part,
    SocialCaption,
    SocialDraft,
    Tags,
    Unavailable,
    Upload,
    Waiting,
    WarmingUp,
)

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
SESSION_COOKIE = "captionbot_session"
SESSION_MAX_AGE_S = 30 * 24 * 3600
# Room for the text fields and multipart boundaries beside the image in one request.
FORM_OVERHEAD_BYTES = 64 * 1024
MAX_TEXT_FIELD_BYTES = 8 * 1024
MAX_FIELD_NAME_CHARS = 40
# Seconds a client is told to wait before trying a restarting bot again.
RESTART_RETRY_S = 60
GENERIC_DETAIL = "Something went wrong on the bot's side; please try again."
# The page loads only its own script and style, and images from this origin or blob: URLs
# of the user's own files, so no injected markup could run or fetch anything.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
        "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{32,64}")
_SESSION = web.RequestKey("session", str)
_NEW_SESSION = web.RequestKey("new_session", bool)


def create_app(
    service: Service,
    *,
    max_upload_bytes: int,
    allowed_hosts: frozenset[str] | None = None,
    read_timeout_s: float = 30.0,
    readiness: Callable[[], Awaitable[dict[str, bool]]] | None = None,
    metrics_from: Sequence[IPv4Network | IPv6Network] = (),
) -> web.Application:
    """The page and the JSON API for ``service``; uploads above ``max_upload_bytes`` get 413.

    ``allowed_hosts``: the only Host names served (None: any). A server on loopback should
    name its loopback names, so a web page elsewhere cannot reach it through DNS rebinding.
    ``read_timeout_s``: how long a client may take to send a request's headers (when served
    by ``serve``), and again its body; a body that is slower gets 408.
    ``readiness``: what ``/readyz`` reports (each part of the bot, ready or not); without
    it, the service's own. ``metrics_from``: the networks whose clients may read
    ``/metrics``; none: no metrics served.
    """
    if max_upload_bytes <= 0:
        raise ValueError("max_upload_bytes must be positive")
    if read_timeout_s <= 0:
        raise ValueError("read_timeout_s must be positive")
    api = _Api(service, max_upload_bytes)
    # client_max_size bounds every body aiohttp reads for us (JSON); the multipart reader
    # below enforces the image limit itself while it streams.
    app = web.Application(
        middlewares=[_errors, _host_check(allowed_hosts), same_origin, _sessions],
        client_max_size=max_upload_bytes + FORM_OVERHEAD_BYTES,
    )
    app[READ_TIMEOUT_S] = read_timeout_s
    app.on_response_prepare.append(_finish_headers)
    app.router.add_get("/", api.page)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    app.router.add_post("/api/describe", api.describe)
    app.router.add_post("/api/ask", api.ask)
    app.router.add_post("/api/reimagine", api.reimagine)
    app.router.add_post("/api/imagine", api.imagine)
    app.router.add_post("/api/rate", api.rate)
    app.router.add_post("/api/forget", api.forget)
    app.router.add_get("/api/status", api.status)
    app.router.add_get("/api/usage", api.usage)
    app.router.add_get("/api/openapi.json", api.openapi)
    health = _Health(readiness or service.readiness, tuple(metrics_from))
    app.router.add_get("/healthz", health.alive)
    app.router.add_get("/readyz", health.ready)
    app.router.add_get("/metrics", health.metrics)
    return app


_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


class _Health:
    """For operators' tools: is the process up, is every part ready, and the metrics."""

    def __init__(
        self,
        readiness: Callable[[], Awaitable[dict[str, bool]]],
        metrics_from: tuple[IPv4Network | IPv6Network, ...],
    ) -> None:
        self._readiness = readiness
        self._metrics_from = metrics_from

    async def alive(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        checks = await self._readiness()
        ready = all(checks.values())
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        try:
            peer = ip_address((request.remote or "").split("%")[0])
        except ValueError:
            peer = None
        allowed = peer is not None and any(peer in network for network in self._metrics_from)
        # Through a reverse proxy every client looks like loopback; a scrape comes direct.
        proxied = any(header in request.headers for header in _PROXY_HEADERS)
        if not allowed or proxied:
            # A plain 404: the endpoint's existence is nobody else's business.
            raise web.HTTPNotFound()
        return web.Response(
            body=generate_latest(metrics.REGISTRY),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )


async def serve(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    shutdown_timeout: float = 5.0,
) -> web.AppRunner:
    """Start serving ``app`` on the running event loop (port 0: any free port).

    The caller owns the returned runner and stops it with ``await runner.cleanup()``;
    requests in progress then get ``shutdown_timeout`` seconds to finish before they are
    cancelled, which stops their work in the engine. A failed start cleans up itself.
    A client that has not sent a whole request within the app's read timeout is cut off.
    """
    # handler_cancellation: a client that hangs up cancels its handler, and so its work in
    # the engine (a closed tab should not keep a diffusion running).
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, handler_cancellation=True)
    await runner.setup()
    try:
        await GuardedSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    logger.info("web page on http://%s:%d/", bound_host, bound_port)
    return runner


# -- middleware ----------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into JSON ``{"detail"}`` with its status; never a traceback."""
    try:
        return await handler(request)
    except HttpProblem as problem:
        return _problem(problem.status, problem.detail, problem.headers)
    except CaptionbotError as error:
        status, headers = _status_of(error)
        logger.info("%s %s refused (%d): %s", request.method, request.path, status, error)
        return _problem(status, str(error), headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _problem(exc.status, _http_detail(request, exc), {})
    except ConnectionError:
        # The client left; there is nobody to answer.
        raise
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return _problem(500, GENERIC_DETAIL, {})


def _host_check(allowed: frozenset[str] | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse requests addressed to a name this server was not started for."""
        if allowed is not None and (request.url.host or "").lower() not in allowed:
            raise HttpProblem(421, "This server does not answer for that host name.")
        return await handler(request)

    return check


@web.middleware
async def _sessions(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every browser a random session id: its user id and chat id here."""
    session = request.cookies.get(SESSION_COOKIE, "")
    request[_NEW_SESSION] = not _SESSION_ID.fullmatch(session)
    if request[_NEW_SESSION]:
        session = secrets.token_urlsafe(32)
    request[_SESSION] = session
    return await handler(request)


async def _finish_headers(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare runs before the headers go out, streamed responses included.
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.get(_NEW_SESSION, False):
        # Response.set_cookie would be too late here: aiohttp renders its cookies into the
        # headers before this hook runs, so the header is written out directly.
        cookie = Morsel[str]()
        cookie.set(SESSION_COOKIE, request[_SESSION], request[_SESSION])
        cookie["max-age"] = str(SESSION_MAX_AGE_S)
        cookie["path"] = "/"
        cookie["httponly"] = True
        # Other sites' pages cannot spend this browser's session (or its quota).
        cookie["samesite"] = "Strict"
        response.headers.add(hdrs.SET_COOKIE, cookie.OutputString())


def _problem(status: int, detail: str, headers: dict[str, str]) -> web.Response:
    return web.json_response({"detail": detail}, status=status, headers=headers)


def _status_of(error: CaptionbotError) -> tuple[int, dict[str, str]]:
    match error:
        case ContentFlagged():
            return 422, {}
        case InvalidRequest():
            return 400, {}
        case Overloaded():
            return 429, {"Retry-After": str(math.ceil(error.retry_after_s))}
        case LimitReached():
            return 429, {"Retry-After": str(math.ceil(error.retry_after_s))}
        case ShuttingDown():
            return 503, {"Retry-After": str(RESTART_RETRY_S)}
        case TaskUnavailable() | EngineDead():
            return 503, {}
        case _:  # InferenceFailed: the model failed on this request
            return 500, {}


def _http_detail(request: web.Request, exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPNotFound):
        return "There is nothing at this address."
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"This address does not take {request.method} requests; use {allowed}."
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return "The request is too large for this bot."
    return exc.reason


# -- forms ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Form:
    fields: dict[str, str]
    image: bytes | None
    image_name: str

    def text(self, name: str) -> str:
        if name not in self.fields:
            raise HttpProblem(400, f"The form field '{name}' is missing.")
        return self.fields[name]

    def image_input(self, *, required: bool) -> ImageInput:
        """The image sent as a file or as a link in ``url``; None: the session's last."""
        url = self.fields.get("url", "").strip()
        if self.image is not None and url:
            raise HttpProblem(400, "Send the image as a file or as a link, not both.")
        if self.image is not None:
            return Upload(self.image, self.image_name)
        if url:
            return Link(url)
        if required:
            raise HttpProblem(
                400, "The form field 'image' is missing; attach an image file or give a 'url'."
            )
        return None

    def integer(self, name: str) -> int | None:
        raw = self.fields.get(name, "").strip()
        if not raw:
            return None
        try:
            return int(raw)
        except ValueError:
            raise HttpProblem(400, f"The form field '{name}' must be a whole number.") from None

    def number(self, name: str) -> float | None:
        raw = self.fields.get(name, "").strip()
        if not raw:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise HttpProblem(400, f"The form field '{name}' must be a number.")
        return value


async def _read_form(request: web.Request, allowed: frozenset[str], max_image: int) -> _Form:
    """Stream a multipart form in, refusing it as soon as the image passes ``max_image``."""
    too_large = HttpProblem(
        413, f"The image is larger than the {_size(max_image)} this bot accepts."
    )
    if (request.content_length or 0) > max_image + FORM_OVERHEAD_BYTES:
        raise too_large
    if request.content_type != "multipart/form-data":
        raise HttpProblem(415, "Send the request as multipart/form-data.")
    fields: dict[str, str] = {}
    image: bytes | None = None
    image_name = "image"
    async with reading_body(request):
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise HttpProblem(400, "Nested multipart forms are not accepted.")
                if not (is_utf8(part.name) and is_utf8(part.filename)):
                    raise HttpProblem(400, "A form field's name or file name is not UTF-8 text.")
                name = _field_name(part.name)
                if not name:
                    raise HttpProblem(400, "A form field has no name.")
                if name not in allowed:
                    takes = ", ".join(sorted(allowed))
                    raise HttpProblem(
                        400, f"The form field '{name}' is not used here; use {takes}."
                    )
                if name in fields or (name == "image" and image is not None):
                    raise HttpProblem(400, f"The form field '{name}' appears more than once.")
                if name == "image":
                    data = await _read_part(part, max_image, too_large)
                    # An HTML form sends an empty, nameless file part when no file was chosen.
                    if data or part.filename:
                        image, image_name = data, part.filename or "image"
                    continue
                longer = HttpProblem(413, f"The form field '{name}' is too long.")
                raw = await _read_part(part, MAX_TEXT_FIELD_BYTES, longer)
                try:
                    fields[name] = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise HttpProblem(400, f"The form field '{name}' is not UTF-8 text.") from None
        except ValueError:
            # aiohttp's multipart parser says a body is malformed with ValueError.
            raise HttpProblem(400, "The multipart form data is malformed.") from None
    return _Form(fields, image, image_name)


async def _read_part(part: BodyPartReader, limit: int, too_large: HttpProblem) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _field_name(name: str | None) -> str:
    # The name is echoed in error messages: keep it one short printable line.
    printable = "".join(char for char in (name or "") if char.isprintable())
    return printable[:MAX_FIELD_NAME_CHARS]


def _size(limit: int) -> str:
    mb = limit / (1024 * 1024)
    return f"{mb:.3g} MB" if mb >= 1 else f"{max(1, limit // 1024)} KB"


# -- rendering -----------------------------------------------------------------------------


def _origin(request: web.Request) -> Origin:
    # The cookie is a bearer credential: the store and the logs see only its hash. A
    # browser is its own private chat, so it decides its own settings.
    user = hashlib.sha256(request[_SESSION].encode()).hexdigest()[:32]
    return Origin(UserRef("web", user), ChatRef("web", user), private=True)


def _render_part(part: Part) -> dict[str, Any]:
    """One part of a describe answer as the JSON object of one NDJSON line."""
    match part:
        case Waiting():
            # Counted before this request joined the line: those ahead of it, not itself.
            return {"part": "waiting", "task": part.task, "ahead": part.ahead, "eta_s": part.eta_s}
        case WarmingUp():
            eta = None if part.eta_s is None else round(part.eta_s, 1)
            return {"part": "warming_up", "task": part.task, "eta_s": eta}
        case Caption():
            entities = [
                {"text": e.text, "span": list(e.span), "boxes": [list(b) for b in e.boxes]}
                for e in part.entities
            ]
            return {
                "part": "caption",
                "text": part.text,
                "degenerate": part.degenerate,
                "entities": entities,
            }
        case OcrResult():
            lines = [
                {
                    "text": line.text,
                    "box": [list(corner) for corner in line.box],
                    "confidence": round(line.confidence, 4),
                }
                for line in part.lines
            ]
            return {"part": "ocr", "text": part.text, "lines": lines}
        case Tags():
            return {"part": "tags", "hashtags": list(part.hashtags)}
        case SocialDraft():
            return {"part": "social_draft", "text": part.text}
        case SocialCaption():
            return {"part": "social", "text": part.text, "truncated": part.truncated}
        case Unavailable():
            return {"part": "unavailable", "of": part.part, "detail": part.reason}
    raise ValueError(f"describe yielded an unexpected part {part!r}")


# -- handlers ------------------------------------------------------------------------------


class _Api:
    def __init__(self, service: Service, max_upload_bytes: int) -> None:
        self._service = service
        self._max_upload = max_upload_bytes
        self._page = (STATIC_DIR / "index.html").read_bytes()
        self._spec = openapi_spec(
            max_upload_bytes=max_upload_bytes, session_cookie=SESSION_COOKIE, rated=RATED
        )

    async def page(self, request: web.Request) -> web.Response:
        """The playground page."""
        return web.Response(
            body=self._page,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def describe(self, request: web.Request) -> web.StreamResponse:
        """Stream an image's caption, OCR text, hashtags and social caption as NDJSON."""
        form = await _read_form(request, frozenset({"image", "url"}), self._max_upload)
        # Entering admits the request: a refusal is raised here, as a 4xx, before any part.
        reply = self._service.describe(_origin(request), form.image_input(required=True))
        async with reply:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "application/x-ndjson; charset=utf-8",
                    "Cache-Control": "no-store",
                    # Reverse proxies (nginx) would otherwise buffer the stream.
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
            # The image's hash first, so the page can rate results.
            await _write_line(response, {"part": "image", "sha256": reply.sha256})
            try:
                async for part in reply:
                    await _write_line(response, _render_part(part))
            except CaptionbotError as error:
                await _write_line(response, _error_line(request, error))
            except ConnectionError:
                raise  # the client left: there is nobody to write to
            except Exception:
                # The 200 has gone out, so the error middleware could not answer any more:
                # the stream must still end, with a last line that says it failed.
                logger.exception("%s %s failed mid-stream", request.method, request.path)
                await _write_line(
                    response, {"part": "error", "status": 500, "detail": GENERIC_DETAIL}
                )
            await response.write_eof()
            return response

    async def ask(self, request: web.Request) -> web.Response:
        """Answer a question about the image sent, else the session's last image."""
        form = await _read_form(request, frozenset({"question", "image", "url"}), self._max_upload)
        reply = self._service.ask(
            _origin(request), form.text("question"), form.image_input(required=False)
        )
        answer: Answer = await reply
        return web.json_response({"answer": answer.text, "sha256": reply.sha256})

    async def reimagine(self, request: web.Request) -> web.Response:
        """Make a PNG from text: img2img on the image sent or the last one, else txt2img."""
        allowed = frozenset({"text", "image", "url", "strength", "seed", "steps"})
        form = await _read_form(request, allowed, self._max_upload)
        reply = self._service.reimagine(
            _origin(request),
            form.text("text"),
            form.image_input(required=False),
            use_context_image=True,
            strength=form.number("strength"),
            steps=form.integer("steps"),
            seed=form.integer("seed"),
        )
        return _png(await reply)

    async def imagine(self, request: web.Request) -> web.Response:
        """Make a PNG from text alone (txt2img), never from an earlier image."""
        form = await _read_form(request, frozenset({"text", "seed", "steps"}), self._max_upload)
        reply = self._service.reimagine(
            _origin(request),
            form.text("text"),
            None,
            use_context_image=False,
            steps=form.integer("steps"),
            seed=form.integer("seed"),
        )
        return _png(await reply)

    async def rate(self, request: web.Request) -> web.Response:
        """Record a thumbs up (+1) or down (-1) on a result."""
        if request.content_type != "application/json":
            raise HttpProblem(415, "Send the rating as application/json.")
        body = await read_json(request)
        if not isinstance(body, dict):
            raise HttpProblem(400, "The body must be a JSON object.")
        for key in ("sha256", "task", "score"):
            if key not in body:
                raise HttpProblem(400, f"The field '{key}' is missing.")
        sha256, task = body["sha256"], body["task"]
        if not isinstance(sha256, str) or not isinstance(task, str):
            raise HttpProblem(400, "The fields 'sha256' and 'task' are text.")
        await self._service.rate(_origin(request), sha256, task, body["score"])
        return web.Response(status=204)

    async def forget(self, request: web.Request) -> web.Response:
        """Unlink this session from everything it sent; delete what only it sent."""
        forgotten = await self._service.forget(_origin(request))
        return web.json_response(
            {
                "images": forgotten.images,
                "deleted": forgotten.deleted,
                "results": forgotten.results,
                "bytes_freed": forgotten.bytes_freed,
            }
        )

    async def status(self, request: web.Request) -> web.Response:
        """Queue length, ETA and warm-up state per task, for a new request."""
        status = self._service.status()
        tasks = {
            task.task: {
                "task": task.task,
                "queued": task.queued,
                "eta_s": task.eta_s,
                "warming_up": not task.loaded,
            }
            for task in status.tasks
        }
        return web.json_response(
            {"accepting": status.accepting, "tasks": tasks}, headers={"Cache-Control": "no-store"}
        )

    async def usage(self, request: web.Request) -> web.Response:
        """What this session has used of each daily quota today."""
        lines = await self._service.usage(_origin(request))
        return web.json_response(
            {
                "usage": [
                    {"use": line.use_case, "used": line.used, "limit": line.limit} for line in lines
                ]
            },
            headers={"Cache-Control": "no-store"},
        )

    async def openapi(self, request: web.Request) -> web.Response:
        """This API's OpenAPI 3.1 description."""
        return web.json_response(self._spec)


async def _write_line(response: web.StreamResponse, value: dict[str, Any]) -> None:
    await response.write(json.dumps(value, ensure_ascii=False).encode() + b"\n")


def _error_line(request: web.Request, error: CaptionbotError) -> dict[str, Any]:
    status, _ = _status_of(error)
    logger.info("%s %s stopped (%d): %s", request.method, request.path, status, error)
    return {"part": "error", "status": status, "detail": str(error)}


def _png(image: GeneratedImage) -> web.Response:
    return web.Response(
        body=image.png,
        content_type="image/png",
        headers={
            "X-Seed": str(image.seed),
            "X-Width": str(image.width),
            "X-Height": str(image.height),
            "X-Steps": str(image.steps),
            "X-Sha256": hashlib.sha256(image.png).hexdigest(),
            "Content-Disposition": f'inline; filename="captionbot-{image.seed}.png"',
            "Cache-Control": "no-store",
        },
    )
