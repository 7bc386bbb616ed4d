"""Telling a WebSocket upgrade request from any other request."""

from pyramid.exceptions import ConfigurationError, PredicateMismatch

__all__ = ["is_websocket", "WebSocketPredicate", "includeme"]

#: Set in the environ when a ``websocket=True`` view was passed over
#: because the request is not an upgrade.
_PASSED_OVER = "stargate.websocket_view_passed_over"


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
        upgrade = is_websocket(context, request)
        if self.value and not upgrade:
            request.environ[_PASSED_OVER] = True
        return upgrade is self.value


class _PassedOverPredicate:
    """``stargate_passed_over=True``: a ``websocket=True`` view was passed
    over for this request because it is not an upgrade."""

    def __init__(self, value, config):
        self.value = bool(value)

    def text(self):
        return f"stargate_passed_over = {self.value}"

    phash = text

    def __call__(self, context, request):
        return bool(request.environ.get(_PASSED_OVER)) is self.value


def includeme(config):
    """Register the ``websocket`` view predicate, and answer a plain request
    that matched no view because its route serves only WebSockets with 426
    "this is a WebSocket endpoint" instead of Pyramid's 404. A route that
    also has a ``websocket=False`` view serves that view, as before.
    """
    from stargate.view import not_an_upgrade

    config.add_view_predicate("websocket", WebSocketPredicate)
    config.add_view_predicate("stargate_passed_over", _PassedOverPredicate)
    config.add_exception_view(
        not_an_upgrade, context=PredicateMismatch, stargate_passed_over=True
    )
