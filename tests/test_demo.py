"""The demo application, served by ``stargate demo`` in a subprocess and
driven by real WebSocket and HTTP clients."""

import json

import pytest
from websockets.exceptions import InvalidStatus

from tests.clients import (
    ServerProcess,
    connect,
    http,
    raw_request,
    stargate_command,
)

URL_PATTERN = r"stargate demo: (http://\S+)"


@pytest.fixture(scope="module", params=["eventlet", "gevent"])
def demo(request):
    """The demo on each runtime of stargate's server."""
    server = ServerProcess(
        stargate_command(
            "demo", "--port", "0", "--log-level", "warning", "--runtime", request.param
        ),
        url_pattern=URL_PATTERN,
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop(timeout=5)


def recv_json(ws):
    return json.loads(ws.recv(timeout=10))


class TestChatPage:
    def test_the_root_is_an_html_page_that_opens_room_websockets(self, demo):
        response = http(demo.url + "/")
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "<title>stargate chat</title>" in response.text
        assert "/rooms/" in response.text
        assert "reconnecting" in response.text

    def test_the_page_loads_nothing_from_elsewhere(self, demo):
        text = http(demo.url + "/").text
        assert "http://" not in text and "https://" not in text
        assert "<script src" not in text and "<link" not in text

    def test_an_unknown_path_is_a_404_that_lists_the_endpoints(self, demo):
        response = http(demo.url + "/nowhere")
        assert response.status == 404
        assert "/echo" in response.text


class TestEcho:
    def test_text_comes_back_as_text(self, demo):
        with connect(demo.ws_url + "/echo") as ws:
            ws.send("hello, stargate")
            assert ws.recv(timeout=10) == "hello, stargate"

    def test_binary_comes_back_as_binary(self, demo):
        payload = bytes(range(256)) * 4
        with connect(demo.ws_url + "/echo") as ws:
            ws.send(payload)
            assert ws.recv(timeout=10) == payload

    def test_messages_come_back_in_order(self, demo):
        with connect(demo.ws_url + "/echo") as ws:
            for i in range(50):
                ws.send(f"message {i}")
            assert [ws.recv(timeout=10) for _ in range(50)] == [
                f"message {i}" for i in range(50)
            ]

    def test_a_plain_get_is_426_with_a_readable_body(self, demo):
        response = http(demo.url + "/echo")
        assert response.status == 426
        assert response.headers["upgrade"].lower() == "websocket"
        assert "WebSocket endpoint" in response.text

    def test_a_browser_gets_a_page_that_talks_to_the_endpoint(self, demo):
        response = http(demo.url + "/echo", headers=[("Accept", "text/html,*/*")])
        assert response.status == 200
        assert "new WebSocket(" in response.text

    def test_the_browsers_favicon_request_is_answered(self, demo):
        assert http(demo.url + "/favicon.ico").status == 204

    def test_a_foreign_origin_is_refused_with_403(self, demo):
        with pytest.raises(InvalidStatus) as info:
            connect(demo.ws_url + "/echo", origin="http://evil.example")
        assert info.value.response.status_code == 403
        assert b"evil.example" in info.value.response.body

    def test_the_same_origin_is_accepted(self, demo):
        with connect(demo.ws_url + "/echo", origin=demo.url) as ws:
            ws.send("same origin")
            assert ws.recv(timeout=10) == "same origin"

    def test_a_malformed_upgrade_is_400_with_the_reason(self, demo):
        host = demo.url.split("://", 1)[1]
        request = (
            "GET /echo HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: not-a-valid-key\r\n"
            "Connection: close\r\n"
            "\r\n"
        ).encode()
        response = raw_request(demo.url, request)
        assert response.status == 400
        assert "Sec-WebSocket-Key" in response.text


class TestRooms:
    def test_every_message_reaches_everyone_in_the_room_sender_included(self, demo):
        url = demo.ws_url + "/rooms/broadcast-test"
        with connect(url) as a, connect(url) as b, connect(url) as c:
            # A message sent right after a connect could race the listener's
            # registration: make sure all three listen before the real test.
            wait_all_listening([a, b, c])
            a.send("from a")
            for ws in (a, b, c):
                assert ws.recv(timeout=10) == "from a"
            b.send(b"\x00binary from b")
            for ws in (a, b, c):
                assert ws.recv(timeout=10) == b"\x00binary from b"

    def test_messages_from_several_senders_all_arrive(self, demo):
        url = demo.ws_url + "/rooms/many-senders"
        with connect(url) as a, connect(url) as b, connect(url) as c:
            wait_all_listening([a, b, c])
            for ws, name in ((a, "a"), (b, "b"), (c, "c")):
                for i in range(10):
                    ws.send(f"{name}{i}")
            expected = {f"{name}{i}" for name in "abc" for i in range(10)}
            for ws in (a, b, c):
                received = [ws.recv(timeout=10) for _ in range(30)]
                assert set(received) == expected
                for name in "abc":  # one sender's messages keep their order
                    mine = [m for m in received if m[0] == name]
                    assert mine == [f"{name}{i}" for i in range(10)]

    def test_rooms_are_apart(self, demo):
        with (
            connect(demo.ws_url + "/rooms/red") as red,
            connect(demo.ws_url + "/rooms/blue") as blue,
        ):
            wait_all_listening([red])
            wait_all_listening([blue])
            red.send("for red only")
            assert red.recv(timeout=10) == "for red only"
            blue.send("for blue only")
            assert blue.recv(timeout=10) == "for blue only"

    def test_a_listener_that_left_does_not_stop_the_others(self, demo):
        url = demo.ws_url + "/rooms/leaving"
        with connect(url) as stays, connect(url) as other:
            with connect(url) as leaves:
                wait_all_listening([stays, other, leaves])
            stays.send("still here")
            assert stays.recv(timeout=10) == "still here"
            assert other.recv(timeout=10) == "still here"


def wait_all_listening(clients):
    """Each client sends a marker; return once every client saw all markers.

    A client connected to a room listens once its own marker comes back."""
    markers = [f"ready {i} {id(ws)}" for i, ws in enumerate(clients)]
    for ws, marker in zip(clients, markers):
        ws.send(marker)
        # its own marker back means it is registered; drain what came first
        while ws.recv(timeout=10) != marker:
            pass
    # everyone is registered now; drain the markers sent after each joined
    for i, ws in enumerate(clients):
        for marker in markers[i + 1 :]:
            assert ws.recv(timeout=10) == marker


class TestJobs:
    def test_a_plain_get_returns_the_state_as_json(self, demo):
        response = http(demo.url + "/jobs/plain")
        assert response.status == 200
        assert response.headers["content-type"].startswith("application/json")
        assert json.loads(response.text)["state"] == "new"

    def test_listeners_hear_start_and_stop(self, demo):
        url = demo.ws_url + "/jobs/42"
        with connect(url) as first, connect(url) as second:
            assert recv_json(first) == {**recv_json(second), "job": "42"}
            response = http(demo.url + "/jobs/42/start", method="POST")
            assert response.status == 200
            assert json.loads(response.text)["state"] == "running"
            for ws in (first, second):
                assert recv_json(ws)["state"] == "running"
            http(demo.url + "/jobs/42/stop", method="POST")
            for ws in (first, second):
                message = recv_json(ws)
                assert message["state"] == "stopped"
                assert message["job"] == "42"
            assert json.loads(http(demo.url + "/jobs/42").text)["state"] == "stopped"

    def test_a_listener_gets_the_current_state_on_connect(self, demo):
        http(demo.url + "/jobs/7/start", method="POST")
        with connect(demo.ws_url + "/jobs/7") as ws:
            assert recv_json(ws)["state"] == "running"

    def test_other_jobs_stay_quiet(self, demo):
        with connect(demo.ws_url + "/jobs/quiet") as ws:
            assert recv_json(ws)["state"] == "new"
            http(demo.url + "/jobs/noisy/start", method="POST")
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.5)

    def test_start_answers_post_only(self, demo):
        assert http(demo.url + "/jobs/1/start").status == 404


class TestRedisUnreachable:
    """A room or job that cannot join its channel (Redis down) closes the
    connection with 1013 and a reason, and logs one line: no traceback."""

    @pytest.mark.parametrize("path", ["/rooms/down", "/jobs/down"])
    def test_joining_closes_with_1013_and_logs_one_line(
        self, stargate_server, caplog, path
    ):
        from stargate.demo import make_app
        from stargate.testing.client import connect as connect_client
        from tests.clients import free_port

        unreachable = f"redis://127.0.0.1:{free_port()}/0"
        server = stargate_server(make_app({"stargate.backend": unreachable}))
        with caplog.at_level("WARNING", logger="stargate"):
            with connect_client(server.ws_url(path)) as client:
                code, reason = client.wait_closed(timeout=20)
        assert code == 1013 and "try again later" in reason
        lines = [r for r in caplog.records if "could not join" in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is None
