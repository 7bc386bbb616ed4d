"""Fan-out through Redis across 1, 2 and 4 worker processes.

A private ``redis-server`` (:class:`stargate.testing.redis_server.RedisServer`;
never one on 6379) carries every message. Two servers, measured in the same
run, interleaved:

``stargate``
    ``stargate.factory.serve(app, workers=W)`` with ``stargate.backend =
    redis://<private>``: the control connection lands on one worker, whose
    ``resource.send()`` publishes to Redis; every worker delivers to its own
    listeners.
``websockets``
    ``W`` forked processes of a ``websockets`` asyncio server on one shared
    listening socket, each relaying through redis-py's asyncio pub/sub: the
    worker with the control connection publishes, every worker
    ``websockets.broadcast()``\\ s what it receives.

N listeners (raw-socket clients, :mod:`benchmarks._client`) spread over the
workers by the kernel. A burst of M messages gives deliveries per second; a
paced phase (same interval for both peers) gives latency from publish to
the last listener, p50 and p99. Each server's CPU time (its process and its
workers, in nanoseconds from ``/proc``) over the measurement, less what it
spends idle over the same time (measured for 2 s before, and shown beside
it), per message and per worker, says what every added worker costs each
message.

    python -m benchmarks fanout            # N = 2,000; W = 1, 2, 4
    python -m benchmarks fanout --quick    # N = 20
    python -m benchmarks fanout --peers stargate,gunicorn-gevent,websockets

``--peers`` picks the servers (kinds of :mod:`benchmarks._servers` that take
``--redis``); each is compared with ``websockets`` in the same run.
"""

import argparse
import json
import os
import time

from benchmarks._harness import (
    DEFAULT_OUT,
    ServerProcess,
    fmt_ms,
    fmt_rate,
    measure_across_workers,
    print_table,
    pyplot,
    raise_nofile,
    ratio,
)

PEERS = ("stargate", "websockets")
TITLE = "fanout: broadcast through Redis across worker processes"
SIZE = 1024


def run(workers_list, n, *, rounds, burst, paced, out, peers=PEERS):
    from stargate.testing.redis_server import RedisServer

    raise_nofile()
    with RedisServer() as redis:

        def start_server(peer, workers):
            return ServerProcess(peer, workers=workers, redis=redis.url)

        results = measure_across_workers(
            workers_list,
            n,
            peers,
            start_server,
            rounds=rounds,
            burst=burst,
            paced=paced,
            size=SIZE,
        )
    report(results, peers)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "fanout.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, out, peers)
    return results


def report(results, peers=PEERS):
    base = "websockets" if "websockets" in peers else None
    compared = [p for p in peers if p != base] if base else []
    columns = ["workers", "N"]
    for p in peers:
        columns += [f"{p} /s", "p50 ms", "p99 ms"]
    columns += [f"rate {p}/ws" for p in compared]
    columns += [f"p99 {p}/ws" for p in compared] + ["delivered"]
    columns += [f"{p} CPU us/msg/worker" for p in peers]
    columns += [f"CPU {p}/ws" for p in compared]
    columns += [f"{p} idle ms/s/worker" for p in peers]
    rows = []
    for r in results:
        row = [r["workers"], f"{r['n']:,}"]
        for p in peers:
            row += [fmt_rate(r[p]["rate"]), fmt_ms(r[p]["p50"]), fmt_ms(r[p]["p99"])]
        row += [ratio(r[p]["rate"], r[base]["rate"]) for p in compared]
        row += [ratio(r[p]["p99"], r[base]["p99"]) for p in compared]
        row.append(f"{min(r[p]['delivered'] for p in peers):.0%}")
        row += [f"{r[p].get('cpu_per_message', 0) * 1e6:,.1f}" for p in peers]
        row += [
            ratio(r[p].get("cpu_per_message", 0), r[base].get("cpu_per_message", 0))
            for p in compared
        ]
        row += [f"{r[p].get('idle_cpu', 0) * 1e3:.2f}" for p in peers]
        rows.append(row)
    print_table(f"{TITLE} ({SIZE} B text messages)", columns, rows)


def plot(results, out, peers=PEERS):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    ws = [r["workers"] for r in results]
    for i, peer in enumerate(peers):
        left.plot(
            ws, [r[peer]["rate"] for r in results], "o-", color=f"C{i}", label=peer
        )
        right.plot(
            ws,
            [r[peer]["p50"] * 1e3 for r in results],
            "o-",
            color=f"C{i}",
            label=f"{peer} p50",
        )
        right.plot(
            ws,
            [r[peer]["p99"] * 1e3 for r in results],
            "x--",
            color=f"C{i}",
            label=f"{peer} p99",
        )
    left.set_xlabel("worker processes")
    left.set_ylabel("deliveries/s")
    left.set_title("throughput through Redis")
    left.legend(fontsize=8)
    right.set_xlabel("worker processes")
    right.set_ylabel("ms, publish -> last listener")
    right.set_title("latency through Redis")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(ws)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fanout.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true", help="N = 20, one round")
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for plots")
    parser.add_argument("--listeners", type=int, default=None, help="N (2000)")
    parser.add_argument(
        "--workers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2, 4],
        help="comma-separated worker counts (1,2,4)",
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--peers",
        type=lambda s: tuple(s.split(",")),
        default=PEERS,
        help="comma-separated server kinds (" + ",".join(PEERS) + ")",
    )
    args = parser.parse_args(argv)
    n = args.listeners or (20 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    start = time.monotonic()
    run(
        args.workers,
        n,
        rounds=rounds,
        burst=5 if args.quick else 30,
        paced=3 if args.quick else 20,
        out=args.out,
        peers=args.peers,
    )
    print(f"\nfanout: done in {time.monotonic() - start:.0f} s; plots in {args.out}")


if __name__ == "__main__":
    main()
