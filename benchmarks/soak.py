"""Soak test: many clients on two workers through Redis, for minutes.

::

    python benchmarks/soak.py --clients 1000 --minutes 10
    python benchmarks/soak.py --quick            # a few seconds, for CI

It starts a private ``redis-server`` (never the one on 6379) and ``stargate
demo --workers 2 --backend redis://...`` on a free loopback port, then opens
``--clients`` WebSockets to the demo's chat room ``/rooms/soak`` from a few
lean client processes (raw sockets and ``selectors``, one epoll each). A
publisher connection sends ``--rate`` numbered messages a second into the
room; the room broadcasts each to every listener, on both workers, through
Redis. Every second ``--churn`` of the clients leave (a clean close) and as
many new ones join.

What it measures:

lost
    among connected clients: a client counts from the first message it
    receives; any number it skips after that, or misses at the end (the
    publisher's last number is checked once everything drained), is lost.
    Target 0.
RSS and file descriptors
    of each worker process, sampled over time. Target: flat once the client
    population is up, and no descriptor leak while clients come and go.

It prints a table while it runs and a summary at the end, writes a PNG plot
(``--plot``) and, with ``--json PATH``, the summary as JSON. The exit status
is 1 if a message was lost, a worker died or a client was dropped by the
server.
"""

import argparse
import base64
import json
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ROOM = "/rooms/soak"

# -- the client process ------------------------------------------------------------

CONNECTING, OPEN, LEAVING = range(3)


class Client:
    __slots__ = ("sock", "state", "buf", "first", "last", "received", "gaps", "left")

    def __init__(self, sock):
        self.sock = sock
        self.state = CONNECTING
        self.buf = bytearray()
        self.first = None
        self.last = None
        self.received = 0
        self.gaps = 0
        self.left = False


def _masked(opcode, payload):
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


class ClientWorker:
    """Keeps ``n`` listeners in the room, churning ``churn`` of them a second."""

    def __init__(self, port, n, churn, seed):
        self.port = port
        self.n = n
        self.churn = churn
        self.random = random.Random(seed)
        self.selector = selectors.DefaultSelector()
        self.clients = set()
        self.totals = dict(
            received=0,
            gaps=0,
            joins=0,
            leaves=0,
            refused=0,
            dropped=0,
            latency_sum=0.0,
            latency_max=0.0,
        )

    def open_one(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {ROOM} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        client = Client(sock)
        client.buf = bytearray()
        self.clients.add(client)
        self.selector.register(sock, selectors.EVENT_WRITE, (client, request))

    def _send(self, client, data):
        try:
            client.sock.sendall(data)  # small frames: the kernel takes them
        except (BlockingIOError, OSError):
            pass

    def _gone(self, client, dropped):
        if client not in self.clients:
            return
        self.clients.discard(client)
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        if client.state == CONNECTING:
            self.totals["refused"] += 1
        elif dropped and client.state == OPEN:
            self.totals["dropped"] += 1

    def leave(self, client):
        client.state = LEAVING
        self._send(client, _masked(0x8, struct.pack("!H", 1000)))
        self.totals["leaves"] += 1

    def on_event(self, key, mask):
        client, request = key.data
        if mask & selectors.EVENT_WRITE:
            try:
                client.sock.sendall(request)
            except OSError:
                self._gone(client, False)
                return
            self.selector.modify(client.sock, selectors.EVENT_READ, (client, None))
            return
        try:
            data = client.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._gone(client, client.state == OPEN)
            return
        client.buf += data
        if client.state == CONNECTING:
            end = client.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not client.buf.startswith(b"HTTP/1.1 101"):
                self._gone(client, False)
                return
            del client.buf[: end + 4]
            client.state = OPEN
            self.totals["joins"] += 1
        self.parse(client)

    def parse(self, client):
        buf = client.buf
        while len(buf) >= 2:
            opcode = buf[0] & 0x0F
            length = buf[1] & 0x7F
            offset = 2
            if length == 126:
                if len(buf) < 4:
                    return
                (length,) = struct.unpack_from("!H", buf, 2)
                offset = 4
            elif length == 127:
                if len(buf) < 10:
                    return
                (length,) = struct.unpack_from("!Q", buf, 2)
                offset = 10
            if len(buf) < offset + length:
                return
            payload = bytes(buf[offset : offset + length])
            del buf[: offset + length]
            if opcode == 0x1:
                self.on_message(client, payload)
            elif opcode == 0x9:
                self._send(client, _masked(0xA, payload))
            elif opcode == 0x8:
                if client.state == OPEN:
                    self._send(client, _masked(0x8, payload[:2]))
                self._gone(client, True)
                return

    def on_message(self, client, payload):
        if client.state != OPEN:
            return
        parts = payload.split(b" ")
        if len(parts) != 3 or parts[0] != b"seq":
            return
        seq = int(parts[1])
        latency = time.time() - int(parts[2]) / 1e9
        self.totals["latency_sum"] += latency
        self.totals["latency_max"] = max(self.totals["latency_max"], latency)
        client.received += 1
        self.totals["received"] += 1
        if client.last is not None and seq != client.last + 1:
            self.totals["gaps"] += max(seq - client.last - 1, 0)
        if client.first is None:
            client.first = seq
        client.last = seq if client.last is None else max(seq, client.last)

    def report(self, **extra):
        open_count = sum(1 for c in self.clients if c.state == OPEN)
        line = dict(self.totals, open=open_count, **extra)
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    def run(self):
        for _ in range(self.n):
            self.open_one()
        self.selector.register(sys.stdin, selectors.EVENT_READ, None)
        next_tick = time.monotonic() + 1.0
        churning = False
        while True:
            for key, mask in self.selector.select(timeout=0.2):
                if key.data is None:
                    line = sys.stdin.readline()
                    if not line:
                        return
                    command = json.loads(line)
                    if command["op"] == "churn":
                        churning = command["on"]
                    elif command["op"] == "final":
                        self.final(command["seq"])
                        return
                    continue
                self.on_event(key, mask)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + 1.0
                self.report()
                if churning:
                    self.churn_once()

    def churn_once(self):
        open_clients = [c for c in self.clients if c.state == OPEN]
        count = min(len(open_clients), round(self.n * self.churn))
        for client in self.random.sample(open_clients, count):
            self.leave(client)
        # Top up: leavers still in self.clients until the server closes them.
        live = sum(1 for c in self.clients if c.state != LEAVING)
        for _ in range(max(self.n - live, 0)):
            self.open_one()

    def final(self, last_seq):
        trailing = silent = 0
        for client in self.clients:
            if client.state != OPEN:
                continue
            if client.last is None:
                silent += 1  # open through the drain, yet never received
            else:
                trailing += max(last_seq - client.last, 0)
        self.totals["gaps"] += trailing
        self.totals["silent"] = silent
        self.report(final=True, trailing=trailing)
        for client in list(self.clients):
            if client.state == OPEN:
                self._send(client, _masked(0x8, struct.pack("!H", 1001)))
            client.sock.close()


# -- the controller -------------------------------------------------------------


class Publisher:
    """One connection in the room that sends ``seq <n> <time_ns>`` messages."""

    def __init__(self, port):
        import warnings

        from websockets.sync.client import connect

        warnings.filterwarnings("ignore", message=".*context manager")

        self.connection = connect(
            f"ws://127.0.0.1:{port}{ROOM}",
            compression=None,
            ping_interval=None,
            max_size=None,
            proxy=None,
        )
        self.seq = 0
        self._stop = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):  # the publisher is a listener too: read and discard
        try:
            while not self._stop.is_set():
                try:
                    self.connection.recv(timeout=0.5)
                except TimeoutError:
                    pass
        except Exception:
            pass

    def publish(self):
        self.seq += 1
        self.connection.send(f"seq {self.seq} {time.time_ns()}")

    def close(self):
        self._stop.set()
        self.connection.close()


def start_server(redis_url, workers):
    command = [
        sys.executable,
        "-m",
        "stargate",
        "demo",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--workers",
        str(workers),
        "--backend",
        redis_url,
        "--log-level",
        "warning",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=sys.stderr, env=env, text=True
    )
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "http://" in line or not line:
            break
    if "http://" not in line:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    port = int(line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, port


def worker_processes(proc, expected, timeout=15):
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        children = psutil.Process(proc.pid).children()
        if len(children) >= expected or time.monotonic() > deadline:
            return children
        time.sleep(0.1)


def sample_workers(workers):
    out = []
    for p in workers:
        try:
            out.append((p.pid, p.memory_info().rss / 2**20, p.num_fds()))
        except Exception:  # the worker died: psutil.NoSuchProcess
            out.append((p.pid, float("nan"), -1))
    return out


def warm_up(port, redis_server, workers, tries=200):
    """Join the room one connection at a time until every worker has
    subscribed to it in Redis; returns the connections, to be closed once
    the crowd is in. Before 1d1ede5 two hub races lost listeners when
    clients arrived together (the Redis backend started twice on a fresh
    worker; the first listeners of a channel replaced each other's set):
    ``--no-warmup`` lets the crowd arrive at once, to check they stay
    fixed (lost listeners show as ``silent`` clients)."""
    import warnings

    from websockets.sync.client import connect

    warnings.filterwarnings("ignore", message=".*context manager")

    def subscribed():
        with redis_server.client() as client:
            return sum(
                1
                for c in client.client_list()
                if int(c.get("sub", 0)) or int(c.get("ssub", 0))
            )

    connections = []
    for _ in range(tries):
        connections.append(
            connect(f"ws://127.0.0.1:{port}{ROOM}", compression=None, proxy=None)
        )
        time.sleep(0.05)
        if subscribed() >= workers:
            break
    return connections


def start_clients(port, clients, processes, churn):
    procs = []
    per = [clients // processes + (i < clients % processes) for i in range(processes)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    for i, n in enumerate(per):
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--client-worker",
                    f"{port},{n},{churn},{i}",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    latest = [None] * len(procs)

    def reader(i, proc):
        for line in proc.stdout:
            latest[i] = json.loads(line)

    for i, proc in enumerate(procs):
        threading.Thread(target=reader, args=(i, proc), daemon=True).start()
    return procs, latest


def command(procs, message):
    for proc in procs:
        try:
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()
        except OSError:
            pass


def totals(latest):
    keys = ("open", "received", "gaps", "joins", "leaves", "refused", "dropped")
    keys += ("silent",)
    out = {k: sum((r or {}).get(k, 0) for r in latest) for k in keys}
    received = out["received"] or 1
    out["latency_mean_ms"] = (
        1000 * sum((r or {}).get("latency_sum", 0) for r in latest) / received
    )
    out["latency_max_ms"] = 1000 * max(
        [(r or {}).get("latency_max", 0) for r in latest] or [0]
    )
    return out


def plot(samples, pids, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    times = [s["t"] for s in samples]
    for i, pid in enumerate(pids):
        axes[0].plot(times, [s["workers"][i][1] for s in samples], label=f"pid {pid}")
        axes[1].plot(times, [s["workers"][i][2] for s in samples], label=f"pid {pid}")
    axes[0].set_ylabel("worker RSS (MiB)")
    axes[1].set_ylabel("worker open fds")
    axes[2].plot(times, [s["open"] for s in samples], label="open clients")
    axes[2].plot(times, [s["lost"] for s in samples], label="lost (cumulative)")
    axes[2].set_ylabel("clients / messages")
    axes[2].set_xlabel("seconds")
    for ax in axes:
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args):
    from stargate.testing.redis_server import RedisServer

    duration = args.seconds if args.seconds else args.minutes * 60
    summary = {"clients": args.clients, "seconds": duration, "rate": args.rate}
    with RedisServer() as redis_server:
        server, port = start_server(redis_server.url, args.workers)
        procs = []
        try:
            workers = worker_processes(server, args.workers)
            pids = [p.pid for p in workers]
            warmers = []
            if not args.no_warmup:
                warmers = warm_up(port, redis_server, args.workers)
            processes = args.client_processes or max(1, min(8, args.clients // 250))
            procs, latest = start_clients(port, args.clients, processes, args.churn)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if totals(latest)["open"] >= args.clients:
                    break
                time.sleep(0.2)
            ramp = totals(latest)
            for connection in warmers:
                connection.close()
            print(
                f"soak: {ramp['open']}/{args.clients} clients open on port {port}, "
                f"workers {pids}, redis {redis_server.url}, {duration:.0f} s at "
                f"{args.rate}/s, churn {args.churn:.1%}/s",
                flush=True,
            )
            publisher = Publisher(port)
            time.sleep(0.5)  # the publisher's own listener is attached
            command(procs, {"op": "churn", "on": True})
            header = (
                f"{'t(s)':>6} {'open':>6} {'sent':>7} {'received':>10} {'lost':>5} "
                f"{'joins':>6} {'leaves':>6} "
                + " ".join(
                    f"{'rss' + str(i):>7} {'fds' + str(i):>5}" for i in range(len(pids))
                )
            )
            print(header, flush=True)
            samples = []
            start = time.monotonic()
            next_publish = start
            next_sample = start
            interval = 1.0 / args.rate
            while time.monotonic() - start < duration:
                now = time.monotonic()
                if now >= next_sample:
                    next_sample += args.sample
                    t = totals(latest)
                    sample = {
                        "t": round(now - start, 1),
                        "open": t["open"],
                        "sent": publisher.seq,
                        "received": t["received"],
                        "lost": t["gaps"],
                        "joins": t["joins"],
                        "leaves": t["leaves"],
                        "workers": sample_workers(workers),
                    }
                    samples.append(sample)
                    print(
                        f"{sample['t']:>6.0f} {t['open']:>6} {publisher.seq:>7} "
                        f"{t['received']:>10} {t['gaps']:>5} {t['joins']:>6} "
                        f"{t['leaves']:>6} "
                        + " ".join(
                            f"{w[1]:>7.1f} {w[2]:>5}" for w in sample["workers"]
                        ),
                        flush=True,
                    )
                publisher.publish()
                next_publish += interval
                delay = next_publish - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            command(procs, {"op": "churn", "on": False})
            time.sleep(2.0)  # everything in flight arrives
            final_workers = sample_workers(workers)
            command(procs, {"op": "final", "seq": publisher.seq})
            for proc in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            time.sleep(0.2)
            t = totals(latest)
            publisher.close()
            alive = server.poll() is None and all(w[2] >= 0 for w in final_workers)
            # Flat RSS is judged from when the population was up (the first
            # quarter of the run is warm-up: allocator pools, Redis buffers).
            base = samples[max(0, len(samples) // 4)]["workers"] if samples else []
            summary.update(
                port=port,
                workers=pids,
                published=publisher.seq,
                received=t["received"],
                lost=t["gaps"],
                joins=t["joins"],
                leaves=t["leaves"],
                refused=t["refused"],
                dropped_by_server=t["dropped"],
                silent_clients=t["silent"],
                latency_mean_ms=round(t["latency_mean_ms"], 2),
                latency_max_ms=round(t["latency_max_ms"], 2),
                workers_alive=alive,
                rss_mib_first=[round(w[1], 1) for w in samples[0]["workers"]],
                rss_mib_after_warmup=[round(w[1], 1) for w in base],
                rss_mib_last=[round(w[1], 1) for w in final_workers],
                fds_first=[w[2] for w in samples[0]["workers"]],
                fds_after_warmup=[w[2] for w in base],
                fds_last=[w[2] for w in final_workers],
                samples=len(samples),
            )
            if args.plot:
                plot(
                    samples,
                    pids,
                    args.plot,
                    f"stargate soak: {args.clients} clients, {args.workers} workers, "
                    f"redis, {args.rate} msg/s, {duration:.0f} s",
                )
                summary["plot"] = args.plot
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=5)
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=5)
    print()
    for key in (
        "published",
        "received",
        "lost",
        "joins",
        "leaves",
        "refused",
        "dropped_by_server",
        "silent_clients",
        "latency_mean_ms",
        "latency_max_ms",
        "workers_alive",
        "rss_mib_first",
        "rss_mib_after_warmup",
        "rss_mib_last",
        "fds_first",
        "fds_after_warmup",
        "fds_last",
    ):
        print(f"{key:>22}: {summary[key]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    ok = (
        summary["lost"] == 0
        and alive
        and summary["dropped_by_server"] == 0
        and summary["silent_clients"] == 0
    )
    print("RESULT:", "ok" if ok else "FAILED", flush=True)
    return 0 if ok else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, help="overrides --minutes")
    parser.add_argument("--rate", type=float, default=10.0, help="messages/s")
    parser.add_argument(
        "--churn", type=float, default=0.01, help="fraction of clients leaving/s"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--client-processes", type=int, default=0)
    parser.add_argument("--sample", type=float, default=5.0, help="seconds")
    parser.add_argument(
        "--plot", default=os.path.join(HERE, "results", "soak.png"), help="PNG path"
    )
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument(
        "--no-warmup", action="store_true", help="let the crowd start the hubs"
    )
    parser.add_argument("--quick", action="store_true", help="seconds, for CI")
    parser.add_argument("--client-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_worker:
        port, n, churn, seed = args.client_worker.split(",")
        ClientWorker(int(port), int(n), float(churn), int(seed)).run()
        return 0
    if args.quick:
        args.clients = min(args.clients, 40)
        args.seconds = args.seconds or 6.0
        args.rate = 20.0
        args.churn = 0.05
        args.sample = 1.0
        args.client_processes = 1
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
