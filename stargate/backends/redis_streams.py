"""The Redis Streams backend: broadcast across workers, with history.

``stargate.backend = redis+streams://host:port/db`` (or ``rediss+streams://``
for TLS). Where the pub/sub backend (:mod:`stargate.backends.redis`) loses
whatever is published while a worker is cut off, this one keeps every
channel's recent messages in Redis, so

* a worker that loses Redis (or is paused, or too slow) resumes from the last
  message it delivered and gives its listeners what they missed, in order,
  once each, as long as it is still in the window;
* a client that reconnects with its last position gets what it missed
  (``add_listener(ws, since=position)``, see :mod:`stargate.hub`).

Keys
----

Each channel has two keys, both expiring ``history_ttl`` seconds after the
channel's last message:

``<prefix>stream:<channel>``
    A stream capped near ``history_size`` entries (``XADD ... MAXLEN ~``, so
    Redis may keep a few more). Each entry's ID is ``<offset>-0`` and it
    holds the epoch (``e``) and the tagged message (``d``).
``<prefix>meta:<channel>``
    A hash with the channel's ``epoch`` (a random token, set only when the
    hash does not exist: the equivalent of ``SET NX``) and its last
    ``offset`` (``HINCRBY``).

One Lua script publishes: it creates the epoch if the hash is gone (and
then drops any stream left from the lost epoch), increments the offset,
adds the entry with that offset as its ID and refreshes both TTLs. So the
offset *is* the stream ID: a per-channel integer that grows by one per
message, which clients can compare and the window can be read by
(``XRANGE stream <since+1>-0 +``). When Redis loses the keys (restarted
without persistence, flushed, expired) the next message starts a new epoch
at offset 1, and every position of the old epoch is refused with
:class:`~stargate.exceptions.HistoryUnavailable`.

Receiving
---------

Each process keeps a cursor per channel with local listeners (the epoch and
the last offset delivered). The publishing script also publishes
``"<epoch> <offset>"`` on the channel's notification channel,
``<prefix>notify:<channel>``, which each process subscribes for its
channels through the same receiver as the pub/sub backend
(:mod:`stargate.backends.receiver`, one connection named
``<prefix>reader:<process id>`` in ``CLIENT LIST``). A notification marks
the channel, and one green thread reads the marked channels only, with one
``XREAD`` from their cursors (a channel stays marked until a read brings
nothing new). So reading costs grow with the channels that are active, not
with those subscribed: a worker with thousands of quiet channels reads a
busy one as fast as with ten, and subscribing a channel costs one ``HMGET``
and one ``SUBSCRIBE``.

A notification is a wake-up, never the data: what was published while the
notification connection was down is read from the stream when it is back
(every channel it carries is read once), in order, once. If the window no
longer holds it, the gap is logged with its size, counted in
:attr:`RedisStreamsBackend.stats` (``gaps``, ``missed``) and reported to the
hub; if the epoch changed (the keys were lost and made anew), the loss is
logged, counted (``epoch_changes``) and reported, and delivery goes on with
the new epoch's messages. Every ``block`` seconds the heads of all channels
are read once more, a safety net for a notification lost without a
disconnection: in pipelines of ``_CHECK_BATCH``, with what is pending read
between two of them, and only a stream whose head moved is read, so the
sweep of thousands of quiet channels does not hold a busy one's delivery.

Presence is not kept (the backend does not declare
:class:`~stargate.backends.base.Presence`): ``hub.listener_count`` reports
this process's listeners only.
"""

import logging
import os
import socket
import time
import uuid

import greenlet
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from stargate import runtime
from stargate.backends import STREAMS_SCHEMES
from stargate.backends.base import Backend, History, HistoryPolicy, Position
from stargate.backends.options import backoff_pair, positive_float, positive_int
from stargate.backends.receiver import PubSubReceiver
from stargate.backends.redis import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PREFIX,
    DEFAULT_RECONNECT_BACKOFF,
    DEFAULT_SOCKET_TIMEOUT,
    backoff_delay,
    connect_client,
    decode_message,
    encode_message,
    redact_url,
)
from stargate.exceptions import (
    BackendError,
    BackendUnavailable,
    HistoryUnavailable,
    IncorrectlyConfigured,
)

__all__ = ["RedisStreamsBackend"]

log = logging.getLogger(__name__)

#: Messages kept per channel when the resource sets no history policy.
DEFAULT_HISTORY_SIZE = 1000
#: Seconds a channel's history outlives its last message, by default.
DEFAULT_HISTORY_TTL = 3600.0
#: Seconds between two reads of every subscribed channel's head, the safety
#: net for a notification lost without a disconnection (each message is
#: otherwise read when its notification arrives).
DEFAULT_BLOCK = 10.0
#: Entries read per stream per XREAD.
DEFAULT_READ_COUNT = 500

_SCHEMES = {"redis+streams": "redis", "rediss+streams": "rediss"}

_NETWORK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
#: Streams named in one XREAD.
_READ_BATCH = 500
#: Entries delivered from one XREAD after which the reader yields to the
#: rest of the process before reading on. A smaller read does not: yielding
#: costs a turn of the hub, once per message when messages come one by one.
_YIELD_AFTER = 100
#: Heads read in one pipeline by the sweep. The reader reads what is
#: pending (a busy channel's new entries) between two such pipelines, so a
#: sweep of thousands of channels never holds delivery for long.
_CHECK_BATCH = 50
#: Marks a channel that is not subscribed.
_GONE = object()

# KEYS: stream, meta. ARGV: a new epoch, the tagged message, maxlen, ttl ms,
# the channel's notification channel (told "<epoch> <offset>").
_PUBLISH = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch)
end
local offset = redis.call('HINCRBY', KEYS[2], 'offset', 1)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], offset .. '-0',
           'e', epoch, 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[5], epoch .. ' ' .. offset)
return {epoch, offset}
"""


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _offset(entry_id):
    """The offset in a stream entry ID ``b"<offset>-0"``."""
    return int(entry_id.split(b"-", 1)[0])


def _fields(flat):
    """``[k1, v1, k2, v2]`` -> ``{k1: v1, k2: v2}`` (redis-py's XRANGE
    already returns a dict; a raw XREAD reply is a flat list)."""
    if isinstance(flat, dict):
        return flat
    return dict(zip(flat[::2], flat[1::2]))


class RedisStreamsBackend(History, Backend):
    """Broadcast through one Redis stream per channel, with history.

    ``url``: ``redis+streams://[[user]:password@]host[:port][/db]`` (or
    ``rediss+streams://``, or a plain ``redis://`` URL).

    Options (each is also a ``stargate.backend.<name>`` setting):

    ``prefix="stargate:"``
        Put in front of every key.
    ``history_size=1000``, ``history_ttl=3600``
        The window of a channel whose resource gives no history policy
        (``stargate.history_size`` = 0): the stream is how this backend
        carries messages, so every channel has one.
    ``reconnect_backoff=(0.1, 10.0)``
        Seconds before the first reconnection attempt and the longest wait
        between two (doubling, jittered).
    ``socket_timeout=5.0``
        Seconds any one Redis operation may take (XREAD adds ``block``).
    ``block=10.0``
        Seconds between two reads of every subscribed channel's head (in
        small pipelines), the safety net for a notification lost without a
        disconnection; also the notification connection's health check.
    ``read_count=500``
        Entries read per stream per XREAD.
    ``max_connections=16``
        Connections kept for publishing and reading history; a call that
        finds them all busy waits up to ``socket_timeout`` for one.

    :attr:`stats` counts ``published`` and ``received`` messages,
    ``reconnects``, ``gap_seconds`` (time disconnected), ``gaps`` and
    ``missed`` (messages that left the window before this process read
    them), ``epoch_changes`` (histories lost), ``undecodable`` and
    ``delivery_errors``.
    """

    synchronous = False
    schemes = STREAMS_SCHEMES

    def __init__(
        self,
        url="redis+streams://localhost:6379/0",
        *,
        prefix=DEFAULT_PREFIX,
        history_size=DEFAULT_HISTORY_SIZE,
        history_ttl=DEFAULT_HISTORY_TTL,
        reconnect_backoff=DEFAULT_RECONNECT_BACKOFF,
        socket_timeout=DEFAULT_SOCKET_TIMEOUT,
        block=DEFAULT_BLOCK,
        read_count=DEFAULT_READ_COUNT,
        max_connections=DEFAULT_MAX_CONNECTIONS,
        **options,
    ):
        self.refuse_unknown_options(options)
        super().__init__(url)
        if not isinstance(url, str) or "://" not in url:
            raise IncorrectlyConfigured(
                f"stargate.backend: {url!r} is not a Redis URL; use "
                "redis+streams://host:port/db"
            )
        scheme, _, rest = url.partition("://")
        scheme = _SCHEMES.get(scheme.lower(), scheme.lower())
        if scheme not in ("redis", "rediss"):
            raise IncorrectlyConfigured(
                f"stargate.backend: {redact_url(url)!r} is not a URL the streams "
                "backend takes; use redis+streams://host:port/db or rediss+streams://"
            )
        self._client_url = f"{scheme}://{rest}"
        if not isinstance(prefix, str):
            raise IncorrectlyConfigured(f"prefix must be a string, not {prefix!r}")
        self.prefix = prefix
        try:
            size = int(history_size)
        except (TypeError, ValueError):
            size = 0
        if size <= 0:
            raise IncorrectlyConfigured(
                f"history_size must be a positive number of messages, not "
                f"{history_size!r}"
            )
        self.default_policy = HistoryPolicy(
            size, positive_float("history_ttl", history_ttl)
        )
        self.reconnect_backoff = backoff_pair(reconnect_backoff)
        self.socket_timeout = positive_float("socket_timeout", socket_timeout)
        self.block = positive_float("block", block)
        self.read_count = int(read_count)
        self.max_connections = positive_int("max_connections", max_connections)
        self.stats = dict.fromkeys(
            (
                "published",
                "received",
                "reconnects",
                "gaps",
                "missed",
                "epoch_changes",
                "undecodable",
                "delivery_errors",
            ),
            0,
        )
        self.stats["gap_seconds"] = 0.0
        self._reset_process_state()
        self._closed = False

    def _reset_process_state(self):
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._started_in = None
        self._deliver = None
        self._client = None
        self._publish_script = None
        self._notifier = None  # the PubSubReceiver of notifications
        self._receiver = None  # the green thread that reads the streams
        self._stopping = runtime.current().Event()
        self._wakeup = runtime.current().Event()
        #: channel -> [epoch or None, last offset delivered]; None while the
        #: current offset could not be read (it is read on reconnect).
        self._cursors = {}
        self._heads = {}  # channel -> (epoch, offset) last notified
        self._pending = set()  # channels with entries to read
        self._check = set()  # channels whose head must be read again

    def __repr__(self):
        return f"<RedisStreamsBackend {redact_url(self.url)} prefix={self.prefix!r}>"

    # -- names ---------------------------------------------------------------

    def _stream_key(self, channel):
        return f"{self.prefix}stream:{channel}"

    def _meta_key(self, channel):
        return f"{self.prefix}meta:{channel}"

    def _notify_name(self, channel):
        return f"{self.prefix}notify:{channel}"

    def _unavailable(self, doing, exc):
        return BackendUnavailable(
            f"Redis at {redact_url(self.url)} is unavailable: could not "
            f"{doing} ({type(exc).__name__}: {exc})"
        )

    # -- set-up --------------------------------------------------------------

    @property
    def client_name(self):
        """The name this process's connections carry in ``CLIENT LIST``."""
        return f"{self.prefix}client:{self.process_id}"

    def start(self, deliver):
        """Connect and start the receiving green thread.

        Raises :class:`~stargate.exceptions.BackendUnavailable` when Redis
        cannot be reached, and
        :class:`~stargate.exceptions.IncorrectlyConfigured` without the runtime's
        monkey-patching.
        """
        if self._closed:
            raise BackendError("this Redis streams backend is closed; make a new one")
        if self._started_in is not None and self._started_in != os.getpid():
            # A forked child: the parent's sockets and threads are not ours.
            receiver, notifier = self._receiver, self._notifier
            self._reset_process_state()
            if receiver is not None:
                runtime.current().kill(receiver)
            if notifier is not None:
                notifier.abandon()
        if self._receiver is not None:
            raise BackendError("this Redis streams backend is already started")
        if not runtime.current().is_monkey_patched():
            raise IncorrectlyConfigured(
                "the Redis streams backend needs "
                f"{runtime.current().PATCH_CALL} to run before anything else "
                "in the process"
            )
        self._started_in = os.getpid()
        self._deliver = deliver
        try:
            self._client = connect_client(
                self._client_url,
                max_connections=self.max_connections,
                socket_timeout=self.socket_timeout,
                client_name=self.client_name,
            )
            self._client.ping()
            self._publish_script = self._client.register_script(_PUBLISH)
        except (RedisError, OSError) as exc:
            self._close_client()
            raise self._unavailable("connect", exc) from exc
        self._notify_prefix = self._notify_name("").encode()
        self._notifier = PubSubReceiver(
            self._client,
            self._notifier_client,
            cluster=False,
            on_message=self._notified,
            on_gap=self._notifications_missed,
            on_reconnected=self._reconnected,
            backoff=self.reconnect_backoff,
            read_timeout=self.block,
            describe=lambda key: redact_url(self.url),
        )
        self._receiver = runtime.current().spawn(self._run)
        for channel in list(self._cursors):
            self._notifier.subscribe(self._notify_name(channel).encode())
            self._mark(channel, check=True)

    # -- subscriptions -------------------------------------------------------

    def subscribe(self, channel):
        """Deliver ``channel``'s messages published from now on.

        Reads the channel's current offset, subscribes its notification
        channel and reads once after Redis confirms it, so nothing published
        after this returns is missed. When Redis is unreachable the offset
        is read when the receiver reconnects; this never raises.
        """
        if channel in self._cursors:
            return
        try:
            cursor = self._head(channel)
        except (RedisError, OSError) as exc:
            log.debug("could not read the offset of %r yet: %s", channel, exc)
            cursor = None
            self._check.add(channel)
        self._cursors[channel] = cursor
        if self._notifier is None:
            return
        confirmed = self._notifier.subscribe(self._notify_name(channel).encode())
        if not confirmed.ready():
            confirmed.wait(self.socket_timeout)
        self._mark(channel)

    def unsubscribe(self, channel):
        """Stop delivering ``channel`` (entries already read are dropped)."""
        if self._cursors.pop(channel, _GONE) is _GONE:
            return
        self._pending.discard(channel)
        self._check.discard(channel)
        self._heads.pop(channel, None)
        if self._notifier is not None:
            self._notifier.unsubscribe(self._notify_name(channel).encode())

    def _head(self, channel):
        """``[epoch or None, offset]`` of ``channel`` now."""
        epoch, offset = self._client.hmget(self._meta_key(channel), "epoch", "offset")
        if epoch is None:
            return [None, 0]
        return [_text(epoch), int(offset or 0)]

    def _mark(self, channel, check=False):
        """``channel`` has entries to read (or its head to check)."""
        (self._check if check else self._pending).add(channel)
        if not self._wakeup.ready():
            self._wakeup.send(True)

    # -- publishing and history ----------------------------------------------

    def publish(self, channel, message, history=None):
        """Add ``message`` to ``channel``'s stream; returns its Position.

        ``history`` is the channel's :class:`HistoryPolicy` (``None``: the
        backend's ``history_size`` and ``history_ttl``). Raises
        :class:`~stargate.exceptions.BackendUnavailable` when Redis cannot be
        reached within ``socket_timeout``.
        """
        data = encode_message(message)
        if self._closed:
            raise BackendUnavailable("this Redis streams backend is closed")
        if self._client is None:
            raise BackendError("the Redis streams backend is not started")
        policy = history if history is not None else self.default_policy
        try:
            epoch, offset = self._publish_script(
                keys=[self._stream_key(channel), self._meta_key(channel)],
                args=[
                    uuid.uuid4().hex[:16],
                    data,
                    max(1, int(policy.size)),
                    max(1, int(policy.ttl * 1000)),
                    self._notify_name(channel),
                ],
            )
        except _NETWORK_ERRORS as exc:
            raise self._unavailable(f"publish on {channel!r}", exc) from exc
        except RedisError as exc:
            raise BackendError(
                f"Redis at {redact_url(self.url)} refused to publish on "
                f"{channel!r}: {exc}"
            ) from exc
        self.stats["published"] += 1
        return Position(_text(epoch), int(offset))

    def history(self, channel, since):
        """``(position, message)`` pairs published on ``channel`` after
        ``since``, read atomically with the channel's epoch and offset.

        Raises :class:`~stargate.exceptions.HistoryUnavailable` (with the
        current epoch, ``None`` if the channel has none, and offset) when
        the epoch differs or the window starts after ``since``.
        """
        since = Position.coerce(since)
        if self._client is None:
            raise BackendError("the Redis streams backend is not started")
        try:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.hmget(self._meta_key(channel), "epoch", "offset")
                pipe.xrange(self._stream_key(channel), f"{since.offset + 1}-0", "+")
                (epoch, offset), entries = pipe.execute()
        except _NETWORK_ERRORS as exc:
            raise self._unavailable(f"read the history of {channel!r}", exc) from exc
        except RedisError as exc:
            raise BackendError(f"could not read the history of {channel!r}: {exc}")
        epoch = _text(epoch)
        head = int(offset or 0)
        if epoch != since.epoch:
            raise HistoryUnavailable(
                f"{channel!r}: epoch {since.epoch!r} is not the current one "
                f"({epoch!r}); its history was lost",
                epoch=epoch,
                offset=head,
            )
        if since.offset == head:
            return []
        if (
            since.offset > head
            or not entries
            or _offset(entries[0][0]) != (since.offset + 1)
        ):
            first = _offset(entries[0][0]) if entries else head + 1
            raise HistoryUnavailable(
                f"{channel!r}: offset {since.offset} is no longer in the window "
                f"(offsets {first}-{head} are)",
                epoch=epoch,
                offset=head,
            )
        result = []
        for entry_id, flat in entries:
            fields = _fields(flat)
            try:
                message = decode_message(fields[b"d"])
            except (KeyError, ValueError):
                continue
            result.append((Position(epoch, _offset(entry_id)), message))
        return result

    # -- the receiver --------------------------------------------------------

    def _notifier_client(self, node):
        """The notification connection's client (a pool of its own), named
        ``<prefix>reader:<process id>`` in ``CLIENT LIST``."""
        return Redis.from_url(
            self._client_url,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.socket_timeout,
            retry=Retry(NoBackoff(), 0),
            protocol=2,
            health_check_interval=self.block,
            client_name=f"{self.prefix}reader:{self.process_id}",
        )

    def _notified(self, name, data):
        """A notification: ``<epoch> <offset>`` was added to a channel."""
        channel = name[len(self._notify_prefix) :].decode("utf-8", "replace")
        if channel not in self._cursors:
            return
        epoch, _, offset = data.partition(b" ")
        self._heads[channel] = (_text(epoch), int(offset or 0))
        self._mark(channel)

    def _notifications_missed(self, name, reason):
        """The notification connection was lost: read every channel it
        carries (the stream holds what was published; this is no gap)."""
        channel = name[len(self._notify_prefix) :].decode("utf-8", "replace")
        if channel in self._cursors:
            self._mark(channel, check=True)

    def _run(self):
        attempt = 0
        sweep_at = time.monotonic() + self.block
        while not self._stopping.ready():
            if not self._pending and not self._check:
                self._wakeup = runtime.current().Event()
                if not self._pending and not self._check:
                    self._wakeup.wait(max(0.0, sweep_at - time.monotonic()))
            if self._stopping.ready():
                break
            if time.monotonic() >= sweep_at:
                sweep_at = time.monotonic() + self.block
                self._check |= set(self._cursors)
            try:
                if self._check:
                    self._check_epochs()
                if self._pending:
                    self._read_pending()
            except (RedisError, OSError) as exc:
                if self._stopping.ready():
                    break
                delay = backoff_delay(self.reconnect_backoff, attempt)
                attempt += 1
                log.debug(
                    "reading from Redis at %s failed (%s); next try in %.2f s",
                    redact_url(self.url),
                    exc,
                    delay,
                )
                self._stopping.wait(delay)
                continue
            except greenlet.GreenletExit:
                raise
            except Exception:
                log.exception("unexpected error in the Redis streams receiver")
                self._stopping.wait(backoff_delay(self.reconnect_backoff, 0))
                continue
            attempt = 0

    def _reconnected(self, seconds, channels):
        self.stats["reconnects"] += 1
        self.stats["gap_seconds"] += seconds
        log.warning(
            "reconnected to Redis after %.1f s; reading on from the last offset "
            "delivered on %d channels",
            seconds,
            channels,
        )

    def _check_epochs(self):
        """Read the heads of up to ``_CHECK_BATCH`` channels to check (the
        rest wait for the next turn of the reader, after what is pending):
        resync those whose epoch moved, position those subscribed while
        Redis was away, and mark for reading only those whose stream holds
        more than was delivered. A sweep of quiet channels reads no stream:
        it was one XREAD per 500 subscribed channels every ``block``
        seconds, and one pipeline of every head, which held delivery on a
        busy channel for about 100 ms with 2,000 channels subscribed."""
        channels = []
        while self._check and len(channels) < _CHECK_BATCH:
            channel = self._check.pop()
            if channel in self._cursors:
                channels.append(channel)
        if not channels:
            return
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for channel in channels:
                    pipe.hmget(self._meta_key(channel), "epoch", "offset")
                heads = pipe.execute()
        except BaseException:
            self._check.update(channels)
            raise
        for channel, (epoch, offset) in zip(channels, heads):
            cursor = self._cursors.get(channel, _GONE)
            if cursor is _GONE:
                continue  # unsubscribed meanwhile
            epoch = _text(epoch)
            offset = int(offset or 0)
            self._heads.pop(channel, None)
            if cursor is None:
                # Subscribed while Redis was away: from here on (read once
                # now, for what came between this read and the next).
                self._cursors[channel] = [epoch, offset]
                self._pending.add(channel)
            elif cursor[0] is not None and epoch is not None and epoch != cursor[0]:
                self._epoch_changed(channel, cursor, epoch)
                self._pending.add(channel)
            elif offset > cursor[1]:
                self._pending.add(channel)  # a notification went missing

    def _read_pending(self):
        """One XREAD (per 500 channels) of the channels with entries to
        read: only those, so quiet channels cost nothing.

        A channel stays pending while a read may have left entries behind:
        it returned ``read_count`` of them, or its handling stopped short
        (a new epoch). Otherwise the read returned everything the stream
        held then, and anything added later is notified after it (the
        publish script adds and notifies at once), which marks the channel
        again: no second XREAD to learn that nothing is new, which was a
        round trip and a wake-up more per message for every worker."""
        batch = [c for c in self._pending if self._cursors.get(c) is not None]
        self._pending = set()
        for channel in batch:
            head = self._heads.pop(channel, None)
            cursor = self._cursors[channel]
            if head is not None and cursor[0] is not None and head[0] != cursor[0]:
                # Another epoch: the channel's meta hash says which is current
                # (a notification may be late), checked at the next turn.
                self._check.add(channel)
        for i in range(0, len(batch), _READ_BATCH):
            chunk = batch[i : i + _READ_BATCH]
            streams = {
                self._stream_key(c): f"{self._cursors[c][1]}-0"
                for c in chunk
                if self._cursors.get(c) is not None
            }
            try:
                response = self._client.xread(streams, count=self.read_count)
            except BaseException:
                self._pending.update(chunk)
                raise
            by_key = {self._stream_key(c): c for c in chunk}
            read = 0
            for key, entries in response or ():
                channel = by_key.get(_text(key))
                if channel is not None and entries:
                    read += len(entries)
                    self._handle(channel, entries)
                    cursor = self._cursors.get(channel)
                    if cursor is not None and (
                        len(entries) >= self.read_count
                        or cursor[1] < _offset(entries[-1][0])
                    ):
                        self._pending.add(channel)  # more may be there
            if read >= _YIELD_AFTER:
                runtime.current().sleep(0)

    def _epoch_changed(self, channel, cursor, epoch):
        self.stats["epoch_changes"] += 1
        log.warning(
            "the history of %r was lost in Redis (epoch %s -> %s; last offset "
            "delivered %d): messages published before the loss and not yet "
            "received here are gone; delivering the new epoch's messages",
            channel,
            cursor[0],
            epoch,
            cursor[1],
        )
        self._cursors[channel] = [epoch, 0]
        self.report_gap(channel, "history lost (new epoch)")

    def _handle(self, channel, entries):
        """Deliver ``channel``'s entries, checking each against its cursor."""
        handled = 0
        for entry_id, flat in entries:
            cursor = self._cursors.get(channel)
            if cursor is None:
                return handled  # unsubscribed (or not yet positioned)
            offset = _offset(entry_id)
            fields = _fields(flat)
            epoch = _text(fields.get(b"e"))
            if cursor[0] is None:
                cursor[0] = epoch
            elif epoch != cursor[0]:
                # The keys were lost and made anew while we were reading:
                # start over from the new epoch's first message.
                self._epoch_changed(channel, cursor, epoch)
                return handled
            if offset <= cursor[1]:
                continue
            if offset > cursor[1] + 1:
                missed = offset - cursor[1] - 1
                self.stats["gaps"] += 1
                self.stats["missed"] += missed
                log.warning(
                    "%d messages on %r (offsets %d-%d) left the history window "
                    "before this process could read them",
                    missed,
                    channel,
                    cursor[1] + 1,
                    offset - 1,
                )
                self.report_gap(channel, f"{missed} messages left the window")
            cursor[1] = offset
            try:
                message = decode_message(fields[b"d"])
            except (KeyError, ValueError) as exc:
                self.stats["undecodable"] += 1
                log.warning("skipped an entry on %r: %s", channel, exc)
                continue
            self.stats["received"] += 1
            handled += 1
            try:
                self._deliver(channel, message, Position(epoch, offset))
            except Exception:
                self.stats["delivery_errors"] += 1
                log.exception("delivering a message on %r failed", channel)
        return handled

    # -- shutting down -------------------------------------------------------

    def close(self, timeout=None):
        """Stop the receiver and close every connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stopping.send(True)
        if not self._wakeup.ready():
            self._wakeup.send(True)
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            notifier.close()
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            with runtime.current().Timeout(timeout or self.socket_timeout, False):
                try:
                    runtime.current().join(receiver)
                except greenlet.GreenletExit:
                    pass
            runtime.current().kill(receiver)
        self._cursors.clear()
        self._close_client()

    def _close_client(self):
        client, self._client = self._client, None
        self._publish_script = None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
