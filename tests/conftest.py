"""The test process's runtime, and the fixtures every test directory shares.

The suite runs on eventlet (the default) or on gevent::

    python -m pytest                      # eventlet
    python -m pytest --runtime=gevent     # gevent (or STARGATE_RUNTIME=gevent)

Both patch the standard library, so a process runs one of them, and it must
patch before anything a test imports takes ``socket`` or ``threading``. That
happens here, when pytest imports this file: pytest parses its options only
after it has imported the initial conftest files, so the runtime is read from
the command line (``sys.argv``) and the environment by hand, and
``pytest_configure`` checks that pytest's own parse agrees (a
``pytest.main(["--runtime=gevent"])`` call, which leaves ``sys.argv`` alone,
is refused rather than run on the wrong runtime). ``--runtime`` wins over
``STARGATE_RUNTIME``, which is then removed from the environment: servers
the tests start as processes of their own choose their runtime themselves.

On gevent, tests marked ``eventlet_only`` (they test eventlet's own server
or API) are deselected, and the modules of :data:`NOT_ON_GEVENT` are not
collected (importing some would import eventlet).
"""

import os
import sys

from stargate import runtime as _runtime  # imports nothing but the seam


def _runtime_named() -> str:
    """``--runtime NAME`` or ``--runtime=NAME`` from the command line, else
    ``STARGATE_RUNTIME``, else eventlet."""
    args = sys.argv[1:]
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg.startswith("--runtime="):
            return arg.partition("=")[2]
        if arg == "--runtime" and index + 1 < len(args):
            return args[index + 1]
    return os.environ.get(_runtime.RUNTIME_ENV, "").strip().lower() or "eventlet"


#: The runtime this test process runs: "eventlet" or "gevent".
RUNTIME = _runtime_named()
_runtime.use(RUNTIME).monkey_patch()
# The variable names this process's runtime: the servers the tests start in
# processes of their own (history_worker.py, pserve) pick theirs.
os.environ.pop(_runtime.RUNTIME_ENV, None)

import pytest  # noqa: E402

#: Test modules the gevent run leaves out, and why: tests whose servers run
#: in processes of their own (each picks its runtime, whatever this process
#: runs) or that read files run the same on both, so the eventlet run covers
#: them.
NOT_ON_GEVENT = {
    "test_factory.py": "pserve and stargate demo processes, on either runtime",
    "test_access_log.py": "pserve processes, on either runtime",
    "test_config.py": "pserve and stargate demo processes; configuration",
    "test_multiworker.py": "worker processes of stargate demo and pserve",
    "test_gunicorn.py": "gunicorn and waitress processes, each its own worker",
    "test_proxy.py": "nginx and pserve processes",
    "test_readme.py": "the README's commands, run as processes",
    "test_browser.py": "Chromium and server processes",
    "test_browser_demo.py": "Chromium and server processes",
    "test_browser_history.py": "Chromium and server processes",
    "test_browser_multiworker.py": "Chromium and server processes",
    "test_bench_loadgen.py": "the benchmarks' load generator, a process",
    "test_bench_servers.py": "the benchmarks' servers, processes",
    "test_benchmarks_smoke.py": "benchmark scripts, run as processes",
    "test_soak_smoke.py": "benchmarks/soak.py, run as a process",
    "test_packaging.py": "package metadata and the stargate command",
    "test_module_boundaries.py": "reads stargate's source files",
    "test_docs.py": "builds the documentation (its examples use eventlet)",
    "test_demo.py": "stargate demo processes (one in-process test)",
}

#: What pytest leaves out of collection (paths relative to this file).
collect_ignore = sorted(NOT_ON_GEVENT) if RUNTIME == "gevent" else []

from stargate.testing.redis_server import (  # noqa: E402
    RedisCluster,
    RedisServer,
    RedisServerNotFound,
    find_redis_server,
)


def pytest_addoption(parser):
    parser.addoption(
        "--runtime",
        choices=_runtime.RUNTIMES,
        default=RUNTIME,
        help="the green-thread library the test process runs on (default: "
        "STARGATE_RUNTIME, else eventlet); read when conftest.py is imported",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "eventlet_only(reason): tests eventlet's own server or API; "
        "deselected on --runtime=gevent",
    )
    parsed = config.getoption("runtime")
    if parsed != RUNTIME:
        raise pytest.UsageError(
            f"--runtime={parsed} came too late: conftest.py already patched "
            f"the process for {RUNTIME}. Pass --runtime on the command line "
            f"or set {_runtime.RUNTIME_ENV}={parsed}."
        )


def pytest_report_header(config):
    return f"stargate runtime: {RUNTIME}"


def pytest_collection_modifyitems(config, items):
    if RUNTIME == "eventlet":
        return
    kept, deselected = [], []
    for item in items:
        if item.get_closest_marker("eventlet_only"):
            deselected.append(item)
        else:
            kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


def pytest_collection_finish(session):
    """On gevent, no test module may have imported eventlet: both patch
    the standard library, and eventlet's would be half there."""
    if RUNTIME == "gevent" and "eventlet" in sys.modules:
        importers = sorted(
            name
            for name, module in list(sys.modules.items())
            if name.startswith("tests") and hasattr(module, "eventlet")
        )
        raise pytest.UsageError(
            "eventlet was imported in a gevent run"
            + (f" (by {', '.join(importers)})" if importers else "")
            + ": use stargate.runtime.current(), or list the module in "
            "NOT_ON_GEVENT in tests/conftest.py"
        )


def _require_redis_server():
    try:
        find_redis_server()
    except RedisServerNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server shared by the session (never the one on 6379).

    Tests sharing it keep apart by using their own key prefix."""
    _require_redis_server()
    with RedisServer() as server:
        yield server


@pytest.fixture
def fresh_redis_server():
    """A private redis-server for one test: fault tests kill and restart it."""
    _require_redis_server()
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster():
    """A private three-master Redis Cluster shared by the session."""
    _require_redis_server()
    with RedisCluster() as cluster:
        yield cluster
