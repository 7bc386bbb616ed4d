"""What a hostile client can make one connection hold: measured, per shape.

Usage::

    python benchmarks/hostile_memory.py [--quick] [--limit BYTES]

A stargate server (``WebSocketView`` whose handler reads and drops every
message, ``stargate.max_message_size`` = ``--limit``, 1 MiB by default) runs
in this process; a raw-socket client sends each hostile shape on a fresh
connection. ``tracemalloc`` measures the peak of memory allocated while the
shape is sent and answered, above what was allocated before; the client's
bytes are built before measuring, so the figure is the server's. The table
gives the peak in KiB, as a multiple of the limit, and how the server ended
the connection (a close code, or ``open`` when it was still waiting).

There is no peer here: the figure is compared with the limit the server was
given, which is what ``docs/topics/limits.rst`` promises to stay near.
"""

import argparse
import os
import socket
import struct
import sys
import time
import tracemalloc
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

import eventlet  # noqa: E402

eventlet.monkey_patch()

from pyramid.config import Configurator  # noqa: E402

from stargate import WebSocketView  # noqa: E402
from stargate.frames import Frame, Opcode, serialize_frame  # noqa: E402
from stargate.testing.server import LiveServer  # noqa: E402

MASK = b"\x00\x00\x00\x00"  # a zero mask: the client spends no time masking


def frame(opcode, payload=b"", fin=True, rsv1=False):
    return serialize_frame(Frame(Opcode(opcode), payload, fin, rsv1), mask=MASK)


def deflate(data):
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def shapes(limit, quick):
    """(name, request headers, the bytes sent) for each hostile shape."""
    flood = 2**16 if quick else 2**20
    deflate_offer = "Sec-WebSocket-Extensions: permessage-deflate\r\n"
    return [
        (
            "for reference: a text message of the limit, delivered",
            "",
            frame(0x1, b"a" * limit),
        ),
        (
            "for reference: a compressed one, delivered",
            deflate_offer,
            frame(0x1, deflate(b"a" * limit), rsv1=True),
        ),
        (
            "one text frame of the limit, last byte missing",
            "",
            frame(0x1, b"a" * limit)[:-1],
        ),
        (
            "a message in 4 KiB fragments, last one missing",
            "",
            frame(0x2, b"b" * 4096, fin=False)
            + frame(0x0, b"b" * 4096, fin=False) * (limit // (4096 + 64) - 2),
        ),
        (
            f"{flood:,} one-byte fragments",
            "",
            frame(0x1, b"a", fin=False) + frame(0x0, b"a", fin=False) * flood,
        ),
        (
            f"{flood:,} empty continuations",
            "",
            frame(0x1, b"a", fin=False) + frame(0x0, b"", fin=False) * flood,
        ),
        (
            f"{flood // 16:,} pings inside a fragmented message",
            "",
            frame(0x1, b"a", fin=False)
            + (frame(0x9, b"p" * 125) + frame(0x0, b"a", fin=False)) * (flood // 16),
        ),
        (
            "deflate bomb: 256 MiB of zeros in one frame",
            deflate_offer,
            frame(0x2, deflate(bytes(2**28)), rsv1=True),
        ),
        (
            "compressed message, continuation still arriving",
            deflate_offer,
            frame(0x2, deflate(b"z" * (limit - 8192)), fin=False, rsv1=True)
            + frame(0x0, os.urandom(limit), fin=False)[: limit // 2],
        ),
    ]


class Drop(WebSocketView):
    def handler(self, websocket):
        while websocket.wait() is not None:
            pass


def make_app(limit):
    settings = {
        "stargate.max_message_size": str(limit),
        "stargate.ping_interval": "off",
    }
    with Configurator(settings=settings) as config:
        config.include("stargate")
        config.add_route("drop", "/drop")
        config.add_view(Drop, route_name="drop")
        return config.make_wsgi_app()


def upgrade(port, extra):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        (
            "GET /drop HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n" + extra + "\r\n"
        ).encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    assert data.startswith(b"HTTP/1.1 101"), data[:100]
    return sock


def close_code(data):
    """The code of the server's close frame, after any pongs."""
    offset = 0
    while offset + 2 <= len(data):
        opcode, length = data[offset] & 0x0F, data[offset + 1] & 0x7F
        if opcode == 0x8:
            body = data[offset + 2 : offset + 2 + length]
            return struct.unpack("!H", body[:2])[0] if len(body) >= 2 else 1005
        offset += 2 + length  # the server sends control frames only here
    return None


def measure(port, extra, payload, settle):
    sock = upgrade(port, extra)
    sock.settimeout(0.05)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    sent = 0
    view = memoryview(payload)
    received = b""
    closed = False
    try:
        while sent < len(payload) and not closed:
            try:
                sent += sock.send(view[sent : sent + 65536])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            except socket.timeout:
                pass
            try:
                chunk = sock.recv(65536)
                received += chunk
                closed = closed or not chunk
            except socket.timeout:
                pass
        end = time.monotonic() + settle  # let the server read what was sent
        while time.monotonic() < end and not closed:
            try:
                chunk = sock.recv(65536)
                received += chunk
                closed = not chunk
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed = True
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        sock.close()
    code = close_code(received)
    return peak, ("open" if code is None and not closed else code or "hang-up")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--limit", type=int, default=2**20)
    args = parser.parse_args(argv)
    limit = args.limit
    print(f"max_message_size = {limit:,} bytes; peak allocated while each shape")
    print("is sent and answered (tracemalloc), one connection at a time\n")
    print(f"{'shape':<52} {'peak KiB':>9} {'x limit':>8}  outcome")
    with LiveServer(make_app(limit)) as server:
        for name, extra, payload in shapes(limit, args.quick):
            peak, outcome = measure(server.port, extra, payload, 0.5)
            print(f"{name:<52} {peak / 1024:>9,.0f} {peak / limit:>8.2f}  {outcome}")


if __name__ == "__main__":
    main()
