"""The Redis backend over a Unix socket (``unix://``), against a real server."""

import time

import eventlet

from stargate.backends.redis import RedisBackend
from stargate.testing.redis_server import RedisServer


def test_unix_socket_url_publishes_and_delivers(tmp_path):
    path = tmp_path / "redis.sock"
    unix = ["--unixsocket", str(path), "--unixsocketperm", "700"]
    with RedisServer(extra_args=unix):
        backend = RedisBackend(f"unix://{path}?db=0", prefix="unix-test:")
        received = []
        backend.start(lambda channel, message, *position: received.append(message))
        try:
            backend.subscribe("/room")
            backend.publish("/room", "over a unix socket")
            backend.publish("/room", b"\x00binary")
            deadline = time.monotonic() + 5
            while len(received) < 2 and time.monotonic() < deadline:
                eventlet.sleep(0.01)
            assert received == ["over a unix socket", b"\x00binary"]
        finally:
            backend.close()
