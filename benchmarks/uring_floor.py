"""Below the floor? A broadcast's sends through io_uring against send().

The experiment that decides whether stargate gets an io_uring fan-out path
(issue 17: kept only at 15 % or more below the send loop in server CPU per
delivery). Over the same N loopback connections (stargate WebSockets, their
readers in a child process that drains them between rounds, as in
``benchmarks.send_floor``), the CPU time of this process
(``time.process_time``: user and system, every thread) per delivery of

``send loop``
    a C loop of one non-blocking ``send()`` per descriptor, what the hub's C
    walk (``stargate._speedups.send_many``) does between taking and
    counting its listeners;
``io_uring``
    the same sends as ``IORING_OP_SEND`` entries, submitted in batches of
    up to ``--ring`` with one ``io_uring_enter`` per batch (which reaps the
    completions too: a non-blocking send completes inline);
``io_uring, fixed files``
    the same with the descriptors registered once
    (``IORING_REGISTER_FILES``), sparing the kernel a file lookup per send;
``hub``
    ``Hub.publish()`` on the memory backend to the same listeners, for
    scale: the whole path the first three would sit in.

Both io_uring sides need nothing but the raw system calls (no liburing);
``benchmarks/_uring_send.c`` is compiled with the system's C compiler and
loaded with ctypes. Where io_uring is missing or refused (ENOSYS, EPERM
from ``io_uring_disabled`` or seccomp) the table says so and shows the
send loop alone.

The sides interleave in a rotating order, ``--rounds`` rounds of
``--messages`` broadcasts each; the table gives each side's median, and the
ratio of the medians to the send loop's.

    python -m benchmarks.uring_floor                  # N = 1,000 and 10,000
    python -m benchmarks.uring_floor --listeners 1000 --sizes 32,1024
"""

import argparse
import array
import ctypes
import os
import statistics
import time

TITLE = "below the floor: io_uring batched sends against a send() loop"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_uring_send.c")

# io_uring_setup flags, tried in this order until the kernel takes one.
_SUBMIT_ALL = 1 << 7
_COOP_TASKRUN = 1 << 8
_SINGLE_ISSUER = 1 << 12
_DEFER_TASKRUN = 1 << 13
SETUP_FLAGS = (
    _SUBMIT_ALL | _COOP_TASKRUN | _SINGLE_ISSUER | _DEFER_TASKRUN,
    _SUBMIT_ALL | _COOP_TASKRUN,
    0,
)


class Uring:
    """The compiled experiment: ``loop_send`` and, when the kernel lets us,
    a ring (``unavailable`` says why not)."""

    def __init__(self, path, entries):
        lib = self.lib = ctypes.CDLL(path)
        ints = ctypes.POINTER(ctypes.c_int)
        lib.loop_send.restype = ctypes.c_long
        lib.loop_send.argtypes = [ints, ctypes.c_int, ctypes.c_char_p]
        lib.loop_send.argtypes += [ctypes.c_size_t, ints]
        lib.ur_new.restype = ctypes.c_void_p
        lib.ur_new.argtypes = [ctypes.c_uint, ctypes.c_uint, ints]
        lib.ur_register_files.argtypes = [ctypes.c_void_p, ints, ctypes.c_int]
        lib.ur_send.restype = ctypes.c_long
        lib.ur_send.argtypes = [ctypes.c_void_p, ints, ctypes.c_int]
        lib.ur_send.argtypes += [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ints]
        lib.ur_unregister_files.argtypes = [ctypes.c_void_p]
        lib.ur_free.argtypes = [ctypes.c_void_p]
        self.ring = None
        self.unavailable = None
        error = ctypes.c_int(0)
        for flags in SETUP_FLAGS:
            ring = lib.ur_new(entries, flags, ctypes.byref(error))
            if ring:
                self.ring, self.flags = ring, flags
                break
            if error.value != 22:  # EINVAL: flags this kernel lacks
                break
        if self.ring is None:
            self.unavailable = os.strerror(error.value)

    def close(self):
        if self.ring is not None:
            self.lib.ur_free(self.ring)
            self.ring = None


def _pointer(buffer):
    return ctypes.cast(buffer.buffer_info()[0], ctypes.POINTER(ctypes.c_int))


def measure(n, *, sizes, messages, rounds, ring_entries, uring):
    """Per size, ``{side: [CPU microseconds per delivery, one per round]}``."""
    from benchmarks.send_floor import Listeners, hub_with_walk
    from stargate.frames import encode_message

    listeners = Listeners(n)
    hub = hub_with_walk(listeners.websockets, "c") or hub_with_walk(
        listeners.websockets, "python"
    )
    fds = array.array("i", (ws._raw.fileno() for ws in listeners.websockets))
    results = array.array("i", bytes(4 * n))
    fd_pointer, result_pointer = _pointer(fds), _pointer(results)
    lib, ring = uring.lib, uring.ring
    fixed_ok = ring is not None and lib.ur_register_files(ring, fd_pointer, n) == 0
    figures = {}
    try:
        for size in sizes:
            message = "x" * size
            frame = encode_message(message)

            def run_loop():
                for _ in range(messages):
                    if (
                        lib.loop_send(fd_pointer, n, frame, len(frame), result_pointer)
                        != n
                    ):
                        raise RuntimeError("a send did not take the whole frame")

            def uring_side(fixed):
                def run():
                    for _ in range(messages):
                        full = lib.ur_send(
                            ring,
                            fd_pointer,
                            n,
                            frame,
                            len(frame),
                            fixed,
                            result_pointer,
                        )
                        if full != n:
                            raise RuntimeError(f"io_uring sent {full} of {n} in full")

                return run

            def run_hub():
                for _ in range(messages):
                    hub.publish("floor", message)

            sides = [("send loop", run_loop)]
            if ring is not None:
                sides.append(("io_uring", uring_side(0)))
                if fixed_ok:
                    sides.append(("io_uring, fixed files", uring_side(1)))
            sides.append(("hub", run_hub))
            per_round = {name: [] for name, _ in sides}
            for r in range(rounds):
                shift = r % len(sides)
                for name, run in sides[shift:] + sides[:shift]:
                    listeners.drain()
                    start = time.process_time()
                    run()
                    elapsed = time.process_time() - start
                    per_round[name].append(elapsed / messages / n * 1e6)
            figures[size] = per_round
        assert hub.stats.pruned_dead == 0, "a listener died during the benchmark"
    finally:
        if fixed_ok:
            lib.ur_unregister_files(ring)
        hub.close()
        listeners.close()
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true", help="N = 200, few rounds")
    parser.add_argument("--out", default=None, help="unused (no plot)")
    parser.add_argument(
        "--listeners",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="comma-separated listener counts (1000,10000)",
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[32, 1024],
        help="message sizes in bytes (32,1024)",
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--ring", type=int, default=4096, help="ring entries")
    args = parser.parse_args(argv)
    import eventlet

    eventlet.monkey_patch()
    from benchmarks._client import build_c_library
    from benchmarks._harness import DEFAULT_OUT, print_table, raise_nofile

    most = raise_nofile() - 100
    counts = args.listeners or ([200] if args.quick else [1000, 10000])
    if max(counts) > most:
        parser.error(f"at most {most:,} listeners under this open-file limit")
    rounds = args.rounds or (3 if args.quick else 15)
    messages = args.messages or (3 if args.quick else 20)
    path = build_c_library(SOURCE, os.path.join(DEFAULT_OUT, ".build"), "uring_send")
    if path is None:
        print(f"{TITLE}: no C compiler on Linux here; nothing measured")
        return
    uring = Uring(path, args.ring)
    if uring.unavailable:
        print(f"io_uring unavailable here ({uring.unavailable}): send loop only")
    rows = []
    try:
        for n in counts:
            figures = measure(
                n,
                sizes=args.sizes,
                messages=messages,
                rounds=rounds,
                ring_entries=args.ring,
                uring=uring,
            )
            for size, per_round in figures.items():
                medians = {k: statistics.median(v) for k, v in per_round.items()}
                floor = medians["send loop"]
                for name, value in medians.items():
                    rows.append(
                        [
                            f"{n:,}",
                            f"{size:,}",
                            name,
                            f"{value:.3f}",
                            f"{value / floor:.3f}x",
                        ]
                    )
    finally:
        uring.close()
    columns = ["N", "bytes", "side", "CPU us/delivery", "vs send loop"]
    print_table(TITLE, columns, rows)
    print(
        f"(CPU time of this process, median of {rounds} interleaved rounds of"
        f" {messages} broadcasts; io_uring batches of up to {args.ring}"
        " entries; readers in a child process, drained between rounds)"
    )


if __name__ == "__main__":
    main()
