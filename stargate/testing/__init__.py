"""Testing helpers for applications built on stargate.

* :func:`connect` opens a WebSocket to a live server and returns a
  :class:`TestClient` (``send``, ``receive(timeout)``, ``receive_nothing``,
  ``close``, the close code and reason); :func:`connect_app` does the same
  through a real upgrade with no network, over a socket pair.
* :class:`LiveServer` serves a WSGI application with eventlet on a free
  loopback port.
* :class:`RedisServer` and :class:`RedisCluster` start private
  ``redis-server`` processes on free ports, for tests of the Redis backend.
* The pytest plugin (:mod:`stargate.testing.pytest_plugin`) turns them into
  fixtures: ``stargate_server``, ``stargate_connect``, ``stargate_redis``.
"""

import importlib

__all__ = [
    "connect",
    "connect_app",
    "TestClient",
    "ReceiveTimeout",
    "UnexpectedMessage",
    "UpgradeRefused",
    "LiveServer",
    "RedisServer",
    "RedisCluster",
]

# Loaded on first use: pytest imports this package (for the plugin) before a
# conftest.py can monkey-patch, so nothing here may import redis or eventlet.
_LAZY = {
    "LiveServer": "stargate.testing.server",
    "RedisServer": "stargate.testing.redis_server",
    "RedisCluster": "stargate.testing.redis_server",
}


def __getattr__(name):
    if name not in __all__:
        raise AttributeError(f"module 'stargate.testing' has no attribute {name!r}")
    module = importlib.import_module(_LAZY.get(name, "stargate.testing.client"))
    value = getattr(module, name)
    globals()[name] = value
    return value
