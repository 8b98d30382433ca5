"""The SPDY/3.1 codec on its own: byte layouts, round trips, the incremental
decoder, the limits that keep a hostile peer from exhausting memory, and
flow-control arithmetic. Interop with the Go library is in test_spdy_interop."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.streaming import spdy

# Frames written by github.com/moby/spdystream's own framer (Debian's
# golang-github-docker-spdystream-dev), one compression context for the three.
GO_SYN_STREAM = bytes.fromhex(
    "800300010000002b0000000100000000600078f9e3c6a7c26260606004a7b392a2d4c45c6851c2565c92925f5a02000000ffff"
)
GO_SYN_REPLY_FIN = bytes.fromhex("80030002010000190000000182cab157e8e696e69464824b4c862400000000ffff")
GO_HEADERS = bytes.fromhex("800300080000000c00000001c2a703000000ffff")


def roundtrip(*frames: spdy.Frame) -> list[spdy.Frame]:
    encoder, decoder = spdy.Encoder(), spdy.Decoder()
    decoder.feed(b"".join(encoder.encode(f) for f in frames))
    out = list(decoder)
    assert decoder.buffered == 0
    return out


# -- the dictionary and fixed layouts ---------------------------------------


def test_dictionary_is_the_specs():
    assert len(spdy.DICTIONARY) == 1423
    assert zlib.adler32(spdy.DICTIONARY) == 0xE3C6A7C2  # the DICTID in every SPDY/3 header stream
    assert spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (spdy.Data(1, b"hi", fin=True), "00000001 01000002 6869"),
        (spdy.Data(0x7FFFFFFF), "7fffffff 00000000"),
        (spdy.RstStream(3, spdy.RstStatus.CANCEL), "80030003 00000008 00000003 00000005"),
        (spdy.Ping(1), "80030006 00000004 00000001"),
        (spdy.GoAway(5, spdy.GoAwayStatus.INTERNAL_ERROR), "80030007 00000008 00000005 00000002"),
        (spdy.WindowUpdate(0, 65536), "80030009 00000008 00000000 00010000"),
        (
            spdy.Settings(
                (spdy.Setting(spdy.SettingId.INITIAL_WINDOW_SIZE, 1 << 20, spdy.SETTING_PERSIST_VALUE),), clear=True
            ),
            "80030004 0100000c 00000001 01000007 00100000",
        ),
        (spdy.Settings(), "80030004 00000004 00000000"),
    ],
)
def test_fixed_layouts(frame: spdy.Frame, wire: str):
    raw = bytes.fromhex(wire.replace(" ", ""))
    assert spdy.Encoder().encode(frame) == raw
    decoder = spdy.Decoder()
    decoder.feed(raw)
    assert list(decoder) == [frame]


def test_frames_written_by_spdystream_decode():
    decoder = spdy.Decoder()
    decoder.feed(GO_SYN_STREAM + GO_SYN_REPLY_FIN + GO_HEADERS)
    assert list(decoder) == [
        spdy.SynStream(1, (("streamtype", "stdout"),), priority=3),
        spdy.SynReply(1, (("x-multi", "a"), ("x-multi", "b")), fin=True),
        spdy.Headers(1, (("streamtype", "stdout"),)),
    ]


def test_header_frames_carry_their_fixed_fields():
    raw = spdy.Encoder().encode(
        spdy.SynStream(7, (("a", "b"),), associated_to=5, priority=7, slot=2, fin=True, unidirectional=True)
    )
    assert struct.unpack_from(">HHB", raw) == (
        0x8003,
        spdy.FrameType.SYN_STREAM,
        spdy.FLAG_FIN | spdy.FLAG_UNIDIRECTIONAL,
    )
    assert struct.unpack_from(">IIBB", raw, 8) == (7, 5, 7 << 5, 2)
    assert raw[18:20] == b"\x78\xf9"  # zlib header announcing a preset dictionary
    assert struct.unpack_from(">I", raw, 20)[0] == 0xE3C6A7C2


def test_header_block_layout():
    block = spdy.pack_header_block([("StreamType", "error"), ("port", "80"), ("streamtype", "x")])
    assert block == (
        b"\x00\x00\x00\x02\x00\x00\x00\x0astreamtype\x00\x00\x00\x07error\x00x\x00\x00\x00\x04port\x00\x00\x00\x0280"
    )
    assert spdy.unpack_header_block(block) == (("streamtype", "error"), ("streamtype", "x"), ("port", "80"))


@pytest.mark.parametrize(
    "block",
    [
        b"\x00\x00\x00",  # no count
        b"\x00\x00\x00\x01\x00\x00\x00\x01a",  # value missing
        b"\x00\x00\x00\x01\x00\x00\x00\x01A\x00\x00\x00\x00",  # uppercase name
        b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00",  # empty name
        b"\x00\x00\x00\x02" + 2 * b"\x00\x00\x00\x01a\x00\x00\x00\x00",  # repeated name
        b"\x00\x00\x00\x00junk",
        b"\xff\xff\xff\xff",  # a count the block cannot hold
        b"\x00\x00\x00\x01\x00\x00\x00\x01\xff\x00\x00\x00\x00",  # not UTF-8
    ],
)
def test_bad_header_blocks_are_stream_errors(block: bytes):
    with pytest.raises(spdy.StreamError) as err:
        spdy.unpack_header_block(block, 9)
    assert (err.value.stream_id, err.value.status) == (9, spdy.RstStatus.PROTOCOL_ERROR)


@pytest.mark.parametrize("pair", [("", "v"), ("a\0b", "v"), ("a", "x\0y")])
def test_unencodable_headers_are_refused(pair: tuple[str, str]):
    with pytest.raises(ValueError):
        spdy.pack_header_block([pair])


@pytest.mark.parametrize(
    "build",
    [
        lambda: spdy.Data(0),
        lambda: spdy.Data(1 << 31),
        lambda: spdy.SynStream(1, priority=8),
        lambda: spdy.RstStream(1, 0),
        lambda: spdy.WindowUpdate(1, 0),
        lambda: spdy.WindowUpdate(1, 1 << 31),
        lambda: spdy.Ping(1 << 32),
        lambda: spdy.Setting(1 << 24, 0),
    ],
)
def test_invalid_frames_cannot_be_built(build):
    with pytest.raises(ValueError):
        build()


# -- round trips ---------------------------------------------------------------

ALL_FRAMES: list[spdy.Frame] = [
    spdy.SynStream(1, (("streamtype", "error"), ("port", "8080"), ("requestid", "0")), priority=0),
    spdy.SynReply(1, (("x", ""),)),
    spdy.Headers(1, (("a", "1"), ("a", "2")), fin=True),
    spdy.Data(1, b"\x00" * 70000),
    spdy.Data(1, b"", fin=True),
    spdy.RstStream(1, spdy.RstStatus.FLOW_CONTROL_ERROR),
    spdy.Settings((spdy.Setting(4, 100), spdy.Setting(7, 1 << 20, spdy.SETTING_PERSISTED))),
    spdy.Ping(0xFFFFFFFF),
    spdy.GoAway(0x7FFFFFFF, spdy.GoAwayStatus.PROTOCOL_ERROR),
    spdy.WindowUpdate(5, spdy.MAX_WINDOW),
]


def test_every_frame_type_round_trips():
    assert roundtrip(*ALL_FRAMES) == ALL_FRAMES


def test_decoder_fed_byte_by_byte():
    encoder = spdy.Encoder()
    wire = b"".join(encoder.encode(f) for f in ALL_FRAMES[:3] + ALL_FRAMES[4:])
    decoder, out = spdy.Decoder(), []
    for i in range(len(wire)):
        decoder.feed(wire[i : i + 1])
        out.extend(decoder)
    assert out == ALL_FRAMES[:3] + ALL_FRAMES[4:]
    assert decoder.buffered == 0


def test_unknown_control_types_are_skipped():
    noop = struct.pack(">HHI", 0x8003, 5, 3) + b"abc"
    credential = struct.pack(">HHI", 0x8003, 10, 0)
    decoder = spdy.Decoder()
    decoder.feed(noop + credential + spdy.Encoder().encode(spdy.Ping(2)))
    assert list(decoder) == [spdy.Ping(2)]


names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20).map(str.lower)
values = st.text(st.characters(blacklist_characters="\0", codec="utf-8"), max_size=40)
header_lists = st.dictionaries(names, values, max_size=6).map(lambda d: tuple(d.items()))
stream_ids = st.integers(1, spdy.MAX_STREAM_ID)
frames = st.one_of(
    st.builds(spdy.Data, stream_ids, st.binary(max_size=300), st.booleans()),
    st.builds(
        spdy.SynStream,
        stream_ids,
        header_lists,
        st.integers(0, spdy.MAX_STREAM_ID),
        st.integers(0, 7),
        st.integers(0, 255),
        st.booleans(),
        st.booleans(),
    ),
    st.builds(spdy.SynReply, stream_ids, header_lists, st.booleans()),
    st.builds(spdy.Headers, stream_ids, header_lists, st.booleans()),
    st.builds(spdy.RstStream, stream_ids, st.sampled_from(spdy.RstStatus)),
    st.builds(
        spdy.Settings,
        st.lists(
            st.builds(spdy.Setting, st.integers(0, 0xFFFFFF), st.integers(0, 2**32 - 1), st.integers(0, 255)),
            max_size=4,
        ).map(tuple),
        st.booleans(),
    ),
    st.builds(spdy.Ping, st.integers(0, 2**32 - 1)),
    st.builds(spdy.GoAway, st.integers(0, spdy.MAX_STREAM_ID), st.sampled_from(spdy.GoAwayStatus)),
    st.builds(spdy.WindowUpdate, st.integers(0, spdy.MAX_STREAM_ID), st.integers(1, spdy.MAX_WINDOW)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(frames, max_size=8), st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_any_frame_sequence_round_trips_in_any_chunking(seq: list[spdy.Frame], cuts: list[int]):
    encoder = spdy.Encoder()
    wire = b"".join(encoder.encode(f) for f in seq)
    decoder, out, pos, i = spdy.Decoder(), [], 0, 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        decoder.feed(wire[pos : pos + step])
        pos, i = pos + step, i + 1
        out.extend(decoder)
    assert out == seq


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_protocol_errors(junk: bytes):
    decoder = spdy.Decoder(max_frame_length=4096)
    decoder.feed(junk)
    try:
        while decoder.next_frame() is not None:
            pass
    except spdy.StreamError:
        pass
    except spdy.SessionError:
        with pytest.raises(spdy.SessionError):  # and it stays broken
            decoder.next_frame()


# -- limits --------------------------------------------------------------------


def test_oversize_control_frame_ends_the_session_before_buffering_it():
    decoder = spdy.Decoder(max_frame_length=1024)
    decoder.feed(struct.pack(">HHI", 0x8003, 1, 0xFFFFFF))  # header only: the payload never arrives
    with pytest.raises(spdy.SessionError):
        decoder.next_frame()
    with pytest.raises(spdy.SessionError):
        decoder.next_frame()


def test_oversize_data_frame_is_skipped_and_resets_its_stream():
    encoder, decoder = spdy.Encoder(), spdy.Decoder(max_frame_length=1024)
    wire = encoder.encode(spdy.Data(3, b"x" * 5000)) + encoder.encode(spdy.Data(5, b"ok"))
    with pytest.raises(spdy.StreamError) as err:
        for i in range(0, len(wire), 100):
            decoder.feed(wire[i : i + 100])
            list(decoder)
    assert (err.value.stream_id, err.value.status) == (3, spdy.RstStatus.FRAME_TOO_LARGE)
    decoder.feed(wire[i + 100 :])
    assert list(decoder) == [spdy.Data(5, b"ok")]


def test_zlib_bomb_is_refused_without_inflating_it():
    raw = b"\x00\x00\x00\x01\x00\x00\x00\x01a" + struct.pack(">I", 50_000_000) + b"a" * 50_000_000
    z = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, spdy.DICTIONARY)
    bomb = z.compress(raw) + z.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 100_000
    decoder = spdy.Decoder(max_frame_length=1 << 20, max_header_block=16 * 1024)
    decoder.feed(struct.pack(">HHI", 0x8003, 2, 4 + len(bomb)) + b"\x00\x00\x00\x01" + bomb)
    with pytest.raises(spdy.SessionError, match="beyond 16384"):
        decoder.next_frame()


def test_header_block_at_the_limit_passes():
    headers = (("n", "v" * 100),)
    size = len(spdy.pack_header_block(headers))
    decoder = spdy.Decoder(max_header_block=size)
    decoder.feed(spdy.Encoder().encode(spdy.SynReply(1, headers)))
    assert list(decoder) == [spdy.SynReply(1, headers)]


def test_header_block_that_is_not_zlib_ends_the_session():
    decoder = spdy.Decoder()
    decoder.feed(struct.pack(">HHI", 0x8003, 2, 8) + b"\x00\x00\x00\x01garb")
    with pytest.raises(spdy.SessionError):
        decoder.next_frame()


def test_bad_header_content_leaves_the_context_in_step():
    encoder, decoder = spdy.Encoder(), spdy.Decoder()
    z = encoder._headers._z  # forge a block with an uppercase name in the shared context
    forged = z.compress(b"\x00\x00\x00\x01\x00\x00\x00\x01A\x00\x00\x00\x00") + z.flush(zlib.Z_SYNC_FLUSH)
    decoder.feed(struct.pack(">HHI", 0x8003, 2, 4 + len(forged)) + b"\x00\x00\x00\x07" + forged)
    decoder.feed(encoder.encode(spdy.Headers(9, (("ok", "1"),))))
    with pytest.raises(spdy.StreamError) as err:
        decoder.next_frame()
    assert err.value.stream_id == 7
    assert list(decoder) == [spdy.Headers(9, (("ok", "1"),))]


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        ("80020006 00000004 00000001", spdy.SessionError),  # SPDY/2
        ("80030006 00000005 00000001 00", spdy.SessionError),  # PING of 5 bytes
        ("80030003 00000008 00000001 00000000", spdy.StreamError),  # RST status 0
        ("80030009 00000008 00000001 00000000", spdy.StreamError),  # window delta 0
        ("80030009 00000008 00000000 00000000", spdy.SessionError),  # session delta 0
        ("80030004 00000008 00000002 00000000", spdy.SessionError),  # SETTINGS count vs length
        ("80030002 00000002 0000", spdy.SessionError),  # SYN_REPLY too short
        ("00000000 00000000", spdy.SessionError),  # data on stream 0
    ],
)
def test_malformed_frames(wire: str, error: type[Exception]):
    decoder = spdy.Decoder()
    decoder.feed(bytes.fromhex(wire.replace(" ", "")))
    with pytest.raises(error):
        decoder.next_frame()


def test_stream_id_zero_in_header_frame_is_a_session_error():
    encoder = spdy.Encoder()
    good = encoder.encode(spdy.SynReply(1, (("a", "b"),)))
    decoder = spdy.Decoder()
    decoder.feed(good[:8] + b"\x00\x00\x00\x00" + good[12:])
    with pytest.raises(spdy.SessionError):
        decoder.next_frame()


def test_decoder_compacts_its_buffer():
    encoder, decoder = spdy.Encoder(), spdy.Decoder()
    frame = encoder.encode(spdy.Data(1, b"y" * 1000))
    for _ in range(300):
        decoder.feed(frame)
        assert list(decoder) == [spdy.Data(1, b"y" * 1000)]
    assert len(decoder._buf) < 70_000


# -- flow control --------------------------------------------------------------


def test_send_windows_follow_updates_and_settings():
    flow = spdy.FlowControl()
    flow.open(1)
    flow.open(3)
    assert flow.send_window(1) == 65536
    flow.sent(1, 65536)
    assert flow.send_window(1) == 0 and flow.send_window(3) == 0  # the session window is spent too
    with pytest.raises(ValueError):
        flow.sent(3, 1)
    flow.on_window_update(spdy.WindowUpdate(0, 100_000))
    assert flow.send_window(3) == 65536 and flow.send_window(1) == 0
    flow.on_window_update(spdy.WindowUpdate(1, 10))
    assert flow.send_window(1) == 10
    flow.on_settings(spdy.Settings((spdy.Setting(spdy.SettingId.INITIAL_WINDOW_SIZE, 1000),)))
    assert flow.send_window(1) == 0 and flow.send_window(3) == 1000  # stream 1 went negative
    flow.open(5)
    assert flow.send_window(5) == 1000
    assert flow.session_send == 100_000
    flow.on_window_update(spdy.WindowUpdate(99, 5))  # unknown stream: ignored


def test_window_overflow():
    flow = spdy.FlowControl()
    flow.open(1)
    with pytest.raises(spdy.StreamError) as err:
        flow.on_window_update(spdy.WindowUpdate(1, spdy.MAX_WINDOW))
    assert err.value.status == spdy.RstStatus.FLOW_CONTROL_ERROR
    with pytest.raises(spdy.SessionError):
        flow.on_window_update(spdy.WindowUpdate(0, spdy.MAX_WINDOW))


def test_receive_windows_and_updates():
    flow = spdy.FlowControl()
    flow.open(1)
    flow.received(1, 40_000)
    assert flow.consumed(1, 20_000) == []
    assert flow.consumed(1, 20_000) == [spdy.WindowUpdate(1, 40_000), spdy.WindowUpdate(0, 40_000)]
    flow.received(1, 65_536)
    with pytest.raises(spdy.StreamError):
        flow.received(1, 1)


def test_session_receive_window_is_shared():
    flow = spdy.FlowControl()
    for sid in (1, 3):
        flow.open(sid)
    flow.received(1, 40_000)
    with pytest.raises(spdy.SessionError):
        flow.received(3, 30_000)


def test_lenient_receive_tolerates_peers_that_ignore_windows():
    flow = spdy.FlowControl(enforce_receive=False)
    flow.open(1)
    flow.received(1, 1_000_000)
    assert flow.consumed(1, 1_000_000) == [spdy.WindowUpdate(1, 1_000_000), spdy.WindowUpdate(0, 1_000_000)]
