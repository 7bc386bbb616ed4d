"""stargate's runtime on eventlet (the default, as in the seed).

The names here are the seam every runtime module provides; see
:mod:`stargate.runtime`.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

import eventlet
import eventlet.event
import eventlet.patcher
import eventlet.semaphore
import eventlet.wsgi
import greenlet
from eventlet import hubs
from eventlet.greenio import GreenSocket
from eventlet.hubs import hub as _hub_module

NAME = "eventlet"

#: What a process must run first, named in errors that find it missing.
PATCH_CALL = "eventlet.monkey_patch()"

#: ``with Timeout(seconds, False):`` leaves the block silently after
#: ``seconds``; ``Timeout(seconds)`` raises itself there.
Timeout = eventlet.Timeout

#: An event a green thread waits on: ``send(value)``, ``send_exception(exc)``,
#: ``wait(timeout=None)`` (the value, or None on timeout) and ``ready()``.
Event = eventlet.event.Event

#: A green lock (``with Semaphore():``).
Semaphore = eventlet.semaphore.Semaphore

_READ = _hub_module.READ


def monkey_patch() -> None:
    """Patch the standard library for eventlet (idempotent)."""
    eventlet.monkey_patch()


def is_monkey_patched() -> bool:
    """Whether ``socket`` is eventlet's (the backends need it)."""
    return bool(eventlet.patcher.is_monkey_patched("socket"))


def spawn(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function(*args)`` in a new green thread; the handle has
    ``kill()``."""
    return eventlet.spawn(function, *args)


def spawn_n(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function(*args)`` in a new plain greenlet (cheaper than
    :func:`spawn`: no handle to kill or wait on)."""
    return eventlet.spawn_n(function, *args)


def kill(thread: Any) -> None:
    """End a green thread made by :func:`spawn`; never blocks the hub."""
    thread.kill()


def join(thread: Any) -> Any:
    """Block until a green thread made by :func:`spawn` ends: what it
    returned, or raise what it raised (``GreenletExit`` if killed)."""
    return thread.wait()


def sleep(seconds: float = 0) -> None:
    eventlet.sleep(seconds)


def getcurrent() -> Any:
    return greenlet.getcurrent()


def hub_greenlet() -> Any:
    """The green thread that runs the event loop (callbacks run there)."""
    return hubs.get_hub().greenlet


def switch_to_hub() -> Any:
    """Park the current green thread until something switches back to it."""
    return hubs.get_hub().switch()


def call_later(delay: float, function: Callable[..., Any], *args: Any) -> Any:
    """Call ``function(*args)`` in the hub after ``delay`` seconds; the
    handle has ``cancel()``. The callback must never block."""
    # eventlet's timer has cancel() itself: no wrapper needed.
    return hubs.get_hub().schedule_call_global(delay, function, *args)


def call_soon(function: Callable[..., Any], *args: Any) -> None:
    """Call ``function(*args)`` in the hub as soon as it runs."""
    hubs.get_hub().schedule_call_global(0, function, *args)


def watch_readable(
    fileno: int, callback: Callable[..., Any], gone: Callable[..., Any]
) -> Any:
    """Call ``callback(*args)`` in the hub whenever ``fileno`` is readable,
    and ``gone(*args)`` if the descriptor is closed under the watch (both
    ignore their arguments, which differ between runtimes: no wrapper is
    made, since every idle connection would keep one). The handle goes to
    :func:`unwatch`."""
    hub = hubs.get_hub()
    listener = hub.add(_READ, fileno, callback, gone, None)
    # eventlet ties a listener to the green thread that registered it (to
    # skip its throwback once that thread is dead). This one belongs to a
    # connection, which outlives the request's green thread: tie it to the
    # hub, so the dead thread is freed and the throwback still runs. There is
    # no public way to say so; ``greenlet`` is a plain attribute of
    # eventlet's FdListener.
    listener.greenlet = hub.greenlet
    return listener


def unwatch(handle: Any) -> None:
    hubs.get_hub().remove(handle)


def wait_writable(fileno: int) -> None:
    """Block this green thread until ``fileno`` can take bytes."""
    hubs.trampoline(fileno, write=True)


def adopt(sock: Any) -> socket.socket:
    """The plain, non-blocking socket under a green socket, owned from now on.

    A green socket holds a dictionary and eight bound methods (about
    0.8 KiB) and closes its descriptor when collected: the descriptor moves
    to a new plain socket object and the wrapper is let go.
    """
    raw = getattr(sock, "fd", None)
    if raw is None:
        sock.setblocking(False)
        return sock
    adopted = type(raw)(raw.family, raw.type, raw.proto, fileno=raw.detach())
    adopted.setblocking(False)
    return adopted


def green_socket(raw: socket.socket) -> Any:
    """A green socket over ``raw`` (same descriptor), for handlers that use
    ``websocket.socket``."""
    return GreenSocket(raw)


# -- eventlet's WSGI server --------------------------------------------------


def server_socket(environ: dict[str, Any]) -> Any:
    """The client socket eventlet's WSGI server lets an application take
    over, or None when eventlet's server is not serving this request."""
    wsgi_input = environ.get("eventlet.input")
    if wsgi_input is not None and hasattr(wsgi_input, "get_socket"):
        return wsgi_input.get_socket()
    return None


def request_rfile(environ: dict[str, Any]) -> Any:
    """The buffered reader of the request's connection (hixie-76's key
    bytes follow the headers), or None."""
    return getattr(environ.get("eventlet.input"), "rfile", None)


def reports_http_10(environ: dict[str, Any]) -> bool:
    """Whether the server reports HTTP/1.0 whatever the request said
    (eventlet's plain server does)."""
    return "eventlet.input" in environ


def mark_taken_over(environ: dict[str, Any]) -> None:
    """Tell eventlet's server the application took the connection over: it
    must write no response of its own."""
    eventlet.wsgi.WSGI_LOCAL.already_handled = True


def taken_over(environ: dict[str, Any]) -> bool:
    """Whether the application took the connection over (see
    :func:`mark_taken_over`)."""
    return bool(getattr(eventlet.wsgi.WSGI_LOCAL, "already_handled", False))
