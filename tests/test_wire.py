"""The wire contract (SPEC section 2, docs/WIRE.md): round trips, units, and a named error
for every way a payload can be wrong. Corruption must never decode silently."""

from __future__ import annotations

import contextlib
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared_models.constants import (
    DEFAULT_FRAMES_PER_MESSAGE,
    EMBEDDING_DIM,
    FRAME_DURATION_NS,
    HOP_SAMPLES,
    NS_PER_SECOND,
    SAMPLE_RATE_HZ,
    SILENCE_DBFS,
)
from shared_models.wire import (
    CRC_BYTES,
    FLAG_EMBEDDINGS,
    FLAG_LOUDNESS,
    FLAG_SILENCE,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    MAX_FRAMES_PER_MESSAGE,
    MAX_PAYLOAD_BYTES,
    MIN_PAYLOAD_BYTES,
    SILENT_CODE,
    WIRE_VERSION,
    BadMagic,
    ChecksumMismatch,
    FramesMessage,
    InvalidField,
    PayloadTooLarge,
    TrailingBytes,
    Truncated,
    UnsupportedVersion,
    WireError,
)

T0_NS = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z
U32_MAX = 2**32 - 1
slow_ok = settings(deadline=None)  # numpy work in a few examples can exceed the 200 ms default


# --- helpers -----------------------------------------------------------------------
def reseal(body: bytes) -> bytes:
    """Append a valid CRC32, so a crafted payload gets past the checksum to the check under test."""
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


def crafted(**header_overrides: int | bytes) -> bytes:
    """Header (defaults: one codes-only frame) + a body sized by the header, resealed."""
    fields = {
        "magic": MAGIC,
        "version": WIRE_VERSION,
        "flags": 0,
        "codebook_id": 1,
        "seq": 2,
        "t_start_ns": T0_NS,
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "hop_samples": HOP_SAMPLES,
        "frame_count": 1,
        "embedding_dim": 0,
    } | header_overrides  # in HEADER's field order
    n, dim, flags = fields["frame_count"], fields["embedding_dim"], fields["flags"]
    body_words = (
        n + (n if flags & FLAG_LOUDNESS else 0) + (n * dim if flags & FLAG_EMBEDDINGS else 0)
    )
    return reseal(HEADER.pack(*fields.values()) + bytes(2 * body_words))


def crc_is_valid(data: bytes) -> bool:
    return zlib.crc32(data[:-CRC_BYTES]) == int.from_bytes(data[-CRC_BYTES:], "little")


def expected_error_for_prefix(prefix: bytes) -> type[WireError]:
    """The exact error a strict prefix of a valid payload must raise.

    Shorter than header + crc: Truncated before anything else is read. Longer: magic and
    version are intact, so the CRC check fires, unless the last 4 bytes of the prefix happen
    to be the CRC of the rest (odds 2**-32); then the header's length check says Truncated.
    """
    if len(prefix) < MIN_PAYLOAD_BYTES:
        return Truncated
    return Truncated if crc_is_valid(prefix) else ChecksumMismatch


def expected_error_for_corrupt_byte(index: int) -> type[WireError]:
    """Any change to one byte: magic -> BadMagic, version -> UnsupportedVersion, else the CRC
    (CRC32 detects every error burst of up to 32 bits, so no single-byte change slips through)."""
    if index < 4:
        return BadMagic
    if index == 4:
        return UnsupportedVersion
    return ChecksumMismatch


@st.composite
def frames_messages(draw: st.DrawFn, max_frames: int = 48) -> FramesMessage:
    n = draw(st.integers(1, max_frames))
    float16s = st.floats(width=16, allow_nan=False, allow_infinity=False)
    loudness = draw(st.none() | hnp.arrays(np.float16, n, elements=st.floats(-120, 0, width=16)))
    dim = draw(st.sampled_from([1, 3, 8, EMBEDDING_DIM]))
    embeddings = draw(st.none() | hnp.arrays(np.float16, (n, dim), elements=float16s))
    return FramesMessage(
        codebook_id=draw(st.integers(0, U32_MAX)),
        seq=draw(st.integers(0, U32_MAX)),
        t_start_ns=draw(st.integers(0, 2**62)),
        codes=draw(hnp.arrays(np.uint16, n)),
        sample_rate_hz=draw(st.sampled_from([SAMPLE_RATE_HZ, 8000, 44_100, 48_000, 1, U32_MAX])),
        hop_samples=draw(st.sampled_from([HOP_SAMPLES, 1, 160, 441, 1024, 65_535])),
        loudness_dbfs=loudness,
        embeddings=embeddings,
    )


def example_message() -> FramesMessage:
    """A small message with every section present (codes, loudness, embeddings)."""
    return FramesMessage(
        codebook_id=0xDEADBEEF, seq=41, t_start_ns=T0_NS, codes=[0, 1, 65_535],
        loudness_dbfs=[SILENCE_DBFS, -20.5, 0.0], embeddings=np.linspace(-1, 1, 12).reshape(3, 4),
    )  # fmt: skip


# --- round trips and units -----------------------------------------------------------
@slow_ok
@given(frames_messages())
def test_frames_message_round_trips_through_bytes(msg: FramesMessage) -> None:
    data = msg.to_bytes()
    back = FramesMessage.from_bytes(data)
    assert back == msg
    assert back.to_bytes() == data
    assert back.codes.dtype == np.uint16 and back.codes.shape == (msg.frame_count,)
    assert (back.codebook_id, back.seq, back.t_start_ns) == (
        msg.codebook_id,
        msg.seq,
        msg.t_start_ns,
    )
    assert (back.sample_rate_hz, back.hop_samples) == (msg.sample_rate_hz, msg.hop_samples)
    assert back.t_end_ns == msg.t_end_ns
    has_loudness = msg.loudness_dbfs is not None
    words = msg.frame_count * (1 + has_loudness + msg.embedding_dim)
    assert len(data) == HEADER_BYTES + 2 * words + CRC_BYTES
    if has_loudness:
        assert back.loudness_dbfs.dtype == np.float16
        np.testing.assert_array_equal(back.loudness_dbfs, msg.loudness_dbfs)
    else:
        assert back.loudness_dbfs is None
    if msg.embeddings is not None:
        assert back.embeddings.shape == msg.embeddings.shape
        np.testing.assert_array_equal(back.embeddings, msg.embeddings)
    else:
        assert back.embeddings is None


def test_from_bytes_accepts_bytearray_and_memoryview() -> None:
    data = example_message().to_bytes()
    assert FramesMessage.from_bytes(bytearray(data)) == example_message()
    assert FramesMessage.from_bytes(memoryview(data)) == example_message()


def test_sections_are_laid_out_codes_then_loudness_then_row_major_embeddings() -> None:
    msg = example_message()
    data = msg.to_bytes()
    n, dim = 3, 4
    flags = data[5]
    assert flags == FLAG_LOUDNESS | FLAG_EMBEDDINGS
    offset = HEADER_BYTES
    codes = np.frombuffer(data, "<u2", n, offset)
    loudness = np.frombuffer(data, "<f2", n, offset + 2 * n)
    embeddings = np.frombuffer(data, "<f2", n * dim, offset + 4 * n).reshape(n, dim)
    np.testing.assert_array_equal(codes, [0, 1, 65_535])
    np.testing.assert_array_equal(loudness, np.float16([-100.0, -20.5, 0.0]))
    np.testing.assert_array_equal(
        embeddings, np.linspace(-1, 1, 12).reshape(3, 4).astype(np.float16)
    )
    assert offset + 2 * n * (2 + dim) + CRC_BYTES == len(data)


@given(n=st.integers(1, MAX_FRAMES_PER_MESSAGE), t_start_ns=st.integers(0, 2**62))
def test_default_frames_last_25_ms_each(n: int, t_start_ns: int) -> None:
    msg = FramesMessage(codebook_id=0, seq=0, t_start_ns=t_start_ns, codes=np.zeros(n, np.uint16))
    assert (msg.sample_rate_hz, msg.hop_samples) == (SAMPLE_RATE_HZ, HOP_SAMPLES)
    assert msg.frame_duration_ns == FRAME_DURATION_NS == 25_000_000
    assert msg.t_end_ns - msg.t_start_ns == n * 25_000_000
    times = msg.frame_times_ns()
    assert times.dtype == np.int64 and times.shape == (n,)
    assert times[0] == t_start_ns
    assert np.all(np.diff(times) == FRAME_DURATION_NS)
    back = FramesMessage.from_bytes(msg.to_bytes())
    assert back.t_end_ns - back.t_start_ns == n * 25_000_000


def test_one_default_message_is_one_second_of_audio() -> None:
    msg = FramesMessage(
        codebook_id=0, seq=0, t_start_ns=T0_NS, codes=np.zeros(DEFAULT_FRAMES_PER_MESSAGE, int)
    )
    assert msg.t_end_ns - msg.t_start_ns == NS_PER_SECOND


@given(
    n=st.integers(1, 500),
    sample_rate_hz=st.integers(1, 192_000),
    hop_samples=st.integers(1, 65_535),
)
def test_time_arithmetic_is_exact_integer_ns(n: int, sample_rate_hz: int, hop_samples: int) -> None:
    msg = FramesMessage(
        codebook_id=0, seq=0, t_start_ns=T0_NS, codes=np.zeros(n, np.uint16),
        sample_rate_hz=sample_rate_hz, hop_samples=hop_samples,
    )  # fmt: skip
    assert msg.t_end_ns == T0_NS + n * hop_samples * NS_PER_SECOND // sample_rate_hz
    expected = [T0_NS + i * hop_samples * NS_PER_SECOND // sample_rate_hz for i in range(n)]
    assert msg.frame_times_ns().tolist() == expected
    assert msg.frame_duration_ns == hop_samples * NS_PER_SECOND // sample_rate_hz


def test_codes_only_one_message_per_second_is_928_bits_per_second() -> None:
    """SPEC target: <= 1 kbit/s per stream upstream in codes-only mode (payload only)."""
    msg = FramesMessage(codebook_id=7, seq=0, t_start_ns=T0_NS, codes=np.arange(40))
    data = msg.to_bytes()
    assert len(data) == 32 + 80 + 4 == 116
    bits_per_second = len(data) * 8  # one message per second
    assert bits_per_second == 928
    assert bits_per_second <= 1000


def test_arrays_are_read_only_copies() -> None:
    codes = np.array([1, 2, 3], dtype=np.uint16)
    loudness = np.array([-1.0, -2.0, -3.0], dtype=np.float16)
    msg = FramesMessage(codebook_id=0, seq=0, t_start_ns=0, codes=codes, loudness_dbfs=loudness)
    codes[0], loudness[0] = 99, 0.0
    assert msg.codes[0] == 1 and msg.loudness_dbfs[0] == -1.0
    assert not msg.codes.flags.writeable and not msg.loudness_dbfs.flags.writeable
    with pytest.raises(ValueError):
        msg.codes[0] = 5


def test_values_are_normalised_to_wire_types() -> None:
    msg = FramesMessage(codebook_id=np.uint32(3), seq=np.int64(4), t_start_ns=5, codes=[1, 2])
    assert type(msg.codebook_id) is int and type(msg.seq) is int
    assert msg.codes.dtype == np.uint16
    rounded = FramesMessage(codebook_id=0, seq=0, t_start_ns=0, codes=[1], loudness_dbfs=[-20.123])
    assert rounded.loudness_dbfs.dtype == np.float16 and rounded.loudness_dbfs[0] == np.float16(
        -20.123
    )


# --- golden bytes --------------------------------------------------------------------
GOLDEN_MESSAGE = FramesMessage(
    codebook_id=0x01020304, seq=7, t_start_ns=T0_NS, codes=[1, 258, 65_535],
    loudness_dbfs=[-100.0, 0.0, -6.0],
)  # fmt: skip
GOLDEN_HEADER_HEX = (
    "53464331"  # magic b"SFC1"
    "01"  # version 1
    "01"  # flags: FLAG_LOUDNESS
    "04030201"  # codebook_id 0x01020304, u32 LE
    "07000000"  # seq 7
    "00002a36fe9c9717"  # t_start_ns 1_700_000_000_000_000_000, u64 LE
    "803e0000"  # sample_rate_hz 16000
    "9001"  # hop_samples 400
    "0300"  # frame_count 3
    "0000"  # embedding_dim 0
)
GOLDEN_BODY_HEX = "01000201ffff40d6000000c6"  # codes 1 258 65535; f16 -100 0 -6
GOLDEN_CRC_HEX = "fcb836a6"


def test_golden_bytes_pin_the_layout() -> None:
    assert int.from_bytes(bytes.fromhex("00002a36fe9c9717"), "little") == T0_NS
    data = GOLDEN_MESSAGE.to_bytes()
    assert data[:HEADER_BYTES].hex() == GOLDEN_HEADER_HEX
    assert data.hex() == GOLDEN_HEADER_HEX + GOLDEN_BODY_HEX + GOLDEN_CRC_HEX
    assert FramesMessage.from_bytes(bytes.fromhex(data.hex())) == GOLDEN_MESSAGE
    assert HEADER.format == "<4sBBIIQIHHH" and HEADER_BYTES == 32


GOLDEN_SILENCE_MESSAGE = FramesMessage(
    codebook_id=0x01020304, seq=8, t_start_ns=T0_NS, codes=[7, 0, 0, 300, 0, 9],
    loudness_dbfs=[-30.0, 0.0, 0.0, -12.0, 0.0, -6.0],
    silent=np.array([False, True, True, False, True, False]),
)  # fmt: skip
GOLDEN_SILENCE_HEX = (
    "534643310105040302010800000000002a36fe9c9717803e0000900106000000"  # header, flags 0x05, N 6
    "0200"  # n_runs 2
    "01000200"  # run: start_frame 1, length 2
    "04000100"  # run: start_frame 4, length 1
    "07002c010900"  # codes of the 3 sent frames (0, 3, 5): 7 300 9
    "80cf00ca00c6"  # their loudness, f16 -30 -12 -6
    "76bc930f"  # crc32
)


def test_golden_bytes_pin_the_silence_layout() -> None:
    data = GOLDEN_SILENCE_MESSAGE.to_bytes()
    assert data[5] == FLAG_LOUDNESS | FLAG_SILENCE
    assert data.hex() == GOLDEN_SILENCE_HEX and len(data) == 58
    back = FramesMessage.from_bytes(bytes.fromhex(GOLDEN_SILENCE_HEX))
    assert back == GOLDEN_SILENCE_MESSAGE
    assert back.codes.tolist() == [7, SILENT_CODE, SILENT_CODE, 300, SILENT_CODE, 9]
    floor = SILENCE_DBFS  # the in-memory loudness of a silent frame
    assert back.loudness_dbfs.tolist() == [-30.0, floor, floor, -12.0, floor, -6.0]


def test_golden_bytes_of_an_all_silent_second() -> None:
    msg = FramesMessage(
        codebook_id=0x01020304, seq=9, t_start_ns=T0_NS + NS_PER_SECOND,
        codes=np.zeros(DEFAULT_FRAMES_PER_MESSAGE, int),
        silent=np.ones(DEFAULT_FRAMES_PER_MESSAGE, bool),
    )  # fmt: skip
    expected = (
        "534643310104040302010900000000cac471fe9c9717803e0000900128000000"  # flags 0x04, N 40
        "0100"  # n_runs 1
        "00002800"  # run: start_frame 0, length 40
        "2ec9fbeb"  # crc32, no codes before it
    )
    assert msg.to_bytes().hex() == expected and len(msg.to_bytes()) == 42
    assert FramesMessage.from_bytes(bytes.fromhex(expected)) == msg


# --- every failure mode has its named error --------------------------------------------
def test_every_prefix_of_a_valid_payload_is_rejected_exactly() -> None:
    data = example_message().to_bytes()
    for cut in range(len(data)):
        prefix = data[:cut]
        with pytest.raises(expected_error_for_prefix(prefix)):
            FramesMessage.from_bytes(prefix)
    assert all(expected_error_for_prefix(data[:c]) is Truncated for c in range(MIN_PAYLOAD_BYTES))


@slow_ok
@given(msg=frames_messages(), data=st.data())
def test_random_truncation_is_rejected_exactly(msg: FramesMessage, data: st.DataObject) -> None:
    payload = msg.to_bytes()
    prefix = payload[: data.draw(st.integers(0, len(payload) - 1), label="cut")]
    with pytest.raises(expected_error_for_prefix(prefix)):
        FramesMessage.from_bytes(prefix)


@slow_ok
@given(msg=frames_messages(), data=st.data())
def test_short_body_with_valid_crc_is_truncated(msg: FramesMessage, data: st.DataObject) -> None:
    body = msg.to_bytes()[:-CRC_BYTES]
    cut = data.draw(st.integers(1, len(body) - HEADER_BYTES), label="bytes removed")
    with pytest.raises(Truncated):
        FramesMessage.from_bytes(reseal(body[:-cut]))


@slow_ok
@given(msg=frames_messages(), extra=st.binary(min_size=1, max_size=64))
def test_long_body_with_valid_crc_is_trailing_bytes(msg: FramesMessage, extra: bytes) -> None:
    body = msg.to_bytes()[:-CRC_BYTES]
    with pytest.raises(TrailingBytes):
        FramesMessage.from_bytes(reseal(body + extra))


@slow_ok
@given(msg=frames_messages(), extra=st.binary(min_size=1, max_size=64))
def test_bytes_appended_after_the_crc_are_rejected(msg: FramesMessage, extra: bytes) -> None:
    appended = msg.to_bytes() + extra
    # The CRC is read from the last 4 bytes, so this is a checksum failure, unless those bytes
    # happen to be a valid CRC of what precedes them; then the length check names it.
    expected = TrailingBytes if crc_is_valid(appended) else ChecksumMismatch
    with pytest.raises(expected):
        FramesMessage.from_bytes(appended)


def test_every_single_bit_flip_is_detected_with_its_named_error() -> None:
    data = example_message().to_bytes()
    for index in range(len(data)):
        for bit in range(8):
            corrupt = bytearray(data)
            corrupt[index] ^= 1 << bit
            with pytest.raises(expected_error_for_corrupt_byte(index)):
                FramesMessage.from_bytes(bytes(corrupt))


@slow_ok
@given(msg=frames_messages(), data=st.data())
def test_single_byte_corruption_never_decodes(msg: FramesMessage, data: st.DataObject) -> None:
    corrupt = bytearray(msg.to_bytes())
    index = data.draw(st.integers(0, len(corrupt) - 1), label="index")
    corrupt[index] ^= data.draw(st.integers(1, 255), label="xor mask")
    with pytest.raises(expected_error_for_corrupt_byte(index)):
        FramesMessage.from_bytes(bytes(corrupt))


def test_oversized_payload_is_rejected_before_anything_else() -> None:
    with pytest.raises(PayloadTooLarge):
        FramesMessage.from_bytes(b"\x00" * (MAX_PAYLOAD_BYTES + 1))
    data = example_message().to_bytes()
    assert FramesMessage.from_bytes(data, max_bytes=len(data)) == example_message()
    with pytest.raises(PayloadTooLarge):
        FramesMessage.from_bytes(data, max_bytes=len(data) - 1)


def test_a_message_too_large_to_send_fails_to_encode() -> None:
    n = MAX_FRAMES_PER_MESSAGE  # 4000 frames x 64 float16 dims = 512 KB > 256 KiB
    msg = FramesMessage(
        codebook_id=0,
        seq=0,
        t_start_ns=0,
        codes=np.zeros(n, int),
        embeddings=np.zeros((n, EMBEDDING_DIM)),
    )
    with pytest.raises(PayloadTooLarge):
        msg.to_bytes()
    biggest_codes_only = FramesMessage(codebook_id=0, seq=0, t_start_ns=0, codes=np.ones(n, int))
    assert FramesMessage.from_bytes(biggest_codes_only.to_bytes()) == biggest_codes_only


@given(version=st.integers(0, 255).filter(lambda v: v != WIRE_VERSION))
def test_unknown_version_is_named_even_with_a_valid_crc(version: int) -> None:
    for payload in (crafted(version=version), reseal(crafted(version=version) + b"v2 extras")):
        with pytest.raises(UnsupportedVersion) as info:
            FramesMessage.from_bytes(payload)
        assert f"version {version}" in str(info.value)
        assert f"supported: {WIRE_VERSION}" in str(info.value)


@given(magic=st.binary(min_size=4, max_size=4).filter(lambda m: m != MAGIC))
def test_wrong_magic_is_bad_magic_even_with_a_valid_crc(magic: bytes) -> None:
    with pytest.raises(BadMagic):
        FramesMessage.from_bytes(crafted(magic=magic))


@pytest.mark.parametrize(
    "overrides",
    [
        {"frame_count": 0},
        {"hop_samples": 0},
        {"sample_rate_hz": 0},
        {"flags": 0x08},
        {"flags": FLAG_SILENCE},  # the body's run count (its first 2 bytes) is 0
        {"flags": 0x80 | FLAG_LOUDNESS},
        {"flags": FLAG_EMBEDDINGS, "embedding_dim": 0},
        {"flags": 0, "embedding_dim": 4},
        {"t_start_ns": 2**63},
        {"frame_count": MAX_FRAMES_PER_MESSAGE + 1},
    ],
    ids=repr,
)
def test_invalid_header_fields_with_a_valid_crc_are_invalid_field(overrides: dict) -> None:
    with pytest.raises(InvalidField):
        FramesMessage.from_bytes(crafted(**overrides))


def test_non_finite_loudness_on_the_wire_is_invalid_field() -> None:
    header = HEADER.pack(MAGIC, WIRE_VERSION, FLAG_LOUDNESS, 0, 0, T0_NS, 16000, 400, 1, 0)
    nan16 = np.array([np.nan], dtype="<f2").tobytes()
    with pytest.raises(InvalidField):
        FramesMessage.from_bytes(reseal(header + b"\x01\x00" + nan16))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"codes": []},
        {"codes": [65_536]},
        {"codes": [-1]},
        {"codes": [[1, 2]]},
        {"codes": [1.5]},
        {"codes": [True]},
        {"codes": np.zeros(MAX_FRAMES_PER_MESSAGE + 1)},
        {"hop_samples": 0},
        {"hop_samples": 65_536},
        {"sample_rate_hz": 0},
        {"sample_rate_hz": 2**32},
        {"seq": -1},
        {"seq": 2**32},
        {"codebook_id": 2**32},
        {"codebook_id": True},
        {"t_start_ns": -1},
        {"t_start_ns": 2**63 - 1},  # t_end_ns would not fit in int64
        {"t_start_ns": 1.5e18},
        {"loudness_dbfs": [-1.0]},
        {"loudness_dbfs": [-1.0, float("inf")]},
        {"loudness_dbfs": [-1.0, 1e6]},  # overflows float16
        {"loudness_dbfs": ["a", "b"]},
        {"embeddings": [1.0, 2.0]},
        {"embeddings": np.zeros((3, 4))},
        {"embeddings": np.zeros((2, 0))},
        {"embeddings": [[0.0], [np.nan]]},
    ],
    ids=lambda kw: ",".join(f"{k}={str(v)[:20]}" for k, v in kw.items()),
)
def test_invalid_fields_are_rejected_at_construction(kwargs: dict) -> None:
    fields = {"codebook_id": 1, "seq": 2, "t_start_ns": T0_NS, "codes": [3, 4]} | kwargs
    with pytest.raises(InvalidField):
        FramesMessage(**fields)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_wire_errors(data: bytes) -> None:
    with contextlib.suppress(WireError):  # any other exception fails the test
        FramesMessage.from_bytes(data)


@given(st.binary(min_size=HEADER_BYTES - 5, max_size=200))
def test_resealed_random_bodies_decode_or_raise_only_wire_errors(rest: bytes) -> None:
    payload = reseal(MAGIC + bytes([WIRE_VERSION]) + rest)
    try:
        msg = FramesMessage.from_bytes(payload)
    except WireError:
        return
    assert msg.to_bytes() == payload  # anything that decodes re-encodes to the same bytes


def test_wire_errors_are_value_errors() -> None:
    for error in (BadMagic, UnsupportedVersion, Truncated, TrailingBytes, ChecksumMismatch,
                  PayloadTooLarge, InvalidField):  # fmt: skip
        assert issubclass(error, WireError) and issubclass(error, ValueError)
