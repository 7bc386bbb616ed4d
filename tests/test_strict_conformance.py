"""Strict RFC 6455 failure handling, over a real socket: messages that
arrived before a bad frame reach the handler (and its answers reach the
client) before the connection is failed, as conformance suites check of an
echo server ("non-strict" otherwise)."""

import pytest
from pyramid.config import Configurator

from stargate import WebSocketAwareResource, WebSocketView
from stargate.testing.server import LiveServer
from tests.rawws import RawClient, client_frame


class Echo(WebSocketView):
    def handler(self, websocket):
        while (message := websocket.wait()) is not None:
            websocket.send(message)


class KeptEcho(WebSocketView):
    """The same echo through on_message, with no green thread waiting."""

    keep_open = True

    def handler(self, websocket):
        websocket.on_message = lambda ws, message: ws.send(message)
        WebSocketAwareResource().add_listener(websocket)


def make_app():
    with Configurator() as config:
        config.include("stargate")
        config.add_route("echo", "/echo")
        config.add_view(Echo, route_name="echo")
        config.add_route("kept", "/kept")
        config.add_view(KeptEcho, route_name="kept")
        return config.make_wsgi_app()


@pytest.fixture(scope="module")
def server():
    with LiveServer(make_app()) as live:
        yield live


BAD_FRAMES = {
    # a reserved opcode
    "reserved opcode": (bytes([0x83, 0x80]) + b"\x00\x00\x00\x00", 1002),
    # a text frame that is not UTF-8 (an encoded surrogate)
    "invalid utf-8": (client_frame(0x1, b"\xce\xba\xed\xa0\x80"), 1007),
    # a fragmented ping
    "fragmented ping": (client_frame(0x9, b"", fin=False), 1002),
}


@pytest.mark.parametrize("path", ["/echo", "/kept"])
@pytest.mark.parametrize("bad", list(BAD_FRAMES))
def test_messages_before_a_bad_frame_are_answered_then_it_fails(server, path, bad):
    frame, code = BAD_FRAMES[bad]
    with RawClient(server.port, path) as client:
        assert client.status.startswith(b"HTTP/1.1 101")
        # One segment: the server reads all three frames at once.
        client.sock.sendall(client_frame(0x1, "one") + client_frame(0x1, "two") + frame)
        assert client.frame() == (0x1, b"one")
        assert client.frame() == (0x1, b"two")
        assert client.close_code() == code
        assert client.at_eof()


def test_a_bad_frame_alone_still_fails_at_once(server):
    frame, code = BAD_FRAMES["reserved opcode"]
    with RawClient(server.port, "/echo") as client:
        client.sock.sendall(frame)
        assert client.close_code() == code
        assert client.at_eof()
