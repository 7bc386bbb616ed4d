"""What the benchmarks share: server and client processes, control, tables.

Every process started here is started by :class:`ServerProcess` or
:class:`ClientPool`, asks the kernel to kill it if the benchmark dies
(``PR_SET_PDEATHSIG``), and is stopped by its PID when the benchmark ends.
"""

import ctypes
import json
import math
import os
import queue
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results")

#: Connections per load-generating client process, with the C receive loop
#: and with the Python one (which needs more processes to keep up).
CONNECTIONS_PER_CLIENT = 10000
CONNECTIONS_PER_PYTHON_CLIENT = 2500

#: ``STARGATE_BENCH_CLIENT=python`` makes the load generator use its Python
#: receive loop even where the C one builds (to compare the two).
CLIENT_LOOP_ENV = "STARGATE_BENCH_CLIENT"
_fast_loop = []  # [path or None], once built


def fast_loop():
    """Path of the load generator's C receive loop, built on first use, or
    ``None`` (no C compiler, or the Python loop was asked for). Says once
    which loop the run uses, since it changes how much CPU is left to the
    servers."""
    if not _fast_loop:
        if os.environ.get(CLIENT_LOOP_ENV, "c").lower() == "python":
            path, why = None, f"{CLIENT_LOOP_ENV}=python"
        else:
            from benchmarks._client import build_fast_loop

            path = build_fast_loop(os.path.join(DEFAULT_OUT, ".build"))
            why = "no C compiler found" if path is None else ""
        _fast_loop.append(path)
        if path:
            print("load generator: C receive loop (benchmarks/_fastclient.c)")
        else:
            print(f"load generator: Python receive loop ({why})")
    return _fast_loop[0]


def raise_nofile():
    """Raise this process's open-file limit to the hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _die_with_parent():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    return env


class _Lines:
    """Lines from a child's stdout, read by a thread, with timeouts."""

    def __init__(self, stream):
        self.queue = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream):
        for line in stream:
            self.queue.put(line)
        self.queue.put(None)

    def get(self, timeout):
        try:
            line = self.queue.get(timeout=max(timeout, 0.01))
        except queue.Empty:
            raise TimeoutError("no answer from a benchmark process") from None
        if line is None:
            raise RuntimeError("a benchmark process exited")
        return line


def process_cpu(process):
    """Seconds of CPU a ``psutil.Process`` used, 0 once it is gone.

    Linux's ``/proc/PID/task/*/schedstat`` counts nanoseconds on a CPU per
    thread; ``psutil.Process.cpu_times`` counts 10 ms ticks, too coarse for
    tens of microseconds per message over a few hundred messages.
    """
    import psutil

    try:
        total = 0
        for task in os.listdir(f"/proc/{process.pid}/task"):
            with open(f"/proc/{process.pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


class ServerProcess:
    """One server under test (see :mod:`benchmarks._servers`)."""

    def __init__(self, kind, *, workers=1, redis=None, profile=None, timeout=30):
        command = [sys.executable, "-m", "benchmarks._servers", kind]
        command += ["--workers", str(workers)]
        if redis:
            command += ["--redis", redis]
        if profile:
            command += ["--profile", profile]
        self.kind = kind
        self.workers = workers
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=_env(),
            preexec_fn=_die_with_parent,
        )
        self.lines = _Lines(self.process.stdout)
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(deadline - time.monotonic())
            if line.startswith("PORT "):
                self.port = int(line.split()[1])
                break
        self._control = None
        #: Number of the next message this server is asked to broadcast:
        #: numbers go on across phases, so a late message of an earlier
        #: phase is not taken for one of the current phase.
        self.next_number = 0

    @property
    def pid(self):
        return self.process.pid

    def cpu_seconds(self):
        """CPU time of the server: its process and all its children (the
        workers), to the nanosecond where the kernel tells it
        (:func:`process_cpu`)."""
        import psutil

        parent = psutil.Process(self.pid)
        return sum(
            process_cpu(process)
            for process in [parent, *parent.children(recursive=True)]
        )

    def rss(self):
        """Resident memory of the server: its process and all its children."""
        import psutil

        parent = psutil.Process(self.pid)
        total = parent.memory_info().rss
        for child in parent.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    cpu_times = cpu_seconds

    def control(self):
        if self._control is None:
            from websockets.sync.client import connect

            # Entered as a context manager (websockets 17 warns otherwise),
            # and left in stop().
            self._control = connect(
                f"ws://127.0.0.1:{self.port}/control",
                compression=None,
                max_size=None,
                open_timeout=20,
                ping_interval=None,
            ).__enter__()
        return self._control

    def command(self, timeout=120, **command):
        ws = self.control()
        ws.send(json.dumps(command))
        return json.loads(ws.recv(timeout=timeout))

    def stop(self):
        if self._control is not None:
            try:
                self._control.close()
            except Exception:
                pass
            self._control = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class ClientPool:
    """``n`` listener connections, spread over lean client processes."""

    def __init__(self, port, n, *, compress=False, per_process=None, source_base=10):
        if per_process is None:
            per_process = (
                CONNECTIONS_PER_CLIENT if fast_loop() else CONNECTIONS_PER_PYTHON_CLIENT
            )
        count = max(1, math.ceil(n / per_process))
        self.n = n
        self.procs = []
        self.lines = []
        share, extra = divmod(n, count)
        for i in range(count):
            size = share + (1 if i < extra else 0)
            # One loopback source address per process: 28k ephemeral ports each.
            command = [
                sys.executable,
                "-m",
                "benchmarks._client",
                "--port",
                str(port),
                "--n",
                str(size),
                "--source",
                f"127.0.0.{source_base + i}",
            ]
            if compress:
                command.append("--compress")
            if fast_loop():
                command += ["--fast", fast_loop()]
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=_env(),
                preexec_fn=_die_with_parent,
            )
            self.procs.append(proc)
            self.lines.append(_Lines(proc.stdout))

    def _send(self, proc, command):
        proc.stdin.write(json.dumps(command) + "\n")
        proc.stdin.flush()

    def _gather(self, timeout):
        deadline = time.monotonic() + timeout
        return [
            json.loads(lines.get(deadline - time.monotonic())) for lines in self.lines
        ]

    def connect(self, timeout=120):
        """Open every connection; returns (open, failed, seconds, client cpu s)."""
        start = time.monotonic()
        for proc in self.procs:
            self._send(proc, {"op": "connect", "timeout": timeout})
        replies = self._gather(timeout + 30)
        return (
            sum(r["open"] for r in replies),
            sum(r["failed"] for r in replies),
            time.monotonic() - start,
            sum(r["cpu"] for r in replies),
        )

    def expect(self, count, timeout, first=None):
        """Start a phase of ``count`` messages, numbered from ``first`` (see
        :mod:`benchmarks._client`; ``None``: matched by order)."""
        command = {"op": "expect", "count": count, "timeout": timeout}
        if first is not None:
            command["first"] = first
        for proc in self.procs:
            self._send(proc, command)
        self._gather(30)
        self._timeout = timeout

    def collect(self):
        """Merge the phase reports: per-message last arrival over every process."""
        replies = self._gather(self._timeout + 30)
        count = len(replies[0]["last"])
        last = [max(r["last"][i] for r in replies) for i in range(count)]
        firsts = [r["first"] for r in replies if r["first"]]
        return {
            "last": last,
            "first": min(firsts) if firsts else 0,
            "received": sum(r["received"] for r in replies),
            "complete": sum(r["complete"] for r in replies),
            "open": sum(r["open"] for r in replies),
            "cpu": sum(r["cpu"] for r in replies),
        }

    def close(self):
        for proc in self.procs:
            try:
                self._send(proc, {"op": "quit"})
                proc.stdin.close()
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def percentile(values, p):
    """The ``p``-th percentile (0-100) by linear interpolation."""
    values = sorted(values)
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    rank = (len(values) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def run_phase(server, clients, *, count, size, binary, interval=0.0, timeout=60):
    """Broadcast ``count`` messages; returns throughput and latency figures.

    ``rate`` is deliveries per second from the first publish to the moment
    the last listener got the last message; ``latencies`` (seconds) are,
    per message, its publish time to its arrival at its last listener.
    Messages are numbered across the phases of a server, and the load
    generator matches arrivals to messages by number.
    """
    first = server.next_number
    server.next_number += count
    clients.expect(count, timeout, first=first)
    cpu0 = server.cpu_times()
    reply = server.command(
        op="broadcast",
        first=first,
        count=count,
        size=size,
        binary=binary,
        interval=interval,
        timeout=timeout + 30,
    )
    report = clients.collect()
    server_cpu = server.cpu_times() - cpu0
    stamps = reply["ts"]
    last = report["last"]
    latencies = [(a - s) / 1e9 for a, s in zip(last, stamps) if a]
    end = max(last) if any(last) else stamps[-1]
    elapsed = max((end - stamps[0]) / 1e9, 1e-9)
    expected = count * clients.n
    return {
        "rate": report["received"] / elapsed,
        "elapsed": elapsed,
        "received": report["received"],
        "expected": expected,
        "latencies": latencies,
        "client_cpu": report["cpu"],
        "server_cpu": server_cpu,
    }


def print_table(title, columns, rows):
    """Print ``rows`` (lists of already formatted cells) under ``columns``."""
    widths = [
        max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(str(c))
        for i, c in enumerate(columns)
    ]
    print()
    print(title)
    header = "  ".join(str(c).rjust(w) for c, w in zip(columns, widths))
    print(header)
    print("-" * len(header))
    for row in rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()


def fmt_rate(value):
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def fmt_ms(seconds):
    return f"{seconds * 1e3:.2f}"


def ratio(a, b):
    if not b or a != a or b != b:
        return "n/a"
    return f"{a / b:.2f}x"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def count_axis(ax, counts, label):
    """Make ``ax`` a figure against N: a log N axis with a tick at each N
    measured (and no others), ``label`` under it, a y axis from 0, a grid."""
    ax.set_xscale("log")
    ax.set_xticks(counts)
    ax.set_xticklabels([f"{n:,}" for n in counts], fontsize=7)
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"{label} (log scale)")
    ax.grid(True, alpha=0.3)


def save_small(fig, path):
    """Write ``fig`` to ``path`` at 100 dpi (a few tens of KiB: the docs
    keep the PNGs in git) and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def rotate(items, shift):
    """``items`` rotated by ``shift``: the order of peers changes each round."""
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def warm_up(server, pool, attempts=5):
    """Broadcast until every listener got a message: every worker subscribed."""
    for _ in range(attempts):
        m = run_phase(server, pool, count=1, size=32, binary=False, timeout=5)
        if m["received"] == pool.n:
            return True
    return False


def new_samples(peers):
    """Empty sample lists per peer, for :func:`measure_round`."""
    return {p: {"rates": [], "lat": [], "ccpu": [], "got": []} for p in peers}


def measure_round(
    servers,
    pools,
    peers,
    samples,
    offset,
    *,
    burst,
    paced,
    size,
    binary=False,
    timeout=60,
    max_interval=0.25,
):
    """One round: a burst per peer (deliveries/s), then a paced phase per
    peer (latency), appended to ``samples``.

    ``offset`` rotates which peer goes first. The paced interval is twice
    the slowest peer's per-message time in the bursts (at most
    ``max_interval``), so every peer gets the same.
    """
    per_message = 0.0
    for peer in rotate(peers, offset):
        m = run_phase(
            servers[peer],
            pools[peer],
            count=burst,
            size=size,
            binary=binary,
            timeout=timeout,
        )
        samples[peer]["rates"].append(m["rate"])
        samples[peer]["ccpu"].append(m["client_cpu"] / m["elapsed"])
        samples[peer]["got"].append(m["received"] / m["expected"])
        per_message = max(per_message, m["elapsed"] / burst)
    interval = min(max(2 * per_message, 0.002), max_interval)
    slowest = max(interval, 1.5 * per_message)
    for peer in rotate(peers, offset + 1):
        m = run_phase(
            servers[peer],
            pools[peer],
            count=paced,
            size=size,
            binary=binary,
            interval=interval,
            timeout=timeout + paced * slowest,
        )
        samples[peer]["lat"] += m["latencies"]
        samples[peer]["got"].append(m["received"] / m["expected"])


def summarize(samples):
    """``{peer: {rate, p50, p99, client_cores, delivered}}``: the median
    rate, latency percentiles over all paced messages, the load generator's
    busiest, and the worst delivered fraction."""
    return {
        peer: {
            "rate": statistics.median(d["rates"]),
            "p50": percentile(d["lat"], 50),
            "p99": percentile(d["lat"], 99),
            "client_cores": max(d["ccpu"]),
            "delivered": min(d["got"]),
        }
        for peer, d in samples.items()
    }


def measure_interleaved(servers, pools, peers, *, rounds, burst, paced, size):
    """``rounds`` of :func:`measure_round` for text messages, summarized."""
    samples = new_samples(peers)
    for r in range(rounds):
        measure_round(
            servers, pools, peers, samples, r, burst=burst, paced=paced, size=size
        )
    return summarize(samples)


#: Seconds every server is left idle, before a measurement, to learn the CPU
#: it uses when no message flows.
IDLE_SECONDS = 2.0


def idle_cpu(servers, peers, seconds=IDLE_SECONDS):
    """``{peer: CPU seconds per second}`` each server uses while idle (all
    listeners connected, no message), measured together over ``seconds``."""
    before = {peer: servers[peer].cpu_seconds() for peer in peers}
    time.sleep(seconds)
    return {
        peer: (servers[peer].cpu_seconds() - before[peer]) / seconds for peer in peers
    }


def measure_across_workers(
    workers_list, n, peers, start_server, *, rounds, burst, paced, size
):
    """For each worker count: start every peer's server
    (``start_server(peer, workers)``), connect ``n`` listeners to each, warm
    up, and measure them interleaved (:func:`measure_interleaved`). Returns
    one row per worker count; every server and client is stopped."""
    results = []
    for workers in workers_list:
        servers, pools = {}, {}
        try:
            for peer in peers:
                servers[peer] = start_server(peer, workers)
                pools[peer] = ClientPool(servers[peer].port, n)
                pools[peer].connect(timeout=120)
                if not warm_up(servers[peer], pools[peer]):
                    print(f"  {peer}: not every listener reached after warm-up")
            row = {"workers": workers, "n": n}
            idle = idle_cpu(servers, peers)
            cpu = {peer: servers[peer].cpu_seconds() for peer in peers}
            started = time.monotonic()
            row.update(
                measure_interleaved(
                    servers,
                    pools,
                    peers,
                    rounds=rounds,
                    burst=burst,
                    paced=paced,
                    size=size,
                )
            )
            # Server CPU per message published, per worker (every worker
            # receives and delivers every message), less what the server
            # spends idle over the same time (timers, supervision): the
            # paced phases are mostly waiting, and an idle wake-up several
            # times a second would otherwise count as a cost per message.
            elapsed = time.monotonic() - started
            messages = rounds * (burst + paced)
            for peer in peers:
                used = servers[peer].cpu_seconds() - cpu[peer]
                net = max(used - idle[peer] * elapsed, 0.0)
                row[peer]["cpu_per_message"] = net / messages / workers
                row[peer]["cpu_per_message_gross"] = used / messages / workers
                row[peer]["idle_cpu"] = idle[peer] / workers
            results.append(row)
        finally:
            for pool in pools.values():
                pool.close()
            for server in servers.values():
                server.stop()
    return results
