"""``python -m benchmarks [NAME ...] [--quick] [--out DIR]``: run the suite.

NAME is ``all`` (the default) or any of ``broadcast``, ``memory``,
``fanout``, ``concurrency``, ``history``, ``prune``, ``receive``, ``floor``,
``uring``, ``idle``, ``channels``, ``redis-receive``.
With one NAME, options the suite does not know go to that benchmark
(``python -m benchmarks memory --peers stargate,gunicorn-gevent,websockets``;
``python -m benchmarks.NAME --help`` lists them). Each benchmark prints its
tables; plots (PNG) and raw figures (JSON) go to ``--out``
(``benchmarks/results/``, which git ignores). Every benchmark bounds its own
run time and stops the processes it started.
"""

import argparse
import os
import subprocess
import sys
import time

from benchmarks._harness import DEFAULT_OUT, ROOT

HERE = os.path.dirname(os.path.abspath(__file__))


def _module(name):
    def run(quick, out, extra=()):
        import importlib

        module = importlib.import_module(f"benchmarks.{name}")
        argv = ["--out", out] + (["--quick"] if quick else []) + list(extra)
        module.main(argv)
        return 0

    return run


def _script(filename, *fixed):
    def run(quick, out, extra=()):
        command = [sys.executable, os.path.join(HERE, filename)]
        command += [arg.format(out=out) for arg in fixed]
        if quick:
            command.append("--quick")
        command += list(extra)
        sys.stdout.flush()
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
        return subprocess.run(command, cwd=ROOT, env=env, timeout=1800).returncode

    return run


BENCHMARKS = {
    "broadcast": _module("broadcast"),
    "memory": _module("memory"),
    "fanout": _module("fanout"),
    "concurrency": _module("concurrency"),
    "history": _module("history"),
    "prune": _script("prune_dead.py", "--out", "{out}/prune_dead.png"),
    "receive": _script("bench_receive_path.py"),
    "floor": _module("send_floor"),
    "uring": _module("uring_floor"),
    "idle": _module("idle_listeners"),
    "channels": _module("channels"),
    "redis-receive": _module("redis_receive"),
}


def build_parser(prog="python -m benchmarks"):
    parser = argparse.ArgumentParser(
        prog=prog,
        description="stargate's benchmarks, each against a peer in the same run.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        default=["all"],
        choices=["all", *BENCHMARKS],
        metavar="NAME",
        help=f"all (default) or any of: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: seconds, for smoke tests"
    )
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help=f"directory for plots ({DEFAULT_OUT})"
    )
    return parser


def main(argv=None, prog="python -m benchmarks"):
    parser = build_parser(prog)
    args, extra = parser.parse_known_args(argv)
    names = list(BENCHMARKS) if "all" in args.names else args.names
    if extra and len(names) != 1:
        parser.error(
            f"options {' '.join(extra)} need exactly one benchmark NAME to go to"
        )
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    failed = []
    for name in names:
        print(f"\n=== {name} {'(quick) ' if args.quick else ''}===", flush=True)
        start = time.monotonic()
        code = BENCHMARKS[name](args.quick, out, extra)
        if code:
            failed.append(name)
        print(f"=== {name}: {time.monotonic() - start:.0f} s ===", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
