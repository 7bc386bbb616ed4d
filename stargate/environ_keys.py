"""The WSGI environ keys stargate's server sets for its view.

They live here, not in :mod:`stargate.factory` (the server that sets them) or
:mod:`stargate.view` (the view that reads them), so that each side imports
the same names from a small module with no dependencies, and a server other
than stargate's own (:mod:`stargate.gunicorn`) can set them too.
"""

from __future__ import annotations

__all__ = [
    "CLIENT_SOCKET_KEY",
    "PROXIED_KEY",
    "REQUEST_RFILE_KEY",
    "RELEASE_BUFFERS_KEY",
    "TRUE_PROTOCOL_KEY",
    "TAKEN_OVER_KEY",
    "WEBSOCKET_OPENED_KEY",
    "HAND_OFF_KEY",
]

#: Set by stargate's server: ``SERVER_PROTOCOL`` is the request's own HTTP
#: version (eventlet's server always says HTTP/1.0), so the handshake can
#: refuse HTTP/1.0 upgrades.
TRUE_PROTOCOL_KEY = "stargate.server_protocol_known"

#: A callable that frees the connection's HTTP buffers when it becomes a
#: WebSocket and returns the bytes read past the request (a client's first
#: frames, sent with the upgrade).
RELEASE_BUFFERS_KEY = "stargate.release_http_buffers"

#: Called by the view with each WebSocket it opens, so the server logs the
#: session and counts it (:func:`stargate.factory.websocket_opened`).
WEBSOCKET_OPENED_KEY = "stargate.websocket_opened"

#: Set when the request came through a trusted proxy: its ``REMOTE_ADDR`` is
#: the client the proxy named, not the proxy.
PROXIED_KEY = "stargate.proxied"

#: Set by stargate's gevent server: the client socket, which the view takes
#: over for the WebSocket (eventlet's server has ``eventlet.input``, gunicorn
#: ``gunicorn.socket``).
CLIENT_SOCKET_KEY = "stargate.client_socket"

#: Set by stargate's gevent server: the request's buffered reader, from
#: which the view reads hixie-76's eight key bytes (they follow the headers).
REQUEST_RFILE_KEY = "stargate.request_rfile"

#: Set by the view once it took the connection over: the server writes no
#: response of its own and leaves the socket alone.
TAKEN_OVER_KEY = "stargate.taken_over"

#: Set by stargate's server: ``hand_off(function, *args)`` runs
#: ``function(*args)`` in a new green thread that counts as the request's
#: connection (its ``max_clients`` slot) until it returns, so the request's
#: own green thread, with the server, router and tweens under the view, can
#: end while a blocking handler goes on (:class:`~stargate.WebSocketView`).
HAND_OFF_KEY = "stargate.hand_off"
