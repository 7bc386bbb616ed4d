"""stargate's server on gevent: ``gevent.pywsgi`` with what stargate's view
and operators rely on, as :mod:`stargate.servers.eventlet` gives eventlet's.

* the view takes the client socket over (``environ[CLIENT_SOCKET_KEY]``),
  reads hixie-76's key bytes from the request's reader
  (``REQUEST_RFILE_KEY``) and gets the bytes read past the request
  (``RELEASE_BUFFERS_KEY``); once it marked the request taken over
  (``TAKEN_OVER_KEY``), the server writes no response and leaves the
  socket to the WebSocket;
* ``SERVER_PROTOCOL`` is the request's own version (gevent's is already);
* the request head must arrive within ``request_timeout`` in total, and
  each later wait for the client (for its body) within ``request_timeout``
  too; the head is bounded as eventlet bounds it: a request line of 8192
  bytes or more gets 414, a header line over 8192 bytes 400 "Header Line
  Too Long", more than 65536 bytes of headers 400 "Headers Too Large",
  more than 100 header lines 431;
* access log lines and WebSocket sessions on ``stargate.access``, in the
  format of eventlet's server; trusted proxies; the generic 500 page.
"""

from __future__ import annotations

import io
import logging
import socket
import sys
import time
from typing import Any

import gevent
import gevent.event
import gevent.pool
import gevent.pywsgi

from stargate.environ_keys import (
    CLIENT_SOCKET_KEY,
    HAND_OFF_KEY,
    RELEASE_BUFFERS_KEY,
    REQUEST_RFILE_KEY,
    TAKEN_OVER_KEY,
    TRUE_PROTOCOL_KEY,
    WEBSOCKET_OPENED_KEY,
)
from stargate.factory import (
    ACCESS_LOG_FORMAT,
    ERROR_PAGE,
    GenericErrorPage,
    access_client,
    access_log,
    believe_proxy,
    close_websockets,
    counted_websocket,
    let_go_of_request,
    log,
    logged_websocket,
    read_ahead,
    stop_event,
    wait_for_stop,
)

__all__ = [
    "Handler",
    "Server",
    "listen",
    "run_worker",
    "after_fork",
    "serve_in_background",
    "serve_connection",
]

#: The longest header line, the most bytes of headers and the most header
#: lines a request may have (eventlet's and Python's ``http.client`` limits).
MAX_HEADER_LINE = 8192
MAX_HEADERS_SIZE = 65536
MAX_HEADER_LINES = 100

_REASONS = {400: "Bad Request", 431: "Request Header Fields Too Large"}


class _Refused(ValueError):
    """A request head over a limit: the status and reason to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def response(self) -> tuple[str, bytes]:
        body = self.reason.encode()
        head = (
            f"HTTP/1.1 {self.status} {_REASONS[self.status]}\r\n"
            "Content-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        return str(self.status), head.encode() + body


def _read_head(rfile: Any) -> bytes:
    """The header lines of a request, up to and including the blank line,
    or :class:`_Refused` when they break a limit."""
    lines = []
    size = 0
    while True:
        line = rfile.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise _Refused(400, "Header Line Too Long")
        size += len(line)
        if size > MAX_HEADERS_SIZE:
            raise _Refused(400, "Headers Too Large")
        lines.append(line)
        if line in (b"\r\n", b"\n", b""):
            return b"".join(lines)
        if len(lines) > MAX_HEADER_LINES:
            raise _Refused(431, "")


class Handler(gevent.pywsgi.WSGIHandler):
    """One client connection of :class:`Server` (see the module docstring)."""

    server: Server
    environ: Any = None
    _refused: _Refused | None = None
    _deadline: gevent.Timeout | None = None
    _handed_over = False

    def handle(self) -> None:
        timeout = self.server.request_timeout
        sock = self.socket
        if timeout and sock is not None:
            # Each wait for the client (its body, a response it does not
            # read) is bounded by request_timeout, as eventlet's socket
            # timeout bounds it; the view lifts it from an upgraded socket.
            sock.settimeout(timeout)
        super().handle()

    def handle_one_request(self) -> Any:
        # One deadline for the request line and headers (gevent has none: a
        # client trickling a byte at a time would hold the connection).
        timeout = self.server.request_timeout
        deadline = self._deadline = gevent.Timeout(timeout) if timeout else None
        self._refused = None
        self.environ = None  # the previous request's, on a kept-alive connection
        if deadline is not None:
            deadline.start()
        try:
            result = super().handle_one_request()
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            return None  # close the connection, say nothing
        finally:
            self._cancel_deadline()
        if self._handed_over and self.environ is not None:
            # The request's view may outlive it (a handler in a greenlet of
            # its own): its environ lets go of this handler.
            let_go_of_request(self.environ, CLIENT_SOCKET_KEY, REQUEST_RFILE_KEY)
        if self._refused is not None and isinstance(result, tuple):
            return self._refused.response()
        return result

    def read_requestline(self) -> str:
        line = super().read_requestline()
        # A blank line where the request line belongs: hang up, as eventlet's
        # server does (gevent would answer 400).
        return line if line.strip() else ""

    def read_request(self, raw_requestline: str) -> Any:
        try:
            return super().read_request(raw_requestline)
        finally:
            self._cancel_deadline()

    def MessageClass(self, fp: Any, *args: Any) -> Any:  # noqa: N802 (gevent's name)
        # gevent parses the headers with http.client, which allows 100 lines
        # of 64 KiB each: read them here first, within eventlet's bounds.
        try:
            head = _read_head(fp)
        except _Refused as exc:
            self._refused = exc
            raise
        return super().MessageClass(io.BytesIO(head), *args)

    def _cancel_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None:
            deadline.cancel()

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        server = self.server
        if server.trusted_proxies:
            believe_proxy(environ, server.trusted_proxies)
        environ[TRUE_PROTOCOL_KEY] = True
        environ[CLIENT_SOCKET_KEY] = self.socket
        environ[REQUEST_RFILE_KEY] = self.rfile
        environ[RELEASE_BUFFERS_KEY] = self._release_buffers
        environ[WEBSOCKET_OPENED_KEY] = (
            logged_websocket if server.log_output else counted_websocket
        )
        environ[HAND_OFF_KEY] = self._hand_off
        self._handed_over = False
        return environ

    def _hand_off(self, function: Any, *args: Any) -> None:
        """``environ[HAND_OFF_KEY]``: the connection goes on in a new
        greenlet, which takes this request's place in the server's pool (for
        ``max_clients``, and ``stop()`` kills it as it kills requests)."""
        thread = gevent.Greenlet(function, *args)
        pool = self.server.pool
        if isinstance(pool, gevent.pool.Pool):
            # Out of the pool, then in: no switch in between, so no other
            # connection takes the slot.
            pool.discard(gevent.getcurrent())
            try:
                pool.start(thread, blocking=False)
                return
            except gevent.pool.PoolFull:
                pass  # this greenlet was not the pool's: run it outside
        thread.start()

    def _release_buffers(self) -> bytes:
        """Hand a connection that became a WebSocket over: return the bytes
        read past the request (a client's first frames) and free the
        request's reader; from now on the socket is the WebSocket's (it
        detaches the descriptor, :func:`stargate.runtime.gevent.adopt`)."""
        data = read_ahead(self.rfile, self.socket)
        self._handed_over = True
        try:
            self.rfile.close()
        except (OSError, ValueError):
            pass
        return data

    def process_result(self) -> None:
        if self.environ.get(TAKEN_OVER_KEY):
            # The view answered on the socket itself: no HTTP response.
            self.close_connection = True
            if self._handed_over:
                self.socket = None  # gevent must not read from or close it
            return
        super().process_result()

    def handle_error(self, t: Any, v: Any, tb: Any) -> None:
        """An error :class:`~stargate.factory.GenericErrorPage` could not
        turn into its page (the response had started, or its body failed):
        logged, and the connection closed; the page if nothing was sent."""
        if not issubclass(t, gevent.GreenletExit):
            log.error("%s %s failed", self.command, self.path, exc_info=(t, v, tb))
        self.close_connection = True
        if getattr(self, "headers_sent", False) or self.socket is None:
            return
        try:
            self.start_response(
                "500 Internal Server Error",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(ERROR_PAGE))),
                ],
            )
            self.write(ERROR_PAGE)
        except OSError:
            pass

    def log_error(self, msg: str, *args: Any) -> None:
        """A client's bad request, on ``stargate.access`` (gevent's own line
        would start with the socket's repr)."""
        access_log.info(msg, *args)

    def log_request(self) -> None:
        if not self.server.log_output:
            return
        # gevent keeps the request's outcome in attributes of the handler:
        # status is b"200 OK" once the application started its response,
        # or "400" (a str) when gevent refused the request itself.
        status = self.status or "000"
        if isinstance(status, bytes):
            status = status.decode("latin-1")
        finish = self.time_finish or time.time()
        environ = self.environ
        client = access_client(environ) if environ else self.client_address[0]
        access_log.info(
            ACCESS_LOG_FORMAT
            % {
                "client_ip": client,
                "request_line": self.requestline or "",
                "status_code": status.split()[0],
                "body_length": self.response_length,
                "wall_seconds": finish - self.time_start,
            }
        )


class Server(gevent.pywsgi.WSGIServer):
    """gevent's WSGI server with :class:`Handler` and stargate's options:
    ``request_timeout`` (seconds for a request head), ``trusted_proxies``,
    ``log_output`` (the access log) and ``max_clients`` (connections served
    at once; the others wait in the listen backlog)."""

    handler_class = Handler

    def __init__(
        self,
        listener: Any,
        application: Any,
        *,
        request_timeout: float | None = None,
        trusted_proxies: frozenset[str] = frozenset(),
        log_output: bool = True,
        max_clients: int | None = None,
    ) -> None:
        spawn: Any = gevent.pool.Pool(max_clients) if max_clients else "default"
        super().__init__(
            listener,
            application,
            spawn=spawn,
            log=None,  # Handler.log_request writes the access log
            error_log=gevent.pywsgi.LoggingLogAdapter(access_log, logging.WARNING),
        )
        self.request_timeout = request_timeout
        self.trusted_proxies = trusted_proxies
        self.log_output = log_output


def listen(host: str, port: int) -> socket.socket:
    """A listening gevent socket on ``(host, port)``."""
    import gevent.socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = gevent.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def after_fork() -> None:
    """In a new worker process: gevent's patched ``os.fork`` re-initialised
    the hub already; flush what the parent had buffered."""
    sys.stdout.flush()


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
    """Serve in this process until SIGTERM or SIGINT; then close every
    WebSocket with 1001 (a second signal exits at once)."""
    server = Server(
        sock,
        GenericErrorPage(app),
        request_timeout=request_timeout,
        trusted_proxies=trusted_proxies,
        log_output=access_log,
        max_clients=max_clients,
    )
    stopping = stop_event()
    server.start()
    wait_for_stop(stopping)
    server.close()  # stop accepting
    close_websockets(shutdown_timeout)
    server.stop(timeout=0)  # what is left: idle keep-alive HTTP connections


# -- in a test's process (stargate.testing) ----------------------------------


class Background:
    """A server running in this process's greenlets, for
    :class:`~stargate.testing.server.LiveServer`: ``close()`` stops it
    accepting, ``join(timeout)`` ends its connections within ``timeout``."""

    def __init__(self, server: Server) -> None:
        self._server = server

    def close(self) -> None:
        self._server.close()

    def join(self, timeout: float) -> None:
        self._server.stop(timeout=timeout)


def serve_in_background(
    sock: Any, app: Any, *, request_timeout: float, log_output: bool = False
) -> Background:
    """Serve ``app`` on the listening ``sock`` in the hub's greenlets, as a
    worker does (the generic 500 page, :class:`Handler`)."""
    server = Server(
        sock,
        GenericErrorPage(app),
        request_timeout=request_timeout,
        log_output=log_output,
    )
    server.start()
    return Background(server)


def serve_connection(app: Any, sock: Any, address: tuple[str, int]) -> None:
    """Serve one connection, already accepted, in a new greenlet (for
    :func:`stargate.testing.client.connect_app`)."""
    server = Server(address, app, log_output=False)
    server.environ.update(SERVER_NAME=address[0], SERVER_PORT=str(address[1]))
    gevent.spawn(Handler(sock, address, server).handle)
