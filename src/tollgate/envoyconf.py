"""Renders Envoy's bootstrap for Tollgate from settings, with envoy-data-plane's typed config.

One listener with the ext_proc filter (fail closed) in front of Envoy's dynamic forward proxy
and the router; a cluster for Tollgate's gRPC server and two dynamic forward proxy clusters
for the upstreams: ``upstream_https`` (certificate verified, SNI and SAN check follow the
request's host) and ``upstream_http`` (plaintext). Tollgate picks the upstream per request: it
sets :data:`UPSTREAM_HOST_HEADER` ("host:port") and :data:`UPSTREAM_SCHEME_HEADER`, the routes
match on them, the forward proxy resolves that host and rewrites ``Host`` to it, and the route
removes both headers before the upstream. Envoy strips client-sent copies of both before
routing and before any filter, and a request Tollgate did not route gets a 502 ``not_routed``:
no request is ever sent to a host taken from client input.

With ``jwt_issuer`` set, Envoy's ``jwt_authn`` filter runs before ext_proc: it verifies an
end-user JWT if one is sent (a bad one gets Envoy's own 401, or 403 for a wrong audience),
removes it from the request and hands the verified payload to ext_proc as metadata
(:data:`JWT_METADATA_NAMESPACE`, key :data:`JWT_PAYLOAD_KEY`). Targets differ only in where
things are: ``local`` (everything on 127.0.0.1, as `tollgate up` runs it), ``compose``
(Tollgate reachable as the ``tollgate`` service) and ``kubernetes`` (Tollgate as a sidecar on
127.0.0.1 of the pod). These classes are for building configuration only: they never touch
the request path.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import betterproto2
import yaml
from envoy_data_plane.envoy.config.accesslog.v3 import AccessLogFilter, ExtensionFilter
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterCustomClusterType,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterLbPolicy,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import (
    HeaderMutation as HeaderMutationRule,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    HttpUri,
    Pipe,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
    TypedExtensionConfig,
    UpstreamHttpProtocolOptions,
)
from envoy_data_plane.envoy.config.core.v3 import HttpProtocolOptions as CommonHttpProtocolOptions
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.access_loggers.filters.cel.v3 import ExpressionFilter
from envoy_data_plane.envoy.extensions.clusters.dynamic_forward_proxy.v3 import (
    ClusterConfig as ForwardProxyClusterConfig,
)
from envoy_data_plane.envoy.extensions.common.dynamic_forward_proxy.v3 import DnsCacheConfig
from envoy_data_plane.envoy.extensions.common.matching.v3 import ExtensionWithMatcher
from envoy_data_plane.envoy.extensions.filters.common.matcher.action.v3 import SkipFilter
from envoy_data_plane.envoy.extensions.filters.http.dynamic_forward_proxy.v3 import (
    FilterConfig as ForwardProxyFilterConfig,
)
from envoy_data_plane.envoy.extensions.filters.http.dynamic_forward_proxy.v3 import (
    PerRouteConfig as ForwardProxyRouteConfig,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExtProcOverrides,
    ExtProcPerRoute,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.json_to_metadata.v3 import (
    JsonToMetadata,
    JsonToMetadataKeyValuePair,
    JsonToMetadataMatchRules,
    JsonToMetadataRule,
    JsonToMetadataSelector,
)
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwksAsyncFetch,
    JwtAuthentication,
    JwtHeader,
    JwtProvider,
    JwtRequirement,
    JwtRequirementOrList,
    RemoteJwks,
    RequirementRule,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerPathWithEscapedSlashesAction,
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    HeaderMutation as EarlyHeaderMutation,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    HttpRequestHeaderMatchInput,
    RegexMatcher,
    StringMatcher,
)
from envoy_data_plane.google.protobuf import Any as AnyProto
from envoy_data_plane.google.protobuf import Empty, ListValue, NullValue, Value
from envoy_data_plane.xds.core.v3 import TypedExtensionConfig as XdsExtension
from envoy_data_plane.xds.type.matcher.v3 import (
    Matcher as XdsMatcher,
)
from envoy_data_plane.xds.type.matcher.v3 import (
    MatcherMatcherList,
    MatcherMatcherListFieldMatcher,
    MatcherMatcherListPredicate,
    MatcherMatcherListPredicateSinglePredicate,
    MatcherOnMatch,
    RegexMatcherGoogleRe2,
)
from envoy_data_plane.xds.type.matcher.v3 import (
    RegexMatcher as XdsRegexMatcher,
)
from envoy_data_plane.xds.type.matcher.v3 import (
    StringMatcher as XdsStringMatcher,
)

from tollgate.config import Settings
from tollgate.extproc.edge_limits import (
    CLIENT_MAX_HEADERS_COUNT,
    CLIENT_MAX_HEADERS_KB,
    ENVOY_ERROR_HEADER,
    ENVOY_LOCAL_REPLIES,
    MUTATION_HEADROOM_COUNT,
    MUTATION_HEADROOM_KB,
)
from tollgate.extproc.plan import (
    FACT_RULES,
    LIMIT_REMAINING_KEY,
    LIMIT_RESET_KEY,
    REQUEST_FACTS_NAMESPACE,
    REQUEST_ID_KEY,
    RESPONSE_ATTRIBUTES,
    TOLLGATE_NAMESPACE,
)
from tollgate.policy.headers import LIMIT_REMAINING_HEADER, LIMIT_RESET_HEADER, REQUEST_ID_HEADER
from tollgate.policy.identity import JWT_METADATA_NAMESPACE, JWT_PAYLOAD_KEY
from tollgate.routing.envoy_headers import UPSTREAM_HOST_HEADER, UPSTREAM_SCHEME_HEADER

__all__ = [
    "JWT_METADATA_NAMESPACE",
    "JWT_PAYLOAD_KEY",
    "TARGETS",
    "UPSTREAM_HOST_HEADER",
    "UPSTREAM_SCHEME_HEADER",
    "EnvoyTarget",
    "render_bootstrap",
    "render_yaml",
]

SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
EXTPROC_CLUSTER = "tollgate_extproc"
UPSTREAM_HTTPS_CLUSTER = "upstream_https"
UPSTREAM_HTTP_CLUSTER = "upstream_http"
UPSTREAM_CONNECT_TIMEOUT_S = 10
JWKS_CLUSTER = "tollgate_jwks"

FORWARD_PROXY_FILTER = "envoy.filters.http.dynamic_forward_proxy"
#: The one DNS cache the forward proxy filter and both upstream clusters share.
DNS_CACHE = "tollgate_upstreams"
#: What a routed request's upstream header must look like: "host:port" (IPv6 in brackets).
#: A missing, empty or port-less value matches no forwarding route (the forward proxy would
#: otherwise fall back to the request's own ``Host``).
UPSTREAM_HOST_PATTERN = r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}"
NOT_ROUTED_STATUS = 502
NOT_ROUTED_BODY = json.dumps(
    {
        "error": {
            "message": "request was not routed by Tollgate",
            "type": "invalid_request_error",
            "code": "not_routed",
            "param": None,
        }
    },
    separators=(",", ":"),
)

EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
#: A second ext_proc filter that only reports Envoy's own answers to requests Tollgate's
#: ext_proc never saw (see :func:`_local_reply_observer`).
LOCAL_REPLY_OBSERVER_FILTER = "tollgate.local_reply_observer"
#: Reads the request body's facts for ext_proc (see :mod:`tollgate.extproc.plan`).
REQUEST_FACTS_FILTER = "envoy.filters.http.json_to_metadata"
#: It reads bodies of fewer than 10**REQUEST_FACTS_MAX_DIGITS bytes (100 kB): it costs Envoy
#: about 4.4 µs of CPU per KB, and from about that size on Tollgate reads a body for less.
REQUEST_FACTS_MAX_DIGITS = 5

#: Provider for ``<jwt_header>: Bearer <token>``.
JWT_PROVIDER = "tollgate_users"
#: Provider for a bare ``<jwt_header>: <token>`` (custom headers only).
JWT_BARE_PROVIDER = "tollgate_users_bare"
BEARER_PREFIX = "Bearer "
JWKS_FETCH_TIMEOUT_S = 5
JWKS_CACHE_DURATION_S = 300


@dataclass(frozen=True)
class EnvoyTarget:
    """Where the listener binds and how Envoy reaches Tollgate, per deployment shape."""

    name: str
    listen_address: str | None  # None: take it from the settings
    extproc_host: str | None  # None: take it from settings.grpc_address
    admin_address: str
    # Where Envoy finds Tollgate's socket when ``grpc_address`` is a TCP address without
    # mutual TLS (a plaintext TCP listener is only allowed on loopback, which a container
    # beside Envoy does not share in Compose): a unix socket on a volume both mount.
    extproc_socket: str | None = None


# The socket path in the shared volume of the container targets (Compose, Kubernetes).
CONTAINER_EXTPROC_SOCKET = "/run/tollgate/extproc.sock"

TARGETS: dict[str, EnvoyTarget] = {
    "local": EnvoyTarget("local", None, None, "127.0.0.1"),
    "compose": EnvoyTarget("compose", "0.0.0.0", "tollgate", "127.0.0.1", CONTAINER_EXTPROC_SOCKET),
    "kubernetes": EnvoyTarget(
        "kubernetes", "0.0.0.0", "127.0.0.1", "127.0.0.1", CONTAINER_EXTPROC_SOCKET
    ),
}


def extproc_address(settings: Settings, target: str) -> str:
    """The ext_proc address Envoy connects to for ``target``: ``unix:/path`` or
    ``host:port``. The container targets use the shared socket unless Tollgate listens on
    TCP with mutual TLS (then the target's host: the ``tollgate`` service, the pod's
    loopback)."""
    where = TARGETS[target]
    address = settings.grpc_address
    if address.startswith("unix:"):
        return address
    if where.extproc_socket and not settings.envoy_grpc_client_cert_file:
        return f"unix:{where.extproc_socket}"
    host, _, port = address.rpartition(":")
    return f"{where.extproc_host or host.strip('[]')}:{port}"


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)


def _socket(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _cluster_load(name: str, address: Address) -> ClusterLoadAssignment:
    return ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=address))])
        ],
    )


def _http2_options() -> dict[str, AnyProto]:
    options = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=Http2ProtocolOptions()
        )
    )
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": AnyProto.pack(options)}


def _extproc_cluster(settings: Settings, target: EnvoyTarget) -> Cluster:
    grpc_address = extproc_address(settings, target.name)
    if grpc_address.startswith("unix:"):
        address = Address(pipe=Pipe(path=grpc_address.removeprefix("unix:")))
        kind = ClusterDiscoveryType.STATIC
    else:
        host, _, port = grpc_address.rpartition(":")
        address = _socket(host, int(port))
        kind = ClusterDiscoveryType.STATIC if _is_ip(host) else ClusterDiscoveryType.STRICT_DNS
    cluster = Cluster(
        name=EXTPROC_CLUSTER,
        type=kind,
        connect_timeout=_seconds(1),
        typed_extension_protocol_options=_http2_options(),
        load_assignment=_cluster_load(EXTPROC_CLUSTER, address),
    )
    if settings.envoy_grpc_client_cert_file:
        server_name = settings.envoy_grpc_server_name or (
            address.socket_address.address if address.socket_address else "localhost"
        )
        cluster.transport_socket = _extproc_mtls(settings, server_name)
    return cluster


def _extproc_mtls(settings: Settings, server_name: str) -> TransportSocket:
    """Mutual TLS to Tollgate: Envoy's client certificate, Tollgate's chain checked against
    ``envoy_grpc_ca_file`` and its SAN against ``server_name`` (also sent as SNI unless an IP)."""
    is_ip = _is_ip(server_name)
    context = UpstreamTlsContext(
        sni="" if is_ip else server_name,
        common_tls_context=CommonTlsContext(
            alpn_protocols=["h2"],
            tls_certificates=[
                TlsCertificate(
                    certificate_chain=DataSource(filename=settings.envoy_grpc_client_cert_file),
                    private_key=DataSource(filename=settings.envoy_grpc_client_key_file),
                )
            ],
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=settings.envoy_grpc_ca_file),
                match_typed_subject_alt_names=[
                    SubjectAltNameMatcher(
                        san_type=(
                            SubjectAltNameMatcherSanType.IP_ADDRESS
                            if is_ip
                            else SubjectAltNameMatcherSanType.DNS
                        ),
                        matcher=StringMatcher(exact=server_name),
                    )
                ],
            ),
        ),
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=AnyProto.pack(context))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _url_cluster(name: str, url: str, connect_timeout_s: float) -> Cluster:
    """A cluster for the host of an http(s) URL; https is verified (system CAs, SNI, SAN)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    cluster = Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC if _is_ip(host) else ClusterDiscoveryType.LOGICAL_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=_seconds(connect_timeout_s),
        load_assignment=_cluster_load(name, _socket(host, port)),
    )
    if tls:
        cluster.transport_socket = _verified_tls(host)
    return cluster


def _verified_tls(host: str) -> TransportSocket:
    context = UpstreamTlsContext(
        sni=host,
        common_tls_context=CommonTlsContext(
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=SYSTEM_CA_BUNDLE),
                match_typed_subject_alt_names=[
                    SubjectAltNameMatcher(
                        san_type=SubjectAltNameMatcherSanType.DNS,
                        matcher=StringMatcher(exact=host),
                    )
                ],
            )
        ),
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=AnyProto.pack(context))


def _dns_cache() -> DnsCacheConfig:
    """The forward proxy's DNS cache; the filter and both clusters must carry the same one.

    Envoy's default resolver (c-ares) also answers from /etc/hosts, so ``localhost`` and names
    a container's hosts file adds resolve (checked with Envoy 1.40).
    """
    return DnsCacheConfig(name=DNS_CACHE, dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED)


def _forward_proxy_cluster(settings: Settings, name: str, tls: bool) -> Cluster:
    """An upstream cluster whose host comes from the request (Envoy's dynamic forward proxy)."""
    options = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http_protocol_options=Http1ProtocolOptions()
        ),
        # SNI and the certificate's SAN check follow the host of each request. Envoy requires
        # both on forward proxy clusters; without TLS they do nothing.
        upstream_http_protocol_options=UpstreamHttpProtocolOptions(
            auto_sni=True, auto_san_validation=True
        ),
    )
    cluster = Cluster(
        name=name,
        cluster_type=ClusterCustomClusterType(
            name="envoy.clusters.dynamic_forward_proxy",
            typed_config=AnyProto.pack(ForwardProxyClusterConfig(dns_cache_config=_dns_cache())),
        ),
        lb_policy=ClusterLbPolicy.CLUSTER_PROVIDED,
        connect_timeout=_seconds(UPSTREAM_CONNECT_TIMEOUT_S),
        per_connection_buffer_limit_bytes=settings.max_body_bytes,
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": AnyProto.pack(options)
        },
    )
    if tls:
        cluster.transport_socket = _upstream_tls(settings.upstream_ca_file or SYSTEM_CA_BUNDLE)
    return cluster


def _upstream_tls(ca_file: str) -> TransportSocket:
    """TLS that verifies the upstream's chain against ``ca_file``; SNI and SAN set per request."""
    context = UpstreamTlsContext(
        common_tls_context=CommonTlsContext(
            validation_context=CertificateValidationContext(trusted_ca=DataSource(filename=ca_file))
        )
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=AnyProto.pack(context))


def _jwks_cluster(settings: Settings) -> Cluster | None:
    """The cluster Envoy fetches the remote JWKS through; None when a local file is used."""
    if not settings.jwt_issuer or settings.jwt_jwks_file or not settings.jwt_jwks_uri:
        return None
    return _url_cluster(JWKS_CLUSTER, settings.jwt_jwks_uri, connect_timeout_s=JWKS_FETCH_TIMEOUT_S)


def _jwt_provider(settings: Settings, value_prefix: str) -> JwtProvider:
    local = DataSource(filename=settings.jwt_jwks_file) if settings.jwt_jwks_file else None
    remote = None
    if local is None:
        remote = RemoteJwks(
            http_uri=HttpUri(
                uri=settings.jwt_jwks_uri,
                cluster=JWKS_CLUSTER,
                timeout=_seconds(JWKS_FETCH_TIMEOUT_S),
            ),
            cache_duration=_seconds(JWKS_CACHE_DURATION_S),
            # Fetch in the background: start-up does not wait for the identity provider.
            async_fetch=JwksAsyncFetch(fast_listener=True),
        )
    return JwtProvider(
        issuer=settings.jwt_issuer,
        audiences=list(settings.jwt_audiences),
        local_jwks=local,
        remote_jwks=remote,
        from_headers=[JwtHeader(name=settings.jwt_header, value_prefix=value_prefix)],
        # Remove the token from the request once verified: it never reaches the upstream.
        forward=False,
        payload_in_metadata=JWT_PAYLOAD_KEY,
    )


def _jwt_filter(settings: Settings) -> HttpFilter:
    """Envoy's jwt_authn: a token is optional, but one that is sent must verify.

    Envoy answers a token that does not verify itself: 401, or 403 for a wrong audience.
    A ``value_prefix`` is required where it is set (a value without it is not extracted, so
    it would pass unverified), and one provider with two header entries rejects ``Bearer
    <token>`` (both entries extract a token and every extracted token must verify). So a
    custom header gets two providers, one per form, and the request passes if either
    verifies; ``authorization`` keeps the standard ``Bearer`` form only.
    """
    bearer = {JWT_PROVIDER: _jwt_provider(settings, BEARER_PREFIX)}
    bare: dict[str, JwtProvider] = {}
    if settings.jwt_header != "authorization":
        bare[JWT_BARE_PROVIDER] = _jwt_provider(settings, "")
    # When all fail, Envoy reports the last real error (not "missing") of the list, so the
    # bare form goes first: a bad `Bearer <token>` then gets the error of its own check.
    requirements = [JwtRequirement(provider_name=name) for name in [*bare, *bearer]]
    # allow_missing, not allow_missing_or_failed: no token passes, an invalid one does not.
    requirements.append(JwtRequirement(allow_missing=Empty()))
    config = JwtAuthentication(
        providers=bearer | bare,
        rules=[
            RequirementRule(
                match=RouteMatch(prefix="/"),
                requires=JwtRequirement(
                    requires_any=JwtRequirementOrList(requirements=requirements)
                ),
            )
        ],
    )
    return HttpFilter(name="envoy.filters.http.jwt_authn", typed_config=AnyProto.pack(config))


def _processing_mode(*, request_headers: bool, response_headers: bool) -> ProcessingMode:
    send, skip = ProcessingModeHeaderSendMode.SEND, ProcessingModeHeaderSendMode.SKIP
    return ProcessingMode(
        request_header_mode=send if request_headers else skip,
        response_header_mode=send if response_headers else skip,
        request_body_mode=ProcessingModeBodySendMode.NONE,
        response_body_mode=ProcessingModeBodySendMode.NONE,
        request_trailer_mode=skip,
        response_trailer_mode=skip,
    )


def _ext_proc_filter(settings: Settings) -> HttpFilter:
    """Tollgate's ext_proc: every request's headers; responses only of requests it saw.

    Response headers are skipped by default and asked for by the virtual host's per-route
    config (:func:`_ext_proc_per_route`), which Envoy merges when the request headers reach
    the filter. A local reply to a request the filter never saw (an HTTP/1.0 request, headers
    or a path the codec refuses) would otherwise be held for ext_proc while Envoy closes the
    connection: the client got an empty reply.
    """
    ext_proc = ExternalProcessor(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=EXTPROC_CLUSTER)),
        # Fail closed: if Tollgate cannot be reached or does not answer, the request fails.
        failure_mode_allow=False,
        message_timeout=_seconds(settings.extproc_message_timeout_ms / 1000),
        processing_mode=_processing_mode(request_headers=True, response_headers=False),
        # Tollgate asks for bodies per request (SSE streamed, JSON buffered).
        allow_mode_override=True,
        # The status comes with the first response message, so a plan may skip the headers.
        response_attributes=list(RESPONSE_ATTRIBUTES),
    )
    # The request-headers message carries in its metadata_context what json_to_metadata read
    # from the body, and the verified JWT payload.
    namespaces = [REQUEST_FACTS_NAMESPACE]
    if settings.jwt_issuer:
        namespaces.append(JWT_METADATA_NAMESPACE)
    # Tollgate's answers write the request id there, for the route's response header.
    ext_proc.metadata_options = MetadataOptions(
        forwarding_namespaces=MetadataOptionsMetadataNamespaces(untyped=namespaces),
        receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[TOLLGATE_NAMESPACE]),
    )
    return HttpFilter(name=EXT_PROC_FILTER, typed_config=AnyProto.pack(ext_proc))


def _request_facts_filter() -> HttpFilter:
    """json_to_metadata before ext_proc: the request body's facts, read in C++.

    For an ``application/json`` body it holds the headers until the body is complete (as
    ext_proc's buffered mode did), then writes each fact of :data:`FACT_RULES` under
    :data:`REQUEST_FACTS_NAMESPACE`: its value when it is a scalar, null when missing, a list
    when the body could not be parsed. ext_proc then gets them with the request headers and
    asks for the body only when it must change it (see :mod:`tollgate.extproc.plan`).
    """
    missing = Value(null_value=NullValue.NULL_VALUE)
    error = Value(list_value=ListValue(values=[Value(string_value="unparsed")]))

    def pair(key: str, value: Value | None = None) -> JsonToMetadataKeyValuePair:
        return JsonToMetadataKeyValuePair(
            metadata_namespace=REQUEST_FACTS_NAMESPACE, key=key, value=value
        )

    rules = [
        JsonToMetadataRule(
            selectors=[JsonToMetadataSelector(key=part) for part in path],
            on_present=pair(key),
            on_missing=pair(key, missing),
            on_error=pair(key, error),
        )
        for key, path in FACT_RULES.items()
    ]
    config = JsonToMetadata(
        request_rules=JsonToMetadataMatchRules(
            rules=rules, allow_content_types=["application/json"]
        )
    )
    # Only bodies that declare a length of at most REQUEST_FACTS_MAX_DIGITS digits: a chunked
    # or larger one reaches ext_proc's request headers first, as before, so that Tollgate
    # refuses a body over max_body_bytes knowing who sent it (and reads it when it must).
    small = MatcherMatcherListPredicate(
        single_predicate=MatcherMatcherListPredicateSinglePredicate(
            input=XdsExtension(
                name="content-length",
                typed_config=AnyProto.pack(
                    HttpRequestHeaderMatchInput(header_name="content-length")
                ),
            ),
            value_match=XdsStringMatcher(
                safe_regex=XdsRegexMatcher(
                    google_re2=RegexMatcherGoogleRe2(),
                    regex=f"[0-9]{{1,{REQUEST_FACTS_MAX_DIGITS}}}",
                )
            ),
        )
    )
    skip_unless_small = XdsMatcher(
        matcher_list=MatcherMatcherList(
            matchers=[
                MatcherMatcherListFieldMatcher(
                    predicate=MatcherMatcherListPredicate(not_matcher=small),
                    on_match=MatcherOnMatch(
                        action=XdsExtension(name="skip", typed_config=AnyProto.pack(SkipFilter()))
                    ),
                )
            ]
        )
    )
    wrapped = ExtensionWithMatcher(
        xds_matcher=skip_unless_small,
        extension_config=TypedExtensionConfig(
            name=REQUEST_FACTS_FILTER, typed_config=AnyProto.pack(config)
        ),
    )
    return HttpFilter(name=REQUEST_FACTS_FILTER, typed_config=AnyProto.pack(wrapped))


def _local_reply_observer(settings: Settings) -> HttpFilter:
    """ext_proc in observability mode that reports Envoy's answers to requests it never saw.

    It sits before Tollgate's ext_proc and is disabled on the virtual host, so it only runs
    for requests that never got that far: refused by jwt_authn, or answered by Envoy before
    any filter (HTTP/1.0, headers the codec refuses, an encoded slash). Envoy sends it the
    response headers without waiting for an answer (the reply goes out at once), and
    Tollgate records the request as ``blocked``. It never fails a request.
    """
    ext_proc = ExternalProcessor(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=EXTPROC_CLUSTER)),
        failure_mode_allow=True,
        observability_mode=True,
        message_timeout=_seconds(settings.extproc_message_timeout_ms / 1000),
        processing_mode=_processing_mode(request_headers=False, response_headers=True),
    )
    return HttpFilter(name=LOCAL_REPLY_OBSERVER_FILTER, typed_config=AnyProto.pack(ext_proc))


def _ext_proc_per_route() -> dict[str, AnyProto]:
    """On every route: Tollgate's ext_proc sees responses, the observer is off."""
    return {
        EXT_PROC_FILTER: AnyProto.pack(
            ExtProcPerRoute(
                overrides=ExtProcOverrides(
                    processing_mode=_processing_mode(request_headers=True, response_headers=True)
                )
            )
        ),
        LOCAL_REPLY_OBSERVER_FILTER: AnyProto.pack(ExtProcPerRoute(disabled=True)),
    }


def _local_reply_config() -> LocalReplyConfig:
    """OpenAI-style JSON bodies for Envoy's own local replies, naming their error code.

    Each also carries :data:`ENVOY_ERROR_HEADER` with its code, which is what Tollgate
    records as the ``block_reason``.
    """
    mappers = []
    for reply in ENVOY_LOCAL_REPLIES:
        conditions = [f"response.code_details == '{d}'" for d in reply.details] + [
            f"response.code_details.startsWith('{p}')" for p in reply.detail_prefixes
        ]
        expression = f"response.code == {reply.status} && ({' || '.join(conditions)})"
        body = {
            "error": {
                "message": reply.message,
                "type": "invalid_request_error",
                "code": reply.code,
                "param": None,
            }
        }
        mappers.append(
            ResponseMapper(
                filter=AccessLogFilter(
                    extension_filter=ExtensionFilter(
                        name="envoy.access_loggers.extension_filters.cel",
                        typed_config=AnyProto.pack(ExpressionFilter(expression=expression)),
                    )
                ),
                body=DataSource(inline_string=json.dumps(body, separators=(",", ":"))),
                body_format_override=SubstitutionFormatString(
                    text_format_source=DataSource(inline_string="%LOCAL_REPLY_BODY%"),
                    content_type="application/json",
                ),
                headers_to_add=[
                    HeaderValueOption(
                        header=HeaderValue(key=ENVOY_ERROR_HEADER, value=reply.code),
                        append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                ],
            )
        )
    return LocalReplyConfig(mappers=mappers)


def _strip_routing_headers() -> TypedExtensionConfig:
    """Removes client-sent upstream headers before routing and every filter.

    Only Tollgate's ext_proc can then set them. An HTTP filter would be too late: a route
    picked while the client's copies were still there would stay cached after their removal,
    and the forward proxy, finding no :data:`UPSTREAM_HOST_HEADER`, would fall back to the
    client's own ``Host``.
    """
    config = EarlyHeaderMutation(
        mutations=[
            HeaderMutationRule(remove=name)
            for name in (UPSTREAM_HOST_HEADER, UPSTREAM_SCHEME_HEADER)
        ]
    )
    return TypedExtensionConfig(
        name="envoy.http.early_header_mutation.header_mutation",
        typed_config=AnyProto.pack(config),
    )


def _forward_proxy_filter() -> HttpFilter:
    config = ForwardProxyFilterConfig(dns_cache_config=_dns_cache())
    return HttpFilter(name=FORWARD_PROXY_FILTER, typed_config=AnyProto.pack(config))


def _forward_route(cluster: str, timeout: datetime.timedelta, *scheme: HeaderMatcher) -> Route:
    """Send the request to the host Tollgate named, through ``cluster``, and no retries."""
    host = HeaderMatcher(
        name=UPSTREAM_HOST_HEADER,
        string_match=StringMatcher(safe_regex=RegexMatcher(regex=UPSTREAM_HOST_PATTERN)),
    )
    per_route = ForwardProxyRouteConfig(host_rewrite_header=UPSTREAM_HOST_HEADER)
    return Route(
        name=cluster,
        match=RouteMatch(prefix="/", headers=[*scheme, host]),
        route=RouteAction(cluster=cluster, timeout=timeout),
        typed_per_filter_config={FORWARD_PROXY_FILTER: AnyProto.pack(per_route)},
        request_headers_to_remove=[UPSTREAM_HOST_HEADER, UPSTREAM_SCHEME_HEADER],
        # Only Envoy's own local replies may name an Envoy error.
        response_headers_to_remove=[ENVOY_ERROR_HEADER],
    )


def _metadata_headers() -> list[HeaderValueOption]:
    """Response headers from what Tollgate's ext_proc wrote into the request's dynamic
    metadata: ``x-tollgate-request-id``, and the tightest limit's remainder and reset time.
    Envoy adds no header whose value is empty (a request Tollgate never saw, no limit)."""
    return [
        HeaderValueOption(
            header=HeaderValue(key=name, value=f"%DYNAMIC_METADATA({TOLLGATE_NAMESPACE}:{key})%"),
            append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        for name, key in (
            (REQUEST_ID_HEADER, REQUEST_ID_KEY),
            (LIMIT_REMAINING_HEADER, LIMIT_REMAINING_KEY),
            (LIMIT_RESET_HEADER, LIMIT_RESET_KEY),
        )
    ]


def _routes(settings: Settings) -> list[Route]:
    """Plaintext when Tollgate says ``http``, verified TLS otherwise, 502 when it said nothing."""
    timeout = _seconds(settings.upstream_timeout_s)
    plaintext = HeaderMatcher(name=UPSTREAM_SCHEME_HEADER, string_match=StringMatcher(exact="http"))
    not_routed = Route(
        name="not_routed",
        match=RouteMatch(prefix="/"),
        direct_response=DirectResponseAction(
            status=NOT_ROUTED_STATUS, body=DataSource(inline_string=NOT_ROUTED_BODY)
        ),
        response_headers_to_add=[
            HeaderValueOption(
                header=HeaderValue(key="content-type", value="application/json"),
                append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        ],
    )
    return [
        _forward_route(UPSTREAM_HTTP_CLUSTER, timeout, plaintext),
        _forward_route(UPSTREAM_HTTPS_CLUSTER, timeout),
        not_routed,
    ]


def _connection_manager(settings: Settings) -> HttpConnectionManager:
    timeout = _seconds(settings.upstream_timeout_s)
    return HttpConnectionManager(
        stat_prefix="tollgate",
        codec_type=HttpConnectionManagerCodecType.AUTO,
        # Streams may be silent for minutes while a model thinks.
        stream_idle_timeout=timeout,
        # While Envoy drains (SIGTERM to Tollgate, or the preStop drain), HTTP/2 clients get a
        # first GOAWAY and may open new streams for as long as Tollgate still serves new ones
        # (shutdown_delay_s); Envoy's --drain-time-s (shutdown_grace_s in `tollgate up` and
        # the manifests) then closes the listener, and requests in flight run to their end.
        drain_timeout=_seconds(max(settings.shutdown_delay_s, 1)),
        early_header_mutation_extensions=[_strip_routing_headers()],
        # Dot segments reach Tollgate as sent, so that it refuses them (400 invalid_path)
        # instead of Envoy silently resolving "/../b" to "/b": a client that tries to climb
        # out of a base URI's prefix is told so and recorded. "//" is merged; an encoded
        # slash or backslash is refused by Envoy (400 invalid_path).
        normalize_path=False,
        merge_slashes=True,
        path_with_escaped_slashes_action=(
            HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST
        ),
        # Room for Tollgate's header edits: it holds clients to the standard limits itself
        # (431 headers_too_large), and Envoy checks the edited request against these.
        max_request_headers_kb=CLIENT_MAX_HEADERS_KB + MUTATION_HEADROOM_KB,
        common_http_protocol_options=CommonHttpProtocolOptions(
            max_headers_count=CLIENT_MAX_HEADERS_COUNT + MUTATION_HEADROOM_COUNT
        ),
        local_reply_config=_local_reply_config(),
        route_config=RouteConfiguration(
            name="tollgate",
            virtual_hosts=[
                VirtualHost(
                    name="upstream",
                    domains=["*"],
                    routes=_routes(settings),
                    typed_per_filter_config=_ext_proc_per_route(),
                    response_headers_to_add=_metadata_headers(),
                )
            ],
        ),
        http_filters=[
            *([_jwt_filter(settings)] if settings.jwt_issuer else []),
            _local_reply_observer(settings),
            _request_facts_filter(),
            _ext_proc_filter(settings),
            _forward_proxy_filter(),
            HttpFilter(name="envoy.filters.http.router", typed_config=AnyProto.pack(Router())),
        ],
    )


def render_bootstrap(settings: Settings, target: str = "local") -> Bootstrap:
    """The typed Envoy bootstrap for ``target`` (one of :data:`TARGETS`)."""
    where = TARGETS[target]
    listener = Listener(
        name="tollgate_http",
        address=_socket(
            where.listen_address or settings.envoy_listen_address, settings.envoy_listen_port
        ),
        per_connection_buffer_limit_bytes=settings.max_body_bytes,
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=AnyProto.pack(_connection_manager(settings)),
                    )
                ]
            )
        ],
    )
    clusters = [
        _extproc_cluster(settings, where),
        _forward_proxy_cluster(settings, UPSTREAM_HTTPS_CLUSTER, tls=True),
        _forward_proxy_cluster(settings, UPSTREAM_HTTP_CLUSTER, tls=False),
    ]
    jwks = _jwks_cluster(settings)
    if jwks is not None:
        clusters.append(jwks)
    return Bootstrap(
        admin=Admin(address=_socket(where.admin_address, settings.envoy_admin_port)),
        static_resources=BootstrapStaticResources(listeners=[listener], clusters=clusters),
    )


def render_yaml(settings: Settings, target: str = "local") -> str:
    """The bootstrap as YAML, with a header saying how it was made."""
    data: dict[str, Any] = render_bootstrap(settings, target).to_dict(
        casing=betterproto2.Casing.SNAKE
    )
    header = (
        f"# Envoy bootstrap for Tollgate, target '{target}'.\n"
        "# Generated by `tollgate envoy-config`; edit the settings, not this file.\n"
        "# The ext_proc filter fails closed (failure_mode_allow is false, its default).\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False)
