"""A live server of a WSGI application, on a free loopback port, on the
process's runtime (eventlet or gevent)."""

import logging
import time
from typing import Any

__all__ = ["LiveServer"]

log = logging.getLogger("stargate.testing")


class LiveServer:
    """Serve ``app`` with stargate's server in this process, on the runtime
    of :func:`stargate.runtime.current`: eventlet's WSGI server, or gevent's.

    The process must be monkey-patched by that runtime
    (``eventlet.monkey_patch()`` or ``gevent.monkey.patch_all()``), as
    stargate's servers are. Use it as a context manager::

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
        self._sock: Any = None  # the runtime's listening socket once started
        self._server: Any = None  # a server module's Background

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
        import importlib

        from stargate import runtime

        green = runtime.current()
        if not green.is_monkey_patched():
            from stargate.exceptions import IncorrectlyConfigured

            raise IncorrectlyConfigured(
                f"LiveServer needs {green.PATCH_CALL} before it starts"
            )
        server = importlib.import_module(f"stargate.servers.{green.NAME}")
        self._sock = server.listen(self.host, 0)
        self.port = self._sock.getsockname()[1]
        # As serve() does: a failing view gets the generic 500 page and its
        # traceback is logged, so a test sees what production does.
        self._server = server.serve_in_background(
            self._sock, self.app, request_timeout=self.request_timeout
        )
        return self

    def stop(self):
        from stargate.connection import open_websockets

        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        try:
            self._sock.close()
        except OSError:
            pass
        for websocket in open_websockets():
            if websocket.environ.get("SERVER_PORT") == str(self.port):
                websocket.abort()
        server.join(self.stop_timeout)

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
