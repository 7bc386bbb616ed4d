"""Broadcast throughput and latency in one server process, against two peers.

N listeners on one server process, each a raw-socket client connection (see
:mod:`benchmarks._client`); the server publishes messages of 32 B, 1 KiB and
64 KiB, text and binary, to clients that did or did not negotiate
permessage-deflate. Three servers, each in its own process, are measured in
the same run, interleaved (the order of the peers rotates every round):

``stargate``
    a ``WebSocketView`` handler ``add_listener()``\\ s to a
    ``WebSocketAwareResource``; ``resource.send(message)`` broadcasts.
``websockets``
    a ``websockets`` asyncio server with ``websockets.broadcast()``.
``eventlet``
    ``eventlet.websocket.WebSocketWSGI`` and ``for ws in sockets:
    ws.send(message)``, what the original stack did.

Two phases per case:

* **burst**: ``M`` messages back to back; deliveries per second = messages
  received by all listeners / (last arrival at any listener - first publish);
* **paced**: ``L`` messages at the same interval for every peer, twice the
  per-message time of the slowest peer's burst (so no peer is past half its
  capacity), but at most 0.25 s (0.05 s with ``--quick``); broadcast
  latency = arrival at the *last* listener - publish time, p50 and p99 over
  every paced message of every round.

    python -m benchmarks broadcast            # N = 100, 1,000, 10,000
    python -m benchmarks broadcast --quick    # N = 20, 50; seconds
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
    fmt_rate,
    measure_round,
    new_samples,
    print_table,
    pyplot,
    raise_nofile,
    ratio,
    run_phase,
    summarize,
)

PEERS = ("stargate", "websockets", "eventlet")
SIZES = (32, 1024, 65536)
QUICK_SIZES = (32, 1024)
TITLE = "broadcast: deliveries/s and latency, one server process"


def size_label(size):
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def burst_count(n, size, quick):
    """Messages per burst: enough to time, bounded in bytes on the wire."""
    budget = (32 if quick else 600) * 2**20
    cap, floor = (5, 2) if quick else (30, 3)
    return max(floor, min(cap, budget // (n * (size + 14))))


def run(
    listener_counts,
    *,
    quick,
    rounds,
    paced,
    out,
    sizes=None,
    compressions=(False, True),
    peers=PEERS,
):
    raise_nofile()
    sizes = sizes or (QUICK_SIZES if quick else SIZES)
    results = []
    for n in listener_counts:
        servers = {}
        try:
            for peer in peers:
                servers[peer] = ServerProcess(peer)
            for compress in compressions:
                results += _run_case(
                    servers,
                    n,
                    compress,
                    sizes=sizes,
                    quick=quick,
                    rounds=rounds,
                    paced=paced,
                    peers=peers,
                )
                if not quick:  # a long run shows its progress
                    report(results[-len(sizes) * 2 :], peers)
        finally:
            for server in servers.values():
                server.stop()
    report(results, peers)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "broadcast.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, out, peers)
    return results


def _run_case(servers, n, compress, *, sizes, quick, rounds, paced, peers=PEERS):
    pools = {}
    try:
        for peer in peers:
            pools[peer] = ClientPool(servers[peer].port, n, compress=compress)
            opened, failed, seconds, _ = pools[peer].connect(timeout=120)
            if failed:
                print(f"  {peer}: {failed} of {n} connections failed")
            # Warm-up: one message, so every path is hot and every listener set.
            run_phase(servers[peer], pools[peer], count=1, size=32, binary=False)
        cases = {}
        for r in range(rounds):
            for size in sizes:
                for binary in (False, True):
                    count = burst_count(n, size, quick)
                    measure_round(
                        servers,
                        pools,
                        peers,
                        cases.setdefault((size, binary), new_samples(peers)),
                        r + size + binary,
                        burst=count,
                        paced=paced,
                        size=size,
                        binary=binary,
                        timeout=30 + count * n * size / 20e6,
                        max_interval=0.05 if quick else 0.25,
                    )
        rows = []
        for (size, binary), samples in cases.items():
            row = {"n": n, "size": size, "binary": binary, "compress": compress}
            row.update(summarize(samples))
            rows.append(row)
        return rows
    finally:
        for pool in pools.values():
            pool.close()


def _compared(peers):
    """``(base, the others)``: every peer is compared with websockets."""
    base = "websockets" if "websockets" in peers else None
    return base, ([p for p in peers if p != base] if base else [])


def report(results, peers=PEERS):
    base, compared = _compared(peers)
    columns = ["N", "message", "deflate"]
    columns += [f"{p} /s" for p in peers]
    columns += [f"{p}/ws" for p in compared] + ["delivered", "loadgen cores"]
    rows = []
    for r in results:
        rows.append(
            [
                f"{r['n']:,}",
                f"{size_label(r['size'])} {'bin' if r['binary'] else 'text'}",
                "yes" if r["compress"] else "no",
                *(fmt_rate(r[p]["rate"]) for p in peers),
                *(ratio(r[p]["rate"], r[base]["rate"]) for p in compared),
                f"{min(r[p]['delivered'] for p in peers):.0%}",
                f"{max(r[p]['client_cores'] for p in peers):.2f}",
            ]
        )
    print_table(f"{TITLE}: deliveries per second (burst)", columns, rows)
    columns = ["N", "message", "deflate"]
    for p in peers:
        columns += [f"{p} p50", "p99"]
    columns += [f"p99 {p}/ws" for p in compared]
    rows = []
    for r in results:
        row = [
            f"{r['n']:,}",
            f"{size_label(r['size'])} {'bin' if r['binary'] else 'text'}",
            "yes" if r["compress"] else "no",
        ]
        for p in peers:
            row += [fmt_ms(r[p]["p50"]), fmt_ms(r[p]["p99"])]
        row += [ratio(r[p]["p99"], r[base]["p99"]) for p in compared]
        rows.append(row)
    print_table(
        "broadcast latency, publish -> last listener, ms (paced phase)", columns, rows
    )


def plot(results, out, peers=PEERS):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(SIZES), figsize=(15, 4.5), squeeze=False)
    for ax, size in zip(axes[0], SIZES):
        if not any(r["size"] == size for r in results):
            ax.set_visible(False)
            continue
        for i, peer in enumerate(peers):
            for compress, style in ((False, "o-"), (True, "x--")):
                rows = [
                    r
                    for r in results
                    if r["size"] == size
                    and not r["binary"]
                    and r["compress"] == compress
                ]
                if not rows:
                    continue
                ax.plot(
                    [r["n"] for r in rows],
                    [r[peer]["rate"] for r in rows],
                    style,
                    color=f"C{i}",
                    label=f"{peer}{' deflate' if compress else ''}",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("listeners")
        ax.set_ylabel("deliveries/s")
        ax.set_title(f"{size_label(size)} text messages")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "broadcast_throughput.png"), dpi=110)
    plt.close(fig)

    counts = sorted({r["n"] for r in results})
    fig, axes = plt.subplots(
        1, len(counts), figsize=(5 * len(counts), 4.5), squeeze=False
    )
    for ax, n in zip(axes[0], counts):
        size = 1024 if any(r["size"] == 1024 for r in results) else results[0]["size"]
        rows = [
            r for r in results if r["n"] == n and r["size"] == size and not r["binary"]
        ]
        labels, p50s, p99s = [], [], []
        for r in rows:
            for peer in peers:
                labels.append(f"{peer}\n{'deflate' if r['compress'] else 'plain'}")
                p50s.append(r[peer]["p50"] * 1e3)
                p99s.append(r[peer]["p99"] * 1e3)
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], p50s, width=0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], p99s, width=0.4, label="p99")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("ms, publish -> last listener")
        ax.set_title(f"{size_label(size)} text, N={n:,}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "broadcast_latency.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for plots")
    parser.add_argument(
        "--listeners",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="comma-separated listener counts (100,1000,10000)",
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="comma-separated message sizes in bytes (32,1024,65536)",
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--paced", type=int, default=None, help="paced messages")
    parser.add_argument(
        "--peers",
        type=lambda s: tuple(s.split(",")),
        default=PEERS,
        help="comma-separated server kinds (" + ",".join(PEERS) + ")",
    )
    args = parser.parse_args(argv)
    counts = args.listeners or ([20, 50] if args.quick else [100, 1000, 10000])
    rounds = args.rounds or (1 if args.quick else 2)
    paced = args.paced or (3 if args.quick else 20)
    start = time.monotonic()
    run(
        counts,
        quick=args.quick,
        rounds=rounds,
        paced=paced,
        out=args.out,
        sizes=args.sizes,
        peers=args.peers,
    )
    print(f"\nbroadcast: done in {time.monotonic() - start:.0f} s; plots in {args.out}")


if __name__ == "__main__":
    main()
