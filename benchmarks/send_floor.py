"""The floor under any broadcast: one kernel ``send()`` per listener.

In one process, N loopback TCP listeners (their readers drain between
rounds, so every send finds room): the time per listener of

``hub``
    ``Hub.publish()`` on the memory backend to N stargate WebSockets (the
    whole broadcast path: encode once, the listener walk, the write);
``send loop``
    ``for sock in sockets: sock.send(frame)`` with the frame encoded
    beforehand: no WebSocket library at all, the least a Python server can
    do per listener.

The two interleave, best of several rounds each. Their ratio is how close
stargate is to the floor, and the most any broadcast in Python can gain on
another: a peer's throughput divided by stargate's cannot exceed the peer's
cost over the floor.

Both ends of every connection live in this process, so N is at most half
the open-file limit.

    python -m benchmarks floor            # N = 1,000 and 5,000
    python -m benchmarks floor --quick    # N = 200
"""

import argparse
import socket
import time

TITLE = "send floor: hub publish against a bare send() loop, per listener"


def _connect(n):
    import eventlet

    from stargate.connection import WebSocket
    from stargate.frames import WireFormat
    from stargate.protocol import ServerProtocol

    listener = eventlet.listen(("127.0.0.1", 0), backlog=min(n, 4096))
    port = listener.getsockname()[1]
    pairs = []
    for _ in range(n):
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        reader.connect(("127.0.0.1", port))
        reader.setblocking(False)
        server, _ = listener.accept()
        ws = WebSocket(
            server, ServerProtocol(WireFormat("rfc6455")), ping_interval=None
        )
        pairs.append((ws, reader))
    listener.close()
    return pairs


def _drain(pairs):
    for _, reader in pairs:
        try:
            while reader.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


def measure(n, *, messages, rounds, size=32):
    """Microseconds per listener: ``{"hub": us, "send loop": us}``."""
    from stargate.backends.memory import MemoryBackend
    from stargate.frames import encode_message
    from stargate.hub import Hub

    pairs = _connect(n)
    hub = Hub(MemoryBackend())
    for ws, _ in pairs:
        hub.add("floor", ws)
    message = "x" * size
    frame = encode_message(message)
    raw = [ws._raw for ws, _ in pairs]

    def publish():
        for _ in range(messages):
            hub.publish("floor", message)

    def send_loop():
        for _ in range(messages):
            for sock in raw:
                sock.send(frame)

    best = {"hub": float("inf"), "send loop": float("inf")}
    try:
        for r in range(rounds):
            order = [("hub", publish), ("send loop", send_loop)]
            for name, run in order if r % 2 == 0 else order[::-1]:
                _drain(pairs)
                start = time.perf_counter()
                run()
                elapsed = time.perf_counter() - start
                best[name] = min(best[name], elapsed / messages / n * 1e6)
        assert hub.stats.pruned_dead == 0, "a listener died during the benchmark"
    finally:
        hub.close()
        for ws, reader in pairs:
            ws.abort()
            reader.close()
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true", help="N = 200, few rounds")
    parser.add_argument("--out", default=None, help="unused (no plot)")
    parser.add_argument(
        "--listeners",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="comma-separated listener counts (1000,5000)",
    )
    args = parser.parse_args(argv)
    import eventlet

    eventlet.monkey_patch()
    from benchmarks._harness import print_table, raise_nofile

    most = (raise_nofile() - 100) // 2  # two sockets a listener
    counts = args.listeners or ([200] if args.quick else [1000, 5000])
    if max(counts) > most:
        parser.error(f"at most {most:,} listeners under this open-file limit")
    rounds, messages = (3, 5) if args.quick else (9, 20)
    rows = []
    for n in counts:
        best = measure(n, messages=messages, rounds=rounds)
        hub, floor = best["hub"], best["send loop"]
        rows.append([f"{n:,}", f"{hub:.2f}", f"{floor:.2f}", f"{hub / floor:.2f}x"])
    columns = ["N", "hub us/listener", "send loop us/listener", "hub/floor"]
    print_table(TITLE, columns, rows)
    print("(32-byte text frames; best of interleaved rounds; readers drained between)")


if __name__ == "__main__":
    main()
