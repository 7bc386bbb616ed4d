"""Production faults of the Redis backends, against private redis-server
processes: every numbered message is counted per channel.

Every server is started by the test run on free loopback ports
(``stargate.testing.redis_server``); nothing talks to a Redis on 6379.
"""

import logging
import os
import signal
import uuid

import pytest

from stargate.backends import load_backend
from stargate.backends.redis import DEFAULT_MAX_CONNECTIONS, RedisBackend
from tests import green
from tests.backends.contract import Collector, ready, started, wait_until


def numbered(collector, channel):
    """The numbers received on ``channel`` (messages are ``"<n>"``)."""
    return [int(m) for m in collector.messages(channel)]


def client_connections(backend, servers):
    """Ordinary (non pub/sub) connections the backend holds, on all nodes."""
    name = backend.client_name.encode()
    total = 0
    for server in servers:
        with server.client() as client:
            for info in client.client_list(_type="normal"):
                if info.get("name", "").encode() == name:
                    total += 1
    return total


class TestConcurrentSends:
    """Defect 4: many concurrent ``publish`` calls of one worker, Redis healthy."""

    backends = ["redis", "redis-cluster", "redis-streams"]

    def test_400_concurrent_sends_all_succeed_on_a_bounded_pool(
        self, request, backend_factory, backend_name
    ):
        servers = (
            request.getfixturevalue("redis_cluster").servers
            if backend_name == "redis-cluster"
            else [request.getfixturevalue("redis_server")]
        )
        backend = backend_factory()
        collector = started(backend, "burst")
        collector.clear()
        errors = []

        def send(n):
            try:
                backend.publish("burst", str(n))
            except Exception as exc:  # counted: the test says which ones
                errors.append((n, exc))

        green.run_all(*((send, n) for n in range(400)))
        assert errors == []
        assert wait_until(lambda: len(collector.messages("burst")) >= 400)
        assert sorted(numbered(collector, "burst")) == list(range(400))
        # The pool is bounded: at most max_connections per node stay open.
        held = client_connections(backend, servers)
        assert 0 < held <= DEFAULT_MAX_CONNECTIONS * len(servers)

    def test_max_connections_is_an_option(self, backend_factory):
        backend = backend_factory(max_connections="3")
        assert backend.max_connections == 3


class TestIdleCluster:
    """Defect 8: a cluster worker with no channel has no pub/sub connection
    to hear from; its silence is not a lost connection."""

    def test_an_idle_cluster_worker_reports_no_lost_connection(
        self, redis_cluster, caplog
    ):
        backend = RedisBackend(
            redis_cluster.url,
            prefix=f"idle-{uuid.uuid4().hex[:8]}:",
            presence_ttl=0.3,  # a heartbeat every 0.1 s
            socket_timeout=0.5,  # silence past 0.7 s would mean a dead peer
        )
        collector = Collector()
        try:
            with caplog.at_level(logging.WARNING, logger="stargate.backends.redis"):
                backend.start(collector)
                assert wait_until(lambda: backend.stats["heartbeats"] >= 20)
            assert backend.stats["reconnects"] == 0
            assert [r.getMessage() for r in caplog.records] == []
            # and it still works when a channel comes
            backend.subscribe("late")
            ready(backend, collector, "late")
        finally:
            backend.close()


class TestGapsAreReported:
    """Gaps are signals: a channel that may have missed messages is
    reported to ``gap_handler`` (the hub), never left silent."""

    def make(self, server, gaps):
        backend = RedisBackend(
            server.url,
            prefix=f"gaps-{uuid.uuid4().hex[:8]}:",
            reconnect_backoff=(0.05, 0.3),
            socket_timeout=2.0,
        )
        backend.gap_handler = lambda channel, reason: gaps.append((channel, reason))
        return backend

    def test_a_number_missing_from_a_publishers_sequence(self, redis_server):
        gaps = []
        backend = self.make(redis_server, gaps)
        try:
            collector = started(backend, "seq")
            tag = b"12345678"
            with redis_server.client() as client:
                for number in (1, 2, 5, 6):  # 3 and 4 never arrive
                    header = b"#" + tag + number.to_bytes(8, "big")
                    client.publish(f"{backend.prefix}seq", header + b"t%d" % number)
            assert wait_until(lambda: collector.messages("seq") == ["1", "2", "5", "6"])
            assert gaps == [("seq", "2 messages missing")]
            assert backend.stats["missed"] == 2
        finally:
            backend.close()

    def test_a_lost_connection_is_reported_per_channel(self, fresh_redis_server):
        gaps = []
        backend = self.make(fresh_redis_server, gaps)
        try:
            collector = started(backend, "a", "b")
            with fresh_redis_server.client() as client:
                killed = client.client_kill_filter(_type="pubsub")
            assert killed == 1
            assert wait_until(lambda: len(gaps) == 2)
            assert sorted(channel for channel, _ in gaps) == ["a", "b"]
            collector.clear()
            ready(backend, collector, "a", "b")  # and delivery goes on
            assert backend.stats["gaps"] == 2
        finally:
            backend.close()


class TestPresenceOffTheHotPath:
    """Defect 6: presence is written by one green thread, in pipelines;
    joins and leaves never wait on Redis, failed writes are retried, and
    counting falls back to the local count while Redis is away."""

    @pytest.fixture
    def workers(self, fresh_redis_server):
        made = []

        def make(**options):
            options.setdefault("prefix", "presence:")
            options.setdefault("socket_timeout", 1.0)
            options.setdefault("reconnect_backoff", (0.05, 0.3))
            backend = RedisBackend(fresh_redis_server.url, **options)
            backend.start(Collector())
            made.append(backend)
            return backend

        yield make
        if fresh_redis_server.running:
            os.kill(fresh_redis_server.pid, signal.SIGCONT)
        for backend in made:
            backend.close()

    def test_a_count_change_does_not_wait_on_redis(self, fresh_redis_server, workers):
        # A socket_timeout far longer than any wait here: a write inline
        # would hold the caller until Redis is back.
        first, second = workers(socket_timeout=60.0), workers()
        os.kill(fresh_redis_server.pid, signal.SIGSTOP)
        changes = [green.spawn(first.set_local_count, f"room{i}", 3) for i in range(5)]
        assert wait_until(lambda: all(change.dead for change in changes))
        os.kill(fresh_redis_server.pid, signal.SIGCONT)
        assert wait_until(lambda: second.listener_count("room4", 0) == 3)

    def test_a_removal_that_failed_is_retried(self, fresh_redis_server, workers):
        first, second = workers(), workers()
        first.set_local_count("room", 3)
        assert wait_until(lambda: second.listener_count("room", 0) == 3)
        os.kill(fresh_redis_server.pid, signal.SIGSTOP)
        first.set_local_count("room", 0)
        # The write times out against the paused server...
        assert wait_until(lambda: first.stats["presence_failures"] >= 1)
        os.kill(fresh_redis_server.pid, signal.SIGCONT)
        # ...and is retried, long before the 30 s presence TTL.
        assert wait_until(lambda: second.listener_count("room", 0) == 0)

    def test_counting_falls_back_to_local_while_redis_is_away(
        self, fresh_redis_server, workers, caplog
    ):
        first = workers()
        fresh_redis_server.kill()
        with caplog.at_level(logging.WARNING, logger="stargate.backends.redis"):
            assert first.listener_count("room", 4) == 4
        assert "counting this process's listeners only" in caplog.text


class TestSubscribingTogether:
    """Channels subscribed by several green threads at once, on a worker's
    first use, share one pub/sub connection and all deliver (redis-py's
    PubSub makes its connection lazily, once per caller if two race)."""

    def test_ten_channels_subscribed_at_once_all_deliver(self, redis_server):
        backend = RedisBackend(
            redis_server.url,
            prefix=f"together-{uuid.uuid4().hex[:8]}:",
            socket_timeout=2.0,
        )
        collector = Collector()
        try:
            backend.start(collector)
            channels = [f"c{i}" for i in range(10)]
            for thread in [green.spawn(backend.subscribe, c) for c in channels]:
                green.wait(thread)
            ready(backend, collector, *channels)
            with redis_server.client() as client:
                mine = [
                    info
                    for info in client.client_list(_type="pubsub")
                    if info.get("name", "").endswith(backend.process_id)
                ]
            assert len(mine) == 1
        finally:
            backend.close()


class TestSubscribingWhileRedisIsDown:
    """A first ``add_listener`` while Redis is down does not wait for a
    confirmation that cannot come: the channel is subscribed on reconnect."""

    @pytest.mark.parametrize("kind", ["redis", "redis+streams"])
    def test_subscribe_returns_at_once_and_delivers_later(
        self, fresh_redis_server, kind
    ):
        url = fresh_redis_server.url.replace("redis://", f"{kind}://")
        options = dict(
            prefix=f"down-{uuid.uuid4().hex[:8]}:",
            socket_timeout=60.0,  # a wait for the confirmation would show
            reconnect_backoff=(0.05, 0.3),
        )
        backend = load_backend(url, **options)
        other = load_backend(url, **options)
        collector = Collector()
        try:
            backend.start(collector)
            fresh_redis_server.kill()
            thread = green.spawn(backend.subscribe, "late")
            assert wait_until(lambda: thread.dead)
            fresh_redis_server.restart()
            other.start(lambda *args: None)
            ready(other, collector, "late")
        finally:
            backend.close()
            other.close()
