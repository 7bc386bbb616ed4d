"""The cost of history: the Redis Streams backend against Redis pub/sub.

One private ``redis-server`` (never one on 6379) carries both peers, measured
in the same run, interleaved (each round alternates which goes first):

``pubsub``
    ``stargate.factory.serve(app, workers=W)`` with ``stargate.backend =
    redis://<private>``: PUBLISH, one SUBSCRIBE connection per worker; no
    history, a disconnected worker misses messages.
``streams``
    the same application with ``stargate.backend = redis+streams://<private>``:
    one script call (HINCRBY + XADD MAXLEN ~ + PEXPIRE) per message, one
    blocking XREAD per worker; history of 1,000 messages per channel, a
    worker catches up after a disconnection, clients can resume.

N listeners (raw-socket clients, :mod:`benchmarks._client`) spread over the
workers by the kernel. A burst of M messages gives deliveries per second; a
paced phase (same interval for both) gives the fan-out latency from publish
to the last listener, p50 and p99; each server's CPU per message and per
worker, net of its idle CPU, is measured as in :mod:`benchmarks.fanout`.

    python -m benchmarks.history            # N = 1,000; W = 1, 2; 3 rounds
    python -m benchmarks.history --quick    # N = 20; W = 1; 1 round
"""

import argparse
import json
import os

from benchmarks._harness import (
    DEFAULT_OUT,
    ServerProcess,
    fmt_ms,
    fmt_rate,
    measure_across_workers,
    print_table,
    raise_nofile,
    ratio,
)

PEERS = ("pubsub", "streams")
TITLE = "history: Redis Streams (with history) against Redis pub/sub"
SIZE = 256


def run(workers_list, n, *, rounds, burst, paced, out):
    from stargate.testing.redis_server import RedisServer

    raise_nofile()
    with RedisServer() as redis:
        urls = {
            "pubsub": redis.url,
            "streams": redis.url.replace("redis://", "redis+streams://"),
        }

        def start_server(peer, workers):
            return ServerProcess("stargate", workers=workers, redis=urls[peer])

        results = measure_across_workers(
            workers_list,
            n,
            PEERS,
            start_server,
            rounds=rounds,
            burst=burst,
            paced=paced,
            size=SIZE,
        )
    report(results)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def report(results):
    columns = ["workers", "N"]
    for p in PEERS:
        columns += [f"{p} /s", "p50 ms", "p99 ms"]
    columns += ["rate st/ps", "p50 st/ps", "p99 st/ps", "delivered"]
    columns += [f"{p} CPU us/msg/worker" for p in PEERS] + ["CPU st/ps"]
    rows = []
    for r in results:
        row = [r["workers"], f"{r['n']:,}"]
        for p in PEERS:
            row += [fmt_rate(r[p]["rate"]), fmt_ms(r[p]["p50"]), fmt_ms(r[p]["p99"])]
        row += [
            ratio(r["streams"]["rate"], r["pubsub"]["rate"]),
            ratio(r["streams"]["p50"], r["pubsub"]["p50"]),
            ratio(r["streams"]["p99"], r["pubsub"]["p99"]),
            f"{min(r[p]['delivered'] for p in PEERS):.0%}",
        ]
        row += [f"{r[p].get('cpu_per_message', 0) * 1e6:,.1f}" for p in PEERS]
        row.append(
            ratio(
                r["streams"].get("cpu_per_message", 0),
                r["pubsub"].get("cpu_per_message", 0),
            )
        )
        rows.append(row)
    print_table(f"{TITLE} ({SIZE} B text messages)", columns, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument(
        "--quick", action="store_true", help="N = 20, one worker, one round"
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for JSON")
    parser.add_argument("--listeners", type=int, default=None, help="N (1000)")
    parser.add_argument(
        "--workers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="comma-separated worker counts (1,2)",
    )
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    n = args.listeners or (20 if args.quick else 1000)
    rounds = args.rounds or (1 if args.quick else 3)
    workers = args.workers or ([1] if args.quick else [1, 2])
    burst, paced = (200, 100) if args.quick else (1000, 300)
    run(workers, n, rounds=rounds, burst=burst, paced=paced, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
