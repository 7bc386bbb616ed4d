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
``size`` messages in process memory, numbered from 1, and forgets the
channel altogether ``ttl`` seconds after its last message, so a process
holds nothing for channels gone quiet. The epoch is a random token made
when the backend starts in a process, so positions from before a restart
(or from another worker) are never mistaken for this process's; a channel
forgotten and used again starts a new epoch at offset 1, as a Redis stream
that expired does, so a client holding an old position is told its history
is gone instead of being handed the new messages as if it had missed none.
"""

import collections
import os
import time
import uuid

from stargate.backends.base import Backend, History, Position
from stargate.exceptions import BackendUnavailable, HistoryUnavailable

__all__ = ["MemoryBackend"]


class MemoryBackend(History, Backend):
    """Deliver published messages to this process's own listeners.

    ``subscribe`` and ``unsubscribe`` only record which channels have local
    listeners; a message published on any other channel goes nowhere.
    """

    synchronous = True

    def __init__(self, url=None, **options):
        self.refuse_unknown_options(options)
        super().__init__(url)
        self._subscribed = set()
        self._deliver = None
        self._closed = False
        self._clock = time.monotonic
        self._new_epoch()

    def _new_epoch(self):
        self.epoch = uuid.uuid4().hex[:16]
        #: The epoch a channel's history gets when it is made; it changes
        #: whenever a channel in it is forgotten, so a forgotten channel
        #: used again never reuses a position.
        self._current_epoch = self.epoch
        self._epoch_pid = os.getpid()
        #: channel -> _ChannelHistory, least recently published first.
        self._histories = collections.OrderedDict()

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
        now = self._clock()
        kept = self._kept(channel, now)
        if kept is None:
            kept = self._histories[channel] = _ChannelHistory(self._current_epoch)
        else:
            self._histories.move_to_end(channel)
        position = Position(kept.epoch, kept.append(message, history, now))
        if deliver is not None and channel in self._subscribed:
            deliver(channel, message, position)
        return position

    def history(self, channel, since):
        since = Position.coerce(since)
        kept = self._kept(channel, self._clock())
        if kept is None:
            epoch, head, entries = self._current_epoch, 0, []
        else:
            epoch, head, entries = kept.epoch, kept.offset, kept.entries
        if since.epoch != epoch:
            raise HistoryUnavailable(
                f"{channel!r}: epoch {since.epoch!r} is not the current one "
                f"({epoch!r}); its history was lost",
                epoch=epoch,
                offset=head,
            )
        if since.offset == head:
            return []
        if since.offset > head or not entries or entries[0][0] > since.offset + 1:
            raise HistoryUnavailable(
                f"{channel!r}: offset {since.offset} is no longer in the window "
                f"(offsets {entries[0][0] if entries else head + 1}-{head} are)",
                epoch=epoch,
                offset=head,
            )
        start = since.offset + 1 - entries[0][0]
        return [(Position(epoch, o), m) for o, m in list(entries)[start:]]

    def _kept(self, channel, now):
        """``channel``'s history, or None; forgets what has expired.

        Channels are kept in the order of their last message, so the expired
        ones are found at the front (one check per call when none is); a
        channel with a longer ttl than those behind it holds them back until
        it expires too or they are asked for.
        """
        histories = self._histories
        while histories:
            name = next(iter(histories))
            if histories[name].expires > now:
                break
            self._forget(name)
        kept = histories.get(channel)
        if kept is not None and kept.expires <= now:
            self._forget(channel)
            kept = None
        return kept

    def _forget(self, channel):
        kept = self._histories.pop(channel)
        if kept.epoch == self._current_epoch:
            self._current_epoch = uuid.uuid4().hex[:16]

    def close(self):
        self._closed = True
        self._deliver = None
        self._subscribed.clear()
        self._histories.clear()

    def __repr__(self):
        return f"<MemoryBackend channels={len(self._subscribed)}>"


class _ChannelHistory:
    """The last messages of one channel: ``(offset, message)``, oldest first."""

    __slots__ = ("epoch", "offset", "expires", "entries")

    def __init__(self, epoch):
        self.epoch = epoch
        self.offset = 0
        self.expires = 0.0
        self.entries = collections.deque()

    def append(self, message, policy, now):
        self.offset += 1
        self.expires = now + policy.ttl
        self.entries.append((self.offset, message))
        while len(self.entries) > policy.size:
            self.entries.popleft()
        return self.offset
