"""Route selection: which provider and which base URI a request goes to, and at what path.

In order of precedence:

1. the base-URI header (``x-tollgate-base-uri``, alias ``xproxy-provider-baseuri``): a
   provider's own base URI (with its credentials) or an allow-listed one (no credentials are
   ever sent there); anything else is refused with 403 ``base_uri_not_allowed``;
2. a model prefix in the body (``"openai/gpt-4o"`` → provider ``openai``, model ``gpt-4o``),
   when the prefix names a configured provider;
3. the API path (``/v1/messages`` → Anthropic, ``/openai/deployments/…`` → Azure, Gemini's
   ``/v1beta/…``, Vertex AI's ``/v1/projects/…`` at the location's regional host, Bedrock's
   ``/model/…``): a path of such a family goes only to a provider of that family, or is
   refused (``provider_not_configured``, ``provider_mismatch``);
4. the default provider.

A request path that could leave a base URI's path prefix (dot segments, encoded dots or
slashes, backslashes, control characters) is refused with 400 ``invalid_path`` first.
"""

from __future__ import annotations

import re
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

__all__ = [
    "VERTEX_GLOBAL_HOST",
    "Route",
    "Router",
    "api_for_path",
    "vertex_host",
    "vertex_location",
]


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


# Vertex AI: /v1/projects/{project}/locations/{location}/…, also v1beta1, and express mode's
# /v1/publishers/… (an API key instead of a project).
_VERTEX_PATH = re.compile(r"/v1(?:beta1)?/(?:projects|publishers)/")
_VERTEX_EXPRESS = re.compile(r"/v1(?:beta1)?/publishers/")
# …/locations/{location}, then "/…", the end, or a location-level method at the end
# (locations/us-central1:evaluateInstances): "locations/user:pass@evil/…" names none.
_VERTEX_LOCATION = re.compile(
    r"/v1(?:beta1)?/projects/[^/]+/locations/([^/:]*)(?:/|:[A-Za-z]+\Z|\Z)"
)
# A location is one DNS label of lower-case letters and digits, hyphens between them
# (us-central1, europe-west4, us, global): it becomes part of the upstream host name.
_LOCATION = re.compile(r"[a-z](?:[a-z0-9]|-(?=[a-z0-9])){0,61}[a-z0-9]?")
# Bedrock Runtime's namespaces: /model/{id}/… (Converse, InvokeModel and their streams, and
# any other action), async invocations, guardrails.
_BEDROCK_PATH = re.compile(r"/(?:model/|async-invoke(?:/|$)|guardrail/)")
VERTEX_GLOBAL_HOST = "aiplatform.googleapis.com"
_MULTI_REGIONS = frozenset({"us", "eu"})


def api_for_path(path: str) -> str | None:
    """The API family a request path belongs to, when the path alone says so.

    A path of a family is only ever sent to a provider of that family (``Router.route``):
    these are paths no other provider answers, and whose credentials (an Azure ``api-key``,
    a Google OAuth token, an AWS signature) belong to that family alone. Any other path
    (OpenAI's and every compatible server's) goes to the default provider.
    """
    endpoint = path.split("?", 1)[0]
    if endpoint.startswith(("/v1/messages", "/v1/complete")):
        return "anthropic"
    if endpoint.startswith("/openai/deployments/"):
        return "azure"
    if _BEDROCK_PATH.match(endpoint):
        return "bedrock"
    if _VERTEX_PATH.match(endpoint):
        return "vertex"
    if endpoint.startswith(("/v1beta/", "/upload/v1beta/")) or (
        endpoint.startswith("/v1/models/") and ":" in endpoint
    ):
        return "gemini"
    return None


def vertex_location(path: str) -> str | None:
    """The location a Vertex AI path names (``us-central1``, ``global``), when it names one
    that is a valid host-name label; None otherwise (also for express-mode paths)."""
    found = _VERTEX_LOCATION.match(path.split("?", 1)[0])
    if found is None or not _LOCATION.fullmatch(found[1]):
        return None
    return found[1]


def vertex_host(location: str) -> str:
    """The Vertex AI host of ``location``: ``global`` has no region prefix, the multi-regions
    ``us`` and ``eu`` have their own (``aiplatform.us.rep.googleapis.com``), as Google's SDKs
    use them."""
    if location == "global":
        return VERTEX_GLOBAL_HOST
    if location in _MULTI_REGIONS:
        return f"aiplatform.{location}.rep.googleapis.com"
    return f"{location}-{VERTEX_GLOBAL_HOST}"


def _check_path(request_path: str) -> None:
    """Refuse (400 ``invalid_path``) a path that could leave a base URI's prefix.

    Envoy normalises paths first (the rendered listener resolves dot segments, merges
    slashes and refuses encoded slashes); this check holds behind any other Envoy too.
    """
    try:
        check_request_path(request_path)
    except InvalidRequestPath as exc:
        raise PolicyRefusal(400, "invalid_path", f"Invalid request path: {exc}.") from None


def _covers(provider: Provider, requested: BaseUri) -> bool:
    """Whether ``requested`` is one of ``provider``'s own base URIs (a regional Vertex AI
    provider owns every regional host)."""
    base = provider.base
    if provider.regional and (requested.scheme, requested.port, requested.path) == (
        "https",
        443,
        "",
    ):
        host = requested.host
        if host == VERTEX_GLOBAL_HOST or host in {vertex_host(m) for m in _MULTI_REGIONS}:
            return True
        region = host.removesuffix("-" + VERTEX_GLOBAL_HOST)
        return region != host and _LOCATION.fullmatch(region) is not None
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

    def start_credentials(self) -> None:
        """Get the first access tokens and start keeping them fresh (blocking: run it in a
        thread). Providers without minted credentials need nothing."""
        for provider in self._providers.values():
            if provider.tokens is not None:
                provider.tokens.start()

    def stop_credentials(self) -> None:
        for provider in self._providers.values():
            for holder in (provider.tokens, provider.signer):
                if holder is not None:
                    holder.stop()

    @classmethod
    def single(
        cls, name: str, base_uri: str, *, api: str = "openai", model_prefix_routing: bool = True
    ) -> Router:
        """A router with one provider and no credentials (tests, simple set-ups)."""
        provider = Provider(name=name, base=parse_base_uri(base_uri), api=api, auth="none")
        return cls({name: provider}, name, model_prefix_routing=model_prefix_routing)

    def route(self, request_path: str, base_uri_header: str | None = None) -> Route:
        """The route from the request's path and base-URI header (the body may refine it).

        A path of a known API family (:func:`api_for_path`) goes to a provider of that family
        or is refused: 400 ``provider_not_configured`` when there is none, 400
        ``provider_mismatch`` when the base-URI header names another family's provider.
        """
        _check_path(request_path)
        family = api_for_path(request_path)
        if family is None:
            by_path = self._default
        else:
            found = self._by_api.get(family)
            if found is None:
                raise PolicyRefusal.provider_not_configured(family)
            by_path = found
        if base_uri_header is None:
            return self._to(by_path, request_path)
        owned = self._owner(base_uri_header)
        if owned is not None:
            owner, requested = owned
            if family is not None and owner.api != family:
                raise PolicyRefusal.provider_mismatch(family, owner.name)
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
        family = api_for_path(request_path)
        if family is not None and provider.api != family:
            raise PolicyRefusal.provider_mismatch(family, provider.name)
        return self._to(provider, request_path), bare

    def _owner(self, base_uri_header: str) -> tuple[Provider, BaseUri] | None:
        """The provider whose own base URI covers the requested one, and the requested one."""
        try:
            requested = parse_base_uri(base_uri_header)
        except ValueError:
            return None
        for provider in self._providers.values():
            if _covers(provider, requested):
                return provider, requested
        return None

    @staticmethod
    def _to(provider: Provider, request_path: str) -> Route:
        base = provider.base
        if provider.regional:
            # Vertex AI has no single endpoint: the host is the path's location's.
            location = vertex_location(request_path)
            if location is None and _VERTEX_EXPRESS.match(request_path):
                location = "global"  # express mode (an API key, no project): one host
            if location is None:
                raise PolicyRefusal(
                    400,
                    "invalid_path",
                    "Invalid request path: a Vertex AI path must name its location "
                    "(/v1/projects/PROJECT/locations/LOCATION/...) as a host-name label such "
                    "as us-central1 or global.",
                )
            base = replace(base, host=vertex_host(location))
        return Route(provider.name, provider.api, base, "", provider).with_path(request_path)
