"""The access log and shutdown as an operator sees them under ``pserve``:
one timestamp per line, a WebSocket session logged when it opens and when it
closes, no eventlet start/exit chatter, and a second Ctrl-C that exits at
once."""

import re
import signal
import socket

import pytest

from tests.clients import ServerProcess, connect, http, wait_until
from tests.test_config import SERVER_RUNTIMES, pserve, write_ini

#: Seconds anything here may take: a server starting, a line being logged.
DEADLINE = 30

#: A date in a log line: logging's asctime, or eventlet's own stamp.
DATE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d|\d\d/\w{3}/\d{4}[ :]\d\d")


def serve(tmp_path, app="", server="", runtime="eventlet"):
    ini = write_ini(tmp_path, app=app, server=server, logging=True, runtime=runtime)
    process = ServerProcess(pserve(ini), url_pattern=r"Serving on (http://\S+)")
    process.wait_ready(DEADLINE)
    return process


@pytest.fixture(params=sorted(SERVER_RUNTIMES))
def runtime(request):
    """Each test runs on stargate's eventlet server and on its gevent one."""
    return request.param


@pytest.fixture
def pserved(tmp_path, runtime):
    server = serve(tmp_path, runtime=runtime)
    yield server
    server.stop()


def line_with(server, *texts):
    return wait_until(
        lambda: next(
            (ln for ln in server.lines if all(text in ln for text in texts)), None
        ),
        DEADLINE,
        message=f"a log line with {texts}",
    )


def test_a_request_line_has_one_timestamp(pserved):
    http(pserved.url + "/jobs/stamped")
    line = line_with(pserved, "GET /jobs/stamped")
    assert len(DATE.findall(line)) == 1, line


def test_a_request_line_counts_the_bytes_sent_with_the_headers(pserved):
    host, port = pserved.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=DEADLINE) as sock:
        sock.sendall(b"GET /jobs/counted HTTP/1.1\r\nHost: x\r\n\r\n")
        sent = read_response(sock)
    line = line_with(pserved, "GET /jobs/counted")
    status, length = line.rsplit('" ', 1)[1].split()[:2]
    assert (status, int(length)) == ("200", len(sent)), line


def read_response(sock):
    """One whole response with a Content-Length, off a kept-alive socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_refused_request_is_not_logged_with_the_previous_ones_status(pserved):
    # gevent's server logs a refused request; eventlet's does not log it.
    host, port = pserved.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=DEADLINE) as sock:
        sock.sendall(b"GET /jobs/ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        # on the same connection, a request over the header line limit
        big = b"X-Big: " + b"b" * 9000
        sock.sendall(b"GET /jobs/big HTTP/1.1\r\n" + big + b"\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.")
    http(pserved.url + "/jobs/after")
    line_with(pserved, "GET /jobs/after")  # logged after the refused one
    refused = [ln for ln in pserved.lines if "GET /jobs/big" in ln]
    assert all('/jobs/big HTTP/1.1" 400 ' in ln for ln in refused), refused


def test_a_websocket_session_is_logged_when_it_opens_and_closes(pserved):
    with connect(pserved.ws_url + "/echo") as ws:
        line_with(pserved, '"WebSocket /echo" rfc6455 open')
        for word in ("hello", "again", "bye"):
            ws.send(word)
            assert ws.recv(timeout=10) == word
    closed = line_with(pserved, '"WebSocket /echo" rfc6455 closed 1000 after')
    assert "127.0.0.1" in closed
    assert len(DATE.findall(closed)) == 1
    # The echo handler received three messages and sent three back.
    assert closed.endswith("s, 3 received, 3 sent"), closed


def test_shutdown_says_nothing_about_wsgi_internals(tmp_path, runtime):
    server = serve(tmp_path, runtime=runtime)
    http(server.url + "/jobs/x")
    line_with(server, "GET /jobs/x")
    server.signal(signal.SIGTERM)
    assert server.wait(DEADLINE) == 0
    server.stop()
    assert "wsgi exited" not in server.output
    assert "wsgi starting up" not in server.output


def test_a_second_ctrl_c_exits_at_once(tmp_path, runtime):
    """The first SIGINT waits for WebSockets to close (here, a client that
    never answers, with 600-second timeouts); the second one exits."""
    server = serve(
        tmp_path,
        app="stargate.close_timeout = 600",
        server="shutdown_timeout = 600",
        runtime=runtime,
    )
    try:
        host, port = server.url.removeprefix("http://").split(":")
        silent = socket.create_connection((host, int(port)), timeout=DEADLINE)
        silent.sendall(
            b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        assert silent.recv(1024).startswith(b"HTTP/1.1 101")
        line_with(server, '"WebSocket /echo" rfc6455 open')
        server.signal(signal.SIGINT)
        line_with(server, "stopping (SIGINT)")
        server.signal(signal.SIGINT)
        status = server.wait(DEADLINE)
        assert status == 128 + signal.SIGINT, server.output
        assert "second SIGINT, exiting now" in server.output
        silent.close()
    finally:
        server.stop()


@pytest.mark.timeout(240)
def test_pserve_reload_reloads_without_a_traceback(tmp_path, runtime):
    """hupper's watcher thread predates monkey-patching: the old worker used
    to print "Exception ignored in thread started by ..." as it exited."""
    ini = write_ini(tmp_path, logging=True, runtime=runtime)
    command = pserve(ini)
    command.insert(command.index(str(ini)), "--reload")
    server = ServerProcess(command, url_pattern=r"Serving on (http://\S+)")
    edits = []

    def noticed():
        """Whether the reloader saw the change; if not, change the file
        again (it may not have been watching yet). Once it has, no more
        edits: each would restart the worker that is starting."""
        if any("changed; reloading" in ln for ln in server.lines):
            return True
        edits.append(1)
        ini.write_text(ini.read_text() + f"\n# edit {len(edits)}\n")
        return False

    try:
        server.wait_ready(DEADLINE)
        wait_until(noticed, DEADLINE, interval=2.0, message="the change noticed")
        wait_until(
            lambda: sum("Serving on" in ln for ln in server.lines) >= 2,
            3 * DEADLINE,
            message="the reloaded server serving",
        )
        server.signal(signal.SIGINT)
        server.wait(DEADLINE)
    finally:
        server.stop()
    assert "Traceback" not in server.output, server.output
    assert "Exception ignored" not in server.output, server.output
