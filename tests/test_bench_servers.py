"""The benchmark servers are measured on equal terms.

``python -m benchmarks fanout`` runs several servers on one private Redis.
Each must receive only what it publishes itself: a server that also
delivered another's messages would pay for them in its figures and hand
its load generator messages of other phases. And every server's listeners
get ``TCP_NODELAY`` as they would from the server's own way of listening.
"""

import contextlib
import os
import subprocess
import sys

from websockets.sync.client import connect

from benchmarks._harness import ServerProcess
from stargate.testing.redis_server import RedisServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


NODELAY_CHECK = """
import asyncio, socket
from benchmarks._servers import listen_socket

async def main():
    got = asyncio.get_running_loop().create_future()

    def accepted(reader, writer):
        sock = writer.get_extra_info("socket")
        got.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    server = await asyncio.start_server(accepted, sock=listen_socket())
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    print(await asyncio.wait_for(got, 20))
    writer.close()
    server.close()

asyncio.run(main())
"""


def test_the_relay_peers_listeners_get_tcp_nodelay_as_from_websockets_serve():
    """asyncio sets TCP_NODELAY on what it accepts only from a socket made
    with IPPROTO_TCP; without it the relay's frames waited on Nagle."""
    done = subprocess.run(
        [sys.executable, "-c", NODELAY_CHECK],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) != 0
