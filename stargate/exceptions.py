"""Every error stargate raises, in one tree.

::

    StargateError
     +-- IncorrectlyConfigured          a setting or a deployment that cannot work
     +-- HandShakeFailed                the upgrade request is refused (HTTP 400)
     |    +-- NotWebSocketRequest       a plain HTTP request hit a WebSocket view (426)
     |    +-- UnsupportedVersion        Sec-WebSocket-Version is not one we speak (426)
     |    +-- InvalidOrigin             the Origin is not allowed (403)
     +-- ProtocolError                  the peer broke the framing rules (close 1002)
     |    +-- InvalidPayload            bad UTF-8 in a text message or reason (1007)
     |    +-- PayloadTooBig             a message over the size limit (1009)
     +-- ConnectionClosed               the WebSocket is closed; carries code and reason
     +-- BackendError                   the broadcast backend failed
          +-- BackendUnavailable        the backend cannot be reached right now
          +-- HistoryUnavailable        a position to resume from is no longer known

Handshake errors carry the HTTP ``status`` they map to, protocol errors the
WebSocket ``close_code``. ``stargate.handshake`` and ``stargate.view``
re-export the names their 2010 documentation gave them.
"""

from collections.abc import Iterable

__all__ = [
    "StargateError",
    "IncorrectlyConfigured",
    "HandShakeFailed",
    "NotWebSocketRequest",
    "UnsupportedVersion",
    "InvalidOrigin",
    "ProtocolError",
    "InvalidPayload",
    "PayloadTooBig",
    "ConnectionClosed",
    "BackendError",
    "BackendUnavailable",
    "HistoryUnavailable",
]


class StargateError(Exception):
    """Base class of every exception stargate raises."""


class IncorrectlyConfigured(StargateError):
    """A setting, a view or a deployment that cannot work as configured.

    Raised in place of an assertion error, with a sentence saying what to fix.
    """


class HandShakeFailed(StargateError):
    """The WebSocket upgrade request was refused.

    ``header`` names the request header at fault (or ``None``), ``value`` is
    what the client sent, ``reason`` a sentence for humans. ``status`` is the
    HTTP status the refusal maps to; ``headers`` are extra response headers.
    """

    status = 400

    def __init__(
        self,
        reason: "str | None" = None,
        header: "str | None" = None,
        value: "str | bytes | None" = None,
        headers: "Iterable[tuple[str, str]]" = (),
    ) -> None:
        self.header = header
        self.value = value
        self.headers = list(headers)
        if reason is None:
            if header is None:
                reason = "invalid WebSocket handshake"
            elif value is None:
                reason = f"missing {header} header"
            else:
                reason = f"invalid {header} header: {value!r}"
        self.reason = reason
        super().__init__(reason)


class NotWebSocketRequest(HandShakeFailed):
    """A plain HTTP request (no ``Upgrade: websocket``) reached a WebSocket view."""

    status = 426


class UnsupportedVersion(HandShakeFailed):
    """The client asked for a protocol version this server does not speak.

    The response carries ``Sec-WebSocket-Version`` with the versions we do.
    """

    status = 426


class InvalidOrigin(HandShakeFailed):
    """The request's ``Origin`` is not in the allowed origins."""

    status = 403


class ProtocolError(StargateError):
    """The peer broke the WebSocket framing rules.

    ``close_code`` is the status code the connection is closed with.
    """

    close_code = 1002

    def __init__(self, reason: str, close_code: "int | None" = None) -> None:
        if close_code is not None:
            self.close_code = close_code
        self.reason = reason
        super().__init__(reason)


class InvalidPayload(ProtocolError):
    """A text message or close reason that is not valid UTF-8."""

    close_code = 1007


class PayloadTooBig(ProtocolError):
    """A frame or message larger than the configured limit."""

    close_code = 1009


class ConnectionClosed(StargateError):
    """The operation needs an open WebSocket and this one is closed.

    ``code`` and ``reason`` are the close status received from the peer
    (1006 and ``""`` when the connection ended without a closing handshake).
    """

    def __init__(self, code: int = 1006, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        detail = f": {reason}" if reason else ""
        super().__init__(f"WebSocket closed (code {code}{detail})")


class BackendError(StargateError):
    """The broadcast backend failed to carry out an operation."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached (Redis down); the message was not sent."""


class HistoryUnavailable(BackendError):
    """A listener asked to resume from a position the channel no longer holds.

    ``epoch`` and ``offset`` are the channel's current position, so the
    application can reload its state and continue from there.
    """

    def __init__(
        self, reason: str, epoch: "str | None" = None, offset: "int | None" = None
    ) -> None:
        self.epoch = epoch
        self.offset = offset
        super().__init__(reason)
