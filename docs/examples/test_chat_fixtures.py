"""The same kind of tests with the fixtures of stargate's pytest plugin."""

import time

from quickstart_app import make_app

from stargate.testing.client import ReceiveTimeout, connect_app


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
    # The upgrade completes before the handler subscribes bob's server to
    # the channel through Redis: wait until a message gets across.
    wait_until_heard(alice, bob)
    alice.send("across servers")
    assert skip_probes(bob) == "across servers"


def wait_until_heard(sender, listener, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        sender.send("probe")
        try:
            listener.receive(timeout=0.1)
            return
        except ReceiveTimeout:
            if time.monotonic() > deadline:
                raise


def skip_probes(client, timeout=5.0):
    """The first message that is not a probe."""
    deadline = time.monotonic() + timeout
    while True:
        message = client.receive(timeout=max(deadline - time.monotonic(), 0.01))
        if message != "probe":
            return message
