"""Benchmarking how dead sockets are pruned.

N listeners on one channel, D of them dead (their peer closed the
connection). Every listener is a real :class:`stargate.connection.WebSocket`
on a real socket: a Unix socketpair (the default) or a loopback TCP
connection (``--transport tcp``, where dead peers close with an RST). The
peer ends live in a helper process, so N can reach 10,000 under a 20,000
file descriptor limit; it closes the D dead ones when told to.

For each (N, D) the script times, through the in-memory backend:

* the first ``send`` after the D peers died, which finds and prunes them;
* later sends (median of ``--repeat``), which meet no dead listener;

and reports both per listener, the extra cost of the first send per dead
listener, a least-squares fit of that extra cost against D for each N (its
slope is the cost of pruning one dead listener; R^2 near 1 means the cost
is proportional to D), and checks that no dead listener is left after one
send. A table goes to stdout and a plot (PNG) to ``--out``.

    python benchmarks/prune_dead.py                 # N up to 10,000
    python benchmarks/prune_dead.py --quick         # a few seconds
"""

import argparse
import gc
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
import warnings

warnings.filterwarnings("ignore", message=r"(?s).*Eventlet is deprecated")

import eventlet.greenio  # noqa: E402

from stargate.backends.memory import MemoryBackend  # noqa: E402
from stargate.connection import WebSocket  # noqa: E402
from stargate.hub import Hub  # noqa: E402
from stargate.protocol import ServerProtocol  # noqa: E402

CHANNEL = "/bench"
MESSAGE = "x" * 64
DEAD_FRACTIONS = (0.0, 0.1, 0.25, 0.5)

# The helper process: holds the peer ends it is sent (SCM_RIGHTS over a
# SOCK_SEQPACKET control socket) and closes the ones it is told to, with an
# RST for TCP (SO_LINGER 0).
PEER_HOLDER = textwrap.dedent(
    """
    import socket, struct, sys
    ctl = socket.socket(fileno=int(sys.argv[1]))
    peers = []
    while True:
        msg, fds, _, _ = socket.recv_fds(ctl, 1 << 20, 250)
        if not msg or msg == b"quit":
            break
        if msg == b"fds":
            peers.extend(socket.socket(fileno=fd) for fd in fds)
        elif msg.startswith(b"close "):
            for index in map(int, msg[6:].split(b",")):
                peer = peers[index]
                if peer.family == socket.AF_INET:
                    linger = struct.pack("ii", 1, 0)
                    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                peer.close()
        elif msg == b"drop":
            for peer in peers:
                if peer.fileno() != -1:
                    peer.close()
            peers = []
        ctl.send(b"ok")
    """
)


class Peers:
    """Client ends of every connection, held by a helper process."""

    def __init__(self):
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen(
            [sys.executable, "-c", PEER_HOLDER, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()

    def _ask(self, message, fds=()):
        socket.send_fds(self.ctl, [message], list(fds))
        assert self.ctl.recv(16) == b"ok"

    def hand_over(self, socks):
        for start in range(0, len(socks), 200):
            batch = socks[start : start + 200]
            self._ask(b"fds", [s.fileno() for s in batch])
            for s in batch:
                s.close()

    def close(self, indices):
        indices = list(indices)
        for start in range(0, len(indices), 2000):
            part = indices[start : start + 2000]
            self._ask(b"close " + ",".join(map(str, part)).encode())

    def drop_all(self):
        self._ask(b"drop")

    def quit(self):
        try:
            self.ctl.send(b"quit")
        except OSError:
            pass
        self.process.wait(timeout=10)


def connect(n, transport, peers):
    """``n`` server-side WebSockets; their peers go to the helper process."""
    websockets = []
    listener = None
    if transport == "tcp":
        listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        port = listener.getsockname()[1]
    for start in range(0, n, 200):
        ours, theirs = [], []
        for _ in range(min(200, n - start)):
            if transport == "tcp":
                client = socket.create_connection(("127.0.0.1", port))
                server, _ = listener.accept()
            else:
                server, client = socket.socketpair()
            ours.append(server)
            theirs.append(client)
        peers.hand_over(theirs)
        for server in ours:
            green = eventlet.greenio.GreenSocket(server)
            websockets.append(WebSocket(green, ServerProtocol(), ping_interval=None))
    if listener is not None:
        listener.close()
    return websockets


def timed_send(hub):
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        hub.publish(CHANNEL, MESSAGE)
        return time.perf_counter() - start
    finally:
        gc.enable()


def run_one(n, d, transport, repeat, peers):
    hub = Hub(MemoryBackend())
    websockets = connect(n, transport, peers)
    for ws in websockets:
        hub.add(CHANNEL, ws)
    dead_indices = range(0, 2 * d, 2)  # every other one, spread over the set
    dead = {websockets[i] for i in dead_indices}
    peers.close(dead_indices)
    if transport == "tcp" and d:
        time.sleep(0.2)  # let the RSTs arrive

    first = timed_send(hub)
    remaining = [ws for ws in hub.listeners(CHANNEL) if ws in dead]
    assert not remaining, f"{len(remaining)} dead listeners survived one send"
    assert hub.stats.pruned_dead == d, hub.stats
    assert hub.listener_count(CHANNEL) == n - d
    later = statistics.median(timed_send(hub) for _ in range(repeat))
    assert hub.stats.pruned_dead == d, "a later send pruned again"

    for ws in websockets:
        ws.abort()
    hub.close()
    peers.drop_all()
    return {
        "n": n,
        "d": d,
        "first": first,
        "later": later,
        "remaining_dead": len(remaining),
        "pruned": hub.stats.pruned_dead,
    }


def fit(points):
    """Least squares y = a + b x; returns (a, b, r2)."""
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0, 1.0
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in points)
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def sizes_for(max_listeners, quick):
    if quick:
        return [n for n in (20, 60) if n <= max_listeners] or [max_listeners]
    candidates = (100, 1000, 3000, 10000)
    sizes = [n for n in candidates if n < max_listeners] + [max_listeners]
    return sorted(set(sizes))


def plot(results, sizes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, n in enumerate(sizes):
        color = f"C{i}"
        rows = [r for r in results if r["n"] == n]
        ds = [r["d"] for r in rows]
        first_ms = [r["first"] * 1e3 for r in rows]
        later_ms = [r["later"] * 1e3 for r in rows]
        left.plot(ds, first_ms, "o-", color=color, label=f"first, N={n}")
        left.plot(ds, later_ms, "x--", color=color, label=f"later, N={n}")
        right.plot(
            [r["d"] / n for r in rows],
            [r["first"] / n * 1e6 for r in rows],
            "o-",
            color=color,
            label=f"N={n}",
        )
    left.set_xlabel("dead listeners D")
    left.set_ylabel("send time (ms)")
    left.set_xscale("symlog", linthresh=10)
    left.set_yscale("log")
    left.set_title("first send (prunes D) vs later sends")
    left.legend(fontsize=7)
    right.set_xlabel("dead fraction D/N")
    right.set_ylabel("first send per listener (µs)")
    right.set_title("per-listener cost of the pruning send")
    right.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-listeners", type=int, default=10000, metavar="N")
    parser.add_argument(
        "--transport", choices=("socketpair", "tcp"), default="socketpair"
    )
    parser.add_argument("--repeat", type=int, default=5, help="later sends timed")
    parser.add_argument(
        "--trials",
        type=int,
        default=3,
        help="fresh runs per (N, D); the table shows their medians",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, for a smoke test"
    )
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "prune_dead.png"),
        help="where to write the plot (PNG)",
    )
    args = parser.parse_args(argv)
    if args.max_listeners < 2:
        parser.error("--max-listeners must be at least 2")

    sizes = sizes_for(args.max_listeners, args.quick)
    peers = Peers()
    results = []
    try:
        for n in sizes:
            for fraction in DEAD_FRACTIONS:
                d = int(n * fraction)
                trials = [
                    run_one(n, d, args.transport, args.repeat, peers)
                    for _ in range(1 if args.quick else args.trials)
                ]
                results.append(
                    {
                        "n": n,
                        "d": d,
                        "first": statistics.median(t["first"] for t in trials),
                        "later": statistics.median(t["later"] for t in trials),
                        "remaining_dead": max(t["remaining_dead"] for t in trials),
                    }
                )
    finally:
        peers.quit()

    print(
        f"prune_dead: transport={args.transport}, message={len(MESSAGE)} bytes, "
        f"later = median of {args.repeat} sends"
    )
    header = (
        f"{'N':>6} {'D':>6} {'first ms':>9} {'first µs/l':>10} {'later ms':>9} "
        f"{'later µs/l':>10} {'extra µs/dead':>13} {'dead left':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        extra = (r["first"] - r["later"]) / r["d"] * 1e6 if r["d"] else float("nan")
        print(
            f"{r['n']:>6} {r['d']:>6} {r['first'] * 1e3:>9.3f} "
            f"{r['first'] / r['n'] * 1e6:>10.2f} {r['later'] * 1e3:>9.3f} "
            f"{r['later'] / r['n'] * 1e6:>10.2f} {extra:>13.2f} "
            f"{r['remaining_dead']:>9}"
        )
    print()
    print("Extra cost of the pruning send, fitted against D (first - later = a + b*D):")
    for n in sizes:
        points = [
            (r["d"], (r["first"] - r["later"]) * 1e6) for r in results if r["n"] == n
        ]
        a, b, r2 = fit(points)
        print(
            f"  N={n:>6}: b = {b:6.2f} µs per dead listener, a = {a:8.1f} µs, "
            f"R^2 = {r2:.3f}"
        )
    left = sum(r["remaining_dead"] for r in results)
    assert left == 0
    print(f"\nAfter one send, dead listeners left: {left} (in every run)")
    plot(results, sizes, args.out)
    print(f"plot written to {args.out}")
    return results


if __name__ == "__main__":
    main()
