"""The stargate demo: a chat, an echo endpoint and the jobs example.

Run it with ``stargate demo`` or ``pserve development.ini`` (the ``.ini``
ships next to this module). Endpoints:

``/``
    A small chat page (plain JavaScript, no external resources).
``/echo``
    A WebSocket that sends every message back: text as text, binary as
    binary. A browser's plain GET gets a small page that talks to it; any
    other plain GET gets 426 saying what this URL is.
``/rooms/{name}``
    A WebSocket per chat room. Every message received is broadcast to every
    listener of the room, the sender included. The room resource is built
    per request by the route factory; its channel is its traversal path,
    ``/rooms/<name>``, so every request (and, with the Redis backend, every
    worker process) agrees on who listens. Rooms keep a history (on the
    memory and ``redis+streams://`` backends): every JSON message gets the
    room's ``epoch`` and ``offset``, and a page that reconnects with
    ``/rooms/<name>?epoch=E&offset=N`` first gets what it missed. When that
    is impossible it gets ``{"type": "reset", "epoch": ..., "offset": ...}``
    and then the live messages.
``/jobs/{id}``
    The example of the original documentation: a long-lived ``Job``
    resource. A WebSocket to this URL listens to the job's state changes;
    a plain GET returns its state as JSON. ``POST /jobs/{id}/start`` and
    ``POST /jobs/{id}/stop`` change the state and broadcast it as JSON text.
    Jobs live in the worker process that served the request: with several
    workers, a job's state is per worker while its broadcasts reach every
    worker through the Redis backend.
"""

import datetime
import importlib.resources
import json
import logging

from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPNotFound
from pyramid.response import Response

from stargate import WebSocketAwareResource, WebSocketView
from stargate.backends.base import Position, keeps_history
from stargate.exceptions import BackendUnavailable, HistoryUnavailable

__all__ = ["main", "make_app", "Room", "Job", "EchoView", "RoomView", "JobView"]

log = logging.getLogger("stargate.demo")


class Location:
    """A plain traversal node, so resources below it have a path."""

    def __init__(self, name="", parent=None):
        self.__name__ = name
        self.__parent__ = parent


#: The tree the demo's resources hang from: ``/``, ``/rooms``, ``/jobs``.
ROOT = Location()
ROOMS = Location("rooms", ROOT)
JOBS = Location("jobs", ROOT)


# -- /echo --------------------------------------------------------------------


class EchoView(WebSocketView):
    """Sends every message back as it came: text as text, binary as binary."""

    def handler(self, websocket):
        while True:
            message = websocket.wait()
            if message is None:
                return
            websocket.send(message)


# -- /rooms/{name} ------------------------------------------------------------


class Room(WebSocketAwareResource):
    """A chat room. Built per request; its channel is ``/rooms/<name>``."""

    #: Messages a room keeps for pages that reconnect, and for how long.
    history_size = 500
    history_ttl = 3600

    def __init__(self, name):
        self.__name__ = name
        self.__parent__ = ROOMS

    def history_policy(self):
        if not keeps_history(self.hub.backend):
            return None  # redis:// pub/sub keeps no history: plain broadcast
        return super().history_policy()

    def format_message(self, message, position):
        """JSON objects get the room's ``epoch`` and ``offset``; anything
        else is sent as it came."""
        if isinstance(message, str) and message.startswith("{"):
            try:
                data = json.loads(message)
            except ValueError:
                return message
            if isinstance(data, dict):
                data["epoch"], data["offset"] = position.epoch, position.offset
                return json.dumps(data)
        return message


def room_factory(request):
    """Route factory: the room named in the URL."""
    return Room(request.matchdict["name"])


class RoomView(WebSocketView):
    """Joins the room, then broadcasts whatever the client sends to it."""

    def handler(self, websocket):
        room = self.request.context
        if _joined(room, websocket, self._join):
            self._chat(room, websocket)

    def _join(self, room, websocket):
        since = _since(self.request.params)
        try:
            room.add_listener(websocket, since=since)
        except HistoryUnavailable as exc:
            # Too old, or the room's history was lost: say so, go on live.
            websocket.send(
                json.dumps(
                    {
                        "type": "reset",
                        "epoch": exc.epoch,
                        "offset": exc.offset,
                        "reason": str(exc),
                    }
                )
            )
            room.add_listener(websocket)

    def _chat(self, room, websocket):
        try:
            while True:
                message = websocket.wait()
                if message is None:
                    return
                try:
                    room.send(message)
                except BackendUnavailable as exc:
                    # The message was not sent: say so with "try again
                    # later"; the page reconnects and the user resends.
                    log.warning(
                        "room %s: message not sent, BackendUnavailable: %s",
                        room.__name__,
                        exc,
                    )
                    websocket.close(1013, "message not sent: try again later")
                    return
        finally:
            room.remove_listener(websocket)


def _joined(resource, websocket, join):
    """Run ``join(resource, websocket)``; if the backend cannot be reached
    (Redis down), log one line and close with 1013 "try again later", as a
    message that cannot be sent does, instead of a traceback and 1011."""
    try:
        join(resource, websocket)
    except BackendUnavailable as exc:
        log.warning(
            "%s %s: could not join, BackendUnavailable: %s",
            type(resource).__name__.lower(),
            resource.__name__,
            exc,
        )
        websocket.close(1013, "cannot join now: try again later")
        return False
    return True


def _since(params):
    """The position a page asks to resume from, or ``None``."""
    if "epoch" not in params or "offset" not in params:
        return None
    try:
        return Position.coerce((params["epoch"], params["offset"]))
    except (TypeError, ValueError):
        return None


# -- /jobs/{id} ---------------------------------------------------------------


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Job(WebSocketAwareResource):
    """A job whose listeners hear about every change of its state.

    Long-lived: the route factory keeps one per id in the registry, the way
    the original documentation kept resources in a persistent tree.
    """

    def __init__(self, job_id):
        self.__name__ = job_id
        self.__parent__ = JOBS
        self.state = "new"
        self.changed = _now()

    def as_dict(self):
        return {"job": self.__name__, "state": self.state, "changed": self.changed}

    def as_json(self):
        return json.dumps(self.as_dict())

    def change(self, state):
        """Set the state and tell every listener, as JSON text."""
        self.state = state
        self.changed = _now()
        self.send(self.as_json())


def job_factory(request):
    """Route factory: the job named in the URL, made on first use."""
    jobs = request.registry.demo_jobs
    job_id = request.matchdict["id"]
    if job_id not in jobs:
        jobs[job_id] = Job(job_id)
    return jobs[job_id]


class JobView(WebSocketView):
    """Listens to a job: sends its state now, then each change."""

    def handler(self, websocket):
        job = self.request.context
        if not _joined(job, websocket, type(job).add_listener):
            return
        websocket.send(job.as_json())
        try:
            while websocket.wait() is not None:
                pass  # listeners only listen; whatever they send is ignored
        finally:
            job.remove_listener(websocket)


def job_state(request):
    """``GET /jobs/{id}`` without an upgrade: the state as JSON."""
    return request.context.as_dict()


def job_start(request):
    request.context.change("running")
    return request.context.as_dict()


def job_stop(request):
    request.context.change("stopped")
    return request.context.as_dict()


# -- / ------------------------------------------------------------------------


def chat_page(request):
    return _page("chat.html")


def echo_page(request):
    """``GET /echo`` from a browser: a page that talks to the endpoint,
    instead of a bare 426 (other clients still get the 426)."""
    return _page("echo.html")


def favicon(request):
    """``/favicon.ico``: nothing, said plainly (204), so a browser logs no
    error for the icon it asks every page for."""
    return Response(status=204)


def _page(name):
    html = importlib.resources.files(__name__).joinpath(name).read_bytes()
    return Response(html, content_type="text/html", charset="utf-8")


def not_found(request):
    return HTTPNotFound(
        f"Nothing at {request.path}; the demo serves /, /echo, "
        "/rooms/<name> and /jobs/<id>."
    )


# -- the application ----------------------------------------------------------


def make_app(settings=None):
    """The demo as a WSGI application, configured with ``settings``."""
    with Configurator(settings=dict(settings or {})) as config:
        config.include("stargate")
        config.registry.demo_jobs = {}

        config.add_route("chat", "/")
        config.add_view(chat_page, route_name="chat", request_method="GET")
        config.add_route("favicon", "/favicon.ico")
        config.add_view(favicon, route_name="favicon")

        config.add_route("echo", "/echo")
        config.add_view(EchoView, route_name="echo")
        # a browser's plain GET (it accepts text/html) gets a page instead
        config.add_view(
            echo_page,
            route_name="echo",
            request_method="GET",
            websocket=False,
            header="Accept:text/html",
        )

        config.add_route("room", "/rooms/{name}", factory=room_factory)
        config.add_view(RoomView, route_name="room")

        config.add_route("job_start", "/jobs/{id}/start", factory=job_factory)
        config.add_view(
            job_start, route_name="job_start", request_method="POST", renderer="json"
        )
        config.add_route("job_stop", "/jobs/{id}/stop", factory=job_factory)
        config.add_view(
            job_stop, route_name="job_stop", request_method="POST", renderer="json"
        )
        # One URL, two views: the websocket predicate picks between them.
        config.add_route("job", "/jobs/{id}", factory=job_factory)
        config.add_view(JobView, route_name="job", websocket=True)
        config.add_view(
            job_state,
            route_name="job",
            request_method="GET",
            websocket=False,
            renderer="json",
        )
        config.add_notfound_view(not_found)
        return config.make_wsgi_app()


def main(global_config, **settings):
    """Paste Deploy app factory: ``use = egg:stargate#demo``."""
    return make_app(settings)
