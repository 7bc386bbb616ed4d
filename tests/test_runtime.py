"""The test process runs the runtime it was asked for (``--runtime``, see
``tests/conftest.py``), patched before the tests imported anything."""

import socket
import sys
import threading

from stargate import runtime
from tests.conftest import RUNTIME


def test_the_process_runs_the_runtime_it_was_asked_for():
    current = runtime.current()
    assert current.NAME == RUNTIME
    assert current.is_monkey_patched()


def test_sockets_and_threads_are_green():
    """A socket made by name from the socket module, as redis-py and the
    websockets client make theirs, is the runtime's, and so is a lock."""
    with socket.socket() as sock:
        # eventlet's GreenSocket, or gevent's socket class
        assert type(sock).__module__.split(".")[0] == RUNTIME
    main = runtime.current().getcurrent()
    seen = []
    thread = threading.Thread(
        target=lambda: seen.append(runtime.current().getcurrent())
    )
    thread.start()
    thread.join()
    assert seen and seen[0] is not main  # a green thread, in this OS thread


def test_a_gevent_run_never_imports_eventlet():
    if RUNTIME == "gevent":
        assert "eventlet" not in sys.modules
