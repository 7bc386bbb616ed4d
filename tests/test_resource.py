"""WebSocketAwareResource: the 2010 API, on top of the hub.

Listeners are real connections (see ``tests/test_hub.py``); the end-to-end
test serves a traversal application from eventlet's WSGI server.
"""

import socket

import pytest
from pyramid.config import Configurator

from stargate import WebSocketAwareResource
from stargate.backends.memory import MemoryBackend
from stargate.hub import Hub, default_hub
from tests.test_hub import DEADLINE, Loopback, Server, wait_until


class Root(dict):
    __name__ = ""
    __parent__ = None


class Room(WebSocketAwareResource):
    def __init__(self, name, parent):
        self.__name__ = name
        self.__parent__ = parent


def tree():
    """A traversal tree, built anew each call as a per-request factory would."""
    root = Root()
    rooms = root["rooms"] = Root()
    rooms.__name__, rooms.__parent__ = "rooms", root
    rooms["lobby"] = Room("lobby", rooms)
    rooms["kitchen"] = Room("kitchen", rooms)
    return root


@pytest.fixture
def loopback():
    lo = Loopback()
    yield lo
    lo.close()


@pytest.fixture
def hub():
    h = Hub(MemoryBackend())
    yield h
    h.close()


def room(name="lobby", hub=None):
    resource = tree()["rooms"][name]
    if hub is not None:
        resource.hub = hub
    return resource


class TestChannel:
    def test_is_the_traversal_path(self):
        assert room("lobby").channel == "/rooms/lobby"
        assert room("kitchen").channel == "/rooms/kitchen"

    def test_can_be_overridden_by_a_class_attribute(self):
        class Fixed(Room):
            channel = "news"

        assert Fixed("lobby", None).channel == "news"

    def test_can_be_overridden_by_a_property(self):
        class FromName(Room):
            @property
            def channel(self):
                return f"room:{self.__name__}"

        assert FromName("lobby", None).channel == "room:lobby"

    def test_can_be_assigned(self):
        resource = room()
        resource.channel = "elsewhere"
        assert resource.channel == "elsewhere"

    def test_a_resource_without_location_gets_its_own_channel(self):
        first, second = WebSocketAwareResource(), WebSocketAwareResource()
        assert first.channel != second.channel
        assert first.channel == first.channel
        assert first.channel.startswith("stargate-local:")


class TestListeners:
    def test_add_and_remove(self, hub, loopback):
        resource = room(hub=hub)
        ws, _ = loopback.connect()
        resource.add_listener(ws)
        assert ws in resource.listeners and len(resource.listeners) == 1
        resource.remove_listener(ws)
        assert ws not in resource.listeners
        resource.remove_listener(ws)  # absent: no error

    def test_are_shared_by_resources_built_per_request(self, hub, loopback):
        ws, peer = loopback.connect()
        room(hub=hub).add_listener(ws)
        assert ws in room(hub=hub).listeners
        assert ws not in room("kitchen", hub=hub).listeners
        room(hub=hub).send("from another request's resource")
        assert peer.messages(1) == ["from another request's resource"]

    def test_listeners_is_the_live_set(self, hub, loopback):
        resource = room(hub=hub)
        listeners = resource.listeners
        ws, _ = loopback.connect()
        resource.add_listener(ws)
        assert ws in listeners
        listeners.discard(ws)
        assert ws not in resource.listeners

    def test_assigning_listeners_replaces_them_and_none_clears(self, hub, loopback):
        resource = room(hub=hub)
        a, _ = loopback.connect()
        b, _ = loopback.connect()
        c, _ = loopback.connect()
        resource.listeners = {a, b}
        assert set(resource.listeners) == {a, b}
        resource.listeners = [b, c]
        assert set(resource.listeners) == {b, c}
        resource.listeners = None
        assert set(resource.listeners) == set()
        assert hub.channels() == set()

    def test_a_closed_connection_leaves_by_itself(self, hub, loopback):
        resource = room(hub=hub)
        ws, _ = loopback.connect()
        resource.add_listener(ws)
        ws.abort()
        assert ws not in resource.listeners

    def test_works_as_a_mixin(self, hub, loopback):
        class Folder(dict):
            pass

        class ChatFolder(Folder, WebSocketAwareResource):
            __name__ = "chat"
            __parent__ = None

        folder = ChatFolder()
        folder.hub = hub
        folder["child"] = "still a dict"
        ws, peer = loopback.connect()
        folder.add_listener(ws)
        folder.send("mixed in")
        assert peer.messages(1) == ["mixed in"]
        assert folder["child"] == "still a dict"


class TestSend:
    def test_reaches_every_listener_and_clears_out_the_dead(self, hub, loopback):
        resource = room(hub=hub)
        pairs = [loopback.connect() for _ in range(6)]
        for ws, _ in pairs:
            resource.add_listener(ws)
        for _, peer in pairs[:2]:
            peer.reset()
        # The readers see the resets; a send prunes any they have not yet.
        assert wait_until(lambda: len(resource.listeners) == 4)
        resource.send("hello")
        assert len(resource.listeners) == 4
        assert all(ws not in resource.listeners for ws, _ in pairs[:2])
        resource.send(b"binary too")
        for _, peer in pairs[2:]:
            assert peer.messages(2) == ["hello", b"binary too"]


class TestHubLookup:
    def test_without_include_the_default_hub_is_used(self):
        assert room().hub is default_hub()

    def test_with_include_the_registry_hub_is_used(self):
        config = Configurator(settings={})
        config.include("stargate")
        config.begin()
        try:
            assert room().hub is config.registry.stargate_hub
        finally:
            config.end()
            config.registry.stargate_hub.close()


class TestEndToEnd:
    def test_a_traversal_app_built_per_request(self):
        """Each request gets a new tree; a websocket attached through one
        request's resource receives what a later request's resource sends."""
        from stargate import WebSocketView

        class Listen(WebSocketView):
            def handler(self, websocket):
                self.request.context.add_listener(websocket)
                while websocket.wait() is not None:
                    pass

        def say(context, request):
            context.send(request.params["text"])
            return request.response

        config = Configurator(settings={"stargate.ping_interval": "off"})
        config.include("stargate")
        config.set_root_factory(lambda request: tree())
        config.add_view(Listen, context=Room, websocket=True)
        config.add_view(say, context=Room, name="say", renderer="string")
        hub = config.registry.stargate_hub
        server = Server.for_app(config.make_wsgi_app(), hub)
        try:
            lobby = [server.raw_client("/rooms/lobby") for _ in range(3)]
            kitchen = server.raw_client("/rooms/kitchen")
            assert wait_until(lambda: hub.listener_count("/rooms/lobby") == 3)
            assert wait_until(lambda: hub.listener_count("/rooms/kitchen") == 1)

            sock = socket.create_connection(("127.0.0.1", server.port), DEADLINE)
            sock.sendall(
                b"GET /rooms/lobby/say?text=hi+lobby HTTP/1.1\r\n"
                b"Host: x\r\nConnection: close\r\n\r\n"
            )
            response = b""
            while chunk := sock.recv(4096):
                response += chunk
            assert response.startswith(b"HTTP/1.1 200")

            for peer in lobby:
                assert peer.messages(1) == ["hi lobby"]
            assert kitchen.nothing_pending()
            lobby[0].close()
            assert wait_until(lambda: hub.listener_count("/rooms/lobby") == 2)
        finally:
            server.close()
