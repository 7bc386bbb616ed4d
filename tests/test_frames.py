"""stargate.frames: RFC 6455 and hixie framing, read as a specification."""

import array
import os
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stargate import frames
from stargate.deflate import Decompressor, DeflateParams
from stargate.exceptions import InvalidPayload, PayloadTooBig, ProtocolError
from stargate.frames import (
    HIXIE_CLOSE,
    Frame,
    FrameParser,
    HixieParser,
    Opcode,
    WireFormat,
    apply_mask,
    encode_hixie_binary,
    encode_hixie_text,
    encode_message,
    is_valid_close_code,
    parse_close,
    serialize_close,
    serialize_frame,
)

MASK = b"\x37\xfa\x21\x3d"


def parse_all(data, parser=None, **limits):
    parser = parser or FrameParser()
    parser.feed(data)
    frames = []
    while (frame := parser.next_frame(**limits)) is not None:
        frames.append(frame)
    return frames


def raw(first, second, rest=b""):
    return bytes((first, second)) + rest


# ------------------------------------------------------------------ masking


def naive_mask(data, mask):
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


@pytest.mark.parametrize(
    "size", [0, 1, 2, 3, 4, 5, 7, 8, 125, 511, 512, 513, 1000, 65537]
)
def test_apply_mask_matches_the_bytewise_definition(size):
    data = os.urandom(size)
    assert apply_mask(data, MASK) == naive_mask(data, MASK)


@pytest.mark.parametrize("size", [7, 700])
def test_apply_mask_keeps_leading_and_trailing_zero_bytes(size):
    data = b"\x00\x00" + b"a" * (size - 4) + b"\x00\x00"
    assert apply_mask(data, b"\x00\x00\x00\x00") == data
    assert apply_mask(apply_mask(data, MASK), MASK) == data


def test_apply_mask_accepts_bytearray_and_memoryview():
    data = b"hello world"
    expected = naive_mask(data, MASK)
    assert apply_mask(bytearray(data), bytearray(MASK)) == expected
    assert apply_mask(memoryview(data), MASK) == expected
    long = os.urandom(2000)
    assert apply_mask(memoryview(long), bytearray(MASK)) == naive_mask(long, MASK)
    assert apply_mask(memoryview(long)[::2], MASK) == naive_mask(long[::2], MASK)
    spaced = bytes(x for b in data for x in (b, 0))  # non-contiguous view
    assert apply_mask(memoryview(spaced)[::2], MASK) == expected


def _wide_buffers():
    raw = os.urandom(2048)
    return [
        ("array of uint16, short", array.array("H", raw[:40])),
        ("array of uint32, long", array.array("I", raw)),
        ("memoryview cast to uint32", memoryview(raw).cast("I")),
        ("memoryview cast to uint16, short", memoryview(raw[:6]).cast("H")),
    ]


@pytest.mark.parametrize(
    "data", [b[1] for b in _wide_buffers()], ids=[b[0] for b in _wide_buffers()]
)
@pytest.mark.parametrize("mask_type", [bytes, lambda m: array.array("I", m)])
def test_apply_mask_reads_any_buffer_as_its_bytes(data, mask_type):
    # The C speedup reads a buffer's raw bytes; the pure Python version used
    # to count its items instead (an array("H") of 20 items: 20 bytes).
    mask = mask_type(MASK)
    expected = naive_mask(memoryview(data).tobytes(), MASK)
    assert frames.apply_mask_python(data, mask) == expected
    assert apply_mask(data, mask) == expected


def test_apply_mask_needs_four_bytes():
    with pytest.raises(ValueError):
        apply_mask(b"abc", b"abc")


# ------------------------------------------------------------------ serializing


def test_rfc6455_example_unmasked_text():
    # RFC 6455 5.7: a single-frame unmasked text message "Hello".
    frame = Frame(Opcode.TEXT, b"Hello")
    assert serialize_frame(frame) == b"\x81\x05\x48\x65\x6c\x6c\x6f"


def test_rfc6455_example_masked_text():
    # RFC 6455 5.7: a single-frame masked text message "Hello".
    data = serialize_frame(Frame(Opcode.TEXT, b"Hello"), mask=b"\x37\xfa\x21\x3d")
    assert data == b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"


def test_rfc6455_example_fragmented_text():
    # RFC 6455 5.7: "Hel" then "lo".
    first = serialize_frame(Frame(Opcode.TEXT, b"Hel", fin=False))
    second = serialize_frame(Frame(Opcode.CONT, b"lo"))
    assert first == b"\x01\x03\x48\x65\x6c"
    assert second == b"\x80\x02\x6c\x6f"


@pytest.mark.parametrize(
    "size, header",
    [
        (0, b"\x82\x00"),
        (125, b"\x82\x7d"),
        (126, b"\x82\x7e\x00\x7e"),
        (65535, b"\x82\x7e\xff\xff"),
        (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_lengths_use_the_shortest_of_7_16_and_64_bits(size, header):
    data = serialize_frame(Frame(Opcode.BINARY, b"x" * size))
    assert data[: len(header)] == header
    assert len(data) == len(header) + size


def test_reserved_bits_are_serialized():
    frame = Frame(Opcode.TEXT, b"", fin=False, rsv1=True, rsv2=True, rsv3=True)
    assert serialize_frame(frame)[0] == 0x71


def test_frame_is_control():
    assert Frame(Opcode.PING).is_control
    assert not Frame(Opcode.CONT).is_control


# ------------------------------------------------------------------ parsing


def test_parses_a_masked_frame():
    [frame] = parse_all(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")
    assert frame == Frame(Opcode.TEXT, b"Hello")
    assert frame.opcode is Opcode.TEXT


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_parses_every_length_encoding(size):
    payload = os.urandom(size)
    data = serialize_frame(Frame(Opcode.BINARY, payload), mask=MASK)
    assert parse_all(data) == [Frame(Opcode.BINARY, payload)]


def test_parses_bytes_fed_one_at_a_time():
    payload = os.urandom(300)
    data = serialize_frame(Frame(Opcode.BINARY, payload), mask=MASK) * 2
    parser = FrameParser()
    frames = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        while (frame := parser.next_frame()) is not None:
            frames.append(frame)
    assert frames == [Frame(Opcode.BINARY, payload)] * 2
    assert parser.buffered == 0


def test_parses_many_frames_in_one_piece():
    frames = [Frame(Opcode.TEXT, b"%d" % i) for i in range(50)]
    data = b"".join(serialize_frame(f, mask=MASK) for f in frames)
    assert parse_all(data) == frames


@pytest.mark.parametrize("tail", [b"", b"\x81"], ids=["nothing", "a partial frame"])
def test_a_delivered_large_frame_is_not_held(tail):
    # The parser used to keep the whole received buffer until the next
    # feed(): an idle connection held up to max_message_size.
    parser = FrameParser()
    tracemalloc.start()
    try:
        data = serialize_frame(Frame(Opcode.BINARY, b"x" * 2**20), mask=MASK) + tail
        parser.feed(data)
        del data
        frame = parser.next_frame()
        assert len(frame.payload) == 2**20
        del frame
        assert parser.next_frame() is None
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert parser.buffered == len(tail)
    assert held < 64 * 1024, held


def test_unmasked_client_frame_is_rejected():
    with pytest.raises(ProtocolError) as info:
        parse_all(b"\x81\x05Hello")
    assert info.value.close_code == 1002


def test_unmasked_frames_parse_when_masks_are_not_required():
    assert parse_all(b"\x81\x05Hello", FrameParser(require_mask=False)) == [
        Frame(Opcode.TEXT, b"Hello")
    ]


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
def test_unknown_opcodes_are_rejected(opcode):
    with pytest.raises(ProtocolError) as info:
        parse_all(raw(0x80 | opcode, 0x80, MASK))
    assert info.value.close_code == 1002


@pytest.mark.parametrize("bit", [0x20, 0x10], ids=["rsv2", "rsv3"])
def test_rsv2_and_rsv3_are_always_rejected(bit):
    with pytest.raises(ProtocolError):
        parse_all(raw(0x81 | bit, 0x80, MASK), FrameParser(allow_rsv1=True))


def test_rsv1_is_rejected_without_an_extension():
    with pytest.raises(ProtocolError):
        parse_all(raw(0xC1, 0x80, MASK))


@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_rsv1_is_allowed_on_data_frames_with_deflate(opcode):
    data = serialize_frame(Frame(opcode, b"\x00", rsv1=True), mask=MASK)
    [frame] = parse_all(data, FrameParser(allow_rsv1=True))
    assert frame.rsv1


@pytest.mark.parametrize(
    "opcode", [Opcode.CONT, Opcode.CLOSE, Opcode.PING, Opcode.PONG]
)
def test_rsv1_on_continuation_or_control_frames_is_rejected(opcode):
    data = serialize_frame(Frame(opcode, b"", rsv1=True), mask=MASK)
    with pytest.raises(ProtocolError):
        parse_all(data, FrameParser(allow_rsv1=True))


@pytest.mark.parametrize("opcode", [Opcode.CLOSE, Opcode.PING, Opcode.PONG])
def test_control_frames_over_125_bytes_are_rejected(opcode):
    data = serialize_frame(Frame(opcode, b"x" * 126), mask=MASK)
    with pytest.raises(ProtocolError):
        parse_all(data[:4])  # the header alone is enough


@pytest.mark.parametrize("opcode", [Opcode.CLOSE, Opcode.PING, Opcode.PONG])
def test_control_frames_of_125_bytes_are_fine(opcode):
    payload = b"\x03\xe8" + b"x" * 123
    data = serialize_frame(Frame(opcode, payload), mask=MASK)
    assert parse_all(data) == [Frame(opcode, payload)]


@pytest.mark.parametrize("opcode", [Opcode.CLOSE, Opcode.PING, Opcode.PONG])
def test_fragmented_control_frames_are_rejected(opcode):
    data = serialize_frame(Frame(opcode, b"", fin=False), mask=MASK)
    with pytest.raises(ProtocolError):
        parse_all(data)


def test_64_bit_length_with_top_bit_set_is_rejected():
    data = raw(0x82, 0xFF, struct.pack("!Q", 1 << 63) + MASK)
    with pytest.raises(ProtocolError):
        parse_all(data)


def test_the_size_limit_is_checked_on_the_header_before_the_payload():
    data = serialize_frame(Frame(Opcode.BINARY, b"x" * 70000), mask=MASK)
    parser = FrameParser()
    parser.feed(data[:10])  # only the 64-bit header
    with pytest.raises(PayloadTooBig) as info:
        parser.next_frame(max_size=65536)
    assert info.value.close_code == 1009


def test_the_size_limit_admits_a_frame_of_exactly_that_size():
    data = serialize_frame(Frame(Opcode.BINARY, b"x" * 100), mask=MASK)
    assert len(parse_all(data, max_size=100)[0].payload) == 100


def test_compressed_frames_have_their_own_limit():
    data = serialize_frame(Frame(Opcode.BINARY, b"x" * 100, rsv1=True), mask=MASK)
    parser = FrameParser(allow_rsv1=True)
    assert parse_all(data, parser, max_size=10, max_rsv1_size=100)
    with pytest.raises(PayloadTooBig):
        parse_all(data, parser, max_size=1000, max_rsv1_size=99)


def test_control_frames_are_not_subject_to_the_data_limit():
    data = serialize_frame(Frame(Opcode.PING, b"x" * 100), mask=MASK)
    assert parse_all(data, max_size=0)


frames_strategy = st.one_of(
    st.builds(
        Frame,
        opcode=st.sampled_from([Opcode.CONT, Opcode.TEXT, Opcode.BINARY]),
        payload=st.binary(max_size=70000),
        fin=st.booleans(),
    ),
    st.builds(
        Frame,
        opcode=st.sampled_from([Opcode.TEXT, Opcode.BINARY]),
        payload=st.binary(max_size=300),
        fin=st.booleans(),
        rsv1=st.just(True),
    ),
    st.builds(
        Frame,
        opcode=st.sampled_from([Opcode.CLOSE, Opcode.PING, Opcode.PONG]),
        payload=st.binary(max_size=125),
    ),
)


@settings(max_examples=150, deadline=None)
@given(
    frames=st.lists(frames_strategy, max_size=8),
    masks=st.lists(st.binary(min_size=4, max_size=4), min_size=8, max_size=8),
    chunk=st.integers(min_value=1, max_value=5000),
)
def test_serialize_then_parse_round_trips(frames, masks, chunk):
    data = b"".join(serialize_frame(f, mask=m) for f, m in zip(frames, masks))
    parser = FrameParser(allow_rsv1=True)
    parsed = []
    for i in range(0, len(data), chunk):
        parser.feed(data[i : i + chunk])
        while (frame := parser.next_frame()) is not None:
            parsed.append(frame)
    assert parsed == frames


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_give_frames_or_a_protocol_error(data):
    try:
        parse_all(data, FrameParser(allow_rsv1=True), max_size=1000)
    except ProtocolError:
        pass


# ------------------------------------------------------------------ close frames


@pytest.mark.parametrize(
    "code",
    [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
    + [3000, 3999, 4000, 4999],
)
def test_valid_close_codes(code):
    assert is_valid_close_code(code)
    assert parse_close(struct.pack("!H", code) + b"bye") == (code, "bye")


@pytest.mark.parametrize(
    "code",
    [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535],
)
def test_invalid_close_codes_are_protocol_errors(code):
    assert not is_valid_close_code(code)
    with pytest.raises(ProtocolError) as info:
        parse_close(struct.pack("!H", code))
    assert info.value.close_code == 1002


def test_empty_close_body_means_no_status_1005():
    assert parse_close(b"") == (1005, "")


def test_close_body_of_one_byte_is_a_protocol_error():
    with pytest.raises(ProtocolError) as info:
        parse_close(b"\x03")
    assert info.value.close_code == 1002


def test_close_reason_must_be_utf8():
    with pytest.raises(InvalidPayload) as info:
        parse_close(b"\x03\xe8\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80")
    assert info.value.close_code == 1007


def test_serialize_close():
    assert serialize_close(1000, "bye") == b"\x03\xe8bye"
    assert serialize_close(None) == b""
    assert parse_close(serialize_close(4000, "ünïcode")) == (4000, "ünïcode")


@pytest.mark.parametrize("code", [1005, 1006, 999, 5000, "1000"])
def test_serialize_close_refuses_unsendable_codes(code):
    with pytest.raises(ValueError):
        serialize_close(code)


def test_serialize_close_limits_the_reason_to_123_bytes():
    assert len(serialize_close(1000, "x" * 123)) == 125
    with pytest.raises(ValueError):
        serialize_close(1000, "x" * 124)
    with pytest.raises(ValueError):
        serialize_close(None, "reason without a code")


# ------------------------------------------------------------------ hixie


def hixie_all(data, max_size=None, chunk=None):
    parser = HixieParser()
    frames = []
    chunk = chunk or max(len(data), 1)
    for i in range(0, len(data), chunk):
        parser.feed(data[i : i + chunk])
        while (frame := parser.next_frame(max_size)) is not None:
            frames.append(frame)
    return frames


def test_hixie_text_frame_encoding():
    assert encode_hixie_text("héllo") == b"\x00h\xc3\xa9llo\xff"


@pytest.mark.parametrize(
    "size, prefix",
    [(0, b"\x80\x00"), (5, b"\x80\x05"), (127, b"\x80\x7f"), (128, b"\x80\x81\x00")],
)
def test_hixie_binary_frames_are_length_prefixed_in_7_bit_groups(size, prefix):
    data = encode_hixie_binary(b"x" * size)
    assert data == prefix + b"x" * size


def test_hixie_parses_text_frames_in_any_pieces():
    data = encode_hixie_text("hello") + encode_hixie_text("") + encode_hixie_text("ü")
    expected = [
        Frame(Opcode.TEXT, b"hello"),
        Frame(Opcode.TEXT, b""),
        Frame(Opcode.TEXT, "ü".encode()),
    ]
    for chunk in (1, 2, 3, 100):
        assert hixie_all(data, chunk=chunk) == expected


def test_hixie_close_frame():
    assert hixie_all(HIXIE_CLOSE) == [Frame(Opcode.CLOSE)]


def test_hixie_length_prefixed_frames_are_discarded():
    data = encode_hixie_binary(b"\xff\x00" * 100) + encode_hixie_text("after")
    for chunk in (1, 7, 1000):
        assert hixie_all(data, chunk=chunk) == [Frame(Opcode.TEXT, b"after")]


def test_hixie_sentinel_frames_of_other_types_are_discarded():
    data = b"\x05junk\xff" + encode_hixie_text("kept")
    assert hixie_all(data, chunk=2) == [Frame(Opcode.TEXT, b"kept")]


def test_hixie_unterminated_text_frame_over_the_limit_fails():
    parser = HixieParser()
    parser.feed(b"\x00" + b"x" * 100)
    assert parser.next_frame(max_size=100) is None
    parser.feed(b"x")
    with pytest.raises(PayloadTooBig):
        parser.next_frame(max_size=100)


def test_hixie_terminated_text_frame_over_the_limit_fails():
    with pytest.raises(PayloadTooBig):
        hixie_all(encode_hixie_text("x" * 101), max_size=100)


def test_hixie_length_prefixed_frame_over_the_limit_fails():
    with pytest.raises(PayloadTooBig):
        hixie_all(b"\x80\x81\x00", max_size=100)  # 128 bytes announced


# ------------------------------------------------------------------ wire formats


def test_wire_format_is_a_hashable_value():
    params = DeflateParams()
    assert WireFormat() == WireFormat("rfc6455", None)
    assert hash(WireFormat(deflate=params)) == hash(WireFormat(deflate=DeflateParams()))
    assert len({WireFormat(), WireFormat("hixie-76"), WireFormat()}) == 2
    assert WireFormat("hixie-75").is_hixie and not WireFormat().is_hixie


@pytest.mark.parametrize(
    "kwargs",
    [{"draft": "hybi-10"}, {"draft": "hixie-76", "deflate": DeflateParams()}],
)
def test_wire_format_rejects_impossible_combinations(kwargs):
    with pytest.raises(ValueError):
        WireFormat(**kwargs)


@pytest.mark.parametrize(
    "message, expected",
    [
        ("Hello", b"\x81\x05Hello"),
        (b"Hello", b"\x82\x05Hello"),
        (bytearray(b"Hi"), b"\x82\x02Hi"),
        (memoryview(b"Hi"), b"\x82\x02Hi"),
        ("", b"\x81\x00"),
    ],
)
def test_encode_message_rfc6455(message, expected):
    assert encode_message(message, WireFormat()) == expected


@pytest.mark.parametrize("draft", ["hixie-75", "hixie-76"])
def test_encode_message_hixie(draft):
    assert encode_message("hé", WireFormat(draft)) == b"\x00h\xc3\xa9\xff"
    assert encode_message(b"ab", WireFormat(draft)) == b"\x80\x02ab"


@pytest.mark.parametrize("message", ["Hello " * 100, b"\x00" * 1000, "", b""])
def test_encode_message_compressed_sets_rsv1_and_decompresses(message):
    params = DeflateParams()
    data = encode_message(message, WireFormat(deflate=params))
    [frame] = parse_all(data, FrameParser(require_mask=False, allow_rsv1=True))
    assert frame.rsv1 and frame.fin
    assert frame.opcode == (Opcode.TEXT if isinstance(message, str) else Opcode.BINARY)
    decoded = Decompressor(params).decompress(frame.payload, True)
    expected = message.encode() if isinstance(message, str) else message
    assert decoded == expected


def test_encode_message_is_pure():
    wire_format = WireFormat(deflate=DeflateParams())
    assert encode_message("same " * 50, wire_format) == encode_message(
        "same " * 50, wire_format
    )


@pytest.mark.parametrize("message", [None, 42, ["list"], {"a": 1}])
def test_encode_message_rejects_other_types_by_name(message):
    with pytest.raises(TypeError, match=type(message).__name__):
        encode_message(message, WireFormat())


@pytest.mark.skipif(
    frames._apply_mask_c is None, reason="the optional C speedup was not built"
)
@pytest.mark.parametrize("size", [0, 1, 3, 4, 7, 8, 9, 15, 16, 17, 511, 512, 4099])
def test_c_and_python_masking_agree(size):
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    for mask in (MASK, b"\x00\x00\x00\x00", b"\xff\xff\xff\xff"):
        expected = naive_mask(data, mask)
        assert frames._apply_mask_c(data, mask) == expected
        assert frames.apply_mask_python(data, mask) == expected
        assert frames._apply_mask_c(bytearray(data), bytearray(mask)) == expected
