"""The WebSocket connection state machine, server side, without I/O.

:class:`ServerProtocol` takes received bytes (:meth:`~ServerProtocol.
receive_data`) and returns events (:meth:`~ServerProtocol.events_received`)
and bytes to write (:meth:`~ServerProtocol.data_to_send`). It speaks RFC 6455
(with permessage-deflate when negotiated) and the hixie-75 and hixie-76
drafts, as the connection's :class:`~stargate.frames.WireFormat` says.

The driver's loop::

    protocol.receive_data(sock.recv(65536))   # or receive_eof() on b""
    sock.sendall(protocol.data_to_send())
    for event in protocol.events_received():
        ...
    if protocol.should_close_transport:
        sock.close()

``receive_data`` never raises. A peer that breaks the rules gets a close
frame with the matching code (1002 framing, 1007 bad UTF-8, 1009 too big),
the error is kept in :attr:`ServerProtocol.error`, and
:attr:`~ServerProtocol.should_close_transport` becomes true.
"""

import codecs
import dataclasses
import enum
from typing import Union

from stargate import deflate as _deflate
from stargate import frames as _frames
from stargate import legacy as _legacy
from stargate.exceptions import (
    ConnectionClosed,
    InvalidPayload,
    PayloadTooBig,
    ProtocolError,
)

__all__ = [
    "State",
    "TextMessage",
    "BinaryMessage",
    "Ping",
    "Pong",
    "CloseReceived",
    "CloseStatus",
    "ServerProtocol",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "FRAGMENT_OVERHEAD",
]

#: Largest message accepted, in bytes (after decompression): 1 MiB, enough
#: for chat and notifications while bounding memory per connection.
DEFAULT_MAX_MESSAGE_SIZE = 2**20

#: Bytes each continuation frame costs against ``max_message_size`` on top
#: of its payload. A fragment costs the server work (and, without this
#: charge, an empty one costs the client nothing to send), so a message may
#: have at most ``max_message_size // 64`` fragments: an endless run of
#: empty continuation frames is closed with 1009 instead of being processed
#: forever. Real clients fragment in kilobytes, where 64 bytes is noise.
FRAGMENT_OVERHEAD = 64


class State(enum.Enum):
    """Where a connection is in its life.

    ``OPEN`` until a close frame is sent; ``CLOSING`` while waiting for the
    peer's close frame; ``CLOSED`` once the closing handshake completed, the
    connection failed, or the peer went away. ``CLOSED`` is exactly when
    :attr:`ServerProtocol.should_close_transport` is true.
    """

    OPEN = 1
    CLOSING = 2
    CLOSED = 3


@dataclasses.dataclass(frozen=True)
class TextMessage:
    """A complete text message."""

    data: str


@dataclasses.dataclass(frozen=True)
class BinaryMessage:
    """A complete binary message."""

    data: bytes


@dataclasses.dataclass(frozen=True)
class Ping:
    """A ping; the protocol has already queued the pong."""

    data: bytes


@dataclasses.dataclass(frozen=True)
class Pong:
    """A pong, solicited or not."""

    data: bytes


@dataclasses.dataclass(frozen=True)
class CloseReceived:
    """The peer's close frame. ``code`` is 1005 when it carried none.

    The protocol has already queued its own close frame in reply.
    """

    code: int
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class CloseStatus:
    """A close frame's content: ``code`` (``None``: empty body) and ``reason``."""

    code: "int | None"
    reason: str = ""


#: What :meth:`ServerProtocol.events_received` returns.
Event = Union[TextMessage, BinaryMessage, Ping, Pong, CloseReceived]

_MESSAGES = (TextMessage, BinaryMessage)

_new_utf8_decoder = codecs.getincrementaldecoder("utf-8")
_utf8_decode = codecs.utf_8_decode

_CONT, _TEXT, _BINARY = 0x0, 0x1, 0x2
_CLOSE, _PING, _PONG = 0x8, 0x9, 0xA


def _compressed_budget(size: int) -> int:
    # Wire size allowed for a compressed message of at most ``size`` bytes:
    # deflate may expand incompressible data slightly (stored blocks,
    # flushes). The decompressed size is checked exactly by Decompressor.
    return size + (size >> 3) + 1024


class ServerProtocol:
    """Server side of one WebSocket connection, bytes in, events out.

    ``wire_format`` (a :class:`~stargate.frames.WireFormat`) gives the draft
    and the negotiated permessage-deflate parameters. ``max_message_size``
    limits a received message in bytes (decompressed; ``None``: no limit);
    a bigger one fails the connection with 1009 as soon as a frame header
    announces it. For hixie drafts it bounds a text frame still waiting for
    its ``0xFF``.

    Besides the design's API, the driver may use :attr:`wire_format`,
    :attr:`close_expected` (a close was sent and the peer's is awaited:
    apply the close timeout) and :attr:`error`.
    """

    def __init__(
        self,
        wire_format: _frames.WireFormat = _frames.WireFormat(),
        *,
        max_message_size: "int | None" = DEFAULT_MAX_MESSAGE_SIZE,
        deliver_before_failing: bool = False,
    ) -> None:
        self.wire_format = wire_format.canonical()
        self.deliver_before_failing = deliver_before_failing
        # A protocol error held back until the messages received before it
        # are handled (see apply_pending_failure).
        self._pending_failure: ProtocolError | None = None
        self.max_message_size = max_message_size
        self._hixie = wire_format.draft != "rfc6455"
        params = wire_format.deflate
        self._parser: _frames.FrameParser | _legacy.HixieParser
        if self._hixie:
            self._parser = _legacy.HixieParser()
        else:
            self._parser = _frames.FrameParser(
                require_mask=True, allow_rsv1=params is not None
            )
        self._decompressor = (
            None if params is None else _deflate.Decompressor(params, max_message_size)
        )
        #: The :class:`~stargate.exceptions.ProtocolError` that failed the
        #: connection, or ``None``.
        self.error: ProtocolError | None = None
        self._events: list[Event] = []
        self._output: list[bytes] = []
        self._close_sent: CloseStatus | None = None
        self._close_received: CloseStatus | None = None
        self._closed = False
        # Message being reassembled.
        self._msg_opcode: int | None = None
        self._msg_compressed = False
        self._msg_buf: bytearray | bytes = b""
        self._msg_size = 0  # payload bytes plus FRAGMENT_OVERHEAD per fragment
        self._msg_wire_size = 0
        self._msg_decoder: codecs.IncrementalDecoder | None = None
        # UTF-8 check of a text frame still arriving: the bytes of a
        # character not complete yet (None: no check under way) and how many
        # of the frame's payload bytes were checked.
        self._partial_left: bytes | None = None
        self._partial_checked = 0
        # The pong owed to the peer's latest ping (RFC 6455 5.5.3 lets an
        # endpoint answer only the most recent of several pings), so a
        # flood of pings queues one pong, not one per ping.
        self._pong: bytes | None = None

    # ------------------------------------------------------------ properties

    @property
    def state(self) -> State:
        """The :class:`State`."""
        if self._closed:
            return State.CLOSED
        if self._close_sent is not None:
            return State.CLOSING
        return State.OPEN

    @property
    def close_sent(self) -> "CloseStatus | None":
        """The :class:`CloseStatus` we sent (truthy), or ``None``."""
        return self._close_sent

    @property
    def close_received(self) -> "CloseStatus | None":
        """The :class:`CloseStatus` the peer sent (truthy), or ``None``.

        Its ``code`` is 1005 when the peer's close frame had no code.
        """
        return self._close_received

    @property
    def close_code(self) -> "int | None":
        """The peer's close code; 1006 if the connection ended without one.

        ``None`` while the connection is neither closed nor closing by the
        peer.
        """
        if self._close_received is not None:
            return self._close_received.code
        if self._closed:
            return 1006
        return None

    @property
    def close_reason(self) -> "str | None":
        """The peer's close reason; ``None`` exactly when :attr:`close_code` is.

        ``""`` when the peer gave none or the connection ended without one.
        """
        if self._close_received is not None:
            return self._close_received.reason
        if self._closed:
            return ""
        return None

    @property
    def should_close_transport(self) -> bool:
        """True once the driver should close the TCP connection.

        After the closing handshake completed (the server closes the TCP
        connection first, RFC 6455 7.1.1), after :meth:`fail` or a protocol
        error, after end of file, and after :meth:`send_close` on hixie-75,
        which has no closing handshake. Write :meth:`data_to_send` first;
        after a failure, shutting down the write side and draining what the
        peer still sends before closing avoids a TCP reset that could
        discard the close frame.
        """
        return self._closed

    @property
    def held_bytes(self) -> int:
        """Bytes received and held: those not parsed yet (a frame still
        arriving) plus the fragments of the message being reassembled.

        With a ``max_message_size`` of *n* it never exceeds
        ``n + n // 8 + 1024 + 14`` (the slack is a compressed frame's
        allowance for deflate's expansion, and a frame header), whatever
        the client sends; the table in ``docs/topics/limits.rst`` gives the
        figures measured. Delivering a message copies it once more into its
        ``str`` or ``bytes``, which the application then owns.
        """
        return self._parser.buffered + len(self._msg_buf)

    @property
    def close_expected(self) -> bool:
        """True while our close frame is sent and the peer's is awaited."""
        return self._close_sent is not None and not self._closed

    # ------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> None:
        """Process bytes received from the peer. Never raises."""
        if self._closed or not data:
            return
        if self._pending_failure is not None:
            self.apply_pending_failure()  # more bytes after a bad frame
            return
        try:
            self._parser.feed(data)
            if self._hixie:
                self._process_hixie()
            else:
                self._process()
        except ProtocolError as exc:
            if self.deliver_before_failing and any(
                type(event) in _MESSAGES for event in self._events
            ):
                self._pending_failure = exc
                self._parser.clear()  # nothing after the bad frame counts
                return
            self._fail_with(exc)
        except Exception as exc:  # a bug here must not kill the driver
            self._fail_with(ProtocolError(f"internal error: {exc!r}", 1011))
        if self._closed:
            self._parser.clear()  # nothing more will be parsed

    def receive_eof(self) -> None:
        """The peer closed its end of the TCP connection. Never raises."""
        if self._closed:
            return
        if self._pending_failure is not None:
            self.error = self._pending_failure
            self._pending_failure = None
        self._closed = True
        self._reset_message()
        self._parser.clear()

    @property
    def failure_pending(self) -> bool:
        """True while a protocol error waits for the messages before it.

        Only with ``deliver_before_failing``: when a bad frame follows
        valid messages not yet taken by :meth:`events_received`, those
        messages are delivered first and the connection stays open, so the
        application can handle them (and answer, as RFC 6455 test suites
        expect of an echo server); the driver then calls
        :meth:`apply_pending_failure` once the application has handled them,
        instead of reading more. Further data applies it at once.
        """
        return self._pending_failure is not None

    def apply_pending_failure(self) -> None:
        """Fail the connection with the held-back error (close code and all);
        a no-op when none is pending. Never raises."""
        exc = self._pending_failure
        if exc is not None:
            self._pending_failure = None
            self._fail_with(exc)

    def events_received(self) -> "list[Event]":
        """Return and forget the events received so far."""
        events = self._events
        self._events = []
        return events

    def data_to_send(self) -> bytes:
        """Return and forget the bytes to write to the peer."""
        output = self._output
        pong = self._pong
        if pong is not None:
            # Before anything queued after it, our close frame included.
            self._pong = None
            output.insert(0, b"\x8a" + bytes((len(pong),)) + pong)
        if not output:
            return b""
        self._output = []
        return b"".join(output)

    def _process(self) -> None:
        parser: _frames.FrameParser = self._parser  # type: ignore[assignment]
        limit = self.max_message_size
        first_rsv1_limit = None if limit is None else _compressed_budget(limit)
        events = self._events
        while not self._closed:
            # The payload budget of the next data frame.
            if limit is None:
                frame_limit = rsv1_limit = None
            elif self._msg_opcode is None:
                frame_limit = limit
                rsv1_limit = first_rsv1_limit
            elif self._msg_compressed:
                # The whole message's wire budget, and no more than the
                # decompressed room left could need: so the frame buffered
                # plus the message so far stay within held_bytes' bound.
                room = max(limit - self._msg_size - FRAGMENT_OVERHEAD, 0)
                frame_limit = rsv1_limit = min(
                    _compressed_budget(limit) - self._msg_wire_size,
                    _compressed_budget(room),
                )
            else:
                # Clamped at 0 so an empty continuation reaches _data_frame,
                # which names the fragment overhead when it fails.
                frame_limit = rsv1_limit = max(
                    limit - self._msg_size - FRAGMENT_OVERHEAD, 0
                )
            parsed = parser.next_parsed(frame_limit, rsv1_limit)
            if not parsed:
                if parsed is False:  # part of a frame has arrived
                    self._check_partial_text()
                return
            if self._partial_left is not None:
                self._checked_frame(*parsed)
                continue
            opcode, payload, fin, rsv1 = parsed
            if opcode < 0x8:
                if self._close_sent is not None:
                    continue  # data after our close frame is ignored
                if fin and opcode and self._msg_opcode is None and not rsv1:
                    # Fast path: a whole uncompressed message in one frame.
                    if opcode == _TEXT:
                        try:
                            text = payload.decode("utf-8")
                        except UnicodeDecodeError:
                            raise InvalidPayload("text message is not UTF-8") from None
                        events.append(TextMessage(text))
                    else:
                        events.append(BinaryMessage(payload))
                    continue
                self._data_frame(opcode, payload, fin, rsv1)
            elif opcode == _CLOSE:
                self._receive_close(payload)
            elif opcode == _PING:
                if self._close_sent is None:
                    self._pong = payload
                events.append(Ping(payload))
            else:
                events.append(Pong(payload))

    def _check_partial_text(self) -> None:
        # Fail fast on invalid UTF-8 inside a text frame that has not all
        # arrived (RFC 6455 8.1), rather than when its last byte does.
        # Validation only: keeping the text would hold the frame twice while
        # it arrives (bytes and str); it is decoded once, on completion.
        parser: _frames.FrameParser = self._parser  # type: ignore[assignment]
        pending = parser.pending_payload(self._partial_checked)
        if pending is None or self._close_sent is not None:
            return
        opcode, fin, rsv1, data = pending
        if rsv1 or not data:
            return
        left = self._partial_left
        if left is None:
            if opcode == _TEXT and self._msg_opcode is None:
                left = b""
            elif (
                opcode == _CONT
                and self._msg_decoder is not None  # a text message
                and not self._msg_compressed
            ):
                left = self._msg_decoder.getstate()[0]
            else:
                return
        if left:
            data = left + data
        try:
            consumed = _utf8_decode(data, "strict", False)[1]
        except UnicodeDecodeError:
            raise InvalidPayload("text message is not UTF-8") from None
        self._partial_left = data[consumed:]
        self._partial_checked += len(data) - len(left)

    def _checked_frame(
        self, opcode: int, payload: bytes, fin: bool, rsv1: bool
    ) -> None:
        # The rest of a frame _check_partial_text began to validate.
        left = self._partial_left
        checked = self._partial_checked
        self._partial_left = None
        self._partial_checked = 0
        if self._close_sent is not None:
            return  # data after our close frame is ignored
        if fin and opcode == _TEXT:  # a whole message: decode it, once
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidPayload("text message is not UTF-8") from None
            self._events.append(TextMessage(text))
            return
        rest = (left or b"") + payload[checked:]
        try:
            consumed = _utf8_decode(rest, "strict", fin)[1]
        except UnicodeDecodeError:
            raise InvalidPayload("text message is not UTF-8") from None
        self._data_frame(opcode, payload, fin, rsv1, checked_left=rest[consumed:])

    def _data_frame(
        self,
        opcode: int,
        payload: "bytes | bytearray",
        fin: bool,
        rsv1: bool,
        checked_left: "bytes | None" = None,
    ) -> None:
        # A fragmented message is kept as one bytearray: its memory is its
        # size (plus the bytearray's growth margin), never one object per
        # fragment, and text is validated as each fragment arrives.
        limit = self.max_message_size
        if opcode == _CONT:
            if self._msg_opcode is None:
                raise ProtocolError("continuation frame without a message")
            self._msg_size += FRAGMENT_OVERHEAD
        else:
            if self._msg_opcode is not None:
                raise ProtocolError("new data frame inside a fragmented message")
            self._msg_opcode = opcode
            self._msg_compressed = rsv1
            self._msg_buf = bytearray()
            if opcode == _TEXT:
                self._msg_decoder = _new_utf8_decoder()
        if self._msg_compressed:
            self._msg_wire_size += len(payload)
            payload = self._decompressor.decompress(payload, fin)  # type: ignore[union-attr]
        self._msg_size += len(payload)
        if limit is not None and self._msg_size > limit:
            raise PayloadTooBig(
                f"message over the limit of {limit} bytes (each continuation "
                f"frame counts {FRAGMENT_OVERHEAD} bytes besides its payload)"
            )
        buf = self._msg_buf
        if fin and not buf:
            # The whole message is this payload: decode it once, no copy.
            opcode = self._msg_opcode
            self._reset_message()
            self._events.append(_message(opcode, payload))
            return
        if self._msg_decoder is None:
            pass  # a binary message
        elif checked_left is not None:
            # Validated as it arrived: only the decoder's state moves on.
            self._msg_decoder.setstate((checked_left, 0))
        else:
            try:
                self._msg_decoder.decode(payload, fin)  # validation only
            except UnicodeDecodeError:
                raise InvalidPayload("text message is not UTF-8") from None
        if not buf and type(payload) is bytearray:
            buf = self._msg_buf = payload  # decompressed: adopt, not copy
        else:
            buf += payload
        if fin:
            opcode = self._msg_opcode
            self._reset_message()
            self._events.append(_message(opcode, buf))

    def _reset_message(self) -> None:
        self._msg_opcode = None
        self._msg_compressed = False
        self._msg_buf = b""
        self._msg_size = 0
        self._msg_wire_size = 0
        self._msg_decoder = None

    def _receive_close(self, payload: bytes) -> None:
        code, reason = _frames.parse_close(payload)
        self._close_received = CloseStatus(code, reason)
        if self._close_sent is None:
            # Echo the peer's code; an empty close gets an empty close.
            self._queue_close(None if code == 1005 else code, reason)
        self._closed = True
        self._reset_message()
        self._events.append(CloseReceived(code, reason))

    def _process_hixie(self) -> None:
        parser: _legacy.HixieParser = self._parser  # type: ignore[assignment]
        while not self._closed:
            parsed = parser.next_parsed(self.max_message_size)
            if parsed is None:
                return
            opcode, payload = parsed
            if opcode == _CLOSE:
                self._close_received = CloseStatus(1005, "")
                if self._close_sent is None:
                    self._queue_close(None, "")
                self._closed = True
                self._events.append(CloseReceived(1005, ""))
            elif self._close_sent is None:
                try:
                    text = payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidPayload("text frame is not UTF-8") from None
                self._events.append(TextMessage(text))

    # ------------------------------------------------------------ sending

    def _check_open(self) -> None:
        if self._closed or self._close_sent is not None:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason or "")

    def send_message(self, message: "str | _frames.BytesLike") -> None:
        """Queue a ``str`` (text) or ``bytes`` (binary) message.

        Raises :class:`~stargate.exceptions.ConnectionClosed` once a close
        frame was sent or received, :class:`TypeError` for other types.
        """
        self._check_open()
        self._output.append(_frames.encode_message(message, self.wire_format))

    def _control(self, opcode: int, data: "str | _frames.BytesLike") -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        data = bytes(data)
        if len(data) > _frames.MAX_CONTROL_PAYLOAD:
            raise ValueError(f"control frame payload of {len(data)} bytes, over 125")
        self._output.append(bytes((0x80 | opcode, len(data))) + data)

    def send_ping(self, data: "str | _frames.BytesLike" = b"") -> bool:
        """Queue a ping; return ``True``. Hixie drafts have no ping: ``False``.

        Raises :class:`~stargate.exceptions.ConnectionClosed` once closing
        and :class:`ValueError` for a payload over 125 bytes.
        """
        self._check_open()
        if self._hixie:
            return False
        self._control(_PING, data)
        return True

    def send_pong(self, data: "str | _frames.BytesLike" = b"") -> bool:
        """Queue an unsolicited pong; return ``True`` (``False`` on hixie)."""
        self._check_open()
        if self._hixie:
            return False
        self._control(_PONG, data)
        return True

    def send_close(self, code: "int | None" = 1000, reason: str = "") -> None:
        """Start the closing handshake; a no-op once a close frame was sent.

        ``code=None`` sends a close frame without a status. Raises
        :class:`ValueError` for a code that may not be sent or a reason over
        123 bytes. On hixie-76 this sends ``0xFF 0x00``; hixie-75 has no
        closing handshake, so the transport should simply close.
        """
        if self._close_sent is not None or self._closed:
            return
        _frames.serialize_close(code, reason)  # validate before changing state
        self._queue_close(code, reason)
        if self.wire_format.draft == "hixie-75":
            self._closed = True
            self._parser.clear()

    def fail(self, code: "int | None", reason: "str | None" = "") -> None:
        """Fail the connection: send a close frame if none was sent yet, and
        close the transport without waiting for the peer's reply.

        Drivers use it for timeouts (e.g. 1011) or shutdown (1001). An
        unsendable ``code`` is replaced by 1011; ``code=None`` sends a close
        frame without a status, so ``reason`` is then dropped (a close body
        cannot carry a reason without a code). Never raises.
        """
        self._pending_failure = None
        if self._closed:
            return
        if self._close_sent is None:
            if code is None:
                reason = ""
            elif not isinstance(code, int) or not _frames.is_valid_close_code(code):
                code = 1011
            reason = _truncate_reason(reason)
            self._queue_close(code, reason)
        self._closed = True
        self._reset_message()
        self._parser.clear()

    def _fail_with(self, exc: ProtocolError) -> None:
        self.error = exc
        self.fail(exc.close_code, exc.reason)

    def _queue_close(self, code: "int | None", reason: str) -> None:
        self._close_sent = CloseStatus(code, reason)
        draft = self.wire_format.draft
        if draft == "rfc6455":
            body = _frames.serialize_close(code, reason)
            self._output.append(bytes((0x88, len(body))) + body)
        elif draft == "hixie-76":
            self._output.append(_legacy.HIXIE_CLOSE)


def _message(
    opcode: "int | None", data: "bytes | bytearray"
) -> "TextMessage | BinaryMessage":
    """The event for a complete message's ``data`` (any bytes-like)."""
    if opcode == _TEXT:
        try:
            return TextMessage(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidPayload("text message is not UTF-8") from None
    return BinaryMessage(bytes(data))


def _truncate_reason(reason: "str | None") -> str:
    if not reason:
        return ""
    data = str(reason).encode("utf-8")
    if len(data) <= 123:
        return reason
    return data[:123].decode("utf-8", "ignore")
