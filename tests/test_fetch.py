"""The link fetcher against real HTTP servers on 127.0.0.1 and 127.0.0.2.

The servers speak raw HTTP/1.1 over asyncio streams, so a test can send what a real server
library would refuse to: lying or missing Content-Length, bodies delimited by closing the
connection, no Content-Type at all, bytes that trickle forever. Both listen on the same
port, so a connection to the wrong address would succeed and be seen in ``hits``.

Refusals that must happen before any connection run without a server, with a resolver
that records look-ups, and assert that nothing was looked up. No test leaves 127.0.0.x.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote

import pytest
import pytest_asyncio
from aiohttp.abc import AbstractResolver, ResolveResult

from adapters.http import LinkFetcher
from core.errors import InvalidRequest
from core.ports import ImageFetcher
from core.settings import LinkSettings
from tests import imagekit

pytestmark = pytest.mark.asyncio(loop_scope="module")

PNG = imagekit.encode(imagekit.solid((32, 24), "orange"))
OTHER_PNG = imagekit.encode(imagekit.solid((32, 24), "navy"))
LIMIT = 100_000
PRIVATE = "That link leads to a private or local network address, which this bot does not fetch."
TOO_BIG = "That link's file is larger than the 97.7 KB this bot accepts."


@dataclass(frozen=True)
class Hit:
    target: str
    headers: dict[str, str]


@dataclass
class Site:
    """A tiny HTTP/1.1 server on one loopback address; every answer closes its connection."""

    host: str
    body: bytes
    hits: list[Hit] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def url(self, target: str) -> str:
        return f"http://{self.host}:{self.port}{target}"

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        # Endless answers whose client is gone may still be between two writes.
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            target = request_line.split(" ")[1]
            headers = {}
            for line in header_lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            self.hits.append(Hit(target, headers))
            await self._answer(target, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up, as the fetcher does when it refuses a body
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _answer(
        self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        path, _, query = target.partition("?")
        send = writer.write
        match path.split("/")[1:]:
            case ["cat.png"] | ["relative", "cat.png"]:
                send(head("200 OK", "Content-Type: image/png", length(self.body)) + self.body)
            case ["untyped"]:
                send(head("200 OK", length(self.body)) + self.body)
            case ["octet", ""]:
                send(head("200 OK", "Content-Type: application/octet-stream") + self.body)
            case ["named"]:
                disposition = "attachment; filename*=UTF-8''..%2F..%2Fcaf%C3%A9%0A.png"
                send(
                    head("200 OK", "Content-Type: image/png", f"Content-Disposition: {disposition}")
                )
                send(self.body)
            case ["bad-disposition", "fallback.png"]:
                send(head("200 OK", "Content-Type: image/png", 'Content-Disposition: ;;="'))
                send(self.body)
            case ["close-delimited.png"]:
                # No Content-Length, not chunked: the body ends when the connection does.
                send(head("200 OK", "Content-Type: image/png") + self.body)
            case ["huge-declared"]:
                send(head("200 OK", "Content-Type: image/png", "Content-Length: 10000000000"))
                await trickle(writer)
            case ["endless-chunked"]:
                send(head("200 OK", "Content-Type: image/png", "Transfer-Encoding: chunked"))
                chunk = b"\x00" * 16_384
                for _ in range(10_000):
                    send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
            case ["endless-close"]:
                send(head("200 OK", "Content-Type: image/png"))
                for _ in range(10_000):
                    send(b"\x00" * 16_384)
                    await writer.drain()
            case ["short"]:
                send(head("200 OK", "Content-Type: image/png", "Content-Length: 1000") + b"x" * 10)
            case ["trickle"]:
                send(head("200 OK", "Content-Type: image/png", "Content-Length: 50000"))
                await trickle(writer)
            case ["silent"]:
                await reader.read()  # returns when the client gives up
            case ["hop", count]:
                hops = int(count)
                send(head("302 Found", f"Location: /hop/{hops - 1}") if hops else self.image())
            case ["loop"]:
                send(head("302 Found", "Location: /loop"))
            case ["ping"]:
                send(head("301 Moved Permanently", "Location: /pong"))
            case ["pong"]:
                send(head("301 Moved Permanently", f"Location: {self.url('/ping')}"))
            case ["relative", "start"]:
                send(head("307 Temporary Redirect", "Location: cat.png#whole"))
            case ["redirect"]:
                location = parse_qs(query)["to"][0]
                send(head("302 Found", f"Location: {location}"))
            case ["no-location"]:
                send(head("302 Found", "Content-Length: 0"))
            case ["status", code]:
                page = b"<html>nope</html>"
                send(head(f"{code} Whatever", "Content-Type: text/html", length(page)) + page)
            case ["page"]:
                page = b"<!doctype html><title>cats</title>"
                send(head("200 OK", "Content-Type: text/html; charset=utf-8", length(page)) + page)
            case ["data.json"]:
                send(head("200 OK", "Content-Type: application/json", "Content-Length: 2") + b"{}")
            case _:
                send(head("404 Not Found", "Content-Length: 0"))
        await writer.drain()

    def image(self) -> bytes:
        return head("200 OK", "Content-Type: image/png", length(self.body)) + self.body


def head(status: str, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def length(body: bytes) -> str:
    return f"Content-Length: {len(body)}"


async def trickle(writer: asyncio.StreamWriter) -> None:
    for _ in range(400):
        writer.write(b"\x00")
        await writer.drain()
        await asyncio.sleep(0.05)


class ScriptedResolver(AbstractResolver):
    """A DNS that answers the n-th look-up with the n-th list (the last list from then on)."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        if not self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        addresses = self.answers[min(len(self.lookups), len(self.answers)) - 1]
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        pass


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sites() -> AsyncIterator[tuple[Site, Site]]:
    """The image host on 127.0.0.1, and on the same port of 127.0.0.2 one links must not reach."""
    main = Site("127.0.0.1", PNG)
    other = Site("127.0.0.2", OTHER_PNG)
    await main.start()
    await other.start(main.port)
    yield main, other
    await main.stop()
    await other.stop()


@pytest.fixture
def main(sites: tuple[Site, Site]) -> Site:
    sites[0].hits.clear()
    return sites[0]


@pytest.fixture
def other(sites: tuple[Site, Site]) -> Site:
    sites[1].hits.clear()
    return sites[1]


Opener = Callable[..., Awaitable[LinkFetcher]]


@pytest_asyncio.fixture(loop_scope="module")
async def open_fetcher() -> AsyncIterator[Opener]:
    """Build fetchers (1 s, 3 redirects, 127.0.0.1 allowed unless told); all closed after."""
    opened: list[LinkFetcher] = []

    async def open_(
        resolver: AbstractResolver | None = None,
        *,
        timeout_s: float = 1.0,
        max_redirects: int = 3,
        allow_private: tuple[str, ...] = ("127.0.0.1",),
    ) -> LinkFetcher:
        settings = LinkSettings(
            timeout_s=timeout_s, max_redirects=max_redirects, allow_private=allow_private
        )
        fetcher = LinkFetcher(settings, resolver=resolver)
        opened.append(fetcher)
        return fetcher

    yield open_
    for fetcher in opened:
        await fetcher.aclose()


@pytest_asyncio.fixture(loop_scope="module")
async def fetcher(open_fetcher: Opener) -> LinkFetcher:
    return await open_fetcher()


async def refusal(fetcher: ImageFetcher, url: str, max_bytes: int = LIMIT) -> str:
    """The sentence ``fetch`` refuses ``url`` with; it must be one line and one sentence."""
    with pytest.raises(InvalidRequest) as caught:
        await fetcher.fetch(url, max_bytes)
    message = str(caught.value)
    assert "\n" not in message
    assert message[0].isupper()
    assert message.endswith(".")
    assert "Traceback" not in message
    assert "Errno" not in message
    return message


# -- what a successful fetch returns -------------------------------------------------------


async def test_fetches_an_image_with_its_name_and_url(fetcher: LinkFetcher, main: Site) -> None:
    image = await fetcher.fetch(main.url("/cat.png?size=large"), LIMIT)
    assert image.data == PNG
    assert image.name == "cat.png"
    assert image.url == main.url("/cat.png?size=large")


async def test_sends_a_captionbot_user_agent_and_asks_for_no_compression(
    fetcher: LinkFetcher, main: Site
) -> None:
    await fetcher.fetch(main.url("/cat.png"), LIMIT)
    [hit] = main.hits
    assert "captionbot" in hit.headers["user-agent"]
    assert hit.headers["accept-encoding"] == "identity"
    assert "cookie" not in hit.headers


async def test_content_disposition_names_the_file_safely(fetcher: LinkFetcher, main: Site) -> None:
    # filename*=UTF-8''../../café<newline>.png: folders and the control character go.
    image = await fetcher.fetch(main.url("/named"), LIMIT)
    assert image.name == "café.png"
    assert image.data == PNG


async def test_malformed_content_disposition_falls_back_to_the_path(
    fetcher: LinkFetcher, main: Site
) -> None:
    image = await fetcher.fetch(main.url("/bad-disposition/fallback.png"), LIMIT)
    assert image.name == "fallback.png"


async def test_missing_and_octet_stream_types_are_accepted(
    fetcher: LinkFetcher, main: Site
) -> None:
    untyped = await fetcher.fetch(main.url("/untyped"), LIMIT)
    assert untyped.data == PNG
    assert untyped.name == "untyped"
    octet = await fetcher.fetch(main.url("/octet/"), LIMIT)
    assert octet.data == PNG
    # The path ends in "/", so there is no last segment to name it by.
    assert octet.name == "image"


async def test_a_body_of_exactly_max_bytes_is_accepted(fetcher: LinkFetcher, main: Site) -> None:
    declared = await fetcher.fetch(main.url("/cat.png"), len(PNG))
    counted = await fetcher.fetch(main.url("/close-delimited.png"), len(PNG))
    assert declared.data == counted.data == PNG


async def test_the_session_serves_many_fetches_at_once(fetcher: LinkFetcher, main: Site) -> None:
    images = await asyncio.gather(*(fetcher.fetch(main.url("/cat.png"), LIMIT) for _ in range(8)))
    assert all(image.data == PNG for image in images)
    assert len(main.hits) == 8


# -- size ---------------------------------------------------------------------------------


async def test_too_large_content_length_is_refused_before_reading(
    fetcher: LinkFetcher, main: Site
) -> None:
    # The body trickles, so reading any of it would run into the 1 s timeout instead.
    started = time.monotonic()
    assert await refusal(fetcher, main.url("/huge-declared")) == TOO_BIG
    assert time.monotonic() - started < 0.5


async def test_one_byte_over_the_limit_is_refused_with_and_without_content_length(
    fetcher: LinkFetcher, main: Site
) -> None:
    for target in ("/cat.png", "/close-delimited.png"):
        message = await refusal(fetcher, main.url(target), len(PNG) - 1)
        assert message.startswith("That link's file is larger than the ")


@pytest.mark.parametrize("target", ["/endless-chunked", "/endless-close"])
async def test_endless_bodies_are_cut_at_the_limit(
    fetcher: LinkFetcher, main: Site, target: str
) -> None:
    started = time.monotonic()
    assert await refusal(fetcher, main.url(target)) == TOO_BIG
    assert time.monotonic() - started < 0.9  # cut by size, not by the 1 s timeout


async def test_size_limits_are_shown_in_readable_units(open_fetcher: Opener, main: Site) -> None:
    fetcher = await open_fetcher()
    assert await refusal(fetcher, main.url("/cat.png"), 10) == (
        "That link's file is larger than the 10 bytes this bot accepts."
    )
    assert await refusal(fetcher, main.url("/huge-declared"), 50 * 1024 * 1024) == (
        "That link's file is larger than the 50 MB this bot accepts."
    )


async def test_a_body_shorter_than_its_content_length_is_refused(
    fetcher: LinkFetcher, main: Site
) -> None:
    assert await refusal(fetcher, main.url("/short")) == (
        "The download from that link broke off before it was complete."
    )


# -- time ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/trickle", "/silent"])
async def test_slow_servers_are_cut_at_the_timeout(
    open_fetcher: Opener, main: Site, target: str
) -> None:
    fetcher = await open_fetcher(timeout_s=0.5)
    started = time.monotonic()
    message = await refusal(fetcher, main.url(target))
    elapsed = time.monotonic() - started
    assert message == "Downloading that link took longer than 0.5 seconds."
    assert 0.4 < elapsed < 1.5


async def test_the_timeout_covers_all_redirects_together(open_fetcher: Opener, main: Site) -> None:
    # Each hop is quick; the trickle at the end must still end within one deadline.
    fetcher = await open_fetcher(timeout_s=0.5)
    started = time.monotonic()
    target = main.url("/redirect?to=" + quote("/trickle", safe=""))
    assert "took longer than 0.5 seconds" in await refusal(fetcher, target)
    assert time.monotonic() - started < 1.5


# -- answers that are not images ----------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "sentence"),
    [
        ("404", "That link could not be downloaded: the server answered 404 Not Found."),
        (
            "500",
            "That link could not be downloaded: the server answered 500 Internal Server Error.",
        ),
        ("599", "That link could not be downloaded: the server answered 599."),
    ],
)
async def test_error_statuses_are_refused_by_name(
    fetcher: LinkFetcher, main: Site, code: str, sentence: str
) -> None:
    assert await refusal(fetcher, main.url(f"/status/{code}")) == sentence


async def test_a_redirect_without_location_is_refused(fetcher: LinkFetcher, main: Site) -> None:
    assert await refusal(fetcher, main.url("/no-location")) == (
        "That link could not be downloaded: the server answered 302 Found."
    )


async def test_a_web_page_is_refused(fetcher: LinkFetcher, main: Site) -> None:
    assert (
        await refusal(fetcher, main.url("/page")) == "That link leads to a web page, not an image."
    )


async def test_other_types_are_refused_with_the_type(fetcher: LinkFetcher, main: Site) -> None:
    assert await refusal(fetcher, main.url("/data.json")) == (
        "That link leads to a file that is not an image (application/json)."
    )


# -- redirects ----------------------------------------------------------------------------


async def test_redirects_are_followed_up_to_the_limit(open_fetcher: Opener, main: Site) -> None:
    fetcher = await open_fetcher(max_redirects=3)
    image = await fetcher.fetch(main.url("/hop/3"), LIMIT)
    assert image.data == PNG
    assert image.url == main.url("/hop/0")
    assert image.name == "0"
    assert [hit.target for hit in main.hits] == ["/hop/3", "/hop/2", "/hop/1", "/hop/0"]


async def test_one_redirect_over_the_limit_is_refused(open_fetcher: Opener, main: Site) -> None:
    fetcher = await open_fetcher(max_redirects=3)
    assert await refusal(fetcher, main.url("/hop/4")) == (
        "That link redirects too many times (this bot follows at most 3)."
    )
    # The fourth redirect was never followed.
    assert [hit.target for hit in main.hits] == ["/hop/4", "/hop/3", "/hop/2", "/hop/1"]


async def test_no_redirects_at_all_when_the_limit_is_zero(open_fetcher: Opener, main: Site) -> None:
    fetcher = await open_fetcher(max_redirects=0)
    assert "at most 0" in await refusal(fetcher, main.url("/hop/1"))
    assert (await fetcher.fetch(main.url("/hop/0"), LIMIT)).data == PNG


@pytest.mark.parametrize("target", ["/loop", "/ping"])
async def test_redirect_loops_are_refused(open_fetcher: Opener, main: Site, target: str) -> None:
    fetcher = await open_fetcher(max_redirects=10)
    assert await refusal(fetcher, main.url(target)) == "That link redirects in a loop."
    assert len(main.hits) <= 2


async def test_relative_redirects_resolve_against_the_current_url(
    fetcher: LinkFetcher, main: Site
) -> None:
    image = await fetcher.fetch(main.url("/relative/start"), LIMIT)
    assert image.data == PNG
    assert image.url == main.url("/relative/cat.png")  # the fragment is dropped


async def test_a_redirect_to_a_refused_address_never_reaches_it(
    fetcher: LinkFetcher, main: Site, other: Site
) -> None:
    # Only 127.0.0.1 is allowed; 127.0.0.2 listens on the same port and would answer.
    target = main.url("/redirect?to=" + quote(other.url("/cat.png"), safe=""))
    assert await refusal(fetcher, target) == PRIVATE
    assert other.hits == []


@pytest.mark.parametrize(
    ("location", "sentence"),
    [
        ("http://169.254.169.254/latest/meta-data/", PRIVATE),
        ("http://[::1]/", PRIVATE),
        ("http://[::ffff:127.0.0.2]/", PRIVATE),
        ("http://metadata.google.internal/computeMetadata/v1/", PRIVATE),
        (
            "file:///etc/passwd",
            "That link redirects to an address that is not http:// or https://.",
        ),
        (
            "gopher://127.0.0.1/",
            "That link redirects to an address that is not http:// or https://.",
        ),
        (
            "http://user:secret@127.0.0.1/cat.png",
            "That link redirects to an address with a user name or password in it.",
        ),
        ("https:///cat.png", "That link redirects to an address without a host name."),
        ("http://[::1", "That link redirects to an address that is not valid."),
    ],
)
async def test_every_redirect_is_checked_like_the_first_link(
    open_fetcher: Opener, main: Site, location: str, sentence: str
) -> None:
    resolver = ScriptedResolver()
    fetcher = await open_fetcher(resolver)
    target = main.url("/redirect?to=" + quote(location, safe=""))
    assert await refusal(fetcher, target) == sentence
    assert resolver.lookups == []
    assert len(main.hits) == 1


# -- addresses refused without any connection ---------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/cat.png",
        "http://127.0.0.2:8080/cat.png",
        "https://10.1.2.3/",
        "http://172.16.5.4/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://100.64.0.1/",
        "http://0.0.0.0:8000/",
        "http://224.0.0.1/",
        "http://240.0.0.1/",
        "http://255.255.255.255/",
        "http://[::1]/",
        "http://[::]/",
        "http://[fe80::1]/",
        "http://[fe80::1%25eth0]/",
        "http://[fc00::1]/",
        "http://[fd00:ec2::254]/",
        "http://[fec0::1]/",
        "http://[ff02::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[::ffff:10.0.0.1]/",
        "http://[::7f00:1]/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://METADATA.Google.Internal./",
        "http://metadata.goog/",
    ],
)
async def test_private_and_local_addresses_are_refused(open_fetcher: Opener, url: str) -> None:
    resolver = ScriptedResolver()
    fetcher = await open_fetcher(resolver, allow_private=())
    assert await refusal(fetcher, url) == PRIVATE
    assert resolver.lookups == []


@pytest.mark.parametrize(
    "url", ["http://2130706433/", "http://0x7f.0.0.1/", "http://017700000001/", "http://127.1/"]
)
async def test_numeric_address_forms_are_refused(open_fetcher: Opener, url: str) -> None:
    resolver = ScriptedResolver()
    fetcher = await open_fetcher(resolver, allow_private=())
    assert await refusal(fetcher, url) == (
        "That link writes its address in an unusual numeric form, which this bot does not accept."
    )
    assert resolver.lookups == []


@pytest.mark.parametrize(
    ("url", "sentence"),
    [
        ("file:///etc/passwd", "Only http:// and https:// links can be fetched."),
        ("ftp://example.com/cat.png", "Only http:// and https:// links can be fetched."),
        ("data:image/png;base64,iVBORw0KGgo=", "Only http:// and https:// links can be fetched."),
        ("javascript:alert(1)", "Only http:// and https:// links can be fetched."),
        ("example.com/cat.png", "Only http:// and https:// links can be fetched."),
        ("//example.com/cat.png", "Only http:// and https:// links can be fetched."),
        ("", "Only http:// and https:// links can be fetched."),
        (
            "http://user:secret@example.com/cat.png",
            "Links with a user name or password in them are not accepted.",
        ),
        (
            "https://user@example.com/",
            "Links with a user name or password in them are not accepted.",
        ),
        (
            "https://:pw@example.com/",
            "Links with a user name or password in them are not accepted.",
        ),
        ("http:///cat.png", "That link has no host name."),
        ("http://", "That link has no host name."),
        ("http:cat.png", "That link has no host name."),
        ("http://[::1", "That is not a valid web address."),
        ("https://:443/cat.png", "That is not a valid web address."),
    ],
)
async def test_links_that_are_not_plain_web_addresses_are_refused(
    open_fetcher: Opener, url: str, sentence: str
) -> None:
    resolver = ScriptedResolver()
    fetcher = await open_fetcher(resolver)
    assert await refusal(fetcher, url) == sentence
    assert resolver.lookups == []


# -- names: checked on the addresses actually connected to --------------------------------


async def test_localhost_is_refused_unless_allowed(open_fetcher: Opener, main: Site) -> None:
    # The system resolver: localhost is 127.0.0.1 (and maybe ::1), both refused by default.
    link = f"http://localhost:{main.port}/cat.png"
    refused = await open_fetcher(allow_private=())
    message = await refusal(refused, link)
    assert message == PRIVATE
    assert "127.0.0.1" not in message
    assert main.hits == []

    by_name = await open_fetcher(allow_private=("LOCALHOST.",))
    assert (await by_name.fetch(link, LIMIT)).data == PNG
    by_address = await open_fetcher(allow_private=("127.0.0.1",))
    assert (await by_address.fetch(link, LIMIT)).data == PNG


async def test_only_allowed_answers_are_connected_to(
    open_fetcher: Opener, main: Site, other: Site
) -> None:
    resolver = ScriptedResolver(["127.0.0.2", "127.0.0.1"])
    fetcher = await open_fetcher(resolver)
    image = await fetcher.fetch(f"http://pics.test:{main.port}/cat.png", LIMIT)
    assert image.data == PNG
    assert other.hits == []
    assert main.hits[0].headers["host"] == f"pics.test:{main.port}"


async def test_a_name_with_only_refused_answers_is_refused(
    open_fetcher: Opener, other: Site
) -> None:
    resolver = ScriptedResolver(["127.0.0.2", "10.0.0.7", "169.254.169.254"])
    fetcher = await open_fetcher(resolver)
    message = await refusal(fetcher, f"http://pics.test:{other.port}/cat.png")
    assert message == PRIVATE
    assert other.hits == []


async def test_dns_rebinding_cannot_swap_the_checked_address(
    open_fetcher: Opener, main: Site, other: Site
) -> None:
    # The first answer is allowed, every later one is not: a fetcher that checked one
    # look-up and connected after another would reach 127.0.0.2.
    resolver = ScriptedResolver(["127.0.0.1"], ["127.0.0.2"])
    fetcher = await open_fetcher(resolver)
    image = await fetcher.fetch(f"http://rebind.test:{main.port}/cat.png", LIMIT)
    assert image.data == PNG
    assert resolver.lookups == ["rebind.test"]
    assert other.hits == []


async def test_names_resolve_to_mapped_addresses_judged_as_ipv4(open_fetcher: Opener) -> None:
    resolver = ScriptedResolver(["::ffff:127.0.0.1", "::ffff:169.254.169.254"])
    fetcher = await open_fetcher(resolver, allow_private=())
    assert await refusal(fetcher, "http://sneaky.test/") == PRIVATE


async def test_an_unknown_name_is_refused(open_fetcher: Opener) -> None:
    resolver = ScriptedResolver()
    fetcher = await open_fetcher(resolver)
    assert await refusal(fetcher, "http://nowhere.test/cat.png") == (
        "That link's host name could not be found."
    )
    assert resolver.lookups == ["nowhere.test"]


async def test_an_allow_listed_name_may_be_private(
    open_fetcher: Opener, main: Site, other: Site
) -> None:
    resolver = ScriptedResolver(["127.0.0.2"])
    fetcher = await open_fetcher(resolver, allow_private=("images.lan",))
    image = await fetcher.fetch(f"http://images.lan:{other.port}/cat.png", LIMIT)
    assert image.data == OTHER_PNG
    # The name is allowed, not its address: the same address as a literal stays refused.
    assert await refusal(fetcher, other.url("/cat.png")) == PRIVATE


async def test_an_allow_listed_network_covers_its_addresses(
    open_fetcher: Opener, other: Site
) -> None:
    fetcher = await open_fetcher(allow_private=("127.0.0.0/8",))
    assert (await fetcher.fetch(other.url("/cat.png"), LIMIT)).data == OTHER_PNG
    assert len(other.hits) == 1


@pytest.mark.skipif(not socket.has_ipv6, reason="needs IPv6 sockets")
async def test_mapped_addresses_are_judged_as_their_ipv4_address(
    open_fetcher: Opener, main: Site
) -> None:
    # ::ffff:127.0.0.1 is where a socket really connects: allowing 127.0.0.1 allows it.
    fetcher = await open_fetcher()
    image = await fetcher.fetch(f"http://[::ffff:127.0.0.1]:{main.port}/cat.png", LIMIT)
    assert image.data == PNG
    refused = await open_fetcher(allow_private=())
    assert await refusal(refused, f"http://[::ffff:127.0.0.1]:{main.port}/cat.png") == PRIVATE


async def test_a_closed_port_is_refused(open_fetcher: Opener) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fetcher = await open_fetcher()
    assert await refusal(fetcher, f"http://127.0.0.1:{port}/cat.png") == (
        "That link's server could not be reached."
    )


# -- lifecycle ----------------------------------------------------------------------------


async def test_the_fetcher_closes_with_its_context(main: Site) -> None:
    settings = LinkSettings(timeout_s=1.0, allow_private=("127.0.0.1",))
    async with LinkFetcher(settings) as fetcher:
        assert (await fetcher.fetch(main.url("/cat.png"), LIMIT)).data == PNG
    with pytest.raises(RuntimeError, match="closed"):
        await fetcher.fetch(main.url("/cat.png"), LIMIT)
    await fetcher.aclose()  # closing twice is harmless


async def test_closing_an_unused_fetcher_needs_no_session() -> None:
    fetcher = LinkFetcher(LinkSettings())
    await fetcher.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await fetcher.fetch("https://example.com/cat.png", LIMIT)
