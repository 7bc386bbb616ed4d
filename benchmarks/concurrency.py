"""Many concurrent connections: connect them all, broadcast once, count.

Two cases, each for stargate and for a ``websockets`` peer in the same run:

* 10,000 connections on one worker process (in-memory backend; the peer is
  one ``websockets`` asyncio process with ``websockets.broadcast()``);
* 50,000 across 4 worker processes, through a private Redis
  (``stargate.backend = redis://...``; the peer relays through redis-py's
  asyncio pub/sub, see :mod:`benchmarks.fanout`).

For each: the time to open every connection (handshake done and the
listener registered), the time from publishing one message to its arrival
at the last listener, whether every listener received it, and the servers'
RSS (all worker processes).

    python -m benchmarks concurrency            # 10,000 and 50,000
    python -m benchmarks concurrency --quick    # 200 and 400
"""

import argparse
import json
import os
import time

from benchmarks._harness import (
    DEFAULT_OUT,
    ClientPool,
    ServerProcess,
    fmt_ms,
    print_table,
    raise_nofile,
    ratio,
    run_phase,
)

PEERS = ("stargate", "websockets")
TITLE = "concurrency: connect all, broadcast one message, check every one got it"


def measure(peer, n, workers, redis_url):
    with ServerProcess(peer, workers=workers, redis=redis_url) as server:
        with ClientPool(server.port, n, per_process=5000) as pool:
            opened, failed, seconds, _ = pool.connect(timeout=300)
            # Every worker subscribed? (Redis subscriptions are asynchronous.)
            for _ in range(5):
                warm = run_phase(
                    server, pool, count=1, size=32, binary=False, timeout=20
                )
                if warm["received"] == opened:
                    break
            m = run_phase(server, pool, count=1, size=1024, binary=False, timeout=60)
            rss = server.rss()
    return {
        "peer": peer,
        "n": n,
        "workers": workers,
        "opened": opened,
        "failed": failed,
        "connect_s": seconds,
        "broadcast_s": m["latencies"][0] if m["latencies"] else float("nan"),
        "received": m["received"],
        "rss": rss,
    }


def run(cases, *, out):
    from stargate.testing.redis_server import RedisServer

    raise_nofile()
    results = []
    with RedisServer() as redis:
        for i, (n, workers) in enumerate(cases):
            url = redis.url if workers > 1 else None
            order = PEERS if i % 2 == 0 else PEERS[::-1]
            row = {"n": n, "workers": workers}
            for peer in order:
                row[peer] = measure(peer, n, workers, url)
            results.append(row)
    report(results)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "concurrency.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def report(results):
    columns = ["N", "workers", "server", "connected", "connect s", "broadcast ms"]
    columns += ["received", "RSS MiB", "RSS sg/ws"]
    rows = []
    for r in results:
        for peer in PEERS:
            m = r[peer]
            rows.append(
                [
                    f"{r['n']:,}",
                    r["workers"],
                    peer,
                    f"{m['opened']:,}",
                    f"{m['connect_s']:.1f}",
                    fmt_ms(m["broadcast_s"]),
                    f"{m['received']:,}"
                    + (" (all)" if m["received"] == r["n"] else " (MISSING)"),
                    f"{m['rss'] / 2**20:.0f}",
                    ratio(r["stargate"]["rss"], r["websockets"]["rss"])
                    if peer == "stargate"
                    else "",
                ]
            )
    print_table(TITLE, columns, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true", help="200 and 400 conns")
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for results")
    args = parser.parse_args(argv)
    cases = [(200, 1), (400, 2)] if args.quick else [(10_000, 1), (50_000, 4)]
    start = time.monotonic()
    run(cases, out=args.out)
    print(f"\nconcurrency: done in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
