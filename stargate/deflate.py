"""permessage-deflate (RFC 7692) without I/O: negotiation and the codec.

The server always answers with ``server_no_context_takeover`` (RFC 7692
7.1.1.1 lets a server do so whether or not the client asked). Every message
the server sends is therefore compressed on its own, depending on nothing
sent before it, and one compressed frame serves every listener of a
broadcast: :func:`compress` is a pure function of the message and the
:class:`DeflateParams`.

Received messages are decompressed per connection by :class:`Decompressor`,
which keeps the client's compression context across messages unless
``client_no_context_takeover`` was agreed, and stops as soon as the output
exceeds the size limit, so a small frame cannot expand into gigabytes.

zlib refuses a raw deflate window of 8 bits. When a client asks for
``server_max_window_bits=8`` we answer 8 and compress with 9: zlib never
emits a match distance above ``window - 262`` bytes (250 for 9 bits), so
the stream decodes with a 256-byte window. We always decompress with a
32 KiB window (15 bits), which decodes anything a client compressed with a
smaller one, 8 bits included.
"""

import dataclasses
import zlib
from collections.abc import Iterator

from stargate.exceptions import PayloadTooBig, ProtocolError

__all__ = [
    "EXTENSION_NAME",
    "DeflateParams",
    "Decompressor",
    "compress",
    "negotiate",
    "parse_extensions",
]

EXTENSION_NAME = "permessage-deflate"

#: One parsed extension offer: its name and its ``(param, value)`` pairs.
Extension = tuple[str, list[tuple[str, "str | None"]]]

_TAIL = b"\x00\x00\xff\xff"
_STEP = 65536  # bytes inflated at a time
_EMPTY = b"\x00"


@dataclasses.dataclass(frozen=True)
class DeflateParams:
    """Negotiated permessage-deflate parameters. Frozen and hashable.

    ``server_max_window_bits`` is the window the server compresses with
    (8-15) and ``client_max_window_bits`` the largest the client may use.
    ``server_no_context_takeover`` is always true when stargate negotiates.
    """

    server_no_context_takeover: bool = True
    client_no_context_takeover: bool = False
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15
    #: zlib compression level of outgoing messages (not negotiated).
    compress_level: int = 6

    def __post_init__(self) -> None:
        for name in ("server_max_window_bits", "client_max_window_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 8 <= bits <= 15:
                raise ValueError(f"{name} must be 8..15, got {bits!r}")

    def response_value(self, *, window_bits_offered: bool = False) -> str:
        """Return the ``Sec-WebSocket-Extensions`` value announcing these."""
        parts = [EXTENSION_NAME]
        if self.server_no_context_takeover:
            parts.append("server_no_context_takeover")
        if self.client_no_context_takeover:
            parts.append("client_no_context_takeover")
        if window_bits_offered or self.server_max_window_bits != 15:
            parts.append(f"server_max_window_bits={self.server_max_window_bits}")
        return "; ".join(parts)


# ------------------------------------------------------------------ parsing

_TCHAR = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def _is_token(s: str) -> bool:
    return bool(s) and all(c in _TCHAR for c in s)


def _split(value: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double-quoted strings."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for c in value:
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(c)
    if quoted:
        raise ValueError("unterminated quoted string")
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        out = []
        escaped = False
        for c in value[1:-1]:
            if not escaped and c == "\\":
                escaped = True
                continue
            escaped = False
            out.append(c)
        value = "".join(out)
    # RFC 6455 9.1: a quoted value must be a token once unquoted.
    if not _is_token(value):
        raise ValueError(f"invalid parameter value {value!r}")
    return value


def _parse_element(element: str) -> Extension:
    items = _split(element, ";")
    name = items[0].strip()
    if not _is_token(name):
        raise ValueError(f"invalid extension name {name!r}")
    params = []
    for item in items[1:]:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not _is_token(key):
            raise ValueError(f"invalid parameter name {key!r}")
        params.append((key, _unquote(value.strip()) if eq else None))
    return name, params


def _elements(header_value: str) -> Iterator[str]:
    for element in _split(header_value, ","):
        if element.strip():
            yield element


def parse_extensions(header_value: str) -> list[Extension]:
    """Parse a ``Sec-WebSocket-Extensions`` value.

    Returns a list of ``(name, [(param, value or None), ...])`` in offer
    order. Values may be quoted. Raises :class:`ValueError` if malformed.
    """
    return [_parse_element(element) for element in _elements(header_value)]


def _window_bits(value: "str | None") -> int:
    # RFC 7692 7.1.2: a decimal integer 8..15 without leading zeros.
    if value is None or not value.isdigit() or value[0] == "0" or len(value) > 2:
        raise ValueError(f"invalid window bits {value!r}")
    bits = int(value)
    if not 8 <= bits <= 15:
        raise ValueError(f"window bits {bits} out of 8..15")
    return bits


def _accept(params: list[tuple[str, "str | None"]]) -> tuple[str, DeflateParams]:
    """Return ``(response_value, DeflateParams)`` for one offer or raise."""
    seen = set()
    client_no_context = False
    server_bits = None
    client_bits = 15
    for key, value in params:
        if key in seen:
            raise ValueError(f"duplicate parameter {key}")
        seen.add(key)
        if key == "server_no_context_takeover":
            if value is not None:
                raise ValueError(f"{key} takes no value")
        elif key == "client_no_context_takeover":
            if value is not None:
                raise ValueError(f"{key} takes no value")
            client_no_context = True
        elif key == "server_max_window_bits":
            server_bits = _window_bits(value)
        elif key == "client_max_window_bits":
            if value is not None:
                client_bits = _window_bits(value)
        else:
            raise ValueError(f"unknown parameter {key}")
    result = DeflateParams(
        server_no_context_takeover=True,
        client_no_context_takeover=client_no_context,
        server_max_window_bits=15 if server_bits is None else server_bits,
        client_max_window_bits=client_bits,
    )
    return result.response_value(window_bits_offered=server_bits is not None), result


def negotiate(
    header_value: "str | None", *, enabled: bool = True
) -> "tuple[str, DeflateParams] | None":
    """Accept the first acceptable permessage-deflate offer in ``header_value``.

    Returns ``(response_header_value, DeflateParams)`` or ``None`` when
    compression is disabled or no offer is acceptable. Offers with unknown
    or duplicate parameters, values outside 8..15, a value on a flag
    parameter, ``server_max_window_bits`` without a value, or bad syntax are
    declined and the next offer is tried.

    The response always carries ``server_no_context_takeover``; it echoes
    ``client_no_context_takeover`` and ``server_max_window_bits`` when
    offered. ``client_max_window_bits`` is never sent back: we decompress
    with a 15-bit window, which decodes any smaller one.
    """
    if not enabled or not header_value:
        return None
    try:
        elements = list(_elements(header_value))
    except ValueError:
        return None
    for element in elements:
        try:
            name, params = _parse_element(element)
            if name.lower() != EXTENSION_NAME:
                continue
            return _accept(params)
        except ValueError:
            continue
    return None


# ------------------------------------------------------------------ codec

_compressors: "dict[tuple[int, int], zlib._Compress]" = {}


def compress(data: bytes, params: DeflateParams) -> bytes:
    """Return ``data`` compressed as one permessage-deflate message.

    A fresh compression context every call (``server_no_context_takeover``),
    the trailing ``0x00 0x00 0xff 0xff`` removed; an empty message gives
    ``b"\\x00"`` (RFC 7692 7.2.3.6).
    """
    if not data:
        return _EMPTY
    wbits = max(params.server_max_window_bits, 9)  # zlib refuses raw 8
    key = (wbits, params.compress_level)
    primed = _compressors.get(key)
    if primed is None:
        primed = _compressors[key] = zlib.compressobj(
            params.compress_level, zlib.DEFLATED, -wbits
        )
    compressor = primed.copy()
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    if out.endswith(_TAIL):
        out = out[:-4]
    return out


class Decompressor:
    """Decompresses the messages one client sends, with a size limit.

    Call :meth:`decompress` with each frame's payload in order, ``final``
    on the last frame of the message. ``max_size`` (``None``: no limit) caps
    the decompressed size of one message; going over raises
    :class:`~stargate.exceptions.PayloadTooBig` with at most ``max_size + 1``
    bytes ever produced. Corrupt data raises
    :class:`~stargate.exceptions.ProtocolError`.
    """

    def __init__(self, params: DeflateParams, max_size: "int | None" = None) -> None:
        self.params = params
        self.max_size = max_size
        self._size = 0
        self._decoder = zlib.decompressobj(-15)

    def decompress(self, data: "bytes | bytearray", final: bool) -> bytearray:
        """Return the decompressed bytes of one frame's payload, as a
        ``bytearray`` (grown in 64 KiB steps, so inflating never holds the
        output twice).

        Data after a final deflate block (BFINAL) is a protocol error
        (RFC 7692 7.2.2): the message ends with that block.
        """
        decoder = self._decoder
        out = bytearray()
        try:
            self._inflate(data, out)
            if final and not decoder.eof and not self._over(out):
                self._inflate(_TAIL, out)
        except zlib.error as exc:
            raise ProtocolError(f"invalid compressed data: {exc}") from None
        if decoder.unused_data:
            raise ProtocolError("data after the final deflate block")
        self._size += len(out)
        if self._over():
            raise PayloadTooBig(
                f"decompressed message over the limit of {self.max_size} bytes"
            )
        if final:
            self._size = 0
            if self.params.client_no_context_takeover or decoder.eof:
                # A final deflate block (BFINAL) ends the stream; start anew.
                self._decoder = zlib.decompressobj(-15)
        return out

    def _over(self, out: "bytes | bytearray" = b"") -> bool:
        return self.max_size is not None and self._size + len(out) > self.max_size

    def _inflate(self, data: "bytes | bytearray", out: bytearray) -> None:
        # Stops one byte past the limit: enough to know it was passed.
        decoder = self._decoder
        while True:
            step = _STEP
            if self.max_size is not None:
                step = min(step, self.max_size - self._size - len(out) + 1)
            chunk = decoder.decompress(data, step)
            out += chunk
            data = decoder.unconsumed_tail
            if self._over(out) or (len(chunk) < step and not data):
                return
