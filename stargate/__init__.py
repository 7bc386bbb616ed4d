"""WebSocket support and a pub/sub broadcast hub for Pyramid, on eventlet.

WebSocket support for pyramid is implemented as a view which handles the
upgrade request and a resource which manages the persistent connected
clients. Both should be subclassed to provide the send and receive
functionality desired::

    from stargate import WebSocketAwareResource, WebSocketView

    class Room(WebSocketAwareResource):
        ...

    class RoomView(WebSocketView):
        def handler(self, websocket):
            self.request.context.add_listener(websocket)
            while (message := websocket.wait()) is not None:
                self.request.context.send(message)

    config.include("stargate")
    config.add_view(RoomView, context=Room, websocket=True)

The names are loaded on first use, so ``import stargate`` stays cheap and
does not import eventlet before a server monkey-patches it.
"""

import importlib

__all__ = [
    "is_websocket",
    "WebSocketView",
    "WebSocketAwareResource",
    "includeme",
]

__version__ = "2.0.0.dev0"

_LAZY = {
    "is_websocket": "stargate.predicates",
    "WebSocketView": "stargate.view",
    "WebSocketAwareResource": "stargate.resource",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stargate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def includeme(config):
    """``config.include('stargate')``: see :func:`stargate.config.includeme`."""
    from stargate.config import includeme as _includeme

    _includeme(config)
