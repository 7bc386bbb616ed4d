"""Delivery latency while many channels are subscribed, on the Redis backend.

A worker's receiver and presence green threads work for every subscribed
channel: the presence heartbeat rewrites each channel's count once per
``presence_ttl / 3``. This measures whether that shows in delivery: one
process (a hub on ``redis://``, a private ``redis-server``) listens on
``/c0`` and on N - 1 quiet channels, each with a listener; another process
publishes on ``/c0`` at a steady rate, each message carrying its publish
time (``time.monotonic``, one clock for every process of the machine). The
peer is the same worker with 10 channels, in the same run, on the same
Redis. ``presence_ttl`` is 3 s here, so a heartbeat of every channel comes
every second (30 s, every 10 s, by default): a periodic stall would show in
the maximum and in the count of messages over 20 ms. A third row runs the
N-channel worker with ``gc.freeze()`` after subscribing, which keeps the
channels' objects out of CPython's full collections: the difference is what
those collections cost delivery.

    python -m benchmarks channels            # N = 4,000 against 10; 15 s each
    python -m benchmarks channels --quick    # N = 400 against 10; 3 s each
    python -m benchmarks channels --backend streams -n 10000
    python -m benchmarks channels --backend cluster

``--backend streams`` runs the same on ``redis+streams://``, which keeps no
presence: its periodic work is the read of every subscribed channel's head
once per ``block`` seconds (``--block``, 1 s here against 10 s by default),
and a notification per message followed by an ``XREAD`` of the channels
that were notified. It shows whether reading grows with subscribed channels
or only with active ones.

``--backend cluster`` runs the pub/sub backend on a private 3-master
cluster (``redis+cluster://``, sharded pub/sub), where each heartbeat
writes the counts grouped by the master that owns each key. With presence
(redis and cluster), each row also gives the longest heartbeat: the
presence green thread's wall time to write every channel's count
(delivery goes on between its round trips) and the most round trips one
took.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time

from benchmarks._harness import (
    DEFAULT_OUT,
    ROOT,
    fmt_ms,
    percentile,
    print_table,
    raise_nofile,
    ratio,
)

TITLE = "channels: delivery latency with many channels subscribed"
BACKENDS = ("redis", "streams", "cluster")
BLOCK = 1.0
BUSY = "/c0"
PRESENCE_TTL = 3.0
SLOW = 0.020  # seconds: a delivery slower than this counts as stalled


def _prefix(n):
    return f"bench-channels-{n}:"


# -- the listening worker (a child process) ---------------------------------


def _backend(kind, url, n, presence_ttl=PRESENCE_TTL, block=BLOCK):
    """The backend under test, on the private Redis at ``url``."""
    if kind == "streams":
        from stargate.backends.redis_streams import RedisStreamsBackend

        streams_url = url.replace("redis://", "redis+streams://", 1)
        return RedisStreamsBackend(streams_url, prefix=_prefix(n), block=block)
    from stargate.backends.redis import RedisBackend

    return RedisBackend(url, presence_ttl=presence_ttl, prefix=_prefix(n))


def listen(
    url, n, seconds, presence_ttl=PRESENCE_TTL, freeze=False, kind="redis", block=BLOCK
):
    import eventlet

    eventlet.monkey_patch()
    import eventlet.event
    from redis.connection import Connection

    from stargate.backends.redis import connect_client
    from stargate.hub import Hub

    class Counted(Connection):
        """Counts round trips: packed writes, one per command sent alone
        and one per pipeline."""

        writes = 0

        def send_packed_command(self, command, check_health=True):
            Counted.writes += 1
            super().send_packed_command(command, check_health)

    class Recorder:
        """The busy channel's listener: latency of each message."""

        def __init__(self):
            self.latencies = []
            self.done = eventlet.event.Event()

        def send(self, message):
            now = time.monotonic()
            if message == "end":
                if not self.done.ready():
                    self.done.send(None)
                return
            self.latencies.append(now - float(message))

    class Quiet:
        """A listener of a quiet channel: nothing is published there."""

        def send(self, message):
            pass

    backend = _backend(kind, url, n, presence_ttl, block)
    beats = []
    if kind != "streams":
        # Measured from outside, through the backend's private parts: its
        # client, made the way it makes it but counting round trips, and
        # the wall time and round trips of each write of every channel's
        # count (a heartbeat).
        backend._client = connect_client(
            backend._client_url,
            cluster=backend.cluster,
            max_connections=backend.max_connections,
            socket_timeout=backend.socket_timeout,
            client_name=backend.client_name,
            connection_class=Counted,
        )
        write_counts = backend._write_counts

        def timed_write_counts(channels):
            begin, writes = time.monotonic(), Counted.writes
            try:
                return write_counts(channels)
            finally:
                if len(channels) >= n:
                    beats.append((time.monotonic() - begin, Counted.writes - writes))

        backend._write_counts = timed_write_counts
    hub = Hub(backend)
    recorder = Recorder()
    start = time.monotonic()
    hub.add(BUSY, recorder)
    quiet = Quiet()
    pool = eventlet.GreenPool(50)
    for i in range(1, n):
        pool.spawn_n(hub.add, f"/c{i}", quiet)
    pool.waitall()
    deadline = time.monotonic() + 120
    while _subscribed(url, f"{_prefix(n)}*") < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"{n} channels not subscribed within 120 s")
        eventlet.sleep(0.05)
    subscribed = time.monotonic() - start
    heartbeats = backend.stats.get("heartbeats", 0)
    del beats[:]
    if freeze:
        # What is alive now (the channels' objects) is left out of every
        # later collection: CPython's full collections walk every tracked
        # object, and 4,000 channels' worth of them shows in delivery.
        gc.collect()
        gc.freeze()
    print("ready", flush=True)
    recorder.done.wait(seconds + 60)
    result = {
        "n": n,
        "subscribe_s": subscribed,
        "heartbeats": backend.stats.get("heartbeats", 0) - heartbeats,
        "presence_failures": backend.stats.get("presence_failures", 0),
        "kind": kind,
        "latencies": recorder.latencies,
        "beat_max": max((t for t, _ in beats), default=float("nan")),
        "beat_trips": max((w for _, w in beats), default=0),
    }
    print(json.dumps(result), flush=True)
    hub.close()


def _subscribed(url, pattern):
    """Channels matching ``pattern`` that Redis has subscribers for, on a
    server or on every master of a cluster (sharded channels)."""
    import redis
    from redis.cluster import RedisCluster

    if "+cluster://" not in url:
        with redis.Redis.from_url(url, socket_timeout=5) as client:
            return len(client.pubsub_channels(pattern))
    url = url.replace("+cluster://", "://")
    with RedisCluster.from_url(url, socket_timeout=5) as client:
        return sum(
            len(node.redis_connection.pubsub_shardchannels(pattern))
            for node in client.get_primaries()
        )


# -- the publisher (a child process) ------------------------------------------


def publish(url, n, rate, seconds, kind="redis"):
    import eventlet

    eventlet.monkey_patch()
    backend = _backend(kind, url, n)
    backend.start(lambda *args: None)
    interval = 1.0 / rate
    begin = time.monotonic()
    for i in range(int(rate * seconds)):
        delay = begin + i * interval - time.monotonic()
        if delay > 0:
            eventlet.sleep(delay)
        backend.publish(BUSY, repr(time.monotonic()))
    backend.publish(BUSY, "end")
    backend.close()


# -- the run --------------------------------------------------------------------


def _child(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.channels", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def measure(
    url, n, rate, seconds, presence_ttl, freeze=False, kind="redis", block=BLOCK
):
    listener = _child(
        "--role", "listen", "--url", url, "-n", n, "--seconds", seconds,
        "--presence-ttl", presence_ttl, "--backend", kind, "--block", block,
        *(["--gc-freeze"] if freeze else []),
    )  # fmt: skip
    try:
        line = listener.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"the listening worker for N={n} said {line!r}")
        publisher = _child(
            "--role", "publish", "--url", url, "-n", n, "--rate", rate,
            "--seconds", seconds, "--backend", kind,
        )  # fmt: skip
        publisher.wait(timeout=seconds + 60)
        result = json.loads(listener.stdout.readline())
        result["freeze"] = freeze
        listener.wait(timeout=30)
    finally:
        for process in (listener,):
            if process.poll() is None:
                process.kill()
                process.wait()
    latencies = result.pop("latencies")
    result.update(
        expected=int(rate * seconds),
        received=len(latencies),
        p50=percentile(latencies, 50),
        p99=percentile(latencies, 99),
        p999=percentile(latencies, 99.9),
        max=max(latencies) if latencies else float("nan"),
        slow=sum(1 for value in latencies if value > SLOW),
    )
    return result


def run(
    sizes, rate, seconds, out, presence_ttl=PRESENCE_TTL, kind="redis", block=BLOCK
):
    from stargate.testing.redis_server import RedisCluster, RedisServer

    raise_nofile()
    with RedisCluster() if kind == "cluster" else RedisServer() as server:
        results = [
            measure(server.url, n, rate, seconds, presence_ttl, freeze, kind, block)
            for n, freeze in sizes
        ]
    report(results, rate, seconds, presence_ttl, kind, block)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "channels.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def report(results, rate, seconds, presence_ttl, kind="redis", block=BLOCK):
    peer = results[0]
    columns = ["channels", "subscribe s", "received", "heartbeats"]
    if kind != "streams":
        columns += ["beat ms", "beat trips"]
    columns += ["p50 ms", "p99 ms", "p99.9 ms", "max ms", f">{SLOW * 1e3:.0f} ms"]
    columns += ["p99 /peer", "max /peer"]
    rows = [
        [
            f"{r['n']:,}{' gc.freeze' if r['freeze'] else ''}",
            f"{r['subscribe_s']:.2f}",
            f"{r['received']:,}/{r['expected']:,}",
            r["heartbeats"],
            *([] if kind == "streams" else [fmt_ms(r["beat_max"])]),
            *([] if kind == "streams" else [f"{r['beat_trips']:,}"]),
            fmt_ms(r["p50"]),
            fmt_ms(r["p99"]),
            fmt_ms(r["p999"]),
            fmt_ms(r["max"]),
            r["slow"],
            ratio(r["p99"], peer["p99"]),
            ratio(r["max"], peer["max"]),
        ]
        for r in results
    ]
    if kind == "streams":
        periodic = f"every channel's head read every {block:g} s"
    else:
        periodic = (
            f"presence heartbeat every {presence_ttl / 3:g} s (beat: the "
            "longest, its time and round trips)"
        )
    schemes = {"streams": "redis+streams://", "cluster": "3-master redis+cluster://"}
    scheme = schemes.get(kind, "redis://")
    print_table(
        f"{TITLE} ({scheme}): {rate}/s on one channel for {seconds} s, {periodic}",
        columns,
        rows,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true", help="N = 400, 3 s")
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for JSON")
    parser.add_argument("--role", choices=["listen", "publish"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, default=None, help="channels (4000)")
    parser.add_argument("--rate", type=int, default=500, help="messages/s (500)")
    parser.add_argument("--seconds", type=float, default=None, help="(15)")
    parser.add_argument("--presence-ttl", type=float, default=PRESENCE_TTL)
    parser.add_argument("--gc-freeze", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=BACKENDS, default="redis", help="(redis)")
    parser.add_argument(
        "--block", type=float, default=BLOCK, help="streams: head reads every (1 s)"
    )
    args = parser.parse_args(argv)
    seconds = args.seconds or (3.0 if args.quick else 15.0)
    if args.role == "listen":
        listen(
            args.url, args.n, seconds, args.presence_ttl, args.gc_freeze,
            args.backend, args.block,
        )  # fmt: skip
        return 0
    if args.role == "publish":
        publish(args.url, args.n, args.rate, seconds, args.backend)
        return 0
    n = args.n or (400 if args.quick else 4000)
    sizes = [(10, False), (n, False), (n, True)]
    run(
        sizes, args.rate, seconds, args.out, args.presence_ttl, args.backend, args.block
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
