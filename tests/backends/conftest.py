"""``backend_factory``: builds backends of every kind the contract runs on.

``BACKENDS`` maps a name to ``maker(request, **options) -> Backend``; a
maker may ask for other fixtures with ``request.getfixturevalue``. Tests that
use ``backend_factory`` run once per backend, or only for the names listed
in their class's ``backends`` attribute.
"""

import pytest

from stargate.backends.memory import MemoryBackend


def make_memory(request, **options):
    return MemoryBackend(**options)


def make_redis(request, **options):
    # A private server shared by the session; a prefix per test keeps tests
    # apart, and two backends of one test share it as two workers would.
    from stargate.backends.redis import RedisBackend

    server = request.getfixturevalue("redis_server")
    options.setdefault("prefix", f"contract-{request.node.nodeid}:")
    options.setdefault("reconnect_backoff", (0.05, 0.5))
    return RedisBackend(server.url, **options)


def make_redis_cluster(request, **options):
    from stargate.backends.redis import RedisBackend

    cluster = request.getfixturevalue("redis_cluster")
    options.setdefault("prefix", f"contract-{request.node.nodeid}:")
    options.setdefault("reconnect_backoff", (0.05, 0.5))
    return RedisBackend(cluster.url, **options)


def make_redis_streams(request, **options):
    from stargate.backends.redis_streams import RedisStreamsBackend

    server = request.getfixturevalue("redis_server")
    options.setdefault("prefix", f"contract-{request.node.nodeid}:")
    options.setdefault("reconnect_backoff", (0.05, 0.5))
    return RedisStreamsBackend(
        server.url.replace("redis://", "redis+streams://"), **options
    )


BACKENDS = {
    "memory": make_memory,
    "redis": make_redis,
    "redis-cluster": make_redis_cluster,
    "redis-streams": make_redis_streams,
}


def pytest_generate_tests(metafunc):
    if "backend_name" in metafunc.fixturenames:
        names = getattr(metafunc.cls, "backends", None) or sorted(BACKENDS)
        metafunc.parametrize("backend_name", names)


@pytest.fixture
def backend_factory(request, backend_name):
    """``backend_factory(**options)`` -> a new, unstarted backend; every
    backend made is closed at the end of the test."""
    made = []

    def factory(**options):
        backend = BACKENDS[backend_name](request, **options)
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        backend.close()
