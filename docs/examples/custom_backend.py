"""A backend that delivers from its own green thread, through a queue.

It reaches one process only, like the memory backend, but behaves like a
network backend: ``publish`` returns at once and a receiving green thread
hands each message to the hub a moment later, in publish order. Replace the
queue with a network connection and you have the shape of a real one.
"""

import eventlet
import eventlet.queue

from stargate.backends.base import Backend
from stargate.exceptions import BackendUnavailable

_STOP = object()


class QueueBackend(Backend):
    """Broadcast through an in-process queue read by one green thread."""

    def __init__(self, url=None, *, max_queue=10_000, **options):
        super().__init__(url, **options)
        self.max_queue = int(max_queue)  # from an .ini file it is a string
        self._queue = None
        self._receiver = None
        self._subscribed = set()
        self._closed = False

    def start(self, deliver):
        self._queue = eventlet.queue.LightQueue(self.max_queue)
        self._receiver = eventlet.spawn(self._receive, deliver)

    def _receive(self, deliver):
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            channel, message = item
            if channel in self._subscribed:
                try:
                    deliver(channel, message)
                except Exception:  # one bad message must not stop the others
                    pass

    def subscribe(self, channel):
        self._subscribed.add(channel)

    def unsubscribe(self, channel):
        self._subscribed.discard(channel)

    def publish(self, channel, message):
        if self._closed or self._queue is None:
            raise BackendUnavailable("the queue backend is not running")
        try:
            self._queue.put_nowait((channel, message))
        except eventlet.queue.Full:
            raise BackendUnavailable("the queue backend is full") from None

    def close(self):
        if self._closed:
            return
        self._closed = True
        if self._queue is not None:
            self._queue.put(_STOP)
            self._receiver.wait()
        self._subscribed.clear()
