"""Every benchmark runs at its tiny size and prints its table.

These keep ``python -m benchmarks`` from rotting; they assert nothing about
timings. The benchmarks run in parallel subprocesses (each is mostly
waiting on its own servers and clients), started once for the module.
"""

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Seconds every quick benchmark together may take: eleven of them share
#: the machine's cores (two here, one of them kept busy in CI's check), and
#: took 72 to 111 s on a loaded one. A bound, not a measurement.
DEADLINE = 240

# The module's fixture starts them all during the first test's setup.
pytestmark = pytest.mark.timeout(DEADLINE + 60)

HEADERS = {
    "broadcast": "broadcast: deliveries/s and latency",
    "memory": "memory: server RSS per idle connection",
    "fanout": "fanout: broadcast through Redis",
    "concurrency": "concurrency: connect all",
    "history": "history: Redis Streams (with history) against Redis pub/sub",
    "prune": "prune_dead:",
    "receive": "apply_mask throughput",
    "floor": "send floor: hub publish against a bare send() loop",
    "uring": "below the floor: io_uring batched sends against a send() loop",
    "channels": "channels: delivery latency with many channels subscribed",
    "redis-receive": "redis-receive: worker CPU per message",
}
NEEDS_REDIS = {"fanout", "concurrency", "history", "channels", "redis-receive"}

#: The benchmarks whose ``--plot PATH`` draws a figure of the docs, and the
#: file each is given here.
PLOTS = {"floor": "floor_cpu.png", "memory": "memory_per_connection.png"}


def _have_redis():
    from stargate.testing.redis_server import RedisServerNotFound, find_redis_server

    try:
        find_redis_server()
    except RedisServerNotFound:
        return False
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every quick benchmark at once; wait for all of them."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    names = [n for n in HEADERS if n not in NEEDS_REDIS or _have_redis()]
    procs = {}
    for name in names:
        out = tmp_path_factory.mktemp(name)
        procs[name] = (
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks",
                    name,
                    "--quick",
                    "--out",
                    str(out),
                    *(["--plot", str(out / PLOTS[name])] if name in PLOTS else []),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
            out,
        )
    deadline = time.monotonic() + DEADLINE
    results = {}
    try:
        for name, (proc, out) in procs.items():
            remaining = max(deadline - time.monotonic(), 1)
            output, _ = proc.communicate(timeout=remaining)
            results[name] = (proc.returncode, output, out)
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_quick_benchmark_runs_and_prints_its_table(runs, name):
    if name not in runs:
        pytest.skip("redis-server is not installed")
    code, output, out = runs[name]
    assert code == 0, output[-3000:]
    assert HEADERS[name] in output, output[-3000:]


@pytest.mark.parametrize(
    "name, plot",
    [
        ("broadcast", "broadcast_throughput.png"),
        ("broadcast", "broadcast_latency.png"),
        ("memory", "memory.png"),
        ("fanout", "fanout.png"),
        ("prune", "prune_dead.png"),
    ],
)
def test_quick_benchmark_writes_its_plot(runs, name, plot):
    if name not in runs:
        pytest.skip("redis-server is not installed")
    assert (runs[name][2] / plot).stat().st_size > 0


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_plot_option_writes_a_png(runs, name):
    """The figures in docs/topics/performance.rst come from ``--plot``."""
    from PIL import Image

    code, output, out = runs[name]
    assert code == 0, output[-3000:]
    path = out / PLOTS[name]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()  # every chunk's CRC, to the end of the file
    with Image.open(path) as image:
        image.load()  # and it decodes
        assert image.format == "PNG"
        assert image.width >= 400 and image.height >= 300, image.size
