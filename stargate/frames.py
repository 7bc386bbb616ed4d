"""WebSocket framing without I/O: RFC 6455 frames, the hixie drafts, masking.

Bytes go in, frames come out; nothing here reads or writes a socket.

* :class:`Frame` and :class:`Opcode` describe one RFC 6455 frame;
  :func:`serialize_frame` turns it into bytes and :class:`FrameParser` turns
  bytes, arriving in pieces of any size, back into frames, checking the
  framing rules a server must enforce (reserved bits, opcodes, control frame
  limits, client masking, the size limit announced by the header).
* :func:`parse_close` and :func:`serialize_close` handle close frame bodies.
* :class:`HixieParser` and :func:`encode_hixie_text` /
  :func:`encode_hixie_binary` handle drafts hixie-75 and hixie-76.
* :class:`WireFormat` names how messages are put on the wire for one
  connection and :func:`encode_message` produces the complete bytes of one
  message for it. ``encode_message`` is a pure function of its arguments, so
  a broadcaster may encode once per wire format and write the same bytes to
  every listener.
"""

import dataclasses
import enum
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Union

from stargate import deflate as _deflate
from stargate.exceptions import InvalidPayload, PayloadTooBig, ProtocolError

if TYPE_CHECKING:
    from stargate.legacy import (
        HIXIE_CLOSE,
        HixieParser,
        encode_hixie_binary,
        encode_hixie_text,
    )

__all__ = [
    "Opcode",
    "Frame",
    "FrameParser",
    "HixieParser",
    "WireFormat",
    "DRAFTS",
    "HIXIE_CLOSE",
    "apply_mask",
    "serialize_frame",
    "parse_close",
    "serialize_close",
    "is_valid_close_code",
    "encode_hixie_text",
    "encode_hixie_binary",
    "encode_message",
]


#: What the masking and encoding functions accept: any bytes-like object.
BytesLike = Union[bytes, bytearray, memoryview]


class Opcode(enum.IntEnum):
    """Frame opcodes defined by RFC 6455 section 5.2."""

    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


_VALID_OPCODES = frozenset(int(op) for op in Opcode)
_DATA_OPCODES = (0x0, 0x1, 0x2)

#: Largest payload of a control frame (RFC 6455 section 5.5).
MAX_CONTROL_PAYLOAD = 125


@dataclasses.dataclass(frozen=True)
class Frame:
    """One RFC 6455 frame. ``payload`` is unmasked."""

    opcode: Opcode
    payload: bytes = b""
    fin: bool = True
    rsv1: bool = False
    rsv2: bool = False
    rsv3: bool = False

    @property
    def is_control(self) -> bool:
        """True for close, ping and pong frames."""
        return self.opcode >= 0x8


# apply_mask XORs short payloads as one big integer and longer ones with
# bytes.translate over the four byte lanes (every 4th byte shares a mask
# byte): both run in C. benchmarks/bench_receive_path.py measured the
# crossover near 512 bytes; at 64 KiB translate is ~1.6x faster.
_TRANSLATE_FROM = 512
_XOR_TABLES = [bytes(b ^ m for b in range(256)) for m in range(256)]


def apply_mask(data: BytesLike, mask: BytesLike) -> bytes:
    """Return ``data`` XOR-ed with the repeated 4-byte ``mask`` as ``bytes``.

    Masking and unmasking are the same operation. It runs in C when the
    optional ``stargate._speedups`` extension was built, else in Python
    (:func:`apply_mask_python`).
    """
    if type(mask) is not bytes:
        mask = _byte_string(mask)
    if len(mask) != 4:
        raise ValueError(f"mask must be 4 bytes, got {len(mask)}")
    if _apply_mask_c is not None and (
        type(data) is not memoryview or data.c_contiguous
    ):
        return _apply_mask_c(data, mask)
    return apply_mask_python(data, mask)


def _byte_string(data: BytesLike) -> "bytes | bytearray":
    # Any buffer as the bytes it holds: an array("H") or a memoryview cast
    # to "I" has fewer items than bytes, and a strided view is gathered.
    # (The C speedup reads every buffer as its raw bytes too.)
    if type(data) is bytes or type(data) is bytearray:
        return data
    return memoryview(data).tobytes()


def apply_mask_python(data: BytesLike, mask: BytesLike) -> bytes:
    """:func:`apply_mask` without the C speedup. No per-byte Python loop:
    payloads under 512 bytes are XOR-ed as one big integer
    (``int.from_bytes``), longer ones lane by lane with ``bytes.translate``.
    """
    mask = _byte_string(mask)
    if len(mask) != 4:
        raise ValueError(f"mask must be 4 bytes, got {len(mask)}")
    data = _byte_string(data)
    n = len(data)
    if not n:
        return b""
    if n < _TRANSLATE_FROM:
        if type(mask) is not bytes:
            mask = bytes(mask)
        key = mask * (n >> 2) + mask[: n & 3]
        return (
            int.from_bytes(data, "little") ^ int.from_bytes(key, "little")
        ).to_bytes(n, "little")
    out = bytearray(data)
    tables = _XOR_TABLES
    out[0::4] = out[0::4].translate(tables[mask[0]])
    out[1::4] = out[1::4].translate(tables[mask[1]])
    out[2::4] = out[2::4].translate(tables[mask[2]])
    out[3::4] = out[3::4].translate(tables[mask[3]])
    return bytes(out)


try:
    from stargate._speedups import apply_mask as _speedup
except ImportError:  # not built: the pure Python version is used
    _speedup = None
_apply_mask_c: "Callable[[BytesLike, BytesLike], bytes] | None" = _speedup


# Payloads from this size up are unmasked through a memoryview of the
# receive buffer rather than a copy of their bytes.
_VIEW_FROM = 4096


def _header(first_byte: int, length: int, mask_bit: int = 0) -> bytes:
    if length < 126:
        return bytes((first_byte, mask_bit | length))
    if length < 0x10000:
        return struct.pack("!BBH", first_byte, mask_bit | 126, length)
    return struct.pack("!BBQ", first_byte, mask_bit | 127, length)


def serialize_frame(frame: Frame, mask: "BytesLike | None" = None) -> bytes:
    """Return the bytes of ``frame``; masked with the 4-byte ``mask`` if given.

    Lengths use the shortest of the 7, 16 and 64-bit encodings. A server
    never masks (``mask=None``); clients, and tests playing one, do.
    """
    first = (
        (0x80 if frame.fin else 0)
        | (0x40 if frame.rsv1 else 0)
        | (0x20 if frame.rsv2 else 0)
        | (0x10 if frame.rsv3 else 0)
        | int(frame.opcode)
    )
    payload = frame.payload
    if mask is None:
        return _header(first, len(payload)) + bytes(payload)
    mask = bytes(mask)
    return _header(first, len(payload), 0x80) + mask + apply_mask(payload, mask)


class FrameParser:
    """Incremental RFC 6455 frame parser for the server side.

    :meth:`feed` it bytes as they arrive, then call :meth:`next_frame` until
    it returns ``None`` (more bytes needed). ``next_frame`` raises
    :class:`~stargate.exceptions.ProtocolError` (close code 1002) for:

    * RSV2 or RSV3 set (no negotiated extension defines them);
    * RSV1 set unless ``allow_rsv1`` (permessage-deflate was negotiated), and
      RSV1 on anything but a text or binary frame even then;
    * an opcode RFC 6455 does not define (3-7, 11-15);
    * a control frame that is fragmented or carries more than 125 bytes;
    * an unmasked frame when ``require_mask`` (client frames must be masked);
    * a 64-bit length with the most significant bit set.

    and :class:`~stargate.exceptions.PayloadTooBig` (1009) as soon as a data
    frame header announces a payload over the limit given to ``next_frame``,
    before any of that payload is buffered. Lengths that are not minimally
    encoded are accepted (RFC 6455 puts that duty on the sender).

    Message-level rules (continuations, UTF-8, message size across
    fragments) belong to :class:`stargate.protocol.ServerProtocol`.
    """

    __slots__ = ("_buf", "_pos", "require_mask", "allow_rsv1")

    def __init__(self, *, require_mask: bool = True, allow_rsv1: bool = False) -> None:
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self.require_mask = require_mask
        self.allow_rsv1 = allow_rsv1

    def feed(self, data: BytesLike) -> None:
        """Append received bytes."""
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
            return
        if type(buf) is not bytearray:
            buf = bytearray(buf[pos:])
        elif pos:
            del buf[:pos]
        buf += data
        self._buf = buf
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Number of received bytes not yet returned as frames."""
        return len(self._buf) - self._pos

    def clear(self) -> None:
        """Forget the bytes not parsed yet: the connection is closed."""
        self._buf = b""
        self._pos = 0

    def next_frame(
        self, max_size: "int | None" = None, max_rsv1_size: "int | None" = None
    ) -> "Frame | None":
        """Return the next complete :class:`Frame`, or ``None``.

        ``max_size`` limits the payload of a data frame, ``max_rsv1_size``
        that of a data frame with RSV1 set (a compressed frame, whose wire
        size is not its message size); ``None`` means no limit.
        """
        parsed = self.next_parsed(max_size, max_rsv1_size)
        if not parsed:
            return None
        opcode, payload, fin, rsv1 = parsed
        return Frame(Opcode(opcode), payload, fin, rsv1)

    def _more(self) -> None:
        # More bytes are needed: keep only what is not parsed yet, so a large
        # frame already returned is not held until the next feed().
        if self._pos:
            self._buf = self._buf[self._pos :]
            self._pos = 0

    def next_parsed(
        self, max_size: "int | None", max_rsv1_size: "int | None"
    ) -> "tuple[int, bytes, bool, bool] | Literal[False] | None":
        """:meth:`next_frame` without building a :class:`Frame`, for the
        receive path: ``(opcode, payload, fin, rsv1)`` as plain values;
        ``None`` when every byte was parsed, ``False`` when part of a frame
        has arrived (see :meth:`pending_payload`). Raises as ``next_frame``.
        """
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < 2:
            if not avail:
                if pos:
                    self._buf = b""  # all parsed: let go of the bytes
                    self._pos = 0
                return None
            self._more()
            return False
        b0 = buf[pos]
        b1 = buf[pos + 1]
        opcode = b0 & 0x0F
        if b0 & 0x30:
            raise ProtocolError("reserved bit RSV2 or RSV3 set")
        rsv1 = bool(b0 & 0x40)
        if opcode not in _VALID_OPCODES:
            raise ProtocolError(f"unknown opcode {opcode}")
        fin = bool(b0 & 0x80)
        length = b1 & 0x7F
        if opcode & 0x08:
            if rsv1:
                raise ProtocolError("reserved bit RSV1 set on a control frame")
            if not fin:
                raise ProtocolError("fragmented control frame")
            if length > MAX_CONTROL_PAYLOAD:
                raise ProtocolError("control frame payload over 125 bytes")
        elif rsv1:
            if not self.allow_rsv1:
                raise ProtocolError("reserved bit RSV1 set without an extension")
            if opcode == 0:
                raise ProtocolError("reserved bit RSV1 set on a continuation frame")
        masked = b1 & 0x80
        if not masked and self.require_mask:
            raise ProtocolError("client frame is not masked")
        start = pos + 2
        if length == 126:
            if avail < 4:
                self._more()
                return False
            length = (buf[pos + 2] << 8) | buf[pos + 3]
            start = pos + 4
        elif length == 127:
            if avail < 10:
                self._more()
                return False
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            if length >> 63:
                raise ProtocolError("64-bit payload length has its top bit set")
            start = pos + 10
        if not opcode & 0x08:
            limit = max_rsv1_size if rsv1 else max_size
            if limit is not None and length > limit:
                raise PayloadTooBig(
                    f"frame of {length} bytes is over the limit of {limit} bytes"
                )
        if masked:
            start += 4
        end = start + length
        if end > len(buf):
            self._more()
            return False
        if masked:
            if length < _VIEW_FROM:
                payload = apply_mask(buf[start:end], buf[start - 4 : start])
            else:  # unmask from the buffer itself, not from a copy of it
                with memoryview(buf) as view:
                    mask = bytes(view[start - 4 : start])
                    payload = apply_mask(view[start:end], mask)
        else:
            payload = bytes(buf[start:end])
        if end == len(buf):
            # All parsed: let go of the received bytes before the caller
            # turns the payload into a message (a third copy of it).
            self._buf = b""
            self._pos = 0
        else:
            self._pos = end
        return opcode, payload, fin, rsv1

    def pending_payload(self, skip: int = 0) -> "tuple[int, bool, bool, bytes] | None":
        """The arrived part of an incomplete data frame's payload.

        After :meth:`next_frame` returned ``None``: if the buffer starts
        with the complete header of a text, binary or continuation frame
        whose payload has not all arrived, return ``(opcode, fin, rsv1,
        data)`` where ``data`` is the unmasked payload from byte ``skip`` to
        what has arrived; else ``None``. Lets the protocol validate UTF-8 while
        a large text frame is still arriving.
        """
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < 2:
            return None
        b0 = buf[pos]
        b1 = buf[pos + 1]
        opcode = b0 & 0x0F
        if opcode & 0x08:
            return None
        length = b1 & 0x7F
        start = pos + 2
        if length == 126:
            start = pos + 4
        elif length == 127:
            start = pos + 10
        masked = b1 & 0x80
        if masked:
            start += 4
        begin = start + skip
        if begin >= len(buf):
            return None
        if masked:
            mask = bytes(buf[start - 4 : start])
            offset = skip & 3
            if offset:
                mask = mask[offset:] + mask[:offset]
            with memoryview(buf) as view:  # no copy of what arrived
                data = apply_mask(view[begin:], mask)
        else:
            data = bytes(buf[begin:])
        return opcode, bool(b0 & 0x80), bool(b0 & 0x40), data


# Close codes (RFC 6455 section 7.4 and the IANA registry).
_VALID_CLOSE_CODES = frozenset(
    [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
)


def is_valid_close_code(code: int) -> bool:
    """Whether ``code`` may appear in a close frame.

    Valid: 1000-1003, 1007-1011, the IANA-registered 1012-1014, and
    3000-4999 (libraries and applications). 1004, 1005, 1006 and 1015 are
    reserved and never sent; everything else is unassigned.
    """
    return code in _VALID_CLOSE_CODES or 3000 <= code <= 4999


def parse_close(payload: BytesLike) -> tuple[int, str]:
    """Return ``(code, reason)`` from the body of a received close frame.

    An empty body gives ``(1005, "")`` (RFC 6455 7.1.5: no status code).
    Raises :class:`~stargate.exceptions.ProtocolError` (1002) for a 1-byte
    body or an invalid code, and :class:`~stargate.exceptions.InvalidPayload`
    (1007) when the reason is not UTF-8.
    """
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise ProtocolError("close frame body of 1 byte")
    code = (payload[0] << 8) | payload[1]
    if not is_valid_close_code(code):
        raise ProtocolError(f"invalid close code {code}")
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPayload("close reason is not valid UTF-8") from None
    return code, reason


def serialize_close(code: "int | None" = 1000, reason: str = "") -> bytes:
    """Return the body of a close frame with ``code`` and ``reason``.

    ``code=None`` gives an empty body (no status code; ``reason`` must then
    be empty). Raises :class:`ValueError` for a code that may not be sent or
    a reason over 123 bytes once encoded as UTF-8.
    """
    if code is None:
        if reason:
            raise ValueError("a close reason needs a close code")
        return b""
    if not isinstance(code, int) or not is_valid_close_code(code):
        raise ValueError(f"invalid close code {code!r}")
    data = reason.encode("utf-8")
    if len(data) > MAX_CONTROL_PAYLOAD - 2:
        raise ValueError(f"close reason is {len(data)} bytes long, over 123")
    return struct.pack("!H", code) + data


# ---------------------------------------------------------------- wire formats

#: The drafts :class:`WireFormat` knows, newest first.
DRAFTS = ("rfc6455", "hixie-76", "hixie-75")


@dataclasses.dataclass(frozen=True)
class WireFormat:
    """How messages are put on the wire for one connection.

    ``draft`` is one of :data:`DRAFTS`; ``deflate`` holds the negotiated
    permessage-deflate parameters (RFC 6455 only) or ``None``. Hashable, so
    it can key a cache of encoded messages.
    """

    draft: str = "rfc6455"
    deflate: "_deflate.DeflateParams | None" = None

    def __post_init__(self) -> None:
        if self.draft not in DRAFTS:
            raise ValueError(f"unknown draft {self.draft!r}, expected one of {DRAFTS}")
        if self.deflate is not None and self.draft != "rfc6455":
            raise ValueError(f"{self.draft} cannot use permessage-deflate")

    @property
    def is_hixie(self) -> bool:
        """True for the hixie-75 and hixie-76 drafts."""
        return self.draft != "rfc6455"

    def canonical(self) -> "WireFormat":
        """The one shared instance equal to this one.

        Connections hold canonical wire formats, so a broadcast can key its
        per-message cache of encoded frames by identity, without hashing a
        dataclass once per listener.
        """
        return _CANONICAL.setdefault(self, self)


_CANONICAL: "dict[WireFormat, WireFormat]" = {}
_RFC6455 = WireFormat().canonical()


def encode_message(
    message: "str | BytesLike", wire_format: WireFormat = _RFC6455
) -> bytes:
    """Return the complete bytes that send ``message`` with ``wire_format``.

    ``str`` is sent as text, ``bytes`` (and ``bytearray``, ``memoryview``)
    as binary, in a single unmasked frame, compressed with RSV1 set when
    ``wire_format.deflate`` is set. Hixie drafts get a ``0x00 ... 0xFF``
    text frame or a ``0x80`` length-prefixed binary frame.

    A pure function of its arguments: callers may cache the result per
    ``(message, wire_format)``. Raises :class:`TypeError` for other types.
    """
    if isinstance(message, str):
        if wire_format.draft != "rfc6455":
            from stargate.legacy import encode_hixie_text

            return encode_hixie_text(message)
        first = 0x81
        payload = message.encode("utf-8")
    elif isinstance(message, (bytes, bytearray, memoryview)):
        if wire_format.draft != "rfc6455":
            from stargate.legacy import encode_hixie_binary

            return encode_hixie_binary(message)
        first = 0x82
        payload = bytes(message)
    else:
        raise TypeError(f"message must be str or bytes, not {type(message).__name__}")
    if wire_format.deflate is not None:
        payload = _deflate.compress(payload, wire_format.deflate)
        first |= 0x40
    return _header(first, len(payload)) + payload


#: Names documented here that live in :mod:`stargate.legacy`.
_LEGACY_NAMES = frozenset(
    ["HixieParser", "HIXIE_CLOSE", "encode_hixie_text", "encode_hixie_binary"]
)


def __getattr__(name: str) -> Any:
    # The hixie drafts' framing is kept apart in stargate.legacy, which
    # imports this module; its documented names are served from there.
    if name in _LEGACY_NAMES:
        from stargate import legacy

        return getattr(legacy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
