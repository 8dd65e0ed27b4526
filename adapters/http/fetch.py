"""``core.ports.ImageFetcher`` on aiohttp: the image behind a link a user sent.

A link is untrusted input that makes the bot open connections, so every hop must pass the
same rules before anything is sent to it:

- http or https only, no user name or password, a host;
- the address connected to is public: not loopback, private (RFC 1918, fc00::/7),
  link-local (cloud metadata included), shared (100.64/10), unspecified, multicast or
  reserved, nor an IPv4-mapped IPv6 form of one; metadata host names are refused by name.
  ``LinkSettings.allow_private`` lifts this for the host names, addresses and networks it
  lists.

Invariants:

- Addresses are checked where they are used. aiohttp connects only to what its resolver
  returns, and ``_CheckedResolver`` returns only allowed addresses, so a second DNS answer
  (rebinding) can never slip in between check and connect. IP-literal hosts never reach a
  resolver, so ``_check_url`` checks those itself, on every hop.
- Redirects are followed here, not by aiohttp, so each hop meets ``_check_url``.
- ``LinkSettings.timeout_s`` bounds the whole fetch: look-ups, connecting, every redirect
  and the body, so a server that trickles bytes is cut at the deadline.
- At most ``max_bytes`` plus one chunk is ever held.
- Every refusal is ``InvalidRequest`` with one sentence for the user; it names nothing the
  user did not type (no resolved address, no exception text).
"""

from __future__ import annotations

import asyncio
import email.message
import logging
import re
import socket
from http import HTTPStatus
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import aiohttp
from aiohttp import hdrs
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from core.errors import InvalidRequest
from core.images import display_name
from core.ports import FetchedImage
from core.settings import LinkSettings

logger = logging.getLogger(__name__)

USER_AGENT = "Mozilla/5.0 (compatible; captionbot; fetches images users link to)"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_PAGE_TYPES = frozenset({"text/html", "application/xhtml+xml"})
# What servers call bytes they do not describe; aiohttp also reports a missing Content-Type
# as application/octet-stream. The bot checks whether such bytes are an image when decoding.
_UNTYPED = frozenset({"application/octet-stream", "binary/octet-stream"})
_TIDY_TYPE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,30}/[a-z0-9][a-z0-9.+-]{0,40}")
# Refused by name even when an allow-listed network covers their address: allowing a
# private network is meant for image hosts, not for the cloud's credentials endpoint.
_METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog"})

_PRIVATE = "That link leads to a private or local network address, which this bot does not fetch."

Address = IPv4Address | IPv6Address


class LinkFetcher:
    """Downloads images behind http(s) links through one aiohttp session for its life.

    Use ``async with LinkFetcher(settings) as fetcher:``, or call ``aclose()`` when done;
    the session opens on the first fetch. ``resolver`` looks host names up (aiohttp's
    threaded getaddrinfo by default) and is closed with the fetcher; its answers pass the
    address rules before aiohttp may connect to them.
    """

    def __init__(self, settings: LinkSettings, *, resolver: AbstractResolver | None = None) -> None:
        self._settings = settings
        self._policy = _Policy(settings.allow_private)
        self._inner_resolver = resolver
        self._resolver: _CheckedResolver | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def __aenter__(self) -> LinkFetcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session; later fetches raise ``RuntimeError``."""
        self._closed = True
        session, resolver = self._session, self._resolver
        self._session = self._resolver = None
        if session is not None:
            await session.close()
        if resolver is not None:
            await resolver.close()

    async def fetch(self, url: str, max_bytes: int) -> FetchedImage:
        """Download the file behind ``url``; ``InvalidRequest`` with one sentence if refused."""
        session = self._open_session()
        timeout_s = self._settings.timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await self._follow(session, url, max_bytes)
        except TimeoutError:
            # Before ClientError: aiohttp's own timeouts are both.
            raise InvalidRequest(
                f"Downloading that link took longer than {timeout_s:g} seconds."
            ) from None
        except aiohttp.ClientError as exc:
            logger.info("fetching a link failed: %r", exc)
            raise InvalidRequest(_client_error_sentence(exc)) from exc

    def _open_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("LinkFetcher is closed")
        if self._session is None:
            self._resolver = _CheckedResolver(
                self._inner_resolver or aiohttp.ThreadedResolver(), self._policy
            )
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=self._resolver),
                headers={
                    hdrs.USER_AGENT: USER_AGENT,
                    hdrs.ACCEPT: "image/*, */*;q=0.5",
                    hdrs.ACCEPT_ENCODING: "identity",
                },
                # A proxy would connect on the bot's behalf, past the address rules.
                trust_env=False,
                # One user's link must never see cookies another user's link set.
                cookie_jar=aiohttp.DummyCookieJar(),
                # The bytes counted against max_bytes are the bytes kept: a small gzip body
                # must not expand into a huge one.
                auto_decompress=False,
                # fetch() puts one deadline on everything, redirects included.
                timeout=aiohttp.ClientTimeout(),
            )
        return self._session

    async def _follow(
        self, session: aiohttp.ClientSession, raw_url: str, max_bytes: int
    ) -> FetchedImage:
        try:
            url = URL(raw_url).with_fragment(None)
        except ValueError:
            raise InvalidRequest("That is not a valid web address.") from None
        _check_url(url, self._policy, redirected=False)
        seen = {url}
        while True:
            async with session.get(url, allow_redirects=False) as response:
                location = response.headers.get(hdrs.LOCATION)
                if response.status not in _REDIRECTS or location is None:
                    return await _read_image(response, max_bytes)
            try:
                target = url.join(URL(location)).with_fragment(None)
            except ValueError:
                raise InvalidRequest(
                    "That link redirects to an address that is not valid."
                ) from None
            if target in seen:
                raise InvalidRequest("That link redirects in a loop.")
            if len(seen) > self._settings.max_redirects:
                raise InvalidRequest(
                    "That link redirects too many times "
                    f"(this bot follows at most {self._settings.max_redirects})."
                )
            _check_url(target, self._policy, redirected=True)
            seen.add(target)
            url = target


class _Policy:
    """Which host names and addresses links may reach."""

    def __init__(self, allow_private: tuple[str, ...]) -> None:
        self._networks: list[IPv4Network | IPv6Network] = []
        self._names: set[str] = set()
        for entry in allow_private:
            try:
                self._networks.append(ip_network(entry, strict=False))
            except ValueError:
                self._names.add(_normal_name(entry))

    def allows_name(self, host: str) -> bool:
        return _normal_name(host) in self._names

    def allows_address(self, address: Address) -> bool:
        # A socket connects ::ffff:a.b.c.d to the IPv4 address a.b.c.d: judge that one.
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address.version == net.version and address in net for net in self._networks):
            return True
        # is_global is False for loopback, private, link-local, shared and unspecified
        # addresses, but True for multicast, some reserved ranges (::/8 holds the
        # IPv4-compatible ::7f00:1) and the deprecated IPv6 site-local fec0::/10.
        site_local = isinstance(address, IPv6Address) and address.is_site_local
        return address.is_global and not (address.is_multicast or address.is_reserved or site_local)


class _CheckedResolver(AbstractResolver):
    """Looks names up with ``inner`` and gives aiohttp only the addresses links may reach."""

    def __init__(self, inner: AbstractResolver, policy: _Policy) -> None:
        self._inner = inner
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        if self._policy.allows_name(host):
            return answers
        allowed = [
            answer for answer in answers if self._policy.allows_address(ip_address(answer["host"]))
        ]
        if not allowed:
            # Not wrapped by aiohttp: only OSError from a resolver becomes a ClientError.
            raise InvalidRequest(_PRIVATE)
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _check_url(url: URL, policy: _Policy, *, redirected: bool) -> None:
    """Refuse a URL the bot must not request. A host name's addresses are checked when the
    resolver answers; an address written in the URL is checked here."""
    if url.scheme not in ("http", "https"):
        raise InvalidRequest(
            "That link redirects to an address that is not http:// or https://."
            if redirected
            else "Only http:// and https:// links can be fetched."
        )
    if url.user is not None or url.password is not None:
        raise InvalidRequest(
            "That link redirects to an address with a user name or password in it."
            if redirected
            else "Links with a user name or password in them are not accepted."
        )
    host, raw_host = url.host, url.raw_host
    if not host or not raw_host:
        raise InvalidRequest(
            "That link redirects to an address without a host name."
            if redirected
            else "That link has no host name."
        )
    try:
        address = ip_address(host)
    except ValueError:
        if _is_numeric_form(raw_host):
            # 2130706433, 0x7f.1, 017700000001: the socket library reads these as addresses
            # (127.0.0.1), which nobody writes on purpose in a link.
            raise InvalidRequest(
                "That link writes its address in an unusual numeric form, "
                "which this bot does not accept."
            ) from None
        if _normal_name(raw_host) in _METADATA_NAMES and not policy.allows_name(raw_host):
            raise InvalidRequest(_PRIVATE) from None
        return
    if not policy.allows_address(address):
        raise InvalidRequest(_PRIVATE)


async def _read_image(response: aiohttp.ClientResponse, max_bytes: int) -> FetchedImage:
    """The body of a final answer, refused early when its headers already disqualify it."""
    if not 200 <= response.status < 300:
        try:
            phrase = " " + HTTPStatus(response.status).phrase
        except ValueError:
            phrase = ""
        raise InvalidRequest(
            f"That link could not be downloaded: the server answered {response.status}{phrase}."
        )
    media_type = response.content_type
    if media_type in _PAGE_TYPES:
        raise InvalidRequest("That link leads to a web page, not an image.")
    if not (media_type.startswith("image/") or media_type in _UNTYPED):
        shown = f" ({media_type})" if _TIDY_TYPE.fullmatch(media_type) else ""
        raise InvalidRequest(f"That link leads to a file that is not an image{shown}.")
    too_big = f"That link's file is larger than the {_size(max_bytes)} this bot accepts."
    if response.content_length is not None and response.content_length > max_bytes:
        raise InvalidRequest(too_big)
    # Content-Length may be missing (chunked, or read until close) or lie, so count.
    body = bytearray()
    async for chunk in response.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise InvalidRequest(too_big)
    return FetchedImage(data=bytes(body), name=_file_name(response), url=str(response.url))


def _file_name(response: aiohttp.ClientResponse) -> str:
    disposition = response.headers.get(hdrs.CONTENT_DISPOSITION)
    if disposition:
        # The email parser reads RFC 2231 names (filename*=UTF-8''...) and, unlike aiohttp's
        # parser, never warns about malformed headers a server may send.
        message = email.message.Message()
        message[hdrs.CONTENT_DISPOSITION] = disposition
        name = message.get_filename()
        if name:
            return display_name(name)
    return display_name(response.url.name)


def _client_error_sentence(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "That link's host name could not be found."
    if isinstance(exc, aiohttp.ClientSSLError):
        return "That link's server failed the HTTPS security check."
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "That link's server could not be reached."
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "The download from that link broke off before it was complete."
    if isinstance(exc, aiohttp.InvalidURL):
        return "That is not a valid web address."
    return "That link's server did not answer properly."


def _is_numeric_form(host: str) -> bool:
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def _normal_name(host: str) -> str:
    return host.rstrip(".").lower()


def _size(n: int) -> str:
    for unit, scale in (("MB", 1024 * 1024), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"
