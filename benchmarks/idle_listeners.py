"""Many idle listeners in ONE worker process, held the ``keep_open`` way.

For ``stargate-kept`` (a ``keep_open`` view: the hub holds each connection,
no green thread per listener) and a ``websockets`` asyncio process, in the
same run: open N connections, read the server's RSS, broadcast one 1 KiB
message and count who got it.

    python -m benchmarks idle                   # N = 50,000
    python -m benchmarks.idle_listeners --listeners 20000
    python -m benchmarks idle --quick           # N = 500

50,000 connections need 50,000 descriptors in the server process: raise
the hard open-file limit first (as root, ``prlimit --nofile=200000
python -m benchmarks idle``); the run says so when the limit is too low.
"""

import argparse
import time

from benchmarks import _harness as h

PEERS = ("stargate-kept", "websockets")
TITLE = "idle listeners in one process: RSS, and one broadcast to all"


def measure(peer, n):
    with h.ServerProcess(peer) as server:
        base = server.rss()
        with h.ClientPool(server.port, n, per_process=10_000) as pool:
            opened, failed, seconds, _ = pool.connect(timeout=600)
            time.sleep(1.0)
            rss = server.rss()
            m = h.run_phase(server, pool, count=1, size=1024, binary=False, timeout=60)
    return {
        "opened": opened,
        "connect_s": seconds,
        "broadcast_s": m["latencies"][0] if m["latencies"] else float("nan"),
        "received": m["received"],
        "rss": rss,
        "per_conn": (rss - base) / max(opened, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true", help="N = 500")
    parser.add_argument("--out", default=None, help="unused (no plot)")
    parser.add_argument("--listeners", type=int, default=None)
    args = parser.parse_args(argv)
    n = args.listeners or (500 if args.quick else 50_000)
    limit = h.raise_nofile()
    if limit < n + 1000:
        print(
            f"idle: skipped, {n:,} connections need a hard open-file limit above "
            f"{n + 1000:,} (it is {limit:,}): run under prlimit --nofile=200000"
        )
        return
    results = {peer: measure(peer, n) for peer in PEERS}
    rows = []
    for peer in PEERS:
        m = results[peer]
        got = f"{m['received']:,}" + (" (all)" if m["received"] == n else " (MISSING)")
        rows.append(
            [
                f"{n:,}",
                peer,
                f"{m['opened']:,}",
                f"{m['connect_s']:.1f}",
                h.fmt_ms(m["broadcast_s"]),
                got,
                f"{m['rss'] / 2**20:.0f}",
                f"{m['per_conn'] / 1024:.1f}",
            ]
        )
    kept, ws = results["stargate-kept"], results["websockets"]
    columns = ["N", "server", "connected", "connect s", "broadcast ms", "received"]
    columns += ["RSS MiB", "KiB/listener"]
    h.print_table(TITLE, columns, rows)
    print(
        f"RSS stargate-kept/websockets: {h.ratio(kept['rss'], ws['rss'])}, "
        f"per listener {h.ratio(kept['per_conn'], ws['per_conn'])}"
    )


if __name__ == "__main__":
    main()
