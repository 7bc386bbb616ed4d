"""Issue 18: stargate where Pyramid users deploy, gunicorn and waitress.

Each test starts a real server process on a free loopback port, runs the
demo application with the commands docs/howto/gunicorn.rst shows, talks to
it with real WebSocket clients and stops it by PID.

* gunicorn's green workers, each test once per worker class: ``-k gevent``
  (every gunicorn) and ``-k eventlet`` (gunicorn 25 and earlier). The
  upgrade goes through ``gunicorn.socket`` (before: 500,
  ``IncorrectlyConfigured``), and gunicorn writes nothing on the connection
  after the handler; a room spans 2 gunicorn workers through a private
  Redis; with ``-c python:stargate.gunicorn`` or a ``gunicorn.conf.py``
  importing its hooks, SIGTERM and SIGINT close every WebSocket with 1001
  and the worker exits 0 (gunicorn alone would wait ``graceful_timeout``,
  then cut them: 1006).
* gunicorn's sync, gthread and gevent_pywsgi workers and waitress cannot
  carry a WebSocket: the upgrade is refused with 501 and a sentence naming the
  server and what to run instead, logged once (before: a bare 500 and a
  traceback).

Every wait is bounded by a deadline.
"""

import os
import pathlib
import re
import signal
import socket
import sys
import uuid
from contextlib import ExitStack

import psutil
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from stargate.exceptions import IncorrectlyConfigured
from stargate.gunicorn import client_socket
from stargate.runtime import RUNTIME_ENV
from tests.clients import (
    CLIENT_TIMEOUT,
    ServerProcess,
    connect,
    free_port,
    http,
    raw_request,
    wait_until,
)
from tests.rawws import RawClient, upgrade_request
from tests.test_hixie_live import hixie76_request
from tests.test_multiworker import Room, Server, receive, spread_clients, worker_pids

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: Seconds anything a test waits for may take.
DEADLINE = 20.0

#: gunicorn's line once it listens (its workers boot after it).
LISTENING = r"Listening at: (http://\S+)"

#: gunicorn's workers that carry WebSockets: gevent, and eventlet where
#: gunicorn still has it (25 and earlier; the test extra pins gunicorn<26).
GREEN_WORKERS = ["gevent", "eventlet"]

#: Runs a test once per green worker class, ``-k WORKER``.
each_green_worker = pytest.mark.parametrize("worker", GREEN_WORKERS)


def gunicorn_server(*arguments, workers=1, env=None):
    """``gunicorn ARGUMENTS`` (options, then the application) on a free
    port, its workers booted; ``env``: variables added to the environment."""
    command = [
        sys.executable, "-W", "ignore", "-m", "gunicorn",
        "--bind", f"127.0.0.1:{free_port()}",
        "--workers", str(workers),
        *_no_control_socket(),
        *arguments,
    ]  # fmt: skip
    server = Server(command, url_pattern=LISTENING, env={**os.environ, **(env or {})})
    try:
        server.wait_ready()
        wait_until(
            lambda: len(worker_pids(server) - {server.pid}) == workers,
            DEADLINE,
            message=f"{workers} gunicorn worker(s)",
        )
    except BaseException:
        server.stop()
        raise
    return server


def _no_control_socket():
    """gunicorn 25 opens a control socket at one path per user; tests run
    side by side must not share it."""
    from gunicorn.config import Config

    if "control_socket_disable" in Config().settings:
        return ["--no-control-socket"]
    return []


def assert_going_away(client):
    """The server closes ``client``'s WebSocket with a close frame saying
    1001 (going away), within ``DEADLINE``."""
    with pytest.raises(ConnectionClosed) as closed:
        client.recv(timeout=DEADLINE)
    assert closed.value.rcvd is not None, "closed without a close frame"
    assert closed.value.rcvd.code == 1001


def assert_worker_exited_0(server, pid):
    """gunicorn's master reaped worker ``pid`` with exit code 0 (it logs any
    other code, and any signal), before ``graceful_timeout`` ran out."""
    output = server.output
    assert f"Worker exiting (pid: {pid})" in output, output
    assert f"Worker (pid:{pid}) exited with code" not in output, output
    assert f"Worker (pid:{pid}) was sent" not in output, output
    assert "graceful timeout" not in output, output
    assert "Traceback" not in output, output


def refusal(url):
    """The HTTP response a WebSocket client gets instead of an upgrade."""
    with pytest.raises(InvalidStatus) as refused:
        with connect(url):
            pass
    return refused.value.response


def logged(server, text, count=1):
    """Wait until ``text`` appears ``count`` times in the server's output."""
    return wait_until(
        lambda: sum(text in line for line in list(server.lines)) >= count,
        DEADLINE,
        message=f"{text!r} in the server's output",
    )


def accepted(pid, client):
    """Wait until process ``pid`` has accepted ``client``'s connection (its
    server end is among the process's sockets)."""
    address = client.getsockname()
    wait_until(
        lambda: any(
            conn.raddr and tuple(conn.raddr) == address
            for conn in psutil.Process(pid).net_connections(kind="tcp4")
        ),
        DEADLINE,
        message=f"worker {pid} to accept {address}",
    )


# -- gunicorn's green workers ---------------------------------------------------


@each_green_worker
def test_echo_through_a_green_worker(worker):
    # The how-to's 'myapp:main({})', with the demo's Paste Deploy factory.
    with gunicorn_server(
        "-k", worker, "-c", "python:stargate.gunicorn", "stargate.demo:main({})"
    ) as server:
        with connect(server.ws_url + "/echo") as client:
            for message in ("hello", b"\x00\xff", "é" * 10_000):
                client.send(message)
                assert client.recv(timeout=CLIENT_TIMEOUT) == message
        # The worker still serves plain HTTP next to WebSockets.
        assert http(server.url + "/jobs/1").status == 200
        # Documented: gunicorn's parser keeps hixie-76's key bytes.
        port = int(server.url.rsplit(":", 1)[1])
        request = hixie76_request(port).replace(b"GET /demo", b"GET /echo")
        response = raw_request(server.url, request)
        assert response.status == 400
        assert "8 key bytes" in response.text


@each_green_worker
def test_gunicorn_writes_nothing_after_the_handler(worker):
    """The handler owns the connection to its end: after the closing
    handshake the client reads end of file, not a second HTTP response, and
    gunicorn logs no error about the socket it handed over (the gevent
    worker wrote a 101 on it, or read a next request from it: EBADF and a
    traceback per WebSocket)."""
    with gunicorn_server("-k", worker, "stargate.demo:make_app()") as server:
        port = int(server.url.rsplit(":", 1)[1])
        with RawClient(port, "/echo") as client:
            assert client.status.startswith(b"HTTP/1.1 101")
            client.send(0x1, "ping me")
            assert client.frame() == (0x1, b"ping me")
            client.send(0x8, b"\x03\xe8")
            assert client.close_code() == 1000
            with pytest.raises(EOFError):
                client.frame()
            assert client.buffer == b""
    # Stopped and its output read to the end: whatever the worker logged
    # after the connection ended is in it.
    assert not any("Traceback" in line for line in server.lines), server.output
    assert "Socket error" not in server.output, server.output


@each_green_worker
def test_one_descriptor_per_websocket(worker):
    """A WebSocket holds one file descriptor of its worker, the one gunicorn
    accepted: with a duplicate each (a first fix for the gevent worker),
    ``worker_connections`` WebSockets would need twice as many descriptors
    as ``ulimit -n`` usually allows (1024)."""
    count = 40
    with gunicorn_server("-k", worker, "stargate.demo:make_app()") as server:
        (worker_pid,) = worker_pids(server)
        process = psutil.Process(worker_pid)
        with connect(server.ws_url + "/echo") as first:  # the app is loaded
            first.send("warm")
            assert first.recv(timeout=CLIENT_TIMEOUT) == "warm"
            before = process.num_fds()
            with ExitStack() as stack:
                for _ in range(count):
                    client = stack.enter_context(connect(server.ws_url + "/echo"))
                    client.send("here")
                    assert client.recv(timeout=CLIENT_TIMEOUT) == "here"
                held = process.num_fds() - before
        assert count <= held < count + count // 2, (held, count)


@each_green_worker
def test_a_room_spans_two_gunicorn_workers_through_redis(worker, redis_server):
    """The docs' ``-w 2`` command on a private Redis: clients are joined
    until both workers serve some (each client's worker found by its TCP
    connection); every client then sends, and every client gets every
    message, its own included, each sender's in the order sent."""
    app = f"stargate.demo:make_app({{'stargate.backend': '{redis_server.url}'}})"
    room = Room(f"/rooms/gunicorn-{uuid.uuid4().hex[:8]}")
    with (
        gunicorn_server(
            "-k", worker, "-c", "python:stargate.gunicorn", app, workers=2
        ) as server,
        ExitStack() as stack,
    ):  # fmt: skip
        by_pid = spread_clients(stack, server, room, per_worker=1, max_clients=60)
        assert len(by_pid) == 2
        clients = [client for group in by_pid.values() for client in group]
        sent = [f"client {i} message {k}" for i in range(len(clients)) for k in (0, 1)]
        for k in (0, 1):
            for i, client in enumerate(clients):
                client.send(f"client {i} message {k}")
        for client in clients:
            received = receive(client, len(sent))
            assert sorted(received) == sorted(sent)
            for i in range(len(clients)):
                own = [m for m in received if m.startswith(f"client {i} ")]
                assert own == [f"client {i} message {k}" for k in (0, 1)]


def test_preload_with_the_gevent_worker(redis_server):
    """``--preload`` loads the application in gunicorn's master, before the
    gevent worker patches: the Redis backend made stargate choose its
    runtime there, eventlet, and every room failed in the worker (a
    traceback per WebSocket, clients left waiting). Now the worker refuses
    to boot with one line naming STARGATE_RUNTIME=gevent, and with it set
    rooms work across 2 workers."""
    app = f"stargate.demo:make_app({{'stargate.backend': '{redis_server.url}'}})"
    options = ["-k", "gevent", "-c", "python:stargate.gunicorn", "--preload", app]
    command = [
        sys.executable, "-W", "ignore", "-m", "gunicorn",
        "--bind", f"127.0.0.1:{free_port()}", *_no_control_socket(), *options,
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != RUNTIME_ENV}
    with Server(command, url_pattern=LISTENING, env=env) as refused:
        assert refused.wait(DEADLINE) != 0
    assert f"set {RUNTIME_ENV}=gevent" in refused.output, refused.output

    room = Room(f"/rooms/preload-{uuid.uuid4().hex[:8]}")
    with (
        gunicorn_server(*options, workers=2, env={RUNTIME_ENV: "gevent"}) as server,
        ExitStack() as stack,
    ):
        by_pid = spread_clients(stack, server, room, per_worker=1, max_clients=60)
        clients = [client for group in by_pid.values() for client in group]
        clients[0].send("preloaded")
        for client in clients:
            assert receive(client, 1) == ["preloaded"]


#: docs/howto/gunicorn.rst's gunicorn.conf.py, the hooks imported; the
#: worker class is the test's.
CONF_PY = """\
from stargate.gunicorn import post_worker_init, worker_int  # noqa: F401

worker_class = "{worker}"
worker_connections = 10_000
graceful_timeout = 10
"""


@each_green_worker
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
@pytest.mark.parametrize("config", ["module", "gunicorn.conf.py"])
def test_stopping_closes_websockets_with_1001(worker, signum, config, tmp_path):
    """On SIGTERM and on SIGINT the worker closes its WebSockets with 1001
    and exits 0. Without the hooks gunicorn would wait ``graceful_timeout``
    (15 s here, less than ``DEADLINE``), then cut them without a close
    frame: a 1001 is proof the hooks closed them before that."""
    if config == "module":
        options = ["-k", worker, "-c", "python:stargate.gunicorn"]
    else:
        (tmp_path / "gunicorn.conf.py").write_text(CONF_PY.format(worker=worker))
        options = ["-c", str(tmp_path / "gunicorn.conf.py")]
    options += ["--graceful-timeout", "15"]
    with gunicorn_server(*options, "stargate.demo:make_app()") as server:
        (worker_pid,) = worker_pids(server)
        with ExitStack() as stack:
            clients = [
                stack.enter_context(connect(server.ws_url + "/echo")) for _ in range(2)
            ]
            for client in clients:
                client.send("here")
                assert client.recv(timeout=CLIENT_TIMEOUT) == "here"
            server.signal(signum)
            for client in clients:
                assert_going_away(client)
        assert server.wait(DEADLINE) == 0
        assert f"Using worker: {worker}" in server.output
        assert "closing 2 WebSocket(s) with 1001" in server.output
        assert_worker_exited_0(server, worker_pid)


@each_green_worker
def test_a_reload_replaces_the_worker_and_closes_its_websockets_with_1001(worker):
    """SIGHUP to the master (a rolling restart): it starts a new worker and
    sends the old one SIGTERM; the old one's WebSockets get 1001, it exits
    0, and the client reconnects to the new one."""
    with gunicorn_server(
        "-k", worker, "-c", "python:stargate.gunicorn", "stargate.demo:make_app()"
    ) as server:  # fmt: skip
        (old,) = worker_pids(server)
        with connect(server.ws_url + "/echo") as client:
            client.send("before")
            assert client.recv(timeout=CLIENT_TIMEOUT) == "before"
            server.signal(signal.SIGHUP)
            assert_going_away(client)
        logged(server, f"Worker exiting (pid: {old})")
        with connect(server.ws_url + "/echo") as client:
            client.send("after")
            assert client.recv(timeout=CLIENT_TIMEOUT) == "after"
        # The master reaps the old worker: one worker left, a new one.
        wait_until(
            lambda: (
                len(worker_pids(server) - {server.pid, old}) == 1
                and old not in worker_pids(server)
            ),
            DEADLINE,
            message="the old worker reaped",
        )
    assert_worker_exited_0(server, old)


@each_green_worker
def test_a_worker_restarted_for_max_requests_closes_with_1001(worker):
    """``--max-requests``: the worker stops by itself, with no signal and no
    hook from gunicorn; its WebSockets are closed with 1001 too and it exits
    0 (before: held until ``graceful_timeout``, then cut)."""
    with gunicorn_server(
        "-k", worker, "-c", "python:stargate.gunicorn",
        "--max-requests", "1", "--graceful-timeout", "15",
        "stargate.demo:make_app()",
    ) as server:  # fmt: skip
        (worker_pid,) = worker_pids(server)
        with connect(server.ws_url + "/echo") as client:  # its one request
            client.send("here")
            assert client.recv(timeout=CLIENT_TIMEOUT) == "here"
            assert_going_away(client)
        logged(server, f"Worker exiting (pid: {worker_pid})")
        assert "closing 1 WebSocket(s) with 1001" in server.output
        # A new worker replaces it.
        wait_until(
            lambda: worker_pids(server) - {server.pid, worker_pid},
            DEADLINE,
            message="a new worker",
        )
    assert_worker_exited_0(server, worker_pid)


@each_green_worker
def test_an_upgrade_under_way_at_sigterm_is_closed_with_1001_too(worker):
    """A WebSocket whose upgrade request was still arriving when SIGTERM
    came opens after the first sweep; it is closed with 1001 too, not held
    until ``graceful_timeout`` and cut."""
    with gunicorn_server(
        "-k", worker, "-c", "python:stargate.gunicorn",
        "--graceful-timeout", "15",
        "stargate.demo:make_app()",
    ) as server:  # fmt: skip
        port = int(server.url.rsplit(":", 1)[1])
        request = upgrade_request(port, "/echo")
        head, last_line = request[:-2], request[-2:]
        (worker_pid,) = worker_pids(server)
        with (
            connect(server.ws_url + "/echo") as early,
            socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as late,
        ):
            late.sendall(head)  # all but the blank line that ends it
            accepted(worker_pid, late)
            early.send("here")
            assert early.recv(timeout=CLIENT_TIMEOUT) == "here"
            server.signal(signal.SIGTERM)
            assert_going_away(early)
            late.sendall(last_line)
            late.settimeout(DEADLINE)
            data = b""
            while b"\x88" not in data.partition(b"\r\n\r\n")[2]:
                chunk = late.recv(4096)
                assert chunk, f"closed without a close frame after {data!r}"
                data += chunk
            head, _, frames = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101")
            assert frames[:1] == b"\x88" and frames[2:4] == b"\x03\xe9"  # 1001
        assert server.wait(DEADLINE) == 0
        assert_worker_exited_0(server, worker_pid)


@each_green_worker
def test_max_connections_answers_503_before_worker_connections_is_full(worker):
    """A worker holding ``--worker-connections`` connections stops
    accepting: a further client waits unanswered. With
    ``stargate.max_connections`` below it, the client is told 503 at once
    (the how-to's advice), and served once a WebSocket closes."""
    app = "stargate.demo:make_app({'stargate.max_connections': '1'})"
    with gunicorn_server(
        "-k", worker, "-c", "python:stargate.gunicorn",
        "--worker-connections", "3", app,
    ) as server:  # fmt: skip
        url = server.ws_url + "/echo"
        with connect(url) as first:
            first.send("one")
            assert first.recv(timeout=CLIENT_TIMEOUT) == "one"
            assert refusal(url).status_code == 503
        wait_until(
            lambda: _echoes(url), DEADLINE, message="a WebSocket once the first closed"
        )


def _echoes(url):
    try:
        with connect(url) as client:
            client.send("again")
            return client.recv(timeout=CLIENT_TIMEOUT) == "again"
    except InvalidStatus:
        return False  # the first one's close is still being counted


KEEP_OPEN_APP = """\
from pyramid.config import Configurator

from stargate import WebSocketView


class Echo(WebSocketView):
    keep_open = True

    def handler(self, websocket):
        websocket.on_message = lambda websocket, message: websocket.send(message)


def make_app():
    with Configurator() as config:
        config.include("stargate")
        config.add_route("echo", "/echo")
        config.add_view(Echo, route_name="echo")
        return config.make_wsgi_app()
"""


@each_green_worker
def test_keep_open_views_under_gunicorn(worker, tmp_path):
    """A ``keep_open`` connection outlives its handler under gunicorn too,
    and is closed with 1001 on SIGTERM."""
    (tmp_path / "keep_open_app.py").write_text(KEEP_OPEN_APP)
    with gunicorn_server(
        "-k", worker, "-c", "python:stargate.gunicorn",
        "--pythonpath", str(tmp_path),
        "keep_open_app:make_app()",
    ) as server:  # fmt: skip
        with connect(server.ws_url + "/echo") as client:
            for message in ("one", "two"):
                client.send(message)
                assert client.recv(timeout=CLIENT_TIMEOUT) == message
            server.signal(signal.SIGTERM)
            assert_going_away(client)
        assert server.wait(DEADLINE) == 0


@each_green_worker
def test_paste_ini_and_the_access_log(worker):
    """``--paste`` loads the demo's .ini, its logging sections included:
    stargate's access log names each WebSocket session (gunicorn logs none)."""
    ini = str(ROOT / "stargate" / "demo" / "development.ini")
    with gunicorn_server(
        "-k", worker, "-c", "python:stargate.gunicorn", "--paste", ini
    ) as server:
        with connect(server.ws_url + "/echo") as client:
            client.send("pasted")
            assert client.recv(timeout=CLIENT_TIMEOUT) == "pasted"
        logged(server, '"WebSocket /echo" rfc6455 closed 1000')


# -- servers that cannot carry WebSockets ---------------------------------------


@pytest.mark.parametrize(
    "worker, why",
    [
        ("sync", "gunicorn's sync worker cannot carry a WebSocket"),
        ("gthread", "gunicorn's gthread worker cannot carry a WebSocket"),
        # It does not hand the application its socket.
        ("gevent_pywsgi", "gunicorn/"),
    ],
    ids=["sync", "gthread", "gevent_pywsgi"],
)
def test_other_gunicorn_workers_refuse_with_a_reason(worker, why):
    with gunicorn_server("-k", worker, "stargate.demo:make_app()") as server:
        response = refusal(server.ws_url + "/echo")
        assert response.status_code == 501
        reason = response.body.decode()
        assert why in reason and "cannot carry a WebSocket" in reason, reason
        assert "gunicorn -k gevent" in reason
        logged(server, "cannot take a WebSocket over")
        # The worker is free again: a plain request is served at once.
        assert http(server.url + "/jobs/1").status == 200
    assert sum("cannot take a WebSocket over" in line for line in server.lines) == 1
    assert not any("Traceback" in line for line in server.lines), server.output


def test_waitress_refuses_with_a_reason():
    port = free_port()
    command = [
        sys.executable, "-W", "ignore", "-m", "waitress",
        "--listen", f"127.0.0.1:{port}",
        "--call", "stargate.demo:make_app",
    ]  # fmt: skip
    with ServerProcess(command, url_pattern=r"Serving on (http://\S+)") as server:
        server.wait_ready()
        response = refusal(server.ws_url + "/echo")
        assert response.status_code == 501
        reason = response.body.decode()
        assert re.search(r"waitress cannot carry a WebSocket", reason), reason
        assert "egg:stargate#main" in reason
        assert "gunicorn -k gevent" in reason
        logged(server, "cannot take a WebSocket over")
    assert not any("Traceback" in line for line in server.lines), server.output


# -- the how-to ------------------------------------------------------------------


def test_the_howto_shows_the_commands_tested_here():
    """docs/howto/gunicorn.rst gives the commands, the gunicorn.conf.py and
    the refusal these tests run and check (with ``-k gevent``)."""
    howto = ROOT / "docs" / "howto" / "gunicorn.rst"
    text = " ".join(howto.read_text(encoding="utf-8").split())
    shown = [
        'pip install "stargate[gevent]" gunicorn',
        "gunicorn -k gevent -c python:stargate.gunicorn 'stargate.demo:main({})'",
        "gunicorn -k gevent -w 2 -c python:stargate.gunicorn "
        "\"stargate.demo:make_app({'stargate.backend': 'redis://",
        "gunicorn -k gevent -w 2 -c python:stargate.gunicorn 'myapp:main({})'",
        "-c python:stargate.gunicorn --bind 127.0.0.1:6543 --paste production.ini",
        f"{RUNTIME_ENV}=gevent gunicorn -k gevent -w 2 -c python:stargate.gunicorn "
        "--preload",
    ]
    shown += [line for line in CONF_PY.format(worker="gevent").splitlines() if line]
    for piece in shown:
        assert " ".join(piece.split()) in text, f"gunicorn.rst lacks {piece!r}"
    # What the sync worker's request tells: a plain socket, one thread.
    environ = {"gunicorn.socket": object(), "wsgi.multithread": False}
    with pytest.raises(IncorrectlyConfigured) as refused:
        client_socket(environ)
    assert " ".join(str(refused.value).split()) in text
