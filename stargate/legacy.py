"""The hixie-75 and hixie-76 drafts, without I/O: handshake and framing.

Kept apart from RFC 6455, as websockets keeps its ``legacy`` package: the
drafts predate the standard, no current browser speaks them, and stargate
keeps them for the 2010 clients it served. Their documented names stay
importable from :mod:`stargate.handshake` (``handshake_pre76``,
``handshake_v76``, the base responses) and :mod:`stargate.frames`
(``HixieParser``, ``HIXIE_CLOSE``, ``encode_hixie_text``,
``encode_hixie_binary``).

:func:`~stargate.handshake.negotiate` does the checks every draft shares
and calls :func:`hixie75` or :func:`hixie76`, which return a
:class:`~stargate.handshake.Handshake`.
"""

from __future__ import annotations

import hashlib
import struct

from stargate.exceptions import HandShakeFailed, PayloadTooBig, ProtocolError
from stargate.frames import BytesLike, Frame, Opcode, WireFormat
from stargate.handshake import (
    BaseResponse,
    Handshake,
    HeadersLike,
    Key3,
    RequestHeaders,
    Subprotocols,
    build_location_url,
    header_line,
    response_head,
)

__all__ = [
    "HIXIE76_BASE_RESPONSE",
    "HIXIE75_BASE_RESPONSE",
    "handshake_pre76",
    "handshake_v76",
    "hixie75",
    "hixie76",
    "HIXIE_CLOSE",
    "HixieParser",
    "encode_hixie_text",
    "encode_hixie_binary",
]

#: The status line and the headers every hixie-76 response starts with.
HIXIE76_BASE_RESPONSE = (
    b"HTTP/1.1 101 WebSocket Protocol Handshake\r\n"
    b"Upgrade: WebSocket\r\n"
    b"Connection: Upgrade\r\n"
)
#: The same for hixie-75, whose clients compare these 85 bytes exactly.
HIXIE75_BASE_RESPONSE = (
    b"HTTP/1.1 101 Web Socket Protocol Handshake\r\n"
    b"Upgrade: WebSocket\r\n"
    b"Connection: Upgrade\r\n"
)
_BASE_RESPONSE = {"hixie-76": HIXIE76_BASE_RESPONSE, "hixie-75": HIXIE75_BASE_RESPONSE}
_KEY3 = "the 8 key bytes after the headers"


# -- the handshakes ------------------------------------------------------


def _hixie_origin(headers: RequestHeaders) -> str:
    origin = headers.get("Origin")
    if origin is None or not origin.strip():
        raise HandShakeFailed(
            "the Origin header is missing; the hixie drafts require it",
            header="Origin",
        )
    return origin.strip()


def _hixie_subprotocol(
    headers: RequestHeaders, name: str, subprotocols: Subprotocols
) -> "str | None":
    """The subprotocol to echo: the client's, if ``subprotocols`` allows it.

    The hixie drafts offer one subprotocol and the client fails the
    connection unless the server echoes it. With no ``subprotocols`` the
    client's value is echoed, as the 2010 library did.
    """
    if isinstance(subprotocols, str):
        subprotocols = (subprotocols,)
    protocol = headers.get(name)
    if protocol is None:
        return None
    if not protocol or not all(" " <= char <= "~" for char in protocol):
        raise HandShakeFailed(header=name, value=protocol)
    if subprotocols and protocol not in subprotocols:
        return None
    return protocol


def hixie75(
    headers: HeadersLike,
    base_response: BaseResponse = None,
    *,
    subprotocols: Subprotocols = (),
    secure: "bool | None" = None,
    path: "str | None" = None,
) -> Handshake:
    """:func:`handshake_pre76` as a :class:`~stargate.handshake.Handshake`."""
    return _hixie_handshake(
        "hixie-75",
        "",
        RequestHeaders(headers),
        base_response,
        b"",
        subprotocols,
        secure,
        path,
    )


def _hixie_handshake(
    draft: str,
    prefix: str,
    headers: RequestHeaders,
    base_response: BaseResponse,
    body: bytes,
    subprotocols: Subprotocols,
    secure: "bool | None",
    path: "str | None",
) -> Handshake:
    """The response both drafts share; hixie-76 names its headers with the
    ``Sec-`` ``prefix`` and follows them with its challenge answer (``body``)."""
    origin = _hixie_origin(headers)
    location = build_location_url(headers, secure=secure, path=path)
    protocol_header = f"{prefix}WebSocket-Protocol"
    subprotocol = _hixie_subprotocol(headers, protocol_header, subprotocols)
    response = [
        response_head(base_response, _BASE_RESPONSE[draft]),
        header_line(f"{prefix}WebSocket-Origin", origin),
        header_line(f"{prefix}WebSocket-Location", location),
    ]
    if subprotocol is not None:
        response.append(header_line(protocol_header, subprotocol))
    response.append(b"\r\n")
    response.append(body)
    return Handshake(
        draft=draft,
        response=b"".join(response),
        subprotocol=subprotocol,
        wire_format=WireFormat(draft=draft),
    )


def handshake_pre76(
    headers: HeadersLike,
    base_response: BaseResponse,
    *,
    subprotocols: Subprotocols = (),
    secure: "bool | None" = None,
    path: "str | None" = None,
) -> bytes:
    """The handshake of draft-hixie-thewebsocketprotocol-75.

    Returns ``base_response`` followed by ``WebSocket-Origin`` (the client's
    ``Origin``, which this draft requires), ``WebSocket-Location`` (see
    :func:`~stargate.handshake.build_location_url`, given ``secure`` and
    ``path``), the client's ``WebSocket-Protocol`` when it sent one (and
    ``subprotocols``, if given, holds it), and the blank line. Messages
    follow at once.

    The caller must have checked the method, the HTTP version, ``Upgrade``,
    ``Connection`` and the origin policy
    (:func:`~stargate.handshake.negotiate` does).

    :param headers: the request headers from
        :func:`~stargate.handshake.websocket_handshake`.
    :param base_response: the status line, ``Upgrade`` and ``Connection``
        lines as ``bytes`` ending with CRLF (:data:`HIXIE75_BASE_RESPONSE`,
        what :func:`~stargate.handshake.websocket_handshake` passes; clients
        of this draft compare them byte for byte); a ``str`` is encoded as
        latin-1.
    """
    return hixie75(
        headers,
        base_response,
        subprotocols=subprotocols,
        secure=secure,
        path=path,
    ).response


def _hixie76_key_part(headers: RequestHeaders, name: str) -> int:
    """``key-number / spaces`` of ``Sec-WebSocket-Key1`` or ``-Key2``."""
    key = headers.get(name)
    if key is None:
        raise HandShakeFailed(f"the {name} header is missing", header=name)
    digits = "".join(char for char in key if char in "0123456789").lstrip("0")
    spaces = key.count(" ")
    if not any(char in "0123456789" for char in key):
        raise HandShakeFailed(f"{name} holds no digits", header=name, value=key)
    if spaces == 0:
        raise HandShakeFailed(f"{name} holds no spaces", header=name, value=key)
    # Compare lengths first: a key of thousands of digits must not reach int().
    if len(digits) > 10 or int(digits or "0") > 0xFFFFFFFF:
        raise HandShakeFailed(
            f"the number in {name} is larger than 4294967295", header=name, value=key
        )
    number = int(digits or "0")
    part, remainder = divmod(number, spaces)
    if remainder:
        raise HandShakeFailed(
            f"the number in {name} is not a multiple of its {spaces} spaces",
            header=name,
            value=key,
        )
    return part


def _challenge_response(headers: RequestHeaders, key3: Key3) -> bytes:
    part1 = _hixie76_key_part(headers, "Sec-WebSocket-Key1")
    part2 = _hixie76_key_part(headers, "Sec-WebSocket-Key2")
    if key3 is None:
        raise HandShakeFailed(f"{_KEY3} are missing")
    if not isinstance(key3, (bytes, bytearray, memoryview)):
        raise TypeError(f"key3 must be bytes, not {type(key3).__name__}")
    key3 = bytes(key3)
    if len(key3) != 8:
        raise HandShakeFailed(f"{_KEY3} must be 8 bytes, got {len(key3)}", value=key3)
    return hashlib.md5(struct.pack(">II", part1, part2) + key3).digest()


def hixie76(
    headers: HeadersLike,
    base_response: BaseResponse = None,
    *,
    key3: Key3 = None,
    subprotocols: Subprotocols = (),
    secure: "bool | None" = None,
    path: "str | None" = None,
) -> Handshake:
    """:func:`handshake_v76` as a :class:`~stargate.handshake.Handshake`."""
    request = RequestHeaders(headers)
    answer = _challenge_response(request, key3)
    return _hixie_handshake(
        "hixie-76", "Sec-", request, base_response, answer, subprotocols, secure, path
    )


def handshake_v76(
    headers: HeadersLike,
    base_response: BaseResponse,
    *,
    key3: Key3 = None,
    subprotocols: Subprotocols = (),
    secure: "bool | None" = None,
    path: "str | None" = None,
) -> bytes:
    """The handshake of draft-hixie-thewebsocketprotocol-76.

    ``key3`` is the 8 bytes the client sends after its request headers (no
    ``Content-Length`` announces them: the caller reads them from the
    connection). The answer to the challenge is the MD5 of
    ``Sec-WebSocket-Key1`` and ``-Key2`` (each the number formed by its
    digits divided by its count of spaces, as a 32-bit big-endian integer)
    followed by ``key3``. A malformed key, or ``key3`` missing or not 8 bytes,
    raises :class:`~stargate.exceptions.HandShakeFailed` naming it.

    Returns ``base_response``, ``Sec-WebSocket-Origin``,
    ``Sec-WebSocket-Location``, ``Sec-WebSocket-Protocol`` (echoed as in
    :func:`handshake_pre76`), the blank line and the 16-byte answer. What
    the caller must check, ``headers`` and ``base_response`` are as for
    :func:`handshake_pre76` (here :data:`HIXIE76_BASE_RESPONSE`).
    """
    return hixie76(
        headers,
        base_response,
        key3=key3,
        subprotocols=subprotocols,
        secure=secure,
        path=path,
    ).response


# -- framing ------------------------------------------------------------------

#: The hixie-76 close frame (type 0xFF, length 0).
HIXIE_CLOSE = b"\xff\x00"


def encode_hixie_text(text: str) -> bytes:
    """Return a hixie text frame: ``0x00``, the UTF-8 text, ``0xFF``."""
    return b"\x00" + text.encode("utf-8") + b"\xff"


def _hixie_length(n: int) -> bytes:
    groups = [n & 0x7F]
    n >>= 7
    while n:
        groups.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(groups))


def encode_hixie_binary(data: BytesLike) -> bytes:
    """Return a hixie length-prefixed frame: ``0x80``, the length, the data.

    The length is big-endian in 7-bit groups, the high bit set on every
    group but the last. Browsers of the hixie era discard such frames.
    """
    return b"\x80" + _hixie_length(len(data)) + bytes(data)


class HixieParser:
    """Incremental parser for frames of drafts hixie-75 and hixie-76.

    Frames whose type byte has the high bit clear run to a ``0xFF``
    sentinel; type ``0x00`` is text, others are discarded. Frames whose type
    byte has the high bit set carry a length in 7-bit groups and are
    discarded, except ``0xFF 0x00``, which closes the connection (hixie-76;
    a hixie-75 client never sends it, so it is taken as a close there too).

    :meth:`next_frame` returns a :class:`Frame` with opcode ``TEXT`` (the
    raw UTF-8 payload, not validated here) or ``CLOSE``, or ``None``. It
    raises :class:`~stargate.exceptions.PayloadTooBig` when a text frame
    grows past ``max_size`` before its sentinel arrives, or when a
    length-prefixed frame announces more than ``max_size`` bytes.
    Discarded bytes are dropped as they arrive, never buffered.
    """

    __slots__ = ("_buf", "_scan", "_skip", "_discarding")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan = 1  # where to resume looking for the 0xFF sentinel
        self._skip = 0  # bytes of a length-prefixed frame still to drop
        self._discarding = False  # inside a non-text sentinel frame

    def feed(self, data: BytesLike) -> None:
        """Append received bytes."""
        self._buf += data

    @property
    def buffered(self) -> int:
        """Number of received bytes held, not yet returned or discarded."""
        return len(self._buf)

    def clear(self) -> None:
        """Forget the bytes not parsed yet: the connection is closed."""
        self._buf = bytearray()
        self._scan = 1
        self._skip = 0
        self._discarding = False

    def next_frame(self, max_size: "int | None" = None) -> "Frame | None":
        """Return the next text or close :class:`Frame`, or ``None``."""
        parsed = self.next_parsed(max_size)
        if parsed is None:
            return None
        return Frame(Opcode(parsed[0]), parsed[1])

    def next_parsed(self, max_size: "int | None") -> "tuple[int, bytes] | None":
        """:meth:`next_frame` as ``(opcode, payload)``, or ``None``."""
        buf = self._buf
        while True:
            if self._skip:
                n = min(self._skip, len(buf))
                del buf[:n]
                self._skip -= n
                if self._skip:
                    return None
            if self._discarding:
                end = buf.find(b"\xff")
                if end < 0:
                    buf.clear()
                    return None
                del buf[: end + 1]
                self._discarding = False
            if not buf:
                return None
            frame_type = buf[0]
            if frame_type & 0x80:
                length = 0
                i = 1
                while True:
                    if i >= len(buf):
                        return None
                    b = buf[i]
                    length = (length << 7) | (b & 0x7F)
                    i += 1
                    if max_size is not None and length > max_size:
                        raise PayloadTooBig(
                            f"hixie frame of over {max_size} bytes announced"
                        )
                    if i > 10:
                        raise ProtocolError("hixie frame length is too long")
                    if not b & 0x80:
                        break
                del buf[:i]
                if frame_type == 0xFF and length == 0:
                    return Opcode.CLOSE, b""
                self._skip = length
                continue
            if frame_type != 0x00:
                del buf[:1]
                self._discarding = True
                continue
            end = buf.find(b"\xff", self._scan)
            if end < 0:
                if max_size is not None and len(buf) - 1 > max_size:
                    raise PayloadTooBig(
                        f"hixie text frame over the limit of {max_size} bytes"
                    )
                self._scan = len(buf)
                return None
            if max_size is not None and end - 1 > max_size:
                raise PayloadTooBig(
                    f"hixie text frame over the limit of {max_size} bytes"
                )
            payload = bytes(buf[1:end])
            del buf[: end + 1]
            self._scan = 1
            return Opcode.TEXT, payload
