"""stargate's server on eventlet: ``eventlet.wsgi`` with what stargate's
view and operators rely on.

:func:`http_protocol_class` makes eventlet's protocol report the request's
own HTTP version, bound the request head by ``request_timeout`` and hand a
connection that became a WebSocket over with the bytes read past the
request; :func:`run_worker` serves one worker process with the access log,
the generic 500 page and 1001 on SIGTERM. What does not depend on eventlet
lives in :mod:`stargate.factory`.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import eventlet
import eventlet.wsgi
import greenlet
from eventlet import hubs

from stargate.environ_keys import (
    HAND_OFF_KEY,
    PROXIED_KEY,
    RELEASE_BUFFERS_KEY,
    TRUE_PROTOCOL_KEY,
    WEBSOCKET_OPENED_KEY,
)
from stargate.factory import (
    ACCESS_LOG_FORMAT,
    GenericErrorPage,
    believe_proxy,
    close_websockets,
    counted_websocket,
    let_go_of_request,
    logged_websocket,
    read_ahead,
    stop_event,
    wait_for_stop,
)
from stargate.factory import access_log as _log_to_access

__all__ = [
    "http_protocol_class",
    "listen",
    "run_worker",
    "after_fork",
    "serve_in_background",
    "serve_connection",
]


def listen(host: str, port: int) -> socket.socket:
    """A listening green socket on ``(host, port)``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return eventlet.listen((host, port), family=family, backlog=2048)


def run_worker(
    app: Any,
    sock: Any,
    *,
    max_clients: int,
    shutdown_timeout: float,
    access_log: bool,
    request_timeout: float,
    trusted_proxies: frozenset[str] = frozenset(),
) -> None:
    """Serve in this process until told to stop; then close WebSockets (1001)."""
    pool = _ConnectionPool(max_clients)
    HttpProtocol = http_protocol_class(trusted_proxies, pool)
    stopping = stop_event()
    server = eventlet.spawn(
        eventlet.wsgi.server,
        sock,
        GenericErrorPage(app),
        protocol=HttpProtocol,
        log=_AccessLog(),
        log_output=access_log,
        log_format=ACCESS_LOG_FORMAT,
        custom_pool=pool,
        socket_timeout=request_timeout,
        # eventlet's default (debug=True) sends the traceback as the body.
        debug=False,
    )
    server.link(lambda gt: stopping.ready() or stopping.send(None))
    wait_for_stop(stopping)
    server.kill()
    try:
        sock.close()
    except OSError:
        pass
    close_websockets(shutdown_timeout)


def after_fork() -> None:
    """In a new worker process: a fresh hub, since the parent's epoll set
    is not this process's."""
    hubs.use_hub()  # a fresh hub: the parent's epoll set is not ours
    sys.stdout.flush()


def http_protocol_class(
    trusted_proxies: frozenset[str] = frozenset(), pool: Any = None
) -> type:
    """The ``protocol`` class stargate gives :class:`eventlet.wsgi.Server`.

    Public so that servers built elsewhere (an application's own eventlet
    server; :class:`stargate.testing.server.LiveServer` uses
    :func:`serve_in_background`) set the environ keys of
    :mod:`stargate.environ_keys` the view relies on: the request's true
    HTTP version, the hand-over of the connection's buffered bytes, and the
    session log. ``trusted_proxies`` (see
    :func:`stargate.factory.trusted_proxies`) are the
    peers whose ``X-Forwarded-*`` headers are believed. ``pool``, the
    server's :class:`_ConnectionPool` (``custom_pool``), lets a connection
    handed to a new green thread keep its place in the pool.
    """

    class HttpProtocol(eventlet.wsgi.HttpProtocol):
        """eventlet's protocol, but ``SERVER_PROTOCOL`` is the request's own
        HTTP version (eventlet always says HTTP/1.0), so the handshake can
        refuse HTTP/1.0 upgrades as RFC 6455 requires; and the request line
        and headers must arrive within ``request_timeout`` in total.

        eventlet's ``socket_timeout`` bounds each wait for a byte, so a
        client trickling a byte at a time (slowloris) would hold a
        connection forever; here one deadline covers the whole request head.
        eventlet bounds its size: a request line of 8192 bytes or more gets
        414, a header line of 8192 bytes or more 400 "Header Line Too Long",
        more than 65536 bytes of headers 400 "Headers Too Large", and more
        than 100 header lines 431 (Python's ``http.client`` limit).
        """

        def handle_one_request(self):
            timeout = self.server.socket_timeout
            self._head_deadline = None
            if timeout:
                self._head_deadline = eventlet.Timeout(
                    timeout, socket.timeout("request head not received in time")
                )
            try:
                super().handle_one_request()
            finally:
                self._cancel_head_deadline()
            environ = getattr(self, "environ", None)
            if self.connection is _HANDED_OVER and environ is not None:
                # The request's view may outlive it (a handler in a green
                # thread of its own): its environ lets go of this protocol.
                let_go_of_request(environ, "eventlet.set_idle")
                if "eventlet.input" in environ:
                    environ["eventlet.input"] = environ["wsgi.input"]

        def parse_request(self):
            try:
                return super().parse_request()
            finally:
                self._cancel_head_deadline()

        def _cancel_head_deadline(self):
            deadline = getattr(self, "_head_deadline", None)
            if deadline is not None:
                deadline.cancel()
                self._head_deadline = None

        def get_client_address(self):
            """For the access log: the client a trusted proxy named, alone."""
            environ = getattr(self, "environ", None)
            if environ is not None and environ.get(PROXIED_KEY):
                return environ["REMOTE_ADDR"], super().get_client_address()[1]
            return super().get_client_address()

        def get_environ(self, *args, **kwargs):
            environ = super().get_environ(*args, **kwargs)
            if trusted_proxies:
                believe_proxy(environ, trusted_proxies)
            environ["SERVER_PROTOCOL"] = self.request_version
            environ[TRUE_PROTOCOL_KEY] = True
            environ[RELEASE_BUFFERS_KEY] = self._release_buffers
            environ[WEBSOCKET_OPENED_KEY] = (
                logged_websocket if self.server.log_output else counted_websocket
            )
            environ[HAND_OFF_KEY] = _hand_off
            return environ

        def _release_buffers(self):
            """Hand a connection that became a WebSocket over: free its HTTP
            read and write buffers (24 KiB), since it never reads or writes
            HTTP again, and return the bytes the HTTP reader had read past
            the request (a client's first frames, sent with the upgrade).

            The socket then belongs to the WebSocket: when the request ends,
            eventlet neither shuts it down nor closes it (it would otherwise
            do both, resetting a connection still closing gracefully, or one
            kept open after its view returned).

            The parsed request headers (an email message, about 0.7 KiB) go
            too: after the application returns, eventlet only looks up
            ``X-Forwarded-For`` for the access log, which the environ's
            ``headers_raw`` pairs answer.
            """
            read_ahead_bytes = read_ahead(self.rfile, self.connection)
            self.connection = self.conn_state[1] = _HANDED_OVER
            for stream in (self.rfile, self.wfile):
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass
            self.headers = _HeaderPairs(self.environ.get("headers_raw", ()))
            return read_ahead_bytes

    def _hand_off(function, *args):
        """``environ[HAND_OFF_KEY]``: the connection goes on in a new green
        thread, in the pool's count, while this request's ends."""
        if pool is None:
            eventlet.spawn_n(function, *args)
        else:
            pool.hand_off(function, args)

    return HttpProtocol


class _HandedOver:
    """Stands for a socket the server handed to a WebSocket: eventlet's
    clean-up shuts down and closes it when the request ends; this does
    neither."""

    __slots__ = ()

    def shutdown(self, how=None):
        pass

    def close(self):
        pass


_HANDED_OVER = _HandedOver()


class _ConnectionPool(eventlet.GreenPool):
    """eventlet's pool, running each connection in a plain greenlet.

    eventlet's server only links a clean-up to what ``spawn`` returns, before
    the connection runs; a GreenThread, with its Event and its deque of
    links, would cost about 1 KiB more per connection.
    """

    def spawn(self, function, *args, **kwargs):
        links = _Links()
        self.spawn_n(links.run, function, args, kwargs)
        return links

    def hand_off(self, function, args):
        """Run ``function(*args)`` in a new green thread that holds a slot
        of the pool until it returns: a connection whose request's green
        thread ended still counts against ``max_clients``."""
        # GreenPool counts free slots in its semaphore ``sem`` (a public
        # attribute); it has no public way to take one for a green thread it
        # did not spawn without blocking. Below zero, spawn waits.
        self.sem.counter -= 1
        eventlet.spawn_n(self._run_handed_off, function, args)

    def _run_handed_off(self, function, args):
        try:
            function(*args)
        finally:
            self.sem.release()


class _Links(list):
    """The callbacks linked to a connection, called when it ends."""

    __slots__ = ()

    def link(self, callback, *args):
        self.append((callback, args))

    def run(self, function, args, kwargs):
        try:
            function(*args, **kwargs)
        finally:
            for callback, callback_args in self:
                callback(self, *callback_args)


class _HeaderPairs:
    """Request headers as ``(name, value)`` pairs, with the lookup eventlet
    makes: ``get`` returns the first value of a case-insensitive name."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs):
        self._pairs = pairs

    def get(self, name, default=None):
        name = name.lower()
        for key, value in self._pairs:
            if key.lower() == name:
                return value
        return default


class _AccessLog:
    """The log eventlet's server writes to: its request lines and errors go
    to ``stargate.access``; its own start and exit lines do not (they said
    ``wsgi exited, is_accepting=True`` at every shutdown)."""

    def info(self, msg, *args, **kwargs):
        if msg.startswith("(") and (") wsgi " in msg) or msg == "wsgi exiting":
            return
        _log_to_access.info(msg, *args, **kwargs)

    def error(self, msg, *args, **kwargs):
        _log_to_access.error(msg, *args, **kwargs)

    def debug(self, msg, *args, **kwargs):
        _log_to_access.debug(msg, *args, **kwargs)

    def write(self, msg, *args):
        _log_to_access.info(msg.rstrip("\n"), *args)


# -- in a test's process (stargate.testing) ----------------------------------


class Background:
    """A server running in this process's green threads, for
    :class:`~stargate.testing.server.LiveServer`: ``close()`` stops it
    accepting, ``join(timeout)`` waits for it to end."""

    def __init__(self, thread: Any) -> None:
        self._thread = thread

    def close(self) -> None:
        self._thread.kill()

    def join(self, timeout: float) -> None:
        with eventlet.Timeout(timeout, False):
            try:
                self._thread.wait()
            except greenlet.GreenletExit:
                pass


def serve_in_background(
    sock: Any, app: Any, *, request_timeout: float, log_output: bool = False
) -> Background:
    """Serve ``app`` on the listening ``sock`` in a green thread, as a
    worker does (the generic 500 page, stargate's protocol class)."""
    pool = _ConnectionPool(100_000)
    thread = eventlet.spawn(
        eventlet.wsgi.server,
        sock,
        GenericErrorPage(app),
        protocol=http_protocol_class(pool=pool),
        log=_AccessLog(),
        log_output=log_output,
        log_format=ACCESS_LOG_FORMAT,
        custom_pool=pool,
        socket_timeout=request_timeout,
        debug=False,
    )
    return Background(thread)


def serve_connection(app: Any, sock: Any, address: tuple[str, int]) -> None:
    """Serve one connection, already accepted, in a new green thread (for
    :func:`stargate.testing.client.connect_app`)."""
    server = eventlet.wsgi.Server(
        sock,
        address,
        app,
        protocol=http_protocol_class(),
        log_output=False,
        keepalive=False,
    )
    eventlet.spawn_n(server.process_request, [address, sock, eventlet.wsgi.STATE_IDLE])
