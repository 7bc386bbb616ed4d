"""Keepalive measures the peer, not the handler (issue 17, defects 1 and 2).

The connection's reader runs whether or not a handler waits, so a handler
that only sends keeps a client that answers pings, and loses one that does
not; and pings go out every ``ping_interval``, counted from the previous
ping, however much else the client sends.
"""

import time

import pytest
from pyramid.config import Configurator
from websockets.sync.client import connect

from stargate import WebSocketView
from stargate.exceptions import ConnectionClosed
from stargate.testing.server import LiveServer
from tests import green
from tests.rawws import RawClient

INTERVAL = 0.2
#: Seconds one keepalive period lasts: a ping, then its timeout.
PERIOD = INTERVAL * 2


class Ticker(WebSocketView):
    """Pushes a message every 20 ms and never reads."""

    def handler(self, websocket):
        n = 0
        try:
            while True:
                websocket.send(f"tick {n}")
                n += 1
                green.sleep(0.02)
        except ConnectionClosed:
            pass


class Sink(WebSocketView):
    """Waits for messages and answers none."""

    def handler(self, websocket):
        while websocket.wait() is not None:
            pass


def make_app(**settings):
    with Configurator(settings=settings) as config:
        config.include("stargate")
        config.add_route("push", "/push")
        config.add_view(Ticker, route_name="push")
        config.add_route("sink", "/sink")
        config.add_view(Sink, route_name="sink")
        return config.make_wsgi_app()


def keepalive_server(interval=INTERVAL, timeout=INTERVAL):
    app = make_app(
        **{
            "stargate.ping_interval": str(interval),
            "stargate.ping_timeout": str(timeout),
        }
    )
    return LiveServer(app)


class TestPushOnlyHandler:
    def test_survives_five_keepalive_periods_with_a_client_that_answers_pings(self):
        with keepalive_server() as live:
            # The websockets client answers every ping itself.
            with connect(live.ws_url("/push"), ping_interval=None) as client:
                end = time.monotonic() + 5 * PERIOD
                received = 0
                while time.monotonic() < end:
                    assert client.recv(timeout=5).startswith("tick ")
                    received += 1
                # Still open: the ticks keep coming.
                assert client.recv(timeout=5).startswith("tick ")
                assert received > 0

    def test_is_closed_with_1011_when_the_client_never_answers(self):
        with keepalive_server() as live:
            with RawClient(live.port, "/push") as raw:
                assert raw.status.startswith(b"HTTP/1.1 101")
                # Reads ticks and pings, answers nothing.
                assert raw.close_code() == 1011
                assert raw.at_eof()


class TestPingSchedule:
    @pytest.mark.parametrize("chatty", [False, True], ids=["idle", "chatty"])
    def test_no_gap_between_pings_exceeds_the_interval(self, chatty):
        # A generous tolerance: the bound catches a skipped ping (a gap of
        # two intervals, or none at all while the client talks), not a late
        # timer on a loaded machine.
        interval = 0.5
        bound = interval * 1.5
        with keepalive_server(interval=interval, timeout=10) as live:
            with RawClient(live.port, "/sink") as raw:
                arrivals = []
                next_chat = time.monotonic()
                deadline = time.monotonic() + 30
                while len(arrivals) < 6 and time.monotonic() < deadline:
                    if chatty and time.monotonic() >= next_chat:
                        raw.send(0x1, "chatter")
                        next_chat = time.monotonic() + interval / 4
                    try:
                        opcode, payload = raw.frame(timeout=interval / 4)
                    except AssertionError:
                        continue  # no frame yet: chat again, read again
                    if opcode == 0x9:
                        arrivals.append(time.monotonic())
                        raw.send(0xA, payload)  # the pong, at once
                assert len(arrivals) == 6, "the server stopped pinging"
                gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
                assert max(gaps) <= bound, gaps
