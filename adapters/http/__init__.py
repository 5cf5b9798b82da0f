"""HTTP adapter: publish with POST, subscribe with Server-Sent Events."""

from adapters.http.adapter import HTTPAdapter

__all__ = ["HTTPAdapter"]
