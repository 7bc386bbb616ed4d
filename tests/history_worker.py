"""A worker process for the history fault tests: a hub on the streams backend.

``python tests/history_worker.py URL PREFIX CHANNEL LISTENERS`` starts a hub
on ``RedisStreamsBackend(URL)``, attaches LISTENERS recording listeners to
CHANNEL, prints one JSON line ``{"ready": ..., "pid": ..., "process_id":
...}`` and then answers one JSON line per command read from stdin:

``{"cmd": "publish", "start": S, "count": N}``
    publishes the numbers S..S+N-1 (as text) on CHANNEL through the hub.
``{"cmd": "wait", "count": N, "timeout": T}``
    waits (at most T seconds) until every listener holds N messages.
``{"cmd": "report"}``
    what each listener received (as numbers) and the backend's stats.
``{"cmd": "exit"}``

``python tests/history_worker.py demo`` serves the demo (memory backend)
with a test hook, for the browser test: ``GET /_test/kick?room=R&name=N&hold=S``
closes (1012) the WebSockets of room R whose URL says ``name=N`` and
refuses their reconnection (503) for S seconds. It prints
``history demo: http://...`` once it serves.

It runs on the runtime ``STARGATE_RUNTIME`` names (the history tests pass
theirs on), else eventlet.
"""

from stargate import runtime

green = runtime.current()
green.monkey_patch()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from stargate.backends.redis_streams import RedisStreamsBackend  # noqa: E402
from stargate.hub import Hub  # noqa: E402


class Listener:
    def __init__(self):
        self.received = []
        self.closed = False

    def send(self, message):
        self.received.append(int(message))


def commands():
    """The lines of stdin, each read in a thread of the runtime's pool: a
    blocking ``readline`` would stop delivery while the worker waits for a
    command (and eventlet's green ``select`` never reports a pipe on fd 0
    readable)."""
    if green.NAME == "gevent":
        import gevent

        def read_line():
            return gevent.get_hub().threadpool.apply(sys.stdin.readline)
    else:
        import eventlet.tpool

        def read_line():
            return eventlet.tpool.execute(sys.stdin.readline)

    while line := read_line():
        yield line


def reply(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main(url, prefix, channel, count):
    backend = RedisStreamsBackend(
        url,
        prefix=prefix,
        history_size=5000,
        reconnect_backoff=(0.05, 0.5),
        socket_timeout=2.0,
        block=0.5,
    )
    hub = Hub(backend)
    listeners = [Listener() for _ in range(count)]
    for listener in listeners:
        hub.add(channel, listener)

    def report():
        return {
            "listeners": [listener.received for listener in listeners],
            "stats": backend.stats,
        }

    reply(ready=True, pid=os.getpid(), process_id=backend.process_id)
    for line in commands():
        command = json.loads(line)
        if command["cmd"] == "publish":
            start = command["start"]
            for i in range(start, start + command["count"]):
                hub.publish(channel, str(i))
            reply(published=command["count"])
        elif command["cmd"] == "wait":
            deadline = time.monotonic() + command["timeout"]
            while time.monotonic() < deadline and any(
                len(listener.received) < command["count"] for listener in listeners
            ):
                green.sleep(0.02)
            reply(**report())
        elif command["cmd"] == "report":
            reply(**report())
        elif command["cmd"] == "exit":
            break
    hub.close()


def kickable(app):
    """The demo, plus the ``/_test/kick`` hook (tests only)."""
    from urllib.parse import parse_qs

    hub = app.registry.stargate_hub
    held = {}

    def wrapper(environ, start_response):
        params = parse_qs(environ.get("QUERY_STRING", ""))
        path = environ.get("PATH_INFO", "")
        if path == "/_test/kick":
            room, name = params["room"][0], params["name"][0]
            held[name] = time.monotonic() + float(params.get("hold", ["0"])[0])
            kicked = 0
            for ws in list(hub.listeners(f"/rooms/{room}")):
                query = parse_qs(ws.environ.get("QUERY_STRING", ""))
                if query.get("name") == [name]:
                    green.spawn(ws.close, 1012, "kicked by the test")
                    kicked += 1
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [str(kicked).encode()]
        if path.startswith("/rooms/"):
            name = params.get("name", [None])[0]
            if name in held and time.monotonic() < held[name]:
                start_response("503 Service Unavailable", [])
                return [b"held back by the test"]
        return app(environ, start_response)

    return wrapper


def serve_demo():
    from stargate.demo import make_app
    from stargate.factory import serve

    def ready(address):
        print(f"history demo: http://127.0.0.1:{address[1]}/", flush=True)

    serve(kickable(make_app({})), "127.0.0.1", 0, ready=ready)


if __name__ == "__main__":
    if sys.argv[1] == "demo":
        serve_demo()
    else:
        main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
