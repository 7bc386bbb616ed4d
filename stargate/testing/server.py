"""A live eventlet server of a WSGI application, on a free loopback port."""

import logging
import socket
import time
from typing import Any

__all__ = ["LiveServer"]

log = logging.getLogger("stargate.testing")


class LiveServer:
    """Serve ``app`` with eventlet's WSGI server in this process.

    The process must be monkey-patched (``eventlet.monkey_patch()``), as it
    is under ``stargate.factory``. Use it as a context manager::

        with LiveServer(app) as server:
            with connect(server.ws_url("/echo")) as client:
                ...

    ``stop()`` closes the listening socket, aborts every WebSocket the
    server holds and waits (up to ``stop_timeout`` seconds) for the server
    green thread to end, so no port or connection is left behind.
    """

    def __init__(
        self, app, host="127.0.0.1", *, stop_timeout=5.0, request_timeout=10.0
    ):
        self.app = app
        self.request_timeout = request_timeout
        self.host = host
        self.stop_timeout = stop_timeout
        self.port = None
        self._sock: Any = None  # an eventlet GreenSocket once started
        self._thread: Any = None

    @property
    def url(self):
        return f"http://{self._netloc()}"

    def ws_url(self, path="/"):
        """The ``ws://`` URL of ``path`` on this server."""
        return f"ws://{self._netloc()}{path}"

    def http_url(self, path="/"):
        return f"http://{self._netloc()}{path}"

    def _netloc(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self):
        import eventlet
        import eventlet.wsgi

        from stargate.factory import GenericErrorPage, http_protocol_class

        if not eventlet.patcher.is_monkey_patched("socket"):
            from stargate.exceptions import IncorrectlyConfigured

            raise IncorrectlyConfigured(
                "LiveServer needs eventlet.monkey_patch() before it starts"
            )
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._sock = eventlet.listen((self.host, 0), family=family)
        self.port = self._sock.getsockname()[1]
        self._thread = eventlet.spawn(
            eventlet.wsgi.server,
            self._sock,
            # As serve() does: a failing view gets the generic 500 page and
            # its traceback is logged, so a test sees what production does.
            GenericErrorPage(self.app),
            protocol=http_protocol_class(),
            log=log,
            log_output=False,
            max_size=100_000,
            socket_timeout=self.request_timeout,
            debug=False,
        )
        return self

    def stop(self):
        import eventlet
        import greenlet

        from stargate.connection import open_websockets

        if self._thread is None:
            return
        thread, self._thread = self._thread, None
        thread.kill()
        try:
            self._sock.close()
        except OSError:
            pass
        for websocket in open_websockets():
            if websocket.environ.get("SERVER_PORT") == str(self.port):
                websocket.abort()
        with eventlet.Timeout(self.stop_timeout, False):
            try:
                thread.wait()
            except greenlet.GreenletExit:
                pass

    def wait_for_listeners(
        self, channel: str, count: int = 1, timeout: float = 10.0
    ) -> int:
        """Wait until ``count`` WebSockets of this server listen on
        ``channel``, and return how many do.

        The hub counts a listener only once its backend is subscribed to
        the channel (Redis confirmed the subscription), so from then on a
        message published by any server reaches them: the probe loop a
        cross-server test needed before. Raises ``TimeoutError`` saying how
        many listened after ``timeout`` seconds.
        """
        from stargate import runtime
        from stargate.factory import registry_of
        from stargate.hub import get_hub

        hub = get_hub(registry_of(self.app))
        deadline = time.monotonic() + timeout
        while True:
            listening = len(hub.listeners(channel))
            if listening >= count:
                return listening
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{listening} of {count} listener(s) on channel {channel!r} "
                    f"of {self.url} after {timeout} s"
                )
            runtime.current().sleep(0.01)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
