"""The I/O driver: the WebSocket object a handler receives.

:class:`WebSocket` owns a green socket, a send queue and the timers that keep
the connection honest (keepalive pings, the close timeout). Every protocol
decision is made by the sans-I/O :class:`~stargate.protocol.ServerProtocol`
it drives: this module only moves bytes.

It keeps the interface of ``eventlet.websocket.WebSocket`` (``send``,
``wait``, ``close``) so handlers written for the original stargate keep
working, and adds ``ping``, the negotiated ``subprotocol``, the close
``close_code``/``close_reason`` and ``on_message``.

The reader is not a green thread: the connection registers a callback with
the runtime's hub (eventlet's or gevent's, through :mod:`stargate.runtime`)
for its file descriptor, and the hub calls it whenever bytes arrive. It
feeds the protocol, answers pings, notes pongs, completes the closing
handshake and queues data messages for :meth:`WebSocket.wait` (or
hands them to :attr:`WebSocket.on_message`). So keepalive measures the peer,
not the handler: a handler that only sends is never cut off, and a
connection nobody waits on costs no stack.

Writes never block the caller when the socket can take the bytes: they go
straight to the kernel, and only what does not fit is queued for a writer
green thread. The queue is bounded by ``max_send_buffer``; a peer that stops
reading is closed with 1013 (``slow_listener="close"``) or has messages
dropped (``slow_listener="drop"``), so one slow reader never holds up a
broadcast nor grows memory without bound.

Ending a connection is graceful whenever the peer is still there: the close
frame is written, the write side is shut (``SHUT_WR``), and what the peer
still sends is read and discarded until it closes its side or
``close_timeout`` passes; only then is the socket closed. Closing a socket
with unread bytes would make the kernel send a reset, and the peer would
lose the close frame.
"""

import collections
import enum
import errno
import logging
import socket
import time
import weakref
from typing import Any, Callable, ContextManager

import greenlet

from stargate import protocol as _protocol
from stargate import runtime as _runtime
from stargate.exceptions import ConnectionClosed

__all__ = ["WebSocket", "SendResult", "SendGroup", "open_websockets"]

log = logging.getLogger("stargate.connection")

#: Bytes read from the socket at a time.
READ_SIZE = 65536

#: Received messages a connection holds for :meth:`WebSocket.wait` before
#: it stops reading (the peer then waits on TCP flow control), as
#: ``websockets``' ``max_queue``: at most this many ``max_message_size``
#: messages per connection.
MAX_QUEUED_MESSAGES = 16

#: Close code sent to a listener that fell ``max_send_buffer`` bytes behind.
SLOW_LISTENER_CLOSE_CODE = 1013

#: Close code sent to a client silent for ``idle_timeout`` seconds: 1001
#: (going away) rather than 1000, because the server, not the purpose of the
#: connection, ended it; a client may reconnect when it has something to say.
IDLE_CLOSE_CODE = 1001

#: Close code sent to a peer that did not answer a keepalive ping within
#: ``ping_timeout`` (as ``websockets`` does).
KEEPALIVE_CLOSE_CODE = 1011

_open: "weakref.WeakSet[WebSocket]" = weakref.WeakSet()


def open_websockets() -> "list[WebSocket]":
    """The WebSockets of this process that have not finished yet."""
    return [websocket for websocket in list(_open) if not websocket._finished]


_shutting_down = False


def begin_shutdown() -> None:
    """Say that this process is stopping: from now on
    :func:`shutting_down` is true, and ``WebSocketView`` closes every
    WebSocket it opens with 1001 at once (an upgrade whose request was
    still arriving when the worker's closing sweep ran)."""
    global _shutting_down
    _shutting_down = True


def shutting_down() -> bool:
    """Whether :func:`begin_shutdown` was called in this process."""
    return _shutting_down


_DEAD_ERRNOS = {
    errno.EPIPE,
    errno.ECONNRESET,
    errno.ENOTCONN,
    errno.EBADF,
    errno.ESHUTDOWN,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
}


class SendResult(str, enum.Enum):
    """What :meth:`WebSocket.send_prepared` did with a message."""

    SENT = "sent"  #: handed to the kernel in full
    QUEUED = "queued"  #: partly or wholly waiting in the send queue
    DROPPED = "dropped"  #: send buffer full, message dropped, connection kept
    CLOSED_SLOW = "closed_slow"  #: send buffer full, connection closed (1013)
    DEAD = "dead"  #: the connection is closed or the peer is gone

    @property
    def keep(self) -> bool:
        """Whether the listener should stay subscribed."""
        return self in (SendResult.SENT, SendResult.QUEUED, SendResult.DROPPED)


#: What ``WebSocket.on_message`` is called with: the connection and a
#: message (``str`` for text, ``bytes`` for binary).
OnMessage = Callable[["WebSocket", "str | bytes"], object]

_OPEN = _protocol.State.OPEN
_CLOSED = _protocol.State.CLOSED
_SENT = SendResult.SENT
_DEAD = SendResult.DEAD
_MESSAGE_EVENTS = (_protocol.TextMessage, _protocol.BinaryMessage)


class WebSocket:
    """A WebSocket connection, as a handler sees it.

    :param sock: the client socket (a green socket of the runtime, or a
        plain one), after the handshake was sent; the connection owns it.
    :param protocol: a :class:`~stargate.protocol.ServerProtocol` for it.
    :param environ: the WSGI environ of the upgrade request.
    :param subprotocol: the negotiated ``Sec-WebSocket-Protocol``, or None.
    :param ping_interval: seconds between keepalive pings, counted from the
        previous ping (RFC 6455 only); ``None`` disables them.
    :param ping_timeout: seconds to wait for any data after a keepalive ping
        before the connection is failed with 1011.
    :param idle_timeout: seconds without a text or binary message from the
        peer before the connection is closed with 1001 ``"idle timeout"``
        (pings and pongs are not activity); ``None`` (the default) disables it.
    :param close_timeout: seconds to wait for the peer's close frame, for
        queued bytes to drain and for the peer to close its side when
        closing.
    :param max_send_buffer: bytes that may wait in the send queue before the
        peer counts as too slow.
    :param slow_listener: ``"close"`` to close a too-slow peer with 1013,
        ``"drop"`` to drop messages to it instead.
    :param initial_data: bytes of the connection already read from the
        socket (a client that sent its first frames with the upgrade
        request); they are processed before anything read later.
    :param message_context: a callable returning a context manager entered
        around each :attr:`on_message` call (the view uses it to make the
        application's Pyramid registry current there).
    """

    # Slots: an idle connection's attributes cost 8 bytes each instead of a
    # dict's share (about 1.2 KiB). A subclass, or code that sets another
    # attribute, gets a __dict__ as usual.
    __slots__ = (
        "_green",
        "protocol",
        "environ",
        "subprotocol",
        "ping_interval",
        "ping_timeout",
        "idle_timeout",
        "close_timeout",
        "max_send_buffer",
        "slow_listener",
        "wire_format",
        "dropped",
        "messages_received",
        "messages_sent",
        "_raw",
        "_rt",
        "_queue",
        "_queued",
        "_writer",
        "_messages",
        "_on_message",
        "_dispatcher",
        "_waiters",
        "_finished",
        "_shutting",
        "_half_closed",
        "_closed_event",
        "_close_callbacks",
        "_last_message",
        "_last_ping",
        "_awaiting_pong_since",
        "_timer",
        "_deadline",
        "_local_close_code",
        "_listener",
        "_message_context",
        "_writable",
        "__dict__",
        "__weakref__",
    )

    def __init__(
        self,
        sock: socket.socket,
        protocol: _protocol.ServerProtocol,
        *,
        environ: "dict[str, Any] | None" = None,
        subprotocol: "str | None" = None,
        ping_interval: "float | None" = 20.0,
        ping_timeout: float = 20.0,
        idle_timeout: "float | None" = None,
        close_timeout: float = 10.0,
        max_send_buffer: int = 2**20,
        slow_listener: str = "close",
        initial_data: bytes = b"",
        message_context: "Callable[[], ContextManager[object]] | None" = None,
    ) -> None:
        if slow_listener not in ("close", "drop"):
            raise ValueError(
                f"slow_listener must be 'close' or 'drop', not {slow_listener!r}"
            )
        self.protocol = protocol
        self.environ = environ if environ is not None else {}
        self.subprotocol = subprotocol
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.idle_timeout = idle_timeout
        self.close_timeout = close_timeout
        self.max_send_buffer = max_send_buffer
        self.slow_listener = slow_listener

        #: How messages are encoded for this peer (a canonical
        #: :class:`~stargate.frames.WireFormat`, shared by equal peers).
        self.wire_format = protocol.wire_format
        self._message_context = message_context
        self._rt = runtime = _runtime.current()
        self._raw = runtime.adopt(sock)
        self._green = None
        # The send backlog and the received messages not yet returned by
        # wait(): deques made only when needed and dropped once empty, since
        # an empty deque holds a 64-slot block (760 bytes) per idle connection.
        self._queue = None
        self._queued = 0
        self._writer = None
        self._messages = None
        self._on_message: OnMessage | None = None
        self._dispatcher = None
        self._waiters = None  # green threads parked in wait()
        self._finished = False
        self._shutting = False  # the protocol is closed: flush, FIN, drain
        self._half_closed = False  # our FIN is sent: reading until the peer's
        self._closed_event = None  # made by _closed() for the first waiter
        self._close_callbacks: list[Callable[[WebSocket], object]] = []
        now = time.monotonic()
        self._last_message = now
        self._last_ping = now
        self._awaiting_pong_since = None
        self._timer = None  # keepalive and idle timeout
        self._deadline = None  # the close timeout, once closing
        self._local_close_code = None
        #: Messages dropped because the send buffer was full.
        self.dropped = 0
        #: Data messages received from the peer.
        self.messages_received = 0
        #: Data messages handed to the connection to send (by :meth:`send`
        #: or a broadcast), ``dropped`` ones included.
        self.messages_sent = 0
        _open.add(self)
        self._writable = protocol.state is _OPEN
        self._listener = None
        self._listen()
        if initial_data:
            self._received(bytes(initial_data))
        if not self._finished:
            self._schedule_timer()

    # -- what handlers use --------------------------------------------------

    @property
    def socket(self) -> Any:
        """The connection's socket, as a green socket of the runtime (made
        when first asked for: an idle connection keeps only the plain
        socket). On gevent it holds a duplicate of the descriptor."""
        green = self._green
        if green is None:
            green = self._green = self._rt.green_socket(self._raw)
        return green

    @property
    def draft(self) -> str:
        """``"rfc6455"``, ``"hixie-76"`` or ``"hixie-75"``."""
        return self.protocol.wire_format.draft

    @property
    def path(self) -> str:
        """The path of the upgrade request."""
        return self.environ.get("SCRIPT_NAME", "") + self.environ.get("PATH_INFO", "")

    @property
    def origin(self) -> "str | None":
        """The ``Origin`` the browser sent, or None."""
        return self.environ.get("HTTP_ORIGIN") or self.environ.get(
            "HTTP_SEC_WEBSOCKET_ORIGIN"
        )

    @property
    def closed(self) -> bool:
        """True once the connection can carry no more messages."""
        return self._finished or self.protocol.state is not _OPEN

    @property
    def close_code(self) -> "int | None":
        """The close code received from the peer (1006 for an abrupt end),
        or None while open. 1013 when stargate closed the connection because
        the peer fell ``max_send_buffer`` bytes behind, 1011 when it did not
        answer a keepalive ping."""
        if self._local_close_code is not None:
            return self._local_close_code
        if self.protocol.close_code is not None:
            return self.protocol.close_code
        if self._finished:
            return 1006
        return None

    @property
    def close_reason(self) -> "str | None":
        """The close reason received from the peer, or None while open."""
        if self.protocol.close_reason is not None:
            return self.protocol.close_reason
        return "" if self._finished else None

    @property
    def buffered_amount(self) -> int:
        """Bytes waiting in the send queue."""
        return self._queued

    @property
    def on_message(self) -> "OnMessage | None":
        """A callable ``on_message(websocket, message)``, or None.

        When set, every message the peer sends is handed to it, in order,
        in a green thread of its own, instead of being kept for
        :meth:`wait`. Meant for connections no handler waits on (see
        ``WebSocketView.keep_open``). An exception it raises is logged and
        closes the connection with 1011.
        """
        return self._on_message

    @on_message.setter
    def on_message(self, callback: "OnMessage | None") -> None:
        self._on_message = callback
        if callback is not None and self._messages:
            self._dispatch()

    def send(self, message: "str | bytes") -> None:
        """Send ``message``: a ``str`` as a text frame, ``bytes`` as binary.

        Raises :class:`~stargate.exceptions.ConnectionClosed` once closed.
        The call does not wait for the peer to read the message.
        """
        if self.closed:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason or "")
        self.protocol.send_message(message)
        self.messages_sent += 1
        result = self._write(self.protocol.data_to_send())
        if not result.keep:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason or "")

    def wait(self) -> "str | bytes | None":
        """Return the next message (``str`` or ``bytes``), or None once the
        connection is closed. Pings are answered whether or not anybody
        waits."""
        while True:
            messages = self._messages
            if messages:
                message = messages.popleft()
                if not messages:
                    self._messages = None
                if self._listener is None and not self._finished:
                    self._listen()  # reading was paused for a full queue
                return message
            if self._finished or self.protocol.state is _CLOSED:
                return None
            if self.protocol.failure_pending:
                # The messages before a bad frame are handled: now fail.
                self._apply_pending_failure()
                continue
            self._park()

    def ping(self, data: "bytes | str" = b"") -> None:
        """Send a ping frame (RFC 6455 only; a no-op on hixie connections)."""
        if self.closed:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason or "")
        if self.draft != "rfc6455":
            return
        self.protocol.send_ping(data)
        self._write(self.protocol.data_to_send())

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake and wait, up to ``close_timeout``, for
        it to finish. Safe to call more than once.

        Returns once the peer's close frame arrived (or, on hixie-75, which
        has no closing handshake, at once); the TCP connection is then shut
        down in the background, bounded by ``close_timeout``.
        """
        if self._finished:
            return
        self._start_close(code, reason)
        if self.protocol.state is _CLOSED or self._finished:
            return
        if greenlet.getcurrent() is self._rt.hub_greenlet():
            return  # the close timeout finishes it
        self._closed().wait()

    def add_close_callback(self, callback: "Callable[[WebSocket], object]") -> None:
        """Call ``callback(websocket)`` once, when the connection ends."""
        if self._finished:
            callback(self)
        else:
            self._close_callbacks.append(callback)

    def remove_close_callback(self, callback: "Callable[[WebSocket], object]") -> None:
        try:
            self._close_callbacks.remove(callback)
        except ValueError:
            pass

    def abort(self) -> None:
        """Drop the TCP connection at once, without a closing handshake."""
        if self._finished:
            return
        self._queue = None
        self._queued = 0
        try:
            self._raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._finish()

    # -- what the hub uses --------------------------------------------------

    def send_prepared(self, data: bytes) -> SendResult:
        """Write bytes already encoded for this connection's ``wire_format``.

        Returns a :class:`SendResult`; never raises for a dead peer.
        """
        if self._writable:
            # A broadcast's hot path: open, nothing queued, one system call.
            self.messages_sent += 1
            return self._send_now(data)
        if self._finished or self.protocol.state is not _OPEN:
            return _DEAD
        self.messages_sent += 1
        return self._write(data)

    # -- writing --------------------------------------------------------------

    def _refresh(self):
        """Recompute whether :meth:`send_prepared` may write at once: after
        anything that can close the protocol, queue bytes or drain them."""
        self._writable = (
            not self._finished and not self._queue and self.protocol.state is _OPEN
        )

    def _send_failed(self, data, exc):
        if isinstance(exc, BlockingIOError):
            return self._write_rest(data)  # the kernel's buffer is full
        if exc.errno in _DEAD_ERRNOS or isinstance(exc, ConnectionError):
            self.abort()  # the peer is gone
            return _DEAD
        raise exc

    def _write(self, data):
        """Write ``data`` now if the kernel takes it (the broadcast hot path:
        no context switch), else queue the rest for the writer."""
        if not data:
            return _SENT  # nothing to send: no system call
        if self._finished:
            return _DEAD
        if not self._queue:
            return self._send_now(data)
        if self._queued + len(data) > self.max_send_buffer:
            return self._overflow()
        return self._write_rest(data)

    def _send_now(self, data):
        """One ``send()``; what the kernel does not take is queued."""
        try:
            sent = self._raw.send(data)
        except OSError as exc:
            return self._send_failed(data, exc)
        if sent == len(data):
            return _SENT
        return self._write_rest(memoryview(data)[sent:])

    def _write_rest(self, data):
        """Queue what the kernel did not take; the writer sends it."""
        if self._queue is None:
            self._queue = collections.deque()
        self._queue.append(data)
        self._queued += len(data)
        self._writable = False
        if self._writer is None:
            self._writer = self._rt.spawn(self._drain)
        return SendResult.QUEUED

    def _overflow(self):
        if self.slow_listener == "drop":
            self.dropped += 1
            return SendResult.DROPPED
        log.debug(
            "closing %s: %d bytes waiting, over max_send_buffer", self, self._queued
        )
        self._local_close_code = SLOW_LISTENER_CLOSE_CODE
        self._writable = False
        if self.protocol.state is _OPEN:
            self.protocol.send_close(SLOW_LISTENER_CLOSE_CODE, "send buffer full")
            self.protocol.data_to_send()  # nowhere to put it: the peer is stuck
        self.abort()
        return SendResult.CLOSED_SLOW

    def _drain(self):
        try:
            while self._queue:
                chunk = self._queue[0]
                try:
                    self._send_all(chunk)
                except OSError:
                    self.abort()  # the peer is gone
                    return
                if self._queue and self._queue[0] is chunk:
                    self._queue.popleft()
                    self._queued -= len(chunk)
        finally:
            self._writer = None
            if not self._queue:
                self._queue = None
            self._refresh()
            if self._shutting and not self._finished:
                self._half_close()

    def _send_all(self, chunk):
        """Send all of ``chunk``, waiting (green) for room in between."""
        view = memoryview(chunk)
        raw = self._raw
        while view:
            try:
                sent = raw.send(view)
            except BlockingIOError:
                self._rt.wait_writable(raw.fileno())
                continue
            view = view[sent:]

    # -- reading: a hub callback, not a green thread ---------------------------

    def _listen(self):
        """Ask the hub to call :meth:`_readable` when bytes arrive."""
        try:
            fileno = self._raw.fileno()
        except OSError:
            fileno = -1
        if fileno < 0:
            self._finish()
            return
        self._listener = self._rt.watch_readable(
            fileno, self._readable, self._descriptor_gone
        )

    def _unlisten(self):
        listener, self._listener = self._listener, None
        if listener is not None:
            self._rt.unwatch(listener)

    def _descriptor_gone(self, *ignored):
        """The hub says the descriptor was closed under us."""
        self._listener = None
        self._finish()

    def _readable(self, *ignored):
        """Called by the hub (in its own green thread: never block here)."""
        try:
            data = self._raw.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self._received(data)

    def _received(self, data):
        if self._finished:
            return
        if self._half_closed:
            # Draining after our FIN: discard until the peer closes its side.
            if not data:
                self._finish()
            return
        self._awaiting_pong_since = None
        protocol = self.protocol
        if data:
            protocol.receive_data(data)
        else:
            protocol.receive_eof()
        got_message = False
        for event in protocol.events_received():
            if isinstance(event, _MESSAGE_EVENTS):
                if self._messages is None:
                    self._messages = collections.deque()
                self._messages.append(event.data)
                self.messages_received += 1
                got_message = True
        if got_message:
            self._last_message = time.monotonic()
        if protocol.failure_pending and not (self._waiters or self._on_message):
            # A bad frame followed messages, but nobody is there to handle
            # them now: fail at once rather than hold the error indefinitely.
            protocol.apply_pending_failure()
        self._write(protocol.data_to_send())
        if self._finished:
            return
        if not data:
            self._shutting = True
            self._finish()
        elif protocol.should_close_transport:
            self._shut()
        elif self._messages and len(self._messages) >= MAX_QUEUED_MESSAGES:
            self._unlisten()  # back-pressure: resumed by wait()
        self._refresh()
        if got_message and self._on_message is not None:
            self._dispatch()
        if got_message or protocol.state is _CLOSED:
            self._wake()

    # -- handing messages over -------------------------------------------------

    def _park(self):
        """Sleep until :meth:`_wake` (a message, or the end)."""
        current = greenlet.getcurrent()
        runtime = self._rt
        if current is runtime.hub_greenlet():
            raise RuntimeError("WebSocket.wait() cannot be called from the hub")
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(current)
        try:
            runtime.switch_to_hub()
        finally:
            waiters = self._waiters
            if waiters is not None:
                try:
                    waiters.remove(current)
                except ValueError:
                    pass
                if not waiters:
                    self._waiters = None

    def _wake(self):
        """Resume the green threads parked in :meth:`wait`.

        A parked green thread is switched to from the hub itself, as the
        runtimes resume one whose socket became readable; from anywhere else the
        wake-up is scheduled, and only green threads still parked then are
        resumed, so none is ever woken from another wait.
        """
        if not self._waiters:
            return
        runtime = self._rt
        if greenlet.getcurrent() is not runtime.hub_greenlet():
            runtime.call_soon(self._wake)
            return
        for waiter in list(self._waiters):
            waiters = self._waiters
            if waiters and waiter in waiters and not waiter.dead:
                waiter.switch()

    def _dispatch(self):
        if self._dispatcher is None and not self._finished:
            self._dispatcher = self._rt.spawn_n(self._run_on_message)

    def _run_on_message(self):
        try:
            while True:
                callback = self._on_message
                messages = self._messages
                if callback is None or not messages:
                    if self.protocol.failure_pending:
                        self._apply_pending_failure()
                    return
                message = messages.popleft()
                if not messages:
                    self._messages = None
                if self._listener is None and not self._finished:
                    self._listen()
                try:
                    context = self._message_context
                    if context is None:
                        callback(self, message)
                    else:
                        with context():
                            callback(self, message)
                except Exception:
                    log.exception("on_message callback %r failed", callback)
                    if not self.closed:
                        self._start_close(1011, "internal error")
                    return
        finally:
            self._dispatcher = None

    # -- closing -----------------------------------------------------------------

    def _start_close(self, code, reason):
        """Send a close frame and arm the close timeout; never blocks."""
        protocol = self.protocol
        if protocol.state is _OPEN:
            protocol.send_close(code, reason)
            self._writable = False
            self._write(protocol.data_to_send())
        if self._finished:
            return
        if protocol.state is _CLOSED:
            self._shut()  # hixie-75: nothing to wait for
        elif self._deadline is None:
            self._deadline = self._rt.call_later(
                self.close_timeout, self._close_timed_out
            )

    def _apply_pending_failure(self):
        """Fail with the protocol error the protocol held back until the
        messages received before the bad frame were handled (an echo
        handler answers them first, as strict RFC 6455 test suites expect)."""
        protocol = self.protocol
        protocol.apply_pending_failure()
        self._writable = False
        self._write(protocol.data_to_send())
        if not self._finished:
            self._shut()

    def _fail(self, code, reason):
        """Fail the connection: close frame, then shut down without waiting
        for the peer's close frame."""
        self.protocol.fail(code, reason)
        self._writable = False
        self._write(self.protocol.data_to_send())
        if not self._finished:
            self._shut()

    def _close_timed_out(self):
        self._deadline = None
        if not self._finished:
            log.debug("%s: closing took over %ss: dropped", self, self.close_timeout)
            self.abort()

    def _shut(self):
        """The protocol is closed: flush what is queued, then half-close."""
        if self._shutting or self._finished:
            return
        self._shutting = True
        self._cancel_timer()
        if self._deadline is None:
            self._deadline = self._rt.call_later(
                self.close_timeout, self._close_timed_out
            )
        if self._listener is None:
            self._listen()  # reading may have been paused
        if self._writer is None:
            self._half_close()
        self._signal_closed()
        self._wake()

    def _half_close(self):
        """Send our FIN and read until the peer's (or the close timeout)."""
        if self._half_closed or self._finished:
            return
        self._half_closed = True
        try:
            self._raw.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish()

    def _closed(self):
        """The event sent when the protocol closes or the connection
        finishes. Made on first use, since few connections are ever waited
        for (it costs 0.4 KiB)."""
        if self._closed_event is None:
            self._closed_event = self._rt.Event()
            if self._finished or self.protocol.state is _CLOSED:
                self._closed_event.send(True)
        return self._closed_event

    def finish(self, timeout: "float | None" = None) -> None:
        """Wait, up to ``timeout`` seconds (None: no limit), for the TCP
        connection to end, then drop it.

        For a server that closes the socket when the request ends: the view
        calls it so the request lasts as long as the connection.
        """
        if not self._finished:
            done = self._rt.Event()
            self.add_close_callback(lambda websocket: done.send(True))
            with self._rt.Timeout(timeout, False):
                done.wait()
        self.abort()

    def _signal_closed(self):
        event = self._closed_event
        if event is not None and not event.ready():
            event.send(True)

    def _wait_closed(self, timeout):
        with self._rt.Timeout(timeout, False):
            self._closed().wait()
            return True
        return False

    def _finish(self):
        if self._finished:
            return
        self._finished = True
        self._writable = False
        _open.discard(self)
        self._unlisten()
        self._cancel_timer()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        writer = self._writer
        if writer is not None and writer is not greenlet.getcurrent():
            self._writer = None
            self._rt.kill(writer)
        self._queue = None
        self._queued = 0
        if not self._shutting:
            try:
                self._raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self._raw.close()
        except OSError:
            pass
        self._wake()
        self._signal_closed()
        callbacks, self._close_callbacks = self._close_callbacks, []
        if callbacks:
            if greenlet.getcurrent() is self._rt.hub_greenlet():
                # Callbacks may block (a backend unsubscribing): not here.
                self._rt.spawn_n(self._run_close_callbacks, callbacks)
            else:
                self._run_close_callbacks(callbacks)

    def _run_close_callbacks(self, callbacks):
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("close callback %r failed", callback)

    # -- keepalive and idle timeout: one hub timer, run in the hub ----------------

    def _pings(self):
        return self.ping_interval is not None and self.draft == "rfc6455"

    def _cancel_timer(self):
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _schedule_timer(self):
        due = []
        if self._pings():
            due.append(self._last_ping + self.ping_interval)
            if self._awaiting_pong_since is not None:
                due.append(self._awaiting_pong_since + self.ping_timeout)
        if self.idle_timeout is not None:
            due.append(self._last_message + self.idle_timeout)
        if not due:
            return
        delay = max(min(due) - time.monotonic(), 0.0)
        self._timer = self._rt.call_later(delay, self._tick)

    def _tick(self):
        """Send the keepalive ping that is due, or end a silent connection."""
        self._timer = None
        if self.closed:
            return
        now = time.monotonic()
        if (
            self.idle_timeout is not None
            and now - self._last_message >= self.idle_timeout
        ):
            log.debug("%s: no message in %ss, closing", self, self.idle_timeout)
            self._start_close(IDLE_CLOSE_CODE, "idle timeout")
            return
        if self._pings():
            awaiting = self._awaiting_pong_since
            if awaiting is not None and now - awaiting >= self.ping_timeout:
                log.debug("%s: no answer to a ping in %ss", self, self.ping_timeout)
                # The peer is presumed gone: the close frame is written for
                # it to find, but nothing of it is waited for.
                self._local_close_code = KEEPALIVE_CLOSE_CODE
                self._writable = False
                self.protocol.fail(KEEPALIVE_CLOSE_CODE, "keepalive ping timeout")
                self._write(self.protocol.data_to_send())
                self.abort()
                return
            if now - self._last_ping >= self.ping_interval:
                self.protocol.send_ping(b"")
                self._write(self.protocol.data_to_send())
                self._last_ping = now
                if awaiting is None:
                    self._awaiting_pong_since = now
        if not self._finished:
            self._schedule_timer()

    def __repr__(self):
        peer = self.environ.get("REMOTE_ADDR", "?")
        state = "closed" if self.closed else "open"
        return f"<WebSocket {self.draft} {peer} {self.path or '/'} {state}>"


# -- broadcasts: one walk over many connections ---------------------------------


def _send_many_python(members, data):
    """:class:`SendGroup`'s walk without the C speedup: one ``send()`` per
    open connection with nothing queued. Returns the count sent in full and
    ``(websocket, what happened)`` for the others: None (not writable now),
    the bytes the kernel took, or the OSError."""
    size = len(data)
    sent = 0
    rest = []
    for websocket, send in members.items():
        if not websocket._writable:
            rest.append((websocket, None))
            continue
        websocket.messages_sent += 1
        try:
            taken = send(data)
        except OSError as exc:
            rest.append((websocket, exc))
            continue
        if taken == size:
            sent += 1
        else:
            rest.append((websocket, taken))
    return sent, rest


try:
    from stargate._speedups import send_many as _send_many_c
except ImportError:  # not built: SendGroup walks in Python
    _send_many_c = None


class SendGroup:
    """Connections of one wire format, ready for a broadcast's walk.

    The hub keeps one per channel and wire format. Each connection's socket
    is looked up once, when it joins, and :meth:`send` writes one encoded
    frame to every member in a single loop, in C when the optional
    ``stargate._speedups`` extension was built (the system calls then run
    with the GIL released), else in Python. Either way a member gets what
    :meth:`WebSocket.send_prepared` would do: one ``send()`` when it is
    open with nothing queued, the normal path (queue, drop, close) for the
    rest.

    Only plain :class:`WebSocket` connections belong here (:meth:`accepts`):
    a class that overrides ``send_prepared`` is written through its own.
    """

    __slots__ = ("wire_format", "_members", "_walk")

    def __init__(self, wire_format: Any) -> None:
        self.wire_format = wire_format
        # websocket -> its descriptor (C walk) or its socket's send (Python)
        self._members: "dict[WebSocket, Any]" = {}
        self._walk = _send_many_c

    @staticmethod
    def accepts(websocket: object) -> bool:
        """Whether ``websocket`` can be written by a group's walk."""
        return (
            isinstance(websocket, WebSocket)
            and type(websocket).send_prepared is WebSocket.send_prepared
        )

    def add(self, websocket: WebSocket) -> None:
        raw = websocket._raw
        if self._walk is None:
            self._members[websocket] = raw.send
            return
        try:
            self._members[websocket] = raw.fileno()
        except OSError:
            self._members[websocket] = -1  # closed: never writable again

    def discard(self, websocket: WebSocket) -> None:
        self._members.pop(websocket, None)

    def __contains__(self, websocket: object) -> bool:
        return websocket in self._members

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self):
        return iter(list(self._members))

    def snapshot(self) -> "SendGroup":
        """A copy to walk while this group may change."""
        copy = SendGroup.__new__(SendGroup)
        copy.wire_format = self.wire_format
        copy._members = self._members.copy()
        copy._walk = self._walk
        return copy

    def send(
        self, data: bytes
    ) -> "tuple[int, list[tuple[WebSocket, SendResult | Exception]]]":
        """Write ``data`` (encoded for :attr:`wire_format`) to every member.

        Returns how many took it (written or queued) and, for the others,
        ``(websocket, SendResult)`` (``DROPPED``, ``CLOSED_SLOW``, ``DEAD``)
        or ``(websocket, exception)`` for an unexpected error. Never raises
        for a member.
        """
        walk = self._walk
        if walk is None:
            sent, rest = _send_many_python(self._members, data)
        else:
            sent, rest = walk(self._members, data)
        if not rest:
            return sent, rest
        outcomes: "list[tuple[WebSocket, SendResult | Exception]]" = []
        for websocket, what in rest:
            try:
                if what is None:
                    result = websocket.send_prepared(data)
                elif isinstance(what, int):
                    result = websocket._write_rest(memoryview(data)[what:])
                else:
                    result = websocket._send_failed(data, what)
            except Exception as exc:
                outcomes.append((websocket, exc))
                continue
            if result is _SENT or result is SendResult.QUEUED:
                sent += 1
            else:
                outcomes.append((websocket, result))
        return sent, outcomes
