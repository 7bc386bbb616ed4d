"""A lean load-generating WebSocket client process: many listeners, one epoll.

Run by :class:`benchmarks._harness.ClientPool`, one process per few thousand
connections; it is not meant to be started by hand::

    python -m benchmarks._client --port P --n N [--compress] [--source ADDR]

It does the RFC 6455 handshake by hand on non-blocking sockets, then parses
only frame headers: a data frame is counted when its last byte arrives, and
its payload is skipped, never copied nor decompressed. Pings are answered.

A phase expects ``count`` messages numbered from ``first``: the benchmark
servers put each message's number at its head
(:func:`benchmarks._servers.make_message`), so message k of the phase is the
one numbered ``first + k`` whatever the order it comes in, and a message of
an earlier phase that arrives late is not counted. A data frame whose
number cannot be read (compressed, or sent by another server) is the next in
order on its connection (after its first frame, the server's ``ready``), as
is every frame of a phase started without ``first``. The process keeps, per
message, the latest arrival time (``time.time_ns()``) over its connections,
so the parent can find when the *last* listener got each message.

With ``--fast LIB`` the handshakes are done here and every open connection
is then handed to the same receive loop written in C (``_fastclient.c``,
built by :func:`build_fast_loop`), which costs the machine a few times less
per delivery; the replies are the same.

It talks to its parent in JSON lines: commands on stdin, replies on stdout.

``{"op": "connect", "timeout": s}``
    open the connections; reply ``{"open": n, "failed": f, "cpu": s}`` once
    every connection got its ``ready`` frame (or the timeout passed).
``{"op": "expect", "count": m, "timeout": s, "first": k}``
    start a phase of ``m`` messages numbered from ``k`` (optional): reply
    ``{"ok": true}`` at once, then, when every open connection has received
    ``m`` messages (or at the timeout),
    ``{"last": [ns...], "first": ns, "received": n, "complete": c, "cpu": s}``.
``{"op": "quit"}``
    close everything and exit.
"""

import argparse
import base64
import ctypes
import hashlib
import json
import os
import resource
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

_EVENT_READ = selectors.EVENT_READ
_EVENT_WRITE = selectors.EVENT_WRITE
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

#: Connections whose handshake may be in flight at once.
CONNECT_WINDOW = 512
RECV_SIZE = 262144

HANDSHAKING, WAIT_READY, OPEN, CLOSED = range(4)

#: A numbered message starts ``<20-digit ns timestamp>:<8-digit number>:``.
HEAD_LEN = 30

FAST_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fastclient.c")


def build_fast_loop(build_dir):
    """Compile ``_fastclient.c`` into ``build_dir``; returns the library's
    path, or ``None`` when there is no working C compiler (callers then use
    the Python loop)."""
    return build_c_library(FAST_SOURCE, build_dir, "fastclient")


def build_c_library(source, build_dir, name):
    """Compile the C file ``source`` into a shared library in ``build_dir``
    (for ctypes); returns its path, or ``None`` without a working C compiler
    on Linux. Built once per source version; safe to race."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not sys.platform.startswith("linux"):
        return None
    with open(source, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    target = os.path.join(build_dir, f"{name}-{digest}.so")
    if os.path.exists(target):
        return target
    os.makedirs(build_dir, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=build_dir)
    os.close(fd)
    command = [compiler, "-O2", "-shared", "-fPIC", "-o", partial, source]
    try:
        built = subprocess.run(command, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        built = None
    if built is None or built.returncode != 0:
        os.unlink(partial)
        return None
    os.replace(partial, target)
    return target


class FastLoop:
    """The C receive loop (``_fastclient.c``) over the open connections."""

    def __init__(self, path, conns):
        lib = ctypes.CDLL(path)
        lib.fc_new.restype = ctypes.c_void_p
        lib.fc_new.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.fc_add.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.fc_add.argtypes += [ctypes.c_uint64, ctypes.c_char_p, ctypes.c_int]
        lib.fc_add.argtypes += [ctypes.c_char_p, ctypes.c_int]
        lib.fc_start.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        lib.fc_start.argtypes += [ctypes.c_int64]
        lib.fc_stats.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.fc_poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.fc_close_all.argtypes = [ctypes.c_void_p]
        self.lib = lib
        self.ctx = lib.fc_new(len(conns), 0)
        if not self.ctx:
            raise MemoryError("fc_new failed")
        self.last = (ctypes.c_int64 * 1)()
        for conn in conns:
            hdr, ctl = conn.hdr, conn.ctl or b""
            fd = conn.sock.detach()  # the C loop owns and closes it now
            if lib.fc_add(
                self.ctx, fd, conn.opcode, conn.skip, hdr, len(hdr), ctl, len(ctl)
            ):
                os.close(fd)

    def start(self, count, first=None):
        self.last = (ctypes.c_int64 * max(count, 1))()
        self.lib.fc_start(self.ctx, count, self.last, -1 if first is None else first)

    def poll(self, timeout):
        """Handle events for up to ``timeout`` s; True if stdin is readable."""
        return bool(self.lib.fc_poll(self.ctx, int(timeout * 1000)))

    def stats(self):
        out = (ctypes.c_int64 * 4)()
        self.lib.fc_stats(self.ctx, out)
        received, complete, first, open_conns = out
        return received, complete, first, open_conns

    def close(self):
        self.lib.fc_close_all(self.ctx)


def message_number(head):
    """The number at the head of a benchmark message, or -1 if it has none."""
    if len(head) < HEAD_LEN or head[20:21] != b":" or head[29:30] != b":":
        return -1
    stamp, number = head[:20], head[21:29]
    if not (stamp.isdigit() and number.isdigit()):
        return -1
    return int(number)


class Conn:
    __slots__ = (
        "sock",
        "state",
        "buf",
        "skip",
        "opcode",
        "compressed",
        "ctl",
        "count",
        "got",
        "hdr",
    )

    def __init__(self, sock):
        self.sock = sock
        self.state = HANDSHAKING
        self.buf = b""  # handshake response bytes
        self.hdr = b""  # a partial frame header
        self.skip = 0  # payload bytes of the current frame still to come
        self.opcode = -1  # opcode of the current frame; -1 between frames
        self.compressed = False  # the current frame has RSV1 set
        # Payload of a control frame being collected, or the first HEAD_LEN
        # bytes of a data frame's (its number).
        self.ctl = None
        self.count = 0  # data frames received in this phase
        self.got = 0  # of them, messages of this phase


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Client:
    def __init__(self, args):
        self.args = args
        self.sel = selectors.DefaultSelector()
        self.conns = []
        self.expected = 0
        self.first_number = None  # number of the phase's first message
        self.last = []
        self.first = 0
        self.received = 0
        self.complete = 0
        self.phase_cpu = 0.0
        self.phase_deadline = None
        self.ready = 0
        self.failed = 0
        key = base64.b64encode(os.urandom(16)).decode()
        ext = (
            "Sec-WebSocket-Extensions: permessage-deflate\r\n" if args.compress else ""
        )
        self.request = (
            f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
        ).encode()
        self.stdin_buf = b""

    # -- parent channel ---------------------------------------------------

    def reply(self, obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def read_commands(self):
        chunk = os.read(0, 65536)
        if not chunk:
            return [{"op": "quit"}]
        self.stdin_buf += chunk
        *lines, self.stdin_buf = self.stdin_buf.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    # -- connecting -------------------------------------------------------

    def connect_all(self, timeout):
        args = self.args
        deadline = time.monotonic() + timeout
        cpu0 = time.process_time()
        pending = 0
        started = 0
        address = (args.host, args.port)
        while time.monotonic() < deadline:
            while started < args.n and pending < CONNECT_WINDOW:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                if args.source:
                    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((args.source, 0))
                try:
                    sock.connect(address)
                except BlockingIOError:
                    pass
                except OSError:
                    self.failed += 1
                    sock.close()
                    started += 1
                    continue
                conn = Conn(sock)
                self.conns.append(conn)
                self.sel.register(sock, _EVENT_WRITE, conn)
                pending += 1
                started += 1
            if started >= args.n and pending == 0:
                break
            for key, events in self.sel.select(0.2):
                conn = key.data
                if conn is None:
                    continue  # stdin: commands wait until we are connected
                before = conn.state
                self.on_event(conn, events)
                if before != conn.state and conn.state in (OPEN, CLOSED):
                    pending -= 1
        for conn in self.conns:
            if conn.state in (HANDSHAKING, WAIT_READY):
                self.close(conn)
        self.conns = [c for c in self.conns if c.state == OPEN]
        self.reply(
            {
                "open": len(self.conns),
                "failed": args.n - len(self.conns),
                "cpu": time.process_time() - cpu0,
            }
        )

    def close(self, conn):
        if conn.state == CLOSED:
            return
        conn.state = CLOSED
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    # -- events -------------------------------------------------------------

    def on_event(self, conn, events):
        sock = conn.sock
        if conn.state == HANDSHAKING and events & _EVENT_WRITE and not conn.buf:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.close(conn)
                return
            try:
                sock.send(self.request)
            except OSError:
                self.close(conn)
                return
            conn.buf = b" "  # marks the request as sent
            self.sel.modify(sock, _EVENT_READ, conn)
            return
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        now = time.time_ns()
        if conn.state == HANDSHAKING:
            conn.buf += data
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.buf) > 8192:
                    self.close(conn)
                return
            head = conn.buf[1 : end + 4]
            data = conn.buf[end + 4 :]
            conn.buf = b""
            if not head.startswith(b"HTTP/1.1 101"):
                self.close(conn)
                return
            conn.state = WAIT_READY
            if not data:
                return
        self.feed(conn, data, now)

    def feed(self, conn, data, now):
        pos = 0
        n = len(data)
        while True:
            if conn.opcode >= 0:
                take = conn.skip if conn.skip <= n - pos else n - pos
                if conn.ctl is not None:
                    if conn.opcode >= 8:
                        conn.ctl += data[pos : pos + take]
                    elif len(conn.ctl) < HEAD_LEN:
                        more = min(take, HEAD_LEN - len(conn.ctl))
                        conn.ctl += data[pos : pos + more]
                conn.skip -= take
                pos += take
                if conn.skip:
                    return
                self.frame_done(conn, now)
            if pos >= n:
                return
            if conn.hdr:
                data = conn.hdr + data[pos:]
                conn.hdr = b""
                pos = 0
                n = len(data)
            if n - pos < 2:
                conn.hdr = data[pos:]
                return
            b0 = data[pos]
            length = data[pos + 1] & 0x7F
            if length == 126:
                if n - pos < 4:
                    conn.hdr = data[pos:]
                    return
                length = (data[pos + 2] << 8) | data[pos + 3]
                pos += 4
            elif length == 127:
                if n - pos < 10:
                    conn.hdr = data[pos:]
                    return
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                pos += 10
            else:
                pos += 2
            opcode = b0 & 0x0F
            conn.opcode = opcode
            conn.compressed = bool(b0 & 0x40)
            conn.skip = length
            conn.ctl = b"" if opcode >= 8 or self.first_number is not None else None

    def frame_done(self, conn, now):
        opcode = conn.opcode
        conn.opcode = -1
        if opcode >= 8:
            payload, conn.ctl = conn.ctl, None
            if opcode == 9:
                self.pong(conn, payload)
            elif opcode == 8:
                self.close(conn)
            return
        head, conn.ctl = conn.ctl, None
        if conn.state == WAIT_READY:
            conn.state = OPEN
            self.ready += 1
            return
        number = -1
        if self.first_number is not None and not conn.compressed and head:
            number = message_number(head)
        index = number - self.first_number if number >= 0 else conn.count
        conn.count += 1
        if 0 <= index < self.expected:
            self.received += 1
            last = self.last
            if now > last[index]:
                last[index] = now
            if not self.first or now < self.first:
                self.first = now
            conn.got += 1
            if conn.got == self.expected:
                self.complete += 1

    def pong(self, conn, payload):
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        frame = struct.pack("!BB", 0x8A, 0x80 | len(payload)) + mask + masked
        try:
            conn.sock.send(frame)
        except OSError:
            self.close(conn)

    # -- phases -------------------------------------------------------------

    def start_phase(self, count, timeout, first=None):
        for conn in self.conns:
            conn.count = conn.got = 0
        self.expected = count
        self.first_number = first
        self.last = [0] * count
        self.first = 0
        self.received = 0
        self.complete = 0
        self.phase_cpu = time.process_time()
        self.phase_deadline = time.monotonic() + timeout
        self.reply({"ok": True})

    def end_phase(self):
        open_conns = sum(1 for c in self.conns if c.state == OPEN)
        self.reply(
            {
                "last": self.last,
                "first": self.first,
                "received": self.received,
                "complete": self.complete,
                "open": open_conns,
                "cpu": time.process_time() - self.phase_cpu,
            }
        )
        self.expected = 0
        self.first_number = None
        self.phase_deadline = None

    def run(self):
        self.sel.register(0, _EVENT_READ, None)
        while True:
            timeout = 0.5
            if self.phase_deadline is not None:
                open_conns = sum(1 for c in self.conns if c.state == OPEN)
                if (
                    self.complete >= open_conns
                    or time.monotonic() >= self.phase_deadline
                ):
                    self.end_phase()
                timeout = 0.05
            for key, events in self.sel.select(timeout):
                conn = key.data
                if conn is not None:
                    self.on_event(conn, events)
                    continue
                for command in self.read_commands():
                    op = command["op"]
                    if op == "connect":
                        self.connect_all(command.get("timeout", 60))
                    elif op == "expect":
                        self.start_phase(
                            command["count"],
                            command.get("timeout", 60),
                            command.get("first"),
                        )
                    elif op == "quit":
                        for conn in self.conns:
                            self.close(conn)
                        return

    def run_fast(self, path):
        """:meth:`run`, with :class:`FastLoop` receiving once connected."""
        loop = None
        count = 0
        deadline = None
        cpu0 = 0.0
        while True:
            if loop is None:
                command_waiting = True  # nothing to receive yet: wait on stdin
            else:
                command_waiting = loop.poll(0.05 if deadline is not None else 0.5)
            if deadline is not None:
                received, complete, first, open_conns = loop.stats()
                if complete >= open_conns or time.monotonic() >= deadline:
                    self.reply(
                        {
                            "last": list(loop.last)[:count],
                            "first": first,
                            "received": received,
                            "complete": complete,
                            "open": open_conns,
                            "cpu": time.process_time() - cpu0,
                        }
                    )
                    deadline = None
                    loop.start(0)
            if not command_waiting:
                continue
            for command in self.read_commands():
                op = command["op"]
                if op == "connect" and loop is None:
                    self.connect_all(command.get("timeout", 60))
                    for conn in self.conns:
                        self.sel.unregister(conn.sock)
                    loop = FastLoop(path, self.conns)
                    self.conns = []
                elif op == "expect" and loop is not None:
                    count = command["count"]
                    cpu0 = time.process_time()
                    loop.start(count, command.get("first"))
                    deadline = time.monotonic() + command.get("timeout", 60)
                    self.reply({"ok": True})
                elif op == "quit":
                    if loop is not None:
                        loop.close()
                    return


def main(argv=None):
    parser = argparse.ArgumentParser(description="benchmark load generator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/listen")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--compress", action="store_true")
    parser.add_argument("--source", default=None, help="local address to bind")
    parser.add_argument("--fast", default=None, help="the built C receive loop")
    args = parser.parse_args(argv)
    raise_nofile()
    if args.fast:
        Client(args).run_fast(args.fast)
    else:
        Client(args).run()


if __name__ == "__main__":
    main()
