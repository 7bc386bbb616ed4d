"""``keep_open`` views: the request ends, the connection stays (issue 17).

A view with ``keep_open = True`` hands its connection to the hub and
returns; no green thread stays parked under it, yet broadcasts reach it,
its messages go to ``websocket.on_message``, keepalive runs, and it leaves
its channels when it closes. The blocking model stays the default.
"""

import contextlib
import gc
import socket
import struct
import time
import uuid

import greenlet
import pytest
from pyramid.config import Configurator
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from stargate import WebSocketAwareResource, WebSocketView
from stargate.hub import get_hub
from stargate.testing.server import LiveServer
from stargate.view import open_connections
from tests.clients import CLIENT_TIMEOUT, wait_until
from tests.rawws import RawClient


class Room(WebSocketAwareResource):
    __name__ = ""
    __parent__ = None

    def received(self, websocket, message):
        if message == "raise":
            raise RuntimeError("on_message broke")
        if message.startswith("broadcast:"):
            self.send(message)  # through get_hub(): the registry's hub
            return
        websocket.send(f"echo: {message}")


ROOM = Room()


class Lobby(Room):
    __name__ = "lobby"
    __parent__ = None


#: No hub assigned: it is looked up in the current registry.
LOBBY = Lobby()


class Listen(WebSocketView):
    keep_open = True

    def handler(self, websocket):
        self.request.context.add_listener(websocket)
        websocket.on_message = self.request.context.received
        websocket.send("ready")


class Quiet(WebSocketView):
    keep_open = True

    def handler(self, websocket):
        self.request.context.add_listener(websocket)
        websocket.send("ready")


def make_app(lobby=LOBBY, **settings):
    with Configurator(settings=settings, root_factory=lambda request: ROOM) as config:
        config.include("stargate")
        ROOM.hub = get_hub(config.registry)
        config.add_route("listen", "/listen")
        config.add_view(Listen, route_name="listen")
        config.add_route("lobby", "/lobby", factory=lambda request: lobby)
        config.add_view(Listen, route_name="lobby")
        config.add_route("quiet", "/quiet")
        config.add_view(Quiet, route_name="quiet")
        return config.make_wsgi_app()


@pytest.fixture
def live():
    app = make_app(**{"stargate.ping_interval": "0.2", "stargate.ping_timeout": "0.2"})
    with LiveServer(app) as server:
        yield server


def listeners():
    return ROOM.hub.listener_count(ROOM.channel)


def live_greenlets():
    return sum(
        1
        for obj in gc.get_objects()
        # type(), not isinstance(): a dead weak proxy raises on isinstance.
        if issubclass(type(obj), greenlet.greenlet) and obj and not obj.dead
    )


def test_broadcasts_reach_kept_connections_and_messages_reach_on_message(live):
    with connect(live.ws_url("/listen"), ping_interval=None) as client:
        assert client.recv(timeout=CLIENT_TIMEOUT) == "ready"
        assert wait_until(lambda: listeners() == 1, CLIENT_TIMEOUT)
        ROOM.send("to everyone")
        assert client.recv(timeout=CLIENT_TIMEOUT) == "to everyone"
        client.send("hello")
        assert client.recv(timeout=CLIENT_TIMEOUT) == "echo: hello"
        client.send("again")
        assert client.recv(timeout=CLIENT_TIMEOUT) == "echo: again"
    assert wait_until(lambda: listeners() == 0, CLIENT_TIMEOUT)
    assert wait_until(lambda: open_connections() == 0, CLIENT_TIMEOUT)


def test_on_message_runs_with_the_applications_registry(live):
    with connect(live.ws_url("/lobby"), ping_interval=None) as client:
        assert client.recv(timeout=CLIENT_TIMEOUT) == "ready"
        client.send("broadcast:to the lobby")
        assert client.recv(timeout=CLIENT_TIMEOUT) == "broadcast:to the lobby"


def test_no_green_thread_stays_parked_per_connection(live):
    count = 20
    before = live_greenlets()
    with contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(connect(live.ws_url("/quiet"), ping_interval=None))
            for _ in range(count)
        ]
        for client in clients:
            assert client.recv(timeout=CLIENT_TIMEOUT) == "ready"
        assert wait_until(lambda: listeners() == count, CLIENT_TIMEOUT)
        assert open_connections() == count
        # The client side holds a green thread per connection (its reader);
        # the server side none: the views returned.
        assert wait_until(
            lambda: live_greenlets() - before <= count + 2, CLIENT_TIMEOUT
        ), live_greenlets() - before
        ROOM.send("still here")
        for client in clients:
            assert client.recv(timeout=CLIENT_TIMEOUT) == "still here"
    assert wait_until(lambda: listeners() == 0, CLIENT_TIMEOUT)


def test_keepalive_runs_and_unhandled_messages_are_ignored(live):
    with connect(live.ws_url("/quiet"), ping_interval=None) as client:
        assert client.recv(timeout=CLIENT_TIMEOUT) == "ready"
        for i in range(40):  # more than a blocking handler would queue
            client.send(f"nobody reads {i}")
        # The server pings every 0.2 s and the client answers: five
        # keepalive periods pass and the connection is still there.
        end = time.monotonic() + 5 * 0.4
        while time.monotonic() < end:
            ROOM.send("tick")
            assert client.recv(timeout=CLIENT_TIMEOUT) == "tick"
            time.sleep(0.05)


def test_an_on_message_that_raises_closes_with_1011(live):
    with connect(live.ws_url("/listen"), ping_interval=None) as client:
        assert client.recv(timeout=CLIENT_TIMEOUT) == "ready"
        client.send("raise")
        with pytest.raises(ConnectionClosed) as info:
            client.recv(timeout=CLIENT_TIMEOUT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011
    assert wait_until(lambda: listeners() == 0, CLIENT_TIMEOUT)


def test_slow_and_dead_kept_listeners_are_pruned():
    app = make_app(**{"stargate.max_send_buffer": str(2**16)})
    with LiveServer(app) as server:
        with contextlib.ExitStack() as stack:
            healthy = stack.enter_context(
                connect(server.ws_url("/quiet"), ping_interval=None)
            )
            assert healthy.recv(timeout=CLIENT_TIMEOUT) == "ready"
            # A client that never reads, with a small receive buffer.
            stack.enter_context(RawClient(server.port, "/quiet", rcvbuf=4096))
            vanished = stack.enter_context(RawClient(server.port, "/quiet"))
            assert wait_until(lambda: listeners() == 3, CLIENT_TIMEOUT)
            before = ROOM.hub.stats
            vanished.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            vanished.sock.close()  # a reset
            payload = "x" * 65536
            for i in range(200):  # 12.5 MiB: past every kernel buffer too
                ROOM.send(f"{i}:{payload}")
                assert healthy.recv(timeout=CLIENT_TIMEOUT) == f"{i}:{payload}"
            assert wait_until(lambda: listeners() == 1, CLIENT_TIMEOUT)
            assert ROOM.hub.stats.closed_slow == before.closed_slow + 1


def test_kept_listeners_receive_through_redis(redis_server):
    # A lobby of its own on the shared Redis: no other test hears it. Its
    # hub is the registry's, found in on_message through the registry.
    lobby = Lobby()
    lobby.__name__ = f"lobby-{uuid.uuid4().hex}"
    app = make_app(lobby, **{"stargate.backend": redis_server.url})
    hub = ROOM.hub  # make_app's registry hub, Redis-backed
    with LiveServer(app) as server, contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(connect(server.ws_url("/lobby"), ping_interval=None))
            for _ in range(5)
        ]
        for client in clients:
            assert client.recv(timeout=CLIENT_TIMEOUT) == "ready"
        assert wait_until(
            lambda: hub.listener_count(lobby.channel) == 5, CLIENT_TIMEOUT
        )
        # One client's message goes out through Redis and back to all five.
        clients[0].send("broadcast:hello")
        for client in clients:
            assert client.recv(timeout=CLIENT_TIMEOUT) == "broadcast:hello"
    hub.close()
