"""Images behind http(s) links: ``core.ports.ImageFetcher`` on aiohttp."""

from adapters.http.fetch import LinkFetcher

__all__ = ["LinkFetcher"]
