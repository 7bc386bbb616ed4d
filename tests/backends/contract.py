"""What every broadcast backend does, as tests.

Subclass :class:`BackendContract` in a test module (setting ``backends`` to
the names, in ``conftest.BACKENDS``, it should run on). The tests only use
the :class:`~stargate.backends.base.Backend` interface, so they hold for
backends that deliver synchronously and for those that deliver later from a
green thread: every wait is bounded by a deadline.
"""

import time

from tests import green

#: Seconds any single expected delivery may take.
DEADLINE = 10.0


class Collector:
    """A ``deliver`` callback that records what it receives."""

    PROBE = "\x00probe"

    def __init__(self):
        self.received = []

    def __call__(self, channel, message, position=None):
        if isinstance(message, str) and message.startswith(self.PROBE):
            self.received.append((channel, self.PROBE))
            return
        self.received.append((channel, message))

    def messages(self, channel):
        return [m for c, m in self.received if c == channel and m != self.PROBE]

    def probes(self, channel):
        return sum(1 for c, m in self.received if c == channel and m == self.PROBE)

    def clear(self):
        self.received.clear()


def wait_until(predicate, timeout=DEADLINE, interval=0.005):
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        green.sleep(interval)


def ready(backend, collector, *channels):
    """Wait until ``channels`` are subscribed for real, by publishing probes
    until one comes back on each (a network backend subscribes a moment
    after ``subscribe`` returns)."""
    for channel in channels:
        deadline = time.monotonic() + DEADLINE
        while collector.probes(channel) == 0:
            assert time.monotonic() < deadline, f"{channel!r} never became ready"
            backend.publish(channel, Collector.PROBE)
            wait_until(lambda: collector.probes(channel) > 0, timeout=0.2)


def started(backend, *channels):
    collector = Collector()
    backend.start(collector)
    for channel in channels:
        backend.subscribe(channel)
    ready(backend, collector, *channels)
    return collector


class BackendContract:
    #: Whether two instances of the backend reach each other, as two worker
    #: processes would (false for the in-memory backend).
    shared = True

    def test_delivers_to_a_subscribed_channel(self, backend_factory):
        backend = backend_factory()
        collector = started(backend, "news")
        backend.publish("news", "hello")
        assert wait_until(lambda: collector.messages("news") == ["hello"])

    def test_every_subscribed_instance_gets_the_message(self, backend_factory):
        first, second = backend_factory(), backend_factory()
        got_first = started(first, "news")
        got_second = started(second, "news")
        first.publish("news", "to all")
        assert wait_until(lambda: got_first.messages("news") == ["to all"])
        if self.shared:
            assert wait_until(lambda: got_second.messages("news") == ["to all"])
        else:
            # One process's hub only: another instance stands for another
            # process, which an in-process backend cannot reach.
            green.sleep(0.1)
            assert got_second.messages("news") == []

    def test_keeps_the_message_type(self, backend_factory):
        backend = backend_factory()
        collector = started(backend, "types")
        sent = ["text", b"\x00\xffbinary", "", b"", "caf\u00e9 \U0001f600"]
        for message in sent:
            backend.publish("types", message)
        assert wait_until(lambda: len(collector.messages("types")) == len(sent))
        received = collector.messages("types")
        assert received == sent
        assert [type(m) for m in received] == [type(m) for m in sent]

    def test_preserves_order_per_channel(self, backend_factory):
        backend = backend_factory()
        collector = started(backend, "ordered")
        sent = [f"message {i}" for i in range(1000)]
        for message in sent:
            backend.publish("ordered", message)
        assert wait_until(lambda: len(collector.messages("ordered")) >= 1000)
        assert collector.messages("ordered") == sent

    def test_unsubscribe_stops_delivery(self, backend_factory):
        backend = backend_factory()
        collector = started(backend, "gone", "sentinel")
        backend.unsubscribe("gone")
        # Unsubscribing may take a moment on a network backend: wait until a
        # message published afterwards no longer arrives.
        deadline = time.monotonic() + DEADLINE
        while True:
            collector.clear()
            backend.publish("gone", "after unsubscribe")
            backend.publish("sentinel", "marker")
            assert wait_until(lambda: collector.messages("sentinel") == ["marker"])
            green.sleep(0.05)
            if collector.messages("gone") == []:
                break
            assert time.monotonic() < deadline, "unsubscribe never took effect"
        # And it stays that way.
        collector.clear()
        for i in range(10):
            backend.publish("gone", f"still gone {i}")
        backend.publish("sentinel", "marker")
        assert wait_until(lambda: collector.messages("sentinel") == ["marker"])
        green.sleep(0.05)
        assert collector.messages("gone") == []

    def test_channels_are_independent(self, backend_factory):
        backend = backend_factory()
        collector = started(backend, "a", "b")
        backend.publish("a", "for a")
        backend.publish("b", "for b")
        backend.publish("a", "for a again")
        assert wait_until(lambda: len(collector.messages("a")) == 2)
        assert wait_until(lambda: len(collector.messages("b")) == 1)
        assert collector.messages("a") == ["for a", "for a again"]
        assert collector.messages("b") == ["for b"]

    def test_publish_without_subscribers_is_fine(self, backend_factory):
        backend = backend_factory()
        collector = started(backend, "sentinel")
        backend.publish("nobody-listens", "into the void")
        backend.publish("sentinel", "marker")
        assert wait_until(lambda: collector.messages("sentinel") == ["marker"])
        green.sleep(0.05)
        assert collector.messages("nobody-listens") == []

    def test_publish_before_any_subscription_is_fine(self, backend_factory):
        backend = backend_factory()
        collector = Collector()
        backend.start(collector)
        backend.publish("nobody-listens", "into the void")

    def test_listener_count_is_at_least_the_local_count(self, backend_factory):
        backend = backend_factory()
        started(backend, "counted")
        assert backend.listener_count("counted", 3) >= 3
        assert backend.listener_count("never-used", 0) >= 0

    def test_close_is_idempotent(self, backend_factory):
        backend = backend_factory()
        started(backend, "news")
        backend.close()
        backend.close()

    def test_close_without_start_is_fine(self, backend_factory):
        backend = backend_factory()
        backend.close()
        backend.close()
