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
        self.receiver.gap_handler = lambda channel, reason: self.gaps.update(
            [channel]
        )
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
            lambda: all(
                self.numbers(c)[-1:] == [n] for c, n in last.items()
            ),
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
