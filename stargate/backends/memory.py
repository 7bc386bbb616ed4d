"""The in-memory backend: one process, no network, the default.

Publishing on a channel this process listens to calls the hub's ``deliver``
directly, in the caller's green thread, before :meth:`MemoryBackend.publish`
returns. That is the documented single-process behaviour of
``WebSocketAwareResource.send``: when ``send`` returns, every listener has
been written to (or had the message queued in its send buffer) and the dead
ones have been pruned. Listeners in other worker processes are not reached;
configure a Redis backend for that.
"""

from stargate.backends.base import Backend
from stargate.exceptions import BackendUnavailable

__all__ = ["MemoryBackend"]


class MemoryBackend(Backend):
    """Deliver published messages to this process's own listeners.

    ``subscribe`` and ``unsubscribe`` only record which channels have local
    listeners; a message published on any other channel goes nowhere.
    """

    synchronous = True

    def __init__(self, url=None, **options):
        super().__init__(url, **options)
        self._subscribed = set()
        self._deliver = None
        self._closed = False

    def start(self, deliver):
        self._deliver = deliver
        self._closed = False

    def subscribe(self, channel):
        self._subscribed.add(channel)

    def unsubscribe(self, channel):
        self._subscribed.discard(channel)

    def publish(self, channel, message):
        if self._closed:
            raise BackendUnavailable("the memory backend is closed")
        deliver = self._deliver
        if deliver is not None and channel in self._subscribed:
            deliver(channel, message)

    def close(self):
        self._closed = True
        self._deliver = None
        self._subscribed.clear()

    def __repr__(self):
        return f"<MemoryBackend channels={len(self._subscribed)}>"
