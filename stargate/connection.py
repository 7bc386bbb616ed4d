"""The eventlet driver: the WebSocket object a handler receives.

:class:`WebSocket` owns a green socket, a send queue and the timers that keep
the connection honest (keepalive pings, the close timeout). Every protocol
decision is made by the sans-I/O :class:`~stargate.protocol.ServerProtocol`
it drives: this module only moves bytes.

It keeps the interface of ``eventlet.websocket.WebSocket`` (``send``,
``wait``, ``close``) so handlers written for the original stargate keep
working, and adds ``ping``, the negotiated ``subprotocol``, and the close
``close_code``/``close_reason``.

Writes never block the caller when the socket can take the bytes: they go
straight to the kernel, and only what does not fit is queued for a writer
green thread. The queue is bounded by ``max_send_buffer``; a peer that stops
reading is closed with 1013 (``slow_listener="close"``) or has messages
dropped (``slow_listener="drop"``), so one slow reader never holds up a
broadcast nor grows memory without bound.
"""

import collections
import enum
import errno
import logging
import socket
import time
import weakref

import eventlet
from eventlet import hubs

from stargate import protocol as _protocol
from stargate.exceptions import ConnectionClosed

__all__ = ["WebSocket", "SendResult", "open_websockets"]

log = logging.getLogger("stargate.connection")

#: Bytes read from the socket at a time.
READ_SIZE = 65536

#: Close code sent to a listener that fell ``max_send_buffer`` bytes behind.
SLOW_LISTENER_CLOSE_CODE = 1013

#: Close code sent to a client silent for ``idle_timeout`` seconds: 1001
#: (going away) rather than 1000, because the server, not the purpose of the
#: connection, ended it; a client may reconnect when it has something to say.
IDLE_CLOSE_CODE = 1001

_open = weakref.WeakSet()


def open_websockets():
    """The WebSockets of this process that have not finished yet."""
    return [websocket for websocket in list(_open) if not websocket._finished]


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
    def keep(self):
        """Whether the listener should stay subscribed."""
        return self in (SendResult.SENT, SendResult.QUEUED, SendResult.DROPPED)


_OPEN = _protocol.State.OPEN
_SENT = SendResult.SENT
_DEAD = SendResult.DEAD


class WebSocket:
    """A WebSocket connection, as a handler sees it.

    :param sock: the eventlet green socket, after the handshake was sent.
    :param protocol: a :class:`~stargate.protocol.ServerProtocol` for it.
    :param environ: the WSGI environ of the upgrade request.
    :param subprotocol: the negotiated ``Sec-WebSocket-Protocol``, or None.
    :param ping_interval: seconds between keepalive pings when nothing is
        received (RFC 6455 only); ``None`` disables them.
    :param ping_timeout: seconds to wait for any data after a keepalive ping
        before the connection is taken for dead and aborted.
    :param idle_timeout: seconds without a text or binary message from the
        peer before the connection is closed with 1001 ``"idle timeout"``
        (pings and pongs are not activity); ``None`` (the default) disables it.
    :param close_timeout: seconds to wait for the peer's close frame and for
        queued bytes to drain when closing.
    :param max_send_buffer: bytes that may wait in the send queue before the
        peer counts as too slow.
    :param slow_listener: ``"close"`` to close a too-slow peer with 1013,
        ``"drop"`` to drop messages to it instead.
    """

    def __init__(
        self,
        sock,
        protocol,
        *,
        environ=None,
        subprotocol=None,
        ping_interval=20.0,
        ping_timeout=20.0,
        idle_timeout=None,
        close_timeout=10.0,
        max_send_buffer=2**20,
        slow_listener="close",
    ):
        if slow_listener not in ("close", "drop"):
            raise ValueError(
                f"slow_listener must be 'close' or 'drop', not {slow_listener!r}"
            )
        self.socket = sock
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
        self._raw = getattr(sock, "fd", sock)
        # The send backlog and the received messages not yet returned by
        # wait(): deques made only when needed and dropped once empty, since
        # an empty deque holds a 64-slot block (760 bytes) per idle connection.
        self._queue = None
        self._queued = 0
        self._writer = None
        self._messages = None
        self._reading = False
        self._finished = False
        self._closed_event = None  # made by _closed() for the first waiter
        self._close_callbacks = []
        self._last_received = time.monotonic()
        self._last_message = self._last_received
        self._ping_timer = None
        self._awaiting_pong_since = None
        self._local_close_code = None
        #: Messages dropped because the send buffer was full.
        self.dropped = 0
        _open.add(self)
        self._schedule_keepalive()

    # -- what handlers use --------------------------------------------------

    @property
    def draft(self):
        """``"rfc6455"``, ``"hixie-76"`` or ``"hixie-75"``."""
        return self.protocol.wire_format.draft

    @property
    def path(self):
        """The path of the upgrade request."""
        return self.environ.get("SCRIPT_NAME", "") + self.environ.get("PATH_INFO", "")

    @property
    def origin(self):
        """The ``Origin`` the browser sent, or None."""
        return self.environ.get("HTTP_ORIGIN") or self.environ.get(
            "HTTP_SEC_WEBSOCKET_ORIGIN"
        )

    @property
    def closed(self):
        """True once the connection can carry no more messages."""
        return self._finished or self.protocol.state is not _protocol.State.OPEN

    @property
    def close_code(self):
        """The close code received from the peer (1006 for an abrupt end),
        or None while open. 1013 when stargate closed the connection because
        the peer fell ``max_send_buffer`` bytes behind."""
        if self._local_close_code is not None:
            return self._local_close_code
        if self.protocol.close_code is not None:
            return self.protocol.close_code
        if self._finished:
            return 1006
        return None

    @property
    def close_reason(self):
        """The close reason received from the peer, or None while open."""
        if self.protocol.close_reason is not None:
            return self.protocol.close_reason
        return "" if self._finished else None

    @property
    def buffered_amount(self):
        """Bytes waiting in the send queue."""
        return self._queued

    def send(self, message):
        """Send ``message``: a ``str`` as a text frame, ``bytes`` as binary.

        Raises :class:`~stargate.exceptions.ConnectionClosed` once closed.
        The call does not wait for the peer to read the message.
        """
        if self.closed:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason or "")
        self.protocol.send_message(message)
        result = self._write(self.protocol.data_to_send())
        if not result.keep:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason or "")

    def wait(self):
        """Return the next message (``str`` or ``bytes``), or None once the
        connection is closed. Pings are answered while waiting."""
        while True:
            messages = self._messages
            if messages:
                message = messages.popleft()
                if not messages:
                    self._messages = None
                return message
            if self._finished:
                return None
            if self._reading:
                # Another green thread reads: wait for it to finish.
                self._closed().wait()
                continue
            self._read_once()

    def ping(self, data=b""):
        """Send a ping frame (RFC 6455 only; a no-op on hixie connections)."""
        if self.closed:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason or "")
        if self.draft != "rfc6455":
            return
        self.protocol.send_ping(data)
        self._write(self.protocol.data_to_send())

    def close(self, code=1000, reason=""):
        """Start the closing handshake and wait, up to ``close_timeout``, for
        it to finish. Safe to call more than once."""
        if self._finished:
            return
        if self.protocol.state is _protocol.State.OPEN:
            self.protocol.send_close(code, reason)
            self._write(self.protocol.data_to_send())
        if self._reading:
            # The reader receives the peer's close frame and finishes.
            if not self._wait_closed(self.close_timeout):
                self.abort()
            return
        deadline = time.monotonic() + self.close_timeout
        while not self._finished:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.abort()
                break
            with eventlet.Timeout(remaining, False):
                self._read_once()

    def add_close_callback(self, callback):
        """Call ``callback(websocket)`` once, when the connection ends."""
        if self._finished:
            callback(self)
        else:
            self._close_callbacks.append(callback)

    def remove_close_callback(self, callback):
        try:
            self._close_callbacks.remove(callback)
        except ValueError:
            pass

    def abort(self):
        """Drop the TCP connection at once, without a closing handshake."""
        if self._finished:
            return
        self._queue = None
        self._queued = 0
        try:
            self._raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if not self._reading:
            self._finish()

    # -- what the hub uses --------------------------------------------------

    def send_prepared(self, data):
        """Write bytes already encoded for this connection's ``wire_format``.

        Returns a :class:`SendResult`; never raises for a dead peer.
        """
        if self._finished or self.protocol.state is not _OPEN:
            return _DEAD
        return self._write(data)

    # -- internals ------------------------------------------------------------

    def _write(self, data):
        """Write ``data`` now if the kernel takes it (the broadcast hot path:
        no context switch), else queue the rest for the writer."""
        if not data:
            return _SENT  # nothing to send: no system call
        if self._finished:
            return _DEAD
        if not self._queue:
            try:
                sent = self._raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                if exc.errno in _DEAD_ERRNOS or isinstance(exc, ConnectionError):
                    self.abort()  # the peer is gone
                    return _DEAD
                raise
            if sent == len(data):
                return _SENT
            data = memoryview(data)[sent:]
        elif self._queued + len(data) > self.max_send_buffer:
            return self._overflow()
        return self._write_rest(data)

    def _write_rest(self, data):
        """Queue what the kernel did not take; the writer sends it."""
        if self._queue is None:
            self._queue = collections.deque()
        self._queue.append(data)
        self._queued += len(data)
        if self._writer is None:
            self._writer = eventlet.spawn(self._drain)
        return SendResult.QUEUED

    def _overflow(self):
        if self.slow_listener == "drop":
            self.dropped += 1
            return SendResult.DROPPED
        log.debug(
            "closing %s: %d bytes waiting, over max_send_buffer", self, self._queued
        )
        self._local_close_code = SLOW_LISTENER_CLOSE_CODE
        if self.protocol.state is _protocol.State.OPEN:
            self.protocol.send_close(SLOW_LISTENER_CLOSE_CODE, "send buffer full")
            self.protocol.data_to_send()  # nowhere to put it: the peer is stuck
        self.abort()
        return SendResult.CLOSED_SLOW

    def _drain(self):
        try:
            while self._queue:
                chunk = self._queue[0]
                try:
                    self.socket.sendall(chunk)
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
            if self.protocol.should_close_transport and not self._reading:
                self._finish()

    def _read_once(self):
        """Read one chunk from the socket and process it."""
        self._reading = True
        try:
            try:
                data = self.socket.recv(READ_SIZE)
            except (OSError, EOFError):
                data = b""
            self._last_received = time.monotonic()
            self._awaiting_pong_since = None
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            for event in self.protocol.events_received():
                if isinstance(event, (_protocol.TextMessage, _protocol.BinaryMessage)):
                    if self._messages is None:
                        self._messages = collections.deque()
                    self._messages.append(event.data)
                    self._last_message = self._last_received
            self._write(self.protocol.data_to_send())
            if not data or self.protocol.should_close_transport:
                self._flush_then_finish()
        finally:
            self._reading = False

    def _flush_then_finish(self):
        if self._writer is not None and not self._finished:
            with eventlet.Timeout(self.close_timeout, False):
                while self._writer is not None:
                    eventlet.sleep(0.01)
        self._finish()

    def _closed(self):
        """The event sent when the connection finishes. Made on first use,
        since few connections are ever waited for (it costs 0.4 KiB)."""
        if self._closed_event is None:
            self._closed_event = eventlet.Event()
            if self._finished:
                self._closed_event.send(True)
        return self._closed_event

    def _wait_closed(self, timeout):
        with eventlet.Timeout(timeout, False):
            self._closed().wait()
            return True
        return False

    def _finish(self):
        if self._finished:
            return
        self._finished = True
        _open.discard(self)
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        if self._writer is not None and self._writer is not eventlet.getcurrent():
            self._writer.kill()
            self._writer = None
        self._queue = None
        self._queued = 0
        try:
            self._raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.socket.close()
        except OSError:
            pass
        if self._closed_event is not None and not self._closed_event.ready():
            self._closed_event.send(True)
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("close callback %r failed", callback)

    # Keepalive and idle timeout: one hub timer per connection; a short-lived
    # green thread runs each check, because timer callbacks must not block
    # the hub.

    def _pings(self):
        return self.ping_interval is not None and self.draft == "rfc6455"

    def _schedule_keepalive(self):
        delays = []
        if self._pings():
            delays.append(self.ping_interval)
            if self._awaiting_pong_since is not None:
                delays.append(self.ping_timeout)
        if self.idle_timeout is not None:
            idle_left = self._last_message + self.idle_timeout - time.monotonic()
            delays.append(max(idle_left, 0.0))
        if not delays:
            return
        self._ping_timer = hubs.get_hub().schedule_call_global(
            min(delays), eventlet.spawn_n, self._keepalive
        )

    def _keepalive(self):
        self._ping_timer = None
        if self.closed:
            return
        now = time.monotonic()
        if (
            self.idle_timeout is not None
            and now - self._last_message >= self.idle_timeout
        ):
            log.debug("%s: no message in %ss, closing", self, self.idle_timeout)
            self.close(IDLE_CLOSE_CODE, "idle timeout")
            return
        if self._pings():
            if self._awaiting_pong_since is not None:
                if now - self._awaiting_pong_since >= self.ping_timeout:
                    log.debug("%s: no answer to a ping in %ss", self, self.ping_timeout)
                    self._local_close_code = 1006
                    self.abort()
                    return
            elif now - self._last_received >= self.ping_interval:
                self.protocol.send_ping(b"")
                self._write(self.protocol.data_to_send())
                self._awaiting_pong_since = now
        self._schedule_keepalive()

    def __repr__(self):
        peer = self.environ.get("REMOTE_ADDR", "?")
        state = "closed" if self.closed else "open"
        return f"<WebSocket {self.draft} {peer} {self.path or '/'} {state}>"
