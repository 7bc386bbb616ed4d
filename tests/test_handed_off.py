"""``own_green_thread``: a blocking handler on stargate's server runs in a
green thread of its own (issue 17). The request's green thread, with the
server's, router's and view's frames, ends at the upgrade, and what a
Pyramid application sees of the request stays as in the request's green
thread. A tween or a ``NewResponse`` subscriber, which would see the view
return before the handler, keeps the handler in the request's green thread;
so does the default.
"""

import contextlib
import contextvars
import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path

import greenlet
import pytest
from pyramid.config import Configurator
from pyramid.events import NewResponse
from pyramid.threadlocal import get_current_registry, get_current_request
from websockets.exceptions import ConnectionClosed

from stargate import WebSocketView
from stargate.testing.server import LiveServer
from stargate.view import open_connections
from tests.clients import (
    CLIENT_TIMEOUT,
    ServerProcess,
    assert_held_back_until,
    connect,
    free_port,
    wait_until,
)

#: What the views and callbacks did, in order.
EVENTS = []

#: Set by the root factory, in the request's green thread.
REQUEST_ID = contextvars.ContextVar("request_id")


class Root:
    __name__ = ""
    __parent__ = None


ROOT = Root()


def root_factory(request):
    REQUEST_ID.set("r-1")
    request.add_response_callback(lambda request, response: EVENTS.append("response"))
    request.add_finished_callback(
        lambda request: EVENTS.append(("finished", request.context is ROOT))
    )
    return ROOT


class Report(WebSocketView):
    """Says what it sees of the request, then echoes until the client leaves."""

    own_green_thread = True

    def handler(self, websocket):
        self.request.add_finished_callback(lambda request: EVENTS.append("added"))
        websocket.send(
            json.dumps(
                {
                    "current_request": get_current_request() is self.request,
                    "current_registry": get_current_registry() is self.request.registry,
                    "context": self.request.context is ROOT,
                    "request_id": REQUEST_ID.get(None),
                }
            )
        )
        try:
            while (message := websocket.wait()) is not None:
                websocket.send(message)
        finally:
            EVENTS.append("handler ended")


class Fails(WebSocketView):
    own_green_thread = True

    def handler(self, websocket):
        websocket.send("about to fail")
        raise RuntimeError("handler broke")


class Default(Report):
    own_green_thread = None  # the stargate.own_green_thread setting's


class Declines(Report):
    own_green_thread = False


def make_app(tween=False, new_response=False, settings=None):
    with Configurator(root_factory=root_factory, settings=settings) as config:
        config.include("stargate")
        config.add_route("report", "/report")
        config.add_view(Report, route_name="report")
        config.add_route("fails", "/fails")
        config.add_view(Fails, route_name="fails")
        config.add_route("default", "/default")
        config.add_view(Default, route_name="default")
        config.add_route("declines", "/declines")
        config.add_view(Declines, route_name="declines")
        if tween:
            config.add_tween("tests.test_handed_off.recording_tween")
        if new_response:
            config.add_subscriber(
                lambda event: EVENTS.append("new response"), NewResponse
            )
        return config.make_wsgi_app()


def recording_tween(handler, registry):
    def tween(request):
        try:
            return handler(request)
        finally:
            EVENTS.append("tween returned")

    return tween


@pytest.fixture
def live():
    EVENTS.clear()
    with LiveServer(make_app()) as server:
        yield server


def request_green_threads():
    """Live green threads parked under Pyramid's router."""
    found = 0
    for obj in gc.get_objects():
        # type(), not isinstance(): a dead weak proxy raises on isinstance.
        if not issubclass(type(obj), greenlet.greenlet) or obj.dead:
            continue
        frame = obj.gr_frame
        while frame is not None:
            if frame.f_globals.get("__name__") == "pyramid.router":
                found += 1
                break
            frame = frame.f_back
    return found


def report(client):
    return json.loads(client.recv(timeout=CLIENT_TIMEOUT))


def test_a_connection_held_by_a_handler_keeps_no_request_green_thread(live):
    count = 5
    with contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(connect(live.ws_url("/report"), ping_interval=None))
            for _ in range(count)
        ]
        for client in clients:
            report(client)
        assert open_connections() == count
        assert request_green_threads() == 0
        for client in clients:
            client.send("still served")
            assert client.recv(timeout=CLIENT_TIMEOUT) == "still served"
    assert wait_until(lambda: open_connections() == 0, CLIENT_TIMEOUT)


def test_the_handler_sees_its_request_as_in_the_request(live):
    with connect(live.ws_url("/report"), ping_interval=None) as client:
        assert report(client) == {
            "current_request": True,
            "current_registry": True,
            "context": True,
            "request_id": "r-1",
        }


def test_the_requests_callbacks_run_after_the_handler_in_order(live):
    with connect(live.ws_url("/report"), ping_interval=None) as client:
        report(client)
        client.send("hello")
        assert client.recv(timeout=CLIENT_TIMEOUT) == "hello"
        assert EVENTS == []  # nothing ran while the handler runs
    assert wait_until(lambda: len(EVENTS) == 4, CLIENT_TIMEOUT), EVENTS
    assert EVENTS == ["handler ended", "response", ("finished", True), "added"]


def test_a_handler_that_raises_is_logged_and_closes_with_1011(live, caplog):
    caplog.set_level(logging.ERROR, logger="stargate.view")
    with connect(live.ws_url("/fails"), ping_interval=None) as client:
        assert client.recv(timeout=CLIENT_TIMEOUT) == "about to fail"
        with pytest.raises(ConnectionClosed) as closed:
            client.recv(timeout=CLIENT_TIMEOUT)
    assert closed.value.rcvd.code == 1011
    assert wait_until(lambda: caplog.records, CLIENT_TIMEOUT)
    (record,) = caplog.records
    assert record.getMessage() == "WebSocket handler Fails.handler failed"
    assert record.exc_info[1].args == ("handler broke",)
    assert wait_until(lambda: open_connections() == 0, CLIENT_TIMEOUT)


def test_by_default_the_handler_runs_in_the_requests_green_thread(live):
    with connect(live.ws_url("/default"), ping_interval=None) as client:
        assert report(client)["current_request"]
        assert request_green_threads() == 1


def test_the_setting_gives_it_to_every_view_that_does_not_decline():
    EVENTS.clear()
    app = make_app(settings={"stargate.own_green_thread": "true"})
    with LiveServer(app) as live:
        with connect(live.ws_url("/default"), ping_interval=None) as client:
            assert report(client)["current_request"]
            assert request_green_threads() == 0
        with connect(live.ws_url("/declines"), ping_interval=None) as client:
            assert report(client)["current_request"]
            assert request_green_threads() == 1


def test_pyramid_tm_lets_the_handler_have_its_own_green_thread():
    # Its tween passes a WebSocket upgrade through (stargate's activate
    # hook): a handler commits short transactions of its own, as before.
    from tests.test_transactions import COMMITS, TransactionView

    class OwnTransactionView(TransactionView):
        own_green_thread = True

    COMMITS.clear()
    with Configurator() as config:
        config.include("pyramid_tm")
        config.include("stargate")
        config.add_route("ws", "/ws")
        config.add_view(OwnTransactionView, route_name="ws")
        app = config.make_wsgi_app()
    with LiveServer(app) as live:
        with connect(live.ws_url("/ws"), ping_interval=None) as client:
            assert json.loads(client.recv(timeout=CLIENT_TIMEOUT)) == {
                "tm_active": False
            }
            assert request_green_threads() == 0
            client.send("one")
            assert client.recv(timeout=CLIENT_TIMEOUT) == "committed one"
    assert COMMITS == ["one"]


@pytest.mark.parametrize(
    "option, seen_before_the_handler_ends, why",
    [
        ("tween", "tween returned", "tests.test_handed_off.tween (a tween"),
        ("new_response", "new response", "a NewResponse subscriber"),
    ],
)
def test_what_would_see_the_view_return_keeps_the_handler_in_the_request(
    option, seen_before_the_handler_ends, why, caplog
):
    """A tween or a NewResponse subscriber keeps the handler in the
    request's green thread; the view asked for one of its own, so it says
    why, once, however many connections follow."""
    caplog.set_level(logging.WARNING, logger="stargate.view")
    EVENTS.clear()
    with LiveServer(make_app(**{option: True})) as live:
        with connect(live.ws_url("/report"), ping_interval=None) as client:
            report(client)
            assert request_green_threads() == 1
        assert wait_until(
            lambda: seen_before_the_handler_ends in EVENTS, CLIENT_TIMEOUT
        ), EVENTS
        with connect(live.ws_url("/report"), ping_interval=None) as client:
            report(client)
    ended = EVENTS.index("handler ended")
    assert ended < EVENTS.index(seen_before_the_handler_ends)
    warnings = [r.getMessage() for r in caplog.records if "own_green_thread" in r.msg]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("Report.own_green_thread: the handler runs in")
    assert why in warnings[0]


def handler_worker(port, marker, *args):
    """tests/handler_worker.py on the runtime this suite runs."""
    from stargate import runtime

    worker = str(Path(__file__).with_name("handler_worker.py"))
    return ServerProcess(
        [sys.executable, "-W", "ignore", worker, str(port), str(marker), *args],
        port=port,
        env=dict(os.environ, STARGATE_RUNTIME=runtime.current().NAME),
    )


def test_a_handler_keeps_its_connections_place_in_max_clients(tmp_path):
    port = free_port()
    with handler_worker(port, tmp_path / "marker", "2") as server:
        server.wait_ready()
        first = connect(f"ws://127.0.0.1:{port}/ws", ping_interval=None)
        second = connect(f"ws://127.0.0.1:{port}/ws", ping_interval=None)
        for client in (first, second):
            assert client.recv(timeout=CLIENT_TIMEOUT) == "ready"
        assert_held_back_until(port, first.close)
        second.close()


def test_sigterm_closes_with_1001_and_lets_the_handler_finish(tmp_path):
    port = free_port()
    marker = tmp_path / "marker"
    with handler_worker(port, marker) as server:
        server.wait_ready()
        with connect(f"ws://127.0.0.1:{port}/ws", ping_interval=None) as client:
            assert client.recv(timeout=CLIENT_TIMEOUT) == "ready"
            server.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                client.recv(timeout=CLIENT_TIMEOUT)
        assert closed.value.rcvd.code == 1001
        assert server.wait(timeout=CLIENT_TIMEOUT) == 0
    assert marker.read_text() == "finally ran", server.output
