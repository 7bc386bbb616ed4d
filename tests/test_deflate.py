"""stargate.deflate: permessage-deflate (RFC 7692) negotiation and codec."""

import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stargate.deflate import (
    Decompressor,
    DeflateParams,
    compress,
    negotiate,
    parse_extensions,
)
from stargate.exceptions import PayloadTooBig, ProtocolError

BASE = "permessage-deflate; server_no_context_takeover"


# ------------------------------------------------------------------ parsing


def test_parse_extensions_with_several_offers_and_quoted_values():
    value = (
        'permessage-deflate; client_max_window_bits; server_max_window_bits="10", '
        "permessage-deflate,x-webkit-deflate-frame ; no_context_takeover"
    )
    assert parse_extensions(value) == [
        (
            "permessage-deflate",
            [("client_max_window_bits", None), ("server_max_window_bits", "10")],
        ),
        ("permessage-deflate", []),
        ("x-webkit-deflate-frame", [("no_context_takeover", None)]),
    ]


def test_parse_extensions_keeps_commas_inside_quotes_together():
    assert parse_extensions('a; p="x", b') == [("a", [("p", "x")]), ("b", [])]


@pytest.mark.parametrize(
    "value",
    ['a; p="unterminated', "a; =1", "a; p=x y", "; p", 'a; p="no spaces"', "a b"],
)
def test_parse_extensions_rejects_malformed_values(value):
    with pytest.raises(ValueError):
        parse_extensions(value)


# ------------------------------------------------------------------ negotiation


def test_a_plain_offer_is_accepted_with_server_no_context_takeover():
    response, params = negotiate("permessage-deflate")
    assert response == BASE
    assert params == DeflateParams()
    assert params.server_no_context_takeover
    assert not params.client_no_context_takeover
    assert (params.server_max_window_bits, params.client_max_window_bits) == (15, 15)


def test_server_no_context_takeover_offered():
    response, params = negotiate("permessage-deflate; server_no_context_takeover")
    assert response == BASE
    assert params.server_no_context_takeover


def test_client_no_context_takeover_is_echoed():
    response, params = negotiate("permessage-deflate; client_no_context_takeover")
    assert response == BASE + "; client_no_context_takeover"
    assert params.client_no_context_takeover


@pytest.mark.parametrize("bits", range(8, 16))
def test_server_max_window_bits_is_echoed(bits):
    response, params = negotiate(f"permessage-deflate; server_max_window_bits={bits}")
    assert response == BASE + f"; server_max_window_bits={bits}"
    assert params.server_max_window_bits == bits


def test_client_max_window_bits_without_a_value_is_accepted():
    response, params = negotiate("permessage-deflate; client_max_window_bits")
    assert response == BASE  # never answered: we decode any window
    assert params.client_max_window_bits == 15


@pytest.mark.parametrize("bits", range(8, 16))
def test_client_max_window_bits_with_a_value(bits):
    response, params = negotiate(f"permessage-deflate; client_max_window_bits={bits}")
    assert response == BASE
    assert params.client_max_window_bits == bits


def test_quoted_values_are_accepted():
    _, params = negotiate('permessage-deflate; server_max_window_bits="9"')
    assert params.server_max_window_bits == 9


def test_all_four_parameters_at_once():
    response, params = negotiate(
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover;"
        " server_max_window_bits=12; client_max_window_bits=10"
    )
    assert response == (
        BASE + "; client_no_context_takeover; server_max_window_bits=12"
    )
    assert params == DeflateParams(True, True, 12, 10)


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; server_max_window_bits",  # value required
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; client_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=010",
        "permessage-deflate; server_max_window_bits=abc",
        "permessage-deflate; server_max_window_bits=",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; client_no_context_takeover=yes",
        "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        "permessage-deflate; server_max_window_bits=10; server_max_window_bits=10",
        "permessage-deflate; unknown_param",
        'permessage-deflate; server_max_window_bits="1 0"',
    ],
)
def test_invalid_offers_are_declined(offer):
    assert negotiate(offer) is None


def test_the_next_offer_is_tried_after_an_invalid_one():
    response, params = negotiate(
        "permessage-deflate; server_max_window_bits=20, "
        "permessage-deflate; client_no_context_takeover"
    )
    assert response == BASE + "; client_no_context_takeover"


def test_other_extensions_are_skipped():
    response, _ = negotiate("x-webkit-deflate-frame, permessage-deflate")
    assert response == BASE


def test_a_malformed_element_does_not_spoil_the_others():
    response, _ = negotiate('x-foo; a="b c", permessage-deflate')
    assert response == BASE


def test_the_extension_name_is_case_insensitive():
    assert negotiate("PerMessage-Deflate") is not None


@pytest.mark.parametrize(
    "value", [None, "", "x-webkit-deflate-frame", 'permessage-deflate; p="', ","]
)
def test_nothing_acceptable_gives_none(value):
    assert negotiate(value) is None


def test_disabled_compression_gives_none():
    assert negotiate("permessage-deflate", enabled=False) is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_negotiate_never_raises(value):
    result = negotiate(value)
    if result is not None:
        response, params = result
        assert response.startswith(BASE)
        assert hash(params) is not None


# ------------------------------------------------------------------ params


def test_params_are_hashable_values():
    assert DeflateParams() == DeflateParams()
    assert len({DeflateParams(), DeflateParams(), DeflateParams(True, True)}) == 2


@pytest.mark.parametrize("bits", [7, 16, None])
def test_params_validate_window_bits(bits):
    with pytest.raises(ValueError):
        DeflateParams(server_max_window_bits=bits)


# ------------------------------------------------------------------ compression


def inflate(data, wbits=-15, step=None):
    """Decompress a message the way a peer would, ``step`` bytes of output at
    a time so back-references must come from the sliding window."""
    decoder = zlib.decompressobj(wbits)
    data += b"\x00\x00\xff\xff"
    if step is None:
        return decoder.decompress(data)
    out = []
    while data:
        out.append(decoder.decompress(data, step))
        data = decoder.unconsumed_tail
    return b"".join(out)


def test_empty_message_compresses_to_a_single_zero_byte():
    assert compress(b"", DeflateParams()) == b"\x00"
    assert inflate(b"\x00") == b""


def test_compressed_data_has_no_sync_flush_tail():
    data = compress(b"Hello " * 100, DeflateParams())
    assert not data.endswith(b"\x00\x00\xff\xff")
    assert len(data) < 100
    assert inflate(data) == b"Hello " * 100


def test_every_message_is_compressed_on_its_own():
    params = DeflateParams()
    first = compress(b"the same text", params)
    assert compress(b"the same text", params) == first


@pytest.mark.parametrize("bits", range(8, 16))
def test_compression_honours_server_max_window_bits(bits):
    # A window of 2**bits bytes must be enough to decode: back-references
    # farther than the client's window would corrupt its output.
    block = os.urandom(1 << bits)
    data = block * 3
    compressed = compress(data, DeflateParams(server_max_window_bits=bits))
    assert inflate(compressed, wbits=-bits, step=16) == data


def test_window_8_quirk_a_9_bit_zlib_stream_decodes_with_256_bytes():
    # zlib refuses raw deflate with 8 bits; we compress with 9, whose match
    # distances stay under 250, so a 256-byte window decodes it ...
    data = os.urandom(300) * 20
    compressed = compress(data, DeflateParams(server_max_window_bits=8))
    assert inflate(compressed, wbits=-8, step=16) == data
    # ... whereas a 15-bit stream would not.
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    wide = (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
    with pytest.raises(zlib.error):
        inflate(wide, wbits=-8, step=16)


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=5000), bits=st.integers(8, 15))
def test_compress_round_trips(data, bits):
    params = DeflateParams(server_max_window_bits=bits)
    assert Decompressor(params).decompress(compress(data, params), True) == data


# ------------------------------------------------------------------ decompression


def client_compress(compressor, data):
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4]


def test_decompressor_keeps_the_client_context_across_messages():
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    d = Decompressor(DeflateParams())
    first = client_compress(c, b"a message repeated verbatim")
    second = client_compress(c, b"a message repeated verbatim")
    assert len(second) < len(first)  # refers to the first message
    assert d.decompress(first, True) == b"a message repeated verbatim"
    assert d.decompress(second, True) == b"a message repeated verbatim"


def test_decompressor_resets_with_client_no_context_takeover():
    d = Decompressor(DeflateParams(client_no_context_takeover=True))
    for _ in range(3):
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        assert d.decompress(client_compress(c, b"abc"), True) == b"abc"


def test_decompressor_reads_fragments_in_order():
    data = client_compress(zlib.compressobj(6, zlib.DEFLATED, -15), b"xyz" * 1000)
    d = Decompressor(DeflateParams())
    out = d.decompress(data[:5], False) + d.decompress(data[5:], True)
    assert out == b"xyz" * 1000


@pytest.mark.parametrize("bits", [8, 9, 12])
def test_decompressor_reads_a_client_with_a_small_window(bits):
    c = zlib.compressobj(6, zlib.DEFLATED, -max(bits, 9))
    data = os.urandom(200) * 50
    d = Decompressor(DeflateParams(client_max_window_bits=bits))
    assert d.decompress(client_compress(c, data), True) == data


def test_decompressor_starts_over_after_a_final_block():
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    final = c.compress(b"final block") + c.flush(zlib.Z_FINISH)
    d = Decompressor(DeflateParams())
    assert d.decompress(final, True) == b"final block"
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    assert d.decompress(client_compress(c, b"next"), True) == b"next"


def _final_block(data):
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_FINISH)


@pytest.mark.parametrize("limit", [None, 2**20])
@pytest.mark.parametrize(
    "trailer",
    [_final_block(b"second block"), b"junk", b"\x00", b"\x00\x00\xff\xff"],
    ids=["a second stream", "junk", "one byte", "an empty stored block"],
)
def test_data_after_the_final_block_is_a_protocol_error(limit, trailer):
    # RFC 7692 7.2.2: the message ends with the BFINAL block.
    d = Decompressor(DeflateParams(), limit)
    with pytest.raises(ProtocolError, match="after the final deflate block"):
        d.decompress(_final_block(b"hello") + trailer, True)


def test_data_after_the_final_block_in_a_later_frame_is_a_protocol_error():
    d = Decompressor(DeflateParams())
    assert d.decompress(_final_block(b"hello"), False) == b"hello"
    assert d.decompress(b"", False) == b""
    with pytest.raises(ProtocolError):
        d.decompress(b"more", True)


def test_decompressor_limit_allows_exactly_the_limit():
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = client_compress(c, b"x" * 1000)
    assert len(Decompressor(DeflateParams(), 1000).decompress(data, True)) == 1000
    with pytest.raises(PayloadTooBig) as info:
        Decompressor(DeflateParams(), 999).decompress(data, True)
    assert info.value.close_code == 1009


def test_decompressor_limit_covers_the_whole_message():
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = client_compress(c, b"x" * 1000)
    d = Decompressor(DeflateParams(), 600)
    d.decompress(data[:3], False)
    with pytest.raises(PayloadTooBig):
        d.decompress(data[3:], True)


def test_deflate_bomb_stops_at_the_limit():
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = b"\x00" * 2**20
    bomb = b"".join(c.compress(zeros) for _ in range(100)) + c.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 200_000  # 100 MiB in about 100 KB
    d = Decompressor(DeflateParams(), 2**20)
    with pytest.raises(PayloadTooBig):
        d.decompress(bomb[:-4], True)


def test_corrupt_data_is_a_protocol_error():
    with pytest.raises(ProtocolError) as info:
        Decompressor(DeflateParams()).decompress(b"\xff\xff\xff", True)
    assert info.value.close_code == 1002
