"""The pub/sub receiver of the Redis backend, on redis-py's own ``PubSub``.

One :class:`PubSubReceiver` per process. It keeps one *shard* per Redis
server it reads from: the server itself, or each master of a Redis Cluster
that serves a subscribed channel (sharded pub/sub, ``SSUBSCRIBE``). A shard
is a redis-py :class:`redis.client.PubSub` read by a green thread of its
own, so a master that fails stops only its own channels.

redis-py does the protocol: the connection, resubscribing every channel
when a connection is made again (``PubSub.on_connect``), health-check
``PING`` while idle (``health_check_interval``), and the cluster's slot map
(``RedisCluster.get_node_from_key``, ``nodes_manager.initialize``). What is
left here is what redis-py does not do for green threads:

* one reading green thread per shard, waking on its socket;
* following a channel to the master that serves its slot now: when Redis
  pushes ``sunsubscribe`` (the slot moved, as in a reshard), when it answers
  ``MOVED``, and when a master is lost (its replica took over);
* reconnecting with a jittered backoff (``redis.backoff``);
* telling the backend, per channel, when messages may have been missed
  (``on_gap``): a lost connection, a moved slot, a failover. A gap is
  reported once the channel is subscribed again, so an application that
  reloads state when told misses nothing after it.

``redis.cluster.ClusterPubSub`` is not used: its ``get_sharded_message``
polls the nodes one after the other, each with the full timeout, and it
reconciles moved slots on a thread pool only after a ``MOVED`` reply to some
other command; a pushed ``sunsubscribe`` leaves the channel unsubscribed.
Each shard's ``PubSub`` has a connection pool of its own (``connect(node)``
makes its client): a pub/sub connection taken from the cluster client's
pools would be marked for reconnection whenever that client refreshes its
slot map, and redis-py would reconnect it without a word, losing the
messages published meanwhile.
"""

import collections
import logging
import time

import greenlet
from redis.backoff import EqualJitterBackoff
from redis.exceptions import AskError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stargate import runtime

__all__ = ["PubSubReceiver"]

log = logging.getLogger("stargate.backends.redis")

_NETWORK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

#: Seconds a shard's thread waits at a time while its PubSub has no
#: subscription yet: redis-py's ``get_message`` then waits for a first
#: subscription, deaf to a subscribe that failed meanwhile (Redis down), so a
#: whole read timeout (the heartbeat interval) would pass before the shard
#: reconnects. (An idle worker, no channel subscribed, wakes 5 times a
#: second for it.)
UNSUBSCRIBED_POLL = 0.2


class _Shard:
    """One pub/sub connection and the green thread that reads it."""

    def __init__(self, key, pubsub):
        self.key = key  # the cluster node's name, or None
        self.pubsub = pubsub
        self.channels = set()  # channel names (bytes) routed here
        self.thread = None
        self.lost_at = None  # when the connection was lost, while it is
        self.gapped = set()  # channels to report once subscribed again
        # PubSub makes its connection on the first command, and two green
        # threads subscribing at once would each make one (and one would be
        # lost, with its subscription): commands to a shard go one at a time.
        self.lock = runtime.current().Semaphore()

    def subscribed_names(self):
        return set(self.pubsub.channels) | set(self.pubsub.shard_channels)


class PubSubReceiver:
    """Subscriptions of one process, spread over shards (see the module).

    ``client`` is a ``redis.Redis`` or ``redis.cluster.RedisCluster`` (for
    the slot map); ``connect(node)`` returns a ``redis.Redis`` with a pool
    of its own for a cluster node (``None`` outside a cluster).
    ``on_message(name, data)`` is called for each message, ``on_gap(name,
    reason)`` when ``name`` may have missed messages, and ``on_reconnected(
    seconds, channels)`` when a lost shard reads again. Names are ``bytes``.
    """

    def __init__(
        self,
        client,
        connect,
        *,
        cluster,
        on_message,
        on_gap,
        on_reconnected,
        backoff,
        read_timeout,
        describe=str,
    ):
        self.client = client
        self.connect = connect
        self.cluster = cluster
        self.on_message = on_message
        self.on_gap = on_gap
        self.on_reconnected = on_reconnected
        initial, maximum = backoff
        self.backoff = EqualJitterBackoff(cap=maximum, base=initial)
        self.read_timeout = read_timeout
        self.describe = describe
        self.shards = {}  # shard key -> _Shard
        self.routes = {}  # name -> shard key
        self.confirmations = {}  # name -> Event sent when Redis confirms
        self.own_unsubscribes = collections.Counter()
        self.unrouted = set()  # names waiting for the slot map to be read
        self.router = None  # the green thread routing them
        self.stopping = runtime.current().Event()

    # -- subscriptions (called by the backend) ----------------------------

    def subscribe(self, name):
        """Subscribe ``name``; returns an Event sent (True) when Redis
        confirms, or already sent (False) when Redis cannot be reached now.

        Never raises for Redis being unreachable: the shard's thread
        subscribes it when it reconnects.
        """
        confirmed = self.confirmations.get(name)
        if confirmed is None or confirmed.ready():
            confirmed = self.confirmations[name] = runtime.current().Event()
        try:
            shard = self._shard_for(name)
        except (RedisError, OSError) as exc:
            # No route yet (the cluster's slot map cannot be read).
            log.debug("cannot route %r yet: %s", name, exc)
            self._park(name)
            confirmed.send(False)
            return confirmed
        if not self._route(name, shard):
            confirmed.send(False)  # nothing to wait for until it reconnects
        return confirmed

    def _park(self, name):
        self.routes[name] = _UNROUTED
        self.unrouted.add(name)
        if self.router is None:
            self.router = runtime.current().spawn(self._route_parked)

    def _route_parked(self):
        attempt = 0
        try:
            while self.unrouted and not self.stopping.ready():
                try:
                    self.client.nodes_manager.initialize(
                        disconnect_startup_nodes_pools=False
                    )
                    for name in list(self.unrouted):
                        shard = self._shard_for(name)
                        self.unrouted.discard(name)
                        if self.routes.get(name) is _UNROUTED:
                            self._route(name, shard)
                            self.on_gap(name, "reconnected")
                except (RedisError, OSError):
                    self.stopping.wait(self.backoff.compute(attempt))
                    attempt += 1
        finally:
            self.router = None

    def unsubscribe(self, name):
        """Stop receiving ``name``."""
        self.confirmations.pop(name, None)
        self.unrouted.discard(name)
        key = self.routes.pop(name, _MISSING)
        shard = self.shards.get(key) if key is not _MISSING else None
        if shard is None:
            return
        shard.channels.discard(name)
        shard.gapped.discard(name)
        if shard.lost_at is not None or name not in shard.subscribed_names():
            self._forget_name(shard, name)
            return
        self.own_unsubscribes[name] += 1
        try:
            with shard.lock:
                if self.cluster:
                    shard.pubsub.sunsubscribe(name)
                else:
                    shard.pubsub.unsubscribe(name)
        except (RedisError, OSError) as exc:
            self.own_unsubscribes[name] -= 1
            self._forget_name(shard, name)
            self._lost(shard, exc)

    def channel_count(self):
        return len(self.routes)

    # -- routing ------------------------------------------------------------

    def _shard_for(self, name):
        if not self.cluster:
            return self._shard(None)
        node = self.client.get_node_from_key(name)
        return self._shard(node.name, node)

    def _shard(self, key, node=None):
        shard = self.shards.get(key)
        if shard is None:
            pubsub = self.connect(node).pubsub(ignore_subscribe_messages=False)
            shard = self.shards[key] = _Shard(key, pubsub)
            shard.thread = runtime.current().spawn(self._run, shard)
        return shard

    def _route(self, name, shard):
        """Route ``name`` to ``shard`` and send the subscription there;
        returns whether it was sent (else it is sent on reconnection)."""
        self.routes[name] = shard.key
        shard.channels.add(name)
        if shard.lost_at is not None:
            return False
        try:
            self._send_subscribe(shard, name)
        except (RedisError, OSError) as exc:
            self._lost(shard, exc)
            return False
        return True

    def _send_subscribe(self, shard, name):
        with shard.lock:
            if self.cluster:
                shard.pubsub.ssubscribe(name)
            else:
                shard.pubsub.subscribe(name)

    def _forget_name(self, shard, name):
        """Drop ``name`` from redis-py's record of the shard's
        subscriptions, so a reconnect does not subscribe it there again
        (``channels`` and ``shard_channels`` are PubSub's public dicts)."""
        shard.pubsub.channels.pop(name, None)
        shard.pubsub.shard_channels.pop(name, None)

    def _reroute(self, shard, names, reason):
        """``names`` may no longer be served by ``shard``: read the slot map
        again and subscribe each where it is served now."""
        if self.cluster:
            self.client.nodes_manager.initialize(disconnect_startup_nodes_pools=False)
        for name in names:
            if self.routes.get(name, _MISSING) != shard.key:
                continue  # unsubscribed or moved meanwhile
            target = self._shard_for(name)
            if target is shard:
                self._send_subscribe(shard, name)
                continue
            shard.channels.discard(name)
            shard.gapped.discard(name)
            self._forget_name(shard, name)
            self._route(name, target)
            if target.lost_at is None:
                self.on_gap(name, reason)
            else:
                target.gapped.add(name)
        self._drop_if_empty(shard)

    def _drop_if_empty(self, shard):
        if shard.channels or shard.key is None:
            return
        if self.shards.get(shard.key) is shard:
            del self.shards[shard.key]
        shard.lost_at = shard.lost_at or time.monotonic()
        try:
            shard.pubsub.reset()
        except Exception:  # a dead node's socket: nothing more to do
            pass
        if shard.thread is not None and shard.thread is not greenlet.getcurrent():
            runtime.current().kill(shard.thread)

    # -- reading (one green thread per shard) ------------------------------

    def _run(self, shard):
        attempt = 0
        while not self.stopping.ready() and self.shards.get(shard.key) is shard:
            if shard.lost_at is not None:
                try:
                    self._reconnect(shard)
                except (RedisError, OSError) as exc:
                    delay = self.backoff.compute(attempt)
                    attempt += 1
                    log.debug(
                        "reconnecting to %s failed (%s); next try in %.2f s",
                        self.describe(shard.key),
                        exc,
                        delay,
                    )
                    self.stopping.wait(delay)
                    continue
                attempt = 0
            try:
                self._read(shard)
            except AskError as exc:  # MOVED or ASK: the slot is elsewhere
                self._moved(shard, exc)
            except _NETWORK_ERRORS as exc:
                self._lost(shard, exc)
            except ResponseError as exc:  # CLUSTERDOWN and the like
                self._lost(shard, exc)
            except greenlet.GreenletExit:
                raise
            except Exception:
                log.exception("unexpected error reading %s", self.describe(shard.key))
                self._lost(shard, None)

    def _read(self, shard):
        """Wait up to ``read_timeout`` for a reply on the shard's connection
        and handle it.

        ``PubSub.get_message`` costs more than the rest of a message's way to
        its listeners: it goes through ``parse_response`` (a retry wrapper
        and two closures per call) and builds a dictionary per message. Once
        subscribed, this reads the connection itself, with redis-py's public
        ``Connection.read_response`` (its parser: hiredis when installed),
        and does what ``parse_response`` does around it: the health-check
        ``PING`` when due, and its reply skipped.
        """
        pubsub = shard.pubsub
        if not pubsub.subscribed:
            # No SUBSCRIBE sent yet, or every channel left: get_message waits
            # for one (and reads nothing it should not meanwhile), in short
            # turns (UNSUBSCRIBED_POLL) so a failed subscribe is acted upon.
            message = pubsub.get_message(
                timeout=min(self.read_timeout, UNSUBSCRIBED_POLL)
            )
            if message is not None:
                self._handle(shard, message)
            return
        pubsub.check_health()
        try:
            # Not can_read(timeout) first: with hiredis it waits in a green
            # select() (a selector made, registered and torn down per
            # wake-up); a read with a timeout waits in the socket's own recv.
            # A timeout leaves the parser as it was (hiredis keeps a partial
            # reply, the pure-Python parser rewinds), so it only means
            # nothing came.
            response = pubsub.connection.read_response(
                timeout=self.read_timeout, disconnect_on_error=False
            )
        except RedisTimeoutError:
            return
        self._dispatch(shard, response)

    def _dispatch(self, shard, response):
        """One reply read from the shard's connection. A published message
        (RESP2: ``[b"message", channel, data]``) goes straight to
        ``on_message``: ``PubSub.get_message`` would build a dictionary for
        it and look for a per-channel handler, which this receiver never
        registers. Anything else goes through ``PubSub.handle_message``,
        which keeps redis-py's record of subscriptions."""
        kind = response[0]
        if kind == b"message" or kind == b"smessage":
            name = response[1]
            if self.routes.get(name, _MISSING) == shard.key:
                self.on_message(name, response[2])
            return
        pubsub = shard.pubsub
        if pubsub.is_health_check_response(response):
            # What parse_response does with it: PubSub counts the PINGs it
            # sent (check_health) and reads back those still unanswered
            # before its next command while unsubscribed.
            pubsub.health_check_response_counter -= 1
            return
        message = pubsub.handle_message(response)
        if message is not None:
            self._handle(shard, message)

    def _handle(self, shard, message):
        kind = message["type"]  # a str, as redis-py decodes it
        name = message["channel"]
        if kind == "message" or kind == "smessage":
            if self.routes.get(name, _MISSING) == shard.key:
                self.on_message(name, message["data"])
            return
        if kind in ("subscribe", "ssubscribe"):
            confirmed = self.confirmations.get(name)
            if confirmed is not None and not confirmed.ready():
                confirmed.send(True)
        elif kind in ("unsubscribe", "sunsubscribe"):
            if self.own_unsubscribes[name] > 0:
                self.own_unsubscribes[name] -= 1
                if not self.own_unsubscribes[name]:
                    del self.own_unsubscribes[name]
                return
            if self.routes.get(name, _MISSING) == shard.key:
                # Pushed by Redis: the channel's slot left this node.
                log.warning(
                    "Redis at %s stopped serving %r (its slot moved); following it",
                    self.describe(shard.key),
                    name,
                )
                self._forget_name(shard, name)
                self._follow(shard, [name], "slot moved")

    def _follow(self, shard, names, reason):
        try:
            self._reroute(shard, names, reason)
        except (RedisError, OSError) as exc:
            # The new owner is not reachable yet: retry with the shard's
            # reconnection (its channels are routed again there).
            for name in names:
                shard.gapped.add(name)
            self._lost(shard, exc)

    def _moved(self, shard, exc):
        slot = getattr(exc, "slot_id", None)
        names = [
            name
            for name in shard.channels
            if slot is None or self.client.keyslot(name) == int(slot)
        ]
        for name in names:
            self._forget_name(shard, name)
        if isinstance(exc, AskError) and type(exc) is AskError:
            # The slot is being migrated: wait a moment for it to settle.
            self.stopping.wait(self.backoff.compute(0))
        self._follow(shard, names, "slot moved")

    def _lost(self, shard, exc):
        if shard.lost_at is not None:
            return
        shard.lost_at = time.monotonic()
        shard.gapped |= shard.channels
        if exc is not None and not self.stopping.ready():
            log.warning(
                "lost connection to Redis at %s (%s: %s); reconnecting",
                self.describe(shard.key),
                type(exc).__name__,
                exc,
            )
        connection = shard.pubsub.connection
        if connection is not None:
            try:
                connection.disconnect()
            except Exception:
                pass

    def _reconnect(self, shard):
        """Connect the shard again and subscribe its channels there (moving
        those whose slot is served elsewhere now). Raises on failure."""
        if self.cluster:
            self.client.nodes_manager.initialize(disconnect_startup_nodes_pools=False)
            elsewhere = [
                name
                for name in shard.channels
                if self.client.get_node_from_key(name).name != shard.key
            ]
            if elsewhere:
                for name in elsewhere:
                    self._forget_name(shard, name)
                self._reroute(shard, elsewhere, "failover")
            if self.shards.get(shard.key) is not shard:
                return  # every channel moved: the shard is gone
        connection = shard.pubsub.connection
        missing = shard.channels - shard.subscribed_names()
        if connection is not None:
            with shard.lock:
                connection.disconnect()
                connection.connect()  # PubSub.on_connect resubscribes
        for name in missing:
            self._send_subscribe(shard, name)
        lost_for = time.monotonic() - shard.lost_at
        shard.lost_at = None
        gapped, shard.gapped = shard.gapped & shard.channels, set()
        self.on_reconnected(lost_for, len(shard.channels))
        for name in gapped:
            self.on_gap(name, "reconnected")

    # -- shutting down ------------------------------------------------------

    def close(self):
        """Stop every shard's thread and close its connection."""
        if not self.stopping.ready():
            self.stopping.send(True)
        if self.router is not None:
            runtime.current().kill(self.router)
        shards, self.shards = list(self.shards.values()), {}
        for shard in shards:
            if shard.thread is not None:
                runtime.current().kill(shard.thread)
            try:
                if self.cluster:
                    shard.pubsub.sunsubscribe()
                else:
                    shard.pubsub.unsubscribe()
            except (RedisError, OSError):
                pass
            try:
                shard.pubsub.reset()
            except Exception:
                pass
        for confirmed in self.confirmations.values():
            if not confirmed.ready():
                confirmed.send(False)
        self.confirmations.clear()
        self.routes.clear()
        self.unrouted.clear()

    def abandon(self):
        """In a forked child: drop everything without touching the sockets,
        which the parent still uses."""
        if not self.stopping.ready():
            self.stopping.send(True)
        for thread in [s.thread for s in self.shards.values()] + [self.router]:
            if thread is not None:
                runtime.current().kill(thread)
        self.shards = {}


_MISSING = object()
_UNROUTED = object()
