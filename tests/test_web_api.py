"""The web API against a real aiohttp server on 127.0.0.1, the tiny profile and the real engine.

Every reply any test gets is checked against the OpenAPI description the server itself
serves: the status must be listed for that endpoint, the content type must be one it
names, declared headers must be present, and JSON bodies (every NDJSON line) must validate
against the schema.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from PIL import Image

from adapters.http import LinkFetcher
from adapters.memory import MemoryStore
from adapters.web import create_app, serve
from bot.config import load_settings
from bot.wiring import build_tasks
from core.engine import Engine
from core.service import Service
from core.settings import EngineSettings, LinkSettings, ServiceSettings, Settings
from tests import imagekit

pytestmark = pytest.mark.asyncio(loop_scope="module")

SIGN = imagekit.text_png("GRAND OPENING", size=(400, 120))
NOISE = imagekit.encode(imagekit.noise())  # 256x192
MAX_UPLOAD = 512 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Describe lines that say where the request stands rather than a result.
WAIT_PARTS = ("waiting", "warming_up")


@dataclass(frozen=True)
class Reply:
    status: int
    media_type: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


@dataclass
class Api:
    """A browser-like client: one cookie jar, so one session, against one server."""

    base: str
    session: aiohttp.ClientSession
    spec: dict[str, Any]

    async def send(self, method: str, path: str, **kwargs: Any) -> Reply:
        async with self.session.request(method, self.base + path, **kwargs) as response:
            reply = Reply(
                response.status,
                response.content_type,
                dict(response.headers),
                await response.read(),
            )
        conforms(self.spec, method, path, reply)
        return reply

    async def post_form(self, path: str, **fields: str | bytes) -> Reply:
        form = aiohttp.FormData(default_to_multipart=True)
        for name, value in fields.items():
            if isinstance(value, bytes):
                form.add_field(name, value, filename=f"{name}.png", content_type="image/png")
            else:
                form.add_field(name, value)
        return await self.send("POST", path, data=form)


def conforms(spec: dict[str, Any], method: str, path: str, reply: Reply) -> None:
    """Assert that ``reply`` is one of the responses the description lists for the call."""
    responses = spec["paths"][path][method.lower()]["responses"]
    assert str(reply.status) in responses, f"{method} {path} -> {reply.status}: {reply.body!r}"
    described = responses[str(reply.status)]
    if "$ref" in described:
        described = spec["components"]["responses"][described["$ref"].rsplit("/", 1)[1]]
    for header in described.get("headers", {}):
        assert header in reply.headers, f"{method} {path} lacks the {header} header"
    content = described.get("content")
    if content is None:
        assert reply.body == b""
        return
    assert reply.media_type in content, f"{method} {path} answered {reply.media_type}"
    schema = content[reply.media_type]["schema"]
    if reply.media_type == "application/json":
        validate(spec, schema, reply.json())
    elif reply.media_type == "application/x-ndjson":
        for line in reply.lines():
            validate(spec, schema, line)
    elif reply.media_type == "image/png":
        assert reply.body.startswith(PNG_SIGNATURE)


def validate(spec: dict[str, Any], schema: dict[str, Any], instance: Any) -> None:
    # "#/components/..." references resolve against the root, so give the root the spec's.
    Draft202012Validator({**schema, "components": spec["components"]}).validate(instance)


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def tiny_settings(model_cache: Path, **engine: Any) -> Settings:
    settings = load_settings(None, "tiny")
    return type(settings)(
        engine=EngineSettings(device="cpu", model_cache=model_cache, **engine),
        profile=settings.profile,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_cache: Path, single_torch_thread: None) -> AsyncIterator[Engine]:
    settings = tiny_settings(model_cache)
    async with Engine(build_tasks(settings), settings.engine) as running:
        yield running


@contextlib.asynccontextmanager
async def started(
    engine: Engine, fetcher: LinkFetcher | None = None, **limits: Any
) -> AsyncIterator[str]:
    """Serve a new service (and in-memory store) on ``engine`` at a free port."""
    service = Service(engine, MemoryStore(), ServiceSettings(**limits), fetcher=fetcher)
    app = create_app(service, max_upload_bytes=MAX_UPLOAD)
    runner = await serve(app, "127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(engine: Engine) -> AsyncIterator[str]:
    async with started(engine, per_user_in_flight=4) as base:
        yield base


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def spec(server: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(server + "/api/openapi.json") as response,
    ):
        assert response.status == 200
        served: dict[str, Any] = await response.json()
        return served


@contextlib.asynccontextmanager
async def client(base: str, spec: dict[str, Any]) -> AsyncIterator[Api]:
    # unsafe=True: aiohttp's jar otherwise ignores cookies from an IP address like ours.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield Api(base, session, spec)


@pytest_asyncio.fixture(loop_scope="module")
async def api(server: str, spec: dict[str, Any]) -> AsyncIterator[Api]:
    async with client(server, spec) as browser:
        yield browser


async def test_describe_streams_caption_first_and_social_last(api: Api) -> None:
    reply = await api.post_form("/api/describe", image=SIGN)
    assert reply.status == 200 and reply.media_type == "application/x-ndjson"
    lines = reply.lines()
    assert lines[0] == {"part": "image", "sha256": hashlib.sha256(SIGN).hexdigest()}
    names = [line["part"] for line in lines[1:] if line["part"] not in WAIT_PARTS]
    assert names[:3] == ["caption", "ocr", "tags"]
    assert names[-1] == "social"
    assert set(names[3:-1]) <= {"social_draft"}
    by_name = {line["part"]: line for line in lines}
    assert by_name["caption"]["text"]
    assert "GRAND OPENING" in by_name["ocr"]["text"]
    assert by_name["ocr"]["lines"][0]["box"] and by_name["ocr"]["lines"][0]["confidence"] > 0
    assert by_name["tags"]["hashtags"]
    assert by_name["social"]["text"]
    cookie = reply.headers["Set-Cookie"]
    assert "captionbot_session=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie


async def test_ask_answers_about_the_sessions_last_image(api: Api, server: str) -> None:
    assert (await api.post_form("/api/describe", image=NOISE)).status == 200
    reply = await api.post_form("/api/ask", question="what is in the picture?")
    assert reply.status == 200 and reply.json()["answer"]
    with_image = await api.post_form("/api/ask", question="what is it?", image=SIGN)
    assert with_image.status == 200 and with_image.json()["answer"]
    # Another browser is another session, with no image yet.
    async with client(server, api.spec) as stranger:
        refused = await stranger.post_form("/api/ask", question="what is it?")
        assert refused.status == 400 and "Send an image first" in refused.json()["detail"]


async def test_reimagine_and_imagine_make_pngs_that_a_seed_reproduces(api: Api) -> None:
    await api.post_form("/api/describe", image=NOISE)  # 256x192: the session's last image
    first = await api.post_form("/api/reimagine", text="a bakery at night", seed="7", steps="2")
    assert first.status == 200 and first.headers["X-Seed"] == "7"
    width, height = png_size(first.body)
    assert (width, height) == (int(first.headers["X-Width"]), int(first.headers["X-Height"]))
    assert width / height == pytest.approx(256 / 192, rel=0.1)  # img2img on the last image
    assert first.headers["X-Sha256"] == hashlib.sha256(first.body).hexdigest()
    again = await api.post_form("/api/reimagine", text="a bakery at night", seed="7", steps="2")
    assert again.body == first.body

    drawn = await api.post_form("/api/imagine", text="a lighthouse", steps="2")
    assert drawn.status == 200
    width, height = png_size(drawn.body)
    assert width == height  # txt2img, although the session has an image
    seed = drawn.headers["X-Seed"]
    redrawn = await api.post_form("/api/imagine", text="a lighthouse", steps="2", seed=seed)
    assert redrawn.body == drawn.body and redrawn.headers["X-Seed"] == seed


async def test_a_file_that_is_not_an_image_is_refused_with_400(api: Api) -> None:
    junk = imagekit.not_an_image()
    for path, fields in (
        ("/api/describe", {}),
        ("/api/ask", {"question": "what is it?"}),
        ("/api/reimagine", {"text": "a cat", "steps": "2"}),
    ):
        form = aiohttp.FormData(fields, default_to_multipart=True)
        form.add_field("image", junk, filename="notes.txt", content_type="text/plain")
        reply = await api.send("POST", path, data=form)
        assert reply.status == 400, path
        assert "is not an image this bot can read" in reply.json()["detail"], path


async def test_decompression_bombs_and_truncated_images_are_refused_with_400(api: Api) -> None:
    for upload, reason in (
        (imagekit.bomb_png(), "megapixels"),
        (imagekit.truncated_jpeg(), "damaged or truncated"),
    ):
        reply = await api.post_form("/api/describe", image=upload)
        assert reply.status == 400
        assert reason in reply.json()["detail"]


async def test_an_upload_over_the_limit_is_refused_with_413(api: Api) -> None:
    big = b"\x89PNG" + bytes(MAX_UPLOAD)
    reply = await api.post_form("/api/describe", image=big)  # refused by Content-Length
    assert reply.status == 413 and "512 KB" in reply.json()["detail"]

    # Without a Content-Length the limit holds while the body streams in.
    boundary = "captionbot-test"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    async def chunks() -> AsyncIterator[bytes]:
        yield head
        for _ in range(MAX_UPLOAD // 65536 + 2):
            yield bytes(65536)
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    streamed = await api.send("POST", "/api/ask", data=chunks(), headers=headers)
    assert streamed.status == 413 and "512 KB" in streamed.json()["detail"]

    long_question = "why " * 3000
    too_long = await api.post_form("/api/ask", question=long_question)
    assert too_long.status == 413 and "'question'" in too_long.json()["detail"]


@pytest.mark.parametrize(
    ("path", "fields", "detail"),
    [
        ("/api/describe", {}, "'image' is missing"),
        ("/api/ask", {}, "'question' is missing"),
        ("/api/reimagine", {"seed": "1"}, "'text' is missing"),
        ("/api/imagine", {}, "'text' is missing"),
        ("/api/reimagine", {"text": "a cat", "seed": "one"}, "'seed' must be a whole number"),
        ("/api/reimagine", {"text": "a cat", "strength": "nan"}, "'strength' must be a number"),
        ("/api/imagine", {"text": "a cat", "steps": "2.5"}, "'steps' must be a whole number"),
        ("/api/imagine", {"text": "a cat", "colour": "red"}, "'colour' is not used here"),
        ("/api/imagine", {"text": " "}, "The prompt is empty"),
        ("/api/imagine", {"text": "a cat", "seed": "-1"}, "The seed must be between"),
    ],
)
async def test_missing_fields_and_bad_numbers_are_400(
    api: Api, path: str, fields: dict[str, str], detail: str
) -> None:
    fields_form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        fields_form.add_field(name, value)
    reply = await api.send("POST", path, data=fields_form)
    assert reply.status == 400
    assert detail in reply.json()["detail"]


async def test_wrong_media_types_are_415(api: Api) -> None:
    urlencoded = await api.send("POST", "/api/ask", data={"question": "what?"})
    assert urlencoded.status == 415 and "multipart/form-data" in urlencoded.json()["detail"]
    rating_form = await api.post_form("/api/rate", sha256="ab" * 32)
    assert rating_form.status == 415


async def test_rate_forget_and_status(api: Api) -> None:
    mine = imagekit.encode(imagekit.noise(seed=42))  # sent by nobody else, so forget takes it
    lines = (await api.post_form("/api/describe", image=mine)).lines()
    sha = lines[0]["sha256"]
    rated = await api.send("POST", "/api/rate", json={"sha256": sha, "task": "caption", "score": 1})
    assert rated.status == 204
    for body, detail in (
        ({"sha256": sha, "task": "caption", "score": 5}, "thumbs up (1) or thumbs down"),
        ({"sha256": sha, "task": "caption", "score": True}, "thumbs up (1) or thumbs down"),
        ({"sha256": sha, "task": "poem", "score": 1}, "A rating is about one of"),
        ({"sha256": "x", "task": "caption", "score": 1}, "sha256 (64 hex digits)"),
        ({"sha256": sha, "task": 7, "score": 1}, "are text"),
        ({"task": "caption", "score": 1}, "'sha256' is missing"),
        ([1, 2], "must be a JSON object"),
    ):
        refused = await api.send("POST", "/api/rate", json=body)
        assert refused.status == 400 and detail in refused.json()["detail"], body
    broken = await api.send(
        "POST", "/api/rate", data=b"{", headers={"Content-Type": "application/json"}
    )
    assert broken.status == 400 and "not valid JSON" in broken.json()["detail"]

    status = await api.send("GET", "/api/status")
    assert {"caption", "ocr", "vqa", "write", "reimagine"} <= set(status.json()["tasks"])

    forgotten = await api.send("POST", "/api/forget")
    assert forgotten.status == 200 and forgotten.json()["images"] >= 1
    after = await api.post_form("/api/ask", question="what is it?")
    assert after.status == 400 and "Send an image first" in after.json()["detail"]


async def test_refusals_come_before_the_stream_and_missing_parts_say_why(
    model_cache: Path, single_torch_thread: None, spec: dict[str, Any]
) -> None:
    """A describe needs room for three model requests at once (caption, text and mood):
    with less it is refused with 429 before the stream, never half-way through it."""
    settings = tiny_settings(model_cache, max_in_flight=1)
    async with (
        Engine(build_tasks(settings, ["caption", "ocr"]), settings.engine) as cramped,
        started(cramped) as base,
        client(base, spec) as browser,
    ):
        busy = await browser.post_form("/api/describe", image=NOISE)
        assert busy.status == 429 and "busy" in busy.json()["detail"]
        assert int(busy.headers["Retry-After"]) >= 1
        junk = await browser.post_form("/api/describe", image=imagekit.not_an_image())
        assert junk.status == 400 and "not an image" in junk.json()["detail"]

    settings = tiny_settings(model_cache, max_in_flight=3)
    async with (
        Engine(build_tasks(settings, ["caption", "ocr"]), settings.engine) as cold,
        started(cold) as base,
        client(base, spec) as browser,
    ):
        reply = await browser.post_form("/api/describe", image=NOISE)
        assert reply.status == 200
        lines = reply.lines()
        names = [line["part"] for line in lines if line["part"] not in WAIT_PARTS]
        # This engine makes no hashtags or social captions: those parts say so, and the
        # caption and text still come.
        assert names == ["image", "caption", "ocr", "unavailable", "unavailable"]
        missing = {line["of"]: line["detail"] for line in lines if line["part"] == "unavailable"}
        assert list(missing) == ["tags", "social"]
        assert all("does not offer" in detail for detail in missing.values())
        # The caption model was loading: said so, with an estimate only from timed loads.
        [warming] = [line for line in lines if line["part"] == "warming_up"]
        assert warming["task"] == "caption"
        assert warming["eta_s"] is None or warming["eta_s"] >= 0


async def test_limits_answer_429_with_retry_after(engine: Engine, spec: dict[str, Any]) -> None:
    async with started(engine, daily_ask=1) as base, client(base, spec) as browser:
        assert (await browser.post_form("/api/ask", question="what?", image=SIGN)).status == 200
        reply = await browser.post_form("/api/ask", question="what?", image=SIGN)
        assert reply.status == 429 and int(reply.headers["Retry-After"]) > 0
        assert "today's limit of 1 question;" in reply.json()["detail"]


async def test_the_page_and_unknown_addresses(api: Api) -> None:
    page = await api.send("GET", "/")
    assert page.status == 200 and b'id="file"' in page.body
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    async with api.session.get(api.base + "/static/app.js") as script:
        assert script.status == 200 and "ndjson" in await script.text()
    for method, path, status in (("GET", "/nowhere", 404), ("GET", "/api/describe", 405)):
        async with api.session.request(method, api.base + path) as response:
            assert response.status == status and response.content_type == "application/json"
            assert set(await response.json()) == {"detail"}


async def test_the_description_covers_every_route(server: str, spec: dict[str, Any]) -> None:
    validate_openapi(spec)  # a well-formed OpenAPI 3.1 document
    app = create_app(Service(None, MemoryStore(), ServiceSettings()), max_upload_bytes=1)  # type: ignore[arg-type]
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and not route.resource.canonical.startswith("/static")
    }
    described = {(method, path) for path, item in spec["paths"].items() for method in item}
    assert routes == described
    for schema in spec["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


async def test_an_image_by_link_is_fetched_checked_and_described(
    engine: Engine, spec: dict[str, Any]
) -> None:
    """The `url` field: fetched like the CLI's links, refused before the stream when it
    leads somewhere private that the operator has not allow-listed."""
    images = web.Application()

    async def sign(request: web.Request) -> web.Response:
        return web.Response(body=SIGN, content_type="image/png")

    images.router.add_get("/sign.png", sign)
    image_runner = web.AppRunner(images)
    await image_runner.setup()
    await web.TCPSite(image_runner, "127.0.0.1", 0).start()
    port = image_runner.addresses[0][1]
    link = f"http://127.0.0.1:{port}/sign.png"
    try:
        for allowed, expected in (((), 400), (("127.0.0.1",), 200)):
            settings = LinkSettings(allow_private=allowed, timeout_s=5)
            async with (
                LinkFetcher(settings) as fetcher,
                started(engine, fetcher=fetcher) as base,
                client(base, spec) as browser,
            ):
                reply = await browser.post_form("/api/describe", url=link)
                assert reply.status == expected, reply.body
                if expected == 400:
                    assert "private or local network" in reply.json()["detail"]
                    continue
                lines = reply.lines()
                assert lines[0] == {"part": "image", "sha256": hashlib.sha256(SIGN).hexdigest()}
                [ocr] = [line for line in lines if line["part"] == "ocr"]
                assert "GRAND OPENING" in ocr["text"]
                both = await browser.post_form("/api/ask", question="what?", url=link, image=SIGN)
                assert both.status == 400 and "not both" in both.json()["detail"]
    finally:
        await image_runner.cleanup()
