"""The Redis receive path alone: worker CPU per message, stargate against the
redis-py asyncio relay, in the same run.

Every worker of a Redis fan-out reads every message, so its cost per
message is paid once per worker. This measures that part and nothing else:
one receiving process, subscribed to one channel of a private
``redis-server`` (:class:`stargate.testing.redis_server.RedisServer`),
counts messages that this process publishes, 1 KiB text, numbered the way
stargate numbers them. Two receivers, alternated:

``stargate``
    :class:`stargate.backends.redis.RedisBackend` on eventlet: its receiver
    green thread, the sequence check and decoding, up to the ``deliver``
    callback the hub would get (here a counter: the hub's fan-out is
    ``python -m benchmarks floor``'s subject).
``relay``
    what ``python -m benchmarks fanout``'s websockets peer runs per
    worker: ``redis.asyncio`` ``PubSub.listen()``, decoding each message
    for ``websockets.broadcast`` (here to no connection).

Two phases each: ``back to back`` (pipelines of 100 publishes: the receiver
finds many messages per read) and ``one per wake-up`` (one publish every
``--interval`` seconds: a read, a wake-up and a message each time, as in
fanout's paced phase). Each receiver reports its own CPU time
(``getrusage``) from its first message to its last, per message. Both use
redis-py's parser: hiredis when installed (shown in the title).

    python -m benchmarks redis-receive
    python -m benchmarks redis-receive --quick
"""

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time

from benchmarks._harness import ROOT, print_table, ratio, rotate

TITLE = "redis-receive: worker CPU per message on the Redis receive path"
CHANNEL = "bench-receive"
PREFIX = "bench:"
SIZE = 1024
PEERS = ("stargate", "relay")


def _cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _report(started, count):
    print(f"RESULT {(_cpu() - started) / max(count - 1, 1)!r}", flush=True)


def receive_stargate(url, count):
    from stargate import runtime

    green = runtime.use("eventlet")
    green.monkey_patch()
    from stargate.backends.redis import RedisBackend

    done = green.Event()
    state = {"n": 0, "cpu": 0.0}

    def deliver(channel, message, position=None):
        if not state["n"]:
            state["cpu"] = _cpu()
        state["n"] += 1
        if state["n"] == count:
            done.send(None)

    backend = RedisBackend(url, prefix=PREFIX)
    backend.start(deliver)
    backend.subscribe(CHANNEL)
    print("READY", flush=True)
    done.wait()
    _report(state["cpu"], count)
    backend.close()


def receive_relay(url, count):
    import redis.asyncio

    async def main():
        client = redis.asyncio.from_url(url)
        pubsub = client.pubsub()
        await pubsub.subscribe(PREFIX + CHANNEL)
        print("READY", flush=True)
        n, started = 0, 0.0
        async for item in pubsub.listen():
            if item["type"] != "message":
                continue
            if not n:
                started = _cpu()
            data = item["data"][17:]  # past stargate's sequence header
            message = data[1:] if data[:1] == b"b" else data[1:].decode()
            del message  # broadcast(connections, message), to no connection
            n += 1
            if n == count:
                break
        _report(started, count)
        await client.aclose()

    asyncio.run(main())


def publish(url, count, interval):
    """``count`` messages as stargate's publisher frames them."""
    import redis

    client = redis.Redis.from_url(url)
    tag = os.urandom(8)
    payload = b"t" + b"x" * SIZE
    name = (PREFIX + CHANNEL).encode()
    try:
        if not interval:
            for start in range(1, count + 1, 100):
                pipe = client.pipeline(transaction=False)
                for seq in range(start, min(start + 100, count + 1)):
                    pipe.publish(name, b"#" + tag + seq.to_bytes(8, "big") + payload)
                pipe.execute()
            return
        for seq in range(1, count + 1):
            client.publish(name, b"#" + tag + seq.to_bytes(8, "big") + payload)
            time.sleep(interval)
    finally:
        client.close()


def measure(peer, url, count, interval, timeout=120):
    """CPU seconds per message of one receiver process for one phase."""
    command = [sys.executable, "-m", "benchmarks.redis_receive"]
    command += ["--receiver", peer, "--url", url, "--count", str(count)]
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    try:
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError(f"the {peer} receiver did not start")
        publish(url, count, interval)
        line = proc.stdout.readline()
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not line.startswith("RESULT "):
        raise RuntimeError(f"the {peer} receiver did not finish")
    return float(line.split()[1])


def parser_name():
    from redis.utils import HIREDIS_AVAILABLE

    return "hiredis" if HIREDIS_AVAILABLE else "redis-py's Python parser"


def run(*, back_to_back, paced, interval, runs):
    from stargate.testing.redis_server import RedisServer

    phases = [("back to back", back_to_back, 0.0), ("one per wake-up", paced, interval)]
    samples = {(phase, peer): [] for phase, _, _ in phases for peer in PEERS}
    with RedisServer() as redis:
        for r in range(runs):
            for phase, count, gap in phases:
                for peer in rotate(PEERS, r):
                    samples[phase, peer].append(measure(peer, redis.url, count, gap))
    rows = []
    for phase, count, gap in phases:
        sg = statistics.median(samples[phase, "stargate"])
        relay = statistics.median(samples[phase, "relay"])
        label = phase if not gap else f"{phase} ({gap * 1e3:g} ms)"
        rows.append(
            [
                label,
                f"{count:,}",
                f"{sg * 1e6:.1f}",
                f"{relay * 1e6:.1f}",
                ratio(sg, relay),
                " ".join(f"{s * 1e6:.0f}" for s in samples[phase, "stargate"]),
                " ".join(f"{s * 1e6:.0f}" for s in samples[phase, "relay"]),
            ]
        )
    columns = ["phase", "messages", "stargate us", "relay us", "sg/relay"]
    columns += ["stargate runs", "relay runs"]
    print_table(f"{TITLE} ({SIZE} B text, {parser_name()})", columns, rows)
    return samples


def main(argv=None):
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true", help="small counts, 1 run")
    parser.add_argument("--out", default=None, help="(unused: no plot)")
    parser.add_argument("--runs", type=int, default=None, help="rounds (3)")
    parser.add_argument(
        "--interval", type=float, default=0.0005, help="seconds between paced messages"
    )
    parser.add_argument("--receiver", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receiver == "stargate":
        return receive_stargate(args.url, args.count)
    if args.receiver == "relay":
        return receive_relay(args.url, args.count)
    started = time.monotonic()
    run(
        back_to_back=500 if args.quick else 20_000,
        paced=100 if args.quick else 3_000,
        interval=args.interval,
        runs=args.runs or (1 if args.quick else 3),
    )
    print(f"\nredis-receive: done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
