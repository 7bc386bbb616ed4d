"""WebSocketView: complete the upgrade, then hand the connection to a handler.

Subclass it and override :meth:`WebSocketView.handler`::

    class EchoView(WebSocketView):
        def handler(self, websocket):
            while (message := websocket.wait()) is not None:
                websocket.send(message)

    config.add_view(EchoView, route_name="echo", websocket=True)

Every refusal is decided in :meth:`WebSocketView.handle_upgrade`, and each
maps to one status: a plain HTTP request gets 426 with a readable page, a
malformed upgrade 400 (``HTTPBadRequest``) with the reason, a refused origin
403, an unsupported version 426 with ``Sec-WebSocket-Version``, a worker at
its connection limit 503.
"""

import logging
import socket

from pyramid.httpexceptions import (
    HTTPBadRequest,
    HTTPClientError,
    HTTPForbidden,
    HTTPNotImplemented,
    HTTPServiceUnavailable,
)
from pyramid.response import Response
from pyramid.threadlocal import manager as threadlocal_manager

from stargate import handshake as _handshake
from stargate import runtime
from stargate.config import get_settings
from stargate.connection import WebSocket, shutting_down
from stargate.environ_keys import (
    RELEASE_BUFFERS_KEY,
    TRUE_PROTOCOL_KEY,
    WEBSOCKET_OPENED_KEY,
)
from stargate.exceptions import (
    ConnectionClosed,
    HandShakeFailed,
    IncorrectlyConfigured,
    NotWebSocketRequest,
)
from stargate.gunicorn import client_socket as gunicorn_socket
from stargate.gunicorn import end_request as end_gunicorn_request
from stargate.protocol import ServerProtocol

__all__ = ["WebSocketView", "IncorrectlyConfigured"]

log = logging.getLogger("stargate.view")


class HTTPUpgradeRequired(HTTPClientError):
    """426 Upgrade Required (RFC 9110), which Pyramid does not define."""

    code = 426
    title = "Upgrade Required"
    explanation = "This resource must be reached with a WebSocket."


_STATUS_EXCEPTIONS = {
    400: HTTPBadRequest,
    403: HTTPForbidden,
    426: HTTPUpgradeRequired,
}

#: Open WebSockets in this process, for ``stargate.max_connections``.
_open_connections = 0


def open_connections():
    """How many WebSockets this process holds open through WebSocketView."""
    return _open_connections


class WebSocketView:
    """A view for handling websockets.

    Calling the view runs :meth:`handle_upgrade`. Class attributes tune one
    view; ``None`` means "use the ``stargate.*`` setting":

    ``subprotocols``
        Subprotocols this view speaks, in order of preference.
    ``allowed_origins``
        Origins allowed to connect; see ``stargate.allowed_origins``.
    ``max_message_size``
        Largest message accepted, in bytes.
    ``keep_open``
        ``False`` (the default): the connection lasts as long as
        :meth:`handler` runs and is closed when it returns. ``True``: the
        handler sets the connection up (``add_listener(websocket)``,
        ``websocket.on_message = ...``) and returns; the connection stays
        open, with no green thread of its own, until either side closes it.
        What the client sends goes to ``websocket.on_message`` (ignored
        when unset).
    """

    subprotocols = ()
    allowed_origins = None
    max_message_size = None
    keep_open = False

    def __init__(self, request):
        self.request = request
        self.settings = get_settings(request.registry)

    def __call__(self):
        return self.handle_upgrade()

    def handle_upgrade(self):
        """Completes the upgrade request sent by the browser.

        Sends the handshake response and hands off to
        :meth:`handle_websocket`. Returns ``HTTPBadRequest`` (400) with the
        reason when the handshake fails, ``HTTPForbidden`` (403) for a refused
        origin, 426 for a request that is not a WebSocket upgrade or asks for
        a version this server does not speak, and 503 when the worker is at
        ``stargate.max_connections``.
        """
        request = self.request
        environ = request.environ
        settings = self.settings
        key3 = None
        headers = request.headers
        # eventlet.wsgi.server always reports HTTP/1.0: unless stargate's own
        # server says the request's real version, the handshake must not
        # judge it.
        version_known = not (
            runtime.current().reports_http_10(environ)
            and environ.get("SERVER_PROTOCOL") == "HTTP/1.0"
            and not environ.get(TRUE_PROTOCOL_KEY)
        )
        upgrade = _handshake.Request.from_environ(environ, version_known=version_known)
        if (
            "Sec-WebSocket-Key1" in headers
            and "Sec-WebSocket-Version" not in headers
            and "hixie-76" in settings.protocols
        ):
            # Only a hixie-76 request the server accepts is worth waiting for:
            # otherwise negotiate() refuses it (426) without the key bytes.
            key3 = _read_key3(environ, settings.handshake_timeout)
        try:
            handshake = _handshake.negotiate(
                upgrade,
                self._allowed_origins(),
                key3=key3,
                subprotocols=tuple(self.subprotocols),
                versions=settings.protocols,
                compression=settings.compression,
            )
        except HandShakeFailed as exc:
            return self.refuse(exc)

        try:
            sock = self._hijack_socket()
        except IncorrectlyConfigured as exc:
            # A server that cannot hand the connection over (waitress,
            # gunicorn's sync worker): the client hears why, in one line.
            log.error("cannot take a WebSocket over: %s", exc)
            return HTTPNotImplemented(detail=str(exc))
        if settings.max_connections and _open_connections >= settings.max_connections:
            log.warning(
                "refusing a WebSocket: %d open, stargate.max_connections is %d",
                _open_connections,
                settings.max_connections,
            )
            return HTTPServiceUnavailable(
                "This server holds as many WebSocket connections as it is allowed; "
                "try again later."
            )
        try:
            sock.sendall(handshake.response)
        except OSError as exc:
            log.debug("client left during the handshake: %s", exc)
            return self._taken_over()
        # stargate's server hands the socket over with what it read ahead
        # (frames a client sent with the upgrade request); another server
        # keeps the socket, so the request must last as long as the WebSocket.
        hand_over = environ.get(RELEASE_BUFFERS_KEY)
        self._handed_over = hand_over is not None
        initial_data = hand_over() if hand_over is not None else b""
        max_size = self.max_message_size
        if max_size is None:
            max_size = settings.max_message_size
        protocol = ServerProtocol(
            handshake.wire_format,
            max_message_size=max_size,
            deliver_before_failing=True,
        )
        websocket = WebSocket(
            sock,
            protocol,
            environ=environ,
            subprotocol=handshake.subprotocol,
            initial_data=initial_data or b"",
            message_context=_registry_context(request.registry),
            **settings.connection_options(),
        )
        opened = environ.get(WEBSOCKET_OPENED_KEY)  # stargate's server logs it
        if opened is not None:
            opened(websocket)
        if shutting_down():
            # The worker's closing sweep ran while this request was still
            # arriving: this connection goes away with the others.
            websocket.close(1001, "server shutting down")
            if not self._handed_over:
                websocket.finish(websocket.close_timeout)
            return self._taken_over()
        return self.handle_websocket(websocket)

    def handle_websocket(self, websocket):
        """Handles the connection after setup and handshake is done.

        Runs :meth:`handler` until it returns, then closes the socket (1000,
        or 1011 if the handler raised; the traceback is logged). A handler
        stopped by :class:`~stargate.exceptions.ConnectionClosed` (the
        client left while it was sending) is logged in one DEBUG line. Returns
        the response that tells the WSGI server the connection was taken
        over.
        """
        global _open_connections
        _open_connections += 1
        if self.keep_open:
            websocket.add_close_callback(_connection_ended)
            self._run_handler(websocket)
            return self._leave_open(websocket)
        try:
            self._run_handler(websocket)
        finally:
            _open_connections -= 1
            if not websocket.closed:
                websocket.close()
            if not getattr(self, "_handed_over", False):
                # The server closes the socket when the request ends.
                websocket.finish(websocket.close_timeout)
        return self._taken_over()

    def _run_handler(self, websocket):
        try:
            self.handler(websocket)
        except ConnectionClosed as exc:
            # The client went away while the handler sent: expected, not a
            # failure of the handler. One line, no traceback.
            log.debug(
                "%s.handler ended: the client closed the connection (%s)",
                type(self).__name__,
                exc,
            )
        except Exception:
            log.exception("WebSocket handler %s.handler failed", type(self).__name__)
            if not websocket.closed:
                websocket.close(1011, "internal error")

    def _leave_open(self, websocket):
        """``keep_open``: the request ends, the connection stays with the
        hub. It keeps only the environ keys its properties and logs read."""
        if websocket.on_message is None:
            websocket.on_message = _ignore_message
        if getattr(self, "_handed_over", False):
            environ = websocket.environ
            websocket.environ = {
                key: environ[key] for key in _KEPT_ENVIRON_KEYS if key in environ
            }
        else:
            # Another server closes the socket when the request ends: the
            # request lasts as long as the connection.
            websocket.finish(None)
        return self._taken_over()

    def handler(self, websocket):
        """Handles the interaction with the websocket after being set up.

        This is the method to override in subclasses to receive and send
        messages over the websocket connection.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must override handler(websocket) to talk to "
            "the client"
        )

    def refuse(self, error):
        """The response for a refused handshake: one status per error."""
        return refusal(error)

    def _allowed_origins(self):
        if self.allowed_origins is not None:
            return self.allowed_origins
        return self.settings.allowed_origins

    def _hijack_socket(self):
        environ = self.request.environ
        sock = runtime.current().server_socket(environ)
        if sock is None:
            sock = gunicorn_socket(environ)  # raises under its other workers
        if sock is None:
            server = environ.get("SERVER_SOFTWARE") or "this WSGI server"
            raise IncorrectlyConfigured(
                f"{server} cannot carry a WebSocket: WebSocketView needs a "
                "server that lets it take the connection over; serve the "
                "application with stargate's server (use = egg:stargate#main "
                "in the .ini, or `stargate demo`), gunicorn -k gevent or "
                "gunicorn -k eventlet"
            )
        # The server's request timeout guarded the handshake; from here on
        # the WebSocket's own ping settings decide when a peer is gone.
        sock.settimeout(None)
        try:
            # Small messages leave at once instead of waiting for an ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a Unix socket in tests)
        return sock

    def _taken_over(self):
        """The response that tells the server the connection is the view's."""
        runtime.current().mark_taken_over(self.request.environ)
        return _TakenOver(status=101, app_iter=[])


class _TakenOver(Response):
    """The response of a request whose connection the view took over:
    under gunicorn, calling it ends the request with nothing written
    (:func:`stargate.gunicorn.end_request`)."""

    def __call__(self, environ, start_response):
        end_gunicorn_request(environ)
        return super().__call__(environ, start_response)


def refusal(error):
    """The response for a refused :class:`~stargate.exceptions.HandShakeFailed`:
    its status (400, 403 or 426) with its reason, and its headers."""
    exc_class = _STATUS_EXCEPTIONS.get(error.status, HTTPBadRequest)
    response = exc_class(detail=error.reason)
    for name, value in error.headers:
        response.headers[name] = value
    if error.status == 426 and "Upgrade" not in response.headers:
        response.headers["Upgrade"] = "websocket"
        response.headers.setdefault("Connection", "Upgrade")
    log.info("refused WebSocket upgrade (%d): %s", error.status, error.reason)
    return response


def not_an_upgrade(exc, request):
    """Exception view: a plain request reached a route whose only views are
    ``websocket=True`` ones. Pyramid would answer 404 (no view matched);
    this is a WebSocket endpoint, so the answer is 426 Upgrade Required."""
    return refusal(
        NotWebSocketRequest(
            "this is a WebSocket endpoint; connect with a WebSocket client",
            header="Upgrade",
            value=request.headers.get("Upgrade"),
        )
    )


#: What a ``keep_open`` connection keeps of its upgrade request's environ.
_KEPT_ENVIRON_KEYS = (
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "QUERY_STRING",
    "SERVER_NAME",
    "SERVER_PORT",
    "REMOTE_ADDR",
    "REMOTE_PORT",
    "HTTP_HOST",
    "HTTP_ORIGIN",
    "HTTP_SEC_WEBSOCKET_ORIGIN",
    "wsgi.url_scheme",
)


class _RegistryContext:
    """Makes an application's registry current (as in a request) around a
    ``keep_open`` connection's ``on_message`` calls, which run after the
    request ended: ``get_current_registry()``, and so a resource's hub, is
    the application's there too. One per registry."""

    __slots__ = ("_registry",)

    def __init__(self, registry):
        self._registry = registry

    def __call__(self):
        return self

    def __enter__(self):
        # Pyramid's own router and pyramid.scripting push the same frame.
        threadlocal_manager.push({"registry": self._registry, "request": None})

    def __exit__(self, *exc_info):
        threadlocal_manager.pop()


def _registry_context(registry):
    context = getattr(registry, "_stargate_registry_context", None)
    if context is None:
        context = registry._stargate_registry_context = _RegistryContext(registry)
    return context


def _connection_ended(websocket):
    global _open_connections
    _open_connections -= 1


def _ignore_message(websocket, message):
    """A ``keep_open`` connection's messages when nobody asked for them."""


def _read_key3(environ, timeout):
    """Read hixie-76's 8 key bytes, which follow the request headers."""
    rfile = runtime.current().request_rfile(environ)
    if rfile is None:
        return None
    data = b""
    with runtime.current().Timeout(timeout, False):
        try:
            while len(data) < 8:
                chunk = rfile.read(8 - len(data))
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    return data
