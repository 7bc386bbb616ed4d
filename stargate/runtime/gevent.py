"""stargate's runtime on gevent (its servers and ``gunicorn -k gevent``).

The names here are the seam every runtime module provides; see
:mod:`stargate.runtime`. Callbacks of watchers and timers run in gevent's
hub greenlet, as eventlet's do in its hub.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import gevent
import gevent.event
import gevent.lock
import gevent.monkey
import gevent.socket
import greenlet

from stargate.environ_keys import CLIENT_SOCKET_KEY, REQUEST_RFILE_KEY, TAKEN_OVER_KEY

NAME = "gevent"

#: What a process must run first, named in errors that find it missing.
PATCH_CALL = "gevent.monkey.patch_all()"

#: ``with Timeout(seconds, False):`` leaves the block silently after
#: ``seconds``; ``Timeout(seconds)`` raises itself there.
Timeout = gevent.Timeout

#: A green lock (``with Semaphore():``).
Semaphore = gevent.lock.Semaphore


class Event:
    """eventlet's event interface on gevent's ``AsyncResult``: ``send``,
    ``send_exception``, ``wait(timeout=None)`` (the value, or None on
    timeout) and ``ready()``."""

    __slots__ = ("_result",)

    def __init__(self) -> None:
        self._result = gevent.event.AsyncResult()

    def send(self, value: Any = None) -> None:
        self._result.set(value)

    def send_exception(self, exc: BaseException) -> None:
        self._result.set_exception(exc)

    def ready(self) -> bool:
        return bool(self._result.ready())

    def wait(self, timeout: float | None = None) -> Any:
        try:
            return self._result.get(timeout=timeout)
        except gevent.Timeout:
            return None


def monkey_patch() -> None:
    """Patch the standard library for gevent (idempotent)."""
    if not gevent.monkey.is_module_patched("socket"):
        gevent.monkey.patch_all()


def is_monkey_patched() -> bool:
    """Whether ``socket`` is gevent's (the backends need it)."""
    return bool(gevent.monkey.is_module_patched("socket"))


def spawn(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function(*args)`` in a new greenlet; the handle goes to
    :func:`kill`."""
    return gevent.spawn(function, *args)


def spawn_n(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function(*args)`` in a new plain greenlet (cheaper than
    :func:`spawn`: no handle to kill or wait on)."""
    return gevent.spawn_raw(function, *args)


def kill(thread: Any) -> None:
    """End a greenlet made by :func:`spawn`: wait for it to end, as
    eventlet's kill does, except in the hub, where gevent forbids waiting."""
    thread.kill(block=greenlet.getcurrent() is not gevent.get_hub())


def join(thread: Any) -> Any:
    """Block until a greenlet made by :func:`spawn` ends: what it returned,
    or raise what it raised (``GreenletExit`` if killed, as on eventlet:
    gevent's ``get()`` would return the exception instead)."""
    result = thread.get()
    if isinstance(result, greenlet.GreenletExit):
        raise result
    return result


def sleep(seconds: float = 0) -> None:
    gevent.sleep(seconds)


def getcurrent() -> Any:
    return greenlet.getcurrent()


def hub_greenlet() -> Any:
    """The greenlet that runs the event loop (callbacks run there)."""
    return gevent.get_hub()


def switch_to_hub() -> Any:
    """Park the current greenlet until something switches back to it."""
    return gevent.get_hub().switch()


class _Watch:
    """A libev/libuv watcher behind the ``cancel()`` of the seam."""

    __slots__ = ("_watcher",)

    def __init__(self, watcher: Any) -> None:
        self._watcher = watcher

    def cancel(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()
            watcher.close()


def call_later(delay: float, function: Callable[..., Any], *args: Any) -> Any:
    """Call ``function(*args)`` in the hub after ``delay`` seconds; the
    handle has ``cancel()``. The callback must never block."""
    timer = gevent.get_hub().loop.timer(max(delay, 0.0))
    handle = _Watch(timer)

    def fire() -> None:
        handle.cancel()  # a one-shot timer: free the watcher
        function(*args)

    timer.start(fire)
    return handle


def call_soon(function: Callable[..., Any], *args: Any) -> None:
    """Call ``function(*args)`` in the hub as soon as it runs."""
    gevent.get_hub().loop.run_callback(function, *args)


def watch_readable(
    fileno: int, callback: Callable[..., Any], gone: Callable[..., Any]
) -> Any:
    """Call ``callback()`` in the hub whenever ``fileno`` is readable. The
    handle goes to :func:`unwatch`. (gevent does not report a descriptor
    closed under a watcher: stargate unwatches before it closes.)"""
    watcher = gevent.get_hub().loop.io(fileno, 1)
    watcher.start(callback)
    return _Watch(watcher)


def unwatch(handle: Any) -> None:
    handle.cancel()


def wait_writable(fileno: int) -> None:
    """Block this greenlet until ``fileno`` can take bytes."""
    gevent.socket.wait_write(fileno)


def _plain_socket_class() -> Any:
    return gevent.monkey.get_original("socket", "socket")


def adopt(sock: Any) -> socket.socket:
    """A plain, non-blocking socket that owns ``sock``'s descriptor from now
    on (gevent's socket object is let go, as on eventlet)."""
    plain = _plain_socket_class()
    if type(sock) is plain:
        sock.setblocking(False)
        return sock
    family, type_, proto = sock.family, sock.type, sock.proto
    adopted = plain(family, type_, proto, fileno=sock.detach())
    adopted.setblocking(False)
    return adopted


def green_socket(raw: socket.socket) -> Any:
    """A gevent socket on a duplicate of ``raw``'s descriptor (the same
    connection), for handlers that use ``websocket.socket``."""
    return gevent.socket.socket(
        raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno())
    )


# -- gevent's WSGI server ------------------------------------------------------


def server_socket(environ: dict[str, Any]) -> Any:
    """The client socket stargate's gevent server lets an application take
    over, or None when that server is not serving this request."""
    return environ.get(CLIENT_SOCKET_KEY)


def request_rfile(environ: dict[str, Any]) -> Any:
    return environ.get(REQUEST_RFILE_KEY)


def reports_http_10(environ: dict[str, Any]) -> bool:
    return False  # gevent's server reports the request's own version


def mark_taken_over(environ: dict[str, Any]) -> None:
    environ[TAKEN_OVER_KEY] = True


def taken_over(environ: dict[str, Any]) -> bool:
    """Whether the application took the connection over (see
    :func:`mark_taken_over`)."""
    return bool(environ.get(TAKEN_OVER_KEY))
