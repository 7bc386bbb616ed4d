"""Memory per idle connection: stargate against the same peers as broadcast.

For each server (``stargate`` with its blocking handler, ``stargate-kept``
with a ``keep_open`` view whose connections the hub holds without a green
thread, ``websockets``, ``eventlet``; see :mod:`benchmarks._servers`), in a
fresh process: connect 10 listeners and
broadcast once (so lazily imported code and first-use caches are in
place), read the server's RSS, connect N more idle listeners, wait a
second, read the RSS again. Memory per connection = (after - before) / N.
Clients that offer permessage-deflate and clients that do not are measured
apart. Peers are interleaved and their order rotates every round; the table
shows the median over rounds.

    python -m benchmarks memory            # N = 1,000 and 10,000
    python -m benchmarks memory --quick    # N = 100
    python -m benchmarks memory --peers stargate,gunicorn-gevent,websockets
    python -m benchmarks.memory --connections 500,1000,2000,5000,10000 \
        --deflate no --plot memory.png

``--peers`` picks the servers (any kind of :mod:`benchmarks._servers`);
every one is compared with ``websockets`` when it is among them.
``--deflate no`` (or ``yes``) measures one kind of client only; ``--plot
PATH`` also draws KiB per connection against N, one line per peer, which
shows where the figure settles (and memory grows linearly with N).
"""

import argparse
import json
import os
import statistics
import time

from benchmarks._harness import (
    DEFAULT_OUT,
    ClientPool,
    ServerProcess,
    count_axis,
    print_table,
    pyplot,
    raise_nofile,
    ratio,
    rotate,
    run_phase,
    save_small,
)

PEERS = ("stargate", "stargate-kept", "websockets", "eventlet")
#: How the plot against N names the kinds that hold connections in
#: different ways.
LABELS = {
    "stargate": "stargate, blocking handler",
    "stargate-kept": "stargate, keep_open",
    "stargate-own": "stargate, own_green_thread",
    "stargate-gevent": "stargate-gevent, blocking handler",
    "stargate-gevent-kept": "stargate-gevent, keep_open",
    "stargate-gevent-own": "stargate-gevent, own_green_thread",
}
TITLE = "memory: server RSS per idle connection"
WARM = 10


def measure(peer, n, compress, settle=1.0):
    """Bytes of server RSS per idle connection, for one fresh server."""
    with ServerProcess(peer) as server:
        with ClientPool(server.port, WARM, compress=compress) as warm:
            warm.connect(timeout=30)
            run_phase(server, warm, count=1, size=32, binary=False)
            time.sleep(0.3)
            before = server.rss()
            with ClientPool(server.port, n, compress=compress) as pool:
                opened, failed, _, _ = pool.connect(timeout=120)
                time.sleep(settle)
                after = server.rss()
    return {"per_conn": (after - before) / max(opened, 1), "open": opened}


def run(
    counts,
    *,
    rounds,
    out,
    settle=1.0,
    compressions=(False, True),
    peers=PEERS,
    plot_path=None,
):
    raise_nofile()
    samples = {}
    for r in range(rounds):
        for n in counts:
            for compress in compressions:
                for peer in rotate(peers, r + compress):
                    m = measure(peer, n, compress, settle)
                    samples.setdefault((n, compress, peer), []).append(m)
    results = []
    for n in counts:
        for compress in compressions:
            row = {"n": n, "compress": compress}
            for peer in peers:
                ms = samples[(n, compress, peer)]
                row[peer] = statistics.median(m["per_conn"] for m in ms)
                row[f"{peer}_open"] = min(m["open"] for m in ms)
            results.append(row)
    report(results, peers)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "memory.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, out, peers)
    if plot_path:
        plot_against_count(results, plot_path, peers, rounds=rounds)
    return results


def report(results, peers=PEERS):
    base = "websockets" if "websockets" in peers else None
    compared = [p for p in peers if p != base] if base else []
    columns = ["N", "deflate"] + [f"{p} KiB/conn" for p in peers]
    columns += [f"{p}/ws" for p in compared] + ["connected"]
    rows = []
    for r in results:
        rows.append(
            [
                f"{r['n']:,}",
                "yes" if r["compress"] else "no",
                *(f"{r[p] / 1024:.1f}" for p in peers),
                *(ratio(r[p], r[base]) for p in compared),
                "/".join(f"{r[f'{p}_open']}" for p in peers),
            ]
        )
    print_table(TITLE, columns, rows)


def plot(results, out, peers=PEERS):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [
        f"N={r['n']:,}\n{'deflate' if r['compress'] else 'plain'}" for r in results
    ]
    width = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        ax.bar(
            [x + (i - (len(peers) - 1) / 2) * width for x in range(len(results))],
            [r[peer] / 1024 for r in results],
            width=width,
            label=peer,
        )
    ax.set_xticks(list(range(len(results))))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("server RSS per idle connection (KiB)")
    ax.set_title(TITLE)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "memory.png"), dpi=110)
    plt.close(fig)


def plot_against_count(results, path, peers=PEERS, *, rounds):
    """KiB per idle connection against N (log N), one line per peer (dashed
    with permessage-deflate), to ``path``: where the figure settles, memory
    grows linearly with the connections."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.8, 4))
    counts = sorted({r["n"] for r in results})
    compressions = sorted({r["compress"] for r in results})
    for i, peer in enumerate(peers):
        for compress in compressions:
            rows = sorted(
                (r for r in results if r["compress"] == compress),
                key=lambda r: r["n"],
            )
            ax.plot(
                [r["n"] for r in rows],
                [r[peer] / 1024 for r in rows],
                "x--" if compress else "o-",
                color=f"C{i}",
                label=LABELS.get(peer, peer) + (", deflate" if compress else ""),
            )
    count_axis(ax, counts, "idle connections")
    ax.set_ylabel("server RSS per idle connection (KiB)")
    ax.set_title(
        f"memory per idle connection, median of {rounds} round"
        f"{'s' if rounds > 1 else ''}",
        fontsize=10,
    )
    # Beside the axes: inside, it would hide a line wherever it went.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    save_small(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true", help="N = 100, one round")
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for plots")
    parser.add_argument(
        "--connections",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="comma-separated connection counts (1000,10000)",
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--peers",
        type=lambda s: tuple(s.split(",")),
        default=PEERS,
        help="comma-separated server kinds (" + ",".join(PEERS) + ")",
    )
    parser.add_argument(
        "--deflate",
        choices=["both", "no", "yes"],
        default="both",
        help="clients that offer permessage-deflate, that do not, or both (both)",
    )
    parser.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="also write a PNG of KiB per connection against N",
    )
    args = parser.parse_args(argv)
    compressions = {"both": (False, True), "no": (False,), "yes": (True,)}
    counts = args.connections or ([100] if args.quick else [1000, 10000])
    rounds = args.rounds or (1 if args.quick else 2)
    start = time.monotonic()
    run(
        counts,
        rounds=rounds,
        out=args.out,
        settle=0.3 if args.quick else 1.0,
        peers=args.peers,
        compressions=compressions[args.deflate],
        plot_path=args.plot,
    )
    print(f"\nmemory: done in {time.monotonic() - start:.0f} s; plots in {args.out}")


if __name__ == "__main__":
    main()
