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

import contextvars
import functools
import inspect
import logging
import socket

from pyramid.events import NewResponse
from pyramid.httpexceptions import (
    HTTPBadRequest,
    HTTPClientError,
    HTTPForbidden,
    HTTPNotImplemented,
    HTTPServiceUnavailable,
)
from pyramid.response import Response
from pyramid.threadlocal import manager as threadlocal_manager
from zope.interface import implementedBy

from stargate import handshake as _handshake
from stargate import runtime
from stargate.config import get_settings
from stargate.connection import WebSocket, shutting_down
from stargate.environ_keys import (
    HAND_OFF_KEY,
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
#: The logger of stargate's server (:mod:`stargate.factory`), where an error
#: the router would have raised to it is logged.
server_log = logging.getLogger("stargate.server")


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
    ``own_green_thread``
        ``False``: :meth:`handler` runs in the request's green thread,
        under the server, the router and the tweens (the default: the
        ``stargate.own_green_thread`` setting is false). ``True``: on
        stargate's own server it runs in a green thread of its own and the
        request's ends, which halves what a parked connection costs (see
        :meth:`handle_websocket`). The one difference a handler can see: a
        value kept per green thread (a ``threading.local`` the runtime made
        green, not Pyramid's) set before the view is not the handler's.
    """

    subprotocols = ()
    allowed_origins = None
    max_message_size = None
    keep_open = False
    own_green_thread: bool | None = None

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

        With ``own_green_thread``, on stargate's own server, when only
        Pyramid's router (no tween, WSGI middleware, view decorator or
        ``NewResponse`` subscriber, which would see the view return) lies
        between the server and the view (otherwise a WARNING of
        ``stargate.view`` names what stands in the way, once), the handler
        runs in a new green thread and the request's returns at once: a
        parked connection then holds a shallow stack instead of the
        server's, router's and view's frames (14 KiB less). The handler gets the
        same request, with ``get_current_request()``,
        ``get_current_registry()``, its ``context`` and the request's context
        variables; the request's response and finished callbacks run after it
        returns, in order; the connection keeps its place in the server's
        ``max_clients``, and a stopping worker waits for the handler (within
        ``shutdown_timeout``).
        """
        global _open_connections
        _open_connections += 1
        if self.keep_open:
            websocket.add_close_callback(_connection_ended)
            self._run_handler(websocket)
            return self._leave_open(websocket)
        own = self.own_green_thread
        if own is None:
            own = self.settings.own_green_thread
        hand_off = own and self._hand_off(inspect.currentframe())
        if hand_off:
            return self._handed_off(websocket, hand_off)
        try:
            self._run_until_closed(websocket)
        finally:
            if not getattr(self, "_handed_over", False):
                # The server closes the socket when the request ends.
                websocket.finish(websocket.close_timeout)
        return self._taken_over()

    def _run_until_closed(self, websocket):
        """Run the handler; then the connection no longer counts and is
        closed (1000, unless it is closed already)."""
        global _open_connections
        try:
            self._run_handler(websocket)
        finally:
            _open_connections -= 1
            if not websocket.closed:
                websocket.close()

    def _hand_off(self, frame):
        """``environ[HAND_OFF_KEY]`` if the handler may run in a green thread
        of its own: nothing the application added between the server and
        ``frame`` (:meth:`handle_websocket`'s) would see the view return
        before the handler does. Otherwise ``None``, and the reason is
        logged once per view class: the application asked for the thread."""
        if not getattr(self, "_handed_over", False):
            return self._stays("the server keeps the socket for the request")
        request = self.request
        hand_off = request.environ.get(HAND_OFF_KEY)
        if hand_off is None:
            return self._stays("the server cannot start the handler's thread")
        if _observes_responses(request.registry):
            return self._stays("a NewResponse subscriber would see the view return")
        caller = frame.f_back if frame is not None else None
        while caller is not None:
            module = caller.f_globals.get("__name__", "")
            if module.startswith(_SERVER_MODULES):
                return hand_off
            if not (
                module.startswith(_ROUTER_MODULES)
                or _passes_through(caller, request.environ)
            ):
                return self._stays(
                    f"{module}.{caller.f_code.co_name} (a tween, WSGI "
                    "middleware or view decorator) lies between the server and "
                    "the view and would see it return"
                )
            caller = caller.f_back
        return self._stays("the view was not called by stargate's server")

    def _stays(self, reason):
        """Say once per view class and reason why its handler stays in the
        request's green thread (``own_green_thread`` asked for its own)."""
        cls = type(self)
        if (cls, reason) not in _STAYING:
            _STAYING.add((cls, reason))
            log.warning(
                "%s.own_green_thread: the handler runs in the request's green "
                "thread: %s",
                cls.__qualname__,
                reason,
            )
        return None

    def _handed_off(self, websocket, hand_off):
        """The request ends now; the handler starts when the router is done
        with it (when the server calls the response)."""
        response = _HandedOff(status=101, app_iter=[])
        response.start = functools.partial(
            hand_off,
            self._run_handed_off,
            websocket,
            _AfterHandler(self.request),
            contextvars.copy_context(),
        )
        runtime.current().mark_taken_over(self.request.environ)
        return response

    def _run_handed_off(self, websocket, after, context):
        """In the handler's own green thread: what the request's green
        thread did until the handler returned, in the same order."""
        # The request's context variables (greenlet's public attribute; a
        # Context.run() call would keep one more C frame on the stack).
        runtime.current().getcurrent().gr_context = context
        request = self.request
        after.resume(request)
        # Pyramid's router and pyramid.scripting push the same frame.
        threadlocal_manager.push({"registry": request.registry, "request": request})
        try:
            try:
                self._run_until_closed(websocket)
                after.response_callbacks(request)
            finally:
                after.finished_callbacks(request)
        except Exception:
            # Where the router's caller would have logged it.
            server_log.error(
                "%s %s failed",
                request.environ.get("REQUEST_METHOD", "?"),
                request.environ.get("PATH_INFO", ""),
                exc_info=True,
            )
        finally:
            threadlocal_manager.pop()
            _handler_ended()

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


class _HandedOff(_TakenOver):
    """A taken-over response whose handler starts in its own green thread
    when the server calls it: Pyramid's router has then finished with the
    request (its callbacks ran, its thread-local frame is popped)."""

    start = None

    def __call__(self, environ, start_response):
        global _handlers_running
        start, self.start = self.start, None
        if start is not None:
            _handlers_running += 1  # from now on, a stopping worker waits
            start()
        return super().__call__(environ, start_response)


#: Modules whose frames may lie between the server and a view whose handler
#: is handed off: Pyramid's router, tweens and view derivers, stargate's view
#: and error page, the WSGI servers' request code. Any other frame (a tween,
#: WSGI middleware, a view decorator, an override of WebSocketView's
#: methods) would see the view return before the handler does.
_ROUTER_MODULES = (
    "pyramid.",
    "stargate.view",
    "stargate.factory",
    "eventlet.wsgi",
    "gevent.pywsgi",
)

#: ``(view class, reason)`` for each ``own_green_thread`` declined and logged.
_STAYING: set[tuple[type, str]] = set()

#: Where the walk up from the view ends: stargate's servers.
_SERVER_MODULES = ("stargate.servers.",)


def _passes_through(frame, environ):
    """Whether ``frame`` is pyramid_tm's tween for a request it does not
    manage (stargate's ``tm.activate_hook`` declines WebSocket upgrades):
    it returns what the view returned and does nothing after."""
    return (
        frame.f_code.co_name == "tm_tween"
        and frame.f_globals.get("__name__") == "pyramid_tm"
        and "tm.active" not in environ
    )


def _observes_responses(registry):
    """Whether a subscriber would see ``NewResponse``, which the router
    sends when the view returns."""
    if not getattr(registry, "has_listeners", True):
        return False
    # zope.interface's public lookup of the handlers an event would reach.
    return bool(registry.adapters.subscriptions((implementedBy(NewResponse),), None))


class _AfterHandler:
    """What Pyramid's router does with a request once the view returned,
    kept for after a handed-off handler: the request's pending response and
    finished callbacks, and its ``context`` (the router drops it)."""

    __slots__ = ("context", "pending_response", "pending_finished")

    def __init__(self, request):
        state = vars(request)
        self.context = state.get("context")
        # Pyramid keeps them in reified deques: taken away here, the router
        # finds none to run when the view returns.
        self.pending_response = state.pop("response_callbacks", None)
        self.pending_finished = state.pop("finished_callbacks", None)

    def resume(self, request):
        """In the handler's green thread: the request as the handler would
        have found it in the request's."""
        state = vars(request)
        if self.context is not None:
            state["context"] = self.context
        # The router's empty deques go (reified again when needed).
        for name, pending in (
            ("response_callbacks", self.pending_response),
            ("finished_callbacks", self.pending_finished),
        ):
            if pending is None:
                state.pop(name, None)
            else:
                state[name] = pending
        self.pending_response = self.pending_finished = None

    def response_callbacks(self, request):
        # The router's own calls: Pyramid offers no public one. The response
        # the server was given is gone; an equal one stands for it.
        if request.response_callbacks:
            request._process_response_callbacks(_TakenOver(status=101, app_iter=[]))

    def finished_callbacks(self, request):
        try:
            if request.finished_callbacks:
                request._process_finished_callbacks()
        finally:
            vars(request).pop("context", None)  # as the router: no ref cycle


#: Handed-off handlers still running, and the event a stopping worker waits
#: on for them (:func:`wait_for_handlers`).
_handlers_running = 0
_handlers_done = None


def _handler_ended():
    global _handlers_running, _handlers_done
    _handlers_running -= 1
    done = _handlers_done
    if not _handlers_running and done is not None:
        _handlers_done = None
        done.send(True)


def wait_for_handlers(timeout):
    """Wait up to ``timeout`` seconds for the handlers running in green
    threads of their own to return, so that a stopping worker runs their
    ``finally`` blocks (their connections are closed by then)."""
    global _handlers_done
    if not _handlers_running:
        return
    if _handlers_done is None:
        _handlers_done = runtime.current().Event()
    _handlers_done.wait(timeout)


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
