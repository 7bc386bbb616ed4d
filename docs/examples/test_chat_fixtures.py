"""The same kind of tests with the fixtures of stargate's pytest plugin."""

from quickstart_app import make_app

from stargate.testing.client import connect_app


def test_a_message_reaches_every_listener(stargate_server, stargate_connect):
    server = stargate_server(make_app())
    alice = stargate_connect(server.ws_url("/chat"))
    bob = stargate_connect(server.ws_url("/chat"))
    alice.send("hello")
    assert bob.receive(timeout=5) == "hello"


def test_without_a_network():
    # A real upgrade and real frames, over a socket pair in this process.
    with connect_app(make_app(), "/chat") as client:
        client.send("just me")
        assert client.receive(timeout=5) == "just me"


def test_fan_out_between_two_servers(stargate_server, stargate_connect, stargate_redis):
    settings = {"stargate.backend": stargate_redis.url}
    one = stargate_server(make_app(settings))
    two = stargate_server(make_app(settings))
    alice = stargate_connect(one.ws_url("/chat"))
    bob = stargate_connect(two.ws_url("/chat"))
    # The upgrade completes before bob's handler has joined the channel
    # (through Redis): wait until server two has him listening on it.
    two.wait_for_listeners("chat")
    alice.send("across servers")
    assert bob.receive(timeout=5) == "across servers"
