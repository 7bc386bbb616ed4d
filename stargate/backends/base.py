"""The interface every broadcast backend implements.

A backend only moves messages between processes. The hub (``stargate.hub``)
owns the local listener sets, encodes frames and prunes dead listeners, so
every backend delivers and prunes the same way. A backend is told which
channels this process has listeners for, publishes messages, and hands every
message published on a subscribed channel (by any process, this one included)
back to the hub through the ``deliver`` callback given to :meth:`start`.

Messages are ``str`` (sent as text frames) or ``bytes`` (binary frames); a
backend must hand back the same type it was given.

History (optional)
------------------

A backend that keeps a window of recent messages per channel declares the
:class:`History` capability (``class MyBackend(History, Backend)``). Then
:meth:`Backend.publish` takes a :class:`HistoryPolicy` and returns the
message's :class:`Position`, ``deliver`` gets that position as a third
argument, and :meth:`History.history` reads what a channel published after
a position. A backend without history keeps the two-argument ``deliver``:
the hub never asks it for positions.

Presence (optional)
-------------------

A backend that counts listeners across processes declares the
:class:`Presence` capability: the hub tells it this process's count on a
channel whenever it changes, and asks it for the total.

The hub finds a capability with ``isinstance`` (:func:`keeps_history`,
:func:`counts_presence`), never by looking for a method: a method a backend
happens to have is not a promise. A backend written before these classes
existed, which overrode ``set_local_count`` or ``listener_count`` or set
``supports_history = True``, is declared for them when its class is made.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from typing import Any

__all__ = [
    "Backend",
    "History",
    "Presence",
    "Position",
    "HistoryPolicy",
    "keeps_history",
    "counts_presence",
]


@dataclasses.dataclass(frozen=True, order=True)
class Position:
    """Where a message sits in its channel's history.

    ``epoch`` is a token naming one unbroken history of the channel: it
    changes whenever that history is lost (a Redis without persistence
    restarted, its keys flushed or expired, a process on the memory backend
    restarted). ``offset`` is the message's number in that history: 1 for
    the first message, one more for each message after it. Offset 0 names
    the position before the first message.
    """

    epoch: str
    offset: int

    @classmethod
    def coerce(cls, value):
        """A :class:`Position` from a position or an ``(epoch, offset)`` pair.

        Raises ``TypeError`` or ``ValueError`` for anything else (an offset
        that is not a non-negative integer, an empty epoch).
        """
        if isinstance(value, cls):
            return value
        try:
            epoch, offset = value
        except (TypeError, ValueError):
            raise TypeError(
                f"a position is Position(epoch, offset) or an (epoch, offset) "
                f"pair, not {value!r}"
            ) from None
        if isinstance(offset, bool):
            raise ValueError(f"offset must be an integer, not {offset!r}")
        offset = int(offset)
        if offset < 0 or not epoch:
            raise ValueError(f"not a position: epoch {epoch!r}, offset {offset!r}")
        return cls(str(epoch), offset)


@dataclasses.dataclass(frozen=True)
class HistoryPolicy:
    """How much history a channel keeps: ``size`` messages (at least; a
    backend may keep a few more) for ``ttl`` seconds after the channel's
    last message."""

    size: int
    ttl: float


class History(abc.ABC):
    """The capability of keeping a window of recent messages per channel.

    List it before :class:`Backend` among a backend's bases. A subclass of
    a backend that has it can still turn it off with
    ``supports_history = False``.
    """

    #: Whether this backend keeps history: :meth:`Backend.publish` accepts
    #: ``history=`` and returns a :class:`Position`, ``deliver`` is called
    #: with a position, and :meth:`history` works.
    supports_history = True

    @abc.abstractmethod
    def history(self, channel: str, since: Position) -> list[tuple[Position, Any]]:
        """The messages published on ``channel`` after ``since``.

        ``since`` is a :class:`Position`. Returns a list of ``(position,
        message)`` pairs in publish order (empty when nothing was published
        since). Raises :class:`~stargate.exceptions.HistoryUnavailable`,
        carrying the channel's current epoch and offset, when the window no
        longer holds every message after ``since`` or its epoch is not the
        channel's.
        """
        from stargate.exceptions import HistoryUnavailable

        raise HistoryUnavailable(f"{type(self).__name__} keeps no history")


class Presence(abc.ABC):
    """The capability of counting listeners across processes.

    List it before :class:`Backend` among a backend's bases.
    """

    @abc.abstractmethod
    def set_local_count(self, channel: str, count: int) -> None:
        """This process now has ``count`` listeners on ``channel``.

        Called by the hub on every change; it must not wait on the network
        (record it and write it later)."""

    @abc.abstractmethod
    def listener_count(self, channel: str, local_count: int) -> int:
        """Listeners on ``channel`` across every process; ``local_count``
        is this process's own."""


def keeps_history(backend: object) -> bool:
    """Whether ``backend`` declares :class:`History` and has it on."""
    return isinstance(backend, History) and bool(backend.supports_history)


def counts_presence(backend: object) -> bool:
    """Whether ``backend`` declares :class:`Presence`."""
    return isinstance(backend, Presence)


class Backend(abc.ABC):
    """A way to carry broadcast messages to every subscribed process.

    Subclasses take their options as keyword arguments: the ``url`` of the
    ``stargate.backend`` setting and any other ``stargate.*`` settings the
    application passes on.
    """

    #: Whether :meth:`publish` hands the message to ``deliver`` before it
    #: returns (the in-memory backend does; network backends do not).
    synchronous = False

    #: Whether this backend keeps history; true for those that declare
    #: :class:`History` (see :func:`keeps_history`).
    supports_history = False

    #: Called as ``gap_handler(channel, reason)`` when ``channel`` may have
    #: missed messages (see :meth:`report_gap`); the hub sets it.
    gap_handler = None

    #: The URL schemes (``"redis://"``) :func:`~stargate.backends.load_backend`
    #: hands to this backend; only built-in backends are found by scheme.
    schemes: tuple = ()

    def __init__(self, url=None, **options):
        self.url = url
        self.options = options

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Declare the capabilities of a backend class written before
        :class:`History` and :class:`Presence` existed, from what it
        overrides, once, as its class is made (explicit ABC registration,
        so the hub's ``isinstance`` checks see it)."""
        super().__init_subclass__(**kwargs)
        if cls.supports_history and not issubclass(cls, History):
            History.register(cls)
        if not issubclass(cls, Presence) and (
            cls.set_local_count is not Backend.set_local_count
            or cls.listener_count is not Backend.listener_count
        ):
            Presence.register(cls)

    def report_gap(self, channel: str, reason: str) -> None:
        """Tell whoever listens (the hub) that ``channel`` may have missed
        messages: a lost connection, a moved slot, a lost history. Backends
        call it once the channel is received again, so a listener that
        reloads its state when told misses nothing after that."""
        handler = self.gap_handler
        if handler is not None:
            handler(channel, reason)

    @classmethod
    def refuse_unknown_options(cls, options: dict) -> None:
        """Raise :class:`~stargate.exceptions.IncorrectlyConfigured` naming
        the first of ``options`` (keyword arguments the constructor did not
        take), and the options it does take. A misspelt
        ``stargate.backend.<option>`` setting would otherwise be ignored."""
        if not options:
            return
        from stargate.exceptions import IncorrectlyConfigured

        accepted = [
            name
            for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if parameter.kind is parameter.KEYWORD_ONLY
        ]
        raise IncorrectlyConfigured(
            f"stargate.backend.{sorted(options)[0]} is not an option of "
            f"{cls.__name__}; it takes "
            f"{', '.join(accepted) if accepted else 'none'}"
        )

    @abc.abstractmethod
    def start(self, deliver):
        """Begin delivering. ``deliver(channel, message)`` is called once per
        message published on a subscribed channel, in publish order per
        channel, from a green thread of this process. A backend with
        history calls ``deliver(channel, message, position)``, with the
        message's :class:`Position` (``None`` when it has none)."""

    @abc.abstractmethod
    def subscribe(self, channel):
        """This process now has listeners on ``channel``: receive its messages."""

    @abc.abstractmethod
    def unsubscribe(self, channel):
        """This process has no listeners left on ``channel``."""

    @abc.abstractmethod
    def publish(self, channel, message):
        """Send ``message`` to every process subscribed to ``channel``.

        Raises :class:`~stargate.exceptions.BackendUnavailable` when the
        message could not be handed over. A backend with history takes a
        ``history=`` keyword (a :class:`HistoryPolicy`, or ``None`` for
        the backend's default) and returns the message's :class:`Position`.
        """

    def history(self, channel, since):
        """See :meth:`History.history`; a backend without :class:`History`
        always raises :class:`~stargate.exceptions.HistoryUnavailable`."""
        from stargate.exceptions import HistoryUnavailable

        raise HistoryUnavailable(f"{type(self).__name__} keeps no history")

    def listener_count(self, channel, local_count):
        """See :meth:`Presence.listener_count`; a backend without
        :class:`Presence` sees this process only and returns
        ``local_count``."""
        return local_count

    def set_local_count(self, channel, count):
        """See :meth:`Presence.set_local_count`; a backend without
        :class:`Presence` is not told (this default does nothing)."""

    def close(self):
        """Stop delivering and release connections. Safe to call twice."""
