"""The web adapter (aiohttp): a local playground page and a JSON API over the service."""

from adapters.web.app import create_app, serve

__all__ = ["create_app", "serve"]
