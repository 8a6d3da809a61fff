"""The current attribution on every request of an httpx client: the openai and anthropic SDKs.

Both official SDKs send through an httpx client (``httpx``, or its successor ``httpx2`` in
recent releases; the two have the same API). A request event hook runs in the task or thread
that makes the call, just before the request goes out, so it sees that caller's context: one
instrumented client can serve every user of the process. Headers the call sets itself
(``extra_headers=…``, ``default_headers=…``) are left as they are.

Nothing here imports httpx: the objects are used through their public API only.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any, TypeVar

from tollgate.client._context import current

__all__ = ["add_headers", "add_headers_async", "async_http_client", "http_client", "instrument"]

C = TypeVar("C")


def add_headers(request: Any) -> None:
    """httpx request hook: add the current context's headers the request does not have."""
    items = current().header_items()
    if not items:
        return
    present = request.headers
    extra = [(name.encode(), value.encode()) for name, value in items if name not in present]
    if extra:
        # A new Headers from raw bytes: setting one value at a time would encode it as ASCII
        # (or whatever the existing values decoded as), and a UTF-8 user id would not survive.
        request.headers = type(present)([*present.raw, *extra])


async def add_headers_async(request: Any) -> None:
    """The same hook for ``AsyncClient`` (httpx awaits its hooks there)."""
    add_headers(request)


def _is_httpx_client(obj: object) -> bool:
    hooks = getattr(obj, "event_hooks", None)
    return isinstance(hooks, dict) and "request" in hooks and callable(getattr(obj, "send", None))


def instrument(client: C) -> C:
    """Make ``client`` send the current context's headers with every request; returns it.

    ``client`` is an ``openai`` or ``anthropic`` SDK client (``OpenAI``, ``AsyncOpenAI``,
    ``AzureOpenAI``, ``Anthropic``, ``AsyncAnthropic``, ``AnthropicVertex``,
    ``AnthropicBedrock``…) or an httpx ``Client``/``AsyncClient``. Instrumenting twice changes
    nothing. Copies made with the SDK's ``with_options`` share the instrumented transport.
    """
    target: Any = client if _is_httpx_client(client) else getattr(client, "_client", None)
    if not _is_httpx_client(target):
        raise TypeError(
            "instrument() takes an openai or anthropic SDK client or an httpx client, not "
            f"{type(client).__module__}.{type(client).__qualname__}; for other HTTP clients "
            "send tollgate.client.headers() with each request"
        )
    hook = add_headers_async if inspect.iscoroutinefunction(target.send) else add_headers
    hooks = target.event_hooks
    if hook not in hooks["request"]:
        target.event_hooks = {**hooks, "request": [*hooks["request"], hook]}
    return client


def _httpx_module() -> Any:
    """The httpx the process already uses (the SDK imported it), else the one installed."""
    for name in ("httpx2", "httpx"):
        if name in sys.modules:
            return sys.modules[name]
    for name in ("httpx2", "httpx"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(
        "http_client() needs httpx or httpx2 (the openai and anthropic SDKs install one); "
        "or pass the client class to build"
    )


def http_client(client_class: Any = None, /, **kwargs: Any) -> Any:
    """A new instrumented httpx ``Client`` for ``OpenAI(http_client=…)`` or
    ``Anthropic(http_client=…)``. Pass the SDK's own class to keep its defaults
    (``http_client(openai.DefaultHttpxClient)``); ``kwargs`` go to the constructor."""
    cls = client_class if client_class is not None else _httpx_module().Client
    return instrument(cls(**kwargs))


def async_http_client(client_class: Any = None, /, **kwargs: Any) -> Any:
    """:func:`http_client` for the async SDK clients (an httpx ``AsyncClient``)."""
    cls = client_class if client_class is not None else _httpx_module().AsyncClient
    return instrument(cls(**kwargs))
