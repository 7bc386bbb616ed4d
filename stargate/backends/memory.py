"""The in-memory backend: one process, no network, the default.

Publishing on a channel this process listens to calls the hub's ``deliver``
directly, in the caller's green thread, before :meth:`MemoryBackend.publish`
returns. That is the documented single-process behaviour of
``WebSocketAwareResource.send``: when ``send`` returns, every listener has
been written to (or had the message queued in its send buffer) and the dead
ones have been pruned. Listeners in other worker processes are not reached;
configure a Redis backend for that.

History
-------

When a message is published with a :class:`~stargate.backends.base.HistoryPolicy`
(``stargate.history_size`` > 0), the backend keeps the channel's last
``size`` messages in process memory, numbered from 1, and drops them
``ttl`` seconds after the channel's last message (the numbering goes on).
The epoch is a random token made when the backend starts in a process, so
positions from before a restart (or from another worker) are never
mistaken for this process's.
"""

import collections
import os
import time
import uuid

from stargate.backends.base import Backend, Position
from stargate.exceptions import BackendUnavailable, HistoryUnavailable

__all__ = ["MemoryBackend"]


class MemoryBackend(Backend):
    """Deliver published messages to this process's own listeners.

    ``subscribe`` and ``unsubscribe`` only record which channels have local
    listeners; a message published on any other channel goes nowhere.
    """

    synchronous = True
    supports_history = True

    def __init__(self, url=None, **options):
        super().__init__(url, **options)
        self._subscribed = set()
        self._deliver = None
        self._closed = False
        self._new_epoch()

    def _new_epoch(self):
        self.epoch = uuid.uuid4().hex[:16]
        self._epoch_pid = os.getpid()
        self._histories = {}  # channel -> _ChannelHistory

    def start(self, deliver):
        if self._epoch_pid != os.getpid():
            self._new_epoch()  # a forked child: the parent's history is not ours
        self._deliver = deliver
        self._closed = False

    def subscribe(self, channel):
        self._subscribed.add(channel)

    def unsubscribe(self, channel):
        self._subscribed.discard(channel)

    def publish(self, channel, message, history=None):
        if self._closed:
            raise BackendUnavailable("the memory backend is closed")
        deliver = self._deliver
        if history is None or history.size <= 0:
            if deliver is not None and channel in self._subscribed:
                deliver(channel, message)
            return None
        kept = self._histories.get(channel)
        if kept is None:
            kept = self._histories[channel] = _ChannelHistory()
        position = Position(self.epoch, kept.append(message, history))
        if deliver is not None and channel in self._subscribed:
            deliver(channel, message, position)
        return position

    def history(self, channel, since):
        since = Position.coerce(since)
        kept = self._histories.get(channel)
        head = 0 if kept is None else kept.offset
        if since.epoch != self.epoch:
            raise HistoryUnavailable(
                f"{channel!r}: epoch {since.epoch!r} is not the current one "
                f"({self.epoch!r}); its history was lost",
                epoch=self.epoch,
                offset=head,
            )
        if since.offset == head:
            return []
        entries = [] if kept is None else kept.entries()
        if since.offset > head or not entries or entries[0][0] > since.offset + 1:
            raise HistoryUnavailable(
                f"{channel!r}: offset {since.offset} is no longer in the window "
                f"(offsets {entries[0][0] if entries else head + 1}-{head} are)",
                epoch=self.epoch,
                offset=head,
            )
        start = since.offset + 1 - entries[0][0]
        return [(Position(self.epoch, o), m) for o, m in entries[start:]]

    def close(self):
        self._closed = True
        self._deliver = None
        self._subscribed.clear()
        self._histories.clear()

    def __repr__(self):
        return f"<MemoryBackend channels={len(self._subscribed)}>"


class _ChannelHistory:
    """The last messages of one channel: ``(offset, message)``, oldest first."""

    __slots__ = ("offset", "expires", "_entries")

    def __init__(self):
        self.offset = 0
        self.expires = 0.0
        self._entries = collections.deque()

    def append(self, message, policy):
        now = time.monotonic()
        if now >= self.expires:
            self._entries.clear()  # ttl seconds without a message
        self.offset += 1
        self.expires = now + policy.ttl
        self._entries.append((self.offset, message))
        while len(self._entries) > policy.size:
            self._entries.popleft()
        return self.offset

    def entries(self):
        if time.monotonic() >= self.expires:
            self._entries.clear()
        return list(self._entries)
