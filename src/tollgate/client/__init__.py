"""Attribution from app code: set the end user (and tags, limits, use case) for a block of code
or a function, and have the openai and anthropic SDKs send it to Tollgate as headers.

    from tollgate.client import instrument, track_context

    client = instrument(openai.OpenAI(base_url="http://envoy:10000/v1"))
    with track_context(user_id=session["user_id"], tags=["chat"]):
        client.chat.completions.create(...)   # sent with x-tollgate-user-id, x-tollgate-tags

A thin layer over Tollgate's request headers (docs/client.md): nothing else changes for the
mesh, and any HTTP client can send :func:`headers` itself. Standard library only, so an app
can install it without the server (the ``tollgate-client`` distribution, ADR 014).

Errors: :class:`InvalidAttribution` (a :class:`ValueError`) for a value Tollgate would refuse
or alter, :class:`TypeError` for a value of the wrong type.
"""

from tollgate.client._attribution import Attribution, InvalidAttribution
from tollgate.client._context import (
    configure,
    current,
    header_bytes,
    headers,
    track,
    track_context,
)
from tollgate.client._httpx import (
    add_headers,
    add_headers_async,
    async_http_client,
    http_client,
    instrument,
)

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "InvalidAttribution",
    "add_headers",
    "add_headers_async",
    "async_http_client",
    "configure",
    "current",
    "header_bytes",
    "headers",
    "http_client",
    "instrument",
    "track",
    "track_context",
]
