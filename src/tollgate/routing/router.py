"""Route selection: which provider and which base URI a request goes to, and at what path.

In order of precedence:

1. the base-URI header (``x-tollgate-base-uri``, alias ``xproxy-provider-baseuri``): a
   provider's own base URI (with its credentials) or an allow-listed one (no credentials are
   ever sent there); anything else is refused with 403 ``base_uri_not_allowed``;
2. a model prefix in the body (``"openai/gpt-4o"`` → provider ``openai``, model ``gpt-4o``),
   when the prefix names a configured provider;
3. the API path (``/v1/messages`` → Anthropic, ``/openai/deployments/…`` → Azure, Gemini's
   ``/v1beta/…``);
4. the default provider.

A request path that could leave a base URI's path prefix (dot segments, encoded dots or
slashes, backslashes, control characters) is refused with 400 ``invalid_path`` first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from tollgate.policy.refusal import PolicyRefusal
from tollgate.routing.allowlist import (
    BaseUri,
    BaseUriAllowList,
    InvalidRequestPath,
    check_request_path,
    parse_base_uri,
)
from tollgate.routing.providers import Provider

__all__ = ["Route", "Router", "api_for_path"]


@dataclass(frozen=True)
class Route:
    """Where one request goes."""

    provider: str  # recorded in the ledger and used for pricing
    api: str  # request/usage format: openai, anthropic, gemini or azure
    base: BaseUri
    path: str  # the upstream :path (base path prefix + request path, query kept)
    credentials: Provider | None  # whose key may be injected; None for a custom base URI

    @property
    def base_uri(self) -> str:
        return str(self.base)

    def with_path(self, request_path: str) -> Route:
        return replace(self, path=self.base.join(request_path))


def api_for_path(path: str) -> str | None:
    """The API family a request path belongs to, when the path alone says so."""
    endpoint = path.split("?", 1)[0]
    if endpoint.startswith(("/v1/messages", "/v1/complete")):
        return "anthropic"
    if endpoint.startswith("/openai/deployments/"):
        return "azure"
    if endpoint.startswith("/model/") and endpoint.endswith(("/converse", "/converse-stream")):
        return "bedrock"
    if endpoint.startswith(("/v1beta/", "/upload/v1beta/")) or (
        endpoint.startswith("/v1/models/") and ":" in endpoint
    ):
        return "gemini"
    return None


def _check_path(request_path: str) -> None:
    """Refuse (400 ``invalid_path``) a path that could leave a base URI's prefix.

    Envoy normalises paths first (the rendered listener resolves dot segments, merges
    slashes and refuses encoded slashes); this check holds behind any other Envoy too.
    """
    try:
        check_request_path(request_path)
    except InvalidRequestPath as exc:
        raise PolicyRefusal(400, "invalid_path", f"Invalid request path: {exc}.") from None


def _covers(base: BaseUri, requested: BaseUri) -> bool:
    return (base.scheme, base.host, base.port) == (
        requested.scheme,
        requested.host,
        requested.port,
    ) and (requested.path == base.path or requested.path.startswith(base.path + "/"))


class Router:
    """Picks a :class:`Route` per request from the providers and the allow-list."""

    def __init__(
        self,
        providers: Mapping[str, Provider],
        default: str,
        allow_list: BaseUriAllowList | Iterable[str] = (),
        *,
        model_prefix_routing: bool = True,
    ) -> None:
        self._providers = dict(providers)
        self._default = self._providers[default]
        self._allow = (
            allow_list if isinstance(allow_list, BaseUriAllowList) else BaseUriAllowList(allow_list)
        )
        self.model_prefix_routing = model_prefix_routing
        by_api: dict[str, Provider] = {}
        for provider in self._providers.values():
            # A provider named after its API wins; otherwise the first one configured.
            if provider.name == provider.api or provider.api not in by_api:
                by_api[provider.api] = provider
        self._by_api = by_api

    @classmethod
    def single(
        cls, name: str, base_uri: str, *, api: str = "openai", model_prefix_routing: bool = True
    ) -> Router:
        """A router with one provider and no credentials (tests, simple set-ups)."""
        provider = Provider(name=name, base=parse_base_uri(base_uri), api=api, auth="none")
        return cls({name: provider}, name, model_prefix_routing=model_prefix_routing)

    def route(self, request_path: str, base_uri_header: str | None = None) -> Route:
        """The route from the request's path and base-URI header (the body may refine it)."""
        _check_path(request_path)
        by_path = self._by_api.get(api_for_path(request_path) or "", self._default)
        if base_uri_header is None:
            return self._to(by_path, request_path)
        owned = self._owner(base_uri_header)
        if owned is not None:
            owner, requested = owned
            return Route(owner.name, owner.api, requested, "", owner).with_path(request_path)
        allowed = self._allow.match(base_uri_header)
        if allowed is None:
            raise PolicyRefusal.base_uri_not_allowed()
        return Route(by_path.name, by_path.api, allowed, "", None).with_path(request_path)

    def for_model(self, request_path: str, model: str) -> tuple[Route, str] | None:
        """``(route, model without prefix)`` when ``model`` starts with a provider's name."""
        if not self.model_prefix_routing or "/" not in model:
            return None
        _check_path(request_path)
        prefix, _, bare = model.partition("/")
        provider = self._providers.get(prefix.lower())
        if provider is None or not bare:
            return None
        return self._to(provider, request_path), bare

    def _owner(self, base_uri_header: str) -> tuple[Provider, BaseUri] | None:
        """The provider whose own base URI covers the requested one, and the requested one."""
        try:
            requested = parse_base_uri(base_uri_header)
        except ValueError:
            return None
        for provider in self._providers.values():
            if _covers(provider.base, requested):
                return provider, requested
        return None

    @staticmethod
    def _to(provider: Provider, request_path: str) -> Route:
        return Route(provider.name, provider.api, provider.base, "", provider).with_path(
            request_path
        )
