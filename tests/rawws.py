"""A WebSocket client on a plain socket, for what client libraries hide:
when each ping arrives, not answering pings, bytes sent with the upgrade
request, frames no library would send. Every read is bounded by a deadline.
"""

import base64
import os
import socket
import struct
import time

from stargate.frames import apply_mask

#: Seconds any single read may wait.
READ_TIMEOUT = 10.0


def upgrade_request(port, path="/"):
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Origin: http://127.0.0.1:{port}\r\n"
        "\r\n"
    ).encode()


def client_frame(opcode, payload=b"", fin=True):
    """A masked frame, as a client must send it."""
    if isinstance(payload, str):
        payload = payload.encode()
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + apply_mask(payload, mask)


def _parse(data):
    """``(opcode, payload, bytes used)`` of an unmasked frame, or None."""
    if len(data) < 2:
        return None
    n, at = data[1] & 0x7F, 2
    if n == 126:
        if len(data) < 4:
            return None
        (n,) = struct.unpack("!H", data[2:4])
        at = 4
    elif n == 127:
        if len(data) < 10:
            return None
        (n,) = struct.unpack("!Q", data[2:10])
        at = 10
    if len(data) < at + n:
        return None
    return data[0] & 0x0F, data[at : at + n], at + n


class RawClient:
    """An RFC 6455 client on a plain socket that reads frames one by one."""

    def __init__(self, port, path="/", *, extra=b"", rcvbuf=None, hold_back=False):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = b""
        self.status = None
        request = upgrade_request(port, path) + extra
        if hold_back:
            # All but the blank line that ends the head: the server waits for
            # it until finish_upgrade().
            self._rest = request[len(request) - len(extra) - 2 :]
            self.sock.sendall(request[: len(request) - len(extra) - 2])
        else:
            self._rest = b""
            self.sock.sendall(request)
            self._read_status()

    def finish_upgrade(self):
        """Send what ``hold_back`` kept and read the response's head."""
        self.sock.sendall(self._rest)
        self._rest = b""
        self._read_status()

    def _read_status(self):
        head = self._read_until(b"\r\n\r\n")
        self.status = head.split(b"\r\n", 1)[0]

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out waiting for the server")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError("timed out waiting for the server") from None
        if not chunk:
            raise EOFError("the server closed the connection")
        self.buffer += chunk

    def _read_until(self, marker, timeout=READ_TIMEOUT):
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            self._fill(deadline)
        head, self.buffer = self.buffer.split(marker, 1)
        return head

    def frame(self, timeout=READ_TIMEOUT):
        """``(opcode, payload)`` of the next frame from the server; raises
        EOFError when the server closes the connection first, and
        AssertionError (leaving a partial frame buffered) on the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            parsed = _parse(self.buffer)
            if parsed is not None:
                opcode, payload, used = parsed
                self.buffer = self.buffer[used:]
                return opcode, payload
            self._fill(deadline)

    def send(self, opcode, payload=b""):
        self.sock.sendall(client_frame(opcode, payload))

    def close_code(self, timeout=READ_TIMEOUT):
        """Read frames until the server's close frame; its code. Pings are
        not answered."""
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload = self.frame(max(deadline - time.monotonic(), 0.001))
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0] if payload else 1005

    def at_eof(self, timeout=READ_TIMEOUT):
        """True once the server closed its side (discarding what comes
        before)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.buffer = b""
                self._fill(deadline)
        except EOFError:
            return True

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
