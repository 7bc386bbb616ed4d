"""A class to subclass or mix in, used together with ``WebSocketView``.

It provides functionality for adding and removing websockets as listeners
for events, and for sending a message to all of them.

:class:`WebSocketAwareResource` keeps no listeners of its own: they live in
the process's hub (:mod:`stargate.hub`), in a set keyed by the resource's
*channel*. That is what lets it work both ways resources are made:

* in a long-lived traversal tree, where the same object serves every request;
* built anew for every request (a URL dispatch ``factory``, or a traversal
  tree rebuilt per request), where the listener added by one request's
  resource must receive what another request's resource sends.

Two resources with the same channel share their listeners, and with a Redis
backend so do the resources of every worker process.

The channel
-----------

By default the channel is the resource's traversal path,
:func:`pyramid.traversal.resource_path` (``"/"`` for the root,
``"/rooms/lobby"`` for ``root["rooms"]["lobby"]``). Set or override
``channel`` (a class attribute, a property, or an instance attribute) to
choose another name, for example from ``request.matchdict`` in a URL
dispatch factory.

History and recovery
--------------------

With ``stargate.history_size`` set (or a ``history_size`` class attribute)
and a backend that keeps history, :meth:`~WebSocketAwareResource.send`
returns the message's :class:`~stargate.backends.base.Position`, and
:meth:`~WebSocketAwareResource.format_message` decides how a message and its
position go on the wire (by default the position is not sent). A client
that kept its last position resumes with ``add_listener(ws, since=...)``.

A resource without a location (no ``__name__`` attribute, as a plain URL
dispatch factory object has) gets a channel unique to that object and to
this process: only that very object sees those listeners, and a Redis
backend does not share them with other processes. Give such resources a
``__name__`` (and ``__parent__``) or a ``channel`` to share them.
"""

import itertools
import os
from typing import TYPE_CHECKING, Iterable

from pyramid.traversal import resource_path

from stargate.backends.base import HistoryPolicy, Position
from stargate.config import get_hub, get_settings

if TYPE_CHECKING:  # the hub imports this package's config: no cycle at run time
    from stargate.hub import Hub, Listener, ListenerSet

__all__ = ["WebSocketAwareResource"]

_local_ids = itertools.count(1)


class WebSocketAwareResource:
    """An object in a traversal graph that handles websockets.

    It is designed to be persistent and to route messages to attached
    clients; it works as well when it is built per request, because its
    listeners are kept per channel by the process's hub.
    """

    #: Messages of history this resource's channel keeps; ``None`` means the
    #: ``stargate.history_size`` setting, 0 no history.
    history_size: "int | None" = None
    #: Seconds that history is kept after the channel's last message;
    #: ``None`` means the ``stargate.history_ttl`` setting.
    history_ttl: "float | None" = None

    # -- where the listeners live ---------------------------------------

    @property
    def hub(self) -> "Hub":
        """The :class:`~stargate.hub.Hub` this resource's listeners live in.

        :func:`stargate.config.get_hub` for the current registry unless a hub
        was assigned to this attribute.
        """
        hub = self.__dict__.get("_stargate_hub")
        if hub is not None:
            return hub
        return get_hub()

    @hub.setter
    def hub(self, hub: "Hub") -> None:
        self.__dict__["_stargate_hub"] = hub

    @property
    def channel(self) -> str:
        """The name under which this resource's listeners are kept.

        The traversal path by default; unique to this object (and process)
        when the resource has no ``__name__``. Assign or override to choose.
        """
        channel = self.__dict__.get("_stargate_channel")
        if channel is not None:
            return channel
        if not hasattr(self, "__name__"):
            channel = f"stargate-local:{os.getpid()}:{next(_local_ids)}"
            self.__dict__["_stargate_channel"] = channel
            return channel
        return resource_path(self)

    @channel.setter
    def channel(self, value: str) -> None:
        self.__dict__["_stargate_channel"] = value

    @property
    def listeners(self) -> "ListenerSet":
        """A set of attached websockets.

        The live set of this channel's listeners in this process (a
        :class:`~stargate.hub.ListenerSet`: ``add`` and ``discard`` on it
        work like :meth:`add_listener` and :meth:`remove_listener`).
        Assigning an iterable of websockets replaces the channel's
        listeners; assigning ``None`` detaches them all.
        """
        return self.hub.listeners(self.channel)

    @listeners.setter
    def listeners(self, websockets: "Iterable[Listener] | None") -> None:
        hub, channel = self.hub, self.channel
        wanted = [] if websockets is None else list(websockets)
        for ws in hub.listeners(channel):
            if ws not in wanted:
                hub.remove(channel, ws)
        for ws in wanted:
            hub.add(channel, ws)

    # -- the documented API -------------------------------------------------

    def add_listener(
        self, ws: "Listener", since: "Position | tuple[str, int] | None" = None
    ) -> None:
        """Adds ``ws`` to the set of listeners.

        It is removed again by :meth:`remove_listener`, or by itself when
        its connection closes.

        ``since`` (a :class:`~stargate.backends.base.Position` or an
        ``(epoch, offset)`` pair a client kept) first sends ``ws`` every
        message published after that position, formatted by
        :meth:`format_message`, then the live ones: no gap, no duplicate.
        Raises :class:`~stargate.exceptions.HistoryUnavailable` when the
        history no longer holds them (too old, or the epoch changed); its
        ``epoch`` and ``offset`` are the channel's current position, and
        ``ws`` is not added: reload the client's state, then add it again.
        """
        self.hub.add(
            self.channel,
            ws,
            since=since,
            formatter=self.format_message,
            on_gap=self.on_gap,
        )

    def on_gap(self, channel: str, reason: str) -> None:
        """Called when this channel's listeners in this process may have
        missed messages: the backend lost its connection and got it back, a
        cluster slot moved or failed over, a history was lost. ``reason``
        says which, in a few words. Called once the channel is received
        again, from the backend's green thread.

        The default does nothing (the hub counts and logs it). Override it
        to tell clients to reload their state, for example by sending each
        of :attr:`listeners` a message your client understands. With
        history on, a client that kept its position can also reconnect
        with it and get what is still in the window.
        """

    def format_message(
        self, message: "str | bytes", position: "Position | None"
    ) -> "str | bytes":
        """What is sent for ``message`` at ``position`` (history on only).

        Called once per message (never per listener) when the backend
        gives the message a :class:`~stargate.backends.base.Position`.
        Returns ``str`` or ``bytes``; the default returns ``message``
        unchanged. Override it to tell clients where they are, for example
        by adding ``position.epoch`` and ``position.offset`` to a JSON
        message.
        """
        return message

    def history_policy(self) -> "HistoryPolicy | None":
        """This channel's :class:`~stargate.backends.base.HistoryPolicy`,
        or ``None`` when it keeps no history."""
        settings = get_settings()
        size = self.history_size
        if size is None:
            size = settings.history_size
        if not size:
            return None
        ttl = self.history_ttl
        if ttl is None:
            ttl = settings.history_ttl
        return HistoryPolicy(int(size), float(ttl))

    def remove_listener(self, ws: "Listener") -> None:
        """Removes ``ws`` from the set of listeners (no error if absent)."""
        self.hub.remove(self.channel, ws)

    def send(self, message: "str | bytes") -> "Position | None":
        """Sends ``message`` to all sockets in the set of listeners.

        It will clear up any websockets that are no longer connected.
        ``message`` is a ``str`` (a text frame) or ``bytes`` (binary). With
        the in-memory backend every local listener has been written to when
        this returns; with Redis the message reaches the listeners of every
        worker process a moment later. Raises
        :class:`~stargate.exceptions.BackendUnavailable` if the backend
        cannot take the message.

        Returns the message's :class:`~stargate.backends.base.Position` when
        the channel keeps history (see :meth:`history_policy`), else
        ``None``.
        """
        return self.hub.publish(self.channel, message, history=self.history_policy())
