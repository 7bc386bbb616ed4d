"""The 2010 drafts, hixie-75 and hixie-76, end to end over raw sockets."""

import socket
import time

import pytest

from stargate import WebSocketView
from stargate.testing.server import LiveServer
from tests.clients import view_app

# The worked example of draft-hixie-thewebsocketprotocol-76, section 1.3.
KEY1 = "4 @1  46546xW%0l 1 5"
KEY2 = "12998 5 Y3 1  .P00"
KEY3 = b"^n:ds[4U"
ANSWER = b"8jKS'y:G*Co,Wxa-"


class Echo(WebSocketView):
    def handler(self, websocket):
        websocket.send(f"hello {websocket.draft}")
        while (message := websocket.wait()) is not None:
            websocket.send(message)


def make_app(**settings):
    return view_app(Echo, "/demo", **settings)


@pytest.fixture
def server():
    with LiveServer(make_app()) as live:
        yield live


def read_until(sock, marker, timeout=5.0):
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} within {timeout} s in {data!r}")
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"connection closed before {marker!r}: {data!r}")
        data += chunk
    return data


def hixie76_request(port, key3=KEY3):
    return (
        "GET /demo HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key2: {KEY2}\r\n"
        "Sec-WebSocket-Protocol: sample\r\n"
        "Upgrade: WebSocket\r\n"
        f"Sec-WebSocket-Key1: {KEY1}\r\n"
        f"Origin: http://127.0.0.1:{port}\r\n"
        "\r\n"
    ).encode() + key3


def test_hixie76_handshake_echo_and_close(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(hixie76_request(server.port))
        response = read_until(sock, ANSWER)
        head = response.split(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 101 WebSocket Protocol Handshake")
        assert (
            f"Sec-WebSocket-Location: ws://127.0.0.1:{server.port}/demo".encode()
            in head
        )
        assert f"Sec-WebSocket-Origin: http://127.0.0.1:{server.port}".encode() in head
        assert response.endswith(ANSWER) or b"\x00hello" in response
        greeting = read_until(sock, b"\xff") if b"hello" not in response else response
        assert b"\x00hello hixie-76\xff" in greeting
        sock.sendall(b"\x00" + "ünïcode".encode() + b"\xff")
        assert b"\x00\xc3\xbcn\xc3\xafcode\xff" in read_until(sock, b"code\xff")
        sock.sendall(b"\xff\x00")  # the hixie-76 closing handshake
        rest = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            rest += chunk
        assert rest.endswith(b"\xff\x00")


def test_hixie76_without_key3_is_refused_after_the_timeout():
    app = make_app(**{"stargate.handshake_timeout": "0.3"})
    with LiveServer(app) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
            sock.sendall(hixie76_request(live.port, key3=b"^n:d"))  # 4 of 8 bytes
            response = read_until(sock, b"8 key bytes")
            assert response.startswith(b"HTTP/1.1 400")


def test_hixie75_handshake_and_echo(server):
    request = (
        "GET /demo HTTP/1.1\r\n"
        "Upgrade: WebSocket\r\n"
        "Connection: Upgrade\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        f"Origin: http://127.0.0.1:{server.port}\r\n"
        "\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        response = read_until(sock, b"hello hixie-75\xff")
        head = response.split(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 101 Web Socket Protocol Handshake")
        assert f"WebSocket-Location: ws://127.0.0.1:{server.port}/demo".encode() in head
        sock.sendall(b"\x00ping\xff")
        assert b"\x00ping\xff" in read_until(sock, b"ping\xff")


def test_drafts_can_be_switched_off():
    app = make_app(**{"stargate.protocols": "13"})
    with LiveServer(app) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
            sock.sendall(hixie76_request(live.port))
            response = read_until(sock, b"\r\n\r\n")
            assert response.startswith(b"HTTP/1.1 426")
            assert b"Sec-WebSocket-Version: 13" in response
