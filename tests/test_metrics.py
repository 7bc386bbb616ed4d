"""Prometheus metrics scraped from a live server, as Prometheus would: the
hub's counters, the backend's, and WebSocket connections by draft and close
code."""

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pyramid.config import Configurator

from stargate import WebSocketAwareResource, WebSocketView
from stargate.testing.client import connect
from tests.clients import wait_until

#: Seconds a test waits for a figure to change.
DEADLINE = 10


class Room(WebSocketAwareResource):
    def __init__(self, request):
        self.__name__, self.__parent__ = "room", None


class RoomView(WebSocketView):
    def handler(self, websocket):
        room = self.request.context
        room.add_listener(websocket)
        while (message := websocket.wait()) is not None:
            room.send(message)


def make_app(**settings):
    with Configurator(settings=settings) as config:
        config.include("stargate")
        config.include("stargate.metrics")
        config.add_route("room", "/room", factory=Room)
        config.add_view(RoomView, route_name="room", websocket=True)
        return config.make_wsgi_app()


def scrape(server):
    """``{(name, sorted labels): value}`` from the server's /metrics."""
    with urllib.request.urlopen(server.http_url("/metrics"), timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics, name, **labels):
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_hub_and_connection_metrics_from_a_live_server(stargate_server):
    server = stargate_server(make_app())
    before = scrape(server)
    with (
        connect(server.ws_url("/room")) as alice,
        connect(server.ws_url("/room")) as bob,
    ):
        alice.send("hello")
        assert alice.receive() == "hello"
        assert bob.receive() == "hello"
        during = scrape(server)
        assert value(during, "stargate_listeners") == 2
        assert value(during, "stargate_channels") == 1
        assert value(during, "stargate_messages_published_total") == 1
        assert value(during, "stargate_deliveries_total") == 2
        rfc = {"draft": "rfc6455"}
        opened = "stargate_websocket_connections_opened_total"
        assert value(during, opened, **rfc) - value(before, opened, **rfc) == 2
        assert value(during, "stargate_websocket_connections", **rfc) >= 2
        assert ("stargate_websocket_send_buffer_bytes", ()) in during
        bob.close(1000)
        closed = "stargate_websocket_connections_closed_total"
        code = {"draft": "rfc6455", "code": "1000"}
        wait_until(
            lambda: (
                value(scrape(server), closed, **code)
                == value(before, closed, **code) + 1
            ),
            DEADLINE,
            message="the close counted under code 1000",
        )
        wait_until(
            lambda: value(scrape(server), "stargate_listeners") == 1,
            DEADLINE,
            message="one listener left",
        )


def test_the_redis_backend_counters_are_exported(stargate_server, stargate_redis):
    server = stargate_server(make_app(**{"stargate.backend": stargate_redis.url}))
    with connect(server.ws_url("/room")) as alice:
        alice.send("through redis")
        assert alice.receive() == "through redis"
        metrics = scrape(server)
    assert value(metrics, "stargate_backend_messages_published_total") == 1
    assert value(metrics, "stargate_backend_messages_received_total") == 1
    assert ("stargate_backend_reconnects_total", ()) in metrics


def test_names_follow_prometheus_conventions(stargate_server):
    server = stargate_server(make_app())
    for name, labels in scrape(server):
        assert name.startswith("stargate_")
        assert name == name.lower()
        if name.endswith("_created"):
            pytest.fail(f"{name}: a created sample for a derived counter")
