"""Talking to Envoy's admin interface: drain it before it stops.

``POST /drain_listeners?graceful`` makes Envoy tell clients to go away (``Connection: close``
on HTTP/1.1, GOAWAY on HTTP/2) and close its listeners after ``--drain-time-s``, while the
requests already in flight go on to their end (checked: a 5 s stream survives a 1 s drain).
:func:`drain_envoy` then waits until Envoy's active downstream requests reach zero. `tollgate
up` does this before it stops its own Envoy; in Kubernetes it is the gateway's preStop hook
(`tollgate envoy-drain`).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Callable

__all__ = ["active_requests", "drain_envoy", "start_drain", "wait_until_idle"]

log = logging.getLogger(__name__)

# The HTTP connection manager's stat_prefix in every rendered bootstrap.
_ACTIVE_STAT = "http.tollgate.downstream_rq_active"


def _url(admin_address: str, path: str) -> str:
    base = admin_address if admin_address.startswith("http") else f"http://{admin_address}"
    return base.rstrip("/") + path


def start_drain(admin_address: str, timeout_s: float = 5.0) -> None:
    """Ask Envoy to drain its listeners gracefully (returns at once)."""
    request = urllib.request.Request(  # noqa: S310 (an http URL built here)
        _url(admin_address, "/drain_listeners?graceful"), method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
        response.read()


def active_requests(admin_address: str, timeout_s: float = 5.0) -> int:
    """Envoy's downstream requests in flight on Tollgate's listener."""
    url = _url(admin_address, f"/stats?format=json&filter=^{_ACTIVE_STAT}$")
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
        stats = json.loads(response.read())
    for stat in stats.get("stats", []):
        if stat.get("name") == _ACTIVE_STAT:
            return int(stat.get("value", 0))
    return 0


def wait_until_idle(
    admin_address: str,
    timeout_s: float,
    poll_s: float = 0.1,
    also_busy: Callable[[], bool] = lambda: False,
) -> int:
    """Wait up to ``timeout_s`` until Envoy has no active downstream request (and
    ``also_busy`` says nothing else is in flight); return how many Envoy still had at the
    end (0: idle). An Envoy that is gone counts as idle."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            active = active_requests(admin_address)
        except OSError:
            active = 0
        if (active == 0 and not also_busy()) or time.monotonic() >= deadline:
            return active
        time.sleep(poll_s)


def drain_envoy(admin_address: str, timeout_s: float, poll_s: float = 0.1) -> int:
    """Drain Envoy and wait up to ``timeout_s`` for its requests to end; return how many
    were still active at the end (0: drained). An Envoy that is gone counts as drained."""
    try:
        start_drain(admin_address)
    except OSError as exc:
        log.warning("envoy at %s did not take the drain request: %s", admin_address, exc)
        return 0
    return wait_until_idle(admin_address, timeout_s, poll_s)
