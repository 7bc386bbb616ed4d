"""The Redis pub/sub backend: broadcast across worker processes and machines.

Every process runs one receiver (:mod:`stargate.backends.receiver`, on
redis-py's ``PubSub``): one pub/sub connection, or one per master serving a
subscribed channel in a cluster, each read by a green thread of its own. It
subscribes a channel when the hub gets its first local listener there and
unsubscribes after the last, so Redis sends a worker only what it needs.
:meth:`RedisBackend.publish` sends on an ordinary connection; the message
comes back through Redis to every subscribed process, this one included, so
each process sees the same order per channel.

What is lost while disconnected
-------------------------------

Redis pub/sub does not store messages. When the receiver loses a
connection (Redis restarted, network cut, a cluster master down, or Redis
dropped a slow reader for exceeding ``client-output-buffer-limit pubsub``),
it logs a warning, reconnects with a bounded, jittered exponential backoff
and resubscribes every channel that still has local listeners; on a
cluster, only the lost master's channels are affected, and they move to
the replica that takes over. A channel whose slot moves (a reshard) is
followed to its new owner. Messages published in the meantime are **not**
delivered to this process: the loss is logged ("lost connection to Redis
for 2.3 s; messages published meanwhile were not received"), counted in
:attr:`RedisBackend.stats` and reported per channel to the hub
(:meth:`~stargate.backends.base.Backend.report_gap`), once the channel is
received again. WebSockets stay open throughout. :meth:`~RedisBackend.publish` raises
:class:`~stargate.exceptions.BackendUnavailable` while Redis cannot be
reached, after at most ``socket_timeout`` seconds.

Presence
--------

Each channel has one Redis hash, ``<prefix>presence:<channel>``, with one
field per process (a random process id) holding ``"<count>:<expires_ms>"``,
where the expiry is computed from Redis's own clock (``TIME``) inside a Lua
script, so clocks of the worker machines do not matter. A process rewrites
its fields when the hub reports a new local count and every
``presence_ttl / 3`` seconds, all from one green thread that batches them
in pipelines of ``PRESENCE_BATCH``, yielding between them so delivery goes
on (joins and leaves never wait on Redis), and retries a write that
failed. On a cluster the writes are grouped by the master that owns each
key's slot, one pipeline per node (and per ``PRESENCE_BATCH``), so a
heartbeat of thousands of channels is a few round trips, not one per
channel; a write answered ``MOVED`` (a reshard) or sent to a node that is
down (a failover) is retried once redis-py has corrected its slot map.
Readers sum the fields that have not expired and delete those that have,
so a worker that died stops counting after at most ``presence_ttl``
seconds; the whole hash expires too when nobody refreshes it. One hash per
channel keeps a read to a single key (no ``SCAN``), which also keeps it on
one node of a cluster.

URLs
----

``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS),
``unix:///path/to/redis.sock?db=N``, and ``redis+cluster://host:port`` or
``rediss+cluster://`` (or ``cluster=True``) for Redis Cluster, where the
backend uses sharded pub/sub (``SSUBSCRIBE``/``SPUBLISH``, Redis 7+) so each
channel lives on the node that owns its hash slot.
"""

import logging
import os
import socket
import struct
import time
import urllib.parse
import uuid

from redis import BlockingConnectionPool, Redis
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from stargate import runtime
from stargate.backends import REDIS_SCHEMES
from stargate.backends.base import Backend, Presence
from stargate.backends.options import (
    as_bool,
    backoff_pair,
    positive_float,
    positive_int,
)
from stargate.backends.receiver import PubSubReceiver
from stargate.exceptions import (
    BackendError,
    BackendUnavailable,
    IncorrectlyConfigured,
)

__all__ = ["RedisBackend"]

log = logging.getLogger(__name__)

#: Key and channel prefix, so several applications can share one Redis.
DEFAULT_PREFIX = "stargate:"
#: Seconds before the first reconnection attempt, and the most between two.
DEFAULT_RECONNECT_BACKOFF = (0.1, 10.0)
#: Seconds any single Redis operation (connect, publish, read) may take.
DEFAULT_SOCKET_TIMEOUT = 5.0
#: Seconds a process's presence entry outlives its last heartbeat.
DEFAULT_PRESENCE_TTL = 30.0
#: Connections per Redis node a worker keeps for publishing and presence.
#: One green-thread process runs one command at a time, so a few connections
#: keep Redis busy; more green threads wait (up to ``socket_timeout``) for
#: one to be free instead of failing or opening hundreds.
DEFAULT_MAX_CONNECTIONS = 16
#: Presence writes per pipeline. The presence green thread yields between
#: pipelines, so the receiver delivers while thousands of channels are
#: refreshed (one pipeline of 4,000 held delivery up to 87 ms each
#: heartbeat: ``python -m benchmarks channels``).
PRESENCE_BATCH = 200

#: Type tags put in front of every message so ``str`` and ``bytes`` survive.
TEXT_TAG = b"t"
BINARY_TAG = b"b"
#: Put in front of a tagged message by the pub/sub backend, followed by the
#: publishing process's 8-byte tag and the message's 8-byte number in that
#: process's sequence for the channel: a receiver that sees a number skipped
#: reports a gap (pub/sub has no history to fill it from).
SEQUENCED_TAG = b"#"
_SEQUENCE = struct.Struct(">8sQ")  # publisher tag, number
_SEQUENCE_HEADER = 1 + _SEQUENCE.size

#: Publishing connections a process keeps between publishes (more, taken by
#: concurrent publishes, go back to the pool).
_IDLE_PUBLISHERS = 4


# Presence scripts. Values are "<count>:<expires at, ms on the Redis clock>".
_PRESENCE_WRITE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. (now + ttl))
  if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"""

_PRESENCE_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entries = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #entries, 2 do
  local value = entries[i + 1]
  local sep = string.find(value, ':', 1, true)
  local count = tonumber(string.sub(value, 1, sep - 1))
  local expires = tonumber(string.sub(value, sep + 1))
  if expires <= now then
    redis.call('HDEL', KEYS[1], entries[i])
  elseif entries[i] ~= ARGV[1] then
    total = total + count
  end
end
return total
"""

_NETWORK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


def encode_message(message):
    """Tag ``message`` with its type: ``str`` -> text, ``bytes`` -> binary."""
    if isinstance(message, str):
        return TEXT_TAG + message.encode("utf-8")
    if isinstance(message, bytes):
        return BINARY_TAG + message
    raise TypeError(
        f"a broadcast message is str or bytes, not {type(message).__name__}"
    )


def decode_message(data, start=0):
    """Undo :func:`encode_message` on ``data[start:]`` (``start`` skips a
    header without copying the message first); ``ValueError`` for anything
    else."""
    tag = data[start : start + 1]
    if tag == TEXT_TAG:
        return data[start + 1 :].decode("utf-8")
    if tag == BINARY_TAG:
        return bytes(data[start + 1 :])
    raise ValueError(f"not a stargate message (tag {tag!r})")


def _new_process_id():
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"


def backoff_delay(reconnect_backoff, attempt):
    """Seconds to wait before reconnection ``attempt`` (0 for the first):
    doubling from the first value of ``reconnect_backoff`` up to the second,
    jittered to 50-100 % so workers do not reconnect in step
    (``redis.backoff.EqualJitterBackoff``)."""
    initial, maximum = reconnect_backoff
    return EqualJitterBackoff(cap=maximum, base=initial).compute(min(attempt, 32))


def redact_url(url):
    """``url`` with its password replaced by ``***``, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    userinfo = f"{parts.username or ''}:***"
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def connect_client(
    url, *, cluster=False, max_connections, socket_timeout, client_name, **kwargs
):
    """A redis-py client whose connections come from a bounded
    :class:`redis.BlockingConnectionPool` (one per node on a cluster).

    A green thread that finds every connection busy waits for one for at
    most ``socket_timeout`` seconds, then gets ``ConnectionError`` (which
    the backends turn into ``BackendUnavailable``); redis-py's default pool
    raises at once when full instead, and keeps every connection it ever
    opened.
    """
    kwargs.update(
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        # Fail fast: the receivers have their own backoff, and publish must
        # raise instead of retrying past socket_timeout.
        retry=Retry(NoBackoff(), 0),
        # RESP2: pub/sub messages are plain replies on the connection.
        protocol=2,
        client_name=client_name,
        max_connections=max_connections,
        timeout=socket_timeout,  # the pool's wait for a free connection
    )
    if cluster:
        return RedisCluster.from_url(
            url, connection_pool_class=BlockingConnectionPool, **kwargs
        )
    pool = BlockingConnectionPool.from_url(url, health_check_interval=0, **kwargs)
    return Redis(connection_pool=pool)


class RedisBackend(Presence, Backend):
    """Broadcast through Redis pub/sub (or sharded pub/sub on a cluster).

    ``url``: where Redis is (see the module docstring for the forms).

    Options (each is also a ``stargate.backend.<name>`` setting):

    ``prefix="stargate:"``
        Put in front of every Redis channel and key, so several applications
        (or test runs) can share one Redis without seeing each other.
    ``reconnect_backoff=(0.1, 10.0)``
        Seconds before the first reconnection attempt and the longest wait
        between two; the wait doubles after each failure and is jittered
        (a random 50-100 % of it) so workers do not reconnect in lockstep.
    ``socket_timeout=5.0``
        Seconds any one Redis operation may take (connect, publish, read);
        it bounds how long :meth:`publish` can block when Redis is gone.
    ``presence_ttl=30.0``
        Seconds a process's listener count outlives its last heartbeat; the
        heartbeat runs every ``presence_ttl / 3`` seconds.
    ``cluster=False``
        Treat ``url`` as one node of a Redis Cluster (same as a
        ``redis+cluster://`` URL).
    ``max_connections=16``
        Connections per Redis node kept for publishing and presence; a send
        that finds them all busy waits up to ``socket_timeout`` for one.

    Any other keyword argument is refused
    (:class:`~stargate.exceptions.IncorrectlyConfigured` naming it).

    :attr:`stats` counts ``published`` and ``received`` messages,
    ``reconnects``, ``gap_seconds`` (total time spent disconnected),
    ``undecodable`` messages skipped, ``delivery_errors`` (``deliver``
    raised), ``heartbeats`` (presence refreshes), ``presence_failures``
    (presence writes that failed, and were retried) and ``gaps`` (a channel may
    have missed messages: a lost connection, a moved slot, a failover; each
    is also reported to the hub, see :meth:`Backend.report_gap`) and
    ``missed`` (messages seen missing from a publisher's numbered sequence).
    """

    synchronous = False
    schemes = REDIS_SCHEMES

    def __init__(
        self,
        url="redis://localhost:6379/0",
        *,
        prefix=DEFAULT_PREFIX,
        reconnect_backoff=DEFAULT_RECONNECT_BACKOFF,
        socket_timeout=DEFAULT_SOCKET_TIMEOUT,
        presence_ttl=DEFAULT_PRESENCE_TTL,
        cluster=False,
        max_connections=DEFAULT_MAX_CONNECTIONS,
        **options,
    ):
        self.refuse_unknown_options(options)
        super().__init__(url)
        if not isinstance(url, str) or "://" not in url:
            raise IncorrectlyConfigured(
                f"stargate.backend: {url!r} is not a Redis URL; use "
                "redis://host:port/db, rediss://..., unix:///path?db=N or "
                "redis+cluster://host:port"
            )
        scheme, _, rest = url.partition("://")
        scheme = scheme.lower()
        if f"{scheme}://" not in self.schemes:
            raise IncorrectlyConfigured(
                f"stargate.backend: unknown Redis URL scheme {scheme!r} in "
                f"{redact_url(url)!r}; use one of {', '.join(self.schemes)}"
            )
        self.cluster = as_bool(cluster) or scheme.endswith("+cluster")
        scheme = scheme.removesuffix("+cluster")
        if self.cluster and scheme == "unix":
            raise IncorrectlyConfigured(
                "stargate.backend: Redis Cluster is reached over TCP, not a "
                f"unix socket ({redact_url(url)!r})"
            )
        self._client_url = f"{scheme}://{rest}"
        if not isinstance(prefix, str):
            raise IncorrectlyConfigured(
                f"stargate.backend.prefix must be a string, not {prefix!r}"
            )
        self.prefix = prefix
        self.reconnect_backoff = backoff_pair(reconnect_backoff)
        self.socket_timeout = positive_float("socket_timeout", socket_timeout)
        self.presence_ttl = positive_float("presence_ttl", presence_ttl)
        self.max_connections = positive_int("max_connections", max_connections)
        self.process_id = _new_process_id()
        self.stats = {
            "published": 0,
            "received": 0,
            "reconnects": 0,
            "gap_seconds": 0.0,
            "undecodable": 0,
            "delivery_errors": 0,
            "heartbeats": 0,
            "presence_failures": 0,
            "gaps": 0,
            "missed": 0,
        }
        self._prefix_bytes = prefix.encode("utf-8")
        self._deliver = None
        self._client = None
        self._write_presence = None
        self._read_presence = None
        self._receiver = None  # the PubSubReceiver, once started
        self._presence_thread = None
        self._presence_wake = runtime.current().Event()
        self._dirty = set()  # channels whose count Redis does not have yet
        self._started_in = None  # the pid start() ran in
        self._closed = False
        self._stopping = runtime.current().Event()
        # Channels with local listeners; the receiver keeps Redis in step.
        self._channels = set()
        self._names = {}  # Redis channel name (bytes) -> channel, for those
        self._local_counts = {}
        self._publisher_tag = os.urandom(8)
        self._sequence = {}  # channel -> number of the last message published
        self._publishers = []  # idle publishing connections (_publish_one)
        self._seen = {}  # channel -> {publisher tag: last number received}

    def __repr__(self):
        return f"<RedisBackend {redact_url(self.url)} prefix={self.prefix!r}>"

    # -- names ---------------------------------------------------------------

    def _redis_channel(self, channel):
        return f"{self.prefix}{channel}".encode("utf-8")

    def _presence_key(self, channel):
        return f"{self.prefix}presence:{channel}"

    # -- set-up --------------------------------------------------------------

    def _unavailable(self, doing, exc):
        return BackendUnavailable(
            f"Redis at {redact_url(self.url)} is unavailable: could not "
            f"{doing} ({type(exc).__name__}: {exc})"
        )

    @property
    def client_name(self):
        """The name this process's connections carry in ``CLIENT LIST``."""
        return f"{self.prefix}client:{self.process_id}"

    def _connect_client(self, **kwargs):
        return connect_client(
            self._client_url,
            cluster=self.cluster,
            max_connections=self.max_connections,
            socket_timeout=self.socket_timeout,
            client_name=self.client_name,
            **kwargs,
        )

    def start(self, deliver):
        """Connect, subscribe what is already wanted and start receiving.

        Raises :class:`~stargate.exceptions.BackendUnavailable` naming the
        URL when Redis cannot be reached, and
        :class:`~stargate.exceptions.IncorrectlyConfigured` when the runtime's
        monkey-patching is missing (the receiver would block the process).
        """
        if self._closed:
            raise BackendError("this Redis backend is closed; make a new one")
        if self._started_in is not None and self._started_in != os.getpid():
            self._forget_parent()
        if self._receiver is not None:
            raise BackendError("this Redis backend is already started")
        if self._started_in is None:
            # Made in the process that starts it: a backend built before the
            # server forked its workers gives each worker its own identity.
            self.process_id = _new_process_id()
        self._started_in = os.getpid()
        if not runtime.current().is_monkey_patched():
            raise IncorrectlyConfigured(
                f"the Redis backend needs {runtime.current().PATCH_CALL} to run before "
                "anything else in the process (including redis imports)"
            )
        self._deliver = deliver
        try:
            if self._client is None:
                self._client = self._connect_client()
            self._client.ping()
            self._write_presence = self._client.register_script(_PRESENCE_WRITE)
            self._read_presence = self._client.register_script(_PRESENCE_READ)
        except (RedisError, OSError) as exc:
            self._client_close()
            raise self._unavailable("connect", exc) from exc
        self._receiver = PubSubReceiver(
            self._client,
            self._pubsub_client,
            cluster=self.cluster,
            on_message=self._on_message,
            on_gap=self._on_gap,
            on_reconnected=self._reconnected,
            backoff=self.reconnect_backoff,
            read_timeout=self._heartbeat_interval,
            describe=self._describe,
        )
        for channel in sorted(self._channels):
            self._receiver.subscribe(self._redis_channel(channel))
        self._presence_thread = runtime.current().spawn(self._presence_loop)

    def _pubsub_client(self, node):
        """A client with a pool of its own for the pub/sub connection to
        ``node`` (the server itself outside a cluster); see
        :mod:`stargate.backends.receiver`."""
        kwargs = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_timeout,
            "retry": Retry(NoBackoff(), 0),
            "protocol": 2,
            "client_name": f"{self.prefix}pubsub:{self.process_id}",
        }
        if not self._client_url.startswith("unix:"):
            kwargs["socket_keepalive"] = True  # a peer gone without a FIN
        if node is None:
            return Redis.from_url(
                self._client_url,
                health_check_interval=self._heartbeat_interval,
                **kwargs,
            )
        url = urllib.parse.urlsplit(self._client_url)
        return Redis(
            host=node.host,
            port=node.port,
            username=url.username,
            password=url.password,
            ssl=url.scheme == "rediss",
            health_check_interval=self._heartbeat_interval,
            **kwargs,
        )

    def _describe(self, shard_key):
        return redact_url(self.url) if shard_key is None else shard_key

    def _forget_parent(self):
        """In a forked child: drop what belongs to the parent, untouched.

        The inherited sockets are shared with the parent, so nothing is sent
        on them, shut down or closed; the inherited green threads are killed
        before they can read the parent's messages. The child starts with no
        channels: its hub subscribes its own.
        """
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.abandon()
        presence, self._presence_thread = self._presence_thread, None
        if presence is not None:
            runtime.current().kill(presence)
        self._dirty = set()
        self._client = self._write_presence = self._read_presence = None
        self._publishers = []  # the parent's sockets: left untouched
        self._channels, self._names, self._local_counts = set(), {}, {}
        self._publisher_tag, self._sequence, self._seen = os.urandom(8), {}, {}
        self.process_id = _new_process_id()

    # -- subscriptions -------------------------------------------------------

    def subscribe(self, channel):
        """Start receiving ``channel``; returns once Redis confirms it.

        When Redis is unreachable the channel is remembered and subscribed as
        soon as the receiver reconnects; this never raises for that.
        """
        if channel in self._channels:
            return
        self._channels.add(channel)
        self._names[self._redis_channel(channel)] = channel
        if self._receiver is None or self._closed:
            return
        confirmed = self._receiver.subscribe(self._redis_channel(channel))
        if confirmed.ready():
            return
        if confirmed.wait(self.socket_timeout) is None:
            log.warning(
                "Redis at %s did not confirm the subscription to %r within %s s",
                redact_url(self.url),
                channel,
                self.socket_timeout,
            )

    def unsubscribe(self, channel):
        """Stop receiving ``channel``; nothing more is delivered for it."""
        if channel not in self._channels:
            return
        self._channels.discard(channel)
        self._names.pop(self._redis_channel(channel), None)
        self._seen.pop(channel, None)
        if self._receiver is not None:
            self._receiver.unsubscribe(self._redis_channel(channel))

    # -- publishing ----------------------------------------------------------

    def publish(self, channel, message):
        """Publish ``message`` (``str`` or ``bytes``) on ``channel``.

        Raises ``TypeError`` for any other type,
        :class:`~stargate.exceptions.BackendUnavailable` when Redis cannot be
        reached (within ``socket_timeout``), and
        :class:`~stargate.exceptions.BackendError` when Redis refuses.
        """
        data = encode_message(message)
        if self._closed:
            raise BackendUnavailable("this Redis backend is closed")
        if self._client is None:
            raise BackendError("the Redis backend is not started (call start())")
        # Numbered per channel before it is sent: a publish that fails after
        # Redis took it leaves a hole the receivers report as a possible
        # gap, never a silent one.
        seq = self._sequence[channel] = self._sequence.get(channel, 0) + 1
        data = SEQUENCED_TAG + self._publisher_tag + seq.to_bytes(8, "big") + data
        try:
            if self.cluster:
                self._client.spublish(self._redis_channel(channel), data)
            else:
                self._publish_one(self._redis_channel(channel), data)
        except _NETWORK_ERRORS as exc:
            raise self._unavailable(f"publish on {channel!r}", exc) from exc
        except RedisError as exc:
            raise BackendError(
                f"Redis at {redact_url(self.url)} refused to publish on "
                f"{channel!r}: {exc}"
            ) from exc
        self.stats["published"] += 1

    def _publish_one(self, name, data):
        """``PUBLISH name data`` on a connection kept between publishes.

        ``Redis.publish`` takes a connection from the pool and gives it back
        for every message, recording redis-py 8's metrics on both ways, and
        runs the command through its retry helper and response callbacks:
        twice the instructions of the command itself (callgrind: 199,000
        per publish, 93,000 this way). Connections are taken from the pool
        when none is idle here, so concurrent publishes still get one each
        (up to ``max_connections``), and a few are kept idle between
        publishes. Before reuse, a kept connection gets the pool's own
        check: one with something to read (the server closed it, as Redis
        does when it restarts) is reconnected, not written to. One that
        fails or is interrupted mid-command goes back to the pool
        disconnected.
        """
        pool = self._client.connection_pool
        idle = self._publishers
        if idle:
            connection = idle.pop()
            try:
                stale = connection.can_read()
            except _NETWORK_ERRORS:
                stale = True
            if stale:
                connection.disconnect()  # send_command connects it again
        else:
            connection = pool.get_connection()
        try:
            connection.send_command("PUBLISH", name, data)
            connection.read_response()
        except BaseException:
            connection.disconnect()
            pool.release(connection)
            raise
        if len(idle) < _IDLE_PUBLISHERS and self._client is not None:
            idle.append(connection)
        else:
            pool.release(connection)

    # -- presence ------------------------------------------------------------

    def set_local_count(self, channel, count):
        """The hub reports this process's listener count on ``channel``.

        Recorded at once and written to Redis by the presence green thread
        (batched in pipelines, one per node on a cluster): joins, leaves and
        pruning never wait on Redis. A write that fails is retried with
        backoff.
        """
        if count > 0:
            self._local_counts[channel] = count
        else:
            self._local_counts.pop(channel, None)
        self._dirty.add(channel)
        if not self._presence_wake.ready():
            self._presence_wake.send(True)

    def _write_counts(self, channels):
        """Write the current count of each of ``channels`` (0 removes this
        process's entry) and return those that were not written, to retry.

        Pipelines of at most ``PRESENCE_BATCH`` writes, yielding between
        them; on a cluster, one pipeline per node that owns the keys' slots
        (redis-py's cluster pipeline refuses EVALSHA, so each node's own
        client gets one). A node that cannot be reached or answers
        ``CLUSTERDOWN`` makes redis-py read the slot map again; a ``MOVED``
        reply corrects it for that slot; a key being migrated (``ASK``) is
        written at once through the cluster client, which follows the
        redirection itself.
        """
        ttl_ms = int(self.presence_ttl * 1000)
        failed = []
        if self.cluster:
            groups = self._by_node(channels, failed)
        else:
            groups = [(None, self._client, list(channels))]
        asked, refresh, first = [], None, True
        for node, client, group in groups:
            for start in range(0, len(group), PRESENCE_BATCH):
                if not first:
                    runtime.current().sleep(0)  # let the receiver deliver
                first = False
                batch = group[start : start + PRESENCE_BATCH]
                try:
                    replies = self._pipelined_writes(client, batch, ttl_ms)
                except (RedisError, OSError) as exc:
                    log.debug("writing presence to %s failed: %s", node, exc)
                    failed += group[start:]
                    refresh = refresh or node  # the node it could not reach
                    break
                for channel, reply in zip(batch, replies):
                    if isinstance(reply, MovedError):
                        # What redis-py does itself on MOVED; NodesManager
                        # has no documented way to correct one slot.
                        self._client.nodes_manager.move_slot(reply)
                        failed.append(channel)
                    elif isinstance(reply, AskError):
                        asked.append(channel)
                    elif isinstance(reply, Exception):
                        log.debug("writing presence of %r failed: %s", channel, reply)
                        failed.append(channel)
                        if isinstance(reply, ClusterDownError):
                            refresh = refresh or node
        for channel in asked:
            try:
                self._write_presence(
                    keys=[self._presence_key(channel)],
                    args=self._presence_args(channel, ttl_ms),
                )
            except (RedisError, RedisClusterException, OSError) as exc:
                log.debug("writing presence of %r failed: %s", channel, exc)
                failed.append(channel)
        if refresh is not None and self.cluster:
            self._refresh_slots(refresh)
        return failed

    def _pipelined_writes(self, client, batch, ttl_ms):
        """The replies to the writes of ``batch``, one pipeline on ``client``.

        EVALSHA alone: a ``Script`` run in a pipeline makes redis-py send
        ``SCRIPT EXISTS`` first, one more round trip per pipeline. A server
        without the script (restarted, or a replica that took over) answers
        ``NOSCRIPT``: it is loaded there and those writes go again.
        """
        replies = self._evalsha_pipeline(client, batch, ttl_ms)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            client.script_load(_PRESENCE_WRITE)
            again = self._evalsha_pipeline(client, [batch[i] for i in missing], ttl_ms)
            for i, reply in zip(missing, again):
                replies[i] = reply
        return replies

    def _evalsha_pipeline(self, client, batch, ttl_ms):
        sha = self._write_presence.sha
        with client.pipeline(transaction=False) as pipe:
            for channel in batch:
                key = self._presence_key(channel)
                pipe.evalsha(sha, 1, key, *self._presence_args(channel, ttl_ms))
            return pipe.execute(raise_on_error=False)

    def _presence_args(self, channel, ttl_ms):
        return [self.process_id, int(self._local_counts.get(channel, 0)), ttl_ms]

    def _by_node(self, channels, unplaced):
        """``[(node, its client, channels)]``: ``channels`` grouped by the
        master that owns each one's presence key, as redis-py's slot map
        has it; channels of a slot it has no owner for go to ``unplaced``."""
        groups = {}
        for channel in channels:
            try:
                node = self._client.get_node_from_key(self._presence_key(channel))
            except RedisClusterException:  # SlotNotCoveredError
                unplaced.append(channel)
                continue
            group = groups.get(node.name)
            if group is None:
                client = self._client.get_redis_connection(node)
                group = groups[node.name] = (node, client, [])
            group[2].append(channel)
        return list(groups.values())

    def _refresh_slots(self, failed_node):
        """Have redis-py read the cluster's slot map again, as it does itself
        after a connection error (``NodesManager.initialize``, which the
        receiver uses too: there is no documented way), asking
        ``failed_node`` last."""
        name = getattr(failed_node, "name", None)
        try:
            self._client.nodes_manager.initialize(
                disconnect_startup_nodes_pools=False, last_failed_node_name=name
            )
        except (RedisError, RedisClusterException, OSError) as exc:
            log.debug("reading the cluster's slot map failed: %s", exc)

    def _presence_loop(self):
        """Write what changed as soon as it changes, and every count once
        per ``presence_ttl / 3`` (the heartbeat), in batches; what was not
        written is retried with backoff."""
        next_beat = time.monotonic() + self._heartbeat_interval
        attempt = 0
        while not self._stopping.ready():
            if not self._dirty:
                self._presence_wake = runtime.current().Event()
                self._presence_wake.wait(max(0.0, next_beat - time.monotonic()))
            if self._stopping.ready():
                break
            batch, self._dirty = self._dirty, set()
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self._heartbeat_interval
                self.stats["heartbeats"] += 1
                batch |= set(self._local_counts)
            if not batch:
                continue
            try:
                failed = self._write_counts(sorted(batch))
            except (RedisError, RedisClusterException, OSError) as exc:
                log.debug("writing presence failed: %s", exc)
                failed = batch
            if failed:
                self._dirty.update(failed)  # retried, with what is current then
                self.stats["presence_failures"] += 1
                log.debug("%d presence writes failed; retrying", len(failed))
                self._stopping.wait(backoff_delay(self.reconnect_backoff, attempt))
                attempt += 1
            else:
                attempt = 0

    @property
    def _heartbeat_interval(self):
        return self.presence_ttl / 3

    def listener_count(self, channel, local_count):
        """Listeners on ``channel`` in every live process.

        ``local_count`` (this process's exact count) plus what the other
        processes last reported, leaving out entries that expired. While
        Redis cannot be reached it is ``local_count`` alone, with a warning.
        """
        if self._read_presence is None:
            return local_count
        try:
            others = self._read_presence(
                keys=[self._presence_key(channel)], args=[self.process_id]
            )
        except (RedisError, RedisClusterException, OSError) as exc:
            log.warning(
                "Redis at %s is unavailable (%s: %s): counting this process's "
                "listeners only",
                redact_url(self.url),
                type(exc).__name__,
                exc,
            )
            return local_count
        return local_count + int(others)

    # -- what the receiver reports ---------------------------------------------

    def _on_message(self, name, data):
        # Once per message on every worker: no copies, no per-message decoding
        # of the channel's name, no log call on the way to the hub.
        channel = self._names.get(name)
        if channel is None:
            return  # in flight when we unsubscribed
        start = 0
        if data[:1] == SEQUENCED_TAG and len(data) >= _SEQUENCE_HEADER:
            publisher, number = _SEQUENCE.unpack_from(data, 1)
            seen = self._seen.get(channel)
            if seen is None:
                seen = self._seen[channel] = {}
            last = seen.get(publisher)
            seen[publisher] = number
            if last is not None and number > last + 1:
                self._missed(channel, number - last - 1)
            start = _SEQUENCE_HEADER
        try:
            message = decode_message(data, start)
        except ValueError as exc:
            self.stats["undecodable"] += 1
            log.warning("skipped a message on %r: %s", channel, exc)
            return
        self.stats["received"] += 1
        try:
            self._deliver(channel, message)
        except Exception:
            self.stats["delivery_errors"] += 1
            log.exception("delivering a message on %r failed", channel)

    def _missed(self, channel, count):
        """A publisher's numbers on ``channel`` skipped ``count`` messages."""
        self.stats["missed"] += count
        self._gap(channel, f"{count} messages missing")

    def _on_gap(self, name, reason):
        channel = name[len(self._prefix_bytes) :].decode("utf-8", "replace")
        # Numbers start afresh: the messages missed are reported here.
        self._seen.pop(channel, None)
        self._gap(channel, reason)

    def _gap(self, channel, reason):
        if channel not in self._channels:
            return
        self.stats["gaps"] += 1
        log.warning("channel %r may have missed messages: %s", channel, reason)
        self.report_gap(channel, reason)

    def _reconnected(self, seconds, channels):
        self.stats["reconnects"] += 1
        self.stats["gap_seconds"] += seconds
        log.warning(
            "lost connection to Redis for %.1f s; messages published meanwhile "
            "were not received (%d channels resubscribed)",
            seconds,
            channels,
        )

    # -- shutting down -------------------------------------------------------

    def close(self, timeout=None):
        """Stop receiving, unsubscribe, remove this process's presence
        entries and close every connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if not self._stopping.ready():
            self._stopping.send(True)
        presence, self._presence_thread = self._presence_thread, None
        if presence is not None:
            runtime.current().kill(presence)
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.close()
        if self._write_presence is not None and self._local_counts:
            channels = sorted(set(self._local_counts) | self._dirty)
            self._local_counts.clear()
            try:
                failed = self._write_counts(channels)  # removes our entries
            except (RedisError, RedisClusterException, OSError) as exc:
                failed = channels
                log.debug("could not remove presence entries: %s", exc)
            if failed:
                log.debug("%d presence entries left to expire", len(failed))
        self._local_counts.clear()
        self._dirty.clear()
        self._client_close()

    def _client_close(self):
        client, self._client = self._client, None
        publishers, self._publishers = self._publishers, []
        if client is not None:
            for connection in publishers:
                client.connection_pool.release(connection)
        self._write_presence = self._read_presence = None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
