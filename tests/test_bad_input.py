"""A catalogue of malformed handshakes and frames, sent over raw sockets.

Each case is a row: a name, the bytes a hostile or broken client sends and
the exact reaction expected from a live server (stargate's eventlet server
and a Pyramid echo app):

``Http(status, text)``
    an HTTP response with that status whose status line, headers or body
    contain ``text``; then the server hangs up.
``Close(code)``
    the upgrade succeeds, then the server sends a close frame with ``code``
    (read from the frame itself) and closes the TCP connection.
``Hangup()``
    the server closes the TCP connection (a hixie-76 server may first send
    its ``0xFF 0x00`` closing frame), without an HTTP response.

After every case a normal client still connects and echoes, so no bad input
breaks the server for others. Limits of the request head (its size, its
total time) are checked at the end.
"""

import base64
import dataclasses
import socket
import struct
import time
import zlib

import pytest
from pyramid.config import Configurator

from stargate import WebSocketView
from stargate.testing.client import connect
from stargate.testing.server import LiveServer

MAX_SIZE = 4096
ALLOWED_ORIGIN = "http://good.example"
DEADLINE = 5.0  # seconds any single reaction may take


class Echo(WebSocketView):
    def handler(self, websocket):
        while (message := websocket.wait()) is not None:
            websocket.send(message)


def make_app(**extra):
    settings = {
        "stargate.max_message_size": str(MAX_SIZE),
        "stargate.allowed_origins": ALLOWED_ORIGIN,
        "stargate.handshake_timeout": "0.5",
        "stargate.ping_interval": "off",
    }
    settings.update(extra)
    with Configurator(settings=settings) as config:
        config.include("stargate")
        config.add_route("echo", "/echo")
        config.add_view(Echo, route_name="echo")
        return config.make_wsgi_app()


@pytest.fixture(scope="module")
def server():
    with LiveServer(make_app(), request_timeout=2.0) as live:
        yield live


# -- building requests and frames ------------------------------------------------


def request(
    method="GET", path="/echo", version="HTTP/1.1", headers=None, drop=(), body=b""
):
    """An RFC 6455 upgrade request, with ``headers`` overriding the defaults
    (a list value repeats the header) and the names in ``drop`` left out."""
    fields = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
        "Sec-WebSocket-Version": "13",
    }
    fields.update(headers or {})
    lines = [f"{method} {path} {version}"]
    for name, value in fields.items():
        if name in drop:
            continue
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{name}: {item}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def hixie76(key1="4 @1  46546xW%0l 1 5", key2="12998 5 Y3 1  .P00", key3=b"^n:ds[4U"):
    """A hixie-76 request (the draft's own worked example by default)."""
    lines = [
        "GET /echo HTTP/1.1",
        "Host: 127.0.0.1",
        "Connection: Upgrade",
        "Upgrade: WebSocket",
        "Origin: http://good.example",
    ]
    if key1 is not None:
        lines.append(f"Sec-WebSocket-Key1: {key1}")
    if key2 is not None:
        lines.append(f"Sec-WebSocket-Key2: {key2}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + key3


def frame(opcode, payload=b"", *, fin=True, rsv=0, mask=True, length=None):
    """One RFC 6455 frame as a client sends it (masked unless told not to).

    ``length`` overrides the encoded payload length (a 64-bit field)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if mask else 0
    if length is not None:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    elif len(payload) < 126:
        header = struct.pack("!BB", first, mask_bit | len(payload))
    elif len(payload) < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, len(payload))
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, len(payload))
    if not mask:
        return header + payload
    key = b"\x37\xfa\x21\x3d"
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text(data, **kw):
    return frame(0x1, data.encode() if isinstance(data, str) else data, **kw)


def close(code=None, reason=b""):
    payload = b"" if code is None else struct.pack("!H", code) + reason
    return frame(0x8, payload)


def deflate_bomb(size):
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = compressor.compress(b"\x00" * size) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4]  # RFC 7692: the trailing 00 00 ff ff is left out


def final_blocks(*parts):
    """Each part as a whole deflate stream ending with a BFINAL block."""
    out = b""
    for part in parts:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        out += compressor.compress(part) + compressor.flush(zlib.Z_FINISH)
    return out


TLS_CLIENT_HELLO = bytes.fromhex(
    "16030100a5010000a10303" + "00" * 32 + "000020c02bc02fc02cc030cca9cca8c013c014"
    "009c009d002f0035000a0100005800000014001200000f7777772e6578616d706c652e636f6d"
    "000b000403000102000a000a0008001d001700180019000d00120010040104030501050306"
    "010603020102030010000e000c02683208687474702f312e31"
)

# -- reactions -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Http:
    status: int
    text: str


@dataclasses.dataclass(frozen=True)
class Close:
    code: int


@dataclasses.dataclass(frozen=True)
class Hangup:
    pass


@dataclasses.dataclass(frozen=True)
class Echoed:
    """The connection stays up and the server sends ``data`` back."""

    data: bytes


def _complete_http_response(data):
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/"):
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def read_until_closed(sock, deadline=DEADLINE, until=None):
    """Everything the server sends until it closes, or until ``until(data)``
    is true (bounded by ``deadline``); returns (data, finished)."""
    sock.settimeout(0.2)
    data = b""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if until is not None and until(data):
            return data, True
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def read_response_head(sock):
    sock.settimeout(DEADLINE)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"server hung up during the handshake: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def first_close_code(data):
    """The code of the first close frame in the server's (unmasked) frames."""
    offset = 0
    while offset + 2 <= len(data):
        opcode = data[offset] & 0x0F
        length = data[offset + 1] & 0x7F
        offset += 2
        if length == 126:
            (length,) = struct.unpack_from("!H", data, offset)
            offset += 2
        elif length == 127:
            (length,) = struct.unpack_from("!Q", data, offset)
            offset += 8
        payload = data[offset : offset + length]
        offset += length
        if opcode == 0x8:
            return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
    return None


def http_status(data):
    """The status of an HTTP response; eventlet answers a request it cannot
    parse as HTTP/0.9 would, with only the body of its error page."""
    if data.startswith(b"HTTP/"):
        return int(data.split(b" ", 2)[1])
    marker = b"Error code: "
    assert marker in data, data[:300]
    start = data.index(marker) + len(marker)
    return int(data[start : start + 3])


def react(port, handshake, frames=b"", upgraded=True, hixie=False, expect_echo=None):
    """Send ``handshake``; if ``upgraded``, expect 101 and send ``frames``.
    Returns the reaction the server showed."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(handshake)
        if not upgraded:
            # A complete HTTP/1.1 error response may keep the connection.
            data, closed = read_until_closed(sock, until=_complete_http_response)
            assert closed, f"server kept the connection open; sent {data[:200]!r}"
            if not data or data.startswith(b"\xff\x00"):
                return Hangup(), data
            return Http(http_status(data), ""), data
        head, rest = read_response_head(sock)
        assert head.split(b" ", 2)[1] == b"101", head
        if hixie:
            rest = rest[16:]  # the challenge response
        try:
            sock.sendall(frames)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if isinstance(expect_echo, bytes):
            data, _ = read_until_closed(sock, until=lambda d: expect_echo in rest + d)
            return Echoed(expect_echo if expect_echo in rest + data else b""), data
        data, closed = read_until_closed(sock)
        data = rest + data
        assert closed, f"server kept the connection open; sent {data[:200]!r}"
        if hixie:
            assert data in (b"", b"\xff\x00"), data[:300]
            return Hangup(), data
        code = first_close_code(data)
        return (Hangup() if code is None else Close(code)), data


# -- the catalogue ---------------------------------------------------------------

RFC_KEY = base64.b64encode(b"0123456789abcdef").decode()
V76_EXAMPLE_BAD = "no spaces 12345"

HANDSHAKES = [
    # name, bytes sent, expected reaction
    ("plain GET without Upgrade", request(drop=("Upgrade",)), Http(426, "WebSocket")),
    (
        "Connection header missing",
        request(drop=("Connection",)),
        Http(400, "Connection"),
    ),
    (
        "Connection: keep-alive only",
        request(headers={"Connection": "keep-alive"}),
        Http(400, "Connection"),
    ),
    ("Upgrade: h2c", request(headers={"Upgrade": "h2c"}), Http(426, "")),
    (
        "Sec-WebSocket-Key missing",
        request(drop=("Sec-WebSocket-Key",)),
        Http(400, "Sec-WebSocket-Key"),
    ),
    (
        "key of 8 bytes",
        request(headers={"Sec-WebSocket-Key": base64.b64encode(b"12345678").decode()}),
        Http(400, "Sec-WebSocket-Key"),
    ),
    (
        "key of 17 bytes",
        request(headers={"Sec-WebSocket-Key": base64.b64encode(b"x" * 17).decode()}),
        Http(400, "Sec-WebSocket-Key"),
    ),
    (
        "key not base64",
        request(headers={"Sec-WebSocket-Key": "!!!!not-base64!!!!!!!!=="}),
        Http(400, "Sec-WebSocket-Key"),
    ),
    (
        "key sent twice",
        request(headers={"Sec-WebSocket-Key": [RFC_KEY, RFC_KEY]}),
        Http(400, "Sec-WebSocket-Key"),
    ),
    ("version missing", request(drop=("Sec-WebSocket-Version",)), Http(400, "")),
    ("version 12", request(headers={"Sec-WebSocket-Version": "12"}), Http(426, "13")),
    (
        "version 8 (hybi-08)",
        request(headers={"Sec-WebSocket-Version": "8"}),
        Http(426, "13"),
    ),
    (
        "version not a number",
        request(headers={"Sec-WebSocket-Version": "thirteen"}),
        Http(426, "13"),
    ),
    (
        "version sent twice",
        request(headers={"Sec-WebSocket-Version": ["13", "13"]}),
        Http(400, ""),
    ),
    ("POST upgrade", request(method="POST"), Http(400, "GET")),
    ("HTTP/1.0 upgrade", request(version="HTTP/1.0"), Http(400, "HTTP/1.1")),
    ("Host missing", request(drop=("Host",)), Http(400, "Host")),
    (
        "Origin not allowed",
        request(headers={"Origin": "http://evil.example"}),
        Http(403, "evil.example"),
    ),
    ("Origin null", request(headers={"Origin": "null"}), Http(403, "")),
    ("Origin not a URL", request(headers={"Origin": "::::"}), Http(403, "")),
    ("request line over 8 KiB", request(path="/echo?" + "a" * 9000), Http(414, "")),
    (
        "header line over 8 KiB",
        request(headers={"X-Big": "b" * 9000}),
        Http(400, "Header Line Too Long"),
    ),
    (
        "headers over 64 KiB",
        request(headers={f"X-H{i}": "c" * 4000 for i in range(20)}),
        Http(400, "Headers Too Large"),
    ),
    (
        "more than 100 headers",
        request(headers={f"X-N{i}": "1" for i in range(110)}),
        Http(431, ""),
    ),
    ("hixie-76 key without spaces", hixie76(key1="12345678"), Http(400, "spaces")),
    ("hixie-76 key without digits", hixie76(key1="a b c d"), Http(400, "digits")),
    (
        "hixie-76 key not divisible by its spaces",
        hixie76(key1="1 2 3 4 5 6 7 8 9 9 9 0 0 1"),
        Http(400, "Sec-WebSocket-Key1"),
    ),
    (
        "hixie-76 key over 32 bits",
        hixie76(key1="9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9"),
        Http(400, "Sec-WebSocket-Key1"),
    ),
    ("hixie-76 Key2 missing", hixie76(key2=None), Http(400, "Key2")),
    ("hixie-76 key3 missing", hixie76(key3=b""), Http(400, "")),
    ("hixie-76 key3 short", hixie76(key3=b"1234"), Http(400, "8 bytes")),
    ("TLS ClientHello on the plain port", TLS_CLIENT_HELLO, Http(400, "")),
    ("binary garbage", bytes(range(256)) + b"\r\n\r\n", Http(400, "")),
    ("empty request line", b"\r\n\r\n", Hangup()),
    ("lone newline request", b"GET\r\n\r\n", Http(400, "")),
]

FRAMES = [
    ("invalid UTF-8 in one text frame", text(b"\xff\xfe"), Close(1007)),
    (
        "invalid UTF-8 split across a fragment boundary, fail fast",
        text(b"ok\xed\xa0\x80", fin=False),
        Close(1007),
    ),
    ("overlong UTF-8 encoding", text(b"\xc0\xaf"), Close(1007)),
    (
        "invalid UTF-8 early in a text frame that never ends, fail fast",
        text(b"ok\xc0\xaf" + b"x" * 200)[:40],
        Close(1007),
    ),
    ("invalid UTF-8 in the close reason", close(1000, b"\xff"), Close(1007)),
    ("close code 999", close(999), Close(1002)),
    ("close code 1005 (reserved, never sent)", close(1005), Close(1002)),
    ("close code 1006 (reserved, never sent)", close(1006), Close(1002)),
    ("close code 1015 (reserved, never sent)", close(1015), Close(1002)),
    ("close code 2000 (unassigned)", close(2000), Close(1002)),
    ("close code 5000", close(5000), Close(1002)),
    ("close payload of one byte", frame(0x8, b"\x03"), Close(1002)),
    (
        "close payload over 125 bytes",
        frame(0x8, struct.pack("!H", 1000) + b"r" * 124),
        Close(1002),
    ),
    ("RSV2 set", text("x", rsv=0b010), Close(1002)),
    ("RSV3 set", text("x", rsv=0b001), Close(1002)),
    ("RSV1 without permessage-deflate", text("x", rsv=0b100), Close(1002)),
    ("opcode 3 (reserved data)", frame(0x3, b"x"), Close(1002)),
    ("opcode 0xB (reserved control)", frame(0xB, b"x"), Close(1002)),
    ("fragmented ping", frame(0x9, b"p", fin=False), Close(1002)),
    ("fragmented close", frame(0x8, struct.pack("!H", 1000), fin=False), Close(1002)),
    ("ping with a 126-byte payload", frame(0x9, b"p" * 126), Close(1002)),
    ("unmasked text frame", text("hello", mask=False), Close(1002)),
    ("continuation without a start", frame(0x0, b"x"), Close(1002)),
    (
        "new text frame inside a fragmented message",
        text("a", fin=False) + text("b"),
        Close(1002),
    ),
    (
        "new binary frame inside a fragmented message",
        text("a", fin=False) + frame(0x2, b"b"),
        Close(1002),
    ),
    ("message over max_message_size", text("m" * (MAX_SIZE + 1)), Close(1009)),
    (
        "fragments adding up past max_message_size",
        text("m" * 3000, fin=False) + frame(0x0, b"m" * 3000),
        Close(1009),
    ),
    ("64-bit length with the top bit set", text(b"", length=2**63), Close(1002)),
    ("64-bit length of 2**62", text(b"", length=2**62), Close(1009)),
    ("data after the close frame", close(1000) + text("late"), Close(1000)),
    (
        "endless empty continuation frames",
        text("a", fin=False) + frame(0x0, b"", fin=False) * (MAX_SIZE // 8),
        Close(1009),
    ),
    (
        "one-byte fragments past the fragment budget",
        text("a", fin=False) + frame(0x0, b"a", fin=False) * (MAX_SIZE // 8),
        Close(1009),
    ),
    (
        "close during a fragmented message",
        text("a", fin=False) + frame(0x0, b"b", fin=False) + close(1000),
        Close(1000),
    ),
    ("garbage after the upgrade", bytes(range(256)), Close(1002)),
]

BAD_DEFLATE_OFFER = "permessage-deflate; client_max_window_bits=99"

#: Cases whose upgrade itself is unusual: (name, handshake, frames, expected).
ODD_UPGRADES = [
    # RFC 7692 lets a server decline an offer it cannot accept: it does, so
    # a compressed frame is then a protocol error.
    (
        "deflate offer with window bits 99 is declined",
        request(headers={"Sec-WebSocket-Extensions": BAD_DEFLATE_OFFER}),
        text("x", rsv=0b100),
        Close(1002),
    ),
    (
        "deflate negotiated: a compressed frame that is not deflate data",
        request(headers={"Sec-WebSocket-Extensions": "permessage-deflate"}),
        text(b"\xff\xff\xff\xff\xff", rsv=0b100),
        Close(1002),
    ),
    (
        "deflate negotiated: a bomb inflating past max_message_size",
        request(headers={"Sec-WebSocket-Extensions": "permessage-deflate"}),
        text(deflate_bomb(64 * MAX_SIZE), rsv=0b100),
        Close(1009),
    ),
    (
        "deflate negotiated: a second deflate stream after the final block",
        request(headers={"Sec-WebSocket-Extensions": "permessage-deflate"}),
        text(final_blocks(b"hello", b"second"), rsv=0b100),
        Close(1002),
    ),
    (
        "deflate negotiated: junk after the final block",
        request(headers={"Sec-WebSocket-Extensions": "permessage-deflate"}),
        text(final_blocks(b"hello") + b"junk", rsv=0b100),
        Close(1002),
    ),
    (
        "deflate negotiated: endless empty compressed continuations",
        request(headers={"Sec-WebSocket-Extensions": "permessage-deflate"}),
        text(deflate_bomb(1), rsv=0b100, fin=False)
        + frame(0x0, b"", fin=False) * (MAX_SIZE // 8),
        Close(1009),
    ),
]

#: Unusual but valid sequences: the server must answer them and go on.
#: (name, frames, the bytes the echo server must send back)
SURVIVABLE = [
    (
        "pings inside a long fragmented message",
        text("a", fin=False)
        + (frame(0x9, b"p") + frame(0x0, b"b", fin=False)) * 40
        + frame(0x0, b"c"),
        b"\x81\x2a" + b"a" + b"b" * 40 + b"c",
    ),
    (
        "a thousand pings in one segment are answered",
        b"".join(frame(0x9, b"%d" % i) for i in range(1000)) + text("after"),
        b"\x81\x05after",
    ),
]

HIXIE_FRAMES = [
    ("hixie-76 text frame with invalid UTF-8", b"\x00\xc3\x28\xff", Hangup()),
    ("hixie-76 text frame with a lone surrogate", b"\x00\xed\xa0\x80\xff", Hangup()),
    (
        "hixie-76 unterminated text frame over the limit",
        b"\x00" + b"a" * (MAX_SIZE + 10),
        Hangup(),
    ),
    # Frames of a type other than 0x00 are discarded as the draft says,
    # without buffering them, whatever their length: the connection goes on.
    (
        "hixie-76 0x42 frame over the limit is discarded",
        b"\x42" + b"a" * (MAX_SIZE + 10) + b"\xff\x00hi\xff",
        Echoed(b"\x00hi\xff"),
    ),
    ("hixie-76 length frame announcing 256 MiB", b"\x80\x81\x80\x80\x80\x00", Hangup()),
    ("hixie-76 length frame with an endless length", b"\x80" + b"\x81" * 20, Hangup()),
]


def assert_still_serves(server):
    with connect(server.ws_url("/echo"), timeout=DEADLINE) as client:
        client.send("still here")
        assert client.receive(timeout=DEADLINE) == "still here"


def check_http(reaction, expected, data):
    assert isinstance(reaction, Http), (reaction, data[:300])
    assert reaction.status == expected.status, data[:500]
    assert expected.text.encode() in data, data[:500]


@pytest.mark.parametrize(
    "sent, expected", [c[1:] for c in HANDSHAKES], ids=[c[0] for c in HANDSHAKES]
)
def test_bad_handshake(server, sent, expected):
    reaction, data = react(server.port, sent, upgraded=False)
    if isinstance(expected, Http):
        check_http(reaction, expected, data)
    else:
        assert reaction == expected, data[:300]
    assert_still_serves(server)


@pytest.mark.parametrize(
    "sent, expected", [c[1:] for c in FRAMES], ids=[c[0] for c in FRAMES]
)
def test_bad_frame(server, sent, expected):
    reaction, data = react(server.port, request(), sent)
    assert reaction == expected, data[:300]
    assert_still_serves(server)


@pytest.mark.parametrize(
    "sent, expected", [c[1:] for c in HIXIE_FRAMES], ids=[c[0] for c in HIXIE_FRAMES]
)
def test_bad_hixie_frame(server, sent, expected):
    echo = expected.data if isinstance(expected, Echoed) else None
    reaction, data = react(server.port, hixie76(), sent, hixie=True, expect_echo=echo)
    assert reaction == expected, data[:300]
    assert_still_serves(server)


@pytest.mark.parametrize(
    "handshake, sent, expected",
    [c[1:] for c in ODD_UPGRADES],
    ids=[c[0] for c in ODD_UPGRADES],
)
def test_odd_upgrade(server, handshake, sent, expected):
    reaction, data = react(server.port, handshake, sent)
    assert reaction == expected, data[:300]
    assert_still_serves(server)


@pytest.mark.parametrize(
    "sent, echoed", [c[1:] for c in SURVIVABLE], ids=[c[0] for c in SURVIVABLE]
)
def test_survivable_sequence(server, sent, echoed):
    reaction, data = react(server.port, request(), sent, expect_echo=echoed)
    assert reaction == Echoed(echoed), data[:300]
    assert_still_serves(server)


def test_the_catalogue_is_at_least_forty_cases():
    cases = HANDSHAKES + FRAMES + HIXIE_FRAMES + ODD_UPGRADES + SURVIVABLE
    assert len(cases) >= 40


# -- limits of the request head and of inflation ----------------------------------


def test_a_slowloris_trickling_the_handshake_is_dropped_after_request_timeout():
    # eventlet's socket timeout bounds each wait for a byte; stargate's
    # server bounds the whole request head by request_timeout.
    with LiveServer(make_app(), request_timeout=0.5) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
            started = time.monotonic()
            sent = 0
            try:
                for byte in request():
                    sock.sendall(bytes([byte]))
                    sent += 1
                    time.sleep(0.05)  # every byte well within the socket timeout
                    if time.monotonic() - started > 5:
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass
            data, closed = read_until_closed(sock, deadline=30)
            assert closed and data == b""
            assert sent < len(request())
        assert_still_serves(live)


def test_a_stalled_request_body_is_dropped_after_request_timeout():
    # request_timeout covers the body too: a client that announces 100
    # bytes and stops after 10 must not hold an application's read forever.
    read = []

    def app(environ, start_response):
        try:
            read.append(environ["wsgi.input"].read(100))
        except OSError as exc:  # the read timed out
            read.append(exc)
            raise
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    with LiveServer(app, request_timeout=0.5) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
            sock.sendall(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                + b"0123456789"
            )
            data, closed = read_until_closed(sock, deadline=30)
        assert closed, data
        assert not data.startswith(b"HTTP/1.1 200"), data
        assert len(read) == 1 and isinstance(read[0], OSError), read


def test_a_deflate_bomb_is_stopped_at_max_message_size_with_bounded_memory():
    # 256 MiB of zeros in 64 fragments of about 4 KiB each (each frame far
    # under the limit): the server must stop inflating at 1 MiB.
    import psutil

    bomb = deflate_bomb(256 * 2**20)
    pieces = [bomb[i : i + 4096] for i in range(0, len(bomb), 4096)]
    frames = frame(0x2, pieces[0], fin=False, rsv=0b100)
    for piece in pieces[1:-1]:
        frames += frame(0x0, piece, fin=False)
    frames += frame(0x0, pieces[-1])
    app = make_app(**{"stargate.max_message_size": str(2**20)})
    process = psutil.Process()
    with LiveServer(app) as live:
        before = process.memory_info().rss
        deflate = {"Sec-WebSocket-Extensions": "permessage-deflate"}
        reaction, data = react(live.port, request(headers=deflate), frames)
        assert reaction == Close(1009), data[:200]
        assert process.memory_info().rss - before < 64 * 2**20
        assert_still_serves(live)


def test_a_message_in_one_byte_fragments_is_stopped_with_bounded_memory():
    # One 1 MiB message as 1-byte fragments, under the default 1 MiB limit:
    # the server used to keep an object per fragment (about 40 MiB). Each
    # continuation now costs FRAGMENT_OVERHEAD bytes of the budget, so the
    # server closes with 1009 after max_size // 65 fragments, holding little.
    import tracemalloc

    limit = 2**20
    app = make_app(**{"stargate.max_message_size": str(limit)})
    chunk = frame(0x0, b"a", fin=False) * 8192
    with LiveServer(app) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
            sock.sendall(request())
            head, rest = read_response_head(sock)
            assert b" 101 " in head
            tracemalloc.start()
            try:
                sock.sendall(text("a", fin=False))
                sent = 0
                try:
                    while sent < limit:
                        sock.sendall(chunk)
                        sent += 8192
                except (BrokenPipeError, ConnectionResetError):
                    pass
                data, closed = read_until_closed(sock, deadline=10)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        assert closed
        assert first_close_code(rest + data) == 1009
        assert peak < 8 * 2**20, peak
        assert_still_serves(live)


# -- the server's own error page ---------------------------------------------------

FAILING_APP = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
from pyramid.config import Configurator
from stargate.factory import serve

def boom(request):
    raise RuntimeError("password=hunter2 at /srv/app/models.py")

def ok(request):
    return request.response

with Configurator() as config:
    config.add_route("boom", "/boom")
    config.add_view(boom, route_name="boom")
    config.add_route("ok", "/ok")
    config.add_view(ok, route_name="ok")
    app = config.make_wsgi_app()
serve(app, "127.0.0.1", int(sys.argv[1]), access_log=False)
"""


def test_an_unhandled_error_gets_a_generic_page_and_one_logged_traceback():
    # Under stargate.factory.serve (what egg:stargate#main runs), eventlet's
    # default sent the traceback itself as the 500 body.
    import sys

    from stargate.factory import ERROR_PAGE
    from tests.clients import ServerProcess, free_port, http, wait_until

    port = free_port()
    command = [sys.executable, "-W", "ignore", "-c", FAILING_APP, str(port)]
    with ServerProcess(command, port=port) as server:
        server.wait_ready()
        response = http(server.url + "/boom")
        assert response.status == 500
        assert response.body == ERROR_PAGE
        assert b"hunter2" not in response.body
        wait_until(lambda: "hunter2" in server.output, 10, message="the log")
        assert http(server.url + "/ok").status == 200
        output = server.output
        assert output.count("ERROR stargate.server GET /boom failed") == 1, output
        assert output.count("RuntimeError: password=hunter2") == 1, output


# -- the same-origin default, by scheme -------------------------------------------


class _ForwardedHttps:
    """What a trusted TLS-terminating proxy's filter does: the request came
    in over https (PasteDeploy's ``prefix`` filter with ``scheme = https``)."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        environ["wsgi.url_scheme"] = "https"
        return self.app(environ, start_response)


@pytest.mark.parametrize(
    "behind_https, origin, status",
    [
        (False, "http://127.0.0.1", 101),
        (False, "https://127.0.0.1", 403),
        (False, "http://127.0.0.1:443", 403),
        (True, "https://127.0.0.1", 101),
        (True, "http://127.0.0.1", 403),
        (True, "http://127.0.0.1:443", 403),
        (True, "https://127.0.0.1:80", 403),
    ],
)
def test_the_same_origin_default_compares_schemes(behind_https, origin, status):
    app = make_app(**{"stargate.allowed_origins": ""})
    if behind_https:
        app = _ForwardedHttps(app)
    with LiveServer(app) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
            sock.sendall(request(headers={"Origin": origin}))
            head, _ = read_response_head(sock)
        assert head.split(b" ", 2)[1] == str(status).encode(), head
        assert_still_serves(live)


def test_hixie76_headers_with_only_rfc6455_enabled_get_426_without_waiting():
    # With stargate.protocols = 13 the server used to wait (up to
    # handshake_timeout, here 60 s) for hixie-76's 8 key bytes before
    # refusing the draft; the refusal needs none of them.
    app = make_app(**{"stargate.protocols": "13", "stargate.handshake_timeout": "60"})
    with LiveServer(app) as live:
        reaction, data = react(live.port, hixie76(key3=b""), upgraded=False)
        check_http(reaction, Http(426, "13"), data)
        assert_still_serves(live)


def test_pipelined_plain_requests_are_each_answered(server):
    plain = b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    last = b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(plain * 3 + last)
        data, closed = read_until_closed(sock)
    assert closed
    assert data.count(b"HTTP/1.1 426 ") == 4, data[:300]
    assert_still_serves(server)


def test_an_upgrade_pipelined_behind_a_plain_request_works(server):
    plain = b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    def upgraded(data):
        return b" 101 " in data and data.endswith(b"\r\n\r\n")

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(plain + request())
        data, _ = read_until_closed(sock, until=upgraded)
        assert data.startswith(b"HTTP/1.1 426 ") and upgraded(data), data[:300]
        sock.sendall(text("after a refusal"))
        data, _ = read_until_closed(sock, until=lambda d: b"after a refusal" in d)
        assert data == b"\x81\x0fafter a refusal"
    assert_still_serves(server)


class Measure(WebSocketView):
    """Answers each message with its length, keeping nothing of it."""

    def handler(self, websocket):
        while True:
            message = websocket.wait()
            if message is None:
                return
            size = len(message)
            del message
            websocket.send(str(size))


def test_an_idle_connection_does_not_hold_its_last_large_message():
    # The frame parser kept the receive buffer of the last frame until the
    # next read: an idle connection held up to max_message_size.
    import tracemalloc

    size = 2**20
    with Configurator(settings={"stargate.ping_interval": "off"}) as config:
        config.include("stargate")
        config.add_route("measure", "/measure")
        config.add_view(Measure, route_name="measure")
        app = config.make_wsgi_app()
    big = frame(0x2, b"\x00" * size)  # the client's bytes, built first
    with LiveServer(app) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
            sock.sendall(request(path="/measure"))
            read_response_head(sock)
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                sock.sendall(big)
                answer = b"\x81\x07" + str(size).encode()
                data, _ = read_until_closed(sock, until=lambda d: answer in d)
                assert answer in data, data[:100]
                held = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
        assert held < size // 4, held
