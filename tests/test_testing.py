"""The testing helpers stargate ships for its users, tested as users use them."""

import socket
import subprocess
import sys
import textwrap
import time

import pytest
from pyramid.config import Configurator

from stargate import WebSocketView, runtime
from stargate.testing.client import (
    ReceiveTimeout,
    UnexpectedMessage,
    UpgradeRefused,
    connect,
    connect_app,
)
from stargate.testing.server import LiveServer
from tests.clients import view_app


class Echo(WebSocketView):
    def handler(self, websocket):
        while (message := websocket.wait()) is not None:
            if message == "boom":
                raise ValueError("handler exploded on purpose")
            websocket.send(message)


def make_app(**settings):
    return view_app(Echo, "/echo", **settings)


@pytest.mark.parametrize("message", ["text", "", "ünï", b"", b"\x00\xff", b"x" * 70000])
def test_text_stays_str_and_binary_stays_bytes(stargate_server, message):
    server = stargate_server(make_app())
    with connect(server.ws_url("/echo")) as client:
        client.send(message)
        received = client.receive()
        assert received == message
        assert type(received) is type(message)


def test_in_process_connection_needs_no_port():
    with connect_app(make_app(), "/echo") as client:
        client.send("over a socket pair")
        assert client.receive() == "over a socket pair"
        client.send(b"\x01")
        assert client.receive() == b"\x01"


def test_receive_timeout_is_honoured(stargate_server):
    server = stargate_server(make_app())
    with connect(server.ws_url("/echo")) as client:
        started = time.monotonic()
        with pytest.raises(ReceiveTimeout, match="within 0.3 s"):
            client.receive(timeout=0.3)
        assert time.monotonic() - started >= 0.25


def test_receive_nothing_passes_on_silence_and_fails_on_a_message(stargate_server):
    server = stargate_server(make_app())
    with connect(server.ws_url("/echo")) as client:
        client.receive_nothing(0.1)
        client.send("unexpected")
        with pytest.raises(UnexpectedMessage, match="unexpected"):
            client.receive_nothing(2.0)


def test_receive_many_names_how_many_arrived(stargate_server):
    server = stargate_server(make_app())
    with connect(server.ws_url("/echo")) as client:
        client.send("one")
        with pytest.raises(ReceiveTimeout, match="1 of 2"):
            client.receive_many(2, timeout=0.3)


def test_refused_origin_raises_with_status_and_body(stargate_server):
    server = stargate_server(make_app())
    with pytest.raises(UpgradeRefused) as refused:
        connect(server.ws_url("/echo"), origin="https://elsewhere.example")
    assert refused.value.status == 403
    assert b"elsewhere.example" in refused.value.body
    assert "403" in str(refused.value)


def test_refusal_in_process_too():
    with pytest.raises(UpgradeRefused) as refused:
        connect_app(make_app(), "/echo", origin="https://elsewhere.example")
    assert refused.value.status == 403


def test_close_code_and_reason_are_reported(stargate_server):
    server = stargate_server(make_app(**{"stargate.max_message_size": "10"}))
    with connect(server.ws_url("/echo")) as client:
        client.send("more than ten bytes")
        code, reason = client.wait_closed()
        assert code == 1009
        assert client.close_code == 1009


def test_live_server_leaves_no_port_behind():
    server = LiveServer(make_app()).start()
    port = server.port
    client = connect(server.ws_url("/echo"))
    client.send("x")
    assert client.receive() == "x"
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    # The open WebSocket was aborted with the server.
    assert client.wait_closed(timeout=5)[0] == 1006


def test_a_raising_handler_fails_the_test_with_its_traceback(tmp_path):
    """Run pytest on a user's test file: the handler's error must surface.
    The user's conftest.py patches for this process's runtime, as the
    plugin's docstring says to."""
    patch_call = runtime.current().PATCH_CALL  # e.g. "gevent.monkey.patch_all()"
    module = patch_call.rsplit(".", 1)[0]
    (tmp_path / "conftest.py").write_text(f"import {module}\n{patch_call}\n")
    test_file = tmp_path / "test_user.py"
    test_file.write_text(
        textwrap.dedent(
            """
            from pyramid.config import Configurator
            from stargate import WebSocketView
            from stargate.testing.client import connect

            class Broken(WebSocketView):
                def handler(self, websocket):
                    websocket.wait()
                    raise KeyError("the user's bug")

            def make_app():
                with Configurator() as config:
                    config.include("stargate")
                    config.add_route("x", "/x")
                    config.add_view(Broken, route_name="x")
                    return config.make_wsgi_app()

            def test_uses_the_broken_handler(stargate_server):
                server = stargate_server(make_app())
                with connect(server.ws_url("/x")) as client:
                    client.send("go")
                    assert client.wait_closed()[0] == 1011

            def test_expects_the_error(stargate_server):
                server = stargate_server(make_app(), handler_errors="ignore")
                with connect(server.ws_url("/x")) as client:
                    client.send("go")
                    assert client.wait_closed()[0] == 1011
            """
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(test_file),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    # Reported at teardown, so pytest counts it as an error of that test.
    assert "2 passed" in output and "1 error" in output
    assert "ERROR test_user.py::test_uses_the_broken_handler" in output
    assert "a WebSocket handler raised during the test" in output
    assert 'KeyError: "the user\'s bug"' in output
    assert "Traceback" in output


def test_private_redis_is_not_the_shared_one(stargate_redis):
    assert stargate_redis.port != 6379
    with stargate_redis.client() as redis:
        assert redis.ping()


# -- waiting for a listener on another server ------------------------------------


class Chat(WebSocketView):
    def handler(self, websocket):
        from stargate.hub import get_hub

        hub = get_hub(self.request.registry)
        hub.add("chat", websocket)
        while (message := websocket.wait()) is not None:
            hub.publish("chat", message)


def chat_app(**settings):
    return view_app(Chat, "/chat", **settings)


def test_wait_for_listeners_lets_the_first_message_cross_servers(
    stargate_server, stargate_redis
):
    settings = {"stargate.backend": stargate_redis.url}
    one = stargate_server(chat_app(**settings))
    two = stargate_server(chat_app(**settings))
    with connect(one.ws_url("/chat")) as alice, connect(two.ws_url("/chat")) as bob:
        assert two.wait_for_listeners("chat") == 1
        alice.send("the very first message")
        assert bob.receive(timeout=5) == "the very first message"


def test_wait_for_listeners_says_what_it_saw_when_time_runs_out(stargate_server):
    server = stargate_server(chat_app())
    with connect(server.ws_url("/chat")):
        with pytest.raises(
            TimeoutError, match=r"1 of 2 listener\(s\) on channel 'chat'"
        ):
            server.wait_for_listeners("chat", count=2, timeout=0.2)


def test_live_server_answers_a_failing_view_as_production_does(caplog):
    # A test must see what a client of the real server sees: the generic
    # 500 page, with the traceback in the log and not in the body.
    def failing(request):
        raise KeyError("secret internals")

    with Configurator() as config:
        config.add_route("fail", "/fail")
        config.add_view(failing, route_name="fail")
        app = config.make_wsgi_app()
    with caplog.at_level("ERROR", logger="stargate.server"):
        with LiveServer(app) as live:
            with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
                s.sendall(b"GET /fail HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                response = b""
                while chunk := s.recv(65536):
                    response += chunk
    assert response.startswith(b"HTTP/1.1 500 ")
    assert b"secret internals" not in response and b"Traceback" not in response
    assert "secret internals" in caplog.text


@pytest.mark.parametrize("module", ["websockets.exceptions", "websockets.sync.client"])
def test_without_websockets_the_client_names_the_extra_to_install(monkeypatch, module):
    # None in sys.modules makes the import fail, as on an install without it
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"pip install 'stargate\[testing\]'"):
        connect("ws://127.0.0.1:9/")
