"""stargate.protocol: the server's connection state machine, as a specification."""

import os
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stargate.deflate import DeflateParams
from stargate.exceptions import (
    ConnectionClosed,
    InvalidPayload,
    PayloadTooBig,
    ProtocolError,
)
from stargate.frames import (
    HIXIE_CLOSE,
    Frame,
    FrameParser,
    Opcode,
    WireFormat,
    encode_hixie_binary,
    encode_hixie_text,
    serialize_frame,
)
from stargate.protocol import (
    FRAGMENT_OVERHEAD,
    BinaryMessage,
    CloseReceived,
    CloseStatus,
    Ping,
    Pong,
    ServerProtocol,
    State,
    TextMessage,
)

MASK = b"\x01\x02\x03\x04"
DEFLATE = WireFormat(deflate=DeflateParams())


def frame(opcode, payload=b"", fin=True, rsv1=False):
    if isinstance(payload, str):
        payload = payload.encode()
    return serialize_frame(Frame(opcode, payload, fin, rsv1), mask=MASK)


def close_frame(code=None, reason=b""):
    body = b"" if code is None else struct.pack("!H", code) + reason
    return frame(Opcode.CLOSE, body)


def sent_frames(protocol):
    parser = FrameParser(require_mask=False, allow_rsv1=True)
    parser.feed(protocol.data_to_send())
    frames = []
    while (f := parser.next_frame()) is not None:
        frames.append(f)
    assert parser.buffered == 0
    return frames


def sent_close(code, reason=b""):
    return Frame(Opcode.CLOSE, struct.pack("!H", code) + reason)


def compress(data, wbits=15):
    c = zlib.compressobj(6, zlib.DEFLATED, -wbits)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def assert_failed(protocol, code, exc_type=ProtocolError):
    assert isinstance(protocol.error, exc_type)
    assert protocol.error.close_code == code
    assert protocol.should_close_transport
    assert protocol.state is State.CLOSED
    frames = sent_frames(protocol)
    assert frames[-1].opcode is Opcode.CLOSE
    assert frames[-1].payload[:2] == struct.pack("!H", code)


# ------------------------------------------------------------------ messages


def test_a_text_message():
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.TEXT, "héllo"))
    assert p.events_received() == [TextMessage("héllo")]
    assert p.events_received() == []
    assert p.state is State.OPEN
    assert p.close_code is None and p.close_reason is None
    assert p.close_sent is None and p.close_received is None
    assert not p.should_close_transport and not p.close_expected


def test_a_binary_message():
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.BINARY, b"\x00\xff"))
    assert p.events_received() == [BinaryMessage(b"\x00\xff")]


def test_empty_messages():
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.TEXT) + frame(Opcode.BINARY))
    assert p.events_received() == [TextMessage(""), BinaryMessage(b"")]


def test_bytes_may_arrive_in_any_pieces():
    data = frame(Opcode.TEXT, "x" * 300) + frame(Opcode.BINARY, b"y" * 70000)
    p = ServerProtocol(WireFormat())
    for i in range(0, len(data), 7):
        p.receive_data(data[i : i + 7])
    assert p.events_received() == [TextMessage("x" * 300), BinaryMessage(b"y" * 70000)]


@pytest.mark.parametrize(
    "opcode, event", [(Opcode.TEXT, TextMessage), (Opcode.BINARY, BinaryMessage)]
)
def test_fragmented_messages_are_reassembled(opcode, event):
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(opcode, "Hel", fin=False))
    p.receive_data(frame(Opcode.CONT, "l", fin=False))
    assert p.events_received() == []
    p.receive_data(frame(Opcode.CONT, "o"))
    expected = "Hello" if opcode == Opcode.TEXT else b"Hello"
    assert p.events_received() == [event(expected)]


def test_control_frames_may_interleave_with_fragments():
    p = ServerProtocol(WireFormat())
    p.receive_data(
        frame(Opcode.TEXT, "Hel", fin=False)
        + frame(Opcode.PING, b"p")
        + frame(Opcode.PONG, b"q")
        + frame(Opcode.CONT, "lo")
    )
    assert p.events_received() == [Ping(b"p"), Pong(b"q"), TextMessage("Hello")]
    assert sent_frames(p) == [Frame(Opcode.PONG, b"p")]


def test_a_multibyte_character_split_across_fragments():
    data = "€".encode()
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.TEXT, data[:1], fin=False))
    p.receive_data(frame(Opcode.CONT, data[1:2], fin=False))
    p.receive_data(frame(Opcode.CONT, data[2:]))
    assert p.events_received() == [TextMessage("€")]


def test_continuation_without_a_message_is_a_protocol_error():
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.CONT, "x"))
    assert_failed(p, 1002)


@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_a_new_message_inside_a_fragmented_one_is_a_protocol_error(opcode):
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.TEXT, "x", fin=False) + frame(opcode, "y"))
    assert_failed(p, 1002)
    assert p.events_received() == []


# ------------------------------------------------------------------ utf-8


@pytest.mark.parametrize(
    "data",
    [
        b"\xff",
        b"\xc0\xaf",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"caf\xe9",
        b"\xe2\x82",
    ],
)
def test_invalid_utf8_text_fails_with_1007(data):
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.TEXT, data))
    assert_failed(p, 1007, InvalidPayload)


def test_text_ending_in_a_truncated_character_fails_with_1007():
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.TEXT, b"ok\xe2\x82", fin=False))
    assert p.error is None  # may still be completed
    p.receive_data(frame(Opcode.CONT, b""))
    assert_failed(p, 1007, InvalidPayload)


@pytest.mark.parametrize(
    "bad", [b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xff"]
)
def test_invalid_utf8_fails_fast_before_the_last_fragment(bad):
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.TEXT, b"\xce\xba\xe1\xbd\xb9" + bad, fin=False))
    assert_failed(p, 1007, InvalidPayload)
    p.receive_data(frame(Opcode.CONT, b"never seen"))
    assert p.events_received() == []


# ------------------------------------------------------------------ size limit


@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.CONT])
def test_invalid_utf8_fails_fast_inside_a_frame_still_arriving(opcode):
    # RFC 6455 8.1: fail as soon as the bytes are known to be invalid, not
    # when the whole frame has arrived.
    p = ServerProtocol(WireFormat())
    head = b"ok "
    if opcode is Opcode.CONT:
        # The first frame ends inside a euro sign; the decoder state carries.
        p.receive_data(frame(Opcode.TEXT, b"caf\xc3\xa9 \xe2", fin=False))
        head = b"\x82\xac "
    data = frame(opcode, head + b"ok " * 99 + b"\xc0\xaf" + b"rest" * 100)
    p.receive_data(data[: 8 + 300])
    assert p.error is None
    p.receive_data(data[8 + 300 : 8 + 302])
    assert_failed(p, 1007, InvalidPayload)


@pytest.mark.parametrize("fragments", [1, 2, 3])
def test_a_valid_text_frame_arriving_byte_by_byte_is_delivered(fragments):
    text = "h\u00e9llo w\u00f6rld \u20ac \U0001f600 " * 20
    cuts = [0, 7, 200, len(text)][:fragments] + [len(text)]
    data = b""
    for i, (start, end) in enumerate(zip(cuts, cuts[1:])):
        opcode = Opcode.TEXT if i == 0 else Opcode.CONT
        data += frame(opcode, text[start:end], fin=end == len(text))
    p = ServerProtocol(WireFormat())
    for i in range(len(data)):
        p.receive_data(data[i : i + 1])
    assert p.error is None
    assert p.events_received() == [TextMessage(text)]


def test_partial_frames_of_binary_or_compressed_messages_are_not_decoded():
    p = ServerProtocol(DEFLATE)
    compressed = frame(Opcode.TEXT, compress(b"x" * 1000), rsv1=True)
    binary = frame(Opcode.BINARY, b"\xff" * 500)
    for data in (compressed, binary):
        p.receive_data(data[:-1])
        assert p.error is None
        p.receive_data(data[-1:])
    assert p.events_received() == [
        TextMessage("x" * 1000),
        BinaryMessage(b"\xff" * 500),
    ]


def test_default_limit_is_one_mebibyte():
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.BINARY, b"x" * 2**20))
    assert p.events_received() == [BinaryMessage(b"x" * 2**20)]
    p.receive_data(frame(Opcode.BINARY, b"x" * (2**20 + 1)))
    assert_failed(p, 1009, PayloadTooBig)


def test_limit_is_enforced_on_the_header_before_buffering():
    p = ServerProtocol(WireFormat(), max_message_size=1000)
    header = frame(Opcode.BINARY, b"x" * 2000)[:8]
    p.receive_data(header)
    assert_failed(p, 1009, PayloadTooBig)


def test_limit_applies_to_the_whole_fragmented_message():
    p = ServerProtocol(WireFormat(), max_message_size=10)
    p.receive_data(frame(Opcode.TEXT, "x" * 6, fin=False))
    assert p.error is None
    p.receive_data(frame(Opcode.CONT, "x" * 5)[:8])  # header of the overflow
    assert_failed(p, 1009, PayloadTooBig)


def test_no_limit():
    p = ServerProtocol(WireFormat(), max_message_size=None)
    p.receive_data(frame(Opcode.BINARY, b"x" * (2**20 + 10)))
    assert p.events_received() == [BinaryMessage(b"x" * (2**20 + 10))]


def test_an_endless_run_of_empty_continuations_fails_with_1009():
    # Each continuation costs FRAGMENT_OVERHEAD bytes of the message budget,
    # so empty fragments cannot be sent forever.
    limit = 4096
    p = ServerProtocol(WireFormat(), max_message_size=limit)
    p.receive_data(frame(Opcode.TEXT, "a", fin=False))
    empty = frame(Opcode.CONT, b"", fin=False)
    for _ in range(limit // FRAGMENT_OVERHEAD + 1):
        p.receive_data(empty)
        if p.error is not None:
            break
    assert_failed(p, 1009, PayloadTooBig)
    assert "continuation" in str(p.error)


def test_the_fragment_overhead_is_charged_on_compressed_messages_too():
    p = ServerProtocol(DEFLATE, max_message_size=4096)
    p.receive_data(frame(Opcode.TEXT, compress(b"a"), fin=False, rsv1=True))
    p.receive_data(frame(Opcode.CONT, b"", fin=False) * (4096 // FRAGMENT_OVERHEAD))
    assert_failed(p, 1009, PayloadTooBig)


def test_a_fragmented_message_within_the_budget_is_delivered():
    n = 1000
    p = ServerProtocol(WireFormat(), max_message_size=n * (FRAGMENT_OVERHEAD + 1))
    p.receive_data(frame(Opcode.BINARY, b"b", fin=False))
    p.receive_data(frame(Opcode.CONT, b"b", fin=False) * (n - 2))
    p.receive_data(frame(Opcode.CONT, b"b"))
    assert p.events_received() == [BinaryMessage(b"b" * n)]


@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_two_byte_fragments_are_held_as_one_buffer(opcode):
    # 15,000 two-byte fragments: stargate used to keep one object per
    # fragment (about 60 bytes each, 0.9 MB); now one bytearray of 30 KB.
    n = 15_000
    p = ServerProtocol(WireFormat(), max_message_size=n * (FRAGMENT_OVERHEAD + 2))
    cont = frame(Opcode.CONT, b"xy", fin=False) * 1000
    tracemalloc.start()
    try:
        p.receive_data(frame(opcode, b"xy", fin=False))
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(n // 1000 - 1):
            p.receive_data(cont)
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert p.error is None
    assert held < 200_000, held


def test_a_compressed_continuation_may_not_outgrow_the_room_left():
    # 4,000 bytes decompressed from a few wire bytes, then a continuation
    # announcing 5,000 wire bytes: the message could only use 96 more bytes,
    # so the frame is refused at its header instead of being buffered.
    limit = 4096
    p = ServerProtocol(DEFLATE, max_message_size=limit)
    p.receive_data(frame(Opcode.BINARY, compress(b"a" * 4000), fin=False, rsv1=True))
    assert p.error is None and p.held_bytes >= 4000
    p.receive_data(frame(Opcode.CONT, os.urandom(5000))[:3000])
    assert_failed(p, 1009, PayloadTooBig)
    assert p.held_bytes == 0


def test_held_bytes_is_zero_once_closed():
    p = ServerProtocol(WireFormat(), max_message_size=4096)
    p.receive_data(frame(Opcode.TEXT, "x" * 3000, fin=False) + close_frame(1000))
    assert p.state is State.CLOSED and p.held_bytes == 0


@pytest.mark.parametrize(
    "wire_format", [WireFormat(), DEFLATE], ids=["plain", "deflate"]
)
def test_delivering_a_large_message_holds_it_about_twice(wire_format):
    # Received bytes, unmasked payload and the message were all alive at
    # once (3 MiB for 1 MiB; 4.2 MiB compressed); the receive buffer now
    # goes first, and inflating does not copy its output.
    size = 2**20
    payload = os.urandom(size // 2).hex().encode()  # text that compresses little
    rsv1 = wire_format.deflate is not None
    data = frame(Opcode.TEXT, compress(payload) if rsv1 else payload, rsv1=rsv1)
    head, rest = data[:100], data[100:]
    p = ServerProtocol(wire_format, max_message_size=size)
    tracemalloc.start()
    try:
        p.receive_data(head)
        p.receive_data(rest)
        [event] = p.events_received()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(event.data) == size
    wire = len(data) if rsv1 else 0  # the compressed bytes live on too
    assert peak < 2.5 * size + wire, peak


def test_a_flood_of_pings_queues_one_pong():
    # RFC 6455 5.5.3: only the most recent ping needs an answer.
    p = ServerProtocol(WireFormat())
    p.receive_data(b"".join(frame(Opcode.PING, b"%d" % i) for i in range(1000)))
    assert len(p.events_received()) == 1000
    assert sent_frames(p) == [Frame(Opcode.PONG, b"999")]


# ------------------------------------------------------------------ control frames


def test_ping_is_answered_with_a_pong_carrying_its_payload():
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.PING, b"hello"))
    assert p.events_received() == [Ping(b"hello")]
    assert sent_frames(p) == [Frame(Opcode.PONG, b"hello")]


def test_a_ping_of_125_bytes_is_answered():
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.PING, b"x" * 125))
    assert sent_frames(p) == [Frame(Opcode.PONG, b"x" * 125)]


def test_a_pong_is_an_event_and_needs_no_answer():
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.PONG, b"x"))
    assert p.events_received() == [Pong(b"x")]
    assert p.data_to_send() == b""


@pytest.mark.parametrize(
    "data",
    [
        frame(Opcode.PING, b"x" * 126),
        frame(Opcode.PING, fin=False),
        bytes((0x83, 0x80)) + MASK,  # opcode 3
        bytes((0x8B, 0x80)) + MASK,  # opcode 11
        bytes((0xA1, 0x80)) + MASK,  # RSV2
        frame(Opcode.TEXT, "x", rsv1=True),  # RSV1 without deflate
        b"\x81\x05Hello",  # unmasked
    ],
    ids=[
        "ping>125",
        "fragmented-ping",
        "opcode3",
        "opcode11",
        "rsv2",
        "rsv1",
        "unmasked",
    ],
)
def test_framing_violations_fail_with_1002(data):
    p = ServerProtocol(WireFormat())
    p.receive_data(data)
    assert_failed(p, 1002)


# ------------------------------------------------------------------ closing


def test_peer_initiated_close_is_echoed():
    p = ServerProtocol(WireFormat())
    p.receive_data(close_frame(1001, b"going away"))
    assert p.events_received() == [CloseReceived(1001, "going away")]
    assert sent_frames(p) == [sent_close(1001, b"going away")]
    assert p.close_received == CloseStatus(1001, "going away")
    assert p.close_sent == CloseStatus(1001, "going away")
    assert (p.close_code, p.close_reason) == (1001, "going away")
    assert p.state is State.CLOSED and p.should_close_transport
    assert p.error is None


def test_close_without_a_code_is_answered_with_an_empty_close():
    p = ServerProtocol(WireFormat())
    p.receive_data(close_frame())
    assert p.events_received() == [CloseReceived(1005, "")]
    assert sent_frames(p) == [Frame(Opcode.CLOSE, b"")]
    assert p.close_code == 1005


@pytest.mark.parametrize("code", [1000, 1003, 1007, 1011, 1012, 1014, 3000, 4999])
def test_valid_close_codes_are_echoed(code):
    p = ServerProtocol(WireFormat())
    p.receive_data(close_frame(code))
    assert sent_frames(p) == [sent_close(code)]


@pytest.mark.parametrize(
    "code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535]
)
def test_invalid_close_codes_fail_with_1002(code):
    p = ServerProtocol(WireFormat())
    p.receive_data(close_frame(code))
    assert_failed(p, 1002)
    assert p.close_received is None


def test_close_body_of_one_byte_fails_with_1002():
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.CLOSE, b"\x03"))
    assert_failed(p, 1002)


def test_close_reason_that_is_not_utf8_fails_with_1007():
    p = ServerProtocol(WireFormat())
    p.receive_data(close_frame(1000, b"\xff"))
    assert_failed(p, 1007, InvalidPayload)


def test_server_initiated_close():
    p = ServerProtocol(WireFormat())
    p.send_close(1000, "bye")
    assert sent_frames(p) == [sent_close(1000, b"bye")]
    assert p.state is State.CLOSING
    assert p.close_expected and not p.should_close_transport
    assert p.close_code is None and p.close_reason is None
    p.receive_data(close_frame(1000))
    assert p.events_received() == [CloseReceived(1000, "")]
    assert p.data_to_send() == b""  # no second close frame
    assert p.state is State.CLOSED and p.should_close_transport
    assert not p.close_expected


def test_send_close_twice_sends_one_frame():
    p = ServerProtocol(WireFormat())
    p.send_close()
    p.send_close(1001)
    assert sent_frames(p) == [sent_close(1000)]


@pytest.mark.parametrize("code", [1005, 1006, 1015, 999, 5000])
def test_send_close_refuses_unsendable_codes(code):
    p = ServerProtocol(WireFormat())
    with pytest.raises(ValueError):
        p.send_close(code)
    assert p.state is State.OPEN and p.data_to_send() == b""


def test_data_after_our_close_is_ignored_but_close_still_completes():
    p = ServerProtocol(WireFormat())
    p.send_close()
    p.data_to_send()
    p.receive_data(
        frame(Opcode.TEXT, "late")
        + frame(Opcode.BINARY, b"x", fin=False)
        + frame(Opcode.PING, b"p")
        + close_frame(1000)
    )
    events = p.events_received()
    assert not any(isinstance(e, (TextMessage, BinaryMessage)) for e in events)
    assert events[-1] == CloseReceived(1000, "")
    assert p.data_to_send() == b""  # no pong after our close


def test_everything_after_the_peers_close_is_ignored():
    p = ServerProtocol(WireFormat())
    p.receive_data(close_frame(1000) + frame(Opcode.TEXT, "late") + b"garbage")
    assert p.events_received() == [CloseReceived(1000, "")]
    assert p.error is None
    p.receive_data(frame(Opcode.TEXT, "later"))
    assert p.events_received() == []


def test_sending_after_close_raises_connection_closed():
    p = ServerProtocol(WireFormat())
    p.receive_data(close_frame(1001, b"bye"))
    with pytest.raises(ConnectionClosed) as info:
        p.send_message("x")
    assert (info.value.code, info.value.reason) == (1001, "bye")
    with pytest.raises(ConnectionClosed):
        p.send_ping()


def test_eof_without_close_is_1006():
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.TEXT, "partial", fin=False))
    p.receive_eof()
    assert p.state is State.CLOSED and p.should_close_transport
    assert p.close_code == 1006 and p.close_reason == ""
    assert p.events_received() == [] and p.data_to_send() == b""
    p.receive_eof()  # idempotent
    with pytest.raises(ConnectionClosed) as info:
        p.send_message("x")
    assert info.value.code == 1006


def test_fail_sends_a_close_and_closes_the_transport():
    p = ServerProtocol(WireFormat())
    p.fail(1011, "ping timeout")
    assert sent_frames(p) == [sent_close(1011, b"ping timeout")]
    assert p.should_close_transport and p.state is State.CLOSED
    assert p.error is None
    p.receive_data(frame(Opcode.TEXT, "x"))
    assert p.events_received() == []


@pytest.mark.parametrize("reason", ["", "why", None])
def test_fail_without_a_code_sends_an_empty_close(reason):
    # fail(None, reason) used to raise and leave the protocol CLOSING with
    # nothing queued.
    p = ServerProtocol(WireFormat())
    p.fail(None, reason)
    assert p.state is State.CLOSED
    assert sent_frames(p) == [Frame(Opcode.CLOSE, b"")]


def test_fail_while_closing_does_not_send_a_second_close():
    p = ServerProtocol(WireFormat())
    p.send_close()
    p.data_to_send()
    p.fail(1011)
    assert p.data_to_send() == b"" and p.should_close_transport


def test_events_before_an_error_are_kept():
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.TEXT, "ok") + frame(Opcode.CONT, "bad"))
    assert p.events_received() == [TextMessage("ok")]
    assert_failed(p, 1002)


# ------------------------------------------------------------------ sending


def test_messages_before_a_bad_frame_can_be_handled_before_the_failure():
    # RFC 6455 test suites expect an echo server to answer the messages sent
    # before a bad frame, then fail with the right code (strict behaviour).
    p = ServerProtocol(WireFormat(), deliver_before_failing=True)
    bad = b"\x81\x01x"  # an unmasked frame
    p.receive_data(frame(Opcode.TEXT, "one") + frame(Opcode.BINARY, b"two") + bad)
    assert p.events_received() == [TextMessage("one"), BinaryMessage(b"two")]
    assert p.failure_pending and p.state is State.OPEN and p.error is None
    p.send_message("one")  # the application echoes
    p.apply_pending_failure()
    assert not p.failure_pending
    assert_failed(p, 1002)


def test_the_echo_goes_out_before_the_close():
    p = ServerProtocol(WireFormat(), deliver_before_failing=True)
    p.receive_data(frame(Opcode.TEXT, "hi") + frame(0x3, b"x"))  # reserved opcode
    assert p.events_received() == [TextMessage("hi")]
    p.send_message("hi")
    p.apply_pending_failure()
    assert [f.opcode for f in sent_frames(p)] == [Opcode.TEXT, Opcode.CLOSE]


def test_without_earlier_messages_the_failure_is_immediate():
    p = ServerProtocol(WireFormat(), deliver_before_failing=True)
    p.receive_data(frame(Opcode.TEXT, "hi"))
    p.events_received()
    p.receive_data(frame(0x3, b"x"))
    assert not p.failure_pending
    assert_failed(p, 1002)


def test_more_data_or_eof_apply_a_pending_failure():
    for end in ("data", "eof"):
        p = ServerProtocol(WireFormat(), deliver_before_failing=True)
        p.receive_data(frame(Opcode.TEXT, "hi") + frame(0x3, b"x"))
        if end == "data":
            p.receive_data(frame(Opcode.TEXT, "late"))
            assert_failed(p, 1002)
        else:
            p.receive_eof()
            assert p.state is State.CLOSED and isinstance(p.error, ProtocolError)
        assert not p.failure_pending
        assert p.events_received() == [TextMessage("hi")]


def test_by_default_the_failure_is_immediate():
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.TEXT, "hi") + frame(0x3, b"x"))
    assert p.events_received() == [TextMessage("hi")]
    assert_failed(p, 1002)


def test_server_frames_are_never_masked():
    p = ServerProtocol(WireFormat())
    p.send_message("Hello")
    p.send_message(b"\x01")
    p.send_ping(b"p")
    p.send_pong(b"q")
    assert p.data_to_send() == (
        b"\x81\x05Hello" + b"\x82\x01\x01" + b"\x89\x01p" + b"\x8a\x01q"
    )


def test_send_ping_returns_true_and_limits_the_payload():
    p = ServerProtocol(WireFormat())
    assert p.send_ping() is True
    assert p.send_ping("text") is True
    assert sent_frames(p) == [Frame(Opcode.PING), Frame(Opcode.PING, b"text")]
    with pytest.raises(ValueError):
        p.send_ping(b"x" * 126)


def test_send_message_rejects_other_types():
    p = ServerProtocol(WireFormat())
    with pytest.raises(TypeError, match="int"):
        p.send_message(42)


# ------------------------------------------------------------------ deflate


def test_compressed_message_is_decompressed():
    p = ServerProtocol(DEFLATE)
    p.receive_data(frame(Opcode.TEXT, compress(b"Hello " * 100), rsv1=True))
    assert p.events_received() == [TextMessage("Hello " * 100)]


def test_compressed_fragmented_message_with_interleaved_ping():
    data = compress(b"fragmented " * 200)
    p = ServerProtocol(DEFLATE)
    p.receive_data(
        frame(Opcode.BINARY, data[:10], fin=False, rsv1=True)
        + frame(Opcode.PING, b"p")
        + frame(Opcode.CONT, data[10:20], fin=False)
        + frame(Opcode.CONT, data[20:])
    )
    assert p.events_received() == [Ping(b"p"), BinaryMessage(b"fragmented " * 200)]


def test_uncompressed_messages_are_allowed_with_deflate():
    p = ServerProtocol(DEFLATE)
    p.receive_data(frame(Opcode.TEXT, "plain"))
    assert p.events_received() == [TextMessage("plain")]


def test_client_context_takeover_is_honoured():
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    p = ServerProtocol(DEFLATE)
    for _ in range(3):
        data = c.compress(b"repeated message") + c.flush(zlib.Z_SYNC_FLUSH)
        p.receive_data(frame(Opcode.TEXT, data[:-4], rsv1=True))
    assert p.events_received() == [TextMessage("repeated message")] * 3


def test_client_no_context_takeover_resets_the_decoder():
    wire_format = WireFormat(deflate=DeflateParams(client_no_context_takeover=True))
    p = ServerProtocol(wire_format)
    for _ in range(3):
        p.receive_data(frame(Opcode.TEXT, compress(b"again"), rsv1=True))
    assert p.events_received() == [TextMessage("again")] * 3


def test_compressed_frame_without_deflate_fails_with_1002():
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.TEXT, compress(b"x"), rsv1=True))
    assert_failed(p, 1002)


def test_rsv1_on_a_continuation_fails_with_1002():
    p = ServerProtocol(DEFLATE)
    data = compress(b"abcdef")
    p.receive_data(frame(Opcode.TEXT, data[:2], fin=False, rsv1=True))
    p.receive_data(frame(Opcode.CONT, data[2:], rsv1=True))
    assert_failed(p, 1002)


def test_compressed_invalid_utf8_fails_with_1007():
    p = ServerProtocol(DEFLATE)
    p.receive_data(frame(Opcode.TEXT, compress(b"\xff\xfe"), rsv1=True))
    assert_failed(p, 1007, InvalidPayload)


def test_corrupt_compressed_data_fails_with_1002():
    p = ServerProtocol(DEFLATE)
    p.receive_data(frame(Opcode.TEXT, b"\xff\xff\xff\xff", rsv1=True))
    assert_failed(p, 1002)


def test_compressed_message_over_the_limit_fails_with_1009():
    p = ServerProtocol(DEFLATE, max_message_size=1000)
    p.receive_data(frame(Opcode.BINARY, compress(b"\x00" * 1001), rsv1=True))
    assert_failed(p, 1009, PayloadTooBig)


def test_deflate_bomb_fails_with_1009_and_stays_small():
    import tracemalloc

    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"\x00" * 2**20
    bomb = b"".join(c.compress(chunk) for _ in range(100))  # 100 MiB of zeros
    bomb = (bomb + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
    assert len(bomb) < 200_000
    data = frame(Opcode.BINARY, bomb, rsv1=True)
    p = ServerProtocol(DEFLATE)
    tracemalloc.start()
    try:
        p.receive_data(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_failed(p, 1009, PayloadTooBig)
    assert peak < 8 * 2**20


def test_sent_messages_are_compressed():
    p = ServerProtocol(DEFLATE)
    p.send_message("Hello " * 100)
    [f] = sent_frames(p)
    assert f.rsv1 and f.opcode is Opcode.TEXT
    assert zlib.decompressobj(-15).decompress(f.payload + b"\x00\x00\xff\xff") == (
        b"Hello " * 100
    )


# ------------------------------------------------------------------ hixie


@pytest.mark.parametrize("draft", ["hixie-75", "hixie-76"])
def test_hixie_text_messages(draft):
    p = ServerProtocol(WireFormat(draft))
    data = encode_hixie_text("héllo") + encode_hixie_binary(b"skipped")
    data += encode_hixie_text("again")
    for i in range(len(data)):
        p.receive_data(data[i : i + 1])
    assert p.events_received() == [TextMessage("héllo"), TextMessage("again")]


@pytest.mark.parametrize("draft", ["hixie-75", "hixie-76"])
def test_hixie_sending(draft):
    p = ServerProtocol(WireFormat(draft))
    p.send_message("hi")
    p.send_message(b"\x01\x02")
    assert p.data_to_send() == b"\x00hi\xff" + b"\x80\x02\x01\x02"


@pytest.mark.parametrize("draft", ["hixie-75", "hixie-76"])
def test_hixie_has_no_ping(draft):
    p = ServerProtocol(WireFormat(draft))
    assert p.send_ping(b"x") is False
    assert p.send_pong(b"x") is False
    assert p.data_to_send() == b""


def test_hixie76_client_close_is_answered():
    p = ServerProtocol(WireFormat("hixie-76"))
    p.receive_data(HIXIE_CLOSE)
    assert p.events_received() == [CloseReceived(1005, "")]
    assert p.data_to_send() == HIXIE_CLOSE
    assert p.should_close_transport


def test_hixie76_server_close_waits_for_the_client():
    p = ServerProtocol(WireFormat("hixie-76"))
    p.send_close()
    assert p.data_to_send() == HIXIE_CLOSE
    assert p.state is State.CLOSING and p.close_expected
    p.receive_data(encode_hixie_text("late") + HIXIE_CLOSE)
    assert p.events_received() == [CloseReceived(1005, "")]
    assert p.data_to_send() == b"" and p.should_close_transport


def test_hixie75_close_is_just_closing_the_transport():
    p = ServerProtocol(WireFormat("hixie-75"))
    p.send_close()
    assert p.data_to_send() == b""
    assert p.should_close_transport and p.state is State.CLOSED


@pytest.mark.parametrize("draft, sent", [("hixie-75", b""), ("hixie-76", HIXIE_CLOSE)])
def test_hixie_oversized_text_frame_fails(draft, sent):
    p = ServerProtocol(WireFormat(draft), max_message_size=100)
    p.receive_data(b"\x00" + b"x" * 101)  # no 0xFF in sight
    assert isinstance(p.error, PayloadTooBig)
    assert p.should_close_transport
    assert p.data_to_send() == sent


def test_hixie_invalid_utf8_fails():
    p = ServerProtocol(WireFormat("hixie-76"))
    p.receive_data(b"\x00\xc0\xaf\xff")
    assert isinstance(p.error, InvalidPayload)
    assert p.data_to_send() == HIXIE_CLOSE


# ------------------------------------------------------------------ robustness


def _check_outcome(p):
    events = p.events_received()
    assert all(
        isinstance(e, (TextMessage, BinaryMessage, Ping, Pong, CloseReceived))
        for e in events
    )
    assert p.error is None or isinstance(p.error, ProtocolError)
    # receive_data turns unexpected exceptions into 1011: none may happen.
    assert p.error is None or p.error.close_code != 1011, p.error
    if p.error is not None:
        assert p.should_close_transport
    p.data_to_send()


def _chunks(data, cuts):
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for cut in cuts + [len(data)]:
        yield data[start:cut]
        start = cut


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=400),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
    wire_format=st.sampled_from(
        [WireFormat(), DEFLATE, WireFormat("hixie-76"), WireFormat("hixie-75")]
    ),
)
def test_random_bytes_in_random_chunks_never_raise(data, cuts, wire_format):
    p = ServerProtocol(wire_format, max_message_size=200)
    for piece in _chunks(data, cuts):
        p.receive_data(piece)
    p.receive_eof()
    _check_outcome(p)


_valid_frames = st.one_of(
    st.builds(
        frame,
        st.sampled_from([Opcode.TEXT, Opcode.BINARY, Opcode.CONT]),
        st.binary(max_size=50),
        st.booleans(),
        st.booleans(),
    ),
    st.builds(
        frame,
        st.sampled_from([Opcode.PING, Opcode.PONG, Opcode.CLOSE]),
        st.binary(max_size=20),
    ),
    st.binary(max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(_valid_frames, max_size=10),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=10),
    deflate=st.booleans(),
)
def test_random_frame_sequences_never_raise(pieces, cuts, deflate):
    p = ServerProtocol(DEFLATE if deflate else WireFormat(), max_message_size=100)
    for piece in _chunks(b"".join(pieces), cuts):
        p.receive_data(piece)
    _check_outcome(p)


@settings(max_examples=50, deadline=None)
@given(
    messages=st.lists(
        st.one_of(st.text(max_size=300), st.binary(max_size=300)), max_size=5
    ),
    chunk=st.integers(min_value=1, max_value=64),
)
def test_fragmented_messages_round_trip(messages, chunk):
    data = b""
    for m in messages:
        payload = m.encode() if isinstance(m, str) else m
        opcode = Opcode.TEXT if isinstance(m, str) else Opcode.BINARY
        parts = [payload[i : i + chunk] for i in range(0, len(payload), chunk)] or [b""]
        for i, part in enumerate(parts):
            data += frame(opcode if i == 0 else Opcode.CONT, part, i == len(parts) - 1)
    p = ServerProtocol(WireFormat())
    p.receive_data(data)
    events = p.events_received()
    assert [e.data for e in events] == messages
    assert p.error is None


def test_a_large_random_payload_round_trips():
    payload = os.urandom(200_000)
    p = ServerProtocol(WireFormat())
    p.receive_data(frame(Opcode.BINARY, payload))
    assert p.events_received() == [BinaryMessage(payload)]


def test_sending_while_closing_raises_connection_closed():
    p = ServerProtocol(WireFormat())
    p.send_close(1000)
    with pytest.raises(ConnectionClosed) as info:
        p.send_message("x")
    assert (info.value.code, info.value.reason) == (1006, "")


# ------------------------------------------------------------------ interop


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate",
        "permessage-deflate; client_no_context_takeover",
        "permessage-deflate; server_max_window_bits=8; client_max_window_bits=9",
        "permessage-deflate; server_max_window_bits=12; client_max_window_bits",
    ],
)
def test_interop_with_websockets_sans_io_client(offer):
    """websockets' client and our server understand each other's deflate."""
    ws_protocol = pytest.importorskip("websockets.protocol")
    from websockets.extensions.permessage_deflate import PerMessageDeflate

    from stargate.deflate import negotiate

    _, params = negotiate(offer)
    client = ws_protocol.Protocol(ws_protocol.Side.CLIENT, state=ws_protocol.State.OPEN)
    client.extensions = [
        PerMessageDeflate(
            True,
            params.client_no_context_takeover,
            params.server_max_window_bits,
            params.client_max_window_bits,
        )
    ]
    server = ServerProtocol(WireFormat(deflate=params))
    messages = ["hello " * 50, os.urandom(300) * 20, "x", b"", "", "é" * 3000]
    for message in messages:
        if isinstance(message, str):
            data = message.encode()
            client.send_text(data[:7], fin=False)
            client.send_continuation(data[7:], fin=True)
        else:
            client.send_binary(message)
        for data in client.data_to_send():
            server.receive_data(data)
        server.send_message(message)
        client.receive_data(server.data_to_send())
    assert server.error is None
    assert [e.data for e in server.events_received()] == messages
    received = [
        f.data.decode() if f.opcode.name == "TEXT" else f.data
        for f in client.events_received()
    ]
    assert received == messages
