"""The headers by which Tollgate tells Envoy where to send a request.

Tollgate sets both on every request it lets through (overwriting anything a client sent);
Envoy's route reads them (dynamic forward proxy ``host_rewrite_header`` and a route match on
the scheme) and removes them before the upstream. A request without them is never forwarded.
"""

from __future__ import annotations

__all__ = ["UPSTREAM_HOST_HEADER", "UPSTREAM_SCHEME_HEADER"]

# "host:port" of the upstream (IPv6 literals in brackets).
UPSTREAM_HOST_HEADER = "x-tollgate-upstream-host"
# "https" (TLS, verified) or "http" (plaintext, only for allow-listed http:// base URIs).
UPSTREAM_SCHEME_HEADER = "x-tollgate-upstream-scheme"
