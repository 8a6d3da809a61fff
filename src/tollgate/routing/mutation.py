"""The request-header edits that send a request where its route says (no I/O, no state).

Envoy's forward proxy reads the upstream host and scheme from two headers only Tollgate may
set (``envoy_headers``); the path is rewritten under the route's base URI; credentials are
injected or passed through as the gateway key's mode says; forwarded headers go last.
"""

from __future__ import annotations

from tollgate.policy.attribution import RequestAttribution
from tollgate.policy.keys import GatewayKey
from tollgate.policy.refusal import PolicyRefusal
from tollgate.routing.envoy_headers import UPSTREAM_HOST_HEADER, UPSTREAM_SCHEME_HEADER
from tollgate.routing.providers import CLIENT_AUTH_HEADERS
from tollgate.routing.router import Route

__all__ = ["route_mutation", "signing_headers"]

# What a SigV4 signature consists of besides authorization (the app's are replaced).
_AWS_SIGNATURE_HEADERS = frozenset({"x-amz-date", "x-amz-security-token", "x-amz-content-sha256"})


def route_mutation(
    route: Route,
    *,
    path: str,
    headers: dict[str, bytes],
    key: GatewayKey | None,
    attribution: RequestAttribution,
    body_decoded: bool,
) -> tuple[list[str], list[tuple[str, bytes]]]:
    """Headers to remove and set for ``route``; raises :class:`PolicyRefusal` when the key
    injects credentials its provider has none of.

    ``headers`` are the client's (lower-case names), ``path`` its ``:path``; ``body_decoded``
    says the body is sent on uncompressed (so its ``content-encoding`` goes).
    """
    remove: list[str] = []
    set_headers: list[tuple[str, bytes]] = [
        (UPSTREAM_HOST_HEADER, route.base.authority.encode()),
        (UPSTREAM_SCHEME_HEADER, route.base.scheme.encode()),
    ]
    if route.path != path:
        set_headers.append((":path", route.path.encode()))
    if body_decoded:
        remove.append("content-encoding")
    provider = route.credentials
    if key is not None and key.inject_credentials:
        credential = provider.credential_header() if provider is not None else None
        signs = provider is not None and provider.signer is not None
        if provider is not None and provider.needs_credential and credential is None and not signs:
            raise PolicyRefusal.provider_credentials_missing(provider.name)
        if signs:
            # The app's own signature headers go with its authorization (see signing_headers).
            remove += [name for name in headers if name in _AWS_SIGNATURE_HEADERS]
        if credential is not None:
            set_headers.append(credential)
        # The app's own credentials never travel with an injected one (or to a custom
        # base URI); the gateway key itself was stripped with the attribution headers.
        remove += [
            name
            for name in CLIENT_AUTH_HEADERS
            if name in headers
            and name not in attribution.strip
            and (credential is None or name != credential[0])
        ]
        # Look-alikes of credential names (x_api_key) too: many servers read "_" as "-".
        remove += [
            name
            for name in headers
            if "_" in name and name.replace("_", "-") in CLIENT_AUTH_HEADERS
        ]
    # Forwarded headers go now that the route is settled: never one its provider's
    # headers set (the credential headers were refused when they were read).
    own = {name for name, _ in provider.headers} if provider is not None else set()
    set_headers += [(name, value) for name, value in attribution.forwards if name not in own]
    if provider is not None:
        set_headers += [
            (name, value.encode()) for name, value in provider.headers if name not in headers
        ]
    return remove, set_headers


def signing_headers(
    route: Route, *, method: str, content_type: bytes | None, body: bytes
) -> list[tuple[str, bytes]]:
    """The SigV4 headers that sign ``body`` for ``route``'s upstream with the credentials its
    provider holds (``route.credentials.signer``). The signature covers ``host`` as Envoy sends
    it (``host:port``) and the content type, both sent unchanged."""
    provider = route.credentials
    assert provider is not None
    assert provider.signer is not None
    covered = [("host", route.base.authority)]
    if content_type is not None:
        covered.append(("content-type", content_type.decode("latin-1")))
    url = f"{route.base.scheme}://{route.base.authority}{route.path}"
    return [
        (name, value.encode()) for name, value in provider.signer.sign(method, url, covered, body)
    ]
