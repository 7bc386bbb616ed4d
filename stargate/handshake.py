"""The WebSocket opening handshake: request headers in, response bytes out.

This module insulates application code from the revisions of the WebSocket
specification. It speaks three of them:

``rfc6455``
    RFC 6455 (``Sec-WebSocket-Version: 13``), what every browser and client
    library of today speaks. See :func:`handshake_rfc6455`.
``hixie-76``
    draft-hixie-thewebsocketprotocol-76 (May 2010): ``Sec-WebSocket-Key1``,
    ``Sec-WebSocket-Key2`` and eight key bytes after the request headers.
    See :func:`handshake_v76`.
``hixie-75``
    draft-hixie-thewebsocketprotocol-75: no keys at all. See
    :func:`handshake_pre76`.

:func:`negotiate` does the checks common to every draft (method, HTTP
version, ``Upgrade``, ``Connection``, ``Host``, the origin policy), picks the
draft from the request and returns a :class:`Handshake`.
:func:`websocket_handshake` is the 2010 entry point and returns only the
response bytes. The two drafts live in :mod:`stargate.legacy`; their
documented names (``handshake_pre76``, ``handshake_v76`` and their base
responses) are importable from here as they always were.

Nothing here does I/O. The request is a :class:`Request` value (method,
HTTP version, scheme, path and headers; :meth:`Request.from_environ` makes
one from a WSGI environ without copying it), or, as in 2010, a mapping of
header names to values: a ``webob.headers.EnvironHeaders``
(``request.headers``), whose ``environ`` is then read as
``Request.from_environ`` does, or a plain ``dict`` (names in any case).
Values are WSGI strings (latin-1).
A header the client sent more than once arrives joined with ``", "``, as
WSGI servers join them.

Origin policy
-------------

Browsers send cookies and HTTP authentication with a WebSocket upgrade
request whatever page opened it, and the same-origin policy does not apply
to WebSockets. Any web site a logged-in user visits could otherwise open a
WebSocket to this server *as that user* and read what comes back
(cross-site WebSocket hijacking). So by default (``allowed_origins=None``)
only same-origin requests are accepted (RFC 6454): the scheme of ``Origin``
must be the server's (``https`` when ``environ['wsgi.url_scheme']`` or
``secure`` says so, else ``http``), and its host and port those of the
``Host`` header, a missing port being the scheme's default (80 or 443).
Without an environ or ``secure`` the scheme is unknown and only the host
and port are compared. ``allowed_origins`` replaces that with a list
of exact origins (``"https://example.com"``, ``"http://localhost:8080"``);
``"*"`` in the list accepts any origin.

A request without ``Origin`` is accepted under every policy: browsers always
send it, so such a request comes from a non-browser client, which holds its
own credentials and cannot be hijacked this way. The ``"null"`` origin
(sandboxed iframes, ``file:`` pages, some redirects) is refused unless the
list holds ``"*"``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union
from urllib.parse import quote

from stargate import deflate
from stargate.exceptions import (
    HandShakeFailed,
    IncorrectlyConfigured,
    InvalidOrigin,
    NotWebSocketRequest,
    UnsupportedVersion,
)
from stargate.frames import DRAFTS, WireFormat

if TYPE_CHECKING:
    from stargate.legacy import (
        HIXIE75_BASE_RESPONSE,
        HIXIE76_BASE_RESPONSE,
        handshake_pre76,
        handshake_v76,
    )

__all__ = [
    "HandShakeFailed",
    "InvalidOrigin",
    "NotWebSocketRequest",
    "UnsupportedVersion",
    "Handshake",
    "Request",
    "build_location_url",
    "handshake_pre76",
    "handshake_v76",
    "handshake_rfc6455",
    "negotiate",
    "requested_draft",
    "websocket_handshake",
    "ALL_VERSIONS",
    "VERSION_ALIASES",
    "normalise_versions",
    "RFC6455_BASE_RESPONSE",
    "HIXIE76_BASE_RESPONSE",
    "HIXIE75_BASE_RESPONSE",
]

#: The drafts the ``versions`` option names, newest first, and its default:
#: every draft by its one name (as :attr:`Handshake.draft`, the access log
#: and the metrics say it). Also :data:`stargate.frames.DRAFTS`.
ALL_VERSIONS: tuple[str, ...] = DRAFTS

#: Older spellings the ``versions`` option (and ``stargate.protocols``) still
#: accepts, so existing configurations keep working: ``13`` is
#: ``rfc6455`` (its ``Sec-WebSocket-Version``), ``76`` and ``75`` the drafts.
VERSION_ALIASES: Mapping[str, str] = {
    "13": "rfc6455",
    "76": "hixie-76",
    "75": "hixie-75",
}
_DRAFT_TITLE = {
    "rfc6455": "RFC 6455 (Sec-WebSocket-Version: 13)",
    "hixie-76": "draft-hixie-thewebsocketprotocol-76",
    "hixie-75": "draft-hixie-thewebsocketprotocol-75",
}

#: The status line and the headers every RFC 6455 response starts with.
RFC6455_BASE_RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
)
_RFC6455_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_NOT_WEBSOCKET = "this is a WebSocket endpoint; connect with a WebSocket client"

# A Host header: a bracketed IPv6 address or a registered name, then a port.
# No comma (two Host headers joined), no whitespace, no userinfo.
_HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(?::([0-9]{1,5}))?")
# Control characters in a header value: CR and LF would split the response.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
# What may be left as it is in the path of a Location URL.
_PATH_SAFE = "/:@!$&'()*+,;="


@dataclass(frozen=True)
class Handshake:
    """An accepted upgrade request.

    ``draft`` is ``"rfc6455"``, ``"hixie-76"`` or ``"hixie-75"``;
    ``response`` the complete bytes to write back (status line, headers,
    blank line and, for hixie-76, the 16-byte challenge answer);
    ``subprotocol`` the subprotocol agreed on, or ``None``; ``wire_format``
    how messages are framed on this connection.
    """

    draft: str
    response: bytes
    subprotocol: str | None
    wire_format: WireFormat


# -- reading headers --------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """An upgrade request, as the handshake needs it: no WSGI, no I/O.

    ``headers`` is any mapping of header names to values (or ``(name,
    value)`` pairs), names in any case, values WSGI strings (latin-1).
    ``method`` (``"GET"``) and ``version`` (``"HTTP/1.1"``) are checked when
    given; ``None`` means the server cannot say. ``scheme`` (``"http"`` or
    ``"https"``, how the client reached the server) decides the same-origin
    policy and the hixie ``Location``; ``path`` (decoded, as WSGI's
    ``SCRIPT_NAME + PATH_INFO``) and ``query`` build that ``Location``.
    """

    headers: "Mapping[str, str] | Iterable[tuple[str, str]]"
    method: "str | None" = None
    version: "str | None" = None
    scheme: "str | None" = None
    path: "str | None" = None
    query: str = ""

    @classmethod
    def from_environ(
        cls, environ: "Mapping[str, Any]", *, version_known: bool = True
    ) -> "Request":
        """The request a WSGI ``environ`` describes, without copying it.

        ``version_known=False`` when the server's ``SERVER_PROTOCOL`` is not
        the request's own (eventlet's plain server always says HTTP/1.0).
        """
        return cls(
            headers=_EnvironHeaders(environ),
            method=environ.get("REQUEST_METHOD"),
            version=environ.get("SERVER_PROTOCOL") if version_known else None,
            scheme=environ.get("wsgi.url_scheme"),
            path=environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""),
            query=environ.get("QUERY_STRING", ""),
        )


class _EnvironHeaders(Mapping[str, str]):
    """The ``HTTP_*`` keys of an environ as header names, read in place."""

    def __init__(self, environ: "Mapping[str, Any]") -> None:
        self._environ = environ

    def __getitem__(self, name: str) -> str:
        value: str = self._environ["HTTP_" + name.upper().replace("-", "_")]
        return value

    def __iter__(self) -> "Iterator[str]":
        for key in self._environ:
            if key.startswith("HTTP_"):
                yield key[5:].replace("_", "-").lower()

    def __len__(self) -> int:
        return sum(1 for _ in self)


class RequestHeaders:
    """The request, its headers looked up case-insensitively.

    Every value read through :meth:`get` is checked for control characters,
    so nothing read here can split the response it may be echoed into.
    """

    def __init__(self, source: "HeadersLike") -> None:
        if isinstance(source, RequestHeaders):
            self.__dict__.update(source.__dict__)
            return
        if not isinstance(source, Request):
            environ = getattr(source, "environ", None)  # webob's EnvironHeaders
            if isinstance(environ, Mapping):
                source = Request.from_environ(environ)
            else:
                source = Request(source)
        self.method = source.method
        self.version = source.version
        self.scheme = None if source.scheme is None else source.scheme.lower()
        self.path = source.path
        self.query = source.query
        headers = source.headers
        items = headers.items() if isinstance(headers, Mapping) else headers
        values: dict[str, str] = {}
        for name, value in items:
            if isinstance(name, bytes):
                name = name.decode("latin-1")
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            name = name.lower()
            # A header sent twice is joined as a WSGI server joins it.
            values[name] = f"{values[name]}, {value}" if name in values else value
        self.values = values

    def get(self, name: str) -> "str | None":
        value = self.values.get(name.lower())
        if value is None:
            return None
        if _CONTROL_RE.search(value):
            raise HandShakeFailed(
                f"the {name} header contains a control character (CR, LF, NUL...)",
                header=name,
                value=value,
            )
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise HandShakeFailed(
                f"the {name} header is not latin-1 text", header=name, value=value
            ) from None
        return value


#: A response's first lines (``None``: the draft's own).
BaseResponse = Union[bytes, str, None]
#: Subprotocols this server speaks, preferred first (one may be a ``str``).
Subprotocols = Union[Iterable[str], str]
#: Drafts to accept: ``"rfc6455"``, ``"hixie-76"``, ``"hixie-75"``, or the
#: aliases of :data:`VERSION_ALIASES` (ints too); a string may list several.
Versions = Union[Iterable[Union[str, int]], str, int]
#: hixie-76's eight key bytes.
Key3 = Union[bytes, bytearray, memoryview, None]

#: What the handshake functions accept as the request: a :class:`Request`,
#: ``request.headers`` (whose environ is then read), or a mapping of headers.
HeadersLike = Union[
    Request, "RequestHeaders", Mapping[str, str], Iterable[tuple[str, str]]
]


def _tokens(value: "str | None") -> list[str]:
    """The comma-separated tokens of a header value, stripped and lowercased."""
    if not value:
        return []
    return [token.strip().lower() for token in value.split(",") if token.strip()]


def response_head(base_response: BaseResponse, default: bytes) -> bytes:
    """``base_response`` as the bytes that start a response (``default``
    when it is ``None``), checked to end with CRLF."""
    if base_response is None:
        return default
    if isinstance(base_response, str):
        base_response = base_response.encode("latin-1")
    base_response = bytes(base_response)
    if not base_response.endswith(b"\r\n"):
        raise ValueError("base_response must end with CRLF")
    return base_response


def header_line(name: str, value: str) -> bytes:
    """One response header line, ``name: value`` and CRLF, in latin-1."""
    return f"{name}: {value}\r\n".encode("latin-1")


# -- the Host header and the Location URL -----------------------------------


def _host(headers: RequestHeaders) -> str:
    """The validated ``Host`` header, as sent."""
    host = headers.get("Host")
    if host is not None:
        host = host.strip()
    if not host:
        raise HandShakeFailed(
            "the Host header is missing; HTTP/1.1 and WebSocket require it",
            header="Host",
        )
    match = _HOST_RE.fullmatch(host)
    if match is None or (match.group(2) is not None and int(match.group(2)) > 65535):
        raise HandShakeFailed(header="Host", value=host)
    return host


def _is_secure(headers: RequestHeaders, secure: "bool | None") -> bool:
    if secure is not None:
        return bool(secure)
    return headers.scheme in ("https", "wss")


def _location_path(headers: RequestHeaders, path: "str | None") -> str:
    if path is not None:
        if not path.startswith("/") or re.search(r"[\x00-\x20\x7f]", path):
            raise HandShakeFailed(f"invalid resource path {path!r}", value=path)
        return path
    if headers.path is None:
        return "/"
    raw = headers.path
    # WSGI paths are percent-decoded bytes read as latin-1: quote them again.
    path = quote(raw.encode("latin-1", "replace"), safe=_PATH_SAFE) or "/"
    query = headers.query
    if query:
        if re.search(r"[\x00-\x20\x7f]", query):
            raise HandShakeFailed(
                f"the query string contains a space or a control character: {query!r}",
                value=query,
            )
        path = f"{path}?{query}"
    return path


def build_location_url(
    headers: HeadersLike, *, secure: "bool | None" = None, path: "str | None" = None
) -> str:
    """Construct the WebSocket URL the client connected to.

    ``ws://host/path?query``, or ``wss://`` when ``secure`` is true; by
    default ``secure`` is taken from ``environ['wsgi.url_scheme']``. The host
    is the ``Host`` header as sent (:class:`HandShakeFailed` naming ``Host``
    when it is missing or malformed). The path is
    ``SCRIPT_NAME + PATH_INFO + ?QUERY_STRING`` from ``headers.environ``
    (percent-encoded again), unless ``path`` (already encoded, starting with
    ``/``) is given; without an environ it defaults to ``/``.

    :param headers: a ``webob.headers.EnvironHeaders`` or any mapping of
        header names to values.
    """
    headers = RequestHeaders(headers)
    scheme = "wss" if _is_secure(headers, secure) else "ws"
    return f"{scheme}://{_host(headers)}{_location_path(headers, path)}"


# -- the origin policy --------------------------------------------------------


def _parse_origin(value: str) -> "tuple[str, str, int] | None":
    """``(scheme, host, port)`` of a serialized origin, or ``None``."""
    scheme, sep, rest = value.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        return None
    match = _HOST_RE.fullmatch(rest)
    if match is None:
        return None
    host, port = match.group(1).lower(), match.group(2)
    port = _DEFAULT_PORTS[scheme] if port is None else int(port)
    if port > 65535:
        return None
    return scheme, host, port


def normalise_allowed_origins(
    allowed_origins: "Iterable[str] | str",
) -> "set[tuple[str, str, int]] | str":
    """``allowed_origins`` as ``(scheme, host, port)`` triples, or ``"*"``.

    Raises :class:`~stargate.exceptions.IncorrectlyConfigured` naming an
    entry that is not ``scheme://host[:port]``: settings check their list
    with it at start-up, so what they accept the handshake accepts.
    """
    if isinstance(allowed_origins, str):
        allowed_origins = (allowed_origins,)
    allowed = set()
    for origin in allowed_origins:
        if origin == "*":
            return "*"
        parsed = _parse_origin(origin)
        if parsed is None:
            raise IncorrectlyConfigured(
                f"allowed origin {origin!r} is not of the form scheme://host[:port] "
                f"(for example 'https://example.com'); use '*' to allow every origin"
            )
        allowed.add(parsed)
    return allowed


def _server_scheme(headers: RequestHeaders, secure: "bool | None") -> "str | None":
    """``"https"``, ``"http"``, or ``None`` when nothing says which."""
    if secure is not None:
        return "https" if secure else "http"
    if headers.scheme is None:
        return None
    return "https" if headers.scheme in ("https", "wss") else "http"


def _same_origin(
    parsed: "tuple[str, str, int]", headers: RequestHeaders, secure: "bool | None"
) -> bool:
    """Whether the parsed origin is this server's (RFC 6454): same scheme,
    host and port, the server's scheme from ``secure`` or
    ``wsgi.url_scheme``, and its port from ``Host`` or that scheme."""
    scheme, host, port = parsed
    match = _HOST_RE.fullmatch(_host(headers))
    if match is None:  # _host() already refused it
        return False
    server_host, server_port = match.group(1).lower(), match.group(2)
    if host != server_host:
        return False
    server_scheme = _server_scheme(headers, secure)
    if server_scheme is None:
        # No environ and no ``secure``: the scheme is unknown, so only host
        # and port can be compared (a Host without a port: 80 or 443).
        if server_port is None:
            return port in (80, 443)
        return port == int(server_port)
    if _DEFAULT_PORTS[scheme] != _DEFAULT_PORTS[server_scheme]:
        return False  # http (or ws) against https (or wss)
    if server_port is None:
        return port == _DEFAULT_PORTS[server_scheme]
    return port == int(server_port)


def _check_origin(
    headers: RequestHeaders,
    allowed_origins: "Iterable[str] | str | None",
    secure: "bool | None" = None,
) -> "str | None":
    """Apply the origin policy (see the module docstring)."""
    name = "Origin"
    origin = headers.get("Origin")
    if origin is None:
        name = "Sec-WebSocket-Origin"
        origin = headers.get("Sec-WebSocket-Origin")
    if origin is None:
        return None
    origin = origin.strip()
    if allowed_origins is None:
        parsed = _parse_origin(origin)
        if parsed is not None and _same_origin(parsed, headers, secure):
            return origin
        raise InvalidOrigin(
            f"origin {origin!r} is not the origin of this server; "
            f"pass allowed_origins to accept cross-origin WebSocket requests",
            header=name,
            value=origin,
        )
    allowed = normalise_allowed_origins(allowed_origins)
    if allowed == "*" or _parse_origin(origin) in allowed:
        return origin
    raise InvalidOrigin(f"origin {origin!r} is not allowed", header=name, value=origin)


# -- RFC 6455 -----------------------------------------------------------------


def _accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 4.2.2)."""
    digest = hashlib.sha1(key.encode("ascii") + _RFC6455_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def _select_subprotocol(
    headers: RequestHeaders, subprotocols: Subprotocols
) -> "str | None":
    if isinstance(subprotocols, str):
        subprotocols = (subprotocols,)
    offered = [
        token.strip()
        for token in (headers.get("Sec-WebSocket-Protocol") or "").split(",")
    ]
    for subprotocol in subprotocols:
        if subprotocol in offered:
            return subprotocol
    return None


def _rfc6455(
    headers: RequestHeaders,
    base_response: BaseResponse,
    *,
    subprotocols: Subprotocols = (),
    compression: bool = True,
) -> Handshake:
    key = headers.get("Sec-WebSocket-Key")
    if key is None:
        raise HandShakeFailed(header="Sec-WebSocket-Key")
    key = key.strip()
    if "," in key:
        raise HandShakeFailed(
            "Sec-WebSocket-Key was sent more than once",
            header="Sec-WebSocket-Key",
            value=key,
        )
    try:
        raw_key = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw_key = b""
    if len(raw_key) != 16:
        raise HandShakeFailed(
            f"Sec-WebSocket-Key must be 16 bytes in base64, got {key!r}",
            header="Sec-WebSocket-Key",
            value=key,
        )

    response = [response_head(base_response, RFC6455_BASE_RESPONSE)]
    response.append(header_line("Sec-WebSocket-Accept", _accept_key(key)))
    subprotocol = _select_subprotocol(headers, subprotocols)
    if subprotocol is not None:
        response.append(header_line("Sec-WebSocket-Protocol", subprotocol))
    params = None
    offer = headers.get("Sec-WebSocket-Extensions")
    if compression and offer:
        accepted = deflate.negotiate(offer)
        if accepted is not None:
            extensions, params = accepted
            response.append(header_line("Sec-WebSocket-Extensions", extensions))
    response.append(b"\r\n")
    return Handshake(
        draft="rfc6455",
        response=b"".join(response),
        subprotocol=subprotocol,
        wire_format=WireFormat(draft="rfc6455", deflate=params),
    )


def handshake_rfc6455(
    headers: HeadersLike,
    base_response: BaseResponse,
    *,
    subprotocols: Subprotocols = (),
    compression: bool = True,
) -> bytes:
    """The handshake of RFC 6455 (``Sec-WebSocket-Version: 13``).

    Checks ``Sec-WebSocket-Key`` (base64 of exactly 16 bytes, sent once) and
    returns the response bytes: ``base_response``, ``Sec-WebSocket-Accept``,
    ``Sec-WebSocket-Protocol`` when one of ``subprotocols`` (the server's
    preference order) was offered, ``Sec-WebSocket-Extensions`` when
    ``compression`` is true and the client offered permessage-deflate, and
    the blank line.

    The caller must have checked everything else: method, HTTP version,
    ``Upgrade``, ``Connection``, ``Host``, ``Sec-WebSocket-Version`` and the
    origin (:func:`negotiate` does). Use :func:`negotiate` to learn the
    subprotocol and the deflate parameters agreed on.

    :param headers: the request headers from :func:`websocket_handshake`.
    :param base_response: the status line, ``Upgrade`` and ``Connection``
        lines as ``bytes`` ending with CRLF (:data:`RFC6455_BASE_RESPONSE`,
        what :func:`websocket_handshake` passes); a ``str`` is encoded as
        latin-1.
    """
    return _rfc6455(
        RequestHeaders(headers),
        base_response,
        subprotocols=subprotocols,
        compression=compression,
    ).response


# -- the common part ----------------------------------------------------------


def requested_draft(headers: HeadersLike) -> str:
    """The draft an upgrade request asks for: ``"rfc6455"``, ``"hixie-76"``
    or ``"hixie-75"``.

    A server calls this to know whether to read the 8 bytes of ``key3``
    (``"hixie-76"``) before calling :func:`negotiate`. It checks nothing else.
    """
    headers = RequestHeaders(headers)
    if headers.get("Sec-WebSocket-Version") is not None:
        return "rfc6455"
    if (
        headers.get("Sec-WebSocket-Key1") is not None
        or headers.get("Sec-WebSocket-Key2") is not None
    ):
        return "hixie-76"
    return "hixie-75"


def normalise_versions(versions: Versions) -> tuple[str, ...]:
    """The drafts ``versions`` names, by their names in :data:`ALL_VERSIONS`
    (aliases resolved, duplicates dropped, in the order given).

    A string may list several, separated by spaces or commas
    (``"rfc6455 hixie-76"``, ``"13"``). Anything else, or nothing, raises
    :class:`IncorrectlyConfigured`: a typo must not switch a draft off.
    """
    if isinstance(versions, int):
        versions = (versions,)
    elif isinstance(versions, str):
        versions = versions.replace(",", " ").split()
    given = tuple(str(version).strip().lower() for version in versions)
    drafts: list[str] = []
    for version in given:
        draft = VERSION_ALIASES.get(version, version)
        if draft not in ALL_VERSIONS:
            raise IncorrectlyConfigured(
                f"unknown WebSocket version {version!r}: name drafts among "
                f"{' '.join(ALL_VERSIONS)} (or 13, 76, 75)"
            )
        if draft not in drafts:
            drafts.append(draft)
    if not drafts:
        raise IncorrectlyConfigured(
            f"no WebSocket version to accept: name drafts among "
            f"{' '.join(ALL_VERSIONS)} (or 13, 76, 75)"
        )
    return tuple(drafts)


def _unsupported(
    draft: "str | None", versions: tuple[str, ...], value: "str | None" = None
) -> UnsupportedVersion:
    spoken = ", ".join(_DRAFT_TITLE[v] for v in versions)
    if draft is None:
        what = f"WebSocket version {value!r}"
    else:
        what = _DRAFT_TITLE[draft]
    return UnsupportedVersion(
        f"this server does not speak {what}; it speaks {spoken}",
        header="Sec-WebSocket-Version",
        value=value,
        headers=[("Sec-WebSocket-Version", "13")] if "rfc6455" in versions else [],
    )


def _check_request(headers: RequestHeaders) -> None:
    """The checks common to every draft, in the order a client hits them."""
    upgrade = headers.get("Upgrade")
    if upgrade is None or "websocket" not in _tokens(upgrade):
        raise NotWebSocketRequest(
            _NOT_WEBSOCKET,
            header="Upgrade",
            value=upgrade,
            headers=[("Upgrade", "websocket")],
        )
    method = headers.method
    if method is not None and method != "GET":
        raise HandShakeFailed(
            f"WebSocket upgrade requires GET, not {method}", value=method
        )
    protocol = headers.version
    if protocol is not None:
        match = re.fullmatch(r"HTTP/(\d+)\.(\d+)", protocol)
        if match is None or (int(match.group(1)), int(match.group(2))) < (1, 1):
            raise HandShakeFailed(
                f"WebSocket upgrade requires HTTP/1.1, not {protocol}",
                value=protocol,
            )
    connection = headers.get("Connection")
    if "upgrade" not in _tokens(connection):
        raise HandShakeFailed(
            "the Connection header must hold the token 'Upgrade'",
            header="Connection",
            value=connection,
        )
    _host(headers)


def negotiate(
    headers: HeadersLike,
    allowed_origins: "Iterable[str] | str | None" = None,
    *,
    key3: Key3 = None,
    subprotocols: Subprotocols = (),
    versions: Versions = ALL_VERSIONS,
    compression: bool = True,
    secure: "bool | None" = None,
    path: "str | None" = None,
) -> Handshake:
    """Check an upgrade request and answer it: returns a :class:`Handshake`.

    In order: ``Upgrade`` must hold the token ``websocket``
    (:class:`NotWebSocketRequest`, 426, otherwise: a plain browser GET); the
    method must be GET and the HTTP version at least 1.1 when the environ
    says; ``Connection`` must hold the token ``upgrade``; ``Host`` must be
    there. Then the draft: ``Sec-WebSocket-Version`` asks for RFC 6455 (only
    version 13), ``Sec-WebSocket-Key1``/``Key2`` for hixie-76, neither for
    hixie-75; a version or draft not in ``versions`` raises
    :class:`UnsupportedVersion` (426, with ``Sec-WebSocket-Version: 13``).
    Then the origin policy (:class:`InvalidOrigin`, 403; see the module
    docstring) and the draft's own checks. Every other refusal is a
    :class:`HandShakeFailed` (400) whose ``header`` names what is wrong.

    :param headers: a :class:`Request` (method, HTTP version, scheme, path
        and headers, as :meth:`Request.from_environ` reads them from WSGI),
        or ``request.headers``, whose environ is read the same way, or any
        mapping of headers (then the method, version and scheme are unknown
        and not checked).
    :param allowed_origins: ``None`` for same-origin only, or an iterable of
        origins (``"https://example.com"``), possibly holding ``"*"``.
    :param key3: hixie-76 only: the 8 bytes after the request headers (see
        :func:`requested_draft`).
    :param subprotocols: the subprotocols this server speaks, preferred
        first; the first one the client offers is selected.
    :param versions: the drafts to accept, among ``"rfc6455"``,
        ``"hixie-76"`` and ``"hixie-75"`` (:func:`normalise_versions`; the
        older ``"13"``, ``"76"`` and ``"75"`` still work).
    :param compression: accept permessage-deflate (RFC 7692) when offered.
    :param secure: whether the connection is TLS, for the hixie Location
        URL; by default from ``environ['wsgi.url_scheme']``.
    :param path: the resource path for the hixie Location URL; by default
        from the environ.
    """
    versions = normalise_versions(versions)
    headers = RequestHeaders(headers)
    _check_request(headers)

    version = headers.get("Sec-WebSocket-Version")
    if version is not None:
        version = version.strip()
        if "," in version:
            raise HandShakeFailed(
                "Sec-WebSocket-Version was sent more than once",
                header="Sec-WebSocket-Version",
                value=version,
            )
        if version != "13" or "rfc6455" not in versions:
            raise _unsupported(None, versions, version)
        draft = "rfc6455"
    else:
        draft = requested_draft(headers)
        if draft not in versions:
            raise _unsupported(draft, versions)

    _check_origin(headers, allowed_origins, secure)

    if draft == "rfc6455":
        return _rfc6455(
            headers,
            RFC6455_BASE_RESPONSE,
            subprotocols=subprotocols,
            compression=compression,
        )
    from stargate import legacy  # the drafts' module builds on this one

    if draft == "hixie-76":
        return legacy.hixie76(
            headers, key3=key3, subprotocols=subprotocols, secure=secure, path=path
        )
    return legacy.hixie75(headers, subprotocols=subprotocols, secure=secure, path=path)


def websocket_handshake(
    headers: HeadersLike,
    allowed_origins: "Iterable[str] | str | None" = None,
    *,
    key3: Key3 = None,
    subprotocols: Subprotocols = (),
    versions: Versions = ALL_VERSIONS,
    compression: bool = False,
    secure: "bool | None" = None,
    path: "str | None" = None,
) -> bytes:
    """Perform the WebSocket handshake; returns the bytes to send back.

    The 2010 entry point: ``negotiate(...).response`` (see :func:`negotiate`
    for the checks and the options). ``compression`` is off by default here,
    because a caller that gets only the bytes cannot learn the deflate
    parameters it would have to frame messages with.

    :param headers: ``request.headers`` (``webob.headers.EnvironHeaders``) or
        any mapping of headers.
    :raises HandShakeFailed: and its subclasses, among them
        :class:`InvalidOrigin`.
    """
    return negotiate(
        headers,
        allowed_origins,
        key3=key3,
        subprotocols=subprotocols,
        versions=versions,
        compression=compression,
        secure=secure,
        path=path,
    ).response


#: Names documented here since 2010 that live in :mod:`stargate.legacy`.
_LEGACY_NAMES = frozenset(
    [
        "handshake_pre76",
        "handshake_v76",
        "HIXIE76_BASE_RESPONSE",
        "HIXIE75_BASE_RESPONSE",
    ]
)


def __getattr__(name: str) -> Any:
    # The hixie drafts are kept apart in stargate.legacy, which imports this
    # module; their documented names are served from there on first use.
    if name in _LEGACY_NAMES:
        from stargate import legacy

        return getattr(legacy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
