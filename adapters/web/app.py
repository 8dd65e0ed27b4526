"""The web adapter: a local playground page and a JSON API over ``core.service``.

Handlers are thin translators: read the form, call the service, render the result. Errors
become JSON ``{"detail": ...}`` with a status chosen by the error's type (the core writes
its messages for users); anything unexpected is logged and answered with one generic
sentence, so no traceback or path ever reaches a client.

A browser is one user and one chat: a random session cookie names both, so "the last
image" means the last image this browser sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from http.cookies import Morsel
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, hdrs, web

from adapters.web.openapi import openapi_spec
from core.errors import (
    CaptionbotError,
    ContentFlagged,
    EngineDead,
    InvalidRequest,
    LimitReached,
    Overloaded,
    TaskUnavailable,
)
from core.ports import ChatRef, UserRef
from core.service import Origin, Part, Service, Waiting
from core.types import Caption, GeneratedImage, OcrResult, SocialCaption

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
SESSION_COOKIE = "captionbot_session"
SESSION_MAX_AGE_S = 30 * 24 * 3600
# What ``/api/status`` reports on: every task a web request can wait for.
STATUS_TASKS = ("caption", "ocr", "tags", "vqa", "write", "reimagine")
# What a rating may be about: the task that made the rated result.
RATED_TASKS = ("caption", "ocr", "tags", "vqa", "write", "reimagine")
# Room for the text fields and multipart boundaries beside the image in one request.
FORM_OVERHEAD_BYTES = 64 * 1024
MAX_TEXT_FIELD_BYTES = 8 * 1024
MAX_FIELD_NAME_CHARS = 40
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
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SESSION = web.RequestKey("session", str)
_NEW_SESSION = web.RequestKey("new_session", bool)


class HttpProblem(Exception):
    """A refusal decided here, in the adapter; ``detail`` is shown to the user as it is."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def create_app(
    service: Service,
    *,
    max_upload_bytes: int,
    first_part_hold_s: float = 0.5,
    allowed_hosts: frozenset[str] | None = None,
) -> web.Application:
    """The page and the JSON API for ``service``; uploads above ``max_upload_bytes`` get 413.

    ``first_part_hold_s``: how long ``/api/describe`` holds back "waiting" parts before it
    commits to a 200 stream, so that an image the core refuses at once still gets a 4xx.
    ``allowed_hosts``: the only Host names served (None: any). A server on loopback should
    name its loopback names, so a web page elsewhere cannot reach it through DNS rebinding.
    """
    if max_upload_bytes <= 0:
        raise ValueError("max_upload_bytes must be positive")
    api = _Api(service, max_upload_bytes, first_part_hold_s)
    # client_max_size bounds every body aiohttp reads for us (JSON); the multipart reader
    # below enforces the image limit itself while it streams.
    app = web.Application(
        middlewares=[_errors, _host_check(allowed_hosts), _sessions],
        client_max_size=max_upload_bytes + FORM_OVERHEAD_BYTES,
    )
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
    app.router.add_get("/api/openapi.json", api.openapi)
    return app


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
    """
    # handler_cancellation: a client that hangs up cancels its handler, and so its work in
    # the engine (a closed tab should not keep a diffusion running).
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
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
    image_sha256: str

    def text(self, name: str) -> str:
        if name not in self.fields:
            raise HttpProblem(400, f"The form field '{name}' is missing.")
        return self.fields[name]

    def required_image(self) -> bytes:
        if self.image is None:
            raise HttpProblem(400, "The form field 'image' is missing; attach an image file.")
        return self.image

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
    digest = hashlib.sha256()
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise HttpProblem(400, "Nested multipart forms are not accepted.")
            name = _field_name(part.name)
            if not name:
                raise HttpProblem(400, "A form field has no name.")
            if name not in allowed:
                takes = ", ".join(sorted(allowed))
                raise HttpProblem(400, f"The form field '{name}' is not used here; use {takes}.")
            if name in fields or (name == "image" and image is not None):
                raise HttpProblem(400, f"The form field '{name}' appears more than once.")
            if name == "image":
                data = await _read_part(part, max_image, too_large, digest.update)
                # An HTML form sends an empty, nameless file part when no file was chosen.
                if data or part.filename:
                    image, image_name = data, part.filename or "image"
                continue
            longer = HttpProblem(413, f"The form field '{name}' is too long.")
            raw = await _read_part(part, MAX_TEXT_FIELD_BYTES, longer, None)
            try:
                fields[name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise HttpProblem(400, f"The form field '{name}' is not UTF-8 text.") from None
    except ValueError:
        # aiohttp's multipart parser says a body is malformed with ValueError.
        raise HttpProblem(400, "The multipart form data is malformed.") from None
    return _Form(fields, image, image_name, digest.hexdigest())


async def _read_part(
    part: BodyPartReader,
    limit: int,
    too_large: HttpProblem,
    on_chunk: Callable[[bytes], object] | None,
) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk():
        size += len(chunk)
        if size > limit:
            raise too_large
        if on_chunk is not None:
            on_chunk(chunk)  # hashing as the bytes arrive costs no second pass
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
    # The cookie is a bearer credential: the store and the logs see only its hash.
    user = hashlib.sha256(request[_SESSION].encode()).hexdigest()[:32]
    return Origin(UserRef("web", user), ChatRef("web", user))


def _waiting(waiting: Waiting) -> dict[str, Any]:
    return {
        "task": waiting.task,
        "queued": waiting.queued,
        "eta_s": round(waiting.eta_s, 1),
        "warming_up": waiting.warming_up,
    }


def _render_part(part: Part) -> dict[str, Any]:
    """One ``describe`` part as the JSON object of one NDJSON line."""
    match part.name:
        case "waiting":
            return {"part": "waiting", **_waiting(part.value)}
        case "caption":
            caption: Caption = part.value
            entities = [
                {"text": e.text, "span": list(e.span), "boxes": [list(b) for b in e.boxes]}
                for e in caption.entities
            ]
            return {
                "part": "caption",
                "text": caption.text,
                "degenerate": caption.degenerate,
                "entities": entities,
            }
        case "ocr":
            ocr: OcrResult = part.value
            lines = [
                {
                    "text": line.text,
                    "box": [list(corner) for corner in line.box],
                    "confidence": round(line.confidence, 4),
                }
                for line in ocr.lines
            ]
            return {"part": "ocr", "text": ocr.text, "lines": lines}
        case "tags":
            return {"part": "tags", "hashtags": list(part.value)}
        case "social_draft":
            return {"part": "social_draft", "text": str(part.value)}
        case "social":
            social: SocialCaption = part.value
            return {"part": "social", "text": social.text, "truncated": social.truncated}
    raise ValueError(f"describe yielded an unknown part {part.name!r}")


class _End:
    """Marks the end of a describe stream in the queue between pump and handler."""


_END = _End()
_Item = Part | Exception | _End


async def _pump(parts: AsyncGenerator[Part, None], queue: asyncio.Queue[_Item]) -> None:
    """Move ``parts`` into ``queue``, then the end mark or the error that ended them.

    The generator lives in this one task from first step to close, so the handler can wait
    on the queue with a timeout without ever cancelling the generator halfway.
    """
    try:
        async with contextlib.aclosing(parts):
            async for part in parts:
                await queue.put(part)
    except Exception as exc:
        await queue.put(exc)
    else:
        await queue.put(_END)


# -- handlers ------------------------------------------------------------------------------


class _Api:
    def __init__(self, service: Service, max_upload_bytes: int, first_part_hold_s: float) -> None:
        self._service = service
        self._max_upload = max_upload_bytes
        self._hold_s = first_part_hold_s
        self._page = (STATIC_DIR / "index.html").read_bytes()
        self._spec = openapi_spec(
            max_upload_bytes=max_upload_bytes,
            session_cookie=SESSION_COOKIE,
            rated_tasks=RATED_TASKS,
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
        form = await _read_form(request, frozenset({"image"}), self._max_upload)
        image = form.required_image()
        # Room for one part: while the client reads slowly, the engine coalesces drafts.
        queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=1)
        parts = self._service.describe(_origin(request), image, form.image_name)
        pump = asyncio.create_task(
            _pump(parts, queue), name=f"web-describe-{form.image_sha256[:12]}"
        )
        try:
            # 1. Hold back "waiting" parts briefly: a refusal (not an image, over a limit)
            #    comes within milliseconds and deserves a real 4xx, not a 200 stream.
            held: list[Part] = []
            last: _Item | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._hold_s):
                    while not held or held[-1].name == "waiting":
                        last = await queue.get()
                        if not isinstance(last, Part):
                            break
                        held.append(last)
            if isinstance(last, Exception):
                raise last
            # 2. Commit to the stream: the image's hash first, so the page can rate results.
            response = web.StreamResponse(
                headers={
                    "Content-Type": "application/x-ndjson; charset=utf-8",
                    "Cache-Control": "no-store",
                    # Reverse proxies (nginx) would otherwise buffer the stream.
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
            await _write_line(response, {"part": "image", "sha256": form.image_sha256})
            for part in held:
                await _write_line(response, _render_part(part))
            # 3. Relay the rest as it comes; an error ends the stream with an error line.
            while not isinstance(last, _End):
                item = await queue.get()
                if isinstance(item, _End):
                    break
                if isinstance(item, Exception):
                    await _write_line(response, _error_line(request, item))
                    break
                if item.name == "social_draft" and not queue.empty():
                    continue  # a newer part is already waiting; skip the stale draft
                await _write_line(response, _render_part(item))
            await response.write_eof()
            return response
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    async def ask(self, request: web.Request) -> web.Response:
        """Answer a question about the image sent, else the session's last image."""
        form = await _read_form(request, frozenset({"question", "image"}), self._max_upload)
        answer = await self._service.ask(
            _origin(request), form.text("question"), form.image, form.image_name
        )
        return web.json_response({"answer": answer.text})

    async def reimagine(self, request: web.Request) -> web.Response:
        """Make a PNG from text: img2img on the image sent or the last one, else txt2img."""
        allowed = frozenset({"text", "image", "strength", "seed", "steps"})
        form = await _read_form(request, allowed, self._max_upload)
        parts = self._service.reimagine(
            _origin(request),
            form.text("text"),
            form.image,
            name=form.image_name,
            use_context_image=True,
            strength=form.number("strength"),
            steps=form.integer("steps"),
            seed=form.integer("seed"),
        )
        return await _png(parts)

    async def imagine(self, request: web.Request) -> web.Response:
        """Make a PNG from text alone (txt2img), never from an earlier image."""
        form = await _read_form(request, frozenset({"text", "seed", "steps"}), self._max_upload)
        parts = self._service.reimagine(
            _origin(request),
            form.text("text"),
            None,
            use_context_image=False,
            steps=form.integer("steps"),
            seed=form.integer("seed"),
        )
        return await _png(parts)

    async def rate(self, request: web.Request) -> web.Response:
        """Record a thumbs up (+1) or down (-1) on a result."""
        if request.content_type != "application/json":
            raise HttpProblem(415, "Send the rating as application/json.")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise HttpProblem(400, "The body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise HttpProblem(400, "The body must be a JSON object.")
        for key in ("sha256", "task", "score"):
            if key not in body:
                raise HttpProblem(400, f"The field '{key}' is missing.")
        sha256, task, score = body["sha256"], body["task"], body["score"]
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise HttpProblem(400, "The field 'sha256' must be 64 lowercase hex digits.")
        if task not in RATED_TASKS:
            raise HttpProblem(400, f"The field 'task' must be one of {', '.join(RATED_TASKS)}.")
        # bool is an int in Python; true is not a thumbs up.
        if type(score) is not int:
            raise HttpProblem(400, "The field 'score' must be 1 or -1.")
        await self._service.rate(_origin(request), sha256, task, score)
        return web.Response(status=204)

    async def forget(self, request: web.Request) -> web.Response:
        """Delete the images this session sent and everything derived from them."""
        forgotten = await self._service.forget(_origin(request))
        return web.json_response(
            {
                "images": forgotten.images,
                "results": forgotten.results,
                "bytes_freed": forgotten.bytes_freed,
            }
        )

    async def status(self, request: web.Request) -> web.Response:
        """Queue length, ETA and warm-up state per task, for a new request."""
        tasks = {task: _waiting(self._service.waiting(task)) for task in STATUS_TASKS}
        return web.json_response({"tasks": tasks}, headers={"Cache-Control": "no-store"})

    async def openapi(self, request: web.Request) -> web.Response:
        """This API's OpenAPI 3.1 description."""
        return web.json_response(self._spec)


async def _write_line(response: web.StreamResponse, value: dict[str, Any]) -> None:
    await response.write(json.dumps(value, ensure_ascii=False).encode() + b"\n")


def _error_line(request: web.Request, error: Exception) -> dict[str, Any]:
    if isinstance(error, CaptionbotError):
        status, _ = _status_of(error)
        logger.info("%s %s stopped (%d): %s", request.method, request.path, status, error)
        return {"part": "error", "status": status, "detail": str(error)}
    logger.error("%s %s failed mid-stream", request.method, request.path, exc_info=error)
    return {"part": "error", "status": 500, "detail": GENERIC_DETAIL}


async def _png(parts: AsyncGenerator[Part, None]) -> web.Response:
    async with contextlib.aclosing(parts):
        async for part in parts:
            if part.name == "image":
                image: GeneratedImage = part.value
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
    raise RuntimeError("reimagine ended without an image")
