"""Receive-path benchmark: masking and parsing client frames, no I/O.

Usage::

    python benchmarks/bench_receive_path.py [--quick]

Measures, in one run on one machine:

* ``apply_mask`` throughput (MB/s) of stargate, of a naive per-byte loop
  written here, and of websockets' own (its C extension when built, else its
  pure-Python fallback);
* the receive path: masked text frames of 32 B, 1 KiB and 64 KiB, each fed
  to ``receive_data`` on its own, through ``stargate.protocol.
  ServerProtocol``, a naive reference parser written here, and websockets'
  sans-I/O ``Protocol`` (server side, already open).

Every figure is measured in the same run; the ratios compare stargate with
each peer (> 1: stargate is faster). Per-call latencies include the timer
call (~50 ns), equally for all.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from stargate.frames import Frame, Opcode, apply_mask, serialize_frame  # noqa: E402
from stargate.protocol import ServerProtocol  # noqa: E402

try:
    from websockets.protocol import Protocol as WsProtocol
    from websockets.protocol import Side as WsSide
    from websockets.protocol import State as WsState
    from websockets.utils import apply_mask as ws_apply_mask_py

    try:
        from websockets.speedups import apply_mask as ws_apply_mask_c
    except ImportError:  # pragma: no cover
        ws_apply_mask_c = None
except ImportError:  # pragma: no cover
    WsProtocol = None
    ws_apply_mask_py = ws_apply_mask_c = None

MASK = b"\x37\xfa\x21\x3d"


# ------------------------------------------------------------------ naive peer


def naive_apply_mask(data, mask):
    out = bytearray(len(data))
    for i, b in enumerate(data):
        out[i] = b ^ mask[i & 3]
    return bytes(out)


class NaiveParser:
    """The obvious receive loop: bytearray buffer, per-byte unmasking."""

    def __init__(self):
        self.buf = bytearray()
        self.events = []

    def receive_data(self, data):
        self.buf += data
        buf = self.buf
        while len(buf) >= 2:
            length = buf[1] & 0x7F
            offset = 2
            if length == 126:
                length = int.from_bytes(buf[2:4], "big")
                offset = 4
            elif length == 127:
                length = int.from_bytes(buf[2:10], "big")
                offset = 10
            if len(buf) < offset + 4 + length:
                return
            mask = buf[offset : offset + 4]
            payload = naive_apply_mask(buf[offset + 4 : offset + 4 + length], mask)
            del buf[: offset + 4 + length]
            self.events.append(payload.decode("utf-8"))

    def events_received(self):
        events, self.events = self.events, []
        return events


# ------------------------------------------------------------------ helpers


def measure(fn, min_time):
    """Run ``fn`` until ``min_time`` seconds passed; return seconds per call."""
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n
        n *= 2


def fmt_size(size):
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def bench_mask(quick):
    min_time = 0.05 if quick else 0.3
    sizes = [32, 1024, 65536, 2**20]
    impls = [("stargate", apply_mask), ("naive loop", naive_apply_mask)]
    if ws_apply_mask_py is not None:
        impls.append(("websockets (py)", ws_apply_mask_py))
    if ws_apply_mask_c is not None:
        impls.append(("websockets (C)", ws_apply_mask_c))
    print("apply_mask throughput, MB/s (higher is better)")
    print(f"{'size':>8} " + " ".join(f"{name:>16}" for name, _ in impls))
    ratios = {}
    for size in sizes:
        data = os.urandom(size)
        row = []
        for name, fn in impls:
            if name == "naive loop" and size > 65536 and quick:
                row.append(None)
                continue
            per_call = measure(lambda: fn(data, MASK), min_time)
            row.append(size / per_call / 1e6)
        ours = row[0]
        for (name, _), value in zip(impls[1:], row[1:]):
            if value:
                ratios.setdefault(name, []).append((size, ours / value))
        cells = " ".join(f"{v:>16,.1f}" if v else f"{'-':>16}" for v in row)
        print(f"{fmt_size(size):>8} {cells}")
    for name, pairs in ratios.items():
        text = ", ".join(f"{fmt_size(s)}: {r:.2f}x" for s, r in pairs)
        print(f"  stargate / {name}: {text}")
    print()


def make_stargate():
    return ServerProtocol()


def make_websockets():
    return WsProtocol(WsSide.SERVER, state=WsState.OPEN, max_size=2**20)


def run_receive(factory, frames, expected):
    """Feed each frame in its own receive_data call; per-call times in ns."""
    protocol = factory()
    timer = time.perf_counter_ns
    times = []
    append = times.append
    count = 0
    for data in frames:
        start = timer()
        protocol.receive_data(data)
        count += len(protocol.events_received())
        append(timer() - start)
    if count != expected:
        raise AssertionError(f"{factory.__name__}: {count} events, {expected} sent")
    return times


def bench_receive(quick):
    cases = [(32, 20000), (1024, 10000), (65536, 300)]
    if quick:
        cases = [(32, 3000), (1024, 2000), (65536, 50)]
    rounds = 3 if quick else 7
    impls = [("stargate", make_stargate), ("naive", NaiveParser)]
    if WsProtocol is not None:
        impls.append(("websockets", make_websockets))
    print("receive path: masked text frames, one receive_data call per frame")
    header = f"{'size':>8} {'impl':>11} {'msg/s':>11} {'MB/s':>9} {'p50 us':>8}"
    print(header + f" {'p99 us':>8} {'vs stargate':>12}")
    summary = []
    for size, count in cases:
        text = ("stargate é " * (size // 12 + 1)).encode()[:size]
        text = text.decode("utf-8", "ignore").encode()
        frames = [
            serialize_frame(Frame(Opcode.TEXT, text), mask=os.urandom(4))
            for _ in range(count)
        ]
        results = {}
        for name, factory in impls:
            # The per-byte loop is slow on big frames: fewer of them.
            n = min(count, 30) if name == "naive" and size >= 65536 else count
            best = None
            for _ in range(rounds):
                times = run_receive(factory, frames[:n], n)
                total = sum(times)
                if best is None or total < best[0]:
                    best = (total, sorted(times), n)
            results[name] = best
        ours = results["stargate"][0] / results["stargate"][2]
        for name, (total, times, n) in results.items():
            per_msg = total / n
            p50 = statistics.median(times) / 1000
            p99 = times[int(len(times) * 0.99) - 1] / 1000
            ratio = per_msg / ours
            print(
                f"{fmt_size(size):>8} {name:>11} {1e9 / per_msg:>11,.0f}"
                f" {len(text) * 1e3 / per_msg:>9,.1f} {p50:>8.2f} {p99:>8.2f}"
                f" {ratio:>11.2f}x"
            )
            if name != "stargate":
                summary.append((size, name, ratio))
    print("  (vs stargate: time per message of the peer / stargate's; > 1 means")
    print("   stargate is faster. Best of", rounds, "rounds.)")
    print()
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run")
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]} on {sys.platform}")
    if ws_apply_mask_c is not None:
        print("websockets: C speedups available (its apply_mask is in C)")
    print()
    bench_mask(args.quick)
    bench_receive(args.quick)


if __name__ == "__main__":
    main()
