"""The servers under test, each run in its own process by the harness.

::

    python -m benchmarks._servers KIND [--workers N] [--redis URL] [--profile PATH]

``KIND`` is one of:

``stargate``
    a Pyramid app served by :func:`stargate.factory.serve`: ``/listen`` is a
    ``WebSocketView`` whose handler ``add_listener()``\\ s the connection to
    a ``WebSocketAwareResource``; a broadcast is ``resource.send(message)``.
    ``--redis URL`` sets ``stargate.backend`` (with ``--workers``).
``stargate-kept``
    the same, but ``/listen`` is a ``keep_open`` view: its handler returns
    after ``add_listener()`` and the hub keeps the connection, with no green
    thread parked under the request.
``stargate-own``
    the same, but ``/listen``'s blocking handler has a green thread of its
    own (``own_green_thread``): the request's green thread ends at the
    upgrade.
``stargate-gevent``, ``stargate-gevent-kept``, ``stargate-gevent-own``
    the same three on the gevent runtime, with stargate's gevent server.
``gunicorn-gevent``
    the ``stargate`` app under gunicorn's gevent worker (``-k gevent``, the
    hooks of :mod:`stargate.gunicorn`), ``--workers`` gunicorn workers.
``websockets``
    a ``websockets`` asyncio server; a broadcast is
    ``websockets.broadcast(connections, message)``. With ``--redis URL`` each
    of the ``--workers`` processes relays through redis-py's asyncio pub/sub
    and broadcasts what it receives to its own connections.
``eventlet``
    eventlet's own ``eventlet.websocket.WebSocketWSGI`` with the loop the
    original stack ran: ``for ws in sockets: ws.send(message)``.

With ``--redis``, each server process keeps to Redis channels of its own
(its kind and PID in their names), so servers measured side by side on one
Redis never receive, and deliver, each other's messages.

Every kind listens on a socket made here (backlog 4096; shared by the
worker processes when there are several), prints ``PORT <n>`` on stdout,
sends ``ready`` to each listener once it is registered, and takes commands
as JSON text messages on ``/control``:

``{"op": "broadcast", "count": m, "size": s, "binary": b, "interval": t, "first": k}``
    publish ``m`` messages of ``s`` bytes, ``t`` seconds apart (0: back to
    back), numbered from ``k`` (0 if not given); each carries its number and
    the ``time.time_ns()`` taken just before it was published. Replies
    ``{"ts": [ns, ...]}``.
``{"op": "listeners"}``
    replies ``{"listeners": n}`` (this process's listeners).
"""

import argparse
import json
import os
import random
import signal
import socket
import sys
import time
import warnings

warnings.filterwarnings("ignore", message=r"(?s).*Eventlet is deprecated")

CHANNEL_PATH = "/listen"


def redis_namespace(kind):
    """A prefix for the Redis channels of this server, whatever it forks:
    stargate peers run the same app, whose channel would otherwise be the
    same name on the shared Redis, and each would deliver every other's
    messages to its own listeners (paying for them, and handing the load
    generator messages of other phases)."""
    return f"bench:{kind}:{os.getpid()}:"


_WORDS = (
    "stargate pyramid eventlet socket frame message listener broadcast hub "
    "channel redis worker latency payload deflate client server event chat "
    "room user status update price order quantity alpha beta gamma delta"
).split()
_PADDING = {}


def padding(size):
    """Seeded word soup of ``size`` ASCII characters: compressible, not trivially."""
    text = _PADDING.get(size)
    if text is None:
        rng = random.Random(size)
        parts, total = [], 0
        while total < size:
            word = rng.choice(_WORDS)
            parts.append(word)
            total += len(word) + 1
        text = _PADDING[size] = " ".join(parts)[:size]
    return text


def make_message(seq, size, binary):
    """Returns ``(timestamp_ns, message)``: the message starts with the
    timestamp and ``seq`` (``<20 digits>:<8 digits>:``), which the load
    generator reads to tell the messages of a phase apart."""
    ts = time.time_ns()
    head = f"{ts:020d}:{seq:08d}:"
    text = head + padding(size)[len(head) :]
    return ts, (text.encode("ascii") if binary else text)


def listen_socket():
    """The listening socket every kind serves on, made as
    ``socket.create_server`` or ``websockets.serve(host, port)`` would make
    it: with ``IPPROTO_TCP`` as its protocol, which the accepted sockets
    inherit and asyncio needs to set ``TCP_NODELAY`` on them (a socket of
    protocol 0 is left with Nagle's algorithm on: the relay then held
    small frames for the listener's delayed ACK, 40 ms stalls that
    stargate, which sets ``TCP_NODELAY`` itself, never had)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


def announce(sock):
    print(f"PORT {sock.getsockname()[1]}", flush=True)


def raise_nofile():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Profiler:
    """Accumulates a cProfile of every broadcast command when a path is set."""

    def __init__(self, path):
        self.path = path
        self.profile = None
        if path:
            import cProfile

            self.profile = cProfile.Profile()

    def __enter__(self):
        if self.profile is not None:
            self.profile.enable()

    def __exit__(self, *exc):
        if self.profile is not None:
            self.profile.disable()
            self.profile.dump_stats(self.path)


def run_broadcast(command, publish, sleep):
    """The broadcast command, for a blocking (green) server."""
    count, size = command["count"], command["size"]
    binary, interval = command.get("binary", False), command.get("interval", 0)
    first = command.get("first", 0)
    stamps = []
    for seq in range(first, first + count):
        ts, message = make_message(seq, size, binary)
        stamps.append(ts)
        publish(message)
        if interval:
            sleep(interval)
    return {"ts": stamps}


# -- stargate -----------------------------------------------------------------


def stargate_app(args, *, kept, sleep, own=False):
    """The Pyramid app every stargate kind serves (see the module's doc)."""
    from pyramid.config import Configurator

    from stargate import WebSocketAwareResource, WebSocketView

    class Root(WebSocketAwareResource):
        __name__ = ""
        __parent__ = None

    root = Root()
    profiler = Profiler(args.profile)

    class ListenView(WebSocketView):
        def handler(self, websocket):
            self.request.context.add_listener(websocket)
            websocket.send("ready")
            while websocket.wait() is not None:
                pass

    class OwnListenView(ListenView):
        own_green_thread = True  # the request's green thread ends

    class KeptListenView(WebSocketView):
        keep_open = True  # the view returns; the hub keeps the connection

        def handler(self, websocket):
            self.request.context.add_listener(websocket)
            websocket.send("ready")

    class ControlView(WebSocketView):
        def handler(self, websocket):
            resource = self.request.context
            while (text := websocket.wait()) is not None:
                command = json.loads(text)
                if command["op"] == "broadcast":
                    with profiler:
                        reply = run_broadcast(command, resource.send, sleep)
                else:
                    reply = {"listeners": len(resource.listeners)}
                websocket.send(json.dumps(reply))

    settings = {"stargate.backend": args.redis or "memory"}
    if args.redis:
        settings["stargate.backend.prefix"] = args.namespace
    with Configurator(settings=settings, root_factory=lambda request: root) as config:
        config.include("stargate")
        config.add_route("listen", CHANNEL_PATH, factory=lambda request: root)
        config.add_route("control", "/control", factory=lambda request: root)
        listen = KeptListenView if kept else OwnListenView if own else ListenView
        config.add_view(listen, route_name="listen")
        config.add_view(ControlView, route_name="control")
        return config.make_wsgi_app()


def serve_stargate(args):
    from stargate import runtime

    kind = getattr(args, "kind", "stargate")
    green = runtime.use("gevent" if kind.startswith("stargate-gevent") else "eventlet")
    green.monkey_patch()
    from stargate.factory import serve

    app = stargate_app(
        args, kept=kind.endswith("-kept"), sleep=green.sleep, own=kind.endswith("-own")
    )
    options = {"runtime": green.NAME} if green.NAME != "eventlet" else {}
    sock = listen_socket()
    if green.NAME == "eventlet":
        import eventlet.greenio

        sock = eventlet.greenio.GreenSocket(sock)
    serve(
        app,
        workers=args.workers,
        listen_socket=sock,
        access_log=False,
        shutdown_timeout=2.0,
        ready=lambda address: announce(sock),
        **options,
    )


# -- stargate under gunicorn's gevent worker ------------------------------------


def serve_gunicorn(args):
    """gunicorn's gevent worker patches in each worker, which loads the app
    there (no preloading): the master process stays unpatched."""
    from gunicorn.app.base import BaseApplication

    import stargate.gunicorn

    sock = listen_socket()

    class Application(BaseApplication):
        def load_config(self):
            settings = {
                "bind": f"fd://{sock.fileno()}",
                "workers": args.workers,
                "worker_class": "gevent",
                "worker_connections": 100_000,
                "graceful_timeout": 2,
                "loglevel": "warning",
                "post_worker_init": stargate.gunicorn.post_worker_init,
                "worker_int": stargate.gunicorn.worker_int,
            }
            for name, value in settings.items():
                self.cfg.set(name, value)

        def load(self):
            from stargate import runtime

            return stargate_app(args, kept=False, sleep=runtime.current().sleep)

    announce(sock)
    Application().run()


# -- eventlet's own WebSocketWSGI ------------------------------------------------


def serve_eventlet(args):
    import eventlet

    eventlet.monkey_patch()
    import eventlet.websocket
    import eventlet.wsgi

    sockets = set()
    profiler = Profiler(args.profile)

    def publish(message):
        for ws in list(sockets):
            try:
                ws.send(message)
            except OSError:
                sockets.discard(ws)

    @eventlet.websocket.WebSocketWSGI
    def app(ws):
        if ws.path == "/control":
            while (text := ws.wait()) is not None:
                command = json.loads(text)
                if command["op"] == "broadcast":
                    with profiler:
                        reply = run_broadcast(command, publish, eventlet.sleep)
                else:
                    reply = {"listeners": len(sockets)}
                ws.send(json.dumps(reply))
            return
        sockets.add(ws)
        try:
            ws.send("ready")
            while ws.wait() is not None:
                pass
        finally:
            sockets.discard(ws)

    sock = eventlet.greenio.GreenSocket(listen_socket())
    announce(sock)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    eventlet.wsgi.server(sock, app, log_output=False, max_size=100_000)


# -- websockets (asyncio) ---------------------------------------------------


def serve_websockets(args):
    sock = listen_socket()
    announce(sock)
    if args.workers == 1:
        _websockets_worker(sock, args)
        return
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                _websockets_worker(sock, args)
            finally:
                os._exit(0)
        children.append(pid)

    def stop(*_):
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in children:
        os.wait()


def _websockets_worker(sock, args):
    import asyncio

    from websockets.asyncio.server import broadcast, serve

    profiler = Profiler(args.profile)

    async def main():
        connections = set()
        redis = None
        channel = args.namespace + "relay"
        if args.redis:
            import redis.asyncio

            redis = redis.asyncio.from_url(args.redis)
            pubsub = redis.pubsub()
            await pubsub.subscribe(channel)

            async def relay():
                async for item in pubsub.listen():
                    if item["type"] != "message":
                        continue
                    data = item["data"]
                    message = data[1:] if data[:1] == b"b" else data[1:].decode()
                    broadcast(connections, message)

            asyncio.get_running_loop().create_task(relay())

        async def publish(message):
            if redis is None:
                broadcast(connections, message)
            elif isinstance(message, str):
                await redis.publish(channel, b"t" + message.encode())
            else:
                await redis.publish(channel, b"b" + message)

        async def handler(ws):
            if ws.request.path == "/control":
                async for text in ws:
                    command = json.loads(text)
                    if command["op"] == "broadcast":
                        with profiler:
                            reply = await _async_broadcast(command, publish)
                    else:
                        reply = {"listeners": len(connections)}
                    await ws.send(json.dumps(reply))
                return
            connections.add(ws)
            try:
                await ws.send("ready")
                await ws.wait_closed()
            finally:
                connections.discard(ws)

        async with serve(handler, sock=sock, max_size=None):
            await asyncio.get_running_loop().create_future()

    asyncio.run(main())


async def _async_broadcast(command, publish):
    import asyncio

    count, size = command["count"], command["size"]
    binary, interval = command.get("binary", False), command.get("interval", 0)
    first = command.get("first", 0)
    stamps = []
    for seq in range(first, first + count):
        ts, message = make_message(seq, size, binary)
        stamps.append(ts)
        await publish(message)
        if interval:
            await asyncio.sleep(interval)
    return {"ts": stamps}


SERVERS = {
    "stargate": serve_stargate,
    "stargate-kept": serve_stargate,
    "stargate-gevent": serve_stargate,
    "stargate-gevent-kept": serve_stargate,
    "stargate-own": serve_stargate,
    "stargate-gevent-own": serve_stargate,
    "gunicorn-gevent": serve_gunicorn,
    "websockets": serve_websockets,
    "eventlet": serve_eventlet,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description="a server under benchmark")
    parser.add_argument("kind", choices=sorted(SERVERS))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--redis", default=None, help="relay through this Redis")
    parser.add_argument("--profile", default=None, help="cProfile output path")
    args = parser.parse_args(argv)
    args.namespace = redis_namespace(args.kind)  # before any worker forks
    raise_nofile()
    sys.setrecursionlimit(10000)
    SERVERS[args.kind](args)


if __name__ == "__main__":
    main()
