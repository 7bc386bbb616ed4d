"""Telling a WebSocket upgrade request from any other request."""

from pyramid.exceptions import ConfigurationError

__all__ = ["is_websocket", "WebSocketPredicate"]


def _tokens(value):
    return {token.strip().lower() for token in (value or "").split(",")}


def is_websocket(context, request):
    """Custom predicate to denote a websocket handshake.

    True when the request asks to upgrade its connection to a WebSocket
    (``Upgrade: websocket`` and ``Connection: upgrade``), whatever the
    protocol draft. Kept callable as documented in 2010; on Pyramid 2 use the
    ``websocket=True`` view predicate that ``config.include('stargate')``
    registers.
    """
    headers = request.headers
    return "websocket" in _tokens(headers.get("Upgrade")) and "upgrade" in _tokens(
        headers.get("Connection")
    )


class WebSocketPredicate:
    """The ``websocket`` view predicate: ``add_view(..., websocket=True)``.

    ``True`` matches upgrade requests only, ``False`` everything else, so one
    URL can serve a page and a WebSocket from two views.
    """

    def __init__(self, value, config):
        if not isinstance(value, bool):
            raise ConfigurationError(
                f"the websocket view predicate takes True or False, not {value!r}"
            )
        self.value = value

    def text(self):
        return f"websocket = {self.value}"

    phash = text

    def __call__(self, context, request):
        return is_websocket(context, request) is self.value
