"""The handshake hands the connection over whole (issue 16, items 3 and 6).

* Bytes a client sends with its upgrade request (its first frames, in the
  same segment) were buffered by the HTTP reader; they are the first data of
  the WebSocket, for every draft, whole or split across segments.
* hixie-75 has no closing handshake: ``close()`` returns at once instead of
  waiting ``close_timeout`` for a close frame that never comes.
"""

import socket
import time

import pytest

from stargate import WebSocketView
from stargate.testing.server import LiveServer
from stargate.view import open_connections
from tests.clients import view_app
from tests.rawws import READ_TIMEOUT, RawClient, client_frame
from tests.test_hixie_live import KEY3, hixie76_request, read_until


class Echo(WebSocketView):
    def handler(self, websocket):
        while (message := websocket.wait()) is not None:
            if message == "close-please":
                websocket.close()
                return
            websocket.send(message)


def make_app(**settings):
    return view_app(Echo, "/demo", **settings)


@pytest.fixture(scope="module")
def server():
    # A close_timeout far beyond any test deadline: a close() that waits
    # for it shows as a timeout below.
    with LiveServer(make_app(**{"stargate.close_timeout": "60"})) as live:
        yield live


def hixie75_request(port):
    return (
        "GET /demo HTTP/1.1\r\n"
        "Upgrade: WebSocket\r\n"
        "Connection: Upgrade\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Origin: http://127.0.0.1:{port}\r\n"
        "\r\n"
    ).encode()


class TestPipelinedFrames:
    @pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
    def test_rfc6455_frames_sent_with_the_request_are_received(self, server, split):
        first = client_frame(0x1, "first") + client_frame(0x1, "second")
        extra, rest = (first[:9], first[9:]) if split else (first, b"")
        with RawClient(server.port, "/demo", extra=extra) as raw:
            assert raw.status.startswith(b"HTTP/1.1 101")
            if rest:
                raw.sock.sendall(rest)
            assert raw.frame() == (0x1, b"first")
            assert raw.frame() == (0x1, b"second")

    def test_hixie76_frames_sent_with_the_key_bytes_are_received(self, server):
        request = hixie76_request(server.port, key3=KEY3) + b"\x00early\xff"
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(request)
            assert b"\x00early\xff" in read_until(sock, b"early\xff", READ_TIMEOUT)

    def test_hixie75_frames_sent_with_the_request_are_received(self, server):
        request = hixie75_request(server.port) + b"\x00early\xff"
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(request)
            assert b"\x00early\xff" in read_until(sock, b"early\xff", READ_TIMEOUT)


def test_hixie75_close_returns_at_once(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(hixie75_request(server.port))
        read_until(sock, b"\r\n\r\n", READ_TIMEOUT)
        deadline = time.monotonic() + READ_TIMEOUT
        while open_connections() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert open_connections() == 1
        sock.sendall(b"\x00close-please\xff")
        # The client neither answers nor closes: the handler's close() must
        # not wait for it, and the server closes its side of TCP.
        sock.settimeout(READ_TIMEOUT)
        assert sock.recv(4096) == b""
        while open_connections() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert open_connections() == 0
