"""The benchmarks' load generator counts what a server sends, either loop.

``benchmarks._client`` receives with a Python loop or, once built, a C loop
(``benchmarks/_fastclient.c``); the benchmarks trust its counts and arrival
times. Here a raw-socket server sends both loops the same frames (every
length encoding, a zero-length frame, a ping in between, headers split
across reads) and checks the counts, the arrival times and the pong.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from benchmarks._client import build_fast_loop
from benchmarks._servers import make_message
from stargate.frames import Frame, Opcode, serialize_frame

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONNECTIONS = 3
PING = b"abc"


def frame(opcode, payload):
    """An unmasked server frame, as stargate writes it."""
    return serialize_frame(Frame(Opcode(opcode), payload))


#: Four messages, with a ping among them: 7-bit, 16-bit and 64-bit lengths,
#: and an empty frame.
MESSAGES = [
    frame(0x1, b"x" * 32),
    frame(0x2, b"y" * 1000),
    frame(0x9, PING),
    frame(0x2, b"z" * 70000),
    frame(0x1, b""),
]


def pieces(stream, style):
    """``stream`` cut as a server's writes may arrive."""
    if style == "whole":
        return [stream]
    cuts = set()
    offset = 0
    for message in MESSAGES:  # every header split at each of its bytes
        cuts.update(range(offset + 1, offset + 11))
        offset += len(message)
    cuts = sorted(c for c in cuts if c < len(stream))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]


def read_head(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            raise AssertionError("client closed during the handshake")
        data += chunk


def read_pong(conn):
    conn.settimeout(10)
    data = b""
    while len(data) < 6 + len(PING):
        chunk = conn.recv(64)
        if not chunk:
            raise AssertionError("client closed instead of answering the ping")
        data += chunk
    assert data[0] == 0x8A and data[1] == 0x80 | len(PING), data
    mask = data[2:6]
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data[6 : 6 + len(PING)]))


class Client:
    def __init__(self, port, fast):
        command = [sys.executable, "-m", "benchmarks._client"]
        command += ["--port", str(port), "--n", str(CONNECTIONS)]
        if fast:
            command += ["--fast", fast]
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def ask(self, command):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def reply(self):
        line = self.proc.stdout.readline()
        assert line, "the load generator exited"
        return json.loads(line)

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(params=["python", "c"])
def loop(request, tmp_path):
    if request.param == "python":
        return None
    path = build_fast_loop(str(tmp_path))
    assert path, "no C compiler: the C receive loop could not be built"
    return path


@contextlib.contextmanager
def connected(loop):
    """A load generator with ``loop`` and its CONNECTIONS open connections,
    as raw server sockets: ``(client, conns)``."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    client = Client(listener.getsockname()[1], loop)
    conns = []
    try:
        client.proc.stdin.write(json.dumps({"op": "connect", "timeout": 10}) + "\n")
        client.proc.stdin.flush()
        for _ in range(CONNECTIONS):
            conn, _ = listener.accept()
            conns.append(conn)
            read_head(conn)
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            conn.sendall(frame(0x1, b"ready"))
        assert client.reply()["open"] == CONNECTIONS
        yield client, conns
    finally:
        client.close()
        for conn in conns:
            conn.close()
        listener.close()


def test_both_receive_loops_count_every_frame_and_answer_pings(loop):
    with connected(loop) as (client, conns):
        assert client.ask({"op": "expect", "count": 4, "timeout": 10}) == {"ok": True}
        start = time.time_ns()
        stream = b"".join(MESSAGES)
        pongs = []

        def serve(conn, style):
            for piece in pieces(stream, style):
                conn.sendall(piece)
                if style == "split":
                    time.sleep(0.002)  # separate reads on the other side
            pongs.append(read_pong(conn))

        styles = ["split", "whole", "split"]
        threads = [
            threading.Thread(target=serve, args=(c, s)) for c, s in zip(conns, styles)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        report = client.reply()
        end = time.time_ns()

        assert pongs == [PING] * CONNECTIONS
        assert report["received"] == 4 * CONNECTIONS
        assert report["complete"] == CONNECTIONS
        assert report["open"] == CONNECTIONS
        assert len(report["last"]) == 4
        assert all(start <= t <= end for t in report["last"]), report
        assert report["last"] == sorted(report["last"])
        assert start <= report["first"] <= min(report["last"])

        # A close frame ends that connection; the next phase counts the rest.
        conns[0].sendall(frame(0x8, b"\x03\xe8"))
        assert client.ask({"op": "expect", "count": 1, "timeout": 10}) == {"ok": True}
        for conn in conns[1:]:
            conn.sendall(frame(0x1, b"again"))
        report = client.reply()
        assert report["open"] == CONNECTIONS - 1
        assert report["received"] == report["complete"] == CONNECTIONS - 1


def numbered(number):
    """A message as the benchmark servers number them."""
    return frame(0x1, make_message(number, 64, False)[1].encode())


def test_both_receive_loops_match_messages_by_their_number(loop):
    """A message of an earlier phase that arrives late is not counted, and
    messages are told apart by number, not by the order they come in."""
    with connected(loop) as (client, conns):
        command = {"op": "expect", "count": 2, "timeout": 2, "first": 10}
        assert client.ask(command) == {"ok": True}
        conns[0].sendall(numbered(10) + numbered(11))
        conns[1].sendall(numbered(9))  # late, from the phase before
        conns[2].sendall(numbered(9) + numbered(11) + numbered(10))
        report = client.reply()  # at the phase's timeout: conns[1] is short
        # By order, the late message would count as message 10 twice over.
        assert report["received"] == 4
        assert report["complete"] == 2
        assert all(report["last"]), report
