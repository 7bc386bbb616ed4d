"""The floor under any broadcast: one kernel ``send()`` per listener.

N loopback TCP listeners (``TCP_NODELAY``, as ``WebSocketView`` sets it),
whose client ends live in a child process that reads every frame after each
broadcast (so every send finds its connection idle, as a broadcast now and
then would, and the child uses no CPU while a broadcast runs). In this
process, the CPU time per listener (``time.process_time``: this process
only, system calls included, the reading untimed) of

``hub``
    ``Hub.publish()`` on the memory backend to N stargate WebSockets (the
    whole broadcast path: encode once, the listener walk, the write), with
    the C walk (``stargate._speedups``);
``hub, Python walk``
    the same with the pure Python walk used where the extension was not
    built;
``send loop``
    ``for sock in sockets: sock.send(frame)`` with the frame encoded
    beforehand: no WebSocket library at all, the least a Python server can
    do per listener;

and, in the process of its own server (asyncio, with N connections of its
own and a reader child of their own; ``--no-websockets`` leaves it out):

``websockets.broadcast()``
    ``websockets``' broadcast of the same message, which frames it once per
    connection.

The sides interleave; the table shows the best of the rounds (``--statistic
median``: their median). A ratio to the send loop is how close a broadcast
is to the floor, and the most any broadcast in Python can gain on another.
``--plot PATH`` draws CPU per delivery against N, and its ratio to the
floor's.

The readers in a child process leave this process one descriptor per
listener, so N can reach the hard open-file limit (less a few): about 19,900
under a limit of 20,000.

    python -m benchmarks floor            # N = 1,000, 5,000 and 10,000
    python -m benchmarks floor --quick    # N = 200
    python -m benchmarks.send_floor --listeners 1000,19000
    python -m benchmarks.send_floor --listeners 100,1000,10000 \
        --statistic median --plot floor.png

``--only SIDE`` runs one side's broadcasts without timing them, for an
instruction count: the difference between two callgrind runs with
different ``--messages`` is that side's cost per delivery, in user space::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python -m benchmarks.send_floor --only hub --listeners 500 --messages 30
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TITLE = "send floor: hub publish against a bare send() loop, per listener"

#: What the reader child runs: connect N sockets (with an RFC 6455 opening
#: handshake each when asked: the websockets side's server wants one), then
#: on each "d BYTES" line from stdin read them all until BYTES arrived (at
#: most 30 s; 0: one pass), answering "k BYTES-READ"; exit at end of input.
_READER = r"""
import socket, sys, time
port, n, upgrade = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "upgrade"
request = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: c3RhcmdhdGUtZmxvb3IxMg==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
readers = []
for _ in range(n):
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    reader.connect(("127.0.0.1", port))
    if upgrade:
        reader.settimeout(30)
        reader.sendall(request)
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = reader.recv(1)
            if not byte:
                sys.exit("the server closed a connection during its handshake")
            head += byte
        if not head.startswith(b"HTTP/1.1 101"):
            sys.exit("handshake refused: " + head.decode("latin-1"))
    reader.setblocking(False)
    readers.append(reader)
sys.stdout.write("k 0\n")
sys.stdout.flush()
for line in sys.stdin:
    expected, total = int(line.split()[1]), 0
    deadline = time.monotonic() + 30
    while True:
        before = total
        for reader in readers:
            try:
                while data := reader.recv(1 << 20):
                    total += len(data)
            except BlockingIOError:
                pass
        if total >= expected or time.monotonic() > deadline:
            break
        if total == before:
            time.sleep(0.001)
    sys.stdout.write(f"k {total}\n")
    sys.stdout.flush()
"""


def _start_reader(port, n, *, upgrade=False):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    command = [sys.executable, "-c", _READER, str(port), str(n)]
    command.append("upgrade" if upgrade else "plain")
    return subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )


def _answer(child):
    """Bytes the reader ``child`` drained (its "k BYTES" line)."""
    line = child.stdout.readline().split()
    if len(line) != 2 or line[0] != "k":
        raise RuntimeError("the reader process failed")
    return int(line[1])


def _drain(child, expected=0):
    child.stdin.write(f"d {expected}\n")
    child.stdin.flush()
    return _answer(child)


def _stop(child):
    if child.stdin:
        child.stdin.close()
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


class Listeners:
    """N server-side stargate WebSockets whose peers read in a child
    process. :meth:`drain` empties every peer's socket."""

    def __init__(self, n):
        import eventlet

        from stargate.connection import WebSocket
        from stargate.frames import WireFormat
        from stargate.protocol import ServerProtocol

        listener = eventlet.listen(("127.0.0.1", 0), backlog=min(n, 4096))
        self.child = _start_reader(listener.getsockname()[1], n)
        self.websockets = []
        try:
            for _ in range(n):
                server, _ = listener.accept()
                # Every send leaves at once, as WebSocketView has it (and
                # asyncio, for the websockets side): with Nagle's algorithm a
                # send() to a socket with unacknowledged data only queues.
                server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.websockets.append(
                    WebSocket(
                        server,
                        ServerProtocol(WireFormat("rfc6455")),
                        ping_interval=None,
                    )
                )
            _answer(self.child)
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()

    def drain(self, expected=0):
        """Empty every peer's socket, waiting (30 s at most) until
        ``expected`` bytes came; returns the bytes read."""
        return _drain(self.child, expected)

    def close(self):
        for ws in self.websockets:
            ws.abort()
        _stop(self.child)


def serve_websockets():
    """The websockets side's process (this one is patched by eventlet, and
    websockets runs on asyncio): an asyncio server that keeps every
    connection open and, on each "b M SIZE" line from stdin, calls
    ``websockets.broadcast()`` M times back to back with a SIZE-byte text
    message, answering the CPU seconds of this process that took; "w N"
    waits until N connections are open (at most 60 s) and answers "k"."""
    import asyncio

    from websockets.asyncio.server import broadcast, serve

    async def main():
        connections = set()

        async def handler(websocket):
            connections.add(websocket)
            try:
                await websocket.wait_closed()
            finally:
                connections.discard(websocket)

        # IPPROTO_TCP, as socket.create_server makes it: asyncio sets
        # TCP_NODELAY only on the sockets of a listener whose proto says TCP.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)
        loop = asyncio.get_running_loop()
        async with serve(
            handler, sock=sock, compression=None, ping_interval=None, max_size=None
        ):
            print(f"PORT {sock.getsockname()[1]}", flush=True)
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                op, *numbers = line.split()
                if op == "w":
                    deadline = time.monotonic() + 60
                    while len(connections) < int(numbers[0]):
                        if time.monotonic() > deadline:
                            raise SystemExit("not every reader connected in 60 s")
                        await asyncio.sleep(0.01)
                    print("k", flush=True)
                else:
                    count, message = int(numbers[0]), "x" * int(numbers[1])
                    start = time.process_time()
                    for _ in range(count):
                        broadcast(connections, message)
                    print(time.process_time() - start, flush=True)

    asyncio.run(main())


_SERVE_WEBSOCKETS = (
    "from benchmarks.send_floor import serve_websockets; serve_websockets()"
)


class WebSocketsSide:
    """N connections to a ``websockets`` asyncio server in a child process
    (:func:`serve_websockets`), read by a reader child of their own."""

    def __init__(self, n):
        env = dict(
            os.environ,
            PYTHONWARNINGS="ignore",
            PYTHONPATH=os.pathsep.join(
                filter(None, [ROOT, os.environ.get("PYTHONPATH")])
            ),
        )
        self.n = n
        self.server = subprocess.Popen(
            [sys.executable, "-c", _SERVE_WEBSOCKETS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.child = None
        try:
            line = self.server.stdout.readline().split()
            if len(line) != 2 or line[0] != "PORT":
                raise RuntimeError("the websockets server did not start")
            self.child = _start_reader(int(line[1]), n, upgrade=True)
            _answer(self.child)
            if self._ask(f"w {n}") != "k":
                raise RuntimeError("the websockets server lost connections")
        except BaseException:
            self.close()
            raise

    def _ask(self, line):
        self.server.stdin.write(line + "\n")
        self.server.stdin.flush()
        answer = self.server.stdout.readline().strip()
        if not answer:
            raise RuntimeError("the websockets server exited")
        return answer

    def drain(self, expected=0):
        return _drain(self.child, expected)

    def broadcast(self, messages, size):
        """CPU seconds of ``messages`` broadcasts in the server's process."""
        return float(self._ask(f"b {messages} {size}"))

    def close(self):
        if self.child is not None:
            _stop(self.child)
        _stop(self.server)


def hub_with_walk(websockets, walk):
    """A memory-backend hub with every websocket on channel "floor", whose
    groups use the C walk (``walk="c"``) or the pure Python one."""
    from stargate import connection
    from stargate.backends.memory import MemoryBackend
    from stargate.hub import Hub

    built = connection._send_many_c  # the groups read it when made
    if walk == "python":
        connection._send_many_c = None
    elif built is None:
        return None  # the extension was not built
    try:
        hub = Hub(MemoryBackend())
        for ws in websockets:
            hub.add("floor", ws)
    finally:
        connection._send_many_c = built
    return hub


#: The websockets side's name in the tables and the plot.
WEBSOCKETS = "websockets.broadcast()"


def measure(n, *, messages, rounds, size=32, websockets=True):
    """CPU microseconds per delivery, one figure per round:
    ``{side: [us, ...]}`` for "hub" (missing when the C extension was not
    built), "hub, Python walk", "send loop" and, with ``websockets``,
    :data:`WEBSOCKETS` (measured in its server's process)."""
    from stargate.frames import encode_message

    listeners = Listeners(n)
    hubs = {}
    peer = None
    try:
        for name, walk in (("hub", "c"), ("hub, Python walk", "python")):
            hub = hub_with_walk(listeners.websockets, walk)
            if hub is not None:
                hubs[name] = hub
        if websockets:
            peer = WebSocketsSide(n)
        message = "x" * size
        frame = encode_message(message)
        raw = [ws._raw for ws in listeners.websockets]  # plain sockets

        # Every side's frames are the same bytes (unmasked, no extension).
        expected = n * len(frame)

        def timed(once):
            def broadcast():
                start = time.process_time()
                once()
                return time.process_time() - start, listeners

            return broadcast

        def publisher(hub):
            return lambda: hub.publish("floor", message)

        def send_loop():
            for sock in raw:
                sock.send(frame)

        def websockets_broadcast():
            return peer.broadcast(1, size), peer

        sides = [(name, timed(publisher(hub))) for name, hub in hubs.items()]
        sides.append(("send loop", timed(send_loop)))
        if peer is not None:
            sides.append((WEBSOCKETS, websockets_broadcast))
        per_round = {name: [] for name, _ in sides}
        for r in range(rounds):
            shift = r % len(sides)
            for name, broadcast in sides[shift:] + sides[:shift]:
                seconds = 0.0
                for _ in range(messages):
                    used, readers = broadcast()
                    seconds += used
                    # Every frame is read before the next broadcast, so each
                    # send() finds its connection idle (no unacknowledged
                    # data holding it back), as a broadcast now and then
                    # would; and all of them, or the figure is not one per
                    # delivery.
                    got = readers.drain(expected)
                    if got != expected:
                        raise RuntimeError(f"{name}: {got} of {expected} bytes came")
                per_round[name].append(seconds / messages / n * 1e6)
        for hub in hubs.values():
            assert hub.stats.pruned_dead == 0, "a listener died during the benchmark"
            assert hub.stats.delivered == hub.stats.messages * n
    finally:
        for hub in hubs.values():
            hub.close()
        if peer is not None:
            peer.close()
        listeners.close()
    return per_round


def run_only(side, n, messages):
    """Broadcast ``messages`` times with one side only (draining every 10)."""
    from stargate.frames import encode_message

    listeners = Listeners(n)
    hub = None
    try:
        if side == "loop":
            frame = encode_message("x" * 32)
            raw = [ws._raw for ws in listeners.websockets]

            def once():
                for sock in raw:
                    sock.send(frame)

        else:
            hub = hub_with_walk(listeners.websockets, side)
            if hub is None:
                raise SystemExit("stargate._speedups was not built")

            def once():
                hub.publish("floor", "x" * 32)

        for i in range(messages):
            once()
            if i % 10 == 9:
                listeners.drain()
    finally:
        if hub is not None:
            hub.close()
        listeners.close()


#: Deliveries per timed round (when ``--messages`` does not say): enough
#: to time below 1,000 listeners, no more than needed above, between
#: :data:`MESSAGES` broadcasts.
DELIVERIES = 40_000
MESSAGES = (5, 200)


def messages_for(n):
    """Broadcasts per round to ``n`` listeners (see :data:`DELIVERIES`)."""
    fewest, most = MESSAGES
    return min(max(DELIVERIES // n, fewest), most)


#: Each side's line in the plot: style and label.
LINES = {
    "hub": ("o-", "stargate hub (C walk)"),
    "hub, Python walk": ("s--", "stargate hub, Python walk"),
    "send loop": ("k^:", "bare send() loop (the floor)"),
    WEBSOCKETS: ("D-.", WEBSOCKETS),
}


def plot(figures, path, *, statistic, rounds, size=32):
    """CPU per delivery against N (log N), and the same over the floor's,
    one line per side, to ``path``."""
    from benchmarks._harness import count_axis, pyplot, save_small

    fig, (cpu, ratio) = pyplot().subplots(1, 2, figsize=(9.6, 4))
    counts = sorted(figures)
    for side, (style, label) in LINES.items():
        ns = [n for n in counts if side in figures[n]]
        if not ns:
            continue
        cpu.plot(ns, [figures[n][side] for n in ns], style, label=label)
        floors = [figures[n]["send loop"] for n in ns]
        ratio.plot(
            ns, [figures[n][side] / f for n, f in zip(ns, floors)], style, label=label
        )
    cpu.set_ylabel("CPU µs per delivery")
    ratio.set_ylabel("CPU per delivery / the floor's")
    for ax in (cpu, ratio):
        count_axis(ax, counts, "listeners")
    cpu.legend(fontsize=8)
    fig.suptitle(
        f"one broadcast of {size} B text to N listeners: CPU per delivery,"
        f" {statistic} of {rounds} rounds",
        fontsize=10,
    )
    save_small(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true", help="N = 200, few rounds")
    parser.add_argument("--out", default=None, help="unused (see --plot)")
    parser.add_argument(
        "--listeners",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="comma-separated listener counts (1000,5000,10000)",
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--messages",
        type=int,
        default=None,
        help=f"broadcasts per round (about {DELIVERIES:,} deliveries,"
        f" {MESSAGES[0]} to {MESSAGES[1]} broadcasts)",
    )
    parser.add_argument(
        "--statistic",
        choices=["best", "median"],
        default="best",
        help="what the table and plot show of the rounds (best)",
    )
    parser.add_argument(
        "--no-websockets",
        dest="websockets",
        action="store_false",
        help=f"leave out the {WEBSOCKETS} side (an asyncio server in a child"
        " process, with N connections of its own)",
    )
    parser.add_argument(
        "--plot", default=None, metavar="PATH", help="write a PNG of CPU against N"
    )
    parser.add_argument(
        "--only",
        choices=["hub", "python", "loop"],
        help="run one side untimed (hub: C walk, python: Python walk)",
    )
    args = parser.parse_args(argv)
    import eventlet

    eventlet.monkey_patch()
    if args.only:
        n = (args.listeners or [500])[0]
        run_only("c" if args.only == "hub" else args.only, n, args.messages or 20)
        return
    from benchmarks._harness import print_table, raise_nofile

    most = raise_nofile() - 100  # one descriptor a listener here
    counts = args.listeners or ([200] if args.quick else [1000, 5000, 10000])
    if max(counts) > most:
        parser.error(f"at most {most:,} listeners under this open-file limit")
    rounds = args.rounds or (3 if args.quick else 9)
    pick = min if args.statistic == "best" else statistics.median
    figures, rows = {}, []
    for n in counts:
        if args.messages:
            messages = args.messages
        else:
            messages = 5 if args.quick else messages_for(n)
        per_round = measure(
            n, messages=messages, rounds=rounds, websockets=args.websockets
        )
        figure = figures[n] = {side: pick(us) for side, us in per_round.items()}
        print(
            f"N={n:,}: "
            + ", ".join(f"{side} {us:.2f} us" for side, us in figure.items()),
            flush=True,
        )
        floor = figure["send loop"]
        row = [f"{n:,}", f"{messages}"]
        for side in LINES:
            row.append(f"{figure[side]:.2f}" if side in figure else "-")
        for side in LINES:
            if side != "send loop":
                row.append(f"{figure[side] / floor:.2f}x" if side in figure else "-")
        rows.append(row)
    columns = ["N", "messages", "hub us", "hub (Python walk) us", "send loop us"]
    columns += ["websockets us", "hub/floor", "Python walk/floor", "websockets/floor"]
    print_table(TITLE, columns, rows)
    print(
        f"(CPU time per listener, 32-byte text frames; {args.statistic} of"
        f" {rounds} interleaved rounds; stargate's sides and the send loop in"
        " this process, websockets in its server's; readers in child processes"
        " read every frame after each broadcast, untimed)"
    )
    if args.plot:
        plot(figures, args.plot, statistic=args.statistic, rounds=rounds)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
