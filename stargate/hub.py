"""The per-process broadcast hub: listener sets, fan-out, pruning, counters.

One :class:`Hub` per process keeps ``channel -> set of WebSocket``. Messages
travel between processes through a backend (:mod:`stargate.backends`); the
hub does the local part the same way for every backend:

* :meth:`Hub.add` subscribes the backend when a channel gets its first local
  listener and registers a close callback, so a listener whose connection
  ends leaves every channel by itself; :meth:`Hub.remove` unsubscribes after
  the last one.
* :meth:`Hub.publish` hands a message to the backend, which calls
  :meth:`Hub.deliver` in every subscribed process.
* :meth:`Hub.deliver` encodes the frame once per wire format (never once per
  listener), walks the channel's listeners as they were when it began
  (grouped by wire format, ready since they were added), writes with one
  ``send()`` each (the connection's own path for what does not fit) and
  prunes the listeners that are dead or were closed for being slow. One
  bad listener never raises to the caller nor stops delivery to the others.

History and recovery
--------------------

With a backend that keeps history, :meth:`Hub.publish` returns the message's
:class:`~stargate.backends.base.Position` and :meth:`Hub.deliver` receives
it. A channel may have a *formatter* (``formatter(message, position)``, the
resource's ``format_message``): the hub applies it once per delivered
message, before encoding, so clients can learn positions. ``Hub.add(channel,
ws, since=position)`` recovers a listener: the listener is subscribed and
marked as catching up (live messages for it are buffered), the backend's
history after ``since`` is sent to it, then the buffered live messages with
a higher offset. Then it takes live messages again, but skips those at or
before the last offset it was sent: a backend's receiver may still be
behind the position the history was read to (Redis Streams reads history
and live entries on different connections), and those messages reach it
later. The first live message past that offset ends the recovery. So there
is no gap and no duplicate at the seam, in order.

:func:`stargate.config.get_hub` (also importable from here) finds the hub
of the running application.

Logging goes to the ``stargate.hub`` logger.
"""

import dataclasses
import logging
import os
import weakref
from typing import Any, Callable

from stargate import runtime
from stargate.backends import load_backend
from stargate.backends.base import (
    Backend,
    HistoryPolicy,
    Position,
    counts_presence,
    keeps_history,
)
from stargate.config import get_hub
from stargate.connection import SendGroup, SendResult
from stargate.exceptions import BackendError, BackendUnavailable, HistoryUnavailable
from stargate.frames import encode_message

__all__ = ["Hub", "HubStats", "get_hub", "default_hub"]

logger = logging.getLogger("stargate.hub")

#: What the hub keeps in a channel: a :class:`~stargate.connection.WebSocket`,
#: or any object with ``send(message)`` and ``closed`` (eventlet's own
#: WebSocket, a test double), which the hub writes to through ``send``.
Listener = Any

#: ``formatter(message, position)``: the message as listeners receive it.
Formatter = Callable[["str | bytes", "Position | None"], "str | bytes"]

#: ``on_gap(channel, reason)``: told that ``channel`` may have missed messages.
GapHook = Callable[[str, str], object]

#: Marks a wire format for which the message cannot be encoded (for example
#: a binary message for a hixie-75/76 client, which has no binary frames).
_UNENCODABLE = object()


@dataclasses.dataclass(frozen=True)
class HubStats:
    """A snapshot of a hub's counters, for this process only.

    ``listeners``
        (channel, listener) pairs attached right now; a listener on two
        channels counts twice.
    ``channels``
        channels with at least one local listener right now.
    ``messages``
        messages published through this hub (:meth:`Hub.publish` calls).
    ``received``
        messages the backend handed to :meth:`Hub.deliver` (from any
        process).
    ``delivered``
        successful deliveries: one per message per listener that took it
        (written, or queued in its send buffer).
    ``pruned_dead``
        listeners removed because their connection was dead (closed, reset,
        broken pipe) when a message was sent to them.
    ``closed_slow``
        listeners removed because their send buffer overflowed and the
        connection closed itself with 1013 (``slow_listener="close"``).
    ``dropped``
        messages a slow listener did not get because its send buffer was full
        (``slow_listener="drop"``); the listener stays.
    ``skipped``
        deliveries not attempted because the message cannot be put on that
        listener's wire (a binary message for a hixie-75/76 client).
    ``gaps``
        times the backend reported that a channel with local listeners may
        have missed messages (a lost connection, a moved slot, a lost
        history); each also called the channel's gap hook.

    Every counter but ``listeners`` and ``channels`` only grows.
    """

    listeners: int = 0
    channels: int = 0
    messages: int = 0
    received: int = 0
    delivered: int = 0
    pruned_dead: int = 0
    closed_slow: int = 0
    dropped: int = 0
    skipped: int = 0
    gaps: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class ListenerSet:
    """The live set of local listeners of one channel, as a set-like view.

    Membership, iteration and ``len`` read the hub's current set (iteration
    walks a snapshot, so it is safe while listeners come and go); ``add``,
    ``discard``, ``remove`` and ``clear`` go through the hub, so the backend
    subscription and the close callback stay right.
    """

    __slots__ = ("hub", "channel")

    def __init__(self, hub, channel):
        self.hub = hub
        self.channel = channel

    def _current(self):
        return self.hub._channels.get(self.channel, ())

    def __contains__(self, ws):
        return ws in self._current()

    def __iter__(self):
        return iter(list(self._current()))

    def __len__(self):
        return len(self._current())

    def __bool__(self):
        return bool(self._current())

    def __eq__(self, other):
        if isinstance(other, ListenerSet):
            other = set(other._current())
        if isinstance(other, (set, frozenset)):
            return set(self._current()) == other
        return NotImplemented

    __hash__ = None

    def add(self, ws):
        self.hub.add(self.channel, ws)

    def discard(self, ws):
        self.hub.remove(self.channel, ws)

    def remove(self, ws):
        if not self.hub.remove(self.channel, ws):
            raise KeyError(ws)

    def clear(self):
        for ws in list(self._current()):
            self.hub.remove(self.channel, ws)

    def copy(self):
        return set(self._current())

    def __repr__(self):
        return f"<ListenerSet {self.channel!r}: {len(self)} listeners>"


class Hub:
    """Listener sets keyed by channel, and the local half of every broadcast.

    ``backend`` is a :class:`~stargate.backends.base.Backend` or a
    ``stargate.backend`` setting value (see
    :func:`~stargate.backends.load_backend`). The hub starts its backend on
    :meth:`start`, or by itself the first time it is used.

    All methods are meant to be called from green threads of one process;
    none of them blocks on a slow listener.
    """

    def __init__(
        self, backend: "Backend | str" = "memory", *, name: "str | None" = None
    ) -> None:
        self.backend = load_backend(backend)
        self.name = name
        self._channels = {}
        self._fanout = {}  # channel -> _Fanout, the same listeners ready to walk
        self._memberships = {}
        self._watched = weakref.WeakSet()
        self._started = 0  # the process id the backend was started in
        self._starting = None  # (pid, Event) while the backend starts
        self._subscribing = {}  # channel -> Event while its first add subscribes
        self._closed = False
        self._messages = 0
        self._received = 0
        self._delivered = 0
        self._pruned_dead = 0
        self._closed_slow = 0
        self._dropped = 0
        self._skipped = 0
        self._gaps = 0
        self._gap_hooks = {}  # channel -> on_gap(channel, reason)
        self._formatters = {}  # channel -> format_message(message, position)
        self._catching_up = {}  # channel -> {ws: _Recovery}
        #: Counters of recoveries (``Hub.add(..., since=...)``): listeners
        #: ``recovered``, messages ``replayed`` to them from history, and
        #: recoveries refused as ``unavailable`` (HistoryUnavailable).
        self.history_stats = {"recovered": 0, "replayed": 0, "unavailable": 0}

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the backend delivering to this hub. Safe to call twice.

        :meth:`add` and :meth:`publish` call it, so a hub starts by itself in
        the process that first uses it. A hub started before a fork starts
        afresh in the child on first use there: it forgets the parent's
        listeners (their sockets belong to the parent) and calls the
        backend's ``start`` again, so the backend can open its own
        connections and receiving green thread in that process.
        """
        if self._closed:
            raise BackendUnavailable("this stargate hub is closed")
        pid = os.getpid()
        if self._started == pid:
            return
        starting = self._starting
        if starting is not None and starting[0] == pid:
            # Another green thread is starting the backend: wait for it, and
            # share its failure if it fails (BackendUnavailable: one attempt
            # for all). If it was interrupted instead (its own Timeout, a
            # kill), that is not ours to raise: start it here.
            starting[1].wait()
            if self._started != pid:
                self.start()
            return
        if self._started:
            logger.debug("hub %r used in a forked process: starting afresh", self)
            self._channels.clear()
            self._fanout.clear()
            self._memberships.clear()
            self._subscribing.clear()
            self._watched = weakref.WeakSet()
        done = runtime.current().Event()
        self._starting = (pid, done)
        try:
            self.backend.gap_handler = self.gap
            self.backend.start(self.deliver)
            # Only now: a backend that failed to start is tried again next time.
            self._started = pid
            for channel in list(self._channels):
                self.backend.subscribe(channel)
        except Exception as exc:
            done.send_exception(exc)
            raise
        except BaseException:
            done.send(None)  # interrupted: the waiters try for themselves
            raise
        else:
            done.send(None)
        finally:
            self._starting = None

    def close(self) -> None:
        """Stop the backend and forget every listener. Safe to call twice.

        The listeners' connections are left open: they belong to their views.
        """
        if self._closed:
            return
        self._closed = True
        self._channels.clear()
        self._fanout.clear()
        self._memberships.clear()
        try:
            self.backend.close()
        except Exception:
            logger.exception("error while closing the backend %r", self.backend)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- listeners ---------------------------------------------------------

    def add(
        self,
        channel: str,
        ws: Listener,
        since: "Position | tuple[str, int] | None" = None,
        formatter: "Formatter | None" = None,
        on_gap: "GapHook | None" = None,
    ) -> None:
        """Attach ``ws`` to ``channel``. Adding it twice changes nothing.

        The first local listener of a channel subscribes the backend to it
        (an error from the backend is raised and the listener is not added).
        A close callback is registered on ``ws``, so it leaves every channel
        when its connection ends, however it ends.

        ``formatter`` (optional) becomes the channel's formatter (see the
        module docstring); the most recent one given wins. So does
        ``on_gap`` (optional), the channel's gap hook: see :meth:`gap`.

        ``since`` (a :class:`~stargate.backends.base.Position` or an
        ``(epoch, offset)`` pair) first sends ``ws`` every message published
        on ``channel`` after that position, then live ones, none twice.
        Raises :class:`~stargate.exceptions.HistoryUnavailable` (carrying the
        channel's current epoch and offset; ``ws`` is then not attached) when
        the backend no longer holds all of them.
        """
        if formatter is not None:
            self._formatters[channel] = formatter
        if on_gap is not None:
            self._gap_hooks[channel] = on_gap
        if since is not None:
            self._add_since(channel, ws, Position.coerce(since))
            return
        self._add(channel, ws)

    def _add(self, channel, ws):
        if self._started != os.getpid():
            self.start()
        listeners = self._channels.get(channel)
        while listeners is None:
            subscribing = self._subscribing.get(channel)
            if subscribing is not None:
                # Another first listener is subscribing the backend (which
                # yields): wait for it rather than subscribe twice. If it
                # failed or was interrupted, try again here: its exception
                # (its own Timeout, GreenletExit) is not ours to raise.
                subscribing.wait()
                listeners = self._channels.get(channel)
                continue
            subscribing = self._subscribing[channel] = runtime.current().Event()
            try:
                self.backend.subscribe(channel)
            except BaseException:
                self._roll_back_subscribe(channel)
                raise
            else:
                listeners = self._channels[channel] = set()
                self._fanout[channel] = _Fanout()
            finally:
                del self._subscribing[channel]
                subscribing.send(None)
        if ws in listeners:
            return
        listeners.add(ws)
        self._fanout[channel].add(ws)
        self._memberships.setdefault(ws, set()).add(channel)
        self._watch(ws)
        self._count_changed(channel, len(listeners))
        if getattr(ws, "closed", False):
            # It ended before we could watch it: its callback may have run.
            self._drop_everywhere(ws)

    def _roll_back_subscribe(self, channel):
        """A first subscribe failed or was interrupted half-way: tell the
        backend to drop ``channel``, so it keeps no subscription the hub
        does not know of (the hub's channel set is the one truth)."""
        try:
            self.backend.unsubscribe(channel)
        except Exception as exc:
            logger.warning(
                "could not roll back the subscription to %r: %s", channel, exc
            )

    def _add_since(self, channel, ws, since):
        """Attach ``ws`` and replay the history after ``since`` to it."""
        if ws in self._channels.get(channel, ()):
            return  # already a live listener: it has not missed anything
        if not keeps_history(self.backend):
            self.history_stats["unavailable"] += 1
            raise HistoryUnavailable(
                f"{channel!r}: the backend {self.backend!r} keeps no history"
            )
        recovering = self._catching_up.setdefault(channel, {})
        recovery = recovering[ws] = _Recovery(since.epoch, since.offset)
        done = False
        try:
            self._add(channel, ws)
            try:
                replay = self.backend.history(channel, since)
            except HistoryUnavailable:
                self.history_stats["unavailable"] += 1
                self.remove(channel, ws)
                raise
            except Exception:
                self.remove(channel, ws)
                raise
            last = since.offset
            sent = 0
            for position, message in replay:
                if not self._replay_one(channel, ws, message, position):
                    return
                last, sent = position.offset, sent + 1
            # Live messages that arrived while we read and sent the history;
            # those the history already held are skipped by their offset.
            # Sending may yield, and more may arrive: loop until none is left,
            # then switch without yielding.
            pending = recovery.buffer
            while pending:
                message, position = pending.pop(0)
                if (
                    position is not None
                    and position.epoch == since.epoch
                    and position.offset <= last
                ):
                    continue
                if not self._replay_one(channel, ws, message, position):
                    return
                if position is not None:
                    last = position.offset
                    recovery.epoch = position.epoch
                sent += 1
            # Live from here on, above the floor: nothing yields between the
            # last buffer check and this.
            recovery.buffer = None
            recovery.floor = last
            done = True
            self.history_stats["recovered"] += 1
            self.history_stats["replayed"] += sent
        finally:
            if not done:
                self._end_recovery(channel, ws)

    def _end_recovery(self, channel, ws):
        recovering = self._catching_up.get(channel)
        if recovering is not None:
            recovering.pop(ws, None)
            if not recovering:
                del self._catching_up[channel]

    def _replay_one(self, channel, ws, message, position):
        """Send one message to a listener catching up; False if it died."""
        formatter = self._formatters.get(channel)
        if formatter is not None and position is not None:
            message = formatter(message, position)
        try:
            outcome = self._send_one(ws, message, {})
        except Exception as exc:
            logger.debug("replaying to %r failed: %r", ws, exc)
            outcome = _DEAD
        if outcome is _DEAD or outcome is _SLOW:
            self._drop_everywhere(ws)
            return False
        return True

    def remove(self, channel: str, ws: Listener) -> bool:
        """Detach ``ws`` from ``channel``; no error if it was not attached.

        Returns whether it was attached. The last local listener leaving a
        channel unsubscribes the backend from it.
        """
        listeners = self._channels.get(channel)
        if listeners is None or ws not in listeners:
            return False
        listeners.discard(ws)
        self._fanout[channel].discard(ws)
        if channel in self._catching_up:
            self._end_recovery(channel, ws)
        channels = self._memberships.get(ws)
        if channels is not None:
            channels.discard(channel)
            if not channels:
                del self._memberships[ws]
        if not listeners:
            del self._channels[channel]
            del self._fanout[channel]
            self._formatters.pop(channel, None)
            self._gap_hooks.pop(channel, None)
            if not self._closed:
                try:
                    self.backend.unsubscribe(channel)
                except BackendError as exc:
                    logger.warning("could not unsubscribe %r: %s", channel, exc)
        self._count_changed(channel, len(listeners))
        return True

    def listeners(self, channel: str) -> "ListenerSet":
        """The live set of this process's listeners on ``channel``.

        A :class:`ListenerSet`: it reflects additions and removals as they
        happen, iterates over a snapshot, and ``add``/``discard`` on it go
        through :meth:`add`/:meth:`remove`.
        """
        return ListenerSet(self, channel)

    def channels(self) -> set[str]:
        """The channels with at least one local listener (a new set)."""
        return set(self._channels)

    def channels_of(self, ws: Listener) -> set[str]:
        """The channels ``ws`` is attached to (a new set)."""
        return set(self._memberships.get(ws, ()))

    def listener_count(self, channel: str) -> int:
        """Listeners on ``channel`` in every process the backend can see.

        The in-memory backend sees this process only, so that is the local
        count.
        """
        local = len(self._channels.get(channel, ()))
        if not counts_presence(self.backend):
            return local
        return self.backend.listener_count(channel, local)

    def _watch(self, ws):
        try:
            if ws in self._watched:
                return
            self._watched.add(ws)
        except TypeError:
            pass  # not weakly referenceable: the callback may be registered twice
        add_close_callback = getattr(ws, "add_close_callback", None)
        if add_close_callback is not None:
            add_close_callback(self._listener_closed)

    def _listener_closed(self, ws):
        if self._drop_everywhere(ws):
            logger.debug("listener %r closed and left its channels", ws)

    def _drop_everywhere(self, ws):
        channels = self._memberships.get(ws)
        if not channels:
            return False
        for channel in list(channels):
            self.remove(channel, ws)
        return True

    def _count_changed(self, channel, count):
        if self._closed or not counts_presence(self.backend):
            return
        try:
            self.backend.set_local_count(channel, count)
        except BackendError as exc:
            logger.warning("could not record the count of %r: %s", channel, exc)

    # -- messages ----------------------------------------------------------

    def publish(
        self,
        channel: str,
        message: "str | bytes",
        history: "HistoryPolicy | None" = None,
    ) -> "Position | None":
        """Broadcast ``message`` to every listener of ``channel``, everywhere.

        ``history`` is a :class:`~stargate.backends.base.HistoryPolicy` (or
        ``None``: the backend's default, no history on the memory backend).
        Returns the message's :class:`~stargate.backends.base.Position`, or
        ``None`` when the backend gives it none. A policy given to a backend
        that keeps no history raises
        :class:`~stargate.exceptions.IncorrectlyConfigured`.

        ``message`` is a ``str`` (sent as a text frame) or ``bytes`` (a binary
        frame; ``bytearray`` and ``memoryview`` are copied to ``bytes``). With
        the in-memory backend the message has been delivered, and dead
        listeners pruned, when this returns. Raises
        :class:`~stargate.exceptions.BackendUnavailable` when the backend
        could not take the message.
        """
        if isinstance(message, (bytearray, memoryview)):
            message = bytes(message)
        elif not isinstance(message, (str, bytes)):
            raise TypeError(
                f"a broadcast message is str or bytes, not {type(message).__name__}"
            )
        if self._closed:
            raise BackendUnavailable("this stargate hub is closed")
        if self._started != os.getpid():
            self.start()
        self._messages += 1
        if history is None:
            return self.backend.publish(channel, message)
        if not keeps_history(self.backend):
            from stargate.exceptions import IncorrectlyConfigured

            raise IncorrectlyConfigured(
                f"history is on for {channel!r} but the backend "
                f"{self.backend!r} keeps none; use the memory backend or "
                "redis+streams://, or set stargate.history_size = 0"
            )
        return self.backend.publish(channel, message, history=history)

    def deliver(
        self,
        channel: str,
        message: "str | bytes",
        position: "Position | None" = None,
    ) -> int:
        """Send ``message`` to this process's listeners on ``channel``.

        Called by the backend. The frame is encoded once per wire format and
        written to that format's plain WebSockets in one walk (a
        :class:`~stargate.connection.SendGroup`, kept ready by :meth:`add`
        and :meth:`remove`), then to listeners of other kinds one by one;
        the walk covers the listeners there were when it began, so listeners
        added or removed meanwhile do not disturb it. What ``send_prepared``
        returns (a ``stargate.connection.SendResult``) decides the rest:
        ``DEAD`` (or an exception) prunes the listener and counts
        ``pruned_dead``, ``CLOSED_SLOW`` prunes it and counts
        ``closed_slow``, ``DROPPED`` keeps it and counts ``dropped``. Never
        raises.

        ``position`` is the message's place in the channel's history (from a
        backend that keeps one): the channel's formatter, if any, turns
        ``(message, position)`` into what is sent, once. Listeners catching
        up get the message in their buffer instead.

        Returns the number of listeners that took the message.
        """
        self._received += 1
        listeners = self._channels.get(channel)
        if not listeners:
            return 0
        catching_up = self._catching_up.get(channel)
        raw = message
        formatter = self._formatters.get(channel)
        if position is not None and formatter is not None:
            try:
                message = formatter(raw, position)
            except Exception:
                logger.exception("formatting a message on %r failed", channel)
                return 0
        held = None
        if catching_up:
            held = set()
            for ws in list(catching_up):
                if ws not in listeners:
                    continue
                if catching_up[ws].holds(raw, position):
                    held.add(ws)
                else:
                    self._end_recovery(channel, ws)  # past its floor: live again
        groups, others = self._fanout[channel].walk(held)
        encoded = {}
        delivered = dead = slow = dropped = skipped = 0
        failed = []  # (listener, outcome), counted and pruned below
        for group in groups:
            data = encoded.get(id(group.wire_format))
            if data is None:
                data = self._encode(message, group.wire_format, encoded)
            if data is _UNENCODABLE:
                skipped += len(group)
                continue
            sent, rest = group.send(data)
            delivered += sent
            failed += rest
        for ws in others:
            try:
                outcome = self._send_one(ws, message, encoded)
            except Exception as exc:
                outcome = exc
            if outcome is _SENT:
                delivered += 1
            else:
                failed.append((ws, outcome))
        for ws, outcome in failed:
            if isinstance(outcome, Exception):
                logger.debug("sending to %r failed: %r", ws, outcome)
                outcome = _DEAD
            if outcome is _DROPPED:
                dropped += 1
            elif outcome is _SKIPPED:
                skipped += 1
            else:
                if outcome is _SLOW:
                    slow += 1
                else:
                    dead += 1
                self._drop_everywhere(ws)
        self._delivered += delivered
        self._pruned_dead += dead
        self._closed_slow += slow
        self._dropped += dropped
        self._skipped += skipped
        if dead or slow:
            logger.debug(
                "channel %r: pruned %d dead and %d slow listeners", channel, dead, slow
            )
        if dropped:
            logger.debug("channel %r: %d slow listeners dropped it", channel, dropped)
        return delivered

    def gap(self, channel: str, reason: str) -> None:
        """The backend's word that ``channel`` may have missed messages.

        Called by the backend (``Backend.report_gap``) once the channel is
        received again: after a lost connection, a moved cluster slot, a
        history window overrun or a lost history. Counted in
        :attr:`stats` (``gaps``); the channel's gap hook (``on_gap`` given
        to :meth:`add`, the resource's
        :meth:`~stargate.resource.WebSocketAwareResource.on_gap`) is called
        as ``on_gap(channel, reason)`` so the application can tell its
        clients to reload. Never raises.
        """
        if channel not in self._channels:
            return
        self._gaps += 1
        logger.info("channel %r may have missed messages: %s", channel, reason)
        hook = self._gap_hooks.get(channel)
        if hook is None:
            return
        try:
            hook(channel, reason)
        except Exception:
            logger.exception("the gap hook of %r failed", channel)

    @staticmethod
    def _send_unprepared(ws, message):
        """A listener of another kind (eventlet's own WebSocket): it encodes
        the message itself and raises when it is dead."""
        ws.send(message)
        return _SENT

    def _send_one(self, ws, message, encoded):
        """Write ``message`` to one listener; returns what became of it.

        The same steps as the loop of :meth:`deliver`, for one listener.
        """
        send_prepared = getattr(ws, "send_prepared", None)
        if send_prepared is None:
            return self._send_unprepared(ws, message)
        data = encoded.get(id(ws.wire_format))
        if data is None:
            data = self._encode(message, ws.wire_format, encoded)
        if data is _UNENCODABLE:
            return _SKIPPED
        return _outcome(ws, send_prepared(data))

    @staticmethod
    def _encode(message, wire_format, encoded):
        try:
            data = encode_message(message, wire_format)
        except (TypeError, ValueError) as exc:
            logger.debug("cannot encode for %r: %s", wire_format, exc)
            data = _UNENCODABLE
        encoded[id(wire_format)] = data
        return data

    # -- counters ----------------------------------------------------------

    @property
    def stats(self) -> HubStats:
        """A :class:`HubStats` snapshot of this process's counters."""
        return HubStats(
            listeners=sum(len(s) for s in self._channels.values()),
            channels=len(self._channels),
            messages=self._messages,
            received=self._received,
            delivered=self._delivered,
            pruned_dead=self._pruned_dead,
            closed_slow=self._closed_slow,
            dropped=self._dropped,
            skipped=self._skipped,
            gaps=self._gaps,
        )

    def __repr__(self):
        return (
            f"<Hub {self.name or ''}{' ' if self.name else ''}backend={self.backend!r} "
            f"channels={len(self._channels)}>"
        )


class _Fanout:
    """A channel's listeners as a broadcast walks them: one
    :class:`~stargate.connection.SendGroup` per wire format (its frame is
    encoded once, and written in one loop), and the listeners of other
    kinds, written one by one. Kept in step with the channel's set by
    :meth:`Hub.add` and :meth:`Hub.remove`."""

    __slots__ = ("groups", "others")

    def __init__(self):
        self.groups = {}  # id(wire format) -> SendGroup (which holds it)
        self.others = {}  # listener -> None, in the order they came

    def add(self, ws):
        if not SendGroup.accepts(ws):
            self.others[ws] = None
            return
        wire_format = ws.wire_format
        group = self.groups.get(id(wire_format))
        if group is None:
            group = self.groups[id(wire_format)] = SendGroup(wire_format)
        group.add(ws)

    def discard(self, ws):
        if self.others.pop(ws, True) is None:
            return
        for key, group in self.groups.items():
            if ws in group:
                group.discard(ws)
                if not group:
                    del self.groups[key]
                return

    def walk(self, held):
        """The groups and other listeners a delivery writes, minus ``held``
        (listeners catching up). Copies unless one group is all there is:
        then its walk is over before anything can change it."""
        groups = list(self.groups.values())
        if not held and not self.others and len(groups) == 1:
            return groups, ()
        groups = [group.snapshot() for group in groups]
        if held:
            for group in groups:
                for ws in held:
                    group.discard(ws)
            return groups, [ws for ws in self.others if ws not in held]
        return groups, list(self.others)


class _Recovery:
    """A listener recovering from a position: live messages are buffered
    while its history is sent (``buffer``), then those at or before
    ``floor`` in ``epoch`` are skipped, as it was sent them already."""

    __slots__ = ("buffer", "epoch", "floor")

    def __init__(self, epoch, floor):
        self.buffer = []
        self.epoch = epoch
        self.floor = floor

    def holds(self, message, position):
        """Whether a live message is kept from the listener (buffered, or
        sent already); False once it is past the floor."""
        if self.buffer is not None:
            self.buffer.append((message, position))
            return True
        return (
            position is not None
            and position.epoch == self.epoch
            and position.offset <= self.floor
        )


def _outcome(ws, result):
    """What became of a listener, from what its ``send_prepared`` returned.

    A :class:`~stargate.connection.SendResult` is the outcome itself
    (``QUEUED`` counts as sent). A listener class whose ``send_prepared``
    returns a plain boolean instead is read with its ``closed`` and
    ``close_code``.
    """
    if isinstance(result, SendResult):
        return _SENT if result is SendResult.QUEUED else result
    if result is True:
        return _SENT
    if getattr(ws, "closed", True) is False:
        return _DROPPED
    if getattr(ws, "close_code", None) == 1013:
        return _SLOW
    return _DEAD


# The hub's outcomes are SendResult's own members, and one of its own: a
# message that cannot be put on a listener's wire is skipped.
_SENT = SendResult.SENT
_DROPPED = SendResult.DROPPED
_SLOW = SendResult.CLOSED_SLOW
_DEAD = SendResult.DEAD
_SKIPPED = object()


_default_hub = None


def default_hub() -> Hub:
    """The process-wide hub on the in-memory backend.

    Used when ``config.include('stargate')`` was not called: broadcast then
    reaches the listeners of this process only, which is all a
    single-process development server has.
    """
    global _default_hub
    if _default_hub is None or _default_hub.closed:
        hub = Hub("memory", name="default")
        hub.start()
        _default_hub = hub
    return _default_hub
