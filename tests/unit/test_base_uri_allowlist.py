"""BaseUriAllowList and parse_base_uri: the SSRF guard refuses every ambiguous base URI."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tollgate.routing.allowlist import (
    BaseUri,
    BaseUriAllowList,
    InvalidBaseUri,
    InvalidRequestPath,
    check_request_path,
    parse_base_uri,
)

ENTRIES = (
    "http://127.0.0.1:8001",
    "http://localhost:8002/openai",
    "https://allowed.example/openai",
    "http://[::1]:8003",
)
ALLOW_LIST = BaseUriAllowList(ENTRIES)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://127.0.0.1:8001", BaseUri("http", "127.0.0.1", 8001, "")),
        ("http://127.0.0.1:8001/", BaseUri("http", "127.0.0.1", 8001, "")),
        ("http://LOCALHOST:8002/openai", BaseUri("http", "localhost", 8002, "/openai")),
        ("http://localhost.:8002/openai", BaseUri("http", "localhost", 8002, "/openai")),
        ("http://localhost:8002/openai/v2", BaseUri("http", "localhost", 8002, "/openai/v2")),
        ("https://allowed.example/openai", BaseUri("https", "allowed.example", 443, "/openai")),
        (
            "https://allowed.example:443/openai/",
            BaseUri("https", "allowed.example", 443, "/openai"),
        ),
        ("HTTPS://Allowed.Example/openai", BaseUri("https", "allowed.example", 443, "/openai")),
        (
            "https://allowed.example/openai/v1;x=1/a:b@c",
            BaseUri("https", "allowed.example", 443, "/openai/v1;x=1/a:b@c"),
        ),
        ("http://[::1]:8003", BaseUri("http", "::1", 8003, "")),
        ("http://[0:0:0:0:0:0:0:1]:8003", BaseUri("http", "::1", 8003, "")),
        ("http://[0000::0001]:8003/x", BaseUri("http", "::1", 8003, "/x")),
    ],
)
def test_allowed(text: str, expected: BaseUri) -> None:
    assert ALLOW_LIST.match(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        # Link-local metadata address in every disguise.
        "http://169.254.169.254",
        "http://[::ffff:169.254.169.254]",
        "http://[::ffff:a9fe:a9fe]",
        "http://2852039166",
        "http://0xA9FEA9FE",
        "http://0251.0376.0251.0376",
        "http://127.1:8001",
        "http://127.0.0.01:8001",
        "http://127.0.0.1.:8001",
        "http://0x7f.0.0.1:8001",
        "http://[::127.0.0.1]:8001",
        # Right host, wrong origin or path.
        "http://localhost:9999/openai",
        "http://localhost/openai",
        "http://localhost:8002",
        "http://localhost:8002/",
        "http://localhost:8002/openai2",
        "https://allowed.example/openai2",
        "https://allowed.example/other",
        "https://allowed.example",
        "https://allowed.example:8443/openai",
        "http://allowed.example/openai",
        "http://allowed.example:443/openai",
        "https://allowed.example./openai.",
        "https://sub.allowed.example/openai",
        "https://allowed.example.evil.example/openai",
        "http://127.0.0.1:8002",
        "http://[::2]:8003",
        # Other schemes.
        "file:///etc/passwd",
        "gopher://x",
        "ftp://127.0.0.1:8001",
        "//allowed.example/openai",
        "allowed.example/openai",
        "https:/allowed.example/openai",
        "https:allowed.example/openai",
        "ws://127.0.0.1:8001",
        # Userinfo and other authority tricks.
        "https://allowed.example@evil.example/",
        "https://allowed.example:443@evil.example/openai",
        "https://evil.example#@allowed.example/openai",
        "https://evil.example?@allowed.example/openai",
        "https://@allowed.example/openai",
        "http://127.0.0.1:8001:8001",
        "http://127.0.0.1:80:8001",
        "http://::1:8003",
        # Path tricks.
        "https://allowed.example/openai/../admin",
        "https://allowed.example/openai/./v1",
        "https://allowed.example/openai/%2e%2e/admin",
        "https://allowed.example/%6fpenai",
        "https://allowed.example/openai//v1",
        "https://allowed.example//openai",
        "https://allowed.example/openai//",
        "https://allowed.example/openai?x=1",
        "https://allowed.example/openai#frag",
        "https://allowed.example\\openai",
        "https://allowed.example/openai\\..\\admin",
        'https://allowed.example/open"ai',
        "https://allowed.example/open<ai",
        # Whitespace, control and non-ASCII characters.
        " https://allowed.example/openai",
        "https://allowed.example/openai ",
        "https://allowed.example/openai\r\nHost: evil",
        "https://allowed.example/openai\t",
        "https://allowed.example/openai\x00",
        "https://allowed.example/openai\u00a0",
        "https://allowed.example/\uff4fpenai",  # fullwidth "o"
        # Junk and empty pieces.
        "",
        "not a url",
        "https://",
        "https://:443",
        "https:///openai",
        "http://127.0.0.1:",
        # Ports.
        "http://127.0.0.1:0",
        "http://127.0.0.1:65536",
        "http://127.0.0.1:+80",
        "http://127.0.0.1:-8001",
        "http://127.0.0.1:08001",
        "http://127.0.0.1:8001.0",
        "http://127.0.0.1:0x1f41",
        "http://127.0.0.1:\uff18\uff10\uff10\uff11",  # fullwidth digits
        # Hosts.
        "https://bücher.example",
        "http://[fe80::1%25eth0]:8003",
        "http://[fe80::1%eth0]:8003",
        "http://[::1]8003",
        "http://[::1",
        "http://::1]:8003",
        "http://[v1.x]:8003",
        "http://[127.0.0.1]:8001",
        "http://under_score.example",
        "http://-lead.example",
        "http://trail-.example",
        "http://a..example",
        "http://.example",
        "http://localhost..:8002/openai",
        "http://%6cocalhost:8002/openai",
        "http://x." + "a" * 64,
    ],
)
def test_refused(text: str) -> None:
    assert ALLOW_LIST.match(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "http://169.254.169.254",  # syntactically fine, just not on the list
        "https://xn--80ak6aa92e.com",  # IDNA in its ASCII form is a plain DNS name
        "http://0.0.0.0:1",
        "http://255.255.255.255:65535",
        "http://[2001:db8::1]",
        "http://a-b.c-d.example",
        "http://" + "a" * 63 + ".example",
        "http://localhost.",
    ],
)
def test_parses_but_not_listed(text: str) -> None:
    uri = parse_base_uri(text)
    assert parse_base_uri(str(uri)) == uri
    assert ALLOW_LIST.match(text) is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("file:///etc/passwd", "http:// or https://"),
        ("https://a:b@allowed.example", "userinfo"),
        ("https://allowed.example/openai?x=1", "query"),
        ("https://allowed.example/#x", "fragment"),
        ("https://allowed.example\\x", "backslash"),
        ("https://allowed.example/\r\n", "control"),
        ("http://2852039166", "dotted quad"),
        ("http://[::ffff:169.254.169.254]", "IPv4-mapped"),
        ("http://[fe80::1%25eth0]", "percent-encoding"),
        ("http://127.0.0.1:65536", "port"),
        ("http://a:1:2", "more than one ':'"),
        ("https://allowed.example/a/../b", "'..'"),
        ("https://allowed.example/a//b", "empty segment"),
        ("https://allowed.example/%2e%2e", "percent-encoding"),
        ("https://bücher.example", "non-ASCII"),
    ],
)
def test_refusal_reasons(text: str, reason: str) -> None:
    with pytest.raises(InvalidBaseUri, match=reason):
        parse_base_uri(text)


def test_error_does_not_echo_long_input() -> None:
    text = "https://allowed.example/" + "a" * 5000
    with pytest.raises(InvalidBaseUri) as excinfo:
        parse_base_uri(text)
    assert "longer than 2048" in str(excinfo.value)
    assert len(str(excinfo.value)) < 200


def test_error_escapes_control_characters() -> None:
    with pytest.raises(InvalidBaseUri) as excinfo:
        parse_base_uri("https://x\r\nHost: evil")
    assert "\r" not in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_longest_dns_name() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters
    assert parse_base_uri(f"https://{name}").host == name
    with pytest.raises(InvalidBaseUri):
        parse_base_uri(f"https://{name}c")


def test_length_limit() -> None:
    base = "https://allowed.example/"
    assert parse_base_uri(base + "a" * (2048 - len(base))).path.startswith("/a")
    with pytest.raises(InvalidBaseUri):
        parse_base_uri(base + "a" * (2049 - len(base)))


@pytest.mark.parametrize(
    ("text", "canonical", "authority"),
    [
        ("https://allowed.example", "https://allowed.example", "allowed.example:443"),
        (
            "HTTPS://Allowed.Example:443/openai/",
            "https://allowed.example/openai",
            "allowed.example:443",
        ),
        ("http://localhost.:80", "http://localhost", "localhost:80"),
        ("http://127.0.0.1:8001/", "http://127.0.0.1:8001", "127.0.0.1:8001"),
        ("https://x.example:80/a", "https://x.example:80/a", "x.example:80"),
        ("http://x.example:443", "http://x.example:443", "x.example:443"),
        ("http://[0:0::1]:8080/v", "http://[::1]:8080/v", "[::1]:8080"),
        ("https://[2001:DB8::A]", "https://[2001:db8::a]", "[2001:db8::a]:443"),
    ],
)
def test_str_and_authority(text: str, canonical: str, authority: str) -> None:
    uri = parse_base_uri(text)
    assert str(uri) == canonical
    assert uri.authority == authority
    assert parse_base_uri(canonical) == uri


@pytest.mark.parametrize(
    ("base", "request_path", "joined"),
    [
        ("https://example.com/openai", "/v1/chat/completions", "/openai/v1/chat/completions"),
        (
            "https://example.com/openai",
            "/v1/chat/completions?x=1",
            "/openai/v1/chat/completions?x=1",
        ),
        ("https://example.com/openai/", "/v1/models", "/openai/v1/models"),
        ("https://example.com", "/v1/models", "/v1/models"),
        ("https://example.com/", "/", "/"),
        ("https://example.com/a/b", "/", "/a/b/"),
    ],
)
def test_join(base: str, request_path: str, joined: str) -> None:
    assert parse_base_uri(base).join(request_path) == joined


def test_join_needs_absolute_request_path() -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        parse_base_uri("https://example.com/openai").join("v1/models")


# Paths that a server behind a base URI could resolve to somewhere outside its prefix.
ESCAPING_PATHS = [
    "/../team-b/v1/chat/completions",
    "/v1/../../team-b/v1/chat/completions",
    "/./v1/chat/completions",
    "/v1/..",
    "/v1/.",
    "/..",
    "/%2e%2e/team-b",
    "/%2E%2e/team-b",
    "/v1/%2e/models",
    "/v1%2fmodels",
    "/v1%2Fmodels",
    "/v1%5cmodels",
    "/v1%5C..%5Cteam-b",
    "/%252e%252e/team-b",
    "/%25252E%25252e/team-b",
    "/v1%252fmodels",
    "/v1%255Cmodels",
    "/v1\\..\\team-b",
    "/v1\\models",
    "/v1/mo\x00dels",
    "/v1/mo\x01dels",
    "/v1/mo\x7fdels",
    "/v1/mo dels",
    "/v1/models\r\nx-injected: 1",
    "/v1/models?q=\n",
    "v1/models",
    "*",
    "",
]


@pytest.mark.parametrize("request_path", ESCAPING_PATHS)
def test_request_paths_that_could_escape_the_prefix_are_refused(request_path: str) -> None:
    with pytest.raises(InvalidRequestPath):
        check_request_path(request_path)
    with pytest.raises(InvalidRequestPath):
        parse_base_uri("http://host/team-a").join(request_path)


@pytest.mark.parametrize(
    "request_path",
    [
        "/v1/chat/completions",
        "/v1/models/gpt-4o.mini",  # a dot inside a segment is fine
        "/v1/files/...x",
        "/v1//models",  # empty segments stay below the prefix
        "/v1/models?after=../x&q=%2e%2F",  # the query is not a path
        "/v1/items/a%20b%41",  # other percent-encodings pass
        "/",
    ],
)
def test_request_paths_below_the_prefix_pass(request_path: str) -> None:
    check_request_path(request_path)
    assert parse_base_uri("http://host/team-a").join(request_path) == "/team-a" + request_path


@given(
    st.lists(st.sampled_from(["v1", ".", "..", "%2e", "%2E%2e", "a", "%252e", "\\"]), max_size=6)
)
def test_a_joined_path_that_passes_never_resolves_outside_the_prefix(segments: list[str]) -> None:
    request_path = "/" + "/".join(segments)
    try:
        joined = parse_base_uri("http://host/team-a").join(request_path)
    except InvalidRequestPath:
        return
    # What a server resolving dot segments (RFC 3986 5.2.4, after decoding) would serve.
    resolved: list[str] = []
    for segment in joined.replace("%2e", ".").replace("%2E", ".").split("/")[1:]:
        if segment == "..":
            if resolved:
                resolved.pop()
        elif segment != ".":
            resolved.append(segment)
    assert resolved[:1] == ["team-a"]


def test_root_entry_allows_any_path_on_its_origin() -> None:
    allow_list = BaseUriAllowList(["https://api.example.com"])
    assert allow_list.match("https://api.example.com") is not None
    assert allow_list.match("https://api.example.com/") is not None
    matched = allow_list.match("https://api.example.com/any/path")
    assert matched == BaseUri("https", "api.example.com", 443, "/any/path")
    assert allow_list.match("https://api.example.com:8443/any") is None
    assert allow_list.match("https://other.example.com/any") is None


def test_match_returns_requested_path_not_entry() -> None:
    matched = ALLOW_LIST.match("http://localhost:8002/openai/v2/deep")
    assert matched is not None
    assert matched.path == "/openai/v2/deep"


def test_several_entries_on_one_origin() -> None:
    allow_list = BaseUriAllowList(["https://x.example/a", "https://x.example/b/c"])
    assert allow_list.match("https://x.example/a/z") is not None
    assert allow_list.match("https://x.example/b/c/z") is not None
    assert allow_list.match("https://x.example/b") is None
    assert allow_list.match("https://x.example/c") is None


def test_entries_and_truthiness() -> None:
    assert ALLOW_LIST
    assert not BaseUriAllowList([])
    assert ALLOW_LIST.entries == (
        BaseUri("http", "127.0.0.1", 8001, ""),
        BaseUri("http", "localhost", 8002, "/openai"),
        BaseUri("https", "allowed.example", 443, "/openai"),
        BaseUri("http", "::1", 8003, ""),
    )


@pytest.mark.parametrize(
    "bad_entry",
    [
        "ftp://files.example",
        "https://user@allowed.example",
        "http://2852039166",
        "http://[::ffff:127.0.0.1]",
        "https://allowed.example/openai?x=1",
        "allowed.example",
        "",
    ],
)
def test_bad_entry_is_named(bad_entry: str) -> None:
    with pytest.raises(InvalidBaseUri, match=r"entry #2"):
        BaseUriAllowList(["https://ok.example", bad_entry])


def test_single_string_is_not_an_entry_list() -> None:
    with pytest.raises(TypeError):
        BaseUriAllowList("https://ok.example")


# Property tests ------------------------------------------------------------------------------

# Pieces that sit near the allow-list, so generated URIs often get close to matching.
_SCHEMES = st.sampled_from(["http", "https", "HTTP", "Https", "ftp", "file", "", "//"])
_HOSTS = st.sampled_from(
    [
        "127.0.0.1",
        "localhost",
        "LOCALHOST.",
        "allowed.example",
        "[::1]",
        "[0:0:0:0:0:0:0:1]",
        "[::ffff:127.0.0.1]",
        "127.1",
        "2130706433",
        "0x7f000001",
        "evil.example",
        "allowed.example@evil.example",
        "",
    ]
)
_PORTS = st.one_of(
    st.just(""),
    st.sampled_from([":8001", ":8002", ":8003", ":443", ":80", ":0", ":", ":+80", ":65536"]),
    st.integers(min_value=-5, max_value=70000).map(lambda n: f":{n}"),
)
_SEGMENTS = st.sampled_from(
    ["openai"] * 4
    + ["openai2", "v2", "", ".", "..", "%2e%2e", "a?b", "a#b", "a\\b", "a b", "é", "x"]
)
_PATHS = st.lists(_SEGMENTS, max_size=4).map(lambda segments: "".join("/" + s for s in segments))


# Origins on the list, spelled in the ways that must still match (or nearly so).
_LISTED_ORIGINS = st.sampled_from(
    [
        "http://127.0.0.1:8001",
        "HTTP://127.0.0.1:8001",
        "http://localhost:8002",
        "http://LocalHost.:8002",
        "https://allowed.example",
        "https://allowed.example:443",
        "http://[::1]:8003",
        "http://[0:0::1]:8003",
        "http://[::1]:8003:",
        "https://allowed.example@127.0.0.1:8001",
    ]
)


@st.composite
def _near_miss_uris(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        origin = draw(_LISTED_ORIGINS)
    else:
        scheme = draw(_SCHEMES)
        prefix = f"{scheme}://" if scheme and scheme != "//" else scheme
        origin = prefix + draw(_HOSTS) + draw(_PORTS)
    return origin + draw(_PATHS) + draw(st.sampled_from(["", "/"]))


def _check_match(text: str) -> None:
    result = ALLOW_LIST.match(text)
    if result is None:
        return
    assert parse_base_uri(str(result)) == result
    assert any(
        (entry.scheme, entry.host, entry.port) == (result.scheme, result.host, result.port)
        and (result.path == entry.path or result.path.startswith(entry.path + "/"))
        for entry in ALLOW_LIST.entries
    )
    assert "@" not in result.authority
    assert result.host.isascii()


@given(st.text(max_size=300))
@example("http://127.0.0.1:8001/v1")
@example("http://[::1]:8003/")
def test_match_never_raises_on_arbitrary_text(text: str) -> None:
    _check_match(text)


@given(_near_miss_uris())
def test_match_never_raises_on_near_misses(text: str) -> None:
    _check_match(text)


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80))
def test_printable_ascii_round_trips_when_it_parses(tail: str) -> None:
    for text in (f"http://{tail}", f"https://allowed.example/{tail}"):
        try:
            uri = parse_base_uri(text)
        except InvalidBaseUri:
            continue
        assert parse_base_uri(str(uri)) == uri
        assert str(parse_base_uri(str(uri))) == str(uri)
