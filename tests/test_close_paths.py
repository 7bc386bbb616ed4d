"""Every way a connection ends delivers its close code (issue 17, defect 3).

Closing a socket that still holds unread bytes makes the kernel send a
reset, and a client then loses the close frame. The server writes its close
frame, shuts its write side, reads what the client still sends until the
client closes its side, and only then closes: each path is tried 40 times
with a client that has bytes in flight, and must deliver its code 40 times.
"""

import contextlib
import signal

import pytest
from pyramid.config import Configurator
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from stargate import WebSocketView
from stargate.testing.server import LiveServer
from tests.clients import CLIENT_TIMEOUT, ServerProcess, free_port, stargate_command
from tests.rawws import RawClient, client_frame
from tests.test_factory import STOP_TIMEOUT, start_pserve

TRIES = 40
LIMIT = 65536


class Echo(WebSocketView):
    def handler(self, websocket):
        while (message := websocket.wait()) is not None:
            if message == "close-please":
                websocket.close(4000, "asked to")
                return
            websocket.send(message)


def make_app():
    settings = {"stargate.max_message_size": str(LIMIT)}
    with Configurator(settings=settings) as config:
        config.include("stargate")
        config.add_route("echo", "/echo")
        config.add_view(Echo, route_name="echo")
        return config.make_wsgi_app()


@pytest.fixture(scope="module")
def server():
    """The ``/echo`` of ``stargate demo`` in its own process: a client in
    the same process as the server would read before the kernel handles a
    reset, and hide it."""
    port = free_port()
    command = stargate_command(
        "demo", "--port", str(port), "--set", f"stargate.max_message_size={LIMIT}"
    )
    with ServerProcess(command, url_pattern=r"stargate demo: (http://\S+)") as demo:
        demo.wait_ready()
        yield f"ws://127.0.0.1:{port}/echo"


@pytest.fixture(scope="module")
def live():
    with LiveServer(make_app()) as live:
        yield live


def code_seen(client):
    """The close code the client received, or None when it got none."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            client.recv(timeout=CLIENT_TIMEOUT)
    return None if info.value.rcvd is None else info.value.rcvd.code


def send_ignoring_close(client, message):
    try:
        client.send(message)
    except ConnectionClosed:
        pass  # the server closed while we sent: its code is read below


def test_a_message_over_the_limit_gets_1009_every_time(server):
    codes = []
    for _ in range(TRIES):
        with connect(server, ping_interval=None) as client:
            send_ignoring_close(client, b"x" * (128 * LIMIT))
            codes.append(code_seen(client))
    assert codes == [1009] * TRIES


def test_a_protocol_error_gets_1002_every_time(server):
    # A text frame with RSV2 set (no extension defines it), then a large
    # valid frame still in flight when the server fails the connection.
    bad = bytes([client_frame(0x1, b"bad")[0] | 0x20]) + client_frame(0x1, b"bad")[1:]
    codes = []
    for _ in range(TRIES):
        with connect(server, ping_interval=None) as client:
            try:
                client.socket.sendall(bad + client_frame(0x2, b"y" * (LIMIT - 16)))
            except OSError:
                pass  # a reset: the close frame is lost, as asserted below
            codes.append(code_seen(client))
    assert codes == [1002] * TRIES


def test_a_protocol_error_behind_a_backlog_still_gets_its_close_frame(server):
    # The close frame waits behind echoes the client has not read yet, and
    # the client keeps sending: a socket closed with those bytes unread
    # resets, and the kernel drops what it had not sent, close frame too.
    port = int(server.rsplit(":", 1)[1].split("/")[0])
    codes = []
    for _ in range(TRIES):
        with RawClient(port, "/echo", rcvbuf=4096) as raw:
            for _ in range(8):
                raw.send(0x2, b"e" * (LIMIT // 2))
            bad = bytes([client_frame(0x1, b"bad")[0] | 0x20])
            raw.sock.sendall(bad + client_frame(0x1, b"bad")[1:])
            raw.sock.settimeout(0.5)
            try:
                raw.sock.send(client_frame(0x2, b"j" * LIMIT))  # whatever fits
            except OSError:
                pass
            try:
                code = raw.close_code()
            except (OSError, EOFError):
                code = None
            codes.append(code)
    assert codes == [1002] * (TRIES)


def test_a_server_close_delivers_its_code_every_time(live):
    codes = []
    for _ in range(TRIES):
        with connect(live.ws_url("/echo"), ping_interval=None) as client:
            client.send("close-please")
            for i in range(5):
                send_ignoring_close(client, f"after {i}" * 1000)
            codes.append(code_seen(client))
    assert codes == [4000] * TRIES


def test_shutdown_delivers_1001_to_every_client(tmp_path):
    from stargate import runtime

    # the server on the runtime this suite runs (--runtime)
    server = start_pserve(runtime.current().NAME, tmp_path)
    try:
        with contextlib.ExitStack() as stack:
            url = server.ws_url + "/echo"
            clients = [
                stack.enter_context(connect(url, ping_interval=None))
                for _ in range(TRIES)
            ]
            for client in clients:
                client.send("before")
                assert client.recv(timeout=CLIENT_TIMEOUT) == "before"
            for client in clients:
                for i in range(10):
                    client.send(f"in flight {i}" * 500)
            server.signal(signal.SIGTERM)
            codes = [code_seen(client) for client in clients]
        assert codes == [1001] * TRIES
        assert server.wait(timeout=STOP_TIMEOUT + CLIENT_TIMEOUT) == 0
    finally:
        server.stop(timeout=5)


def test_an_upgrade_completed_during_shutdown_gets_1001(tmp_path):
    # The worker's closing sweep runs at SIGTERM; an upgrade whose request
    # was still arriving completes after it. It must hear 1001 too, not run
    # its handler until the worker exits under it.
    from stargate import runtime

    server = start_pserve(runtime.current().NAME, tmp_path)
    try:
        # A never answers the close frame, so the worker waits for it (up to
        # the ini's shutdown_timeout of 10 s) after the sweep.
        with (
            RawClient(server.port, "/echo") as held,
            RawClient(server.port, "/echo", hold_back=True) as late,
        ):
            assert held.status == b"HTTP/1.1 101 Switching Protocols"
            server.signal(signal.SIGTERM)
            assert held.close_code() == 1001  # the sweep has run
            late.finish_upgrade()
            assert late.status == b"HTTP/1.1 101 Switching Protocols"
            assert late.close_code(timeout=8.0) == 1001
    finally:
        server.stop(timeout=STOP_TIMEOUT + 10)
