"""The opening handshake, as a specification: headers in, response bytes out."""

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from webob import Request
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from stargate import exceptions, handshake
from stargate.exceptions import IncorrectlyConfigured
from stargate.frames import WireFormat
from stargate.handshake import (
    ALL_VERSIONS,
    Handshake,
    HandShakeFailed,
    InvalidOrigin,
    NotWebSocketRequest,
    UnsupportedVersion,
    build_location_url,
    handshake_pre76,
    handshake_rfc6455,
    handshake_v76,
    negotiate,
    normalise_versions,
    requested_draft,
    websocket_handshake,
)

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

# draft-hixie-thewebsocketprotocol-76, section 1.3.
HIXIE76_KEY1 = "4 @1  46546xW%0l 1 5"
HIXIE76_KEY2 = "12998 5 Y3 1  .P00"
HIXIE76_KEY3 = b"^n:ds[4U"
HIXIE76_ANSWER = b"8jKS'y:G*Co,Wxa-"


def rfc_request(**overrides):
    """An RFC 6455 upgrade request as a plain dict; ``None`` removes a header."""
    headers = {
        "Host": "example.com",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": RFC_KEY,
        "Sec-WebSocket-Version": "13",
    }
    return _apply(headers, overrides)


def hixie76_request(**overrides):
    headers = {
        "Host": "example.com",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key2": HIXIE76_KEY2,
        "Sec-WebSocket-Protocol": "sample",
        "Upgrade": "WebSocket",
        "Sec-WebSocket-Key1": HIXIE76_KEY1,
        "Origin": "http://example.com",
    }
    return _apply(headers, overrides)


def hixie75_request(**overrides):
    headers = {
        "Upgrade": "WebSocket",
        "Connection": "Upgrade",
        "Host": "example.com",
        "Origin": "http://example.com",
    }
    return _apply(headers, overrides)


def _apply(headers, overrides):
    for name, value in overrides.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


def webob_headers(path="/", headers=None, **environ):
    """``request.headers`` of a real webob request over HTTP/1.1."""
    environ.setdefault("SERVER_PROTOCOL", "HTTP/1.1")
    return Request.blank(path, environ=environ, headers=headers or {}).headers


def response_headers(response):
    """The header lines of a response, as a list of (name, value)."""
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    return [tuple(line.split(": ", 1)) for line in head.split("\r\n")[1:]]


# -- re-exports and documented names -----------------------------------------


def test_documented_names_are_the_exception_tree():
    assert handshake.HandShakeFailed is exceptions.HandShakeFailed
    assert handshake.InvalidOrigin is exceptions.InvalidOrigin
    assert issubclass(InvalidOrigin, HandShakeFailed)


# -- RFC 6455 -------------------------------------------------------------------


def test_rfc6455_example_key():
    result = negotiate(rfc_request())
    assert result == Handshake(
        draft="rfc6455",
        response=(
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + RFC_ACCEPT.encode() + b"\r\n"
            b"\r\n"
        ),
        subprotocol=None,
        wire_format=WireFormat(draft="rfc6455", deflate=None),
    )


def test_rfc6455_accept_is_sha1_of_key_and_guid():
    key = base64.b64encode(bytes(range(16))).decode()
    guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    accept = base64.b64encode(hashlib.sha1(key.encode() + guid).digest()).decode()
    response = websocket_handshake(rfc_request(Sec_WebSocket_Key=key))
    assert ("Sec-WebSocket-Accept", accept) in response_headers(response)


def test_handshake_is_frozen():
    result = negotiate(rfc_request())
    with pytest.raises(AttributeError):
        result.draft = "hixie-75"


def test_websocket_handshake_returns_the_response_bytes():
    assert websocket_handshake(rfc_request()) == negotiate(rfc_request()).response


def test_handshake_rfc6455_with_base_response_as_str_or_bytes():
    base = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    base += "Connection: Upgrade\r\n"
    expected = negotiate(rfc_request()).response
    assert handshake_rfc6455(rfc_request(), base) == expected
    assert handshake_rfc6455(rfc_request(), base.encode()) == expected
    assert handshake_rfc6455(rfc_request(), handshake.RFC6455_BASE_RESPONSE) == (
        expected
    )


def test_headers_are_looked_up_case_insensitively():
    headers = {name.lower(): value for name, value in rfc_request().items()}
    headers["UPGRADE"] = headers.pop("upgrade")
    assert negotiate(headers).response == negotiate(rfc_request()).response


def test_headers_may_be_a_list_of_pairs_or_bytes():
    pairs = [(k.encode(), v.encode()) for k, v in rfc_request().items()]
    assert negotiate(pairs).response == negotiate(rfc_request()).response


def test_webob_request_headers():
    headers = webob_headers(
        "/chat",
        {
            "Upgrade": "websocket",
            "Connection": "keep-alive, Upgrade",
            "Sec-WebSocket-Key": RFC_KEY,
            "Sec-WebSocket-Version": "13",
            "Origin": "http://localhost",
        },
    )
    assert negotiate(headers).draft == "rfc6455"


@pytest.mark.parametrize(
    "upgrade, connection",
    [
        ("websocket", "Upgrade"),
        ("WebSocket", "upgrade"),
        ("WEBSOCKET", "keep-alive, Upgrade"),
        ("h2c, websocket", "Upgrade, HTTP2-Settings"),
    ],
)
def test_upgrade_and_connection_tokens(upgrade, connection):
    result = negotiate(rfc_request(Upgrade=upgrade, Connection=connection))
    assert result.draft == "rfc6455"


# -- subprotocols -------------------------------------------------------------


@pytest.mark.parametrize(
    "offered, supported, selected",
    [
        (None, ("chat",), None),
        ("chat", (), None),
        ("chat", ("chat",), "chat"),
        ("superchat, chat", ("chat", "superchat"), "chat"),
        ("chat, superchat", ("superchat", "chat"), "superchat"),
        ("chat,superchat", ("superchat",), "superchat"),
        ("mqtt", ("chat", "superchat"), None),
        ("chat", "chat", "chat"),
    ],
)
def test_subprotocol_is_the_servers_first_choice_the_client_offers(
    offered, supported, selected
):
    request = rfc_request(Sec_WebSocket_Protocol=offered)
    result = negotiate(request, subprotocols=supported)
    assert result.subprotocol == selected
    protocols = [
        value
        for name, value in response_headers(result.response)
        if name == "Sec-WebSocket-Protocol"
    ]
    assert protocols == ([] if selected is None else [selected])


def test_subprotocol_offered_in_two_headers():
    # WSGI joins repeated headers with ", ".
    request = rfc_request(Sec_WebSocket_Protocol="chat, superchat")
    assert negotiate(request, subprotocols=["superchat"]).subprotocol == "superchat"


# -- permessage-deflate -------------------------------------------------------


def _extensions(response):
    return [
        value
        for name, value in response_headers(response)
        if name == "Sec-WebSocket-Extensions"
    ]


def test_permessage_deflate_is_accepted_when_offered():
    request = rfc_request(Sec_WebSocket_Extensions="permessage-deflate")
    result = negotiate(request)
    (extensions,) = _extensions(result.response)
    assert extensions.startswith("permessage-deflate")
    assert result.wire_format.deflate is not None
    assert result.wire_format == WireFormat(
        draft="rfc6455", deflate=result.wire_format.deflate
    )


def test_permessage_deflate_absent_when_not_offered():
    result = negotiate(rfc_request())
    assert _extensions(result.response) == []
    assert result.wire_format.deflate is None


def test_permessage_deflate_refused_when_compression_is_off():
    request = rfc_request(Sec_WebSocket_Extensions="permessage-deflate")
    result = negotiate(request, compression=False)
    assert _extensions(result.response) == []
    assert result.wire_format.deflate is None


def test_unknown_extension_is_ignored():
    result = negotiate(rfc_request(Sec_WebSocket_Extensions="x-webkit-frobnicate"))
    assert _extensions(result.response) == []
    assert result.wire_format.deflate is None


def test_websocket_handshake_does_not_compress_by_default():
    # Its caller gets only bytes, so could not learn the deflate parameters.
    request = rfc_request(Sec_WebSocket_Extensions="permessage-deflate")
    assert _extensions(websocket_handshake(request)) == []
    assert _extensions(websocket_handshake(request, compression=True)) != []


# -- a real client accepts the response ----------------------------------------


def _client_handshake(client, **options):
    request = client.connect()
    client.send_request(request)
    assert client.data_to_send()
    headers = dict(request.headers.raw_items())
    result = negotiate(headers, **options)
    client.receive_data(result.response)
    (response,) = client.events_received()
    return result, response


def test_websockets_client_accepts_the_response():
    client = ClientProtocol(parse_uri("ws://example.com/chat"))
    result, response = _client_handshake(client)
    assert isinstance(response, Response)
    assert response.status_code == 101
    assert client.handshake_exc is None
    assert client.state is State.OPEN
    assert result.draft == "rfc6455"


def test_websockets_client_accepts_subprotocol_and_origin():
    client = ClientProtocol(
        parse_uri("ws://example.com:8080/chat"),
        origin="http://example.com:8080",
        subprotocols=["v2.chat", "v1.chat"],
    )
    result, _ = _client_handshake(client, subprotocols=("v1.chat", "v2.chat"))
    assert client.state is State.OPEN
    assert client.subprotocol == result.subprotocol == "v1.chat"


def test_websockets_client_accepts_permessage_deflate():
    client = ClientProtocol(
        parse_uri("ws://example.com/"), extensions=[ClientPerMessageDeflateFactory()]
    )
    result, _ = _client_handshake(client)
    assert client.handshake_exc is None
    assert client.state is State.OPEN
    assert [ext.name for ext in client.extensions] == ["permessage-deflate"]
    assert result.wire_format.deflate is not None


# -- hixie-76 -------------------------------------------------------------------

HIXIE76_RESPONSE = (
    b"HTTP/1.1 101 WebSocket Protocol Handshake\r\n"
    b"Upgrade: WebSocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Origin: http://example.com\r\n"
    b"Sec-WebSocket-Location: ws://example.com/demo\r\n"
    b"Sec-WebSocket-Protocol: sample\r\n"
    b"\r\n" + HIXIE76_ANSWER
)


def test_hixie76_worked_example_of_the_draft():
    result = negotiate(hixie76_request(), key3=HIXIE76_KEY3, path="/demo")
    assert result.draft == "hixie-76"
    assert result.subprotocol == "sample"
    assert result.wire_format == WireFormat(draft="hixie-76")
    assert result.response == HIXIE76_RESPONSE


def test_hixie76_worked_example_through_webob_and_the_2010_functions():
    headers = webob_headers("/demo", hixie76_request(Host="example.com"))
    assert websocket_handshake(headers, key3=HIXIE76_KEY3) == HIXIE76_RESPONSE
    assert (
        handshake_v76(headers, handshake.HIXIE76_BASE_RESPONSE, key3=HIXIE76_KEY3)
        == HIXIE76_RESPONSE
    )


def test_hixie76_answer_is_md5_of_the_two_parts_and_key3():
    # 4146546015 / 5 spaces and 1299853100 / 5 spaces, big-endian, then key3.
    expected = hashlib.md5(
        (829309203).to_bytes(4, "big") + (259970620).to_bytes(4, "big") + HIXIE76_KEY3
    ).digest()
    assert expected == HIXIE76_ANSWER


def test_hixie76_key3_may_be_a_bytearray():
    result = negotiate(hixie76_request(), key3=bytearray(HIXIE76_KEY3), path="/demo")
    assert result.response.endswith(HIXIE76_ANSWER)


def test_hixie76_key3_must_be_bytes():
    with pytest.raises(TypeError):
        negotiate(hixie76_request(), key3="^n:ds[4U")


def test_requested_draft():
    assert requested_draft(rfc_request()) == "rfc6455"
    assert requested_draft(hixie76_request()) == "hixie-76"
    assert requested_draft(hixie76_request(Sec_WebSocket_Key1=None)) == "hixie-76"
    assert requested_draft(hixie75_request()) == "hixie-75"


def test_hixie_subprotocol_is_echoed_only_if_supported():
    request = hixie76_request()
    assert negotiate(request, key3=HIXIE76_KEY3).subprotocol == "sample"
    result = negotiate(request, key3=HIXIE76_KEY3, subprotocols=("other",))
    assert result.subprotocol is None
    assert b"Sec-WebSocket-Protocol" not in result.response


# -- hixie-75 -------------------------------------------------------------------


def test_hixie75_response():
    result = negotiate(hixie75_request(WebSocket_Protocol="chat"), path="/demo")
    assert result.draft == "hixie-75"
    assert result.subprotocol == "chat"
    assert result.wire_format == WireFormat(draft="hixie-75")
    assert result.response == (
        b"HTTP/1.1 101 Web Socket Protocol Handshake\r\n"
        b"Upgrade: WebSocket\r\n"
        b"Connection: Upgrade\r\n"
        b"WebSocket-Origin: http://example.com\r\n"
        b"WebSocket-Location: ws://example.com/demo\r\n"
        b"WebSocket-Protocol: chat\r\n"
        b"\r\n"
    )


def test_hixie75_clients_compare_the_first_85_bytes():
    assert handshake.HIXIE75_BASE_RESPONSE == (
        b"HTTP/1.1 101 Web Socket Protocol Handshake\r\n"
        b"Upgrade: WebSocket\r\n"
        b"Connection: Upgrade\r\n"
    )
    assert len(handshake.HIXIE75_BASE_RESPONSE) == 85


def test_handshake_pre76_with_webob_headers_over_tls():
    headers = webob_headers(
        "/room/1?token=a%20b",
        hixie75_request(Host="example.com", Origin="https://example.com"),
        **{"wsgi.url_scheme": "https"},
    )
    response = handshake_pre76(headers, handshake.HIXIE75_BASE_RESPONSE)
    assert response == (
        b"HTTP/1.1 101 Web Socket Protocol Handshake\r\n"
        b"Upgrade: WebSocket\r\n"
        b"Connection: Upgrade\r\n"
        b"WebSocket-Origin: https://example.com\r\n"
        b"WebSocket-Location: wss://example.com/room/1?token=a%20b\r\n"
        b"\r\n"
    )
    assert websocket_handshake(headers) == response


# -- build_location_url ---------------------------------------------------------


@pytest.mark.parametrize(
    "path, environ, expected",
    [
        ("/", {}, "ws://example.com/"),
        ("/chat?room=1", {}, "ws://example.com/chat?room=1"),
        ("/a%20b/%C3%A9", {}, "ws://example.com/a%20b/%C3%A9"),
        ("/chat", {"wsgi.url_scheme": "https"}, "wss://example.com/chat"),
        ("/chat", {"SCRIPT_NAME": "/app"}, "ws://example.com/app/chat"),
    ],
)
def test_build_location_url_from_webob_headers(path, environ, expected):
    headers = webob_headers(path, {"Host": "example.com"}, **environ)
    assert build_location_url(headers) == expected


def test_build_location_url_keeps_the_host_header_as_sent():
    headers = webob_headers("/x", {"Host": "Example.com:8080"})
    assert build_location_url(headers) == "ws://Example.com:8080/x"


def test_build_location_url_from_a_plain_dict():
    assert build_location_url({"host": "example.com"}) == "ws://example.com/"
    assert (
        build_location_url({"Host": "[::1]:9000"}, path="/chat?x=1")
        == "ws://[::1]:9000/chat?x=1"
    )
    assert (
        build_location_url({"Host": "example.com"}, secure=True, path="/s")
        == "wss://example.com/s"
    )


def test_build_location_url_path_keyword_wins_over_the_environ():
    headers = webob_headers("/from-environ", {"Host": "example.com"})
    assert build_location_url(headers, path="/given") == "ws://example.com/given"
    assert build_location_url(headers, secure=True).startswith("wss://")


@pytest.mark.parametrize(
    "headers, options",
    [
        ({}, {}),
        ({"Host": ""}, {}),
        ({"Host": "a.com, b.com"}, {}),
        ({"Host": "a.com:99999"}, {}),
        ({"Host": "user@a.com"}, {}),
        ({"Host": "a.com\r\nSet-Cookie: x=1"}, {}),
    ],
)
def test_build_location_url_requires_a_valid_host(headers, options):
    with pytest.raises(HandShakeFailed) as excinfo:
        build_location_url(headers, **options)
    assert excinfo.value.header == "Host"
    assert excinfo.value.status == 400


@pytest.mark.parametrize("path", ["chat", "/a b", "/a\r\nX: y"])
def test_build_location_url_refuses_a_bad_path(path):
    with pytest.raises(HandShakeFailed):
        build_location_url({"Host": "example.com"}, path=path)


def test_build_location_url_quotes_control_characters_of_path_info():
    headers = webob_headers("/", {"Host": "example.com"}, PATH_INFO="/a\r\nb")
    assert build_location_url(headers) == "ws://example.com/a%0D%0Ab"


# -- the common checks ----------------------------------------------------------


@pytest.mark.parametrize(
    "request_headers",
    [
        {"Host": "example.com"},
        {"Host": "example.com", "Connection": "keep-alive"},
        rfc_request(Upgrade=None),
        rfc_request(Upgrade="h2c"),
    ],
)
def test_plain_http_request_is_not_a_websocket_request(request_headers):
    with pytest.raises(NotWebSocketRequest) as excinfo:
        negotiate(request_headers)
    exc = excinfo.value
    assert exc.status == 426
    assert exc.header == "Upgrade"
    assert "WebSocket endpoint" in exc.reason
    assert ("Upgrade", "websocket") in exc.headers


def test_plain_browser_get_through_webob():
    headers = webob_headers("/", {"Accept": "text/html"})
    with pytest.raises(NotWebSocketRequest) as excinfo:
        websocket_handshake(headers)
    assert excinfo.value.status == 426


@pytest.mark.parametrize(
    "environ, reason",
    [
        ({"REQUEST_METHOD": "POST"}, "GET"),
        ({"REQUEST_METHOD": "HEAD"}, "GET"),
        ({"SERVER_PROTOCOL": "HTTP/1.0"}, "HTTP/1.1"),
        ({"SERVER_PROTOCOL": "HTTP/0.9"}, "HTTP/1.1"),
        ({"SERVER_PROTOCOL": "gopher"}, "HTTP/1.1"),
    ],
)
def test_method_and_http_version_from_the_environ(environ, reason):
    headers = webob_headers("/", rfc_request(), **environ)
    with pytest.raises(HandShakeFailed) as excinfo:
        negotiate(headers)
    assert type(excinfo.value) is HandShakeFailed
    assert excinfo.value.status == 400
    assert reason in excinfo.value.reason


def test_http_1_1_is_accepted():
    headers = webob_headers("/", rfc_request(), SERVER_PROTOCOL="HTTP/1.1")
    assert negotiate(headers).draft == "rfc6455"


KEY1, KEY2 = HIXIE76_KEY1, HIXIE76_KEY2

MALFORMED = [
    # (id, request headers, options, exception, header)
    ("no Connection", rfc_request(Connection=None), {}, HandShakeFailed, "Connection"),
    (
        "Connection without upgrade",
        rfc_request(Connection="keep-alive"),
        {},
        HandShakeFailed,
        "Connection",
    ),
    ("no Host", rfc_request(Host=None), {}, HandShakeFailed, "Host"),
    ("two Hosts", rfc_request(Host="a.com, b.com"), {}, HandShakeFailed, "Host"),
    (
        "no Sec-WebSocket-Key",
        rfc_request(Sec_WebSocket_Key=None),
        {},
        HandShakeFailed,
        "Sec-WebSocket-Key",
    ),
    (
        "key not base64",
        rfc_request(Sec_WebSocket_Key="not base64!!!!!!!!!!!!=="),
        {},
        HandShakeFailed,
        "Sec-WebSocket-Key",
    ),
    (
        "key of 15 bytes",
        rfc_request(Sec_WebSocket_Key=base64.b64encode(b"x" * 15).decode()),
        {},
        HandShakeFailed,
        "Sec-WebSocket-Key",
    ),
    (
        "key of 17 bytes",
        rfc_request(Sec_WebSocket_Key=base64.b64encode(b"x" * 17).decode()),
        {},
        HandShakeFailed,
        "Sec-WebSocket-Key",
    ),
    (
        "key without padding",
        rfc_request(Sec_WebSocket_Key=RFC_KEY.rstrip("=")),
        {},
        HandShakeFailed,
        "Sec-WebSocket-Key",
    ),
    (
        "key sent twice",
        rfc_request(Sec_WebSocket_Key=f"{RFC_KEY}, {RFC_KEY}"),
        {},
        HandShakeFailed,
        "Sec-WebSocket-Key",
    ),
    (
        "version sent twice",
        rfc_request(Sec_WebSocket_Version="13, 13"),
        {},
        HandShakeFailed,
        "Sec-WebSocket-Version",
    ),
    (
        "version 8",
        rfc_request(Sec_WebSocket_Version="8"),
        {},
        UnsupportedVersion,
        "Sec-WebSocket-Version",
    ),
    (
        "version 14",
        rfc_request(Sec_WebSocket_Version="14"),
        {},
        UnsupportedVersion,
        "Sec-WebSocket-Version",
    ),
    (
        "version not a number",
        rfc_request(Sec_WebSocket_Version="thirteen"),
        {},
        UnsupportedVersion,
        "Sec-WebSocket-Version",
    ),
    (
        "Key1 missing",
        hixie76_request(Sec_WebSocket_Key1=None),
        {"key3": HIXIE76_KEY3},
        HandShakeFailed,
        "Sec-WebSocket-Key1",
    ),
    (
        "Key2 missing",
        hixie76_request(Sec_WebSocket_Key2=None),
        {"key3": HIXIE76_KEY3},
        HandShakeFailed,
        "Sec-WebSocket-Key2",
    ),
    (
        "Key1 without spaces",
        hixie76_request(Sec_WebSocket_Key1="12345678"),
        {"key3": HIXIE76_KEY3},
        HandShakeFailed,
        "Sec-WebSocket-Key1",
    ),
    (
        "Key2 without digits",
        hixie76_request(Sec_WebSocket_Key2="a b c"),
        {"key3": HIXIE76_KEY3},
        HandShakeFailed,
        "Sec-WebSocket-Key2",
    ),
    (
        "Key1 not a multiple of its spaces",
        hixie76_request(Sec_WebSocket_Key1="1 2 3"),  # 123 / 2
        {"key3": HIXIE76_KEY3},
        HandShakeFailed,
        "Sec-WebSocket-Key1",
    ),
    (
        "Key1 over 4294967295",
        hixie76_request(Sec_WebSocket_Key1="4294967296 "),
        {"key3": HIXIE76_KEY3},
        HandShakeFailed,
        "Sec-WebSocket-Key1",
    ),
    (
        "Key2 of thousands of digits",
        hixie76_request(Sec_WebSocket_Key2="9" * 5000 + " "),
        {"key3": HIXIE76_KEY3},
        HandShakeFailed,
        "Sec-WebSocket-Key2",
    ),
    (
        "Key1 with non-ASCII digits",
        hixie76_request(Sec_WebSocket_Key1="\u00b2 \u00b3"),
        {"key3": HIXIE76_KEY3},
        HandShakeFailed,
        "Sec-WebSocket-Key1",
    ),
    ("key3 missing", hixie76_request(), {}, HandShakeFailed, None),
    ("key3 short", hixie76_request(), {"key3": b"1234567"}, HandShakeFailed, None),
    ("key3 long", hixie76_request(), {"key3": b"123456789"}, HandShakeFailed, None),
    (
        "hixie-76 without Origin",
        hixie76_request(Origin=None),
        {"key3": HIXIE76_KEY3},
        HandShakeFailed,
        "Origin",
    ),
    (
        "hixie-75 without Origin",
        hixie75_request(Origin=None),
        {},
        HandShakeFailed,
        "Origin",
    ),
    (
        "hixie-75 subprotocol with a control character",
        hixie75_request(WebSocket_Protocol="chat\x01"),
        {},
        HandShakeFailed,
        "WebSocket-Protocol",
    ),
]


@pytest.mark.parametrize(
    "request_headers, options, exception, header",
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_request(request_headers, options, exception, header):
    with pytest.raises(HandShakeFailed) as excinfo:
        negotiate(request_headers, allowed_origins=["*"], **options)
    exc = excinfo.value
    assert type(exc) is exception
    assert exc.header == header
    assert exc.status == {HandShakeFailed: 400, UnsupportedVersion: 426}[exception]
    assert exc.reason


def test_key3_refusal_names_the_key_bytes():
    with pytest.raises(HandShakeFailed, match="the 8 key bytes after the headers"):
        negotiate(hixie76_request())
    with pytest.raises(HandShakeFailed, match="the 8 key bytes after the headers"):
        handshake_v76(hixie76_request(), handshake.HIXIE76_BASE_RESPONSE)


def test_hixie76_key_quotient_at_the_limit_is_accepted():
    request = hixie76_request(Sec_WebSocket_Key1="4294967295 ")
    result = negotiate(request, key3=HIXIE76_KEY3)
    assert result.draft == "hixie-76"


def test_unsupported_version_advertises_13():
    with pytest.raises(UnsupportedVersion) as excinfo:
        negotiate(rfc_request(Sec_WebSocket_Version="8"))
    assert excinfo.value.headers == [("Sec-WebSocket-Version", "13")]
    assert excinfo.value.value == "8"


# -- response splitting -----------------------------------------------------------


@pytest.mark.parametrize(
    "request_headers, header",
    [
        (hixie75_request(Origin="http://example.com\r\nSet-Cookie: a=b"), "Origin"),
        (hixie75_request(Origin="http://example.com\nSet-Cookie: a=b"), "Origin"),
        (hixie75_request(Host="example.com\r\nSet-Cookie: a=b"), "Host"),
        (
            hixie75_request(WebSocket_Protocol="chat\r\nSet-Cookie: a=b"),
            "WebSocket-Protocol",
        ),
        (rfc_request(Sec_WebSocket_Protocol="chat\r\nX: y"), "Sec-WebSocket-Protocol"),
        (rfc_request(Sec_WebSocket_Key=RFC_KEY + "\r\nX: y"), "Sec-WebSocket-Key"),
        (rfc_request(Origin="http://example.com\x00"), "Origin"),
    ],
)
def test_control_characters_are_never_echoed(request_headers, header):
    with pytest.raises(HandShakeFailed) as excinfo:
        negotiate(request_headers, allowed_origins="*", subprotocols=["chat"])
    assert excinfo.value.header == header
    assert excinfo.value.status == 400


def test_query_string_with_line_break_is_refused():
    headers = webob_headers("/", hixie75_request(), QUERY_STRING="a\r\nSet-Cookie: x")
    with pytest.raises(HandShakeFailed):
        negotiate(headers, allowed_origins="*")


def test_non_latin1_header_is_refused():
    with pytest.raises(HandShakeFailed) as excinfo:
        negotiate(hixie75_request(Origin="http://\u20ac.com"), allowed_origins="*")
    assert excinfo.value.header == "Origin"


# -- version dispatch and disabled drafts ---------------------------------------------


@pytest.mark.parametrize(
    "request_headers, options, draft",
    [
        (rfc_request(), {}, "rfc6455"),
        (hixie76_request(), {"key3": HIXIE76_KEY3}, "hixie-76"),
        (hixie75_request(), {}, "hixie-75"),
        # Sec-WebSocket-Version wins over hixie-76 keys.
        (rfc_request(Sec_WebSocket_Key1=KEY1, Sec_WebSocket_Key2=KEY2), {}, "rfc6455"),
    ],
)
def test_version_dispatch(request_headers, options, draft):
    assert negotiate(request_headers, **options).draft == draft


@pytest.mark.parametrize(
    "request_headers, versions, advertised",
    [
        (hixie76_request(), ("13",), [("Sec-WebSocket-Version", "13")]),
        (hixie75_request(), ("13",), [("Sec-WebSocket-Version", "13")]),
        (hixie75_request(), ("13", "76"), [("Sec-WebSocket-Version", "13")]),
        (hixie76_request(), ("13", "75"), [("Sec-WebSocket-Version", "13")]),
        (rfc_request(), ("76", "75"), []),
    ],
)
def test_disabled_drafts_are_unsupported(request_headers, versions, advertised):
    with pytest.raises(UnsupportedVersion) as excinfo:
        negotiate(request_headers, key3=HIXIE76_KEY3, versions=versions)
    assert excinfo.value.status == 426
    assert excinfo.value.headers == advertised
    assert excinfo.value.header == "Sec-WebSocket-Version"


def test_enabled_drafts_still_work_when_others_are_disabled():
    assert negotiate(rfc_request(), versions=("13",)).draft == "rfc6455"
    assert negotiate(hixie75_request(), versions=["75"]).draft == "hixie-75"
    assert negotiate(hixie75_request(), versions=[75]).draft == "hixie-75"


@pytest.mark.parametrize(
    "versions", [("rfc6455",), "rfc6455", "rfc6455 hixie-76", ("13", "hixie-76")]
)
def test_versions_take_the_draft_names(versions):
    assert negotiate(rfc_request(), versions=versions).draft == "rfc6455"
    with pytest.raises(UnsupportedVersion):
        negotiate(hixie75_request(), versions=versions)


def test_versions_default_to_every_draft_by_the_names_handshakes_report():
    assert ALL_VERSIONS == ("rfc6455", "hixie-76", "hixie-75")
    assert normalise_versions(ALL_VERSIONS) == ALL_VERSIONS
    assert normalise_versions("13 76 75") == ALL_VERSIONS


@pytest.mark.parametrize(
    "versions", [(), ("12",), ("13", "hybi-10"), "", "rfc6455 hixie-77"]
)
def test_unknown_versions_option_is_a_configuration_error(versions):
    with pytest.raises(IncorrectlyConfigured):
        negotiate(rfc_request(), versions=versions)


# -- origin policy ----------------------------------------------------------------


@pytest.mark.parametrize(
    "host, origin",
    [
        ("example.com", "http://example.com"),
        ("example.com", "https://example.com"),
        ("Example.COM", "http://example.com"),
        ("example.com", "HTTP://EXAMPLE.COM"),
        ("example.com:80", "http://example.com"),
        ("example.com", "http://example.com:80"),
        ("example.com:443", "https://example.com"),
        ("example.com:8080", "http://example.com:8080"),
        ("[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_same_origin_is_accepted_by_default(host, origin):
    assert negotiate(rfc_request(Host=host, Origin=origin)).draft == "rfc6455"


@pytest.mark.parametrize(
    "host, origin",
    [
        ("example.com", "http://evil.com"),
        ("example.com", "http://example.com.evil.com"),
        ("example.com", "http://sub.example.com"),
        ("example.com:8080", "http://example.com"),
        ("example.com", "http://example.com:8080"),
        ("example.com:443", "http://example.com"),
        ("example.com", "null"),
        ("example.com", "example.com"),
        ("example.com", "http://example.com/path"),
        ("example.com", "file://"),
        ("example.com", "http://example.com, http://evil.com"),
    ],
)
def test_cross_origin_is_refused_by_default(host, origin):
    with pytest.raises(InvalidOrigin) as excinfo:
        negotiate(rfc_request(Host=host, Origin=origin))
    exc = excinfo.value
    assert exc.status == 403
    assert exc.header == "Origin"
    assert exc.value == origin
    assert repr(origin) in exc.reason


def environ_request(url_scheme, **headers):
    """Upgrade request headers as ``request.headers`` gives them: with the
    environ, whose ``wsgi.url_scheme`` says how the client reached us."""
    from webob.headers import EnvironHeaders

    environ = {"REQUEST_METHOD": "GET", "wsgi.url_scheme": url_scheme}
    for name, value in rfc_request(**headers).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return EnvironHeaders(environ)


@pytest.mark.parametrize(
    "url_scheme, host, origin, same",
    [
        ("https", "example.com", "https://example.com", True),
        ("https", "example.com:443", "https://example.com", True),
        ("https", "example.com", "https://example.com:443", True),
        ("https", "example.com:8443", "https://example.com:8443", True),
        ("http", "example.com", "http://example.com", True),
        # A different scheme is a different origin (RFC 6454).
        ("https", "example.com", "http://example.com", False),
        ("https", "example.com", "http://example.com:443", False),
        ("https", "example.com", "https://example.com:80", False),
        ("https", "example.com:8443", "http://example.com:8443", False),
        ("http", "example.com", "https://example.com", False),
        ("http", "example.com", "http://example.com:443", False),
        ("http", "example.com:443", "https://example.com", False),
    ],
)
def test_same_origin_compares_the_scheme_from_the_environ(
    url_scheme, host, origin, same
):
    headers = environ_request(url_scheme, Host=host, Origin=origin)
    if same:
        assert negotiate(headers).draft == "rfc6455"
    else:
        with pytest.raises(InvalidOrigin):
            negotiate(headers)


def test_secure_overrides_the_environ_for_the_origin_scheme():
    assert negotiate(rfc_request(Origin="https://example.com"), secure=True)
    with pytest.raises(InvalidOrigin):
        negotiate(rfc_request(Origin="http://example.com"), secure=True)
    with pytest.raises(InvalidOrigin):
        negotiate(rfc_request(Origin="https://example.com"), secure=False)


def test_negotiate_takes_a_request_value():
    from stargate.handshake import Request

    request = Request(
        rfc_request(Origin="https://example.com"),
        method="GET",
        version="HTTP/1.1",
        scheme="https",
        path="/chat room",
        query="a=1",
    )
    assert negotiate(request).draft == "rfc6455"
    assert build_location_url(Request(rfc_request(), scheme="https", path="/a b")) == (
        "wss://example.com/a%20b"
    )
    with pytest.raises(HandShakeFailed, match="GET"):
        negotiate(Request(rfc_request(), method="POST"))
    with pytest.raises(HandShakeFailed, match="HTTP/1.1"):
        negotiate(Request(rfc_request(), version="HTTP/1.0"))
    with pytest.raises(InvalidOrigin):
        negotiate(Request(rfc_request(Origin="http://example.com"), scheme="https"))


def test_a_request_from_an_environ_reads_it_in_place():
    from stargate.handshake import Request

    environ = environ_request("https", Origin="https://example.com").environ
    environ["SERVER_PROTOCOL"] = "HTTP/1.0"
    request = Request.from_environ(environ, version_known=False)
    assert request.version is None and request.scheme == "https"
    assert negotiate(request).draft == "rfc6455"
    with pytest.raises(HandShakeFailed, match="HTTP/1.1"):
        negotiate(Request.from_environ(environ))
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.0"  # untouched


def test_request_without_origin_is_accepted():
    # Browsers always send Origin: a request without one is not hijackable.
    assert negotiate(rfc_request()).draft == "rfc6455"
    assert negotiate(rfc_request(), allowed_origins=["https://a.com"]).draft == (
        "rfc6455"
    )


def test_sec_websocket_origin_of_older_drafts_is_checked():
    request = rfc_request(Sec_WebSocket_Origin="http://evil.com")
    with pytest.raises(InvalidOrigin) as excinfo:
        negotiate(request)
    assert excinfo.value.header == "Sec-WebSocket-Origin"
    request = rfc_request(Sec_WebSocket_Origin="http://example.com")
    assert negotiate(request).draft == "rfc6455"


@pytest.mark.parametrize(
    "allowed, origin",
    [
        (["https://app.example.com"], "https://app.example.com"),
        (["https://app.example.com"], "HTTPS://App.Example.com"),
        (["https://app.example.com"], "https://app.example.com:443"),
        (["https://app.example.com:443"], "https://app.example.com"),
        (("http://localhost:8080", "https://a.com"), "http://localhost:8080"),
        ({"http://a.com"}, "http://a.com"),
        ("http://a.com", "http://a.com"),
        (["*"], "http://anything.example"),
        (["*"], "null"),
        ("*", "http://anything.example"),
    ],
)
def test_allowed_origins_accepts(allowed, origin):
    result = negotiate(rfc_request(Origin=origin), allowed_origins=allowed)
    assert result.draft == "rfc6455"


@pytest.mark.parametrize(
    "allowed, origin",
    [
        (["https://app.example.com"], "http://app.example.com"),
        (["https://app.example.com"], "https://app.example.com:8443"),
        (["https://app.example.com"], "https://example.com"),
        (["https://app.example.com"], "null"),
        (["http://example.com"], "http://example.com.evil.com"),
        ([], "http://example.com"),
    ],
)
def test_allowed_origins_refuses(allowed, origin):
    with pytest.raises(InvalidOrigin) as excinfo:
        negotiate(rfc_request(Origin=origin), allowed_origins=allowed)
    assert excinfo.value.status == 403
    assert excinfo.value.value == origin
    assert repr(origin) in excinfo.value.reason


def test_allowed_origins_replaces_same_origin():
    # Host is example.com, but only another origin is listed.
    request = rfc_request(Origin="http://example.com")
    with pytest.raises(InvalidOrigin):
        negotiate(request, allowed_origins=["https://other.com"])


@pytest.mark.parametrize("entry", ["example.com", "null", "http://a.com/path", ""])
def test_malformed_allowed_origin_is_a_configuration_error(entry):
    with pytest.raises(IncorrectlyConfigured):
        negotiate(rfc_request(Origin="http://a.com"), allowed_origins=[entry])


def test_origin_policy_applies_to_hixie_drafts():
    request = hixie76_request(Origin="http://evil.com")
    with pytest.raises(InvalidOrigin):
        negotiate(request, key3=HIXIE76_KEY3)
    with pytest.raises(InvalidOrigin):
        websocket_handshake(hixie75_request(Origin="http://evil.com"))
    result = negotiate(request, key3=HIXIE76_KEY3, allowed_origins=["http://evil.com"])
    assert b"Sec-WebSocket-Origin: http://evil.com\r\n" in result.response


# -- whatever the client sends, a refusal is a HandShakeFailed ----------------------

header_text = st.text(st.characters(max_codepoint=0x17F), max_size=40)
HEADER_NAMES = [
    "Host",
    "Upgrade",
    "Connection",
    "Origin",
    "Sec-WebSocket-Origin",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Key1",
    "Sec-WebSocket-Key2",
    "WebSocket-Protocol",
]


def _head_lines(response):
    head, sep, _ = response.partition(b"\r\n\r\n")
    assert sep
    return head.split(b"\r\n")


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from([rfc_request, hixie76_request, hixie75_request]),
    changes=st.dictionaries(
        st.sampled_from(HEADER_NAMES), st.none() | header_text, max_size=4
    ),
    key3=st.none() | st.binary(max_size=10),
    allowed=st.sampled_from([None, "*", ["http://example.com"]]),
)
def test_any_request_is_answered_or_refused_with_handshake_failed(
    base, changes, key3, allowed
):
    request = _apply(base(), changes)
    try:
        result = negotiate(request, allowed, key3=key3, subprotocols=["chat", "sample"])
    except HandShakeFailed as exc:
        assert exc.status in (400, 403, 426)
        assert exc.reason
        return
    # Nothing the client sent adds a line to the response.
    expected = {"rfc6455": 4, "hixie-76": 5, "hixie-75": 5}[result.draft]
    lines = _head_lines(result.response)
    assert expected <= len(lines) <= expected + 2
    assert all(b"\n" not in line and b"\r" not in line for line in lines)


@settings(max_examples=300, deadline=None)
@given(key1=header_text, key2=header_text)
def test_any_hixie76_keys_give_an_answer_or_handshake_failed(key1, key2):
    request = hixie76_request(Sec_WebSocket_Key1=key1, Sec_WebSocket_Key2=key2)
    try:
        result = negotiate(request, key3=HIXIE76_KEY3)
    except HandShakeFailed as exc:
        assert exc.header in ("Sec-WebSocket-Key1", "Sec-WebSocket-Key2")
        return
    assert len(result.response.partition(b"\r\n\r\n")[2]) == 16


@settings(max_examples=100, deadline=None)
@given(key=st.binary(min_size=16, max_size=16))
def test_websockets_client_accepts_any_key(key):
    client = ClientProtocol(parse_uri("ws://example.com/"))
    client.key = base64.b64encode(key).decode()  # what connect() sends
    request = client.connect()
    assert request.headers["Sec-WebSocket-Key"] == client.key
    client.send_request(request)
    result = negotiate(dict(request.headers.raw_items()))
    client.receive_data(result.response)
    assert client.state is State.OPEN
