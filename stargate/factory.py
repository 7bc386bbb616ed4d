"""A Paste Deploy server factory that runs Pyramid in stargate's server, on
eventlet's WSGI server (the default) or on gevent's.

In the application's ``.ini``::

    [server:main]
    use = egg:stargate#main
    host = 127.0.0.1
    port = 6543
    workers = 4

``runtime = gevent``, or ``use = egg:stargate#gevent``, serves on gevent.
This module holds what both runtimes share (options, worker supervision,
trusted proxies, the access log's WebSocket lines, the error page, closing
WebSockets at shutdown); each runtime's server is a module of
:mod:`stargate.servers`.

``workers`` greater than 1 forks that many worker processes that share one
listening socket; a supervising parent replaces any worker that dies. With
several workers, broadcasts reach every worker's listeners only through a
shared backend (``stargate.backend = redis://...``).

On start it says, in one line, where and how it serves::

    Serving on http://127.0.0.1:6543 (stargate 2.0.0: 4 workers, eventlet
    0.40.3 on Python 3.12.3, backend redis://:***@10.0.0.5:6379/0)

(one line in the log)
on the ``stargate.server`` logger, or on stderr when logging would not show
it. Several workers on the in-memory backend are warned about.

SIGTERM or SIGINT stops accepting connections, closes every open WebSocket
with 1001 (going away) and exits once they are closed or ``shutdown_timeout``
seconds have passed.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import platform
import signal
import socket
import sys
import time
import types
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from stargate import runtime as _runtime
from stargate.environ_keys import HAND_OFF_KEY, PROXIED_KEY, RELEASE_BUFFERS_KEY

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

    from stargate.config import Settings

T = TypeVar("T")

__all__ = [
    "server_factory",
    "serve",
    "GenericErrorPage",
    "ERROR_PAGE",
    "gevent_server_factory",
]

log = logging.getLogger("stargate.server")

#: Concurrent connections one worker serves (eventlet's default is 1024).
DEFAULT_MAX_CLIENTS = 100_000

#: Seconds between checks for SIGTERM/SIGINT in a worker.
SIGNAL_POLL_INTERVAL = 0.2

#: Seconds a client has to send its request (headers and body).
DEFAULT_REQUEST_TIMEOUT = 10.0

#: The body of the server's own 500 page: the status and one sentence.
#: Nothing about the failure reaches the client; the traceback is logged.
ERROR_PAGE = (
    b"500 Internal Server Error\n\n"
    b"The server could not complete this request; the error has been logged.\n"
)

#: An HTTP request's access log line. No date: the logging formatter stamps
#: each line once (eventlet's default format would add a second stamp).
ACCESS_LOG_FORMAT = (
    '%(client_ip)s "%(request_line)s" %(status_code)s %(body_length)s '
    "%(wall_seconds).3fs"
)

#: The ``stargate.access`` logger: requests and WebSocket sessions.
access_log = logging.getLogger("stargate.access")

#: WebSockets opened in this process, by draft; and closed, by draft and
#: close code. Plain counters, read by :mod:`stargate.metrics`.
opened_websockets: collections.Counter[str] = collections.Counter()
closed_websockets: collections.Counter[tuple[str, int]] = collections.Counter()

#: A worker that dies sooner than this after starting counts as crashing,
#: and the supervisor waits before starting another.
CRASH_WINDOW = 5.0


def server_factory(
    global_conf: dict[str, Any],
    host: str = "127.0.0.1",
    port: int | str = 6543,
    **options: Any,
) -> Callable[[WSGIApplication], None]:
    """Implements the Paste Deploy ``server_factory`` API: returns a callable
    that serves a WSGI application with stargate's server.

    Options (all optional): ``runtime`` (``eventlet``, the default, or
    ``gevent``: whose WSGI server and green threads serve), ``workers`` (1),
    ``max_clients`` (100000 connections per worker), ``shutdown_timeout``
    (10 seconds), ``access_log`` (true), ``request_timeout`` (10 seconds
    for a client to send a request, and the most an idle keep-alive HTTP
    connection is kept; a WebSocket, once upgraded, is governed by the ping
    settings instead), ``trusted_proxies`` (none; see :func:`trusted_proxies`).

    Monkey-patching (by the chosen runtime) happens here, before Paste
    Deploy loads the application, so everything the application imports is
    green.

    A bad option, a bad ``stargate.*`` setting of the application or a port
    that cannot be bound ends ``pserve`` with one line on stderr naming it
    (see :func:`one_line_errors`), not a traceback.
    """
    from stargate.config import as_bool, as_seconds

    one_line_errors()
    name = _option("runtime", options.pop("runtime", "eventlet"), _runtime_name)
    _start_runtime(name)
    settings: dict[str, Any] = {
        "runtime": name,
        "workers": _positive_int("workers", options.pop("workers", 1)),
        "max_clients": _positive_int(
            "max_clients", options.pop("max_clients", DEFAULT_MAX_CLIENTS)
        ),
        "shutdown_timeout": _option(
            "shutdown_timeout", options.pop("shutdown_timeout", 10.0), as_seconds
        ),
        "access_log": _option("access_log", options.pop("access_log", True), as_bool),
        "request_timeout": _option(
            "request_timeout",
            options.pop("request_timeout", DEFAULT_REQUEST_TIMEOUT),
            as_seconds,
        ),
        "trusted_proxies": _option(
            "trusted_proxies", options.pop("trusted_proxies", ""), trusted_proxies
        ),
    }
    if options:
        names = ", ".join(sorted(options))
        log.warning("stargate server: ignoring unknown option(s) %s", names)
    number = _port(port)

    def run(app: WSGIApplication) -> None:
        serve(app, host, number, **settings)
        if _under_reloader():
            _exit_reloaded_worker()

    return run


def _runtime_name(value: object) -> str:
    """The ``runtime`` server option: ``eventlet`` or ``gevent``."""
    name = str(value).strip().lower()
    if name not in _runtime.RUNTIMES:
        raise ValueError("stargate's server runs on " + " or ".join(_runtime.RUNTIMES))
    return name


def _start_runtime(name: str) -> ModuleType:
    """Make ``name`` this process's runtime, monkey-patch the standard
    library for it, and return its server module (:mod:`stargate.servers`)."""
    import importlib

    _runtime.use(name).monkey_patch()
    return importlib.import_module(f"stargate.servers.{name}")


def gevent_server_factory(
    global_conf: dict[str, Any],
    host: str = "127.0.0.1",
    port: int | str = 6543,
    **options: Any,
) -> Callable[[WSGIApplication], None]:
    """``use = egg:stargate#gevent``: :func:`server_factory` with
    ``runtime = gevent``."""
    one_line_errors()
    runtime = str(options.pop("runtime", "gevent")).strip().lower()
    if runtime != "gevent":
        from stargate.exceptions import IncorrectlyConfigured

        raise IncorrectlyConfigured(
            f"server option runtime = {runtime!r}: egg:stargate#gevent runs on "
            "gevent; use egg:stargate#main for eventlet"
        )
    return server_factory(global_conf, host, port, runtime="gevent", **options)


def __getattr__(name: str) -> Any:
    # http_protocol_class was documented here before eventlet's server had
    # its own module; importing it from here keeps working.
    if name == "http_protocol_class":
        from stargate.servers.eventlet import http_protocol_class

        return http_protocol_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _under_reloader() -> bool:
    """Whether this is a worker of ``pserve --reload`` (hupper)."""
    hupper = sys.modules.get("hupper")
    return hupper is not None and hupper.is_active()


def _exit_reloaded_worker() -> None:
    """End a ``pserve --reload`` worker as soon as it has stopped serving.

    hupper started its file-watching thread before this process was
    monkey-patched; at interpreter exit eventlet's threading no longer knows
    it ("Exception ignored in thread started by ... KeyError"), and the exit
    outlasts the second hupper allows ("Server did not exit, forcefully
    killing"). Everything is closed by now: flush and leave at once.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def serve(
    app: WSGIApplication,
    host: str = "127.0.0.1",
    port: int = 6543,
    *,
    workers: int = 1,
    max_clients: int = DEFAULT_MAX_CLIENTS,
    shutdown_timeout: float = 10.0,
    access_log: bool = True,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    trusted_proxies: frozenset[str] = frozenset(),
    listen_socket: socket.socket | None = None,
    ready: Callable[[tuple[str, int]], object] | None = None,
    runtime: str | None = None,
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT.

    ``runtime`` (``"eventlet"`` or ``"gevent"``) picks the server; by
    default the process's runtime (:func:`stargate.runtime.current`), which
    must not be another one already. ``trusted_proxies`` are the addresses
    of proxies whose
    ``X-Forwarded-For``, ``-Proto`` and ``-Host`` headers are believed (see
    :func:`trusted_proxies`). ``listen_socket`` serves on a socket bound
    elsewhere; ``ready``, if
    given, is called with the bound ``(host, port)`` once connections are
    accepted.

    Says once where and how it serves (:func:`startup_line`), and warns when
    several workers share the in-memory backend, where a broadcast reaches
    only the listeners of the worker that sent it.
    """
    server = _start_runtime(runtime or _runtime.current().NAME)
    sock = listen_socket or _listen(server, host, port)
    address = sock.getsockname()[:2]
    settings = _stargate_settings(app)
    # a caller that passes ready (stargate demo) prints its own line
    _announce(
        startup_line(address, workers, settings, runtime=_runtime.current().NAME),
        fallback=ready is None,
    )
    if workers > 1 and settings is not None and _is_memory(settings.backend):
        log.warning(
            "%d workers on the memory backend: a broadcast reaches only the "
            "listeners of the worker that sent it; set stargate.backend = "
            "redis://host:port/db",
            workers,
        )
    if ready is not None:
        ready(address)
    worker_options = {
        "max_clients": max_clients,
        "shutdown_timeout": shutdown_timeout,
        "access_log": access_log,
        "request_timeout": request_timeout,
        "trusted_proxies": trusted_proxies,
    }
    if workers == 1:
        server.run_worker(app, sock, **worker_options)
    else:
        _supervise(server, app, sock, workers, worker_options)


def startup_line(
    address: tuple[str, int],
    workers: int,
    settings: Settings | None = None,
    *,
    runtime: str = "eventlet",
) -> str:
    """The line a server says when it starts: address, workers, runtime and
    backend (a password in its URL replaced by ``***``)."""
    from importlib.metadata import version

    from stargate import __version__
    from stargate.config import redacted_backend

    host, port = _display(address)
    backend = "unknown" if settings is None else redacted_backend(settings.backend)
    return (
        f"Serving on http://{host}:{port} (stargate {__version__}: "
        f"{workers} worker{'s' if workers != 1 else ''}, "
        f"{runtime} {version(runtime)} on Python {platform.python_version()}, "
        f"backend {backend})"
    )


def _announce(line: str, fallback: bool = True) -> None:
    """Log ``line`` on ``stargate.server``; print it on stderr when logging
    would not show it (``pserve`` with an ``.ini`` without logging sections
    sets the root logger to WARNING), as other ``pserve`` servers do."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(line)
    elif fallback:
        print(line, file=sys.stderr, flush=True)


def _stargate_settings(app: object) -> Settings | None:
    """The :class:`~stargate.config.Settings` of the application, or ``None``."""
    return getattr(registry_of(app), "stargate_settings", None)


def registry_of(app: object) -> Any:
    """The Pyramid registry of the application ``app`` is or wraps (through
    ``.app`` or ``.application`` of WSGI middleware), or ``None``."""
    for _ in range(10):
        registry = getattr(app, "registry", None)
        if registry is not None:
            return registry
        app = getattr(app, "app", None) or getattr(app, "application", None)
        if app is None:
            break
    return None


def _is_memory(backend: object) -> bool:
    return isinstance(backend, str) and backend.strip().lower() in ("", "memory")


#: Why a listening socket could not be had, by errno, and what to do.
_LISTEN_ERRORS: dict[int | None, str] = {
    errno.EADDRINUSE: "is in use by another process; stop it or choose another port",
    errno.EACCES: "needs privileges (ports below 1024 do); choose a port from "
    "1024, or let a proxy listen there",
    errno.EADDRNOTAVAIL: "is not an address of this machine; use 127.0.0.1, "
    "0.0.0.0 or one of its own addresses",
}


def _listen(server: ModuleType, host: str, port: int) -> socket.socket:
    """A listening socket of ``server`` (a module of :mod:`stargate.servers`),
    or :class:`IncorrectlyConfigured` naming the address and what to do when
    the kernel refuses it."""
    try:
        return server.listen(host, port)
    except OSError as exc:
        advice = _LISTEN_ERRORS.get(exc.errno)
        if advice is None and isinstance(exc, socket.gaierror):
            advice = "names no address this machine can resolve"
        if advice is None:
            raise
        from stargate.exceptions import IncorrectlyConfigured

        shown_host, shown_port = _display((host, port))
        raise IncorrectlyConfigured(
            f"cannot listen on {shown_host}:{shown_port}: the address {advice}"
            f" ({exc.strerror or exc})"
        ) from None


def _display(address: tuple[str, int]) -> tuple[str, int]:
    host, port = address
    return (f"[{host}]" if ":" in host else host), port


#: Closing handshakes a stopping worker runs at once.
CLOSERS = 1000


def close_websockets(timeout: float) -> None:
    """Close every WebSocket of this process with 1001 (going away), in
    parallel; drop those still open ``timeout`` seconds later. Used when a
    worker stops (here, and by :mod:`stargate.gunicorn`'s hooks). A
    WebSocket opened after this started is closed with 1001 at once by the
    view (:func:`stargate.connection.begin_shutdown`). Within the same
    ``timeout``, waits for the handlers the view runs in green threads of
    their own to return (:func:`stargate.view.wait_for_handlers`)."""
    from stargate.connection import begin_shutdown, open_websockets
    from stargate.view import wait_for_handlers

    begin_shutdown()
    green = _runtime.current()
    deadline = time.monotonic() + timeout
    closing = open_websockets()
    if closing:
        # At most CLOSERS handshakes at a time, each closer taking the next.
        closers = [min(CLOSERS, len(closing))]
        done = green.Event()

        def closer() -> None:
            try:
                while closing:
                    _close_going_away(closing.pop())
            finally:
                closers[0] -= 1
                if not closers[0]:
                    done.send(True)

        for _ in range(closers[0]):
            green.spawn_n(closer)
        done.wait(timeout)
    for websocket in open_websockets():
        websocket.abort()
    # Handlers in green threads of their own (WebSocketView on this server)
    # get what is left of the timeout to run their finally blocks.
    wait_for_handlers(max(0.0, deadline - time.monotonic()))


def trusted_proxies(value: object) -> frozenset[str]:
    """The ``trusted_proxies`` server option: addresses (``127.0.0.1 ::1``,
    space- or comma-separated) of the proxies in front of the server, or
    ``*`` for any peer (only when nothing else can reach the port).

    A request from one of them is taken as the proxy says: its scheme from
    ``X-Forwarded-Proto`` (so URLs the application generates, and a
    hixie-75 handshake's location, say ``https``/``wss`` behind TLS), its
    client from ``X-Forwarded-For`` (the address nearest the proxy that is
    not itself a trusted proxy) and its host from ``X-Forwarded-Host``.
    From any other peer the headers are left alone (a client can send them
    too). Empty by default: nothing is believed.
    """
    import ipaddress

    if isinstance(value, (set, frozenset, list, tuple)):
        items = [str(item) for item in value]
    else:
        items = str(value or "").replace(",", " ").split()
    for item in items:
        if item != "*":
            try:
                ipaddress.ip_address(item)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP address; list the proxies' "
                    "addresses (127.0.0.1 ::1), or * for any peer"
                ) from None
    return frozenset(items)


def believe_proxy(environ: dict[str, Any], trusted: frozenset[str]) -> None:
    """Apply ``X-Forwarded-*`` to ``environ`` if the peer is ``trusted``."""
    peer = environ.get("REMOTE_ADDR", "")
    if "*" not in trusted and peer not in trusted:
        return
    proto = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")[0].strip().lower()
    if proto in ("http", "https"):
        environ["wsgi.url_scheme"] = proto
        if proto == "https":
            environ["HTTPS"] = "on"
        else:
            environ.pop("HTTPS", None)
    host = environ.get("HTTP_X_FORWARDED_HOST", "").split(",")[0].strip()
    if host:
        environ["HTTP_HOST"] = host
    hops = [
        hop.strip()
        for hop in environ.get("HTTP_X_FORWARDED_FOR", "").split(",")
        if hop.strip()
    ]
    while hops:
        client = hops.pop()
        if client not in trusted or not hops:
            environ["REMOTE_ADDR"] = client
            environ[PROXIED_KEY] = True
            break


def websocket_opened(websocket: Any, *, log: bool = True) -> None:
    """Count a WebSocket the view opened and, if ``log``, log one line on
    ``stargate.access`` now and one when it closes, with its close code and
    how long it lasted and how many messages it received and sent::

        203.0.113.7 "WebSocket /rooms/lobby" rfc6455 open
        203.0.113.7 "WebSocket /rooms/lobby" rfc6455 closed 1001 after 312.4s,
        3 received, 120 sent

    (the close line is one line in the log).
    """
    draft = websocket.draft
    opened_websockets[draft] += 1
    if log:
        access_log.info(
            '%s "WebSocket %s" %s open', _client(websocket), websocket.path, draft
        )
    websocket.add_close_callback(
        functools.partial(_websocket_closed, time.monotonic(), log)
    )


#: What a server puts in ``environ[WEBSOCKET_OPENED_KEY]``: with and
#: without the access log.
logged_websocket = functools.partial(websocket_opened, log=True)
counted_websocket = functools.partial(websocket_opened, log=False)


def _websocket_closed(started, log, websocket):
    code = websocket.close_code or 1006
    closed_websockets[websocket.draft, code] += 1
    if log:
        access_log.info(
            '%s "WebSocket %s" %s closed %d after %.1fs, %d received, %d sent',
            _client(websocket),
            websocket.path,
            websocket.draft,
            code,
            time.monotonic() - started,
            websocket.messages_received,
            websocket.messages_sent - websocket.dropped,
        )


def _client(websocket):
    return access_client(websocket.environ)


def access_client(environ: dict[str, Any]) -> str:
    """The client as the access log names it: ``X-Forwarded-For``, then the
    peer address (as eventlet's log does), or the client a trusted proxy
    named, alone."""
    peer = environ.get("REMOTE_ADDR", "-")
    forwarded = environ.get("HTTP_X_FORWARDED_FOR")
    if environ.get(PROXIED_KEY):
        return peer  # the client the trusted proxy named
    return f"{forwarded},{peer}" if forwarded else peer


class GenericErrorPage:
    """WSGI middleware: an exception the application lets escape becomes a
    500 whose body is :data:`ERROR_PAGE`, and its traceback is logged once,
    at ERROR on ``stargate.server``. A client never sees internals (file
    names, SQL, Redis addresses) that a traceback would give away.
    """

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        try:
            return self.app(environ, start_response)
        except Exception:
            exc_info = sys.exc_info()
            log.error(
                "%s %s failed",
                environ.get("REQUEST_METHOD", "?"),
                environ.get("PATH_INFO", ""),
                exc_info=exc_info,
            )
            if _runtime.current().taken_over(environ):
                return []  # the socket was taken over: no HTTP left to send
            # Raises again if the response had already started; eventlet
            # then closes the connection without a body (debug=False).
            start_response(
                "500 Internal Server Error",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(ERROR_PAGE))),
                ],
                exc_info,
            )
            return [ERROR_PAGE]


def read_ahead(rfile: Any, sock: Any) -> bytes:
    """The bytes ``rfile`` holds beyond what was read of it, without
    waiting for more: the socket is made non-blocking for the one read."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        data = rfile.read1(65536)
    except (OSError, ValueError):
        data = b""
    finally:
        sock.settimeout(timeout)
    return data or b""


class _NoBody:
    """The body stream of a request whose connection became a WebSocket:
    empty (the socket and the server's reader are the WebSocket's now)."""

    __slots__ = ()

    def read(self, size: int = -1) -> bytes:
        return b""

    def readline(self, size: int = -1) -> bytes:
        return b""

    def readlines(self, hint: int = -1) -> list[bytes]:
        return []

    def __iter__(self) -> Any:
        return iter(())


_NO_BODY = _NoBody()


def let_go_of_request(environ: dict[str, Any], *server_keys: str) -> None:
    """A request whose connection the view took over has ended: its
    environ, which the view's request keeps while a handler runs, drops
    what ties it to the server's request objects (their protocol or
    handler, reader and socket: about 3 KiB a connection), ``server_keys``
    too, and its ``wsgi.input`` becomes an empty stream."""
    for key in (RELEASE_BUFFERS_KEY, HAND_OFF_KEY, *server_keys):
        environ.pop(key, None)
    if "wsgi.input" in environ:
        environ["wsgi.input"] = _NO_BODY


def _close_going_away(websocket):
    try:
        websocket.close(1001, "server shutting down")
    except Exception:  # a peer gone at shutdown is not worth a traceback
        websocket.abort()


#: The signals that stop a server.
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _supervise(server, app, sock, workers, worker_options):
    """Fork ``workers`` workers on one socket and keep that many alive;
    ``server`` is the module of :mod:`stargate.servers` each one runs."""
    children = {}
    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        if stopping:
            for pid in children:
                _signal(pid, signal.SIGKILL)
            exit_now(signum)
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    def start_worker():
        # SIGTERM/SIGINT stay blocked from before the fork until the parent
        # recorded the child and the child reset its handlers: a signal in
        # between would run request_stop in the parent while it does not
        # know the child yet (its second signal kills only the children it
        # knows, and exits: the new worker was left serving, an orphan), or
        # run the parent's handler in the child.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                server.after_fork()
                server.run_worker(app, sock, **worker_options)
            except BaseException:
                log.exception("worker %d failed", os.getpid())
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        log.info("started worker %d", pid)

    for _ in range(workers):
        if stopping:
            break
        start_worker()
    while not stopping:
        try:
            pid, status = _wait_child()
        except ChildProcessError:
            break
        if pid == 0:
            continue
        started = children.pop(pid, None)
        if started is None or stopping:
            continue
        log.warning(
            "worker %d exited (%s); starting another", pid, _describe_status(status)
        )
        if time.monotonic() - started < CRASH_WINDOW:
            time.sleep(1.0)
        if not stopping:
            start_worker()
    log.info("stopping %d worker(s)", len(children))
    for pid in children:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + worker_options["shutdown_timeout"] + 5
    while children and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            children.pop(pid, None)
        else:
            time.sleep(0.05)
    for pid in children:
        log.warning("worker %d did not stop in time; killing it", pid)
        _signal(pid, signal.SIGKILL)
    sock.close()


def stop_event() -> Any:
    """An event that SIGTERM and SIGINT send their number to, from now on
    in this process; a second one while stopping exits at once
    (:func:`exit_now`). A worker waits on it with :func:`wait_for_stop`."""
    stopping = _runtime.current().Event()

    def request_stop(signum: int, frame: Any) -> None:
        if stopping.ready():
            exit_now(signum)
        stopping.send(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stopping


def wait_for_stop(stopping: Any) -> int | None:
    """Wait until :func:`stop_event`'s event is sent and return the signal
    number (None: the server ended by itself).

    A signal handler runs while the hub waits, but the hub only notices
    what the handler did when it next wakes: poll, so a SIGTERM is acted on
    within a fraction of a second.
    """
    from stargate.connection import open_websockets

    green = _runtime.current()
    while not stopping.ready():
        green.sleep(SIGNAL_POLL_INTERVAL)
    signum = stopping.wait()
    log.info(
        "worker %d stopping (%s); closing %d WebSocket(s)",
        os.getpid(),
        signal.Signals(signum).name if signum else "server ended",
        len(open_websockets()),
    )
    return signum


def exit_now(signum: int) -> None:
    """A second SIGINT or SIGTERM while stopping: the operator will not wait
    for WebSockets to close, so exit at once (128 + the signal number, as a
    shell reports a process killed by it). Called in a signal handler: a
    plain write, no logging (its locks may be held)."""
    import posix  # the plain write: eventlet's os.write would wait on its hub

    name = signal.Signals(signum).name
    posix.write(2, f"stargate: second {name}, exiting now\n".encode())
    os._exit(128 + signum)


def _wait_child():
    """Wait up to half a second for a child to exit; ``(0, 0)`` if none did."""
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            return pid, status
        time.sleep(0.05)
    return 0, 0


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def _describe_status(status):
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0:
        from stargate.exceptions import IncorrectlyConfigured

        raise IncorrectlyConfigured(
            f"server option {name} must be a positive integer, not {value!r}"
        )
    return number


def _port(value: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if not 0 <= port <= 65535:
        from stargate.exceptions import IncorrectlyConfigured

        raise IncorrectlyConfigured(
            f"server option port must be 0-65535, not {value!r}"
        )
    return port


def _option(name: str, value: object, parse: Callable[[object], T]) -> T:
    try:
        return parse(value)
    except ValueError as exc:
        from stargate.exceptions import IncorrectlyConfigured

        raise IncorrectlyConfigured(
            f"server option {name} = {value!r}: {exc}"
        ) from None


def one_line_errors() -> None:
    """Make an uncaught :class:`~stargate.exceptions.IncorrectlyConfigured`
    end the process with one line on stderr, ``stargate: <message>``, and
    exit status 1, instead of a traceback: the message names the setting,
    its value and what is allowed, which is all an operator needs.
    ``pserve`` lets such errors propagate; other exceptions keep their
    traceback. Installed once per process by :func:`server_factory`."""
    previous = sys.excepthook
    if getattr(previous, "stargate_one_line", False):
        return

    def excepthook(
        exc_type: type[BaseException],
        exc: BaseException,
        tb: types.TracebackType | None,
    ) -> None:
        from stargate.exceptions import IncorrectlyConfigured

        if issubclass(exc_type, IncorrectlyConfigured):
            print(f"stargate: {exc}", file=sys.stderr, flush=True)
        else:
            previous(exc_type, exc, tb)

    excepthook.stargate_one_line = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
