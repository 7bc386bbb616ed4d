"""pytest fixtures for applications built on stargate.

Installing stargate registers this plugin (the ``pytest11`` entry point
``stargate``). Its fixtures need the test process monkey-patched for the
runtime your application runs on, before anything imports ``socket``: put
these two lines at the very top of your ``conftest.py``::

    import eventlet
    eventlet.monkey_patch()

or, on gevent::

    from gevent import monkey
    monkey.patch_all()

stargate finds the runtime from the patching (or from ``STARGATE_RUNTIME``);
a process runs one of them, since both patch the standard library.

Fixtures:

``stargate_server``
    Call it with a WSGI app to serve it on a free loopback port; returns a
    :class:`~stargate.testing.server.LiveServer`. Every server is stopped,
    and its port checked closed, when the test ends. A handler that raised
    during the test fails it with the handler's traceback, unless the test
    called it with ``handler_errors="ignore"``.
``stargate_connect``
    :func:`~stargate.testing.client.connect`, closing every client it opened
    when the test ends.
``stargate_redis``
    A private ``redis-server`` for the test session on a free loopback port
    (never the one on 6379), or a skip saying the binary is missing.
"""

import logging
import socket
import traceback

import pytest

__all__ = ["stargate_server", "stargate_connect", "stargate_redis"]


def _port_is_closed(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return False
    except OSError:
        return True


class _HandlerErrors(logging.Handler):
    """Collects the tracebacks of WebSocket handlers that raised."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.tracebacks = []

    def emit(self, record):
        if record.exc_info:
            text = "".join(traceback.format_exception(*record.exc_info))
            self.tracebacks.append(f"{record.getMessage()}\n{text}")


@pytest.fixture
def stargate_server():
    """Factory: ``stargate_server(app, **options)`` -> a started LiveServer."""
    from stargate.testing.server import LiveServer

    servers = []
    errors = _HandlerErrors()
    view_log = logging.getLogger("stargate.view")
    view_log.addHandler(errors)
    check_errors = True

    def start(app, handler_errors="fail", **options):
        nonlocal check_errors
        if handler_errors not in ("fail", "ignore"):
            raise ValueError("handler_errors is 'fail' or 'ignore'")
        check_errors = check_errors and handler_errors == "fail"
        server = LiveServer(app, **options).start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        view_log.removeHandler(errors)
        for server in servers:
            server.stop()
    left_open = [s.port for s in servers if not _port_is_closed(s.port, s.host)]
    assert not left_open, f"live server port(s) still accepting: {left_open}"
    if check_errors and errors.tracebacks:
        pytest.fail(
            "a WebSocket handler raised during the test:\n\n"
            + "\n".join(errors.tracebacks),
            pytrace=False,
        )


@pytest.fixture
def stargate_connect():
    """:func:`stargate.testing.client.connect`, closed at the end of the test."""
    from stargate.testing.client import connect

    clients = []

    def open_client(url, **options):
        client = connect(url, **options)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        try:
            client.close()
        except Exception:  # the test may have broken it on purpose
            pass


@pytest.fixture(scope="session")
def stargate_redis():
    """A private redis-server for the session; ``.url`` is its address."""
    from stargate.testing.redis_server import (
        RedisServer,
        RedisServerNotFound,
        find_redis_server,
    )

    try:
        find_redis_server()
    except RedisServerNotFound as exc:
        pytest.skip(f"stargate_redis needs redis-server: {exc}")
    with RedisServer() as server:
        yield server
