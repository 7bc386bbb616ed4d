"""The Redis Streams backend, against private redis-server processes.

The backend contract runs on it; the tests below check what only it does:
positions, the history window, epochs, and reading on after a lost
connection. Tests sharing the session's server keep apart with a prefix.
"""

import logging
import uuid

import pytest

from stargate.backends import load_backend
from stargate.backends.base import HistoryPolicy, Position
from stargate.backends.redis import encode_message
from stargate.backends.redis_streams import RedisStreamsBackend
from stargate.exceptions import (
    BackendUnavailable,
    HistoryUnavailable,
    IncorrectlyConfigured,
)
from tests import green
from tests.backends.contract import BackendContract, Collector, ready, wait_until

FAST = {"reconnect_backoff": (0.05, 0.3), "socket_timeout": 2.0, "block": 0.2}


class TestRedisStreamsBackendContract(BackendContract):
    backends = ["redis-streams"]


def streams_url(server):
    return server.url.replace("redis://", "redis+streams://")


@pytest.fixture
def prefix():
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def make_backend(prefix):
    """``make_backend(server, **options)``: a backend closed after the test."""
    made = []

    def make(server, **options):
        options.setdefault("prefix", prefix)
        for name, value in FAST.items():
            options.setdefault(name, value)
        backend = RedisStreamsBackend(streams_url(server), **options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


class PositionCollector(Collector):
    """Records ``(channel, message, position)`` too."""

    def __init__(self):
        super().__init__()
        self.positions = []

    def __call__(self, channel, message, position=None):
        super().__call__(channel, message, position)
        if not (isinstance(message, str) and message.startswith(self.PROBE)):
            self.positions.append((channel, message, position))


def start(backend, *channels):
    collector = PositionCollector()
    backend.start(collector)
    for channel in channels:
        backend.subscribe(channel)
    return collector


def started(backend, *channels):
    """Started, subscribed, and each channel known to deliver (probed)."""
    collector = start(backend, *channels)
    ready(backend, collector, *channels)
    return collector


def kill_clients(server, name_part):
    """CLIENT KILL every connection whose name contains ``name_part``."""
    killed = 0
    with server.client() as r:
        for client in r.client_list():
            if name_part in client.get("name", ""):
                r.client_kill_filter(_id=client["id"])
                killed += 1
    return killed


# -- configuration --------------------------------------------------------------


class TestConfiguration:
    def test_load_backend_picks_it_for_streams_urls(self):
        for url in ("redis+streams://127.0.0.1:1/0", "rediss+streams://h:2/1"):
            backend = load_backend(url, history_size=5)
            assert isinstance(backend, RedisStreamsBackend)
            assert backend.supports_history
            assert backend.default_policy == HistoryPolicy(5, 3600.0)

    @pytest.mark.parametrize(
        "url", ["mysql+streams://h/0", "unix+streams:///tmp/s", "no-url"]
    )
    def test_refuses_other_urls(self, url):
        with pytest.raises(IncorrectlyConfigured):
            RedisStreamsBackend(url)

    @pytest.mark.parametrize(
        "options", [{"history_size": 0}, {"history_ttl": "-1"}, {"block": 0}]
    )
    def test_refuses_bad_options(self, options):
        with pytest.raises(IncorrectlyConfigured):
            RedisStreamsBackend("redis+streams://127.0.0.1:1/0", **options)

    def test_start_says_where_redis_is_missing(self):
        from stargate.testing.redis_server import free_port

        backend = RedisStreamsBackend(
            f"redis+streams://127.0.0.1:{free_port()}/0", socket_timeout=1
        )
        with pytest.raises(BackendUnavailable, match="127.0.0.1"):
            backend.start(Collector())
        backend.close()


# -- positions and the window -----------------------------------------------------


class TestPositions:
    def test_offsets_grow_by_one_and_workers_share_the_epoch(
        self, redis_server, make_backend
    ):
        first, second = make_backend(redis_server), make_backend(redis_server)
        got = start(first, "news")
        start(second)
        positions = [first.publish("news", "a"), second.publish("news", "b")]
        positions.append(first.publish("news", b"c"))
        assert [p.offset for p in positions] == [1, 2, 3]
        assert len({p.epoch for p in positions}) == 1
        assert wait_until(lambda: len(got.positions) == 3)
        assert got.positions == [
            ("news", "a", positions[0]),
            ("news", "b", positions[1]),
            ("news", b"c", positions[2]),
        ]
        assert first.publish("other", "x").offset == 1

    def test_history_reads_the_window(self, redis_server, make_backend):
        backend = make_backend(redis_server)
        start(backend)
        positions = [backend.publish("c", f"m{i}") for i in range(5)]
        assert backend.history("c", positions[2]) == [
            (positions[3], "m3"),
            (positions[4], "m4"),
        ]
        assert backend.history("c", positions[4]) == []
        epoch = positions[0].epoch
        assert [m for _, m in backend.history("c", (epoch, 0))] == [
            f"m{i}" for i in range(5)
        ]
        with pytest.raises(HistoryUnavailable) as caught:
            backend.history("c", (epoch, 9))
        assert (caught.value.epoch, caught.value.offset) == (epoch, 5)
        with pytest.raises(HistoryUnavailable):
            backend.history("c", ("another-epoch", 2))
        with pytest.raises(HistoryUnavailable) as caught:
            backend.history("never-used", (epoch, 0))
        assert (caught.value.epoch, caught.value.offset) == (None, 0)

    def test_the_window_is_capped_near_history_size(self, redis_server, make_backend):
        backend = make_backend(redis_server)
        start(backend)
        policy = HistoryPolicy(size=10, ttl=60)
        positions = [backend.publish("c", str(i), history=policy) for i in range(1000)]
        with redis_server.client() as r:
            kept = r.xlen(backend._stream_key("c"))
            ttl = r.pttl(backend._meta_key("c"))
        assert 10 <= kept < 1000  # approximate trimming keeps a little more
        assert 0 < ttl <= 60_000
        assert len(backend.history("c", positions[-11])) == 10
        with pytest.raises(HistoryUnavailable):
            backend.history("c", positions[0])

    def test_an_expired_history_starts_a_new_epoch(self, redis_server, make_backend):
        backend = make_backend(redis_server)
        start(backend)
        brief = HistoryPolicy(size=10, ttl=0.1)
        old = backend.publish("c", "old", history=brief)
        assert wait_until(
            lambda: redis_server.client().exists(backend._meta_key("c")) == 0,
            timeout=5,
        )
        new = backend.publish("c", "new", history=brief)
        assert new.epoch != old.epoch and new.offset == 1
        with pytest.raises(HistoryUnavailable) as caught:
            backend.history("c", old)
        assert caught.value.epoch == new.epoch


# -- reading on after a loss ---------------------------------------------------------


class TestRecovery:
    def test_a_killed_reader_reads_on_from_its_last_offset(
        self, redis_server, make_backend
    ):
        worker, other = make_backend(redis_server), make_backend(redis_server)
        got = started(worker, "c")
        start(other)
        other.publish("c", "before")
        assert wait_until(lambda: got.messages("c") == ["before"])
        assert kill_clients(redis_server, f"reader:{worker.process_id}") == 1
        sent = [f"during {i}" for i in range(200)]
        for message in sent:
            other.publish("c", message)
        assert wait_until(lambda: len(got.messages("c")) == 201)
        assert got.messages("c") == ["before", *sent]
        assert wait_until(lambda: worker.stats["reconnects"] == 1)
        assert worker.stats["gaps"] == 0

    def test_messages_gone_from_the_window_are_logged_and_counted(
        self, redis_server, make_backend, caplog
    ):
        worker, other = make_backend(redis_server), make_backend(redis_server)
        got = started(worker, "c")
        start(other)
        policy = HistoryPolicy(size=5, ttl=60)
        worker._receiver.kill()  # as if cut off: the cursor stays
        for i in range(500):
            other.publish("c", str(i), history=policy)
        with caplog.at_level(logging.WARNING, "stargate.backends.redis_streams"):
            worker._receiver = green.spawn(worker._run)
            assert wait_until(lambda: got.messages("c")[-1:] == ["499"])
        received = [int(m) for m in got.messages("c")]
        assert received == sorted(received) and received[-1] == 499
        assert worker.stats["gaps"] == 1
        assert worker.stats["missed"] == 500 - len(received)
        assert "left the history window" in caplog.text

    def test_a_flushed_history_is_noticed_and_delivery_goes_on(
        self, redis_server, make_backend, caplog
    ):
        worker, other = make_backend(redis_server), make_backend(redis_server)
        got = started(worker, "c")
        start(other)
        for i in range(5):
            other.publish("c", f"old {i}")
        assert wait_until(lambda: len(got.messages("c")) == 5)
        with redis_server.client() as r:
            r.delete(worker._stream_key("c"), worker._meta_key("c"))
        with caplog.at_level(logging.WARNING, "stargate.backends.redis_streams"):
            new = [other.publish("c", f"new {i}") for i in range(3)]
            assert wait_until(lambda: len(got.messages("c")) == 8)
        assert got.messages("c")[5:] == ["new 0", "new 1", "new 2"]
        assert [p for _, _, p in got.positions[5:]] == new
        assert worker.stats["epoch_changes"] == 1
        assert "was lost" in caplog.text

    def test_redis_restarted_without_persistence(
        self, fresh_redis_server, make_backend
    ):
        worker, other = (
            make_backend(fresh_redis_server),
            make_backend(fresh_redis_server),
        )
        got = started(worker, "c")
        start(other)
        old = other.publish("c", "before the restart")
        assert wait_until(lambda: "before the restart" in got.messages("c"))
        fresh_redis_server.restart()

        def publish_after():
            try:
                return other.publish("c", "after the restart")
            except BackendUnavailable:
                return None

        assert wait_until(publish_after)
        assert wait_until(lambda: "after the restart" in got.messages("c"))
        with pytest.raises(HistoryUnavailable) as caught:
            other.history("c", old)
        assert caught.value.epoch != old.epoch
        assert wait_until(lambda: worker.stats["reconnects"] >= 1)

    def test_subscribed_while_redis_is_away(self, fresh_redis_server, make_backend):
        worker, other = (
            make_backend(fresh_redis_server),
            make_backend(fresh_redis_server),
        )
        got = start(worker)
        start(other)
        fresh_redis_server.kill()
        worker.subscribe("late")  # does not raise
        fresh_redis_server.restart()
        assert wait_until(lambda: worker._cursors.get("late") is not None)

        def deliver_one():
            try:
                other.publish("late", "hello")
            except BackendUnavailable:
                return False
            return wait_until(lambda: got.messages("late"), timeout=0.5)

        assert wait_until(deliver_one)
        assert got.messages("late")[0] == "hello"

    def test_connections_are_named_for_operators(self, redis_server, make_backend):
        backend = make_backend(redis_server)
        started(backend, "c")
        with redis_server.client() as r:
            names = {c.get("name", "") for c in r.client_list()}
        assert f"{backend.prefix}reader:{backend.process_id}" in names
        assert f"{backend.prefix}client:{backend.process_id}" in names

    def test_publish_returns_a_position_the_history_agrees_with(
        self, redis_server, make_backend
    ):
        backend = make_backend(redis_server)
        start(backend)
        position = backend.publish("c", "x")
        assert isinstance(position, Position)
        assert backend.history("c", (position.epoch, position.offset - 1)) == [
            (position, "x")
        ]


# -- many channels ----------------------------------------------------------------


def xread_calls(server):
    with server.client() as client:
        return client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0)


class TestReading:
    def test_one_xread_per_message_published_one_at_a_time(
        self, redis_server, make_backend
    ):
        """A read that returns fewer than ``read_count`` entries returned all
        the stream held: the next entry is notified after it, so the reader
        waits for that instead of asking again (it did: two XREADs, two
        round trips and wake-ups per message, for every worker)."""
        backend = make_backend(redis_server, block=30.0)  # no sweep meanwhile
        collector = started(backend, "one")
        before = xread_calls(redis_server)
        for i in range(10):
            backend.publish("one", f"m{i}")
            assert wait_until(lambda: collector.messages("one")[-1:] == [f"m{i}"])
        # Published and delivered one at a time: each needs its own XREAD,
        # and none more (a last empty one may still be on its way).
        assert wait_until(lambda: xread_calls(redis_server) - before >= 10)
        assert xread_calls(redis_server) - before <= 11
        assert collector.messages("one") == [f"m{i}" for i in range(10)]


class TestManyQuietChannels:
    """Defect 7: reading costs grow with the channels that are active, not
    with those subscribed: a worker with 1,000 quiet channels sends Redis
    about as much per message of one busy channel as with none."""

    def test_quiet_channels_cost_nothing_per_message(
        self, fresh_redis_server, make_backend
    ):
        # block: the safety sweep of every head, once per 10 s by default.
        worker, other = (
            make_backend(fresh_redis_server, block=10.0),
            make_backend(fresh_redis_server),
        )
        got = started(worker, "busy")
        start(other)
        for i in range(1000):
            worker.subscribe(f"quiet {i}")
        ready(worker, got, "busy")
        with fresh_redis_server.client() as r:
            before = int(r.info("stats")["total_net_input_bytes"])
            stats = r.info("commandstats")
            unblocks = stats.get("cmdstat_client|unblock", {}).get("calls", 0)
        for i in range(100):
            other.publish("busy", str(i))
            assert wait_until(lambda: got.messages("busy")[-1:] == [str(i)])
        with fresh_redis_server.client() as r:
            sent = int(r.info("stats")["total_net_input_bytes"]) - before
        assert got.messages("busy") == [str(i) for i in range(100)]
        # Each XREAD used to name all 1,001 streams (about 50 KB a message).
        assert sent < 100 * 2048, sent
        assert unblocks == 0  # subscribing does not restart a blocked read

    def test_the_sweep_reads_no_quiet_stream(self, fresh_redis_server, make_backend):
        """Every ``block`` seconds the reader checks every channel's head
        (the safety net for a lost notification). It used to follow each
        check with an XREAD of every subscribed stream (one per 500
        channels): a periodic cost that grew with the channels subscribed,
        and with 2,000 of them held delivery on a busy one for about 100 ms
        (``python -m benchmarks channels --backend streams``). A stream whose
        head has not moved is read no more."""
        worker = make_backend(fresh_redis_server, block=0.2)
        got = started(worker, "busy")
        for i in range(1000):
            worker.subscribe(f"quiet {i}")
        ready(worker, got, "busy")

        def calls(command):
            with fresh_redis_server.client() as r:
                stats = r.info("commandstats")
            return stats.get(f"cmdstat_{command}", {}).get("calls", 0)

        heads, reads = calls("hmget"), calls("xread")
        # Three sweeps of the 1,001 heads, by Redis's own count.
        assert wait_until(lambda: calls("hmget") - heads >= 3 * 1001, timeout=30)
        assert calls("xread") - reads == 0

    def test_the_sweep_still_finds_an_entry_never_notified(
        self, fresh_redis_server, make_backend
    ):
        """The sweep reads a stream whose head moved without a notification
        (an entry added while the notification was lost)."""
        worker = make_backend(fresh_redis_server, block=0.2)
        publisher = make_backend(fresh_redis_server)
        got = started(worker, "lost", *(f"quiet {i}" for i in range(300)))
        start(publisher)
        position = publisher.publish("lost", "first")
        assert wait_until(lambda: got.messages("lost")[-1:] == ["first"])
        # What the publishing script does, but for the notification: the
        # meta hash's offset and the entry with that offset as its ID.
        prefix = worker.prefix
        with fresh_redis_server.client() as r:
            offset = r.hincrby(f"{prefix}meta:lost", "offset", 1)
            assert offset == position.offset + 1
            r.xadd(
                f"{prefix}stream:lost",
                {"e": position.epoch, "d": encode_message("never notified")},
                id=f"{offset}-0",
            )
        assert wait_until(lambda: got.messages("lost")[-1:] == ["never notified"])
        assert got.messages("lost") == ["first", "never notified"]
