"""The floor under any broadcast: one kernel ``send()`` per listener.

N loopback TCP listeners, whose client ends live in a child process that
reads them dry between rounds (so every send finds room, and the child uses
no CPU while a round runs). In this process, the CPU time per listener
(``time.process_time``: this process only, system calls included) of

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
    do per listener.

The three interleave, best of several rounds each. A ratio to the send loop
is how close stargate is to the floor, and the most any broadcast in Python
can gain on another.

The readers in a child process leave this process one descriptor per
listener, so N can reach the hard open-file limit (less a few): about 19,900
under a limit of 20,000.

    python -m benchmarks floor            # N = 1,000, 5,000 and 10,000
    python -m benchmarks floor --quick    # N = 200
    python -m benchmarks.send_floor --listeners 1000,19000

``--only SIDE`` runs one side's broadcasts without timing them, for an
instruction count: the difference between two callgrind runs with
different ``--messages`` is that side's cost per delivery, in user space::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python -m benchmarks.send_floor --only hub --listeners 500 --messages 30
"""

import argparse
import os
import subprocess
import sys
import time

TITLE = "send floor: hub publish against a bare send() loop, per listener"

#: What the reader child runs: connect N sockets, then drain them all on
#: each "d" line from stdin, answering "k"; exit at end of input.
_READER = r"""
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
readers = []
for _ in range(n):
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    reader.connect(("127.0.0.1", port))
    reader.setblocking(False)
    readers.append(reader)
sys.stdout.write("k\n")
sys.stdout.flush()
for line in sys.stdin:
    for reader in readers:
        try:
            while reader.recv(1 << 20):
                pass
        except BlockingIOError:
            pass
    sys.stdout.write("k\n")
    sys.stdout.flush()
"""


class Listeners:
    """N server-side stargate WebSockets whose peers read in a child
    process. :meth:`drain` empties every peer's socket."""

    def __init__(self, n):
        import eventlet

        from stargate.connection import WebSocket
        from stargate.frames import WireFormat
        from stargate.protocol import ServerProtocol

        listener = eventlet.listen(("127.0.0.1", 0), backlog=min(n, 4096))
        port = listener.getsockname()[1]
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        self.child = subprocess.Popen(
            [sys.executable, "-c", _READER, str(port), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.websockets = []
        try:
            for _ in range(n):
                server, _ = listener.accept()
                self.websockets.append(
                    WebSocket(
                        server,
                        ServerProtocol(WireFormat("rfc6455")),
                        ping_interval=None,
                    )
                )
            self._answer()
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()

    def _answer(self):
        if self.child.stdout.readline() != "k\n":
            raise RuntimeError("the reader process failed")

    def drain(self):
        self.child.stdin.write("d\n")
        self.child.stdin.flush()
        self._answer()

    def close(self):
        for ws in self.websockets:
            ws.abort()
        if self.child.stdin:
            self.child.stdin.close()
        try:
            self.child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()


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


def measure(n, *, messages, rounds, size=32):
    """CPU microseconds per listener, best of ``rounds``:
    ``{"hub": us, "hub, Python walk": us, "send loop": us}`` ("hub" is
    missing when the C extension was not built)."""
    from stargate.frames import encode_message

    listeners = Listeners(n)
    hubs = {}
    try:
        for name, walk in (("hub", "c"), ("hub, Python walk", "python")):
            hub = hub_with_walk(listeners.websockets, walk)
            if hub is not None:
                hubs[name] = hub
        message = "x" * size
        frame = encode_message(message)
        raw = [ws._raw for ws in listeners.websockets]  # plain sockets

        def publisher(hub):
            def publish():
                for _ in range(messages):
                    hub.publish("floor", message)

            return publish

        def send_loop():
            for _ in range(messages):
                for sock in raw:
                    sock.send(frame)

        sides = [(name, publisher(hub)) for name, hub in hubs.items()]
        sides.append(("send loop", send_loop))
        best = {name: float("inf") for name, _ in sides}
        for r in range(rounds):
            shift = r % len(sides)
            for name, run in sides[shift:] + sides[:shift]:
                listeners.drain()
                start = time.process_time()
                run()
                elapsed = time.process_time() - start
                best[name] = min(best[name], elapsed / messages / n * 1e6)
        for hub in hubs.values():
            assert hub.stats.pruned_dead == 0, "a listener died during the benchmark"
            assert hub.stats.delivered == hub.stats.messages * n
    finally:
        for hub in hubs.values():
            hub.close()
        listeners.close()
    return best


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true", help="N = 200, few rounds")
    parser.add_argument("--out", default=None, help="unused (no plot)")
    parser.add_argument(
        "--listeners",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="comma-separated listener counts (1000,5000,10000)",
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--messages", type=int, default=None)
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
    rounds, messages = (3, 5) if args.quick else (9, 20)
    rounds, messages = args.rounds or rounds, args.messages or messages
    rows = []
    for n in counts:
        best = measure(n, messages=messages, rounds=rounds)
        floor = best["send loop"]
        hub = best.get("hub")
        python = best["hub, Python walk"]
        rows.append(
            [
                f"{n:,}",
                "-" if hub is None else f"{hub:.2f}",
                f"{python:.2f}",
                f"{floor:.2f}",
                "-" if hub is None else f"{hub / floor:.2f}x",
                f"{python / floor:.2f}x",
            ]
        )
    columns = [
        "N",
        "hub us",
        "hub (Python walk) us",
        "send loop us",
        "hub/floor",
        "Python walk/floor",
    ]
    print_table(TITLE, columns, rows)
    print(
        "(CPU time of this process per listener, 32-byte text frames; best of"
        f" {rounds} interleaved rounds of {messages} messages; readers in a"
        " child process, drained between rounds)"
    )


if __name__ == "__main__":
    main()
