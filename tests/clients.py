"""Real servers and real clients for the end-to-end tests, every wait bounded.

* :class:`ServerProcess` runs a server command (``stargate demo``,
  ``pserve``) in a subprocess, collects its output, finds the URL it serves
  and stops it with a signal.
* :func:`connect` opens a WebSocket with the ``websockets`` sync client.
  The test process is monkey-patched by ``tests/conftest.py``; the sync
  client's thread and socket then are the runtime's green ones, which it runs
  on unchanged, and the server it talks to is always another process.
* :func:`raw_request` sends bytes on a plain socket and reads the HTTP
  response, for requests no well-behaved client would send.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from stargate.testing.client import open_websocket

__all__ = [
    "ServerProcess",
    "HTTPResponse",
    "http",
    "connect",
    "raw_request",
    "free_port",
    "wait_until",
    "stargate_command",
]

#: Seconds a server gets to start accepting connections.
START_TIMEOUT = 30.0

#: Seconds any single client operation may take.
CLIENT_TIMEOUT = 10.0


def view_app(view, path, **settings):
    """A Pyramid app with stargate included and one ``view`` at ``path``."""
    from pyramid.config import Configurator

    with Configurator(settings=settings) as config:
        config.include("stargate")
        config.add_route("only", path)
        config.add_view(view, route_name="only")
        return config.make_wsgi_app()


def stargate_command(*args):
    """``stargate ARGS`` run with this interpreter (``python -m stargate``)."""
    return [sys.executable, "-W", "ignore", "-m", "stargate", *args]


def free_port(host="127.0.0.1"):
    """A port nothing listens on right now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout, interval=0.05, message="condition"):
    """Call ``predicate`` until it returns something true; fail after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


class ServerProcess:
    """A server in a subprocess, with its combined output kept in ``lines``.

    ``url_pattern`` is a regular expression whose first group is the base
    URL the server prints once it accepts connections; or give ``port`` to
    poll that port on 127.0.0.1 instead.
    """

    def __init__(self, command, *, url_pattern=None, port=None, cwd=None, env=None):
        self.command = list(command)
        self.url_pattern = re.compile(url_pattern) if url_pattern else None
        self.port = port
        self.lines = []
        self.url = None
        environment = dict(os.environ if env is None else env)
        environment.setdefault("PYTHONUNBUFFERED", "1")
        self.process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=environment,
        )
        self.pid = self.process.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.process.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def output(self):
        return "\n".join(self.lines)

    def wait_ready(self, timeout=START_TIMEOUT):
        """Wait until the server accepts connections; return its base URL."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._collect_output(deadline)
                raise AssertionError(
                    f"server exited with {self.process.returncode} before "
                    f"serving:\n{self.output}"
                )
            if self.url_pattern is not None:
                for line in list(self.lines):
                    match = self.url_pattern.search(line)
                    if match:
                        self.url = match.group(1).rstrip("/")
                        return self.url
            elif self._accepts(self.port):
                self.url = f"http://127.0.0.1:{self.port}"
                return self.url
            time.sleep(0.05)
        raise AssertionError(f"server did not start within {timeout} s:\n{self.output}")

    @staticmethod
    def _accepts(port):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    @property
    def ws_url(self):
        return "ws" + self.url[len("http") :]

    def signal(self, signum):
        if self.process.poll() is None:
            os.kill(self.pid, signum)

    def wait(self, timeout):
        """Wait for the process to exit; its exit code (fails on timeout)."""
        deadline = time.monotonic() + timeout
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"server still running {timeout} s later:\n{self.output}"
            ) from None
        self._collect_output(deadline)
        return status

    def _collect_output(self, deadline):
        """Let the reader take the last lines a process printed as it exited
        (it stops at end of file, once nothing holds the pipe open)."""
        self._reader.join(timeout=max(deadline - time.monotonic(), 1.0))

    def stop(self, timeout=15.0):
        """SIGTERM, then SIGKILL if it is still running after ``timeout``."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._reader.join(timeout=5)
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop(timeout=5)


def assert_held_back_until(port, release):
    """A plain GET on ``port`` gets no answer while every connection slot of
    the server is taken, and a 200 once ``release()`` ended a connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as waiting:
        waiting.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        waiting.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting.recv(1024)  # every slot is taken
        release()
        waiting.settimeout(CLIENT_TIMEOUT)
        assert waiting.recv(1024).startswith(b"HTTP/1.1 200 ")


def connect(url, **kwargs):
    """A ``websockets`` sync client connection with bounded timeouts."""
    kwargs.setdefault("open_timeout", CLIENT_TIMEOUT)
    kwargs.setdefault("close_timeout", CLIENT_TIMEOUT)
    return open_websocket(url, **kwargs)


class HTTPResponse:
    """An HTTP response read off a raw socket: status, headers, body."""

    def __init__(self, raw):
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.body = body
        self.text = body.decode("utf-8", "replace")

    def __repr__(self):
        return f"<HTTPResponse {self.status_line!r}>"


def raw_request(url, request, timeout=CLIENT_TIMEOUT):
    """Send ``request`` (bytes) to the server at ``url``; the HTTP response.

    Reads until the server closes the connection or the body announced by
    ``Content-Length`` has arrived.
    """
    host, port = re.match(r"\w+://([^:/]+):(\d+)", url).groups()
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                if match and len(body) >= int(match.group(1)):
                    break
    if b"\r\n\r\n" not in data:
        raise AssertionError(f"no complete HTTP response: {data!r}")
    return HTTPResponse(data)


def http(url, method="GET", body=b"", headers=()):
    """A plain HTTP/1.0 request on a raw socket; the response."""
    match = re.match(r"\w+://[^/]+(/.*)?$", url)
    path = match.group(1) or "/"
    host = url.split("://", 1)[1].split("/", 1)[0]
    lines = [f"{method} {path} HTTP/1.0", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    return raw_request(url, request)
