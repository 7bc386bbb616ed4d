"""stargate under gunicorn: its gevent and eventlet workers carry WebSockets.

gunicorn hands the application the client's socket as
``environ["gunicorn.socket"]``. In the gevent worker (``-k gevent``) that is
a gevent socket, in the eventlet worker (``-k eventlet``, gunicorn 25 and
earlier: 26 removed it) an eventlet green socket; :class:`~stargate.WebSocketView`
takes it over on the runtime of the worker (:mod:`stargate.runtime`). The
other workers cannot carry a WebSocket: sync serves one request at a time,
gthread runs a handler on a thread of a small pool. There an upgrade is
refused with 501 and a sentence naming the worker (:func:`client_socket`).

This module is also a gunicorn configuration: its hooks close a worker's
WebSockets with 1001 (going away) when gunicorn stops it::

    gunicorn -k gevent -w 2 -c python:stargate.gunicorn 'myapp:main({})'

or, in your own ``gunicorn.conf.py``::

    from stargate.gunicorn import post_worker_init, worker_int  # noqa: F401

It imports nothing from gunicorn: the hooks only receive its worker.
"""

from __future__ import annotations

import signal
import socket
from typing import Any

from stargate import runtime
from stargate.environ_keys import WEBSOCKET_OPENED_KEY
from stargate.exceptions import IncorrectlyConfigured
from stargate.factory import close_websockets, websocket_opened

__all__ = [
    "check_runtime",
    "client_socket",
    "end_request",
    "post_worker_init",
    "worker_int",
]

# gunicorn reads every module-level name that is one of its settings from a
# configuration module (``-c python:stargate.gunicorn``): ``worker_class`` is
# one, and the hooks below are others. A ``-k`` on the command line wins.
worker_class = "gevent"

#: Seconds between a stopping worker's sweeps for WebSockets opened after
#: SIGTERM (their upgrade requests were still arriving).
LATE_SWEEP_INTERVAL = 0.2

#: Seconds between looks at whether the worker is stopping by itself
#: (``max_requests``), which gunicorn signals to no hook; gunicorn's own
#: loop looks once a second.
ALIVE_CHECK_INTERVAL = 1.0

#: What the other workers' refusals tell a user to run instead.
USE_INSTEAD = (
    "run gunicorn with its gevent worker (gunicorn -k gevent) or its eventlet "
    "worker (gunicorn -k eventlet, gunicorn 25 or earlier), or stargate's own "
    "server (use = egg:stargate#main, or `stargate demo`)"
)

#: What keeps each worker from carrying a WebSocket.
_WHY_NOT = {
    "sync": "it serves one request at a time, and a WebSocket would hold it",
    "gthread": "each WebSocket would hold one of its few threads",
}


def client_socket(environ: dict[str, Any]) -> socket.socket | None:
    """The client socket gunicorn's gevent or eventlet worker hands over, for
    :class:`~stargate.WebSocketView` to take over; None when gunicorn is not
    the server.

    Raises :class:`~stargate.exceptions.IncorrectlyConfigured`, naming the
    worker and what to run instead, under any other gunicorn worker.
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return None
    worker = _worker_type(environ)
    if worker in runtime.RUNTIMES:
        check_runtime(worker)
        # stargate's server logs each WebSocket session and counts it for
        # stargate.metrics through this key; gunicorn logs none of them.
        environ.setdefault(WEBSOCKET_OPENED_KEY, websocket_opened)
        # The WebSocket takes this socket's descriptor over (one descriptor
        # per WebSocket); end_request() keeps gunicorn from touching it again.
        return sock
    raise IncorrectlyConfigured(
        f"gunicorn's {worker} worker cannot carry a WebSocket "
        f"({_WHY_NOT.get(worker, 'it does not run green threads')}); {USE_INSTEAD}"
    )


def check_runtime(worker_runtime: str) -> None:
    """Raise :class:`~stargate.exceptions.IncorrectlyConfigured` unless
    stargate runs on ``worker_runtime``, the library gunicorn's worker
    patched the process with.

    stargate chooses its runtime on first use. With ``--preload`` the
    application is loaded in gunicorn's master, before the worker patches
    anything; if loading it needed the runtime (the Redis backend does),
    stargate chose eventlet there, which fails in a gevent worker.
    """
    chosen = runtime.current().NAME
    if chosen != worker_runtime:
        raise IncorrectlyConfigured(
            f"gunicorn's {worker_runtime} worker runs an application that "
            f"chose stargate's {chosen} runtime before the worker patched the "
            f"process (loaded in gunicorn's master: --preload); set "
            f"{runtime.RUNTIME_ENV}={worker_runtime} in gunicorn's environment, "
            "or drop --preload"
        )


def end_request(environ: dict[str, Any]) -> None:
    """Called with the response of a request whose connection a WebSocket
    took over and has ended: under gunicorn, raises ``StopIteration``.

    gunicorn's async workers take a ``StopIteration`` from the application
    as "close this connection, write nothing". The gevent worker has no
    other way to be told: given its ``ALREADY_HANDLED`` body it writes
    nothing but reads a next request from the socket, on a descriptor the
    WebSocket has closed (an error and a traceback per WebSocket), and
    handing the WebSocket a duplicate descriptor instead would hold two per
    WebSocket. flask-sock ends its requests the same way. Does nothing when
    gunicorn is not the server.
    """
    if "gunicorn.socket" in environ:
        raise StopIteration


def _worker_type(environ: dict[str, Any]) -> str:
    """gunicorn's worker type, as far as a request tells: ``"eventlet"``,
    ``"gevent"``, ``"gthread"`` or ``"sync"``. gunicorn does not name its
    worker in the environ; its socket and ``wsgi.multithread`` tell them
    apart."""
    module = type(environ.get("gunicorn.socket")).__module__
    if module.startswith("eventlet"):
        return "eventlet"
    if module.startswith("gevent"):
        return "gevent"
    return "gthread" if environ.get("wsgi.multithread") else "sync"


# -- gunicorn server hooks ----------------------------------------------------


def post_worker_init(worker: Any) -> None:
    """gunicorn hook: on SIGTERM (a graceful stop), and when the worker
    stops by itself (``max_requests``), it closes its WebSockets with 1001
    at once, within ``graceful_timeout``.

    gunicorn calls no hook then: it lets requests run until they end or
    ``graceful_timeout`` passes, and a WebSocket would then be cut with no
    close frame. gunicorn's own SIGTERM handler still runs first.
    """
    worker_runtime = _worker_runtime(worker)
    if worker_runtime is None:
        return
    # Refuse to boot (gunicorn stops, saying why) rather than fail every
    # WebSocket.
    check_runtime(worker_runtime)
    green = runtime.current()
    stopping: list[bool] = []

    def stop(why: str) -> None:
        if not stopping:  # once, whichever notices first
            stopping.append(True)
            _stop(worker, why)

    previous = signal.getsignal(signal.SIGTERM)

    def going_away(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        # A signal handler must not block: the closing handshakes run on a
        # green thread of their own.
        green.spawn_n(stop, "SIGTERM")

    def watch() -> None:
        # gunicorn's Worker.alive turns False on SIGTERM and after
        # max_requests; only the first has a signal to catch.
        while worker.alive:
            green.sleep(ALIVE_CHECK_INTERVAL)
        stop("worker stopping")

    green.spawn_n(watch)
    signal.signal(signal.SIGTERM, going_away)
    # gunicorn lets SIGTERM restart interrupted system calls; signal.signal()
    # has just undone that.
    signal.siginterrupt(signal.SIGTERM, False)


def worker_int(worker: Any) -> None:
    """gunicorn hook, run on SIGINT and SIGQUIT (a quick stop) before the
    worker exits: close its WebSockets with 1001, within
    ``graceful_timeout``."""
    if _worker_runtime(worker) is not None:
        _close_all(worker, "SIGINT/SIGQUIT")


def _stop(worker: Any, why: str) -> None:
    """Close every WebSocket now, then, until the worker exits, those whose
    upgrade was under way at the first sweep: gunicorn still completes the
    requests it has begun reading."""
    from stargate.connection import open_websockets

    _close_all(worker, why)
    while True:
        runtime.current().sleep(LATE_SWEEP_INTERVAL)
        if open_websockets():
            _close_all(worker, f"{why}, opened since")


def _close_all(worker: Any, why: str) -> None:
    from stargate.connection import open_websockets

    count = len(open_websockets())
    if count:
        worker.log.info(
            "stargate: worker stopping (%s); closing %d WebSocket(s) with 1001",
            why,
            count,
        )
    close_websockets(worker.cfg.graceful_timeout)


#: gunicorn's modules of the workers that run a green-thread hub, which
#: the closing handshakes need, and the runtime each patches the process with.
_GREEN_WORKER_MODULES = {
    "gunicorn.workers.ggevent": "gevent",
    "gunicorn.workers.geventlet": "eventlet",
}


def _worker_runtime(worker: Any) -> str | None:
    """The runtime of gunicorn's gevent or eventlet ``worker``; None for
    its other workers."""
    for cls in type(worker).__mro__:
        name = _GREEN_WORKER_MODULES.get(cls.__module__)
        if name is not None:
            return name
    return None
