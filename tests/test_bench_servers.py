"""The benchmark servers measured side by side keep to their own messages.

``python -m benchmarks fanout`` runs several servers on one private Redis.
Each must receive only what it publishes itself: a server that also
delivered another's messages would pay for them in its figures and hand
its load generator messages of other phases.
"""

import contextlib

from websockets.sync.client import connect

from benchmarks._harness import ServerProcess
from stargate.testing.redis_server import RedisServer


def listen(stack, server):
    url = f"ws://127.0.0.1:{server.port}/listen"
    ws = stack.enter_context(connect(url, open_timeout=20))
    assert ws.recv(timeout=20) == "ready"  # subscribed: Redis confirmed it
    return ws


def number(message):
    """The number the benchmark servers put at a message's head."""
    return int(message.split(":")[1])


def test_two_stargate_servers_on_one_redis_do_not_receive_each_other():
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        first = stack.enter_context(ServerProcess("stargate", redis=redis.url))
        second = stack.enter_context(ServerProcess("stargate", redis=redis.url))
        ours, theirs = listen(stack, first), listen(stack, second)
        first.command(op="broadcast", count=1, size=64, first=1)
        assert number(ours.recv(timeout=20)) == 1
        second.command(op="broadcast", count=1, size=64, first=2)
        # Message 1 would come first had it reached the second server.
        assert number(theirs.recv(timeout=20)) == 2
