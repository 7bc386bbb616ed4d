"""The Redis backend on a real cluster with replicas (3 masters + 3
replicas on free loopback ports, started and stopped by this module):
slots resharded away while publishing, a master killed and failed over.

Every numbered message is accounted for, per channel: delivered once, in
order, or missing with a gap reported for that channel (never silently).
"""

import collections
import uuid

import pytest
from redis.crc import key_slot

from stargate.backends.redis import RedisBackend
from stargate.exceptions import BackendError
from stargate.testing.redis_server import RedisCluster, find_redis_server
from tests import green
from tests.backends.contract import Collector, ready, wait_until

#: Seconds any one wait may take (a failover takes 2-3 s here).
DEADLINE = 30.0
FAST = {"reconnect_backoff": (0.05, 0.5), "socket_timeout": 1.0}


@pytest.fixture(scope="module")
def cluster():
    try:
        find_redis_server()
    except Exception as exc:  # no redis-server installed
        pytest.skip(str(exc))
    with RedisCluster(replicas=1, node_timeout_ms=1000) as cluster:
        yield cluster


class Run:
    """A receiving worker and a publishing worker on ``channels``; the
    publisher sends round after round of numbers on every channel."""

    def __init__(self, cluster, channels):
        self.prefix = f"faults-{uuid.uuid4().hex[:8]}:"
        self.channels = channels
        self.receiver = RedisBackend(cluster.url, prefix=self.prefix, **FAST)
        self.publisher = RedisBackend(cluster.url, prefix=self.prefix, **FAST)
        self.collector = Collector()
        self.gaps = collections.Counter()
        self.receiver.gap_handler = lambda channel, reason: self.gaps.update([channel])
        self.receiver.start(self.collector)
        self.publisher.start(lambda *args: None)
        for channel in channels:
            self.receiver.subscribe(channel)
        ready(self.publisher, self.collector, *channels)
        self.published = {channel: [] for channel in channels}
        self.round = 0
        self.running = True
        self.thread = green.spawn(self._publish)

    def slot(self, channel):
        return key_slot(f"{self.prefix}{channel}".encode())

    def _publish(self):
        while self.running:
            for channel in self.channels:
                try:
                    self.publisher.publish(channel, str(self.round))
                except BackendError:
                    continue  # its node is down: not published
                self.published[channel].append(self.round)
            self.round += 1
            green.sleep(0.005)

    def numbers(self, channel):
        return [int(m) for m in self.collector.messages(channel)]

    def wait_for_round(self, channels, at_least):
        """Wait until each of ``channels`` received a number >= at_least."""
        return wait_until(
            lambda: all(
                self.numbers(c) and self.numbers(c)[-1] >= at_least for c in channels
            ),
            timeout=DEADLINE,
        )

    def stop(self):
        self.running = False
        green.wait(self.thread)
        last = {c: p[-1] for c, p in self.published.items() if p}
        # Everything published has had time to arrive once the last has.
        assert wait_until(
            lambda: all(self.numbers(c)[-1:] == [n] for c, n in last.items()),
            timeout=DEADLINE,
        ), {c: self.numbers(c)[-3:] for c in last}

    def account(self, channel):
        """Check ``channel``: once each, in order, nothing unpublished, and
        anything missing is covered by a gap reported on that channel.
        Returns the number of missing messages."""
        got = self.numbers(channel)
        assert got == sorted(set(got)), f"{channel}: duplicated or reordered"
        published = self.published[channel]
        assert set(got) <= set(published)
        missing = len(published) - len(got)
        if missing:
            assert self.gaps[channel] >= 1, f"{channel}: {missing} lost silently"
        return missing

    def close(self):
        self.running = False
        self.receiver.close()
        self.publisher.close()


@pytest.fixture
def run(cluster):
    made = []

    def make(channels):
        made.append(Run(cluster, channels))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_a_moved_slot_is_followed_to_its_new_owner(cluster, run):
    """Defect 1: resharding sends ``sunsubscribe`` for the channels of a
    slot that leaves a node; the worker follows them to the new owner."""
    r = run([f"ch{i}" for i in range(12)])
    assert r.wait_for_round(r.channels, 20)
    source = cluster.master_of(r.slot(r.channels[0]))
    target = next(
        s for s in cluster.servers[: cluster.masters] if s is not source and s.running
    )
    moved = [c for c in r.channels if cluster.master_of(r.slot(c)) is source]
    cluster.move_slots(sorted({r.slot(c) for c in moved}), target)
    after = r.round + 1
    assert all(cluster.master_of(r.slot(c)) is target for c in moved)
    assert r.wait_for_round(r.channels, after + 20), {
        c: r.numbers(c)[-1:] for c in moved
    }
    r.stop()
    missing = {c: r.account(c) for c in r.channels}
    still = [c for c in r.channels if c not in moved]
    assert all(missing[c] == 0 and r.gaps[c] == 0 for c in still), missing
    # A moved channel may have missed messages: the application is told.
    assert all(r.gaps[c] >= 1 for c in moved), r.gaps


@pytest.mark.timeout(180)
def test_one_master_down_affects_only_its_slots_until_failover(cluster, run):
    """Defect 2: a master killed; channels on the healthy masters lose
    nothing, the dead one's channels come back after its replica takes
    over, by themselves, and again after it restarts (as a replica)."""
    r = run([f"fo{i}" for i in range(12)])
    assert r.wait_for_round(r.channels, 20)
    victim = cluster.master_of(r.slot(r.channels[0]))
    on_victim = [c for c in r.channels if cluster.master_of(r.slot(c)) is victim]
    healthy = [c for c in r.channels if c not in on_victim]
    assert healthy and on_victim
    victim.kill()
    killed_at = r.round
    # Healthy channels keep delivering while the failover is under way.
    assert r.wait_for_round(healthy, killed_at + 10)
    cluster.wait_for_failover(r.slot(on_victim[0]), victim)
    after = r.round + 1
    assert r.wait_for_round(r.channels, after + 20), {
        c: r.numbers(c)[-1:] for c in on_victim
    }
    victim.restart()
    restarted = r.round + 1
    assert r.wait_for_round(r.channels, restarted + 20)
    r.stop()
    for c in healthy:
        assert r.account(c) == 0, c
        assert r.gaps[c] == 0, c
    for c in on_victim:
        r.account(c)
        assert r.gaps[c] >= 1, c


class Presence:
    """A worker that keeps listener counts on ``channels`` and a peer that
    reads them (another process's view: ``listener_count`` with no local
    listeners of its own)."""

    def __init__(self, url, channels, **options):
        prefix = f"presence-{uuid.uuid4().hex[:8]}:"
        options = {**FAST, "presence_ttl": 3.0, **options}
        self.worker = RedisBackend(url, prefix=prefix, **options)
        self.peer = RedisBackend(url, prefix=prefix, **options)
        self.worker.start(lambda *args: None)
        self.peer.start(lambda *args: None)
        self.channels = channels
        self.truth = {}

    def set(self, counts):
        for channel, count in counts.items():
            self.worker.set_local_count(channel, count)
            self.truth[channel] = count

    def agrees(self):
        return all(
            self.peer.listener_count(channel, 0) == count
            for channel, count in self.truth.items()
        )

    def slot(self, channel):
        return key_slot(f"{self.worker.prefix}presence:{channel}".encode())

    def close(self):
        self.worker.close()
        self.peer.close()


def masters(cluster):
    """The running nodes that are masters now (a failover test before may
    have made a replica of one of the first three)."""
    found = []
    for server in cluster.servers:
        if server.running:
            with server.client() as client:
                if client.info("replication")["role"] == "master":
                    found.append(server)
    return found


@pytest.fixture
def presence(cluster):
    made = []

    def make(channels, url=None, **options):
        made.append(Presence(url or cluster.url, channels, **options))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_presence_follows_a_moved_slot(cluster, presence):
    """Issue 15: the worker's counts are pipelined per node as its slot map
    has it; after a reshard its writes to moved slots get ``MOVED``, go
    back to the retry path and land on the new owner."""
    p = presence([f"room{i}" for i in range(30)])
    p.set({c: 1 for c in p.channels})
    assert wait_until(p.agrees, timeout=DEADLINE)
    source = cluster.master_of(p.slot(p.channels[0]))
    target = next(s for s in masters(cluster) if s is not source)
    moved = [c for c in p.channels if cluster.master_of(p.slot(c)) is source]
    failures = p.worker.stats["presence_failures"]
    cluster.move_slots(sorted({p.slot(c) for c in moved}), target)
    p.set({c: i + 2 for i, c in enumerate(p.channels)})
    assert wait_until(p.agrees, timeout=DEADLINE)
    # The worker's map was stale: its first writes there were redirected.
    assert p.worker.stats["presence_failures"] > failures
    # ...and the map is right now: the next heartbeat writes without one.
    failures = p.worker.stats["presence_failures"]
    beats = p.worker.stats["heartbeats"]
    assert wait_until(lambda: p.worker.stats["heartbeats"] >= beats + 2)
    assert p.worker.stats["presence_failures"] == failures
    assert p.agrees()


def test_presence_of_a_slot_being_migrated(cluster, presence):
    """A count whose key is in a slot half-way through a migration, and not
    yet on the importing node, is answered ``ASK`` by the old owner; the
    worker writes it on the importing node (redis-py sends ``ASKING``)."""
    p = presence([])
    channel = "migrating"
    slot = p.slot(channel)
    source = cluster.master_of(slot)
    target = next(s for s in masters(cluster) if s is not source)
    with source.client() as src, target.client() as dest:
        source_id = src.execute_command("CLUSTER MYID").decode()
        target_id = dest.execute_command("CLUSTER MYID").decode()
        dest.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
    try:
        p.set({channel: 4})
        assert wait_until(p.agrees, timeout=DEADLINE)
        with target.client() as dest:
            assert dest.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 1
    finally:
        cluster.move_slots([slot], target)  # finish the migration
    p.set({channel: 5})
    assert wait_until(p.agrees, timeout=DEADLINE)


@pytest.mark.timeout(180)
def test_presence_survives_a_master_failover(cluster, presence):
    """Issue 15: a master killed; the counts on it (changed while it is
    down) reach its replica once that takes over, and the others are
    written meanwhile, by the same per-node pipelines."""
    # A replica restarted by the test before must have synced to take over.
    cluster.wait_for_replicas(timeout=DEADLINE)
    p = presence([f"seat{i}" for i in range(30)])
    p.set({c: 1 for c in p.channels})
    assert wait_until(p.agrees, timeout=DEADLINE)
    victim = cluster.master_of(p.slot(p.channels[0]))
    on_victim = [c for c in p.channels if cluster.master_of(p.slot(c)) is victim]
    healthy = [c for c in p.channels if c not in on_victim]
    assert on_victim and healthy
    failures = p.worker.stats["presence_failures"]
    victim.kill()
    p.set({c: i + 2 for i, c in enumerate(p.channels)})
    # The healthy masters' counts do not wait for the failover.
    assert wait_until(
        lambda: all(p.peer.listener_count(c, 0) == p.truth[c] for c in healthy),
        timeout=DEADLINE,
    )
    cluster.wait_for_failover(p.slot(on_victim[0]), victim, timeout=DEADLINE)
    assert wait_until(p.agrees, timeout=DEADLINE)
    assert p.worker.stats["presence_failures"] > failures
    victim.restart()  # back, as a replica of the new master


def test_presence_outlives_the_whole_cluster_being_down(presence):
    """A cluster with no node reachable makes redis-py raise
    ``RedisClusterException``, which is not a ``RedisError``: counting
    falls back to the local count and the presence thread keeps retrying
    (it used to end, and no count was written again)."""
    with RedisCluster(masters=1) as lone:
        p = presence(["hall"], url=lone.url)
        p.set({"hall": 2})
        assert wait_until(p.agrees, timeout=DEADLINE)
        server = lone.servers[0]
        server.kill()
        assert p.peer.listener_count("hall", 1) == 1
        p.set({"hall": 3})
        assert wait_until(
            lambda: p.worker.stats["presence_failures"] >= 1, timeout=DEADLINE
        )
        server.restart()
        assert wait_until(p.agrees, timeout=DEADLINE)
