"""The Redis backend between real OS processes sharing one private Redis.

Each worker is a separate ``python`` process running the test process's
runtime (eventlet or gevent) with a ``RedisBackend``, as gunicorn or
``server_factory`` workers would.
"""

import json
import os
import subprocess
import sys
import uuid

import pytest

import stargate
from stargate import runtime
from tests import green

#: The workers import stargate from this checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(stargate.__file__)))

WORKER = r"""
from stargate import runtime
green = runtime.current()  # STARGATE_RUNTIME, set by run()
green.monkey_patch()
import json, sys, time
from stargate.backends.redis import RedisBackend

url, prefix, name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
received = []
backend = RedisBackend(url, prefix=prefix)
backend.start(lambda channel, message: received.append(message))
backend.subscribe("mp")
print("ready", flush=True)
sys.stdin.readline()  # "go": every worker is subscribed
for i in range(count):
    backend.publish("mp", f"{name}-{i}" if i % 2 else f"{name}-{i}".encode())
deadline = time.monotonic() + 20
while len(received) < 2 * count and time.monotonic() < deadline:
    green.sleep(0.01)
backend.close()
print(json.dumps([m if isinstance(m, str) else "bytes:" + m.decode()
                  for m in received]), flush=True)
"""

FORK = r"""
from stargate import runtime
green = runtime.current()  # STARGATE_RUNTIME, set by run()
green.monkey_patch()
import json, os, sys, time
from stargate.backends.redis import RedisBackend

url, prefix = sys.argv[1], sys.argv[2]

def wait_for(received, message, timeout=10):
    deadline = time.monotonic() + timeout
    while message not in received:
        if time.monotonic() > deadline:
            return False
        green.sleep(0.01)
    return True

parent_got = []
backend = RedisBackend(url, prefix=prefix)
backend.start(lambda channel, message: parent_got.append(message))
backend.subscribe("fork")
pid = os.fork()
if pid == 0:
    child_got = []
    # What the hub does in a forked child: start afresh on the same object.
    backend.start(lambda channel, message: child_got.append(message))
    backend.subscribe("fork")
    backend.publish("fork", "child ready")
    ok = wait_for(child_got, "child ready") and wait_for(child_got, "from parent")
    backend.close()
    os._exit(0 if ok else 3)
ok = wait_for(parent_got, "child ready")
backend.publish("fork", "from parent")
ok = ok and wait_for(parent_got, "from parent")
_, status = os.waitpid(pid, 0)
backend.close()
print(json.dumps({"parent": parent_got, "child_status": status}), flush=True)
"""


def run(script, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env[runtime.RUNTIME_ENV] = runtime.current().NAME  # the workers run it too
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def stop(process):
    if process.poll() is None:
        process.kill()
    process.wait(5)


@pytest.fixture
def prefix():
    return f"mp-{uuid.uuid4().hex[:12]}:"


def test_two_processes_see_each_others_messages_in_one_order(redis_server, prefix):
    count = 200
    workers = [run(WORKER, redis_server.url, prefix, name, count) for name in "AB"]
    try:
        for worker in workers:
            with green.Timeout(20, AssertionError("a worker never got ready")):
                line = worker.stdout.readline()
            assert line.strip() == "ready", worker.stderr.read()
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        results = []
        for worker in workers:
            out, err = worker.communicate(timeout=30)
            assert worker.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            stop(worker)

    def sent_by(name):
        return [f"{name}-{i}" if i % 2 else f"bytes:{name}-{i}" for i in range(count)]

    first, second = results
    assert len(first) == len(second) == 2 * count
    # Redis orders the channel once: every process sees the same sequence,
    # and each publisher's messages in the order it sent them.
    assert first == second
    for name in "AB":
        mine = [m for m in first if m.removeprefix("bytes:").startswith(name)]
        assert mine == sent_by(name)


def test_a_forked_child_starts_afresh_without_stealing_the_parents_messages(
    redis_server, prefix
):
    process = run(FORK, redis_server.url, prefix)
    try:
        out, err = process.communicate(timeout=30)
    finally:
        stop(process)
    assert process.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["child_status"] == 0, err
    assert result["parent"] == ["child ready", "from parent"]
