"""A hub whose backend could not start tries again on its next use."""

import time

import pytest

from stargate.backends.memory import MemoryBackend
from stargate.exceptions import BackendUnavailable
from stargate.hub import Hub
from tests import green


def test_a_hub_retries_a_backend_that_was_down_at_first_use(fresh_redis_server):
    url = fresh_redis_server.url
    fresh_redis_server.stop()
    hub = Hub(url)
    try:
        with pytest.raises(BackendUnavailable):
            hub.publish("/room", "lost: Redis is down")
        fresh_redis_server.start()
        received = []

        class Listener:
            closed = False

            def send(self, message):
                received.append(message)

        hub.add("/room", Listener())
        hub.publish("/room", "delivered")
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            green.sleep(0.01)
        assert received == ["delivered"]
    finally:
        hub.close()


class SlowStart(MemoryBackend):
    """A memory backend whose start waits on I/O, as Redis's does."""

    starts = 0

    def start(self, deliver):
        type(self).starts += 1
        green.sleep(0.05)
        if type(self).starts > 1:
            raise AssertionError("the backend was started twice")
        return super().start(deliver)


def test_listeners_arriving_together_start_the_backend_once():
    hub = Hub(SlowStart())
    listeners = [object() for _ in range(5)]
    green.run_all(*((hub.add, "/room", listener) for listener in listeners))
    try:
        assert SlowStart.starts == 1
        assert hub.listener_count("/room") == 5
    finally:
        hub.close()
