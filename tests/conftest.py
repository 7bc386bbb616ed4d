import eventlet

eventlet.monkey_patch()

import pytest  # noqa: E402

from stargate.testing.redis_server import (  # noqa: E402
    RedisCluster,
    RedisServer,
    RedisServerNotFound,
    find_redis_server,
)


def _require_redis_server():
    try:
        find_redis_server()
    except RedisServerNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server shared by the session (never the one on 6379).

    Tests sharing it keep apart by using their own key prefix."""
    _require_redis_server()
    with RedisServer() as server:
        yield server


@pytest.fixture
def fresh_redis_server():
    """A private redis-server for one test: fault tests kill and restart it."""
    _require_redis_server()
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster():
    """A private three-master Redis Cluster shared by the session."""
    _require_redis_server()
    with RedisCluster() as cluster:
        yield cluster
