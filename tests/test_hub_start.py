"""A hub whose backend could not start tries again on its next use."""

import time

import eventlet
import pytest

from stargate.exceptions import BackendUnavailable
from stargate.hub import Hub


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
            eventlet.sleep(0.01)
        assert received == ["delivered"]
    finally:
        hub.close()
