"""Tests of the quickstart chat, as you would write them for your own app."""

import pytest
from quickstart_app import make_app

from stargate.testing.client import UpgradeRefused, connect
from stargate.testing.server import LiveServer


@pytest.fixture
def server():
    """The application, served on a free loopback port for one test."""
    with LiveServer(make_app()) as server:
        yield server


def test_a_message_reaches_every_listener(server):
    with (
        connect(server.ws_url("/chat")) as alice,
        connect(server.ws_url("/chat")) as bob,
    ):
        alice.send("hello")
        assert bob.receive(timeout=5) == "hello"
        assert alice.receive(timeout=5) == "hello"


def test_nothing_arrives_unasked(server):
    with connect(server.ws_url("/chat")) as alice:
        alice.receive_nothing(timeout=0.2)


def test_a_page_of_another_site_is_refused(server):
    with pytest.raises(UpgradeRefused) as refused:
        connect(server.ws_url("/chat"), origin="https://evil.example")
    assert refused.value.status == 403


def test_a_page_of_this_site_is_accepted(server):
    with connect(server.ws_url("/chat"), origin=server.url) as client:
        client.send("hi")
        assert client.receive() == "hi"
