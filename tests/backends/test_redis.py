"""The Redis backend, against private redis-server processes.

Every server here is started by the test run on a free loopback port (see
``stargate.testing.redis_server``); nothing talks to a Redis on 6379. Tests
that share the session's server keep apart with a prefix of their own.
"""

import logging
import time
import uuid

import pytest
from redis.connection import Connection
from redis.crc import key_slot

from stargate.backends import load_backend
from stargate.backends.redis import (
    PRESENCE_BATCH,
    RedisBackend,
    decode_message,
    encode_message,
)
from stargate.exceptions import BackendUnavailable, IncorrectlyConfigured
from stargate.testing.redis_server import free_port
from tests import green
from tests.backends.contract import (
    DEADLINE,
    BackendContract,
    Collector,
    ready,
    started,
    wait_until,
)

FAST = {"reconnect_backoff": (0.05, 0.3), "socket_timeout": 2.0}


class TestRedisBackendContract(BackendContract):
    backends = ["redis", "redis-cluster"]


@pytest.fixture
def prefix():
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def make_backend(prefix):
    """``make_backend(url, **options)``: a backend closed after the test."""
    made = []

    def make(url, **options):
        options.setdefault("prefix", prefix)
        for name, value in FAST.items():
            options.setdefault(name, value)
        backend = RedisBackend(url, **options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def numsub(server, name):
    with server.client() as client:
        return dict(client.pubsub_numsub(name))[name.encode()]


def ping_calls(server):
    with server.client() as client:
        return client.info("commandstats")["cmdstat_ping"]["calls"]


def pubsub_clients(server):
    with server.client() as client:
        return client.client_list(_type="pubsub")


def publish_until_received(backend, collector, channel, message):
    """Publish until ``message`` arrives: after a reconnect the receiver
    resubscribes a moment after Redis is back. Errors while Redis is still
    coming back are expected."""
    deadline = time.monotonic() + DEADLINE
    while message not in collector.messages(channel):
        assert time.monotonic() < deadline, f"{message!r} never arrived"
        try:
            backend.publish(channel, message)
        except BackendUnavailable:
            pass
        wait_until(lambda: message in collector.messages(channel), timeout=0.2)


class TestMessages:
    @pytest.mark.parametrize(
        "message", ["", "text", "caf\u00e9 \U0001f600", b"", b"\x00\xff", b"t"]
    )
    def test_encoding_round_trips_and_keeps_the_type(self, message):
        decoded = decode_message(encode_message(message))
        assert decoded == message
        assert type(decoded) is type(message)

    @pytest.mark.parametrize("message", [1, None, bytearray(b"x"), ["a"], {"a": 1}])
    def test_other_types_are_refused(self, redis_server, make_backend, message):
        backend = make_backend(redis_server.url)
        backend.start(Collector())
        with pytest.raises(TypeError):
            backend.publish("c", message)
        assert backend.stats["published"] == 0

    def test_a_foreign_message_on_the_channel_is_skipped(
        self, redis_server, make_backend, prefix
    ):
        backend = make_backend(redis_server.url)
        collector = started(backend, "mixed")
        with redis_server.client() as client:
            client.publish(f"{prefix}mixed", b"not tagged")
        backend.publish("mixed", "tagged")
        assert wait_until(lambda: collector.messages("mixed") == ["tagged"])
        assert backend.stats["undecodable"] == 1

    def test_a_failing_deliver_does_not_stop_the_receiver(
        self, redis_server, make_backend
    ):
        got = []

        def deliver(channel, message):
            if message == "boom":
                raise RuntimeError("the hub failed")
            got.append(message)

        backend = make_backend(redis_server.url)
        backend.start(deliver)
        backend.subscribe("c")
        backend.publish("c", "boom")
        backend.publish("c", "after")
        assert wait_until(lambda: got == ["after"])
        assert backend.stats["delivery_errors"] == 1


class TestSubscriptions:
    def test_subscribe_and_unsubscribe_follow_local_listeners(
        self, redis_server, make_backend, prefix
    ):
        backend = make_backend(redis_server.url)
        backend.start(Collector())
        backend.subscribe("room")
        # subscribe() returns once Redis has confirmed it.
        assert numsub(redis_server, f"{prefix}room") == 1
        backend.subscribe("room")  # twice is one subscription
        assert numsub(redis_server, f"{prefix}room") == 1
        backend.unsubscribe("room")
        assert wait_until(lambda: numsub(redis_server, f"{prefix}room") == 0)
        backend.unsubscribe("room")  # twice is fine

    def test_nothing_is_delivered_after_unsubscribe(self, redis_server, make_backend):
        backend = make_backend(redis_server.url)
        collector = started(backend, "gone", "kept")
        backend.unsubscribe("gone")
        # Published at once, before Redis may even have read the UNSUBSCRIBE.
        backend.publish("gone", "late")
        backend.publish("kept", "marker")
        assert wait_until(lambda: collector.messages("kept") == ["marker"])
        green.sleep(0.05)
        assert collector.messages("gone") == []

    def test_channels_subscribed_before_start_are_subscribed_by_start(
        self, redis_server, make_backend
    ):
        backend = make_backend(redis_server.url)
        backend.subscribe("early")
        collector = Collector()
        backend.start(collector)
        backend.publish("early", "hello")
        assert wait_until(lambda: collector.messages("early") == ["hello"])

    def test_two_workers_see_one_order(self, redis_server, make_backend):
        first, second = make_backend(redis_server.url), make_backend(redis_server.url)
        got_first, got_second = started(first, "c"), started(second, "c")
        sent = []
        for i in range(200):
            publisher = first if i % 3 else second
            publisher.publish("c", f"m{i}" if i % 2 else f"m{i}".encode())
            sent.append(f"m{i}" if i % 2 else f"m{i}".encode())
        assert wait_until(lambda: len(got_first.messages("c")) == 200)
        assert wait_until(lambda: len(got_second.messages("c")) == 200)
        assert got_first.messages("c") == sent
        assert got_second.messages("c") == sent

    def test_prefixes_keep_applications_apart(self, redis_server, make_backend):
        app_a = make_backend(redis_server.url, prefix="app-a:")
        app_b = make_backend(redis_server.url, prefix="app-b:")
        got_a, got_b = started(app_a, "news"), started(app_b, "news")
        app_a.publish("news", "for a")
        app_b.publish("news", "for b")
        assert wait_until(lambda: got_a.messages("news") == ["for a"])
        assert wait_until(lambda: got_b.messages("news") == ["for b"])
        green.sleep(0.05)
        assert got_a.messages("news") == ["for a"]
        assert got_b.messages("news") == ["for b"]

    def test_health_check_replies_are_read_and_counted_off(
        self, redis_server, make_backend
    ):
        """The receiver reads its connection itself, not through
        ``get_message``: the health-check PINGs redis-py sends on an idle
        subscription are answered, and each reply must be counted off as
        ``PubSub.parse_response`` would (a PING left counted makes redis-py
        wait ``socket_timeout`` for its reply before its next SUBSCRIBE)."""
        backend = make_backend(redis_server.url, presence_ttl=0.3)  # PING per 0.1 s
        collector = started(backend, "quiet")
        pubsub = backend._receiver.shards[None].pubsub
        pings = ping_calls(redis_server)
        assert wait_until(lambda: ping_calls(redis_server) >= pings + 3)
        assert wait_until(lambda: pubsub.health_check_response_counter == 0)
        backend.unsubscribe("quiet")
        assert wait_until(lambda: not pubsub.subscribed)
        backend.subscribe("next")
        backend.publish("next", "after")
        assert wait_until(lambda: collector.messages("next") == ["after"])
        assert collector.messages("quiet") == []

    def test_close_unsubscribes_and_is_idempotent(
        self, redis_server, make_backend, prefix
    ):
        backend = make_backend(redis_server.url)
        started(backend, "room")
        started_at = time.monotonic()
        backend.close()
        backend.close()
        assert time.monotonic() - started_at < 2
        assert wait_until(lambda: numsub(redis_server, f"{prefix}room") == 0)
        with pytest.raises(BackendUnavailable):
            backend.publish("room", "closed")


class TestConfiguration:
    def test_the_loader_builds_it_with_options(self, redis_server):
        backend = load_backend(
            redis_server.url, prefix="x:", socket_timeout="3", presence_ttl=9
        )
        assert isinstance(backend, RedisBackend)
        assert (backend.prefix, backend.socket_timeout) == ("x:", 3.0)
        assert backend.presence_ttl == 9.0
        assert backend.reconnect_backoff == (0.1, 10.0)

    @pytest.mark.parametrize(
        "url, cluster",
        [
            ("redis://h:1/0", False),
            ("rediss://h:1/0", False),
            ("unix:///tmp/redis.sock?db=2", False),
            ("redis+cluster://h:1", True),
            ("rediss+cluster://h:1", True),
        ],
    )
    def test_url_forms(self, url, cluster):
        backend = RedisBackend(url)
        assert backend.cluster is cluster
        assert "+cluster" not in backend._client_url

    def test_reconnect_backoff_from_a_setting_string(self):
        assert RedisBackend(reconnect_backoff="0.5 20").reconnect_backoff == (0.5, 20)

    @pytest.mark.parametrize(
        "url, options, fragment",
        [
            ("http://h/", {}, "unknown Redis URL scheme"),
            ("localhost", {}, "is not a Redis URL"),
            ("unix:///s.sock", {"cluster": True}, "not a unix socket"),
            ("redis://h", {"socket_timeout": 0}, "socket_timeout"),
            ("redis://h", {"presence_ttl": "soon"}, "presence_ttl"),
            ("redis://h", {"reconnect_backoff": 1}, "reconnect_backoff"),
            ("redis://h", {"reconnect_backoff": (5, 1)}, "longest delay"),
            ("redis://h", {"prefix": None}, "prefix"),
        ],
    )
    def test_bad_settings_say_what_to_fix(self, url, options, fragment):
        with pytest.raises(IncorrectlyConfigured) as excinfo:
            RedisBackend(url, **options)
        assert fragment in str(excinfo.value)

    def test_unreachable_redis_at_start_names_the_url(self):
        url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
        backend = RedisBackend(url, socket_timeout=1)
        with pytest.raises(BackendUnavailable) as excinfo:
            backend.start(Collector())
        message = str(excinfo.value)
        assert f"127.0.0.1:{url.rsplit(':', 1)[1]}" in message
        assert "s3cret" not in message
        backend.close()


class TestFailures:
    def test_a_publishing_connection_redis_closed_is_not_written_to(
        self, redis_server, make_backend
    ):
        """The backend keeps its publishing connection between publishes;
        one that Redis closed meanwhile (a restart, ``CLIENT KILL``, an idle
        ``timeout``) is connected again before the next publish, which
        succeeds: writing to it would fail the publish."""
        backend = make_backend(redis_server.url)
        collector = started(backend, "kept")
        backend.publish("kept", "first")
        assert wait_until(lambda: collector.messages("kept") == ["first"])
        with redis_server.client() as client:
            ours = [
                info["id"]
                for info in client.client_list(_type="normal")
                if info.get("name") == backend.client_name
            ]
            for client_id in ours:
                client.client_kill_filter(_id=client_id)
        assert ours
        backend.publish("kept", "second")
        assert wait_until(lambda: collector.messages("kept") == ["first", "second"])

    def test_redis_killed_and_restarted_mid_stream(
        self, fresh_redis_server, make_backend, caplog
    ):
        server = fresh_redis_server
        backend = make_backend(server.url)
        collector = started(backend, "live")
        backend.publish("live", "before")
        assert wait_until(lambda: collector.messages("live") == ["before"])

        caplog.set_level(logging.WARNING, logger="stargate.backends.redis")
        server.kill()
        # Publishing while Redis is gone fails at once, with the reason.
        started_at = time.monotonic()
        with pytest.raises(BackendUnavailable) as excinfo:
            backend.publish("live", "lost")
        assert time.monotonic() - started_at < backend.socket_timeout + 0.5
        assert server.url.rsplit("/", 1)[0] in str(excinfo.value)
        # A channel subscribed during the outage is subscribed on reconnect.
        backend.subscribe("joined-late")
        green.sleep(0.3)
        server.restart()

        publish_until_received(backend, collector, "live", "after")
        publish_until_received(backend, collector, "joined-late", "hello")
        assert collector.messages("live") == ["before", "after"]
        assert backend.stats["reconnects"] == 1
        assert backend.stats["gap_seconds"] >= 0.3
        text = caplog.text
        assert "lost connection to Redis at" in text
        assert "lost connection to Redis for" in text
        assert "messages published meanwhile were not received" in text

    def test_a_worker_cut_off_by_the_output_buffer_limit_recovers(
        self, fresh_redis_server, make_backend, caplog
    ):
        server = fresh_redis_server
        with server.client() as client:
            client.config_set("client-output-buffer-limit", "pubsub 65536 0 0")
        unblock = green.Event()
        collector = Collector()

        def slow_deliver(channel, message):
            collector(channel, message)
            if message == "stall":
                unblock.wait()  # the hub is stuck: nobody reads the socket

        backend = make_backend(server.url)
        backend.start(slow_deliver)
        backend.subscribe("flood")
        ready(backend, collector, "flood")
        caplog.set_level(logging.WARNING, logger="stargate.backends.redis")
        backend.publish("flood", "stall")
        assert wait_until(lambda: "stall" in collector.messages("flood"))

        chunk = b"x" * 65536
        deadline = time.monotonic() + DEADLINE
        while pubsub_clients(server):
            assert time.monotonic() < deadline, "Redis never dropped the reader"
            for _ in range(20):
                backend.publish("flood", chunk)
        unblock.send()

        assert wait_until(lambda: backend.stats["reconnects"] == 1)
        publish_until_received(backend, collector, "flood", "recovered")
        assert "messages published meanwhile were not received" in caplog.text


class TestPresence:
    def test_counts_of_more_channels_than_one_batch_are_all_written(
        self, redis_server, make_backend
    ):
        """Presence writes go in pipelines of PRESENCE_BATCH with a yield
        between them (so delivery goes on during a heartbeat of thousands
        of channels: benchmarks/channels.py); none is left out at a batch
        boundary."""
        from stargate.backends.redis import PRESENCE_BATCH

        first, second = make_backend(redis_server.url), make_backend(redis_server.url)
        first.start(Collector())
        second.start(Collector())
        channels = [f"room{i}" for i in range(2 * PRESENCE_BATCH + 1)]
        for channel in channels:
            first.set_local_count(channel, 1)
        assert wait_until(
            lambda: all(second.listener_count(channel, 0) == 1 for channel in channels)
        )

    def test_a_server_that_lost_the_script_is_given_it_again(
        self, redis_server, make_backend
    ):
        """The writes are EVALSHA alone (no ``SCRIPT EXISTS`` first): a
        server that answers ``NOSCRIPT`` (restarted, or a replica that took
        over) is sent the script and those writes again."""
        first, second = make_backend(redis_server.url), make_backend(redis_server.url)
        first.start(Collector())
        second.start(Collector())
        first.set_local_count("room", 1)
        assert wait_until(lambda: second.listener_count("room", 0) == 1)
        with redis_server.client() as client:
            client.script_flush()
        first.set_local_count("room", 2)
        assert wait_until(lambda: second.listener_count("room", 0) == 2)
        assert first.stats["presence_failures"] == 0

    def test_counts_add_up_across_workers(self, redis_server, make_backend):
        first, second = make_backend(redis_server.url), make_backend(redis_server.url)
        first.start(Collector())
        second.start(Collector())
        assert first.listener_count("room", 0) == 0
        first.set_local_count("room", 2)
        second.set_local_count("room", 3)
        # Written by each worker's presence thread, a moment later.
        assert wait_until(lambda: first.listener_count("room", 2) == 5)
        assert wait_until(lambda: second.listener_count("room", 3) == 5)
        # The caller's own count is fresher than what Redis holds for it.
        assert first.listener_count("room", 4) == 7
        second.set_local_count("room", 0)
        assert wait_until(lambda: first.listener_count("room", 2) == 2)

    def test_a_worker_that_stops_heartbeating_expires(self, redis_server, make_backend):
        ttl = 0.6
        alive = make_backend(redis_server.url, presence_ttl=ttl)
        dying = make_backend(redis_server.url, presence_ttl=ttl)
        alive.start(Collector())
        dying.start(Collector())
        alive.set_local_count("room", 1)
        dying.set_local_count("room", 4)
        # Heartbeats keep both entries alive well past the TTL...
        green.sleep(ttl * 2.5)
        assert alive.listener_count("room", 1) == 5
        assert dying.listener_count("room", 4) == 5
        # ...until a worker's heartbeat stops (as with a crashed process).
        dying._presence_thread.kill()
        assert wait_until(lambda: alive.listener_count("room", 1) == 1, timeout=3)

    def test_close_removes_the_workers_entries(self, redis_server, make_backend):
        first, second = make_backend(redis_server.url), make_backend(redis_server.url)
        first.start(Collector())
        second.start(Collector())
        first.set_local_count("room", 1)
        second.set_local_count("room", 2)
        assert wait_until(lambda: first.listener_count("room", 1) == 3)
        second.close()
        assert first.listener_count("room", 1) == 1

    def test_unreachable_redis_counts_this_process_only(
        self, fresh_redis_server, make_backend
    ):
        backend = make_backend(fresh_redis_server.url)
        backend.start(Collector())
        fresh_redis_server.kill()
        assert backend.listener_count("room", 1) == 1  # with a warning
        backend.set_local_count("room", 1)  # written later, never raised


class CountingConnection(Connection):
    """A redis-py connection that counts its packed writes: one per command
    sent alone, one per pipeline (redis-py packs a pipeline's commands into
    one ``send_packed_command``). Each write is a round trip here, since
    every one waits for its replies before the next is sent."""

    writes = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.writes += 1
        super().send_packed_command(command, check_health)


class CountingBackend(RedisBackend):
    """A backend whose publish-and-presence client uses
    :class:`CountingConnection` (redis-py's public ``connection_class``); its
    pub/sub connections are made apart and not counted."""

    def _connect_client(self, **kwargs):
        return super()._connect_client(connection_class=CountingConnection)


class TestCluster:
    @staticmethod
    def channels_on_every_node(cluster, prefix):
        """One channel name per master, chosen by hash slot."""
        count = len(cluster.servers)
        by_node = {}
        i = 0
        while len(by_node) < count:
            name = f"room-{i}"
            slot = key_slot(f"{prefix}{name}".encode())
            # RedisCluster gives node n the slots [n * 16384 // count, ...).
            node = max(n for n in range(count) if n * 16384 // count <= slot)
            by_node.setdefault(node, name)
            i += 1
        return [by_node[n] for n in range(count)]

    def test_sharded_pubsub_on_every_node(self, redis_cluster, make_backend, prefix):
        channels = self.channels_on_every_node(redis_cluster, prefix)
        first = make_backend(redis_cluster.url)
        second = make_backend(redis_cluster.url)
        got_first = started(first, *channels)
        got_second = started(second, *channels)
        for server, channel in zip(redis_cluster.servers, channels):
            with server.client() as client:
                [(_, subscribers)] = client.pubsub_shardnumsub(f"{prefix}{channel}")
            assert subscribers == 2, (server, channel)
        for i in range(50):
            for channel in channels:
                first.publish(channel, f"{channel} {i}")
        for channel in channels:
            expected = [f"{channel} {i}" for i in range(50)]
            assert wait_until(lambda: got_first.messages(channel) == expected)
            assert wait_until(lambda: got_second.messages(channel) == expected)
        assert first.stats["published"] >= 150

    def test_presence_on_a_cluster(self, redis_cluster, make_backend):
        first = make_backend(redis_cluster.url)
        second = make_backend(redis_cluster.url)
        first.start(Collector())
        second.start(Collector())
        for channel in ("a", "b", "c"):
            first.set_local_count(channel, 1)
            second.set_local_count(channel, 2)
            assert wait_until(lambda: first.listener_count(channel, 1) == 3)

    def test_a_heartbeat_is_a_pipeline_per_node_not_a_call_per_channel(
        self, redis_cluster, make_backend, prefix
    ):
        """Issue 15: 600 channels over 3 masters are refreshed in a handful
        of round trips per heartbeat, not 600.

        Round trips are counted as the packed writes the worker's client
        sends (:class:`CountingConnection`): a pipeline is one, a command
        sent alone is one. From one observed heartbeat to the next but one,
        at most 3 heartbeats ran (two of them perhaps in part); each is at
        most ``600 / PRESENCE_BATCH + 3`` pipelines (a node's share rounds up
        to whole batches). One call per channel made it 600 per heartbeat;
        redis-py's ``SCRIPT EXISTS`` before each pipeline, twice the bound.
        """
        channels = [f"room{i}" for i in range(600)]
        masters = 3
        worker = CountingBackend(
            redis_cluster.url, prefix=prefix, presence_ttl=1.5, **FAST
        )
        try:
            worker.start(Collector())
            peer = make_backend(redis_cluster.url)
            peer.start(Collector())
            for channel in channels:
                worker.set_local_count(channel, 2)
            assert wait_until(
                lambda: all(peer.listener_count(c, 0) == 2 for c in channels)
            )
            first = worker.stats["heartbeats"]
            CountingConnection.writes = 0
            assert wait_until(lambda: worker.stats["heartbeats"] >= first + 2)
            writes = CountingConnection.writes
            pipelines = len(channels) // PRESENCE_BATCH + masters
            assert 0 < writes <= 3 * pipelines, writes
            assert all(peer.listener_count(c, 0) == 2 for c in channels)
        finally:
            worker.close()
