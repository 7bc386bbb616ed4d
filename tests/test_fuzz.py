"""Fuzzing: the handshake, the protocol state machine and a live server.

The budget is small in CI (the file runs in well under 30 seconds); set
``STARGATE_FUZZ_EXAMPLES`` to raise it for a long local run::

    STARGATE_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py

* :func:`negotiate` gets random requests (header mappings plus a WSGI
  environ): only a :class:`Handshake` or a ``HandShakeFailed`` with a known
  status comes out, and no response header can be split by what the client
  sent.
* A hypothesis state machine drives :class:`ServerProtocol` with valid
  messages, fragments, pings, pongs, closes and garbage in random chunks:
  it never raises, delivers exactly the messages sent while the stream is
  valid, and fails with a ProtocolError carrying a valid close code.
* Random frame sequences go over real sockets to a live server; it answers
  each with a close frame or a hang-up and keeps serving.
"""

import base64
import os
import random
import socket
import struct
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from pyramid.config import Configurator
from webob.headers import EnvironHeaders

from stargate import WebSocketView
from stargate.connection import open_websockets
from stargate.deflate import DeflateParams
from stargate.exceptions import HandShakeFailed, ProtocolError
from stargate.frames import (
    Frame,
    Opcode,
    WireFormat,
    is_valid_close_code,
    serialize_frame,
)
from stargate.handshake import Handshake, negotiate
from stargate.protocol import (
    FRAGMENT_OVERHEAD,
    BinaryMessage,
    CloseReceived,
    Ping,
    Pong,
    ServerProtocol,
    TextMessage,
)
from stargate.testing.client import connect
from stargate.testing.server import LiveServer

EXAMPLES = int(os.environ.get("STARGATE_FUZZ_EXAMPLES", "0")) or None


def budget(default):
    return EXAMPLES or default


FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- the handshake ---------------------------------------------------------------

_HEADER_NAMES = [
    "Host",
    "Upgrade",
    "Connection",
    "Origin",
    "Sec-WebSocket-Origin",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Key1",
    "Sec-WebSocket-Key2",
    "Sec-WebSocket-Protocol",
    "WebSocket-Protocol",
    "Sec-WebSocket-Extensions",
    "X-Forwarded-Proto",
]

_PLAUSIBLE = [
    "websocket",
    "WebSocket",
    "Upgrade",
    "keep-alive, Upgrade",
    "13",
    "8",
    "127.0.0.1",
    "example.com:80",
    "http://example.com",
    "null",
    base64.b64encode(b"0123456789abcdef").decode(),
    "4 @1  46546xW%0l 1 5",
    "12998 5 Y3 1  .P00",
    "chat, superchat",
    "permessage-deflate; client_max_window_bits",
    "permessage-deflate; server_max_window_bits=08",
    "permessage-deflate; server_no_context_takeover; x=1",
    "",
]

_values = st.one_of(
    st.sampled_from(_PLAUSIBLE),
    st.text(max_size=40),
    st.text(alphabet="0123456789 :=;,\t\r\n\x00", max_size=30),
)

_environ_extras = st.fixed_dictionaries(
    {},
    optional={
        "REQUEST_METHOD": st.sampled_from(["GET", "POST", "get", "", "HEAD"]),
        "SERVER_PROTOCOL": st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", ""]),
        "PATH_INFO": st.text(max_size=20),
        "QUERY_STRING": st.text(max_size=20),
        "wsgi.url_scheme": st.sampled_from(["http", "https", "ftp"]),
    },
)


def _environ(headers, extras):
    environ = {"REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1"}
    environ.update(extras)
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


@settings(max_examples=budget(300), **FUZZ)
@given(
    headers=st.dictionaries(st.sampled_from(_HEADER_NAMES), _values, max_size=10),
    extras=_environ_extras,
    key3=st.one_of(st.none(), st.binary(max_size=10)),
    versions=st.lists(st.sampled_from(["13", "76", "75"]), min_size=1, unique=True),
    compression=st.booleans(),
    origins=st.sampled_from([None, ("*",), ("http://example.com",)]),
    as_environ=st.booleans(),
)
def test_negotiate_returns_a_handshake_or_a_refusal(
    headers, extras, key3, versions, compression, origins, as_environ
):
    request = EnvironHeaders(_environ(headers, extras)) if as_environ else headers
    try:
        handshake = negotiate(
            request,
            origins,
            key3=key3,
            versions=versions,
            compression=compression,
            subprotocols=("chat",),
        )
    except HandShakeFailed as exc:
        assert exc.status in (400, 403, 426)
        assert isinstance(exc.reason, str) and exc.reason
        for name, value in exc.headers:
            assert "\r" not in value and "\n" not in value
        return
    assert isinstance(handshake, Handshake)
    head, sep, _ = handshake.response.partition(b"\r\n\r\n")
    assert sep
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 101")
    for line in lines[1:]:
        assert b":" in line and b"\n" not in line and b"\r" not in line


# -- the protocol state machine --------------------------------------------------

MAX_SIZE = 300


def client_frame(opcode, payload=b"", fin=True, rsv=0):
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    if len(payload) < 126:
        header = struct.pack("!BB", first, 0x80 | len(payload))
    else:
        header = struct.pack("!BBH", first, 0x80 | 126, len(payload))
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class ProtocolMachine(RuleBasedStateMachine):
    """A client talking to ServerProtocol, sometimes validly, sometimes not."""

    def __init__(self):
        super().__init__()
        self.p = ServerProtocol(WireFormat(), max_message_size=MAX_SIZE)
        self.pending = b""  # bytes written but not yet fed to the protocol
        self.expected = []  # messages the peer sent, while the stream is valid
        self.received = []
        self.valid = True  # only valid frames so far, and no close
        self.fragmenting = False

    def feed(self, data, cut):
        self.pending += data
        cut = min(cut, len(self.pending))
        piece, self.pending = self.pending[:cut], self.pending[cut:]
        if piece:
            self.p.receive_data(piece)
        self.collect()

    def flush(self):
        if self.pending:
            self.p.receive_data(self.pending)
            self.pending = b""
        self.collect()

    def collect(self):
        for event in self.p.events_received():
            assert isinstance(
                event, (TextMessage, BinaryMessage, Ping, Pong, CloseReceived)
            )
            if isinstance(event, (TextMessage, BinaryMessage)):
                self.received.append(event.data)
        self.p.data_to_send()

    @rule(
        message=st.one_of(st.text(max_size=80), st.binary(max_size=80)),
        parts=st.integers(1, 4),
        cut=st.integers(0, 400),
    )
    def send_message(self, message, parts, cut):
        if self.fragmenting:
            return
        payload = message.encode() if isinstance(message, str) else message
        opcode = 0x1 if isinstance(message, str) else 0x2
        size = max(1, -(-len(payload) // parts))
        chunks = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
        data = b""
        for i, chunk in enumerate(chunks):
            data += client_frame(opcode if i == 0 else 0x0, chunk, i == len(chunks) - 1)
        if len(payload) + FRAGMENT_OVERHEAD * (len(chunks) - 1) > MAX_SIZE:
            self.valid = False  # over the limit once fragments are charged: 1009
        if self.valid:
            self.expected.append(message)
        self.feed(data, cut)

    @rule(cut=st.integers(0, 400))
    def start_fragmented_message(self, cut):
        if self.fragmenting:
            return
        self.fragmenting = True
        if self.valid:
            self.expected.append("ab")
        self.feed(client_frame(0x1, b"a", fin=False), cut)

    @rule(cut=st.integers(0, 400))
    def end_fragmented_message(self, cut):
        if not self.fragmenting:
            return
        self.fragmenting = False
        self.feed(client_frame(0x0, b"b"), cut)

    @rule(payload=st.binary(max_size=125), pong=st.booleans(), cut=st.integers(0, 400))
    def control(self, payload, pong, cut):
        self.feed(client_frame(0xA if pong else 0x9, payload), cut)

    @rule(garbage=st.binary(min_size=1, max_size=40), cut=st.integers(0, 400))
    def garbage(self, garbage, cut):
        self.valid = False
        self.feed(garbage, cut)

    @rule(code=st.integers(0, 5000), reason=st.binary(max_size=20))
    def close(self, code, reason):
        self.valid = False
        self.feed(client_frame(0x8, struct.pack("!H", code) + reason), 10**6)

    @rule(message=st.text(max_size=50))
    def server_sends(self, message):
        try:
            self.p.send_message(message)
        except Exception as exc:  # only once closing: ConnectionClosed
            assert type(exc).__name__ == "ConnectionClosed", exc
        self.p.data_to_send()

    @rule()
    def flush_everything(self):
        self.flush()

    @invariant()
    def errors_are_protocol_errors_with_a_valid_code(self):
        error = self.p.error
        if error is not None:
            assert isinstance(error, ProtocolError)
            assert error.close_code != 1011, error
            assert is_valid_close_code(error.close_code)
            assert self.p.should_close_transport

    @invariant()
    def a_valid_stream_delivers_exactly_what_was_sent(self):
        if self.valid and not self.pending:
            done = self.expected[:-1] if self.fragmenting else self.expected
            assert self.received == done
            assert self.p.error is None

    def teardown(self):
        self.flush()
        self.p.receive_eof()
        self.collect()


ProtocolMachine.TestCase.settings = settings(
    max_examples=budget(150), stateful_step_count=25, **FUZZ
)


# -- the memory bound, whatever the client sends ------------------------------------

BOUND_LIMIT = 4096
#: What ServerProtocol.held_bytes promises for BOUND_LIMIT.
MEMORY_BOUND = BOUND_LIMIT + BOUND_LIMIT // 8 + 1024 + 14


def _frame(opcode, payload, fin, rsv1=False):
    # A zero mask: no XOR, so hypothesis spends its time on shapes.
    return serialize_frame(Frame(Opcode(opcode), payload, fin, rsv1), mask=bytes(4))


def _deflate(data, level):
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


class MemoryBoundMachine(RuleBasedStateMachine):
    """A hostile client: big frames, frames that never finish, fragment and
    ping floods, compressed bombs, in any order and any chunks. However it
    goes, ServerProtocol holds at most MEMORY_BOUND bytes and queues at most
    a pong and a close."""

    deflate = False

    def __init__(self):
        super().__init__()
        wire = WireFormat(deflate=DeflateParams()) if self.deflate else WireFormat()
        self.p = ServerProtocol(wire, max_message_size=BOUND_LIMIT)
        self.pending = b""
        self.peak = 0

    def feed(self, data, cut):
        self.pending += data
        cut = min(cut, len(self.pending))
        piece, self.pending = self.pending[:cut], self.pending[cut:]
        self.p.receive_data(piece)
        self.peak = max(self.peak, self.p.held_bytes)
        self.p.events_received()
        assert len(self.p.data_to_send()) <= 2 * (2 + 125)

    @rule(
        opcode=st.sampled_from([0x0, 0x1, 0x2]),
        size=st.integers(0, 2 * BOUND_LIMIT),
        fin=st.booleans(),
        compressed=st.booleans(),
        cut=st.integers(0, 3 * BOUND_LIMIT),
    )
    def data_frame(self, opcode, size, fin, compressed, cut):
        payload = os.urandom(size) if size % 2 else b"a" * size
        compressed = compressed and self.deflate
        if compressed:  # a continuation of a compressed message has no RSV1
            payload = _deflate(payload, 0 if size % 3 else 9)
        rsv1 = compressed and opcode != 0x0
        self.feed(_frame(opcode, payload, fin, rsv1), cut)

    @rule(announced=st.integers(0, 2**20), sent=st.integers(0, 2 * BOUND_LIMIT))
    def frame_that_never_ends(self, announced, sent):
        whole = _frame(0x2, b"", False)[:2]  # header bytes for a 0-byte frame
        if announced < 126:
            header = bytes((whole[0], 0x80 | announced))
        elif announced < 65536:
            header = struct.pack("!BBH", whole[0], 0x80 | 126, announced)
        else:
            header = struct.pack("!BBQ", whole[0], 0x80 | 127, announced)
        self.feed(header + b"\x00" * (4 + min(announced, sent)), 10**9)

    @rule(count=st.integers(1, 400), size=st.integers(0, 3), ping=st.booleans())
    def continuation_flood(self, count, size, ping):
        piece = _frame(0x0, b"c" * size, False)
        if ping:
            piece += _frame(0x9, b"p", True)
        self.feed(piece * count, 10**9)

    @rule(zeros=st.integers(1, 64 * BOUND_LIMIT), first=st.booleans())
    def deflate_bomb(self, zeros, first):
        if self.deflate:
            self.feed(
                _frame(0x2 if first else 0x0, _deflate(bytes(zeros), 9), False, first),
                10**9,
            )

    @rule(payload=st.binary(max_size=125), pong=st.booleans(), count=st.integers(1, 50))
    def controls(self, payload, pong, count):
        self.feed(_frame(0xA if pong else 0x9, payload, True) * count, 10**9)

    @rule(garbage=st.binary(min_size=1, max_size=64))
    def garbage(self, garbage):
        self.feed(garbage, 10**9)

    @invariant()
    def memory_stays_within_the_bound(self):
        assert self.p.held_bytes <= MEMORY_BOUND, self.p.held_bytes
        assert self.peak <= MEMORY_BOUND, self.peak


class DeflateMemoryBoundMachine(MemoryBoundMachine):
    deflate = True


for _machine in (MemoryBoundMachine, DeflateMemoryBoundMachine):
    _machine.TestCase.settings = settings(
        max_examples=budget(100), stateful_step_count=20, **FUZZ
    )
test_memory_bound_state_machine = MemoryBoundMachine.TestCase
test_memory_bound_state_machine_with_deflate = DeflateMemoryBoundMachine.TestCase
test_protocol_state_machine = ProtocolMachine.TestCase


# -- a live server ------------------------------------------------------------------


class Echo(WebSocketView):
    def handler(self, websocket):
        while (message := websocket.wait()) is not None:
            websocket.send(message)


@pytest.fixture(scope="module")
def live():
    settings = {"stargate.max_message_size": "4096", "stargate.ping_interval": "off"}
    with Configurator(settings=settings) as config:
        config.include("stargate")
        config.add_route("echo", "/echo")
        config.add_view(Echo, route_name="echo")
        app = config.make_wsgi_app()
    with LiveServer(app) as server:
        yield server


UPGRADE = (
    "GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n\r\n"
).encode()


def random_stream(rng):
    """A few frames, some valid, some broken, some plain garbage."""
    out = b""
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.15:
            out += rng.randbytes(rng.randint(1, 30))
            continue
        opcode = rng.choice([0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB])
        payload = rng.randbytes(rng.choice([0, 1, 2, 5, 125, 126, 200, 5000]))
        if kind < 0.6 and opcode == 0x1:
            payload = "é€ok".encode() * rng.randint(0, 5)
        fin = rng.random() < 0.8
        rsv = rng.choice([0, 0, 0, 1, 2, 4])
        out += client_frame(opcode, payload, fin, rsv)
    return out


def exchange(port, data, deadline=3.0):
    with socket.create_connection(("127.0.0.1", port), timeout=deadline) as sock:
        sock.sendall(UPGRADE)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        try:
            # A valid close at the end: a server still open closes now; an
            # incomplete last frame swallows it, so the end of the stream
            # (half-close) must end the connection too.
            sock.sendall(data + client_frame(0x8, struct.pack("!H", 1000)))
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(0.2)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            try:
                if not sock.recv(65536):
                    return True
            except socket.timeout:
                continue
            except ConnectionResetError:
                return True
        return False


def test_random_frames_over_real_sockets_leave_the_server_serving(live):
    rng = random.Random(os.environ.get("STARGATE_FUZZ_SEED", "stargate"))
    count = budget(200)
    stop_at = time.monotonic() + (20 if EXAMPLES is None else 10**9)
    done = 0
    for _ in range(count):
        if time.monotonic() > stop_at:
            break
        assert exchange(live.port, random_stream(rng)), "server kept a connection"
        done += 1
    assert done >= min(count, 50)
    with connect(live.ws_url("/echo")) as client:
        client.send("still serving")
        assert client.receive() == "still serving"
    deadline = time.monotonic() + 5
    port = str(live.port)
    while time.monotonic() < deadline:
        if not [w for w in open_websockets() if w.environ.get("SERVER_PORT") == port]:
            break
        time.sleep(0.05)
    assert not [w for w in open_websockets() if w.environ.get("SERVER_PORT") == port]
