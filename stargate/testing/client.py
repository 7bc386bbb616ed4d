"""A WebSocket client for tests, built on the ``websockets`` library.

It is an independent implementation of RFC 6455, so a test that passes
through it shows that stargate talks to a real client, not only to itself.
"""

import importlib
import inspect
import socket
import time
from typing import Any

__all__ = [
    "connect",
    "connect_app",
    "open_websocket",
    "TestClient",
    "ReceiveTimeout",
    "UnexpectedMessage",
    "UpgradeRefused",
]


def _websockets(module: str) -> Any:
    """Import a module of the ``websockets`` library, or say how to get it
    (it is in the ``testing`` extra, not a dependency of stargate)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "stargate.testing needs the websockets library: "
            "pip install 'stargate[testing]'"
        ) from exc


def open_websocket(url: str, **options: Any) -> Any:
    """``websockets.sync.client.connect(url, **options)`` for a connection the
    caller closes itself, outside a ``with`` block.

    websockets 17.1 deprecates calling ``connect()`` outside a ``with`` block
    unless ``legacy=True`` says this is meant; earlier versions have no such
    keyword and need none.
    """
    ws_connect = _websockets("websockets.sync.client").connect
    if "legacy" in inspect.signature(ws_connect).parameters:
        options.setdefault("legacy", True)
    return ws_connect(url, **options)


class ReceiveTimeout(AssertionError):
    """No message arrived within the timeout."""


class UnexpectedMessage(AssertionError):
    """A message arrived where none was expected."""


class UpgradeRefused(Exception):
    """The server answered the upgrade request with an HTTP error.

    ``status``, ``headers`` and ``body`` are the server's response.
    """

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body
        text = body.decode("utf-8", "replace").strip()
        super().__init__(f"upgrade refused with HTTP {status}: {text[:500]}")


def connect(
    url,
    *,
    headers=None,
    subprotocols=None,
    origin=None,
    compression=True,
    max_size=2**24,
    timeout=10.0,
    sock=None,
):
    """Open a WebSocket to ``url`` and return a :class:`TestClient`.

    Raises :class:`UpgradeRefused` when the server refuses the upgrade.
    ``compression`` offers permessage-deflate like browsers do. ``sock`` is
    an already connected socket to speak over instead of dialling ``url``.
    """
    InvalidStatus = _websockets("websockets.exceptions").InvalidStatus
    try:
        connection = open_websocket(
            url,
            additional_headers=headers,
            subprotocols=subprotocols,
            origin=origin,
            compression="deflate" if compression else None,
            max_size=max_size,
            open_timeout=timeout,
            ping_interval=None,
            close_timeout=timeout,
            proxy=None,
            sock=sock,
            # Over a socket pair: no TCP options to set.
            unix=sock is not None and sock.family == socket.AF_UNIX,
        )
    except InvalidStatus as exc:
        response = exc.response
        raise UpgradeRefused(
            response.status_code, dict(response.headers.raw_items()), response.body
        ) from None
    return TestClient(connection)


def connect_app(app, path="/", **options):
    """Connect to a WSGI ``app`` in this process, through a real upgrade but
    no network: the client and stargate's server (on the runtime of
    :func:`stargate.runtime.current`) talk over a socket pair. Takes the
    options of :func:`connect`; needs the runtime's monkey-patching, as
    :class:`~stargate.testing.server.LiveServer` does.
    """
    import importlib

    from stargate import runtime

    server = importlib.import_module(f"stargate.servers.{runtime.current().NAME}")
    server_end, client_end = socket.socketpair()
    server.serve_connection(app, server_end, ("127.0.0.1", 0))
    return connect(f"ws://127.0.0.1{path}", sock=client_end, **options)


class TestClient:
    """One client connection: send, receive with timeouts, close."""

    __test__ = False  # not a pytest test class

    def __init__(self, connection):
        self.connection = connection

    @property
    def subprotocol(self):
        return self.connection.subprotocol

    @property
    def response_headers(self):
        return self.connection.response.headers

    def send(self, message):
        """Send ``str`` as a text message, ``bytes`` as binary."""
        self.connection.send(message)

    def receive(self, timeout=5.0):
        """The next message: ``str`` for text, ``bytes`` for binary.

        Raises :class:`ReceiveTimeout` after ``timeout`` seconds, and
        ``websockets.exceptions.ConnectionClosed`` if the server closed.
        """
        try:
            return self.connection.recv(timeout=timeout)
        except TimeoutError:
            raise ReceiveTimeout(f"no message within {timeout} s") from None

    def receive_many(self, count, timeout=5.0):
        """``count`` messages, all within ``timeout`` seconds in total."""
        deadline = time.monotonic() + timeout
        messages = []
        for _ in range(count):
            remaining = max(deadline - time.monotonic(), 0.001)
            try:
                messages.append(self.receive(remaining))
            except ReceiveTimeout:
                raise ReceiveTimeout(
                    f"{len(messages)} of {count} messages within {timeout} s"
                ) from None
        return messages

    def receive_nothing(self, timeout=0.2):
        """Assert that no message arrives for ``timeout`` seconds."""
        try:
            message = self.connection.recv(timeout=timeout)
        except TimeoutError:
            return
        raise UnexpectedMessage(f"expected no message, received {message!r}")

    def wait_closed(self, timeout=5.0):
        """Wait for the server to close the connection; return (code, reason).

        Messages still arriving are discarded.
        """
        from websockets.exceptions import ConnectionClosed

        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReceiveTimeout(f"connection still open after {timeout} s")
            try:
                self.connection.recv(timeout=remaining)
            except TimeoutError:
                continue
            except ConnectionClosed:
                return self.close_code, self.close_reason

    def ping(self, data=b"", timeout=5.0):
        """Send a ping and wait for its pong; return the round trip in seconds."""
        started = time.monotonic()
        if not self.connection.ping(data).wait(timeout):
            raise ReceiveTimeout(f"no pong within {timeout} s")
        return time.monotonic() - started

    def close(self, code=1000, reason=""):
        self.connection.close(code, reason)

    @property
    def close_code(self):
        """The close code the server sent (None while open; 1006 if none)."""
        return self.connection.close_code

    @property
    def close_reason(self):
        return self.connection.close_reason

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
