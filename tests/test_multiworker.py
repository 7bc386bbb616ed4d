"""Issue 5: several eventlet worker processes share listeners through Redis.

The demo runs in subprocesses (``stargate demo --workers N`` and ``pserve``
with an ``.ini``) against a private ``redis-server``; real WebSocket clients
are spread over the worker processes, and each client's worker is found by
its TCP connection (``psutil``), not by anything the product reports.

* A room spans every worker, and every client sees the room's messages in
  one order; two separate single-worker servers on one Redis share rooms too.
* Redis killed (SIGKILL) and restarted on the same port: WebSockets stay
  open, every worker resubscribes, what was lost meanwhile is logged.
* A worker killed (SIGKILL): its clients drop, the others keep talking, the
  supervisor starts a replacement, presence forgets the dead worker within
  ``presence_ttl``.
* Clients arriving together at a fresh server: its backend starts once.

The fault tests use ``pserve`` because ``stargate demo`` has no option for
``stargate.backend.*`` settings (``presence_ttl``, ``reconnect_backoff``,
``socket_timeout``). ``pytest -s`` prints the measured facts.

Every wait is bounded by a deadline.
"""

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack

import eventlet
import psutil
import pytest
from websockets.exceptions import ConnectionClosed

from tests.clients import ServerProcess, connect, free_port, stargate_command
from tests.test_config import SERVER_RUNTIMES

DEMO_READY = r"stargate demo: (http://\S+)"
SERVING = r"Serving on (http://\S+)"

#: Seconds for anything a test waits for (workers up, messages, recovery).
DEADLINE = 15.0

#: What the fault tests' servers run with, through ``stargate.backend.*``:
#: fast reconnection and a short presence TTL, so faults heal within seconds.
FAST_BACKEND = {
    "reconnect_backoff": "0.05 0.5",
    "socket_timeout": "1",
    "presence_ttl": "1.5",
}


# -- servers ------------------------------------------------------------------

#: Seconds a server gets to stop after SIGTERM before it and its workers are
#: killed by PID. Graceful shutdown is tested in test_factory.py; here a
#: server that is slow to stop must neither slow the tests down nor leave a
#: worker running.
STOP_GRACE = 1.0


class Server(ServerProcess):
    """A :class:`ServerProcess` that never leaves a worker behind.

    ``stop()`` sends SIGTERM, waits ``STOP_GRACE`` seconds, then kills the
    supervisor and the workers it had, each by PID.
    """

    def stop(self, timeout=STOP_GRACE):
        workers = worker_pids(self) - {self.pid}
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()  # first, so it starts no replacement
                self.process.wait(timeout=5)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reader.join(timeout=5)
        return self.process.returncode


def demo_server(backend, workers=1, runtime="eventlet"):
    """``stargate demo --workers N --backend URL`` on a free port, serving."""
    return demo_servers(backend, 1, workers, runtime)[0]


def demo_servers(backend, count, workers=1, runtime="eventlet"):
    """``count`` separate demo servers, started side by side, all serving."""
    command = stargate_command(
        "demo",
        "--port", "0",
        "--backend", backend,
        "--workers", str(workers),
        "--runtime", runtime,
        "--log-level", "warning",
    )  # fmt: skip
    servers = [Server(command, url_pattern=DEMO_READY) for _ in range(count)]
    try:
        return [_serving(server, workers) for server in servers]
    except BaseException:
        for server in servers:
            server.stop()
        raise


INI = """\
[app:main]
use = egg:stargate#demo
stargate.backend = {backend}
{backend_options}

[server:main]
use = egg:stargate#main
host = 127.0.0.1
port = {port}
workers = {workers}
access_log = false
shutdown_timeout = 2

[loggers]
keys = root

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = INFO
handlers = console

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(asctime)s %(levelname)s [%(name)s:%(process)d] %(message)s
"""


def pserve_server(directory, backend, workers, backend_options, runtime="eventlet"):
    """The demo under ``pserve`` with an ``.ini`` that sets backend options.

    ``stargate demo`` has no option for ``stargate.backend.*`` settings;
    an ``.ini`` file has: each ``stargate.backend.<name>`` line becomes a
    keyword argument of the backend. ``runtime`` is the server's.
    """
    ini = directory / "multiworker.ini"
    ini.write_text(
        INI.format(
            backend=backend,
            backend_options="\n".join(
                f"stargate.backend.{name} = {value}"
                for name, value in backend_options.items()
            ),
            port=free_port(),
            workers=workers,
        ).replace("egg:stargate#main", SERVER_RUNTIMES[runtime])
    )
    server = Server(
        [sys.executable, "-W", "ignore", "-m", "pyramid.scripts.pserve", str(ini)],
        url_pattern=SERVING,
    )
    return _serving(server, workers)


def _serving(server, workers):
    try:
        server.wait_ready()
        if workers > 1:
            wait_for(
                lambda: len(worker_pids(server)) == workers,
                f"{workers} worker processes",
            )
    except BaseException:
        server.stop()
        raise
    return server


def worker_pids(server):
    """The PIDs of the server's worker processes (itself if it has none)."""
    try:
        children = psutil.Process(server.pid).children()
    except psutil.NoSuchProcess:
        return set()
    return {child.pid for child in children} or {server.pid}


def wait_for(predicate, what, timeout=DEADLINE, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# -- which worker serves a client --------------------------------------------


def serving_pids(clients, pids):
    """``{client: pid}``: which of ``pids`` holds the server end of each.

    One scan of the machine's TCP table serves every client and worker (the
    table can be large on a busy machine).
    """
    wanted = {tuple(client.local_address[:2]): client for client in clients}
    found = {}

    def scan():
        for conn in psutil.net_connections(kind="tcp4"):
            if conn.pid in pids and conn.raddr and tuple(conn.raddr) in wanted:
                found[wanted[tuple(conn.raddr)]] = conn.pid
        return len(found) == len(wanted)

    wait_for(scan, f"the workers serving {len(wanted)} clients", interval=0.2)
    return found


def serving_pid(client, pids):
    """The PID among ``pids`` holding the server end of ``client``'s socket."""
    return serving_pids([client], pids)[client]


class Room:
    """Clients of one demo room, each listening before the next connects.

    :meth:`join` makes a client send a marker and waits for it to come back
    through Redis: from then on the client listens, and so does its worker.
    :meth:`settle` reads the markers of later joins off every client, so
    each is left with nothing to read.
    """

    def __init__(self, path):
        self.path = path
        self.markers = []
        self.clients = {}  # client -> how many markers it has read

    def join(self, client):
        marker = f"joined {len(self.markers)} {uuid.uuid4().hex[:6]}"
        client.send(marker)
        while receive(client, 1) != [marker]:
            pass  # markers of the clients that joined before it
        self.markers.append(marker)
        self.clients[client] = len(self.markers)
        return client

    def forget(self, clients):
        for client in clients:
            self.clients.pop(client, None)

    def settle(self):
        for client, seen in self.clients.items():
            assert receive(client, len(self.markers) - seen) == self.markers[seen:]
            self.clients[client] = len(self.markers)


def spread_clients(stack, server, room, per_worker=2, max_clients=120):
    """Join ``room`` until every worker serves ``per_worker`` of its clients.

    Workers accept from one shared socket, whoever is free first, so the
    spread is uneven under load (seen once: 1 of 60 on one of 4 workers):
    keep joining, up to ``max_clients``.

    Returns ``{pid: [client, ...]}`` holding every client connected; each is
    closed when ``stack`` (a :class:`contextlib.ExitStack`) closes.
    """
    pids = worker_pids(server)
    clients = []
    batch = per_worker * len(pids)
    while len(clients) < max_clients:
        for _ in range(batch):
            client = stack.enter_context(connect(server.ws_url + room.path))
            clients.append(room.join(client))
        by_pid = {pid: [] for pid in pids}
        for client, pid in serving_pids(clients, pids).items():
            by_pid[pid].append(client)
        if all(len(group) >= per_worker for group in by_pid.values()):
            room.settle()
            return by_pid
        batch = len(pids)
    counts = {pid: len(group) for pid, group in by_pid.items()}
    raise AssertionError(
        f"{len(clients)} connections did not reach every worker: {counts}"
    )


def receive(client, count, timeout=DEADLINE):
    """``count`` messages, all within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    messages = []
    while len(messages) < count:
        remaining = deadline - time.monotonic()
        try:
            messages.append(client.recv(timeout=max(remaining, 0.001)))
        except TimeoutError:
            raise AssertionError(
                f"{len(messages)} of {count} messages within {timeout} s: "
                f"{messages[-5:]}"
            ) from None
    return messages


def receive_through(client, last, timeout=DEADLINE):
    """Every message up to and including ``last``, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    messages = []
    while not messages or messages[-1] != last:
        remaining = deadline - time.monotonic()
        try:
            messages.append(client.recv(timeout=max(remaining, 0.001)))
        except TimeoutError:
            raise AssertionError(
                f"{last!r} not received within {timeout} s: {messages[-5:]}"
            ) from None
    return messages


# -- what Redis knows ----------------------------------------------------------


def presence(redis_client, room):
    """``{pid: count}`` of the unexpired presence fields of ``room``.

    Reads the documented format directly: one field per process,
    ``<host>:<pid>:<uuid>`` -> ``"<count>:<expires_ms>"`` on Redis's clock.
    """
    seconds, micros = redis_client.time()
    now_ms = seconds * 1000 + micros // 1000
    counts = {}
    for field, value in redis_client.hgetall(f"stargate:presence:{room}").items():
        count, _, expires = value.decode().partition(":")
        if int(expires) > now_ms:
            pid = int(field.decode().split(":")[1])
            counts[pid] = counts.get(pid, 0) + int(count)
    return counts


def subscribers(redis_client, room):
    """How many pub/sub connections Redis has subscribed to ``room``."""
    return dict(redis_client.pubsub_numsub(f"stargate:{room}"))[
        f"stargate:{room}".encode()
    ]


def unique_room(name):
    return f"/rooms/{name}-{uuid.uuid4().hex[:8]}"


# -- a room spans every worker -------------------------------------------------


@pytest.mark.parametrize(
    "runtime, workers", [("eventlet", 2), ("eventlet", 4), ("gevent", 2), ("gevent", 4)]
)
def test_a_room_spans_every_worker_in_one_order(redis_server, runtime, workers):
    room = Room(unique_room(f"{runtime}{workers}"))
    messages_each = 5
    server = demo_server(redis_server.url, workers, runtime)
    with server, ExitStack() as stack:
        by_pid = spread_clients(stack, server, room)
        assert len(by_pid) == workers
        clients = [client for group in by_pid.values() for client in group]
        with redis_server.client() as r:
            # one subscription per worker, not per client
            assert subscribers(r, room.path) == workers
            # Presence: each worker counts its own clients, under its PID.
            expected = {pid: len(group) for pid, group in by_pid.items()}
            wait_for(lambda: presence(r, room.path) == expected, "presence")

        # Every client talks at once; the messages meet in Redis.
        for k in range(messages_each):
            for i, client in enumerate(clients):
                client.send(f"client {i} message {k}")
        total = len(clients) * messages_each
        received = [receive(client, total) for client in clients]

        sent = {f"client {i} message {k}" for i in range(len(clients))
                for k in range(messages_each)}  # fmt: skip
        assert set(received[0]) == sent
        for other in received[1:]:
            assert other == received[0]  # one order for everybody
        for i in range(len(clients)):
            own = [m for m in received[0] if m.startswith(f"client {i} ")]
            assert own == [f"client {i} message {k}" for k in range(messages_each)]


def test_clients_arriving_together_at_a_fresh_server(redis_server):
    """The first listeners of a process arrive together and all start the
    backend: it starts once (before 1d1ede5, twice: two receivers read one
    socket and the server process died)."""
    room = Room(unique_room("together"))
    with demo_server(redis_server.url) as server, ExitStack() as stack:
        url = server.ws_url + room.path
        pool = eventlet.GreenPool()
        clients = list(pool.imap(lambda _: connect(url), range(8)))
        for client in clients:
            stack.enter_context(client)
        try:
            for client in clients:
                room.join(client)
            room.settle()
            clients[0].send("to everybody")
            for client in clients:
                assert receive(client, 1) == ["to everybody"]
        finally:
            assert server.process.poll() is None, "the server process died"
            assert "Second simultaneous read" not in server.output
            assert "ERROR" not in server.output


def test_two_separate_servers_on_one_redis_share_a_room(redis_server):
    room = Room(unique_room("two-servers"))
    first, second = demo_servers(redis_server.url, 2)
    with first, second, ExitStack() as stack:
        assert first.url != second.url
        clients = [
            room.join(stack.enter_context(connect(server.ws_url + room.path)))
            for server in (first, second, first, second)
        ]
        room.settle()
        clients[0].send("from the first server")
        clients[1].send(b"\x00binary from the second")
        received = [receive(client, 2) for client in clients]
        assert set(received[0]) == {
            "from the first server",
            b"\x00binary from the second",
        }
        assert all(got == received[0] for got in received)  # one order
        with redis_server.client() as r:
            assert subscribers(r, room.path) == 2
            assert wait_for(
                lambda: presence(r, room.path) == {first.pid: 2, second.pid: 2},
                "presence of both servers",
            )


# -- Redis killed and restarted mid-stream -------------------------------------


class Stream:
    """Sends ``"m <i>"`` to a room every ``interval`` seconds, in a green thread.

    The sender is one more client of the room; it never reads, so it queues
    what it receives without limit (``max_queue=None``): a full queue would
    stop it reading, and it would not see the server's close frame. When
    the server closes it (the demo closes a client with 1013 when a message
    cannot be published), the close code is kept and the stream goes on
    through a new connection, which may land on any worker.
    """

    def __init__(self, url, interval=0.02):
        self.url = url
        self.interval = interval
        self.sent = []  # (index, monotonic time) of every send that succeeded
        self.closes = []  # close codes of the sender connections that ended
        self._client = connect(url, max_queue=None)
        self._clients = [self._client]
        self._stop = False
        self._thread = None

    def start(self):
        self._thread = eventlet.spawn(self._run)
        return self

    def _run(self):
        index = 0
        while not self._stop:
            try:
                self._client.send(f"m {index}")
            except ConnectionClosed:
                self.closes.append(self._client.close_code)
                self._client = connect(self.url, max_queue=None)
                self._clients.append(self._client)
                continue
            self.sent.append((index, time.monotonic()))
            index += 1
            time.sleep(self.interval)

    def stop(self):
        self._stop = True
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.wait()
        for client in self._clients:
            client.close()


def indices(messages):
    return [int(m.split()[1]) for m in messages if m.startswith("m ")]


def test_redis_killed_and_restarted_mid_stream(fresh_redis_server, tmp_path):
    """Nothing but the messages of the outage is lost, and that is logged."""
    redis_server = fresh_redis_server
    room = Room(unique_room("restart"))
    with (
        pserve_server(tmp_path, redis_server.url, 2, FAST_BACKEND) as server,
        ExitStack() as stack,
    ):
        by_pid = spread_clients(stack, server, room)
        listeners = [(pid, c) for pid, group in by_pid.items() for c in group]
        stream = Stream(server.ws_url + room.path)
        room.join(stream._client)
        room.settle()
        stream.start()
        stack.callback(stream.stop)

        wait_for(lambda: len(stream.sent) >= 10, "10 messages before the fault")
        killed_at = len(stream.sent)
        # A message the sender has sent may still be on its way to Redis: it
        # counts as sent before the fault once a listener of every worker has
        # it (Redis wrote it to both receivers' sockets, which keep it through
        # the kill). What they received meanwhile is kept for the checks.
        early = {}
        for pid, group in by_pid.items():
            early[id(group[0])] = receive_through(group[0], f"m {killed_at - 1}")
        redis_server.kill()
        down_from = time.monotonic()
        time.sleep(1.0)
        redis_server.restart()
        down_for = time.monotonic() - down_from
        with redis_server.client() as r:
            wait_for(lambda: subscribers(r, room.path) == 2, "both resubscribed")
        resubscribed = time.monotonic()
        recovered_at = len(stream.sent)
        wait_for(
            lambda: len(stream.sent) >= recovered_at + 20,
            "20 messages after recovery",
        )
        stream.stop()
        last = stream.sent[-1][0]

        received = {}
        for pid, client in listeners:
            got = indices(
                early.get(id(client), []) + receive_through(client, f"m {last}")
            )
            assert got == sorted(set(got)), "order kept, nothing twice"
            before = list(range(0, killed_at))
            after = list(range(recovered_at, last + 1))
            assert [i for i in got if i < killed_at] == before
            assert [i for i in got if i >= recovered_at] == after
            received.setdefault(pid, []).append(got)
        for pid, lists in received.items():
            assert all(got == lists[0] for got in lists), f"worker {pid} agrees"

        # The WebSockets of the listeners stayed open through it all.
        _, first = listeners[0]
        first.send("still here")
        for _, client in listeners:
            assert receive(client, 1) == ["still here"]

        # What was lost is reported: each worker logged its gap.
        gaps = wait_for(lambda: gap_lines(server, by_pid), "every worker's gap log")
        # Sending while Redis was down closed the sender with 1013 (try again
        # later), at once; the server logged why.
        assert stream.closes and set(stream.closes) == {1013}
        assert server.output.count("BackendUnavailable") >= len(stream.closes)
        window = range(killed_at, recovered_at)
        delivered = {
            pid: sum(i in window for i in lists[0]) for pid, lists in received.items()
        }
        report(
            f"Redis down {down_for:.2f} s, both workers resubscribed "
            f"{resubscribed - down_from:.2f} s after the kill; a message every "
            f"{stream.interval * 1000:.0f} ms: {len(window)} sent between the "
            f"kill and the resubscription, of which each worker delivered {delivered}, "
            f"{len(stream.closes)} refused with 1013; gaps logged {gaps}"
        )


def gap_lines(server, by_pid):
    """``{pid: seconds}`` from each worker's "lost connection" log, or None."""
    gaps = {}
    for line in server.lines:
        match = re.search(
            r":(\d+)\] lost connection to Redis for ([\d.]+) s; messages "
            r"published meanwhile were not received",
            line,
        )
        if match:
            gaps[int(match.group(1))] = float(match.group(2))
    warned = {
        pid
        for pid in by_pid
        if any(f":{pid}] lost connection to Redis at" in line for line in server.lines)
    }
    if set(gaps) >= set(by_pid) and warned == set(by_pid):
        return {pid: gaps[pid] for pid in by_pid}
    return None


def report(text):
    """Measured facts, shown with ``pytest -s`` (and kept in the output)."""
    print(f"\n[multiworker] {text}")


# -- a worker killed ------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["eventlet", "gevent"])
def test_a_killed_worker_is_replaced_and_the_others_keep_talking(
    tmp_path, redis_server, runtime
):
    room = Room(unique_room(f"worker-killed-{runtime}"))
    with (
        pserve_server(tmp_path, redis_server.url, 3, FAST_BACKEND, runtime) as server,
        ExitStack() as stack,
        redis_server.client() as r,
    ):
        by_pid = spread_clients(stack, server, room)
        victim, *survivors = sorted(by_pid)
        expected = {pid: len(group) for pid, group in by_pid.items()}
        wait_for(lambda: presence(r, room.path) == expected, "presence per worker")
        assert subscribers(r, room.path) == 3

        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        for client in by_pid[victim]:
            with pytest.raises(ConnectionClosed):
                client.recv(timeout=DEADLINE)
            assert client.close_code == 1006  # dropped, no close frame
        room.forget(by_pid[victim])

        staying = [c for pid in survivors for c in by_pid[pid]]
        staying[0].send("after the kill")
        for client in staying:
            assert receive(client, 1) == ["after the kill"]
        wait_for(lambda: subscribers(r, room.path) == 2, "Redis to drop the dead")

        # The dead worker's presence expires: within presence_ttl, the count
        # is the survivors' alone.
        ttl = float(FAST_BACKEND["presence_ttl"])
        survivors_only = {pid: expected[pid] for pid in survivors}
        wait_for(
            lambda: presence(r, room.path) == survivors_only,
            "the dead worker to leave the presence hash",
            timeout=ttl + 1,
        )
        forgotten_after = time.monotonic() - killed

        def replaced():
            pids = worker_pids(server)
            new = pids - set(by_pid)
            return len(pids) == 3 and victim not in pids and new and new.pop()

        newcomer_pid = wait_for(replaced, "a replacement worker")
        assert f"worker {victim} exited (killed by SIGKILL)" in server.output

        # The replacement serves the room like the others.
        newcomer = None
        for _ in range(10):
            url = server.ws_url + room.path
            batch = [room.join(stack.enter_context(connect(url))) for _ in range(3)]
            where = serving_pids(batch, {newcomer_pid, *survivors})
            for client in batch:
                if newcomer is None and where[client] == newcomer_pid:
                    newcomer = client
                else:
                    staying.append(client)
            if newcomer is not None:
                break
        assert newcomer is not None, "no connection reached the new worker"
        room.settle()
        newcomer.send("from the new worker")
        for client in [*staying, newcomer]:
            assert receive(client, 1) == ["from the new worker"]
        assert subscribers(r, room.path) == 3
        report(
            f"a SIGKILLed worker left the presence count {forgotten_after:.2f} s "
            f"after its death (presence_ttl {ttl} s); replacement pid "
            f"{newcomer_pid} serves the room"
        )
