"""The ``stargate`` command (also ``python -m stargate``).

``stargate --version`` prints the installed version.
``stargate demo [--host H] [--port P] [--backend URL] [--workers N]
[--runtime eventlet|gevent]`` serves the demo application
(:mod:`stargate.demo`) with :func:`stargate.factory.serve` and prints its
URL once it accepts connections. ``--port 0`` picks a free port.
"""

import os
import sys
import warnings

# Whoever runs the command chose eventlet already: its notice that it is in
# maintenance mode would open every run of the command with 8 lines of noise.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")


def _runtime_from_argv(argv):
    """The runtime ``--runtime`` names in ``argv``, else ``STARGATE_RUNTIME``,
    else eventlet: read before anything imports socket or threading, since
    the runtime's monkey-patching must come first. A bad name is left to
    the parser, which names the choices."""
    for i, arg in enumerate(argv):
        if arg == "--runtime" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--runtime="):
            return arg.partition("=")[2]
    return os.environ.get("STARGATE_RUNTIME", "").strip().lower() or "eventlet"


def _patch(name):
    from stargate import runtime

    if name in runtime.RUNTIMES:
        runtime.use(name).monkey_patch()


_patch(_runtime_from_argv(sys.argv[1:]))

import argparse  # noqa: E402
import logging  # noqa: E402

__all__ = ["main", "build_parser"]


def _port(value):
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, not {value}")
    return port


def _positive(value):
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return number


def _setting(value):
    name, sep, setting = value.partition("=")
    name = name.strip()
    if not sep or not name.startswith("stargate."):
        raise argparse.ArgumentTypeError(f"expected stargate.NAME=VALUE, not {value!r}")
    return name, setting.strip()


def build_parser():
    from stargate import __version__

    parser = argparse.ArgumentParser(
        prog="stargate",
        description="WebSocket support and a broadcast hub for Pyramid.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="serve the demo application (chat, echo, jobs)",
        description="Serve the demo: a chat page at /, a WebSocket echo at "
        "/echo, chat rooms at /rooms/<name> and the jobs example at /jobs/<id>.",
    )
    demo.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (127.0.0.1)"
    )
    demo.add_argument(
        "--port", type=_port, default=8080, help="port, 0 for any free one (8080)"
    )
    demo.add_argument(
        "--backend",
        default="memory",
        help="stargate.backend: memory (default) or redis://host:port/db",
    )
    demo.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="worker processes sharing the port (1); use a redis backend so "
        "broadcasts reach all of them",
    )
    demo.add_argument(
        "--runtime",
        choices=["eventlet", "gevent"],
        default=_runtime_from_argv(sys.argv[1:]),
        help="the server's green threads: eventlet (default, or "
        "STARGATE_RUNTIME) or gevent",
    )
    demo.add_argument(
        "--set",
        dest="settings",
        metavar="NAME=VALUE",
        type=_setting,
        action="append",
        default=[],
        help="any stargate.* setting, e.g. --set stargate.backend.presence_ttl=5 "
        "(repeatable)",
    )
    demo.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging level (info)",
    )
    demo.set_defaults(run=run_demo)
    return parser


def run_demo(args):
    from stargate.demo import make_app
    from stargate.factory import serve

    # serve() warns about several workers on the memory backend
    settings = {"stargate.backend": args.backend, **dict(args.settings)}
    app = make_app(settings)

    def ready(address):
        host, port = address
        if ":" in host:
            host = f"[{host}]"
        print(
            f"stargate demo: http://{host}:{port}/ "
            f"(backend {args.backend}, {args.workers} worker(s), "
            f"{args.runtime}; Ctrl-C stops)",
            flush=True,
        )

    serve(
        app,
        args.host,
        args.port,
        workers=args.workers,
        ready=ready,
        runtime=args.runtime,
    )
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s [%(name)s:%(process)d] %(message)s",
    )
    from stargate.exceptions import IncorrectlyConfigured

    try:
        return args.run(args)
    except IncorrectlyConfigured as exc:  # the message says it all
        print(f"stargate: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
