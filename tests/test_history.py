"""Message history and recovery: positions, windows, epochs, resuming.

The first half runs in process on the memory backend, with listeners that
record what they are sent. The fault tests further down run real worker
processes (this file run as a script) on a private Redis with the streams
backend, and the demo in a subprocess with real WebSocket clients.
"""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import pytest
from pyramid.config import Configurator

from stargate import runtime
from stargate.backends.base import HistoryPolicy, Position
from stargate.backends.memory import MemoryBackend
from stargate.backends.redis_streams import RedisStreamsBackend
from stargate.config import parse_settings
from stargate.exceptions import HistoryUnavailable, IncorrectlyConfigured
from stargate.hub import Hub
from stargate.resource import WebSocketAwareResource
from tests import green

#: Seconds any single wait may take.
DEADLINE = 20.0

POLICY = HistoryPolicy(size=100, ttl=3600.0)


class Listener:
    """A listener that records every message it is sent."""

    def __init__(self, name="listener", on_send=None):
        self.name = name
        self.received = []
        self.closed = False
        self.on_send = on_send

    def send(self, message):
        if self.closed:
            raise OSError("closed")
        self.received.append(message)
        if self.on_send is not None:
            self.on_send(message)

    def __repr__(self):
        return f"<Listener {self.name}>"


def wait_until(predicate, timeout=DEADLINE, interval=0.01):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        green.sleep(interval)
    return True


@pytest.fixture
def hub():
    hub = Hub(MemoryBackend())
    hub.start()
    yield hub
    hub.close()


# -- positions ----------------------------------------------------------------


class TestPosition:
    def test_coerces_a_pair(self):
        assert Position.coerce(("abc", "7")) == Position("abc", 7)
        position = Position("e", 3)
        assert Position.coerce(position) is position

    @pytest.mark.parametrize("value", [None, "abc", ("e",), ("e", 1, 2)])
    def test_refuses_what_is_not_a_pair(self, value):
        with pytest.raises(TypeError):
            Position.coerce(value)

    @pytest.mark.parametrize("value", [("e", -1), ("", 3), ("e", "x"), ("e", True)])
    def test_refuses_a_bad_epoch_or_offset(self, value):
        with pytest.raises(ValueError):
            Position.coerce(value)

    def test_is_frozen_and_hashable(self):
        position = Position("e", 1)
        with pytest.raises(AttributeError):
            position.offset = 2
        assert {position: 1}[Position("e", 1)] == 1


# -- the memory backend's window ----------------------------------------------


class TestMemoryHistory:
    def test_no_history_without_a_policy(self):
        backend = MemoryBackend()
        backend.start(lambda *args: None)
        assert backend.publish("c", "x") is None
        with pytest.raises(HistoryUnavailable):
            backend.history("c", Position("other", 1))
        assert backend.history("c", Position(backend.epoch, 0)) == []

    def test_offsets_grow_by_one_per_message_per_channel(self):
        backend = MemoryBackend()
        backend.start(lambda *args: None)
        got = [backend.publish("a", f"a{i}", history=POLICY) for i in range(3)]
        other = backend.publish("b", "b0", history=POLICY)
        assert [p.offset for p in got] == [1, 2, 3]
        assert {p.epoch for p in got} == {backend.epoch} == {other.epoch}
        assert other.offset == 1

    def test_delivers_with_the_position(self):
        backend = MemoryBackend()
        seen = []
        backend.start(lambda *args: seen.append(args))
        backend.subscribe("c")
        position = backend.publish("c", "x", history=POLICY)
        assert seen == [("c", "x", position)]

    def test_reads_what_came_after_a_position(self):
        backend = MemoryBackend()
        backend.start(lambda *args: None)
        positions = [backend.publish("c", f"m{i}", history=POLICY) for i in range(5)]
        assert backend.history("c", positions[1]) == [
            (positions[2], "m2"),
            (positions[3], "m3"),
            (positions[4], "m4"),
        ]
        assert backend.history("c", positions[4]) == []
        assert [m for _, m in backend.history("c", (backend.epoch, 0))] == [
            f"m{i}" for i in range(5)
        ]

    def test_keeps_the_message_type(self):
        backend = MemoryBackend()
        backend.start(lambda *args: None)
        backend.publish("c", b"\x00bin", history=POLICY)
        backend.publish("c", "text", history=POLICY)
        assert [m for _, m in backend.history("c", (backend.epoch, 0))] == [
            b"\x00bin",
            "text",
        ]

    def test_a_position_out_of_the_window_is_unavailable(self):
        backend = MemoryBackend()
        backend.start(lambda *args: None)
        small = HistoryPolicy(size=3, ttl=3600.0)
        for i in range(10):
            backend.publish("c", f"m{i}", history=small)
        assert len(backend.history("c", (backend.epoch, 7))) == 3
        with pytest.raises(HistoryUnavailable) as caught:
            backend.history("c", (backend.epoch, 6))
        assert (caught.value.epoch, caught.value.offset) == (backend.epoch, 10)

    def test_another_epoch_is_unavailable(self):
        backend = MemoryBackend()
        backend.start(lambda *args: None)
        backend.publish("c", "x", history=POLICY)
        restarted = MemoryBackend()
        restarted.start(lambda *args: None)
        assert restarted.epoch != backend.epoch
        with pytest.raises(HistoryUnavailable) as caught:
            restarted.history("c", (backend.epoch, 0))
        assert caught.value.epoch == restarted.epoch
        assert caught.value.offset == 0

    def test_a_position_from_the_future_is_unavailable(self):
        backend = MemoryBackend()
        backend.start(lambda *args: None)
        backend.publish("c", "x", history=POLICY)
        with pytest.raises(HistoryUnavailable):
            backend.history("c", (backend.epoch, 5))

    def test_history_expires_after_the_ttl_with_its_epoch(self):
        backend = MemoryBackend()
        backend.start(lambda *args: None)
        brief = HistoryPolicy(size=10, ttl=0.05)
        first = backend.publish("c", "old", history=brief)
        backend._clock = lambda: time.monotonic() + 1.0  # past the ttl
        with pytest.raises(HistoryUnavailable):
            backend.history("c", first)
        second = backend.publish("c", "new", history=brief)
        assert second.offset == 1 and second.epoch != first.epoch


# -- recovery through the hub -------------------------------------------------


def publish_numbers(hub, channel, start, stop):
    return [hub.publish(channel, str(i), history=POLICY) for i in range(start, stop)]


class TestHubRecovery:
    def test_replays_what_was_missed_then_live(self, hub):
        stay = Listener("stay")
        hub.add("room", stay)
        positions = publish_numbers(hub, "room", 0, 10)
        back = Listener("back")
        hub.add("room", back, since=positions[3])
        publish_numbers(hub, "room", 10, 12)
        assert back.received == [str(i) for i in range(4, 12)]
        assert stay.received == [str(i) for i in range(12)]
        assert hub.history_stats == {"recovered": 1, "replayed": 6, "unavailable": 0}

    def test_live_messages_during_the_replay_come_once_in_order(self, hub):
        positions = publish_numbers(hub, "room", 0, 5)
        backend = hub.backend
        read = backend.history

        def history_while_others_publish(channel, since):
            # One message lands before the window is read (so it is both in
            # the window and buffered), one after (only buffered).
            hub.publish(channel, "5", history=POLICY)
            window = read(channel, since)
            hub.publish(channel, "6", history=POLICY)
            return window

        backend.history = history_while_others_publish
        listener = Listener(
            "back",
            # and one more while the listener is being written to
            on_send=lambda m: m == "2" and hub.publish("room", "7", history=POLICY),
        )
        hub.add("room", listener, since=positions[0])
        backend.history = read
        hub.publish("room", "8", history=POLICY)
        assert listener.received == [str(i) for i in range(1, 9)]

    def test_formats_each_message_once_with_its_position(self, hub):
        calls = []

        def formatter(message, position):
            calls.append((message, position))
            return json.dumps({"text": message, "offset": position.offset})

        listeners = [Listener(str(i)) for i in range(3)]
        for listener in listeners:
            hub.add("room", listener, formatter=formatter)
        position = hub.publish("room", "hi", history=POLICY)
        assert calls == [("hi", position)]
        for listener in listeners:
            assert listener.received == [json.dumps({"text": "hi", "offset": 1})]
        back = Listener("back")
        hub.add("room", back, since=(position.epoch, 0))
        assert back.received == [json.dumps({"text": "hi", "offset": 1})]

    def test_no_formatting_without_history(self, hub):
        formatter_calls = []
        listener = Listener()
        hub.add("room", listener, formatter=lambda m, p: formatter_calls.append(m))
        assert hub.publish("room", "plain") is None
        assert listener.received == ["plain"] and formatter_calls == []

    def test_unavailable_history_leaves_the_listener_out(self, hub):
        publish_numbers(hub, "room", 0, 3)
        listener = Listener()
        with pytest.raises(HistoryUnavailable) as caught:
            hub.add("room", listener, since=("an-old-epoch", 2))
        assert caught.value.epoch == hub.backend.epoch
        assert caught.value.offset == 3
        assert listener not in hub.listeners("room")
        assert "room" not in hub.channels()
        assert hub.history_stats["unavailable"] == 1
        # The application reloads, then listens from the current position.
        hub.add("room", listener, since=(caught.value.epoch, caught.value.offset))
        hub.publish("room", "next", history=POLICY)
        assert listener.received == ["next"]

    def test_a_listener_that_dies_during_the_replay_is_pruned(self, hub):
        positions = publish_numbers(hub, "room", 0, 5)
        listener = Listener()
        listener.on_send = lambda m: setattr(listener, "closed", True)
        hub.add("room", listener, since=positions[0])
        assert listener.received == ["1"]
        assert listener not in hub.listeners("room")
        hub.publish("room", "after", history=POLICY)  # nothing raises

    def test_adding_a_live_listener_again_with_since_changes_nothing(self, hub):
        listener = Listener()
        hub.add("room", listener)
        positions = publish_numbers(hub, "room", 0, 3)
        hub.add("room", listener, since=positions[0])
        assert listener.received == ["0", "1", "2"]

    def test_history_on_a_backend_without_it_is_a_configuration_error(self):
        class NoHistory(MemoryBackend):
            supports_history = False

            def history(self, channel, since):
                return super(MemoryBackend, self).history(channel, since)

        hub = Hub(NoHistory())
        with pytest.raises(IncorrectlyConfigured, match="keeps none"):
            hub.publish("room", "x", history=POLICY)
        with pytest.raises(HistoryUnavailable):
            hub.add("room", Listener(), since=("e", 0))


# -- resources and settings ---------------------------------------------------


class Room(WebSocketAwareResource):
    history_size = 50

    def __init__(self, name, hub):
        self.__name__ = name
        self.__parent__ = None
        self.hub = hub
        self.formatted = 0

    def format_message(self, message, position):
        self.formatted += 1
        return f"{position.offset}:{message}"


class TestResource:
    def test_send_returns_the_position_and_clients_resume(self, hub):
        room = Room("lobby", hub)
        first = Listener("first")
        room.add_listener(first)
        positions = [room.send(f"m{i}") for i in range(4)]
        assert [p.offset for p in positions] == [1, 2, 3, 4]
        assert first.received == ["1:m0", "2:m1", "3:m2", "4:m3"]
        assert room.formatted == 4
        # a resource built per request: a new object, the same channel
        again = Room("lobby", hub)
        back = Listener("back")
        again.add_listener(back, since=(positions[1].epoch, positions[1].offset))
        assert back.received == ["3:m2", "4:m3"]

    def test_history_is_off_by_default(self, hub):
        room = WebSocketAwareResource()
        room.hub = hub
        assert room.history_policy() is None
        assert room.send("x") is None

    def test_settings_and_class_attributes(self):
        settings = parse_settings(
            {"stargate.history_size": "200", "stargate.history_ttl": "60"}
        )
        assert (settings.history_size, settings.history_ttl) == (200, 60.0)
        assert parse_settings({}).history_size == 0
        with pytest.raises(IncorrectlyConfigured):
            parse_settings({"stargate.history_size": "-1"})
        with pytest.raises(IncorrectlyConfigured):
            parse_settings({"stargate.history_ttl": "0"})
        with Configurator(settings={"stargate.history_size": "200"}) as config:
            config.include("stargate")
            resource = WebSocketAwareResource()
            assert resource.history_policy() == HistoryPolicy(200, 3600.0)
            resource.history_size, resource.history_ttl = 5, 9
            assert resource.history_policy() == HistoryPolicy(5, 9.0)
            resource.history_size = 0
            assert resource.history_policy() is None

    def test_history_with_a_pubsub_backend_is_refused(self, redis_server):
        settings = {
            "stargate.history_size": "10",
            "stargate.backend": redis_server.url,
        }
        with Configurator(settings=settings) as config:
            with pytest.raises(IncorrectlyConfigured, match="redis\\+streams"):
                config.include("stargate")


# -- fault tests: two worker processes on one private Redis -------------------

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "history_worker.py"


class Worker:
    """A hub on the streams backend in its own OS process (history_worker.py),
    on this process's runtime."""

    def __init__(self, server, prefix, channel, listeners, tmp_path, name):
        self.prefix, self.channel = prefix, channel
        self.errors = open(tmp_path / f"{name}.stderr", "w+")
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
        env[runtime.RUNTIME_ENV] = runtime.current().NAME  # the worker runs it too
        url = server.url.replace("redis://", "redis+streams://")
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), url, prefix, channel, str(listeners)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            cwd=ROOT,
            env=env,
        )
        hello = self.read(30)
        self.pid, self.process_id = hello["pid"], hello["process_id"]

    def read(self, timeout):
        line = b""
        with green.Timeout(timeout, False):
            line = self.process.stdout.readline()
        if not line:
            self.errors.seek(0)
            raise AssertionError(f"worker said nothing: {self.errors.read()[-3000:]}")
        return json.loads(line)

    def call(self, _timeout=60, **command):
        timeout = _timeout
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        self.process.stdin.flush()
        return self.read(timeout)

    def stop(self):
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            try:
                self.process.stdin.write(b'{"cmd": "exit"}\n')
                self.process.stdin.flush()
            except OSError:
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.errors.close()


@pytest.fixture
def workers(redis_server, tmp_path):
    prefix = f"faults-{uuid.uuid4().hex[:8]}:"
    started = []

    def start(name, listeners=3):
        worker = Worker(redis_server, prefix, "numbers", listeners, tmp_path, name)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def worker_connections(server, process_id):
    """How many connections a worker has open (found by their name)."""
    with server.client() as r:
        return sum(process_id in client.get("name", "") for client in r.client_list())


def kill_connections(server, process_id):
    """CLIENT KILL every connection a worker has open (found by its name)."""
    killed = 0
    with server.client() as r:
        for client in r.client_list():
            if process_id in client.get("name", ""):
                r.client_kill_filter(_id=client["id"])
                killed += 1
    return killed


EVERY_NUMBER = list(range(1000))


@pytest.mark.timeout(180)
def test_a_worker_whose_redis_connections_are_killed_misses_nothing(
    redis_server, workers
):
    cut_off, publisher = workers("cut-off"), workers("publisher", listeners=1)
    kills = 0
    for start in range(0, 1000, 100):
        # Each round cuts a connection the worker has made again since the
        # last one: wait for it (the reconnect, not a count of seconds).
        assert wait_until(
            lambda: worker_connections(redis_server, cut_off.process_id) > 0,
            timeout=30,
        ), "the worker did not reconnect to Redis"
        kills += kill_connections(redis_server, cut_off.process_id)
        assert publisher.call(cmd="publish", start=start, count=100) == {
            "published": 100
        }
    assert kills >= 10
    report = cut_off.call(cmd="wait", count=1000, timeout=60, _timeout=90)
    for received in report["listeners"]:
        assert received == EVERY_NUMBER  # all of them, in order, none twice
    assert report["stats"]["reconnects"] >= 1
    assert report["stats"]["gaps"] == 0
    mine = publisher.call(cmd="wait", count=1000, timeout=60)
    assert mine["listeners"] == [EVERY_NUMBER]


@pytest.mark.timeout(180)
def test_a_paused_worker_catches_up_after_sigcont(workers):
    paused, publisher = workers("paused"), workers("publisher", listeners=1)
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        publisher.call(cmd="publish", start=0, count=1000)
        green.sleep(1.0)  # longer than a block: Redis answered into the void
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    report = paused.call(cmd="wait", count=1000, timeout=60, _timeout=90)
    for received in report["listeners"]:
        assert received == EVERY_NUMBER
    assert report["stats"]["gaps"] == 0


class PositionListener(Listener):
    """Records ``(offset, number)`` pairs; its channel's formatter puts the
    position in front of each message."""

    @staticmethod
    def formatter(message, position):
        return f"{position.epoch} {position.offset} {message}"

    def pairs(self):
        return [tuple(map(int, m.split()[1:])) for m in self.received]

    def last_position(self, back=0):
        epoch, offset, _ = self.received[-1 - back].split()
        return Position(epoch, int(offset))


@pytest.mark.timeout(180)
def test_resuming_on_streams_while_another_worker_publishes_is_exact(
    redis_server, workers
):
    """Defect 3: ``add(ws, since=...)`` on ``redis+streams`` while another
    worker publishes: no duplicate, no gap, in order, for every resume (the
    switch to live waits for this worker's reader to pass the position the
    history was read to)."""
    publisher = workers("publisher", listeners=1)
    backend = RedisStreamsBackend(
        redis_server.url.replace("redis://", "redis+streams://"),
        prefix=publisher.prefix,
        history_size=50000,
        socket_timeout=2.0,
    )
    hub = Hub(backend)
    try:
        stay = PositionListener("stay")
        hub.add(publisher.channel, stay, formatter=PositionListener.formatter)
        total = 6000
        publisher.process.stdin.write(
            json.dumps({"cmd": "publish", "start": 0, "count": total}).encode() + b"\n"
        )
        publisher.process.stdin.flush()
        resumed = []
        while len(resumed) < 40:
            seen = len(stay.received)
            assert wait_until(lambda: len(stay.received) >= seen + 50)
            if len(stay.received) > total - 200:
                break  # the publisher is nearly done: no concurrency left
            since = stay.last_position(back=20)
            listener = PositionListener(f"resume {len(resumed)}")
            hub.add(publisher.channel, listener, since=since)
            resumed.append((listener, since.offset))
        assert publisher.read(60) == {"published": total}
        assert len(resumed) >= 10
        # Bounded by count; generous in time, for a loaded machine.
        assert wait_until(lambda: len(stay.received) >= total, timeout=DEADLINE * 3)
        assert stay.pairs() == [(n + 1, n) for n in range(total)]
        for listener, since in resumed:
            assert wait_until(
                lambda: listener.pairs()[-1:] == [(total, total - 1)],
                timeout=DEADLINE * 3,
            )
            offsets = [offset for offset, _ in listener.pairs()]
            assert offsets == list(range(since + 1, total + 1)), listener
        assert backend.stats["gaps"] == 0
    finally:
        hub.close()


# -- clients that reconnect, through the demo in a subprocess ------------------


@contextlib.contextmanager
def demo(backend="memory"):
    from tests.clients import ServerProcess, stargate_command

    server = ServerProcess(
        stargate_command(
            "demo", "--port", "0", "--backend", backend, "--log-level", "warning"
        ),
        url_pattern=r"stargate demo: (http://\S+)",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def say(ws, text):
    ws.send(json.dumps({"type": "message", "name": "test", "text": text}))


def receive(ws, count):
    return [json.loads(ws.recv(timeout=10)) for _ in range(count)]


def joined(server, room, position=None):
    """A client in ``room`` that listens (its own marker came back)."""
    from tests.clients import connect

    query = ""
    if position is not None:
        query = f"?epoch={position[0]}&offset={position[1]}"
    ws = connect(f"{server.ws_url}/rooms/{room}{query}")
    return ws


def marker(ws, text="ready"):
    """Send a marker and read up to it: the client listens from then on."""
    say(ws, text)
    while True:
        data = json.loads(ws.recv(timeout=10))
        if data.get("text") == text:
            return data


def missed_then_live(first, second, room):
    """``first`` leaves, 100 messages go by, it comes back with its position:
    it gets exactly those 100, then live ones."""
    stay = joined(second, room)
    leave = joined(first, room)
    marker(stay, "stay ready")
    seen = marker(leave, "leave ready")
    assert isinstance(seen["epoch"], str) and seen["offset"] >= 1
    marker(stay, "both ready")
    leave.close()
    for i in range(100):
        say(stay, f"missed {i}")
    sent = receive(stay, 100)
    assert [m["text"] for m in sent] == [f"missed {i}" for i in range(100)]
    back = joined(first, room, (seen["epoch"], seen["offset"]))
    try:
        replayed = receive(back, 101)
        assert [m["text"] for m in replayed] == ["both ready"] + [
            f"missed {i}" for i in range(100)
        ]
        offsets = [m["offset"] for m in replayed]
        assert offsets == list(range(seen["offset"] + 1, seen["offset"] + 102))
        say(stay, "live")
        assert receive(back, 1)[0]["text"] == "live"
        with pytest.raises(TimeoutError):
            back.recv(timeout=0.3)  # and nothing twice
    finally:
        back.close()
        stay.close()


@pytest.mark.timeout(120)
def test_a_client_gets_what_it_missed_on_the_memory_backend():
    with demo() as server:
        missed_then_live(server, server, "recover-memory")


@pytest.mark.timeout(120)
def test_a_client_gets_what_it_missed_across_two_streams_servers(redis_server):
    url = redis_server.url.replace("redis://", "redis+streams://")
    with demo(url) as first, demo(url) as second:
        missed_then_live(first, second, f"recover-{uuid.uuid4().hex[:8]}")


@pytest.mark.timeout(120)
def test_redis_restarted_without_persistence_clients_are_told(fresh_redis_server):
    url = fresh_redis_server.url.replace("redis://", "redis+streams://")
    with demo(url) as server:
        ws = joined(server, "restart")
        seen = marker(ws)
        ws.close()
        fresh_redis_server.restart()
        # Nothing published since the restart: no epoch yet.
        back = joined(server, "restart", (seen["epoch"], seen["offset"]))
        reset = json.loads(back.recv(timeout=10))
        assert reset["type"] == "reset"
        assert reset["epoch"] is None and reset["offset"] == 0
        after = marker(back, "after the restart")  # the room works again
        assert after["epoch"] != seen["epoch"] and after["offset"] == 1
        back.close()
        # A client from the old epoch, once the new one exists, is told too.
        late = joined(server, "restart", (seen["epoch"], seen["offset"]))
        reset = json.loads(late.recv(timeout=10))
        assert reset["type"] == "reset"
        assert (reset["epoch"], reset["offset"]) == (after["epoch"], 1)
        late.close()
        assert server.process.poll() is None
