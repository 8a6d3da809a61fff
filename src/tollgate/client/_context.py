"""The current attribution (a ``contextvars`` variable) and the two ways to set it.

A :class:`track_context` sets values for a block of code; :func:`track` for every call of a
function. Both only change what :func:`current` returns; the HTTP hooks (``_httpx``) and
:func:`headers` turn that into request headers when a request is made.

Context variables give each thread its own value and each asyncio task a copy of the context
it was created in, so concurrent requests never see each other's user. A new
``threading.Thread`` starts with an empty context; ``asyncio.to_thread`` and
``contextvars.copy_context().run`` carry the current one along.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from tollgate.client._attribution import Attribution, InvalidAttribution

__all__ = ["configure", "current", "header_bytes", "headers", "track", "track_context"]

_EMPTY = Attribution()
_CURRENT: ContextVar[Attribution] = ContextVar("tollgate_attribution", default=_EMPTY)
_strict_user_ids = False

P = ParamSpec("P")
R = TypeVar("R")


def configure(*, strict_user_ids: bool) -> None:
    """Process-wide checks: ``strict_user_ids=True`` refuses user ids outside
    ``[A-Za-z0-9._:@-]``, as a server with ``strict_user_ids`` does (it answers 422
    ``invalid_user_id``). Applies to contexts created afterwards."""
    global _strict_user_ids
    _strict_user_ids = bool(strict_user_ids)


def current() -> Attribution:
    """The attribution in effect here (empty outside every context)."""
    return _CURRENT.get()


def headers() -> dict[str, str]:
    """The Tollgate request headers of the current context, for any HTTP client.

    Raises :class:`~tollgate.client.InvalidAttribution` when a value is not ASCII: clients
    encode text header values differently (``requests`` as Latin-1, ``httpx`` as ASCII), so
    such a value would not arrive as sent. Use :func:`header_bytes` for those.
    """
    out: dict[str, str] = {}
    for name, value in current().header_items():
        if not value.isascii():
            raise InvalidAttribution(
                f"{name} is not ASCII; send header_bytes() (UTF-8) with a client that takes "
                "bytes header values"
            )
        out[name] = value
    return out


def header_bytes() -> dict[str, bytes]:
    """The Tollgate request headers of the current context, values UTF-8 encoded (how the
    server reads them)."""
    return {name: value.encode() for name, value in current().header_items()}


class _Scope:
    """Sets ``values`` (inside whatever is current) from enter to exit, sync or async."""

    __slots__ = ("_token", "_values")

    def __init__(self, values: Attribution) -> None:
        self._values = values
        self._token: Token[Attribution] | None = None

    def __enter__(self) -> Attribution:
        if self._token is not None:
            raise RuntimeError("this track_context is already active; make a new one per block")
        merged = self._values.within(_CURRENT.get())
        self._token = _CURRENT.set(merged)
        return merged

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._token is not None, "exit without enter"
        _CURRENT.reset(self._token)
        self._token = None

    async def __aenter__(self) -> Attribution:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class track_context(_Scope):  # lower case: used like a function, as contextlib's are
    """Attribute the calls made inside the block: ``with track_context(user_id=uid): ...``
    (or ``async with``).

    Values are checked here, so a mistake raises :class:`~tollgate.client.InvalidAttribution`
    at this line. Contexts nest: a value set by the inner one wins, tags and limit ids add up.
    ``None`` (the default) leaves a value as the enclosing context has it. The object is
    returned as the merged :class:`~tollgate.client.Attribution` by ``as``.
    """

    __slots__ = ()

    def __init__(
        self,
        *,
        user_id: str | None = None,
        tags: str | Iterable[str] | None = None,
        limit_ids: str | Iterable[str] | None = None,
        use_case_name: str | None = None,
        use_case_version: str | int | None = None,
        use_case_id: str | None = None,
        logging_disable: bool | None = None,
        base_uri: str | None = None,
    ) -> None:
        super().__init__(
            Attribution.checked(
                strict_user_ids=_strict_user_ids,
                user_id=user_id,
                tags=tags,
                limit_ids=limit_ids,
                use_case_id=use_case_id,
                use_case_name=use_case_name,
                use_case_version=use_case_version,
                logging_disable=logging_disable,
                base_uri=base_uri,
            )
        )


async def _in_scope(values: Attribution, awaitable: Awaitable[R]) -> R:
    with _Scope(values):
        return await awaitable


def track(
    function: object = None,
    /,
    *,
    user_id: str | None = None,
    tags: str | Iterable[str] | None = None,
    limit_ids: str | Iterable[str] | None = None,
    use_case_name: str | None = None,
    use_case_version: str | int | None = None,
    use_case_id: str | None = None,
    logging_disable: bool | None = None,
    base_uri: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Attribute every call of the decorated function (sync or ``async def``) with static
    values: ``@track(user_id="nightly-report")``.

    The arguments are evaluated once, when the ``def`` runs (usually at import): write
    ``@track(user_id=current_user())`` and every call is attributed to whoever
    ``current_user()`` returned then. For values known only per call, use
    :class:`track_context` inside the function. Generator functions are refused: their body
    runs between the caller's statements, where a context cannot follow it.
    """
    if function is not None:
        raise TypeError("@track needs its values: write @track(user_id=...), with parentheses")
    values = Attribution.checked(
        strict_user_ids=_strict_user_ids,
        user_id=user_id,
        tags=tags,
        limit_ids=limit_ids,
        use_case_id=use_case_id,
        use_case_name=use_case_name,
        use_case_version=use_case_version,
        logging_disable=logging_disable,
        base_uri=base_uri,
    )

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        if not callable(function):
            raise TypeError(f"@track(...) decorates a function, not {type(function).__name__}")
        if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
            raise TypeError(
                f"@track cannot follow the generator {function.__qualname__} between its "
                "yields; use `with track_context(...)` inside it"
            )
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with _Scope(values):
                    return await function(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(function)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with _Scope(values):
                result = function(*args, **kwargs)
            if inspect.iscoroutine(result):
                # An async callable that is no ``async def`` (an object with an async
                # ``__call__``, a function returning a coroutine): its body runs when awaited,
                # after the scope above has closed, so it gets a scope of its own then.
                return _in_scope(values, result)  # type: ignore[return-value]
            return result

        return run

    return decorate
