"""The interface every broadcast backend implements.

A backend only moves messages between processes. The hub (``stargate.hub``)
owns the local listener sets, encodes frames and prunes dead listeners, so
every backend delivers and prunes the same way. A backend is told which
channels this process has listeners for, publishes messages, and hands every
message published on a subscribed channel (by any process, this one included)
back to the hub through the ``deliver`` callback given to :meth:`start`.

Messages are ``str`` (sent as text frames) or ``bytes`` (binary frames); a
backend must hand back the same type it was given.
"""

import abc

__all__ = ["Backend"]


class Backend(abc.ABC):
    """A way to carry broadcast messages to every subscribed process.

    Subclasses take their options as keyword arguments: the ``url`` of the
    ``stargate.backend`` setting and any other ``stargate.*`` settings the
    application passes on.
    """

    #: Whether :meth:`publish` hands the message to ``deliver`` before it
    #: returns (the in-memory backend does; network backends do not).
    synchronous = False

    def __init__(self, url=None, **options):
        self.url = url
        self.options = options

    @abc.abstractmethod
    def start(self, deliver):
        """Begin delivering. ``deliver(channel, message)`` is called once per
        message published on a subscribed channel, in publish order per
        channel, from a green thread of this process."""

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
        message could not be handed over.
        """

    def listener_count(self, channel, local_count):
        """Listeners on ``channel`` across every process.

        ``local_count`` is this process's own count; a backend that cannot
        see other processes returns it unchanged.
        """
        return local_count

    def set_local_count(self, channel, count):
        """This process now has ``count`` listeners on ``channel``.

        Backends that report presence across processes record it; the default
        does nothing.
        """

    def close(self):
        """Stop delivering and release connections. Safe to call twice."""
