"""The broadcast hub, with real connections on loopback sockets.

Listeners are real :class:`stargate.connection.WebSocket` objects on TCP
connections to 127.0.0.1; their peers are raw sockets that read RFC 6455
frames, reset (``SO_LINGER`` 0, then close), close, or stop reading. The
end-to-end tests run a Pyramid application in stargate's server on the
process's runtime (:class:`~stargate.testing.server.LiveServer`) and connect
``websockets`` clients from a subprocess.
"""

import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from pyramid.config import Configurator
from pyramid.registry import Registry

import stargate.connection
import stargate.hub
from stargate.backends.base import (
    History,
    Presence,
    counts_presence,
    keeps_history,
)
from stargate.backends.memory import MemoryBackend
from stargate.backends.redis import RedisBackend
from stargate.connection import SendGroup, SendResult, WebSocket
from stargate.exceptions import BackendUnavailable
from stargate.frames import FrameParser, Opcode, WireFormat, encode_message
from stargate.hub import Hub, HubStats, default_hub, get_hub
from stargate.protocol import ServerProtocol
from stargate.resource import WebSocketAwareResource
from stargate.testing.server import LiveServer
from tests import green
from tests.backends.test_memory import CustomBackend

#: Seconds any single wait in these tests may take.
DEADLINE = 10.0


def wait_until(predicate, timeout=DEADLINE, interval=0.005):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        green.sleep(interval)
    return True


# -- peers ------------------------------------------------------------------


class Peer:
    """The client end of a connection: a raw socket reading server frames."""

    def __init__(self, sock, data=b""):
        self.sock = sock
        self.parser = FrameParser(require_mask=False)
        if data:
            self.parser.feed(data)

    def messages(self, count, timeout=DEADLINE):
        """Read ``count`` messages (``str`` or ``bytes``) within ``timeout``."""
        received = []
        deadline = time.monotonic() + timeout
        while len(received) < count:
            frame = self.parser.next_frame()
            if frame is not None:
                if frame.opcode is Opcode.TEXT:
                    received.append(frame.payload.decode("utf-8"))
                elif frame.opcode is Opcode.BINARY:
                    received.append(frame.payload)
                continue
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"got {len(received)} of {count} messages"
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            assert data, f"connection ended after {len(received)} of {count}"
            self.parser.feed(data)
        return received

    def nothing_pending(self, wait=0.05):
        """True if no complete frame arrives within ``wait`` seconds."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, BlockingIOError):
            data = None
        if data:
            self.parser.feed(data)
        return self.parser.next_frame() is None

    def reset(self):
        """Close with an RST instead of a FIN."""
        self.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.sock.close()

    def close(self):
        self.sock.close()


class Loopback:
    """Makes server-side WebSockets on loopback TCP connections.

    No handler runs, but each connection's reader does (a hub callback): a
    peer that resets or closes is found by it, without a send. The peers are
    kept here, so a peer a test does not use stays connected; ``close()``
    ends every connection it made (left to the garbage collector, they would
    warn as unclosed sockets).
    """

    def __init__(self, sndbuf=None):
        self.peers = []
        self.websockets = []
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=50)
        if sndbuf is not None:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.port = self.listener.getsockname()[1]

    def connect(self, *, draft="rfc6455", rcvbuf=None, cls=WebSocket, **options):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client.connect(("127.0.0.1", self.port))
        server, _ = self.listener.accept()
        options.setdefault("ping_interval", None)
        ws = cls(server, ServerProtocol(WireFormat(draft)), **options)
        self.websockets.append(ws)
        self.peers.append(Peer(client))
        return ws, self.peers[-1]

    def close(self):
        self.listener.close()
        for ws in self.websockets:
            ws.abort()
        for peer in self.peers:
            peer.close()


@pytest.fixture(autouse=True, params=["c", "python"])
def walk(request, monkeypatch):
    """Every test here runs with both broadcast walks of SendGroup: the C one
    (stargate._speedups, built by ``pip install -e .``) and the pure Python
    fallback used where it was not built."""
    if request.param == "python":
        monkeypatch.setattr(stargate.connection, "_send_many_c", None)
    else:
        assert stargate.connection._send_many_c is not None, (
            "stargate._speedups was not built: pip install -e . with a C compiler"
        )
    return request.param


@pytest.fixture
def loopback():
    lo = Loopback()
    yield lo
    lo.close()


@pytest.fixture
def hub():
    h = Hub(MemoryBackend())
    yield h
    h.close()


class RecordingBackend(MemoryBackend):
    """The memory backend, remembering what the hub told it."""

    def __init__(self, **options):
        super().__init__(**options)
        self.calls = []
        self.counts = {}
        self.starts = 0

    def start(self, deliver):
        self.starts += 1
        super().start(deliver)

    def subscribe(self, channel):
        self.calls.append(("subscribe", channel))
        super().subscribe(channel)

    def unsubscribe(self, channel):
        self.calls.append(("unsubscribe", channel))
        super().unsubscribe(channel)

    def set_local_count(self, channel, count):
        self.counts[channel] = count


class RecordingWebSocket(WebSocket):
    """A real connection that remembers the bytes the hub gave it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prepared = []

    def send_prepared(self, data):
        self.prepared.append(data)
        return super().send_prepared(data)


# -- listeners and channels ---------------------------------------------------


class TestListeners:
    def test_add_is_idempotent_and_remove_of_an_absent_listener_is_fine(
        self, hub, loopback
    ):
        ws, _ = loopback.connect()
        hub.add("room", ws)
        hub.add("room", ws)
        assert set(hub.listeners("room")) == {ws}
        assert hub.remove("room", ws) is True
        assert hub.remove("room", ws) is False
        assert hub.remove("never-used", ws) is False
        assert len(hub.listeners("room")) == 0

    def test_first_listener_subscribes_and_last_unsubscribes(self, loopback):
        backend = RecordingBackend()
        hub = Hub(backend)
        first, _ = loopback.connect()
        second, _ = loopback.connect()
        hub.add("room", first)
        hub.add("room", second)
        hub.remove("room", first)
        assert backend.calls == [("subscribe", "room")]
        hub.remove("room", second)
        assert backend.calls == [("subscribe", "room"), ("unsubscribe", "room")]
        assert hub.channels() == set()
        hub.close()

    def test_backend_hears_the_local_count_as_it_changes(self, loopback):
        backend = RecordingBackend()
        hub = Hub(backend)
        first, _ = loopback.connect()
        second, _ = loopback.connect()
        hub.add("room", first)
        assert backend.counts == {"room": 1}
        hub.add("room", second)
        assert backend.counts == {"room": 2}
        assert hub.listener_count("room") == 2
        hub.remove("room", first)
        assert backend.counts == {"room": 1}
        second.abort()
        assert backend.counts == {"room": 0}
        assert hub.listener_count("room") == 0
        hub.close()

    def test_listeners_is_a_live_view(self, hub, loopback):
        view = hub.listeners("room")
        ws, _ = loopback.connect()
        assert ws not in view and len(view) == 0 and not view
        view.add(ws)
        assert ws in view and len(view) == 1 and view == {ws}
        assert hub.channels() == {"room"}
        view.discard(ws)
        assert hub.channels() == set()
        with pytest.raises(KeyError):
            view.remove(ws)

    def test_a_listener_may_join_several_channels(self, hub, loopback):
        ws, peer = loopback.connect()
        hub.add("a", ws)
        hub.add("b", ws)
        assert hub.channels_of(ws) == {"a", "b"}
        assert hub.stats.listeners == 2 and hub.stats.channels == 2
        hub.publish("a", "on a")
        hub.publish("b", "on b")
        assert peer.messages(2) == ["on a", "on b"]

    def test_a_connection_that_ends_leaves_every_channel(self, hub, loopback):
        ws, _ = loopback.connect()
        hub.add("a", ws)
        hub.add("b", ws)
        ws.abort()
        assert hub.channels() == set()
        assert hub.stats.listeners == 0

    def test_a_connection_already_closed_is_not_kept(self, hub, loopback):
        ws, _ = loopback.connect()
        ws.abort()
        hub.add("room", ws)
        assert hub.channels() == set()


# -- delivery -----------------------------------------------------------------


class TestDelivery:
    def test_every_listener_gets_every_message_in_order(self, hub, loopback):
        pairs = [loopback.connect() for _ in range(5)]
        for ws, _ in pairs:
            hub.add("room", ws)
        sent = ["one", b"\x00two", "caf\u00e9", b"", "x" * 70000]
        for message in sent:
            hub.publish("room", message)
        for _, peer in pairs:
            assert peer.messages(len(sent)) == sent
        assert hub.stats.messages == 5
        assert hub.stats.delivered == 25

    def test_publish_returns_after_delivery_on_the_memory_backend(self, hub, loopback):
        ws, peer = loopback.connect()
        hub.add("room", ws)
        hub.publish("room", "now")
        assert hub.stats.delivered == 1
        assert peer.messages(1, timeout=1) == ["now"]

    def test_the_frame_is_encoded_once_per_wire_format(self, hub, loopback):
        modern = [loopback.connect(cls=RecordingWebSocket) for _ in range(4)]
        hixie = [
            loopback.connect(cls=RecordingWebSocket, draft="hixie-76") for _ in range(3)
        ]
        for ws, _ in modern + hixie:
            hub.add("room", ws)
        hub.publish("room", "hello")
        modern_data = {id(ws.prepared[0]) for ws, _ in modern}
        hixie_data = {id(ws.prepared[0]) for ws, _ in hixie}
        assert len(modern_data) == 1 and len(hixie_data) == 1
        assert modern[0][0].prepared[0] != hixie[0][0].prepared[0]
        for _, peer in modern:
            assert peer.messages(1) == ["hello"]
        for _, peer in hixie:
            peer.sock.settimeout(DEADLINE)
            data = b""
            while not data.endswith(b"\xff"):
                data += peer.sock.recv(100)
            assert data == b"\x00hello\xff"

    def test_each_wire_format_is_encoded_once_per_message(
        self, hub, loopback, monkeypatch
    ):
        calls = []

        def counting(message, wire_format):
            calls.append(wire_format)
            return encode_message(message, wire_format)

        monkeypatch.setattr(stargate.hub, "encode_message", counting)
        pairs = [loopback.connect() for _ in range(5)]
        pairs += [loopback.connect(draft="hixie-76") for _ in range(3)]
        for ws, _ in pairs:
            hub.add("room", ws)
        hub.publish("room", "hello")
        assert sorted(f.draft for f in calls) == ["hixie-76", "rfc6455"]
        for _, peer in pairs[:5]:
            assert peer.messages(1) == ["hello"]
        for _, peer in pairs[5:]:
            peer.sock.settimeout(DEADLINE)
            assert peer.sock.recv(100) == b"\x00hello\xff"
        assert hub.stats.delivered == 8

    def test_a_frame_the_kernel_takes_in_part_is_finished_in_order(self):
        lo = Loopback(sndbuf=4096)
        hub = Hub(MemoryBackend())
        ws, peer = lo.connect(rcvbuf=4096, max_send_buffer=2**22)
        hub.add("room", ws)
        big = "b" * 300_000
        assert hub.publish("room", big) is None
        # The kernel took part of it; the connection queued the rest.
        assert ws.buffered_amount > 0
        assert hub.publish("room", "after") is None
        assert peer.messages(2) == [big, "after"]
        assert wait_until(lambda: ws.buffered_amount == 0)
        assert hub.stats.delivered == 2 and ws in hub.listeners("room")
        hub.close()
        lo.close()

    def test_publish_refuses_what_is_not_a_message(self, hub):
        with pytest.raises(TypeError):
            hub.publish("room", 42)

    def test_bytes_like_messages_are_sent_as_bytes(self, hub, loopback):
        ws, peer = loopback.connect()
        hub.add("room", ws)
        hub.publish("room", bytearray(b"ab"))
        hub.publish("room", memoryview(b"cd"))
        assert peer.messages(2) == [b"ab", b"cd"]

    def test_publish_to_a_channel_without_listeners_is_fine(self, hub):
        hub.publish("empty", "nobody")
        assert hub.stats.messages == 1 and hub.stats.delivered == 0

    def test_a_closed_hub_refuses_to_publish(self):
        hub = Hub(MemoryBackend())
        hub.close()
        hub.close()
        with pytest.raises(BackendUnavailable):
            hub.publish("room", "late")


# -- pruning ------------------------------------------------------------------


class TestPruning:
    def test_reset_peers_leave_by_themselves_and_are_not_sent_to(self, hub, loopback):
        pairs = [loopback.connect() for _ in range(10)]
        for ws, _ in pairs:
            hub.add("room", ws)
        dead, alive = pairs[:4], pairs[4:]
        for _, peer in dead:
            peer.reset()
        # Each connection's reader sees its reset: no send is needed.
        assert wait_until(lambda: hub.listener_count("room") == 6)

        assert hub.deliver("room", "first") == 6
        assert hub.stats.pruned_dead == 0
        assert hub.listener_count("room") == 6
        assert all(ws not in hub.listeners("room") for ws, _ in dead)
        assert all(ws.closed for ws, _ in dead)

        assert hub.deliver("room", "second") == 6
        assert hub.stats.pruned_dead == 0
        for _, peer in alive:
            assert peer.messages(2) == ["first", "second"]

    def test_closed_peers_leave_by_themselves(self, hub, loopback):
        # The reader sees each FIN (end of file) and ends the connection.
        pairs = [loopback.connect() for _ in range(6)]
        for ws, _ in pairs:
            hub.add("room", ws)
        for _, peer in pairs[:3]:
            peer.close()
        assert wait_until(lambda: hub.listener_count("room") == 3)
        hub.publish("room", "first")
        hub.publish("room", "second")
        assert hub.listener_count("room") == 3
        for _, peer in pairs[3:]:
            assert peer.messages(2) == ["first", "second"]

    def test_a_listener_that_raises_does_not_stop_the_others(self, hub, loopback):
        class Broken(WebSocket):
            def send_prepared(self, data):
                raise OSError("the hardware caught fire")

        broken, _ = loopback.connect(cls=Broken)
        pairs = [loopback.connect() for _ in range(3)]
        hub.add("room", broken)
        for ws, _ in pairs:
            hub.add("room", ws)
        hub.publish("room", "still delivered")
        for _, peer in pairs:
            assert peer.messages(1) == ["still delivered"]
        assert broken not in hub.listeners("room")
        assert hub.stats.pruned_dead == 1

    def test_slow_listener_closed_when_its_buffer_is_full(self):
        lo = Loopback(sndbuf=4096)
        hub = Hub(MemoryBackend())
        slow, stuck = lo.connect(rcvbuf=4096, max_send_buffer=32768)
        fast, peer = lo.connect(max_send_buffer=32768)
        hub.add("room", slow)
        hub.add("room", fast)
        message = "m" * 2048
        for i in range(200):
            hub.publish("room", message)
            assert slow.buffered_amount <= slow.max_send_buffer
            assert peer.messages(1) == [message]
            if slow not in hub.listeners("room"):
                break
        assert slow not in hub.listeners("room")
        assert slow.closed and slow.close_code == 1013
        assert hub.stats.closed_slow == 1 and hub.stats.pruned_dead == 0
        assert fast in hub.listeners("room")
        hub.close()
        lo.close()
        stuck.close()

    def test_a_backlog_drains_in_order_once_the_peer_reads_again(self):
        lo = Loopback(sndbuf=4096)
        ws, peer = lo.connect(rcvbuf=4096, max_send_buffer=2**20)
        sent = [f"{i:04d}" + "q" * 2048 for i in range(40)]
        results = [ws.send_prepared(encode_message(m)) for m in sent]
        assert SendResult.QUEUED in results and ws.buffered_amount > 0
        assert peer.messages(len(sent)) == sent
        assert wait_until(lambda: ws.buffered_amount == 0)
        # Drained, the connection writes straight to the kernel again, and a
        # second backlog queues and drains like the first.
        assert ws.send_prepared(encode_message("again")) is SendResult.SENT
        assert peer.messages(1) == ["again"]
        results = [ws.send_prepared(encode_message(m)) for m in sent]
        assert SendResult.QUEUED in results
        assert peer.messages(len(sent)) == sent
        assert wait_until(lambda: ws.buffered_amount == 0)
        ws.abort()
        lo.close()

    def test_slow_listener_drops_messages_in_drop_mode(self):
        lo = Loopback(sndbuf=4096)
        hub = Hub(MemoryBackend())
        slow, stuck = lo.connect(
            rcvbuf=4096, max_send_buffer=32768, slow_listener="drop"
        )
        hub.add("room", slow)
        for _ in range(100):
            hub.publish("room", "d" * 2048)
            assert slow.buffered_amount <= slow.max_send_buffer
        assert hub.stats.dropped > 0
        assert hub.stats.dropped == slow.dropped
        assert slow in hub.listeners("room") and not slow.closed
        hub.close()
        lo.close()
        stuck.close()


def test_waiters_behind_a_reader_wake_when_the_connection_ends(loopback):
    ws, peer = loopback.connect()
    reader = green.spawn(ws.wait)
    green.sleep(0.05)  # the reader is in recv
    second = green.spawn(ws.wait)
    closer = green.spawn(ws.close)
    green.sleep(0.05)
    assert not (reader.dead or second.dead or closer.dead)
    peer.close()
    with green.Timeout(DEADLINE):
        assert green.wait(reader) is None
        assert green.wait(second) is None
        green.wait(closer)
        assert ws.closed
        assert ws._wait_closed(1.0)  # made after the end: already sent
        assert ws.wait() is None


# -- changes during a send ----------------------------------------------------


class TestChangesDuringASend:
    def test_add_and_remove_while_a_message_is_being_delivered(self, hub, loopback):
        newcomer, newcomer_peer = loopback.connect()
        victim, victim_peer = loopback.connect()
        others = [loopback.connect() for _ in range(3)]

        class Meddling(WebSocket):
            def send_prepared(self, data):
                hub.remove("room", victim)
                hub.add("room", newcomer)
                green.sleep(0)  # let other green threads run mid-send
                return super().send_prepared(data)

        meddler, meddler_peer = loopback.connect(cls=Meddling)
        hub.add("room", meddler)
        hub.add("room", victim)
        for ws, _ in others:
            hub.add("room", ws)

        hub.publish("room", "during")
        Meddling.send_prepared = WebSocket.send_prepared
        hub.publish("room", "after")

        for _, peer in others:
            assert peer.messages(2) == ["during", "after"]
        assert meddler_peer.messages(2) == ["during", "after"]
        assert newcomer_peer.messages(1) == ["after"]
        assert newcomer_peer.nothing_pending()
        assert victim not in hub.listeners("room")
        received = []
        victim_peer.sock.settimeout(0.2)
        try:
            while True:
                received.append(victim_peer.sock.recv(65536))
                if not received[-1]:
                    break
        except socket.timeout:
            pass
        assert b"after" not in b"".join(received)

    def test_listeners_ending_while_a_send_walks_the_set(self, hub, loopback):
        pairs = [loopback.connect() for _ in range(20)]
        for ws, _ in pairs:
            hub.add("room", ws)

        def end_some():
            for ws, _ in pairs[::2]:
                ws.abort()
                green.sleep(0)

        ender = green.spawn(end_some)
        for i in range(20):
            hub.publish("room", f"message {i}")
            green.sleep(0)
        green.wait(ender)
        hub.publish("room", "last")
        assert hub.listener_count("room") == 10
        for _, peer in pairs[1::2]:
            assert peer.messages(21)[-1] == "last"


class TestSendGroup:
    """The walk a broadcast makes over the plain WebSockets of one wire
    format: one send() each, the rest handed to the connection's own path."""

    def group_of(self, *websockets):
        group = SendGroup(websockets[0].wire_format)
        for ws in websockets:
            group.add(ws)
        return group

    def test_every_member_takes_the_frame_and_counts_it(self, loopback):
        pairs = [loopback.connect() for _ in range(5)]
        group = self.group_of(*(ws for ws, _ in pairs))
        assert len(group) == 5
        assert group.send(encode_message("hello")) == (5, [])
        for ws, peer in pairs:
            assert peer.messages(1) == ["hello"]
            assert ws.messages_sent == 1 and ws.buffered_amount == 0

    def test_what_the_kernel_leaves_is_queued_and_follows_in_order(self):
        lo = Loopback(sndbuf=4096)
        ws, peer = lo.connect(rcvbuf=4096, max_send_buffer=2**22)
        group = self.group_of(ws)
        big = "b" * 300_000
        assert group.send(encode_message(big)) == (1, [])
        assert ws.buffered_amount > 0  # a partial write, the rest queued
        assert group.send(encode_message("after")) == (1, [])  # behind it
        assert peer.messages(2) == [big, "after"]
        assert ws.messages_sent == 2
        lo.close()

    def test_a_full_kernel_buffer_queues_the_whole_frame(self):
        lo = Loopback(sndbuf=4096)
        ws, peer = lo.connect(rcvbuf=4096)
        filled = 0
        for size in (4096, 1):  # fill the kernel's buffers to the last byte
            while True:
                try:
                    filled += ws._raw.send(b"\0" * size)
                except BlockingIOError:
                    break
        frame = encode_message("queued")
        assert self.group_of(ws).send(frame) == (1, [])
        assert ws.buffered_amount == len(frame)  # EAGAIN: nothing was taken
        peer.sock.settimeout(DEADLINE)
        while filled:
            filled -= len(peer.sock.recv(min(filled, 65536)))
        assert peer.messages(1) == ["queued"]
        lo.close()

    def test_a_reset_peer_is_dead_and_closed(self, loopback):
        (ws, peer), (other, other_peer) = loopback.connect(), loopback.connect()
        group = self.group_of(ws, other)
        peer.reset()  # no green thread runs: the send finds it
        sent, rest = group.send(encode_message("x"))
        assert (sent, rest) == (1, [(ws, SendResult.DEAD)])
        assert ws.closed and other_peer.messages(1) == ["x"]

    def test_a_closed_member_goes_through_send_prepared(self, loopback):
        ws, _ = loopback.connect()
        group = self.group_of(ws)
        ws.abort()
        assert group.send(encode_message("x")) == (0, [(ws, SendResult.DEAD)])
        assert ws.messages_sent == 0

    def test_a_slow_member_is_closed_or_dropped_as_by_send_prepared(self):
        lo = Loopback(sndbuf=4096)
        slow, _ = lo.connect(rcvbuf=4096, max_send_buffer=8192)
        dropping, _ = lo.connect(
            rcvbuf=4096, max_send_buffer=8192, slow_listener="drop"
        )
        group = self.group_of(slow, dropping)
        frame = encode_message("s" * 100_000)
        assert group.send(frame) == (2, [])  # queued
        sent, rest = group.send(frame)
        assert sent == 0
        assert sorted(rest, key=lambda pair: pair[0] is slow) == [
            (dropping, SendResult.DROPPED),
            (slow, SendResult.CLOSED_SLOW),
        ]
        assert slow.close_code == 1013 and dropping.dropped == 1
        lo.close()

    def test_a_subclass_with_properties_for_its_fields_is_counted(self, loopback):
        # The C walk reads _writable and messages_sent straight from their
        # slots; a class that makes them properties is read through them.
        class Counting(WebSocket):
            @property
            def messages_sent(self):
                return self.__dict__.get("counted", 0)

            @messages_sent.setter
            def messages_sent(self, value):
                self.__dict__["counted"] = value

        ws, peer = loopback.connect(cls=Counting)
        plain, plain_peer = loopback.connect()
        assert SendGroup.accepts(ws)
        assert self.group_of(ws, plain).send(encode_message("x")) == (2, [])
        assert ws.messages_sent == 1 and plain.messages_sent == 1
        assert peer.messages(1) == ["x"] and plain_peer.messages(1) == ["x"]

    def test_only_plain_websockets_join(self, loopback):
        class Subclass(WebSocket):
            pass

        assert SendGroup.accepts(loopback.connect()[0])
        assert SendGroup.accepts(loopback.connect(cls=Subclass)[0])
        assert not SendGroup.accepts(loopback.connect(cls=RecordingWebSocket)[0])
        assert not SendGroup.accepts(object())

    def test_a_channel_mixing_kinds_and_formats_reaches_all(self, hub, loopback):
        pairs = [loopback.connect() for _ in range(3)]
        pairs += [loopback.connect(cls=RecordingWebSocket) for _ in range(2)]
        hixie = [loopback.connect(draft="hixie-76") for _ in range(2)]
        for ws, _ in pairs + hixie:
            hub.add("room", ws)
        hub.remove("room", pairs[0][0])
        hub.publish("room", "all")
        hub.publish("room", b"binary")
        for _, peer in pairs[1:]:
            assert peer.messages(2) == ["all", b"binary"]
        assert pairs[0][1].nothing_pending()
        for _, peer in hixie:
            peer.sock.settimeout(DEADLINE)
            data = b""
            while len(data) < 13:
                data += peer.sock.recv(100)
            assert data == b"\x00all\xff\x80\x06binary"
        assert hub.stats.delivered == 2 * 6


# -- counters, lifecycle, lookup ------------------------------------------------


class TestHub:
    def test_stats_is_a_snapshot_of_the_counters(self, hub, loopback):
        ws, peer = loopback.connect()
        hub.add("room", ws)
        before = hub.stats
        hub.publish("room", "counted")
        after = hub.stats
        assert isinstance(before, HubStats)
        assert before.messages == 0 and after.messages == 1
        assert after.received == 1 and after.delivered == 1
        assert after.as_dict() == {
            "listeners": 1,
            "channels": 1,
            "messages": 1,
            "received": 1,
            "delivered": 1,
            "pruned_dead": 0,
            "closed_slow": 0,
            "dropped": 0,
            "skipped": 0,
            "gaps": 0,
        }

    def test_starts_by_itself_once(self, loopback):
        backend = RecordingBackend()
        hub = Hub(backend)
        hub.publish("room", "x")
        ws, _ = loopback.connect()
        hub.add("room", ws)
        hub.start()
        assert backend.starts == 1
        hub.close()

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    def test_a_forked_child_starts_afresh(self, loopback):
        backend = RecordingBackend()
        hub = Hub(backend)
        ws, _ = loopback.connect()
        hub.add("room", ws)
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                hub.publish("other", "from the child")
                if backend.starts == 2 and hub.channels() == set():
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert backend.starts == 1 and hub.channels() == {"room"}
        hub.close()

    def test_get_hub_reads_the_registry(self):
        registry = Registry("test")
        mine = Hub(MemoryBackend())
        registry.stargate_hub = mine
        assert get_hub(registry) is mine
        assert get_hub(Registry("bare")) is default_hub()
        mine.close()

    def test_get_hub_defaults_to_the_current_registry(self):
        config = Configurator(settings={})
        config.include("stargate.config")
        config.begin()
        try:
            assert get_hub() is config.registry.stargate_hub
        finally:
            config.end()
        assert get_hub() is default_hub()
        assert default_hub().backend.synchronous

    def test_the_hub_is_found_by_config_not_by_the_hub_module(self):
        import stargate.config

        assert stargate.hub.get_hub is stargate.config.get_hub
        assert "get_current_registry" not in vars(stargate.hub)


class TestCapabilities:
    """Presence and history are declared interfaces, checked with
    isinstance: a method a backend happens to have is not a promise."""

    def test_the_built_in_backends_declare_theirs(self):
        from stargate.backends.redis_streams import RedisStreamsBackend

        assert keeps_history(MemoryBackend())
        assert not counts_presence(MemoryBackend())
        assert issubclass(RedisBackend, Presence)
        assert not issubclass(RedisBackend, History)
        assert issubclass(RedisStreamsBackend, History)
        assert not issubclass(RedisStreamsBackend, Presence)

    def test_a_backend_without_presence_is_neither_told_nor_asked(self, loopback):
        backend = MemoryBackend()
        told = []
        # Methods found on the instance, not declared by its class.
        backend.set_local_count = lambda channel, count: told.append(count)
        backend.listener_count = lambda channel, local: 1000
        hub = Hub(backend)
        ws, _ = loopback.connect()
        hub.add("room", ws)
        assert hub.listener_count("room") == 1
        hub.remove("room", ws)
        assert told == []
        hub.close()

    def test_a_backend_that_declares_presence_is_told_and_asked(self, loopback):
        class Counting(Presence, MemoryBackend):
            def __init__(self):
                super().__init__()
                self.told = []

            def set_local_count(self, channel, count):
                self.told.append((channel, count))

            def listener_count(self, channel, local_count):
                return local_count + 10

        backend = Counting()
        hub = Hub(backend)
        ws, _ = loopback.connect()
        hub.add("room", ws)
        assert hub.listener_count("room") == 11
        hub.remove("room", ws)
        assert backend.told == [("room", 1), ("room", 0)]
        hub.close()

    def test_backends_written_before_the_interfaces_keep_working(self):
        class OldPresence(CustomBackend):
            def listener_count(self, channel, local_count):
                return local_count + 1

        class OldHistory(CustomBackend):
            supports_history = True

            def history(self, channel, since):
                return []

        assert counts_presence(OldPresence()) and not keeps_history(OldPresence())
        assert keeps_history(OldHistory()) and not counts_presence(OldHistory())
        assert not counts_presence(CustomBackend())
        assert not keeps_history(CustomBackend())

    def test_history_can_be_turned_off_by_a_subclass(self):
        class NoHistory(MemoryBackend):
            supports_history = False

        assert isinstance(NoHistory(), History)
        assert not keeps_history(NoHistory())


# -- the hub on a real Redis ----------------------------------------------------


class SignallingRedisBackend(RedisBackend):
    """The Redis backend, telling the test when a subscribe has begun."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.subscribing = green.Event()

    def subscribe(self, channel):
        if not self.subscribing.ready():
            self.subscribing.send(channel)
        super().subscribe(channel)


def redis_numsub(server, name):
    with server.client() as client:
        return dict(client.pubsub_numsub(name))[name.encode()]


class TestInterruptedFirstSubscribe:
    """Defect 5: the first ``add`` of a channel interrupted while the backend
    subscribes (its own Timeout, a killed handler) rolls back: the listeners
    waiting behind it subscribe for themselves, and Redis keeps no
    subscription that nothing will remove."""

    @pytest.fixture
    def paused_redis(self, fresh_redis_server):
        """The server, and ``pause()`` / ``resume()`` by SIGSTOP/SIGCONT of
        the process this test run started (resumed at the end in any case)."""
        server = fresh_redis_server
        paused = []

        def pause():
            os.kill(server.pid, signal.SIGSTOP)
            paused.append(True)

        def resume():
            if paused:
                os.kill(server.pid, signal.SIGCONT)
                paused.clear()

        yield server, pause, resume
        resume()

    def make_hub(self, server):
        backend = SignallingRedisBackend(
            server.url,
            prefix="interrupted:",
            socket_timeout=3.0,
            reconnect_backoff=(0.05, 0.3),
        )
        hub = Hub(backend)
        hub.start()
        return hub, backend

    @staticmethod
    def interrupted_add(hub, channel, ws, how):
        if how == "timeout":
            with pytest.raises(green.Timeout):
                with green.Timeout(0.2):
                    hub.add(channel, ws)
            return "interrupted"
        return hub.add(channel, ws)  # killed by the test

    @pytest.mark.parametrize("how", ["timeout", "kill"])
    def test_waiters_retry_and_get_no_foreign_exception(
        self, paused_redis, loopback, how
    ):
        server, pause, resume = paused_redis
        hub, backend = self.make_hub(server)
        first_ws, first_peer = loopback.connect()
        waiting = [loopback.connect() for _ in range(2)]
        pause()
        first = green.spawn(self.interrupted_add, hub, "room", first_ws, how)
        assert backend.subscribing.wait(DEADLINE) == "room"
        outcomes = []

        def wait_behind(ws):
            try:
                hub.add("room", ws)
                outcomes.append("added")
            except BaseException as exc:  # any exception is the defect
                outcomes.append(exc)

        waiters = [green.spawn(wait_behind, ws) for ws, _ in waiting]
        green.sleep(0)  # both now wait behind the first subscribe
        if how == "kill":
            green.kill(first)
        else:
            assert green.wait(first) == "interrupted"
        resume()
        for waiter in waiters:
            green.wait(waiter)
        assert outcomes == ["added", "added"]
        assert hub.listeners("room") == {ws for ws, _ in waiting}
        hub.publish("room", "after")
        for _, peer in waiting:
            assert peer.messages(1) == ["after"]
        assert first_peer.nothing_pending()
        hub.close()

    @pytest.mark.parametrize("how", ["timeout", "kill"])
    def test_no_orphan_subscription_is_left_in_redis(self, paused_redis, loopback, how):
        server, pause, resume = paused_redis
        hub, backend = self.make_hub(server)
        ws, _ = loopback.connect()
        pause()
        first = green.spawn(self.interrupted_add, hub, "room", ws, how)
        assert backend.subscribing.wait(DEADLINE) == "room"
        if how == "kill":
            green.kill(first)
        else:
            assert green.wait(first) == "interrupted"
        resume()
        assert hub.channels() == set()
        # A subscription confirmed on the same connection: Redis has handled
        # everything sent for "room" before it.
        other, peer = loopback.connect()
        hub.add("other", other)
        hub.publish("other", "probe")
        assert peer.messages(1) == ["probe"]
        assert redis_numsub(server, "interrupted:room") == 0
        assert redis_numsub(server, "interrupted:other") == 1
        hub.close()


class TestInterruptedStart:
    """Like an interrupted first subscribe: a backend start interrupted by
    its caller's own Timeout is retried by those waiting behind it."""

    def test_waiters_behind_an_interrupted_start_start_it_themselves(
        self, fresh_redis_server, loopback
    ):
        server = fresh_redis_server
        hub = Hub(
            RedisBackend(
                server.url,
                prefix="start:",
                socket_timeout=30.0,  # a start inline would wait for SIGCONT
                reconnect_backoff=(0.05, 0.3),
            )
        )
        first_ws, _ = loopback.connect()
        ws, peer = loopback.connect()
        os.kill(server.pid, signal.SIGSTOP)
        try:
            first = green.spawn(
                TestInterruptedFirstSubscribe.interrupted_add,
                hub,
                "room",
                first_ws,
                "timeout",
            )
            assert wait_until(lambda: hub._starting is not None)
            outcome = []

            def wait_behind():
                try:
                    hub.add("room", ws)
                    outcome.append("added")
                except BaseException as exc:  # any exception is the defect
                    outcome.append(exc)

            waiter = green.spawn(wait_behind)
            green.sleep(0)
            assert green.wait(first) == "interrupted"
        finally:
            os.kill(server.pid, signal.SIGCONT)
        green.wait(waiter)
        assert outcome == ["added"]
        hub.publish("room", "started")
        assert peer.messages(1) == ["started"]
        hub.close()


class TestGapsReachTheApplication:
    """Item 5: a backend's gap report is counted by the hub and calls the
    resource's ``on_gap`` for that channel, with real Redis."""

    def test_a_lost_redis_connection_calls_the_resources_on_gap(
        self, fresh_redis_server, loopback
    ):
        told = []

        class Room(WebSocketAwareResource):
            channel = "/rooms/gap"

            def on_gap(self, channel, reason):
                told.append((channel, reason))
                for ws in self.listeners:
                    ws.send("reload")

        backend = RedisBackend(
            fresh_redis_server.url,
            prefix="gap-hook:",
            reconnect_backoff=(0.05, 0.3),
            socket_timeout=2.0,
        )
        hub = Hub(backend)
        room = Room()
        room.hub = hub
        ws, peer = loopback.connect()
        room.add_listener(ws)
        room.send("before")
        assert peer.messages(1) == ["before"]
        with fresh_redis_server.client() as client:
            assert client.client_kill_filter(_type="pubsub") == 1
        assert peer.messages(1) == ["reload"]
        assert told == [("/rooms/gap", "reconnected")]
        assert hub.stats.gaps == 1
        hub.close()


# -- end to end: a Pyramid app in stargate's server, websockets clients -------

#: The clients: websockets' sync client, in a process of their own (real
#: threads, no monkey-patching). Prints "ready" once connected, then one JSON
#: line: for each client, how many messages arrived in order.
CLIENTS = textwrap.dedent(
    """
    import contextlib, json, socket, sys, threading, time
    from websockets.sync.client import connect

    url, name, count, expected, rcvbuf = sys.argv[1:6]
    count, expected, rcvbuf = int(count), int(expected), int(rcvbuf)
    connections = []
    stack = contextlib.ExitStack()
    for i in range(count):
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect((url.split(":")[0], int(url.split(":")[1].split("/")[0])))
        connections.append(stack.enter_context(connect(
            f"ws://{url}?name={name}{i}", sock=sock, compression=None,
            max_size=None, open_timeout=10,
        )))
    print("ready", flush=True)
    results = [0] * count

    def read(i, ws):
        deadline = time.monotonic() + 30
        try:
            while results[i] < expected:
                message = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
                if not message.startswith(f"{results[i]:06d}"):
                    return
                results[i] += 1
        except Exception:
            pass

    threads = [threading.Thread(target=read, args=(i, ws))
               for i, ws in enumerate(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(results), flush=True)
    """
)


class Server:
    """A Pyramid app with a stargate WebSocketView, served by LiveServer.

    ``sndbuf`` sets each WebSocket's kernel send buffer (the handler sets it
    on the connection's socket, as soon as the upgrade is done)."""

    def __init__(self, settings, sndbuf=None):
        from stargate.view import WebSocketView

        self.sockets = {}
        sockets = self.sockets

        class Listen(WebSocketView):
            def handler(self, websocket):
                if sndbuf is not None:
                    websocket.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf
                    )
                sockets[self.request.params.get("name", "")] = websocket
                self.request.hub.add(self.request.matchdict["room"], websocket)
                while websocket.wait() is not None:
                    pass

        config = Configurator(settings=settings)
        config.include("stargate.config")
        config.add_route("listen", "/ws/{room}")
        config.add_view(Listen, route_name="listen")
        self.hub = config.registry.stargate_hub
        config.add_request_method(lambda request: self.hub, "hub", reify=True)
        self._serve(config.make_wsgi_app())

    @classmethod
    def for_app(cls, app, hub):
        """Serve another application, whose hub is ``hub``."""
        server = cls.__new__(cls)
        server.sockets = {}
        server.hub = hub
        server._serve(app)
        return server

    def _serve(self, app):
        self.live = LiveServer(app).start()
        self.port = self.live.port

    def raw_client(self, path):
        """An RFC 6455 handshake by hand; returns a :class:`Peer`."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, "the server closed during the handshake"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return Peer(sock, rest)

    def clients(self, room, name, count, expected, rcvbuf=0):
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                CLIENTS,
                f"127.0.0.1:{self.port}/ws/{room}",
                name,
                str(count),
                str(expected),
                str(rcvbuf),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )

    def close(self):
        self.live.stop()
        self.hub.close()


def read_line(process, timeout=DEADLINE * 3):
    with green.Timeout(timeout):
        return process.stdout.readline().strip()


@pytest.fixture
def server():
    made = []

    def make(sndbuf=None, **settings):
        settings.setdefault("stargate.ping_interval", "off")
        s = Server(settings, sndbuf)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


class TestEndToEnd:
    def test_a_client_that_goes_away_leaves_the_channel(self, server):
        srv = server()
        resetting = srv.raw_client("/ws/room?name=resetting")
        closing = srv.raw_client("/ws/room?name=closing")
        staying = srv.raw_client("/ws/room?name=staying")
        assert wait_until(lambda: srv.hub.listener_count("room") == 3)
        resetting.reset()
        closing.close()
        # The handler's read sees the connection end; the close callback
        # removes it, before any message is sent.
        assert wait_until(lambda: srv.hub.listener_count("room") == 1)
        srv.hub.publish("room", "to the one left")
        assert staying.messages(1) == ["to the one left"]
        assert set(srv.hub.listeners("room")) == {srv.sockets["staying"]}

    def test_a_stopped_client_is_closed_while_100_others_get_everything(self, server):
        max_send_buffer = 65536
        srv = server(
            sndbuf=8192,
            **{"stargate.max_send_buffer": str(max_send_buffer)},
        )
        count, messages, size = 100, 100, 4096
        fast = srv.clients("room", "fast", count, messages)
        slow = srv.clients("room", "slow", 1, messages, rcvbuf=4096)
        try:
            assert read_line(fast) == "ready"
            assert read_line(slow) == "ready"
            assert wait_until(lambda: srv.hub.listener_count("room") == count + 1)
            os.kill(slow.pid, signal.SIGSTOP)
            stopped = srv.sockets["slow0"]
            fast_sockets = [srv.sockets[f"fast{i}"] for i in range(count)]
            largest = 0
            for i in range(messages):
                srv.hub.publish("room", f"{i:06d}" + "x" * (size - 6))
                largest = max(largest, stopped.buffered_amount)
                # Pace the publisher to the fast readers, not the stopped one.
                assert wait_until(
                    lambda: all(ws.buffered_amount < 32768 for ws in fast_sockets)
                )
            assert largest <= max_send_buffer
            # Closed by the hub's send for being slow (its handler's read then
            # sees the socket end; close_code reports that end, 1006).
            assert stopped.closed
            assert stopped not in srv.hub.listeners("room")
            assert srv.hub.stats.closed_slow == 1
            assert srv.hub.listener_count("room") == count
            results = json.loads(read_line(fast))
            assert results == [messages] * count
        finally:
            os.kill(slow.pid, signal.SIGCONT)
            for process in (fast, slow):
                process.kill()
                process.wait()
