"""A stargate server whose blocking handler cleans up slowly, for the
shutdown test of tests/test_handed_off.py.

``python tests/handler_worker.py PORT MARKER`` serves ``/ws`` (a view with
``own_green_thread``) on PORT with stargate's server (on the runtime
``STARGATE_RUNTIME`` names, else eventlet). The handler says ``ready``,
waits until the connection closes, then, in its ``finally`` block, yields
for a moment (as a clean-up that talks to Redis or a database does) and
writes ``finally ran`` to MARKER. ``/`` answers a plain GET. A third
argument is the server's ``max_clients``.
"""

from stargate import runtime

green = runtime.current()
green.monkey_patch()

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from pyramid.config import Configurator  # noqa: E402
from pyramid.response import Response  # noqa: E402

from stargate import WebSocketView  # noqa: E402
from stargate.factory import serve  # noqa: E402

#: How long the handler's clean-up yields to the hub.
CLEAN_UP_SECONDS = 0.5


def main(port, marker, max_clients=100):
    class SlowCleanUp(WebSocketView):
        own_green_thread = True

        def handler(self, websocket):
            try:
                websocket.send("ready")
                while websocket.wait() is not None:
                    pass
            finally:
                green.sleep(CLEAN_UP_SECONDS)
                Path(marker).write_text("finally ran")

    with Configurator() as config:
        config.include("stargate")
        config.add_route("ws", "/ws")
        config.add_view(SlowCleanUp, route_name="ws")
        config.add_route("plain", "/")
        config.add_view(lambda request: Response("plain"), route_name="plain")
        app = config.make_wsgi_app()
    serve(
        app,
        port=port,
        access_log=False,
        shutdown_timeout=5.0,
        max_clients=max_clients,
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:4]))
