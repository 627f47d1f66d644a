"""Silent frames on the wire (FLAG_SILENCE, docs/WIRE.md): frames below the edge's loudness
gate travel as compact runs, and the cloud gives them the bundle's own code for silence."""

from __future__ import annotations

import struct
import time
import uuid
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared_models import bundle, wire
from shared_models.constants import DEFAULT_FRAMES_PER_MESSAGE, SILENCE_DBFS
from shared_models.wire import (
    CRC_BYTES,
    FLAG_EMBEDDINGS,
    FLAG_LOUDNESS,
    FLAG_SILENCE,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    RUN,
    RUN_COUNT,
    SILENT_CODE,
    SILENT_EMBEDDING,
    SILENT_LOUDNESS_DBFS,
    WIRE_VERSION,
    ChecksumMismatch,
    FramesMessage,
    InvalidField,
    TrailingBytes,
    Truncated,
    WireError,
    silent_mask,
    silent_runs,
)

T0_NS = 1_700_000_000_000_000_000
N = DEFAULT_FRAMES_PER_MESSAGE  # 40 frames of 25 ms: one second
slow_ok = settings(deadline=None)


def mask_of(frame_count: int, *runs: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(frame_count, dtype=bool)
    for start, length in runs:
        mask[start : start + length] = True
    return mask


def message(silent: np.ndarray | None, **kwargs) -> FramesMessage:
    n = N if silent is None else silent.size
    fields = dict(codebook_id=0xA9143974, seq=5, t_start_ns=T0_NS, codes=np.arange(1, n + 1))
    return FramesMessage(**(fields | kwargs), silent=silent)


def reseal(body: bytes) -> bytes:
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


def silence_payload(
    runs: list[tuple[int, int]],
    codes: list[int],
    *,
    frame_count: int = 8,
    n_runs: int | None = None,
) -> bytes:
    """A hand-built FLAG_SILENCE payload with a valid CRC: header | runs | codes | crc."""
    header = HEADER.pack(
        MAGIC, WIRE_VERSION, FLAG_SILENCE, 1, 2, T0_NS, 16_000, 400, frame_count, 0
    )
    table = RUN_COUNT.pack(len(runs) if n_runs is None else n_runs)
    table += b"".join(RUN.pack(*run) for run in runs)
    return reseal(header + table + np.array(codes, "<u2").tobytes())


# --- round trips -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "runs",
    [[(0, 5)], [(17, 3)], [(35, 5)], [(0, 1), (20, 10), (39, 1)], [(0, 39)], [(1, 39)]],
    ids=str,
)
def test_runs_at_start_middle_and_end_round_trip(runs: list[tuple[int, int]]) -> None:
    silent = mask_of(N, *runs)
    msg = message(silent)
    data = msg.to_bytes()
    n_silent = int(silent.sum())
    assert data[5] == FLAG_SILENCE
    assert len(data) == HEADER_BYTES + 2 + 4 * len(runs) + 2 * (N - n_silent) + CRC_BYTES
    back = FramesMessage.from_bytes(data)
    assert back == msg and back.to_bytes() == data
    assert silent_runs(back.silent) == runs
    np.testing.assert_array_equal(back.silent, silent)
    np.testing.assert_array_equal(back.codes[~silent], np.arange(1, N + 1)[~silent])
    assert (back.codes[silent] == SILENT_CODE).all()
    assert back.frame_count == N and back.t_end_ns - back.t_start_ns == 1_000_000_000


def test_all_silent_one_second_message_is_42_bytes_instead_of_116() -> None:
    silent = np.ones(N, dtype=bool)
    data = message(silent).to_bytes()
    assert len(data) == 32 + 2 + 4 + 4 == 42
    assert len(message(None).to_bytes()) == 116
    assert data[HEADER_BYTES:-CRC_BYTES] == RUN_COUNT.pack(1) + RUN.pack(0, N)  # no codes at all
    back = FramesMessage.from_bytes(data)
    assert back.frame_count == N and back.silent.all() and (back.codes == SILENT_CODE).all()


@pytest.mark.parametrize("silent", [None, np.zeros(N, dtype=bool)], ids=["None", "all-False"])
def test_no_silence_encodes_byte_identical_to_a_message_without_the_field(silent) -> None:
    before = FramesMessage(
        codebook_id=0xA9143974, seq=5, t_start_ns=T0_NS, codes=np.arange(1, N + 1)
    )
    msg = message(silent)
    assert msg.silent is None  # an all-False mask is stored as None
    assert msg.to_bytes() == before.to_bytes()
    assert msg.to_bytes()[5] == 0  # no flags: codes only, 116 bytes
    assert FramesMessage.from_bytes(msg.to_bytes()).silent is None


def test_loudness_and_embeddings_skip_silent_frames_and_round_trip() -> None:
    silent = mask_of(6, (1, 2), (5, 1))
    sent = ~silent  # frames 0, 3, 4
    loudness = np.array([-20.0, -70.0, -71.0, -10.0, -12.5, -69.0])
    embeddings = np.arange(18, dtype=np.float32).reshape(6, 3) / 4
    msg = message(
        silent, codes=[10, 11, 12, 13, 14, 15], loudness_dbfs=loudness, embeddings=embeddings
    )
    data = msg.to_bytes()
    assert data[5] == FLAG_LOUDNESS | FLAG_EMBEDDINGS | FLAG_SILENCE
    at = HEADER_BYTES + 2 + 2 * 4  # two runs
    assert np.frombuffer(data, "<u2", 3, at).tolist() == [10, 13, 14]
    np.testing.assert_array_equal(
        np.frombuffer(data, "<f2", 3, at + 6), loudness[sent].astype(np.float16)
    )
    np.testing.assert_array_equal(
        np.frombuffer(data, "<f2", 9, at + 12).reshape(3, 3), embeddings[sent].astype(np.float16)
    )
    assert len(data) == at + 2 * 3 * (1 + 1 + 3) + CRC_BYTES

    back = FramesMessage.from_bytes(data)
    assert back == msg and back.to_bytes() == data
    assert back.loudness_dbfs.shape == (6,) and back.embeddings.shape == (6, 3)
    np.testing.assert_array_equal(back.loudness_dbfs[sent], loudness[sent].astype(np.float16))
    np.testing.assert_array_equal(back.embeddings[sent], embeddings[sent].astype(np.float16))
    assert SILENT_LOUDNESS_DBFS == SILENCE_DBFS  # the loudness floor: reads as quiet
    assert (back.loudness_dbfs[silent] == SILENT_LOUDNESS_DBFS).all()
    assert (back.embeddings[silent] == SILENT_EMBEDDING).all()


def test_values_at_silent_positions_are_replaced_by_the_fill_and_ignored_by_eq() -> None:
    silent = mask_of(4, (1, 2))
    a = message(silent, codes=[1, 2, 3, 4], loudness_dbfs=[-5.0, -60.0, -61.0, -6.0])
    b = message(silent, codes=[1, 9, 9, 4], loudness_dbfs=[-5.0, -80.0, -81.0, -6.0])
    assert a == b and a.to_bytes() == b.to_bytes()
    assert a.codes.tolist() == [1, SILENT_CODE, SILENT_CODE, 4]
    assert a.loudness_dbfs.tolist() == [-5.0, SILENCE_DBFS, SILENCE_DBFS, -6.0]
    assert a != message(
        mask_of(4, (1, 1)), codes=[1, 2, 3, 4], loudness_dbfs=[-5.0, 0, -61.0, -6.0]
    )
    assert not a.silent.flags.writeable


@st.composite
def silent_messages(draw: st.DrawFn) -> FramesMessage:
    n = draw(st.integers(1, 120))
    silent = draw(hnp.arrays(np.bool_, n))
    loudness = draw(st.none() | hnp.arrays(np.float16, n, elements=st.floats(-120, 0, width=16)))
    dim = draw(st.sampled_from([1, 4, 64]))
    floats = st.floats(width=16, allow_nan=False, allow_infinity=False)
    embeddings = draw(st.none() | hnp.arrays(np.float16, (n, dim), elements=floats))
    codes = draw(hnp.arrays(np.uint16, n, elements=st.integers(0, SILENT_CODE - 1)))
    return FramesMessage(
        codebook_id=draw(st.integers(0, 2**32 - 1)),
        seq=draw(st.integers(0, 2**32 - 1)),
        t_start_ns=T0_NS,
        codes=codes,
        loudness_dbfs=loudness,
        embeddings=embeddings,
        silent=silent,
    )


@slow_ok
@given(silent_messages())
def test_random_masks_round_trip(msg: FramesMessage) -> None:
    data = msg.to_bytes()
    back = FramesMessage.from_bytes(data)
    assert back == msg and back.to_bytes() == data
    silent = np.zeros(msg.frame_count, bool) if msg.silent is None else msg.silent
    np.testing.assert_array_equal(back.codes, msg.codes)
    np.testing.assert_array_equal(back.silent if back.silent is not None else silent, silent)
    n_sent = int((~silent).sum())
    words = n_sent * (1 + (msg.loudness_dbfs is not None) + msg.embedding_dim)
    table = 0 if msg.silent is None else 2 + 4 * len(silent_runs(silent))
    assert len(data) == HEADER_BYTES + table + 2 * words + CRC_BYTES


@given(hnp.arrays(np.bool_, st.integers(0, 300)))
def test_silent_runs_and_silent_mask_are_inverse(mask: np.ndarray) -> None:
    runs = silent_runs(mask)
    np.testing.assert_array_equal(silent_mask(runs, mask.size), mask)
    assert all(length >= 1 for _, length in runs)
    assert all(s1 > s0 + l0 for (s0, l0), (s1, _) in zip(runs, runs[1:], strict=False))  # merged


@slow_ok
@given(msg=silent_messages(), data=st.data())
def test_corrupt_or_cut_silence_payloads_never_decode(
    msg: FramesMessage, data: st.DataObject
) -> None:
    payload = msg.to_bytes()
    corrupt = bytearray(payload)
    index = data.draw(st.integers(5, len(corrupt) - 1), label="index")  # past magic and version
    corrupt[index] ^= data.draw(st.integers(1, 255), label="xor mask")
    with pytest.raises(ChecksumMismatch):
        FramesMessage.from_bytes(bytes(corrupt))
    cut = data.draw(st.integers(HEADER_BYTES, len(payload) - CRC_BYTES - 1), label="cut")
    with pytest.raises(Truncated):  # a short body with a valid CRC: the header promises more
        FramesMessage.from_bytes(reseal(payload[:cut]))


# --- every malformed variant has its named error ------------------------------------------
@pytest.mark.parametrize(
    ("runs", "codes", "n_runs", "error"),
    [
        ([(2, 3)], [1, 2, 3, 4, 5], None, None),  # the valid reference: frames 2-4 silent
        ([], [1] * 8, None, InvalidField),  # FLAG_SILENCE with 0 runs (not canonical)
        ([(2, 0)], [1] * 8, None, InvalidField),  # zero length
        ([(6, 3)], [1] * 5, None, InvalidField),  # past frame_count 8
        ([(8, 1)], [1] * 7, None, InvalidField),  # starts at frame_count
        ([(5, 2), (1, 2)], [1] * 4, None, InvalidField),  # unsorted
        ([(1, 4), (3, 2)], [1] * 3, None, InvalidField),  # overlapping
        ([(1, 2), (3, 2)], [1] * 4, None, InvalidField),  # adjacent: must be one run (1, 4)
        ([(1, 2), (1, 2)], [1] * 6, None, InvalidField),  # the same run twice
        ([(2, 3)], [1, 2, SILENT_CODE, 4, 5], None, InvalidField),  # a sent code of 0xFFFF
        ([(2, 3)], [1] * 8, None, TrailingBytes),  # codes sent for the silent frames too
        ([(2, 3)], [1] * 4, None, Truncated),  # one code short
        ([(2, 3)], [], 40, Truncated),  # the run count promises more runs than the payload has
    ],
    ids=lambda v: str(v) if not isinstance(v, type) else v.__name__,
)
def test_malformed_silence_sections_raise_their_named_error(runs, codes, n_runs, error) -> None:
    payload = silence_payload(runs, codes, n_runs=n_runs)
    if error is None:
        msg = FramesMessage.from_bytes(payload)
        assert msg.silent.tolist() == [False, False, True, True, True, False, False, False]
        assert msg.to_bytes() == payload
        return
    with pytest.raises(error):
        FramesMessage.from_bytes(payload)


def test_payload_ending_before_the_run_count_is_truncated() -> None:
    header = HEADER.pack(MAGIC, WIRE_VERSION, FLAG_SILENCE, 1, 2, T0_NS, 16_000, 400, 8, 0)
    for body in (b"", b"\x01"):
        with pytest.raises(Truncated):
            FramesMessage.from_bytes(reseal(header + body))
    with pytest.raises(Truncated):  # inside the run table
        FramesMessage.from_bytes(reseal(header + RUN_COUNT.pack(1) + b"\x00\x00"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"silent": np.zeros(3, dtype=bool)},  # wrong length
        {"silent": np.zeros((4, 1), dtype=bool)},  # wrong shape
        {"silent": [0, 1, 0, 0]},  # not bool
        {"silent": np.array([0.0, 1.0, 0.0, 0.0])},
        {"silent": np.array([True, False, False, False]), "codes": [0, SILENT_CODE, 2, 3]},
        {"silent": np.array([True, False, False, False]), "loudness_dbfs": [np.nan, 0, 0, 0]},
    ],
    ids=lambda kw: ",".join(f"{k}={str(v)[:24]}" for k, v in kw.items()),
)
def test_invalid_silent_fields_are_rejected_at_construction(kwargs: dict) -> None:
    fields = {"codebook_id": 1, "seq": 2, "t_start_ns": T0_NS, "codes": [0, 1, 2, 3]} | kwargs
    with pytest.raises(InvalidField):
        FramesMessage(**fields)


def test_silent_code_is_allowed_where_the_frame_is_silent() -> None:
    msg = message(np.array([True, False]), codes=[SILENT_CODE, 7])
    assert FramesMessage.from_bytes(msg.to_bytes()) == msg


@pytest.mark.parametrize(
    "runs",
    [[(0, 0)], [(-1, 2)], [(9, 1)], [(4, 5)], [(3, 2), (0, 1)], [(0, 3), (2, 2)], [(0, 3), (3, 1)]],
    ids=str,
)
def test_silent_mask_rejects_runs_silent_runs_never_produces(runs) -> None:
    with pytest.raises(InvalidField):
        silent_mask(runs, 8)


@pytest.mark.parametrize("mask", [[0, 1, 1], np.zeros((2, 2), bool), np.array(True)], ids=repr)
def test_silent_runs_wants_a_1d_bool_mask(mask) -> None:
    with pytest.raises(InvalidField):
        silent_runs(mask)


def test_silence_errors_are_wire_errors() -> None:
    with pytest.raises(WireError):
        FramesMessage.from_bytes(silence_payload([(0, 0)], [1] * 8))


# --- the bundle's code for silence --------------------------------------------------------
def test_silence_code_of_the_shipped_bundle_is_what_the_edge_encoder_gives_zeros() -> None:
    from edge.encoder import EdgeEncoder

    expected = int(EdgeEncoder().encode(np.zeros((1, 400), np.float32)).codes[0])
    code = bundle.silence_code(bundle.default_bundle_dir())
    assert code == expected
    assert 0 <= code < bundle.load_manifest(bundle.default_bundle_dir())["codebook_size"]
    assert bundle.silence_code(str(bundle.default_bundle_dir()) + "/.") == code  # same bundle


# --- the cloud: silent frames enter the device context as the silence code ------------------
SITE = "itest"


def test_context_codes_put_the_silence_code_at_silent_frames() -> None:
    from cloud.pipeline import context_codes

    silent = mask_of(N, (0, 3), (30, 10))
    codes = context_codes(message(silent), silence_code=42)
    assert codes.dtype == np.uint16 and codes.shape == (N,)
    assert (codes[silent] == 42).all()
    np.testing.assert_array_equal(codes[~silent], np.arange(1, N + 1)[~silent])
    np.testing.assert_array_equal(context_codes(message(None), 42), np.arange(1, N + 1))


def test_device_log_keeps_silence_code_in_the_queued_codes(
    redis_url, redis_prefix, redis_client
) -> None:
    from cloud.device_log import DeviceLog, WorkItem
    from cloud.pipeline import context_codes
    from cloud.store import CloudStore

    store = CloudStore(redis_url, redis_prefix)
    log = DeviceLog(store.r, store.key, events_maxlen=100, reorder_window_ms=0)  # seq 5 first: no wait
    silent = mask_of(N, (5, 10))
    msg = FramesMessage.from_bytes(message(silent).to_bytes())  # as the ingest sees it
    code = bundle.silence_code(bundle.default_bundle_dir())
    item = WorkItem(msg.seq, msg.t_end_ns, 0, context_codes(msg, code))
    assert log.accept(SITE, "dev", item, now_ms=0).released == 1
    lease = log.lease(SITE, "dev")
    (queued,), _, _ = log.peek(lease, 8)
    stored = queued.codes
    assert (stored[silent] == code).all() and SILENT_CODE not in stored
    np.testing.assert_array_equal(stored[~silent], np.arange(1, N + 1)[~silent])


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.mark.slow
def test_silent_runs_published_over_mqtt_reach_the_redis_context_as_the_silence_code(
    cloud_app, mqtt_client_factory
) -> None:
    device = f"gate-{uuid.uuid4().hex[:6]}"
    codebook_id = bundle.load_manifest(bundle.default_bundle_dir())["codebook_id"]
    code = bundle.silence_code(bundle.default_bundle_dir())
    masks = [mask_of(N, (0, 4), (20, 5), (39, 1)), np.ones(N, dtype=bool)]  # the 2nd: all silent
    real = np.arange(1, N + 1) + 100  # never the silence code
    assert code not in real
    client = mqtt_client_factory()
    topic = wire.frames_topic(SITE, device)
    for seq, silent in enumerate(masks):
        msg = FramesMessage(
            codebook_id=codebook_id,
            seq=seq,
            t_start_ns=T0_NS + seq * 10**9,
            codes=real,
            silent=silent,
        )
        client.publish(topic, msg.to_bytes(), qos=1).wait_for_publish(5)

    prefix = cloud_app.config.key_prefix
    _wait_for(  # processed_seq is written with the context, in the commit; last_seq already at accept
        lambda: cloud_app.store.r.hget(f"{prefix}dev:{SITE}:{device}", "processed_seq") == b"1",
        60,
        "both messages in the device context",
    )
    context = np.frombuffer(cloud_app.store.r.get(f"{prefix}ctx:{SITE}:{device}"), "<u2")
    expected = np.concatenate([np.where(m, code, real) for m in masks])  # (2N,)
    np.testing.assert_array_equal(context, expected)
    assert SILENT_CODE not in context
    letters = cloud_app.store.r.xrange(prefix + "deadletter")
    assert not [f for _, f in letters if f[b"topic"].decode() == topic]
