"""The cloud's HTTP API on real components: Serve app, Mosquitto, Redis, a real edge agent.

Live events arrive over server-sent events while an edge agent streams a WAV;
an uploaded WAV is classified by the app's own model deployments; /metrics is
parsed as Prometheus text after real traffic, including a malformed payload
published with a real MQTT client. The pure helpers behind the routes (time
parsing, multipart, windows, exposition) are checked directly first.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
from prometheus_client.parser import text_string_to_metric_families

from cloud import exposition
from cloud.classify import MAX_UPLOAD_BYTES, ClipError, clip_windows, multipart_part
from cloud.schemas import STREAM_ID_RE, parse_stream_start, parse_time_ns
from edge.agent import EdgeAgent
from edge.resample import resample
from edge.sources import file_source
from shared_models import bundle, wire
from shared_models.constants import HOP_SAMPLES
from soundfleet.config import EdgeConfig

FIXTURES = Path(__file__).parent / "fixtures"
SITE = "httptest"
SIREN_START_S, SIREN_END_S = 2.0, 5.822  # tests/fixtures/README.md
ROUTES = ["/healthz", "/readyz", "/v1/devices", "/v1/events", "/v1/events/stream", "/v1/classify", "/metrics"]


# --- helpers ----------------------------------------------------------------------------------------
def _stream_wav(mqtt_url: str, device: str, wav: Path, state_dir: Path) -> EdgeAgent:
    config = EdgeConfig(broker_url=mqtt_url, site=SITE, device=device, realtime=False)
    agent = EdgeAgent(config, state_dir=state_dir / device)
    agent.run(file_source(str(wav), config.frames_per_message * HOP_SAMPLES))
    return agent


class SSE:
    """Parses a text/event-stream response in a task: each message (fields) or comment, in order."""

    def __init__(self, response: httpx.Response):
        self.response = response
        self.queue: asyncio.Queue[dict] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        fields: dict[str, str] = {}
        async for line in self.response.aiter_lines():
            if not line:
                if fields:
                    await self.queue.put(fields)
                fields = {}
            elif line.startswith(":"):
                await self.queue.put({"comment": line[1:].strip()})
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                fields[name] = f"{fields[name]}\n{value}" if name in fields else value

    async def next(self, timeout_s: float) -> dict:
        return await asyncio.wait_for(self.queue.get(), timeout_s)

    async def event(self, timeout_s: float, where=lambda message: True) -> dict:
        """The next sound_event message that ``where`` accepts, skipping others and comments."""
        deadline = time.monotonic() + timeout_s
        while True:
            message = await self.next(max(0.01, deadline - time.monotonic()))
            if "event" in message and where(message):
                return message

    def pending(self) -> list[dict]:
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out


def _sse_clients(cloud_app) -> int:
    name = "soundfleet-sse:" + cloud_app.config.key_prefix
    return sum(1 for c in cloud_app.store.r.client_list() if c.get("name") == name)


async def _wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


def _metrics(cloud_app) -> dict[str, dict[tuple, float]]:
    """/metrics parsed by prometheus_client: sample name -> {sorted label items: value}."""
    response = httpx.get(f"{cloud_app.http_url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _wav_bytes(audio: np.ndarray, rate_hz: int, tmp_path: Path, subtype: str = "PCM_16") -> bytes:
    path = tmp_path / f"clip-{uuid.uuid4().hex[:6]}.wav"
    soundfile.write(str(path), audio, rate_hz, subtype=subtype)
    return path.read_bytes()


# --- the pure helpers -------------------------------------------------------------------------------
def test_since_accepts_iso8601_and_unix_ns_and_names_the_parameter_when_wrong():
    assert parse_time_ns("1767225600000000123") == 1767225600000000123
    assert parse_time_ns("2026-01-01T00:00:00Z") == 1767225600 * 10**9
    assert parse_time_ns("2026-01-01T01:00:00.250+01:00") == 1767225600 * 10**9 + 250_000_000
    assert parse_time_ns("2026-01-01T00:00:00") == 1767225600 * 10**9  # no zone: UTC
    with pytest.raises(ValueError, match="since='yesterday'"):
        parse_time_ns("yesterday")
    assert parse_stream_start("1767225606123-7") == "1767225606123-7"
    # a time resumes just before the first entry id of that millisecond
    assert parse_stream_start("2026-01-01T00:00:00Z") == f"{1767225600000 - 1}-{2**64 - 1}"


def test_multipart_part_is_byte_exact_for_binary_content():
    payload = bytes(range(256)) * 10 + b"\r\n--not-the-boundary\r\n"
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\n" + payload + b"\r\n--XyZ--\r\n")
    assert multipart_part("multipart/form-data; boundary=XyZ", body, "file") == payload
    with pytest.raises(ClipError, match="part named 'audio'") as missing:
        multipart_part("multipart/form-data; boundary=XyZ", body, "audio")
    assert missing.value.status_code == 400


def test_clip_windows_are_the_contexts_the_ingest_would_hold():
    codes = np.arange(250, dtype=np.uint16)  # 6.25 s of frames: six 1 s steps and a 10-frame tail
    windows = clip_windows(codes, window_frames=40, context_frames=160)
    assert [w.step for w in windows] == [0, 1, 2, 3, 4, 5, 6]
    assert [w.end_frame for w in windows] == [40, 80, 120, 160, 200, 240, 250]
    assert [len(w.context) for w in windows] == [40, 80, 120, 160, 160, 160, 160]
    assert windows[-1].context[0] == 90 and list(windows[-1].codes) == list(range(210, 250))
    assert windows[1].end_ns == 2_000_000_000


def test_histogram_exposition_is_cumulative_and_ends_with_count():
    counts = {"1": 3.0, "4": 2.0, "+Inf": 1.0, "sum": 57.0, "count": 99.0}
    lines = exposition.histogram_lines("x", {"model": "m"}, (1, 2, 4), counts)
    assert lines == ['x_bucket{model="m",le="1"} 3', 'x_bucket{model="m",le="2"} 3',
                     'x_bucket{model="m",le="4"} 5', 'x_bucket{model="m",le="+Inf"} 6',
                     'x_sum{model="m"} 57', 'x_count{model="m"} 6']
    text = exposition.render({"received": 5, 'rejected:Bad"Name': 2, "received_by:r1": 5, "new_thing": 1},
                             None, {})
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["soundfleet_received"].samples[0].value == 5
    assert families["soundfleet_accepted"].samples[0].value == 0  # known counters exist from the start
    assert families["soundfleet_rejected"].samples[0].labels == {"reason": 'Bad"Name'}
    assert families["soundfleet_received_by"].samples[0].labels == {"replica": "r1"}
    assert families["soundfleet_new_thing"].samples[0].value == 1
    assert families["soundfleet_ingest_up"].samples[0].value == 0


# --- health, readiness, OpenAPI -----------------------------------------------------------------------
def test_readyz_is_200_when_mqtt_redis_and_both_models_answer(cloud_app):
    response = httpx.get(f"{cloud_app.http_url}/readyz", timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready" and body["reason"] == ""
    assert body["checks"] == {"mqtt": True, "ingest": True, "redis": True, "devices": True, "code_lm": True,
                              "classifier": True}
    # ready, but it says so when the session's Redis would lose the devices' state on a restart
    # (the machine's Redis runs with --save "" --appendonly no)
    from cloud.store import persistence_warning

    persistence = cloud_app.store.persistence()
    redis_warnings = [w for w in body["warnings"] if not w.startswith("ingest lag")]  # other tests' replays may lag
    assert redis_warnings == ([persistence_warning(persistence)] if persistence in ("none", "rdb") else [])


def test_openapi_lists_every_route_with_a_summary_and_documented_parameters(cloud_app):
    spec = httpx.get(f"{cloud_app.http_url}/openapi.json", timeout=10).json()
    assert sorted(spec["paths"]) == sorted(ROUTES)
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary"), f"{method.upper()} {path} has no summary"
            for parameter in operation.get("parameters", []):
                assert parameter.get("description"), f"{path}: {parameter['name']} undocumented"
    params = {p["name"] for p in spec["paths"]["/v1/events"]["get"]["parameters"]}
    assert params == {"site", "device", "label", "since", "since_ns", "limit"}
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "audio/wav"} <= set(body)
    assert "text/event-stream" in spec["paths"]["/v1/events/stream"]["get"]["responses"]["200"]["content"]


def test_events_since_accepts_iso8601_and_rejects_nonsense(cloud_app):
    url = f"{cloud_app.http_url}/v1/events"
    assert httpx.get(url, params={"since": "2999-01-01T00:00:00Z"}, timeout=10).json() == []
    bad = httpx.get(url, params={"since": "yesterday"}, timeout=10)
    assert bad.status_code == 422 and "ISO 8601" in bad.json()["detail"]


# --- server-sent events ------------------------------------------------------------------------------
@pytest.mark.slow
async def test_event_stream_delivers_a_live_siren_event_and_filters_other_devices(
        cloud_app, mqtt_url, tmp_path, device_id):
    device = device_id("sse")
    url = f"{cloud_app.http_url}/v1/events/stream"
    started = datetime.now(UTC).isoformat()
    timeout = httpx.Timeout(10.0, read=None)
    async with httpx.AsyncClient(timeout=timeout) as client:
        async with (client.stream("GET", url, params={"site": SITE, "device": device}) as mine,
                    client.stream("GET", url, params={"device": f"other-{uuid.uuid4().hex[:6]}"}) as theirs):
            assert mine.status_code == 200 and theirs.status_code == 200
            assert mine.headers["content-type"].startswith("text/event-stream")
            mine_sse, theirs_sse = SSE(mine), SSE(theirs)
            for stream in (mine_sse, theirs_sse):
                assert await stream.next(10) == {"comment": "connected"}
                assert (await stream.next(10)).get("retry") == "3000"
            assert _sse_clients(cloud_app) == 2  # one Redis connection per open stream

            agent = await asyncio.to_thread(_stream_wav, mqtt_url, device, FIXTURES / "siren_street.wav", tmp_path)
            message = await mine_sse.event(60, lambda m: json.loads(m["data"])["label"] == "siren")
            assert message["event"] == "sound_event" and STREAM_ID_RE.fullmatch(message["id"])
            event = wire.SoundEvent.from_dict(json.loads(message["data"]))  # a valid wire event
            assert (event.site, event.device, event.label) == (SITE, device, "siren")
            start_s, end_s = (event.start_ns - agent.t0_ns) / 1e9, (event.end_ns - agent.t0_ns) / 1e9
            assert start_s <= 4.0 and end_s >= 3.0, (start_s, end_s)
            # the SSE id is the Redis Stream entry holding that event
            [(entry_id, fields)] = cloud_app.store.r.xrange(cloud_app.store.key("events"), message["id"],
                                                           message["id"])
            assert json.loads(fields[b"json"])["event_id"] == event.event_id

            await asyncio.sleep(1.0)  # the other stream read the same entries by now
            assert not [m for m in theirs_sse.pending() if "event" in m]
            mine_sse.task.cancel()
            theirs_sse.task.cancel()
        # the client went away: each stream's Redis connection is closed
        await _wait_until(lambda: _sse_clients(cloud_app) == 0, 15, "the streams' Redis connections to close")

        # resume: after entry 0-0 (Last-Event-ID), and since the test's start (a time)
        for kwargs in ({"headers": {"Last-Event-ID": "0-0"}}, {"params": {"since": started}}):
            params = {"device": device, "label": "siren", **kwargs.pop("params", {})}
            async with client.stream("GET", url, params=params, **kwargs) as replay:
                replay_sse = SSE(replay)
                again = await replay_sse.event(10)
                assert (again["id"], json.loads(again["data"])["event_id"]) == (message["id"], event.event_id)
                replay_sse.task.cancel()


async def test_event_stream_sends_heartbeat_comments_and_refuses_a_bad_resume_id(cloud_app):
    url = f"{cloud_app.http_url}/v1/events/stream"
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
        async with client.stream("GET", url, params={"device": "nobody", "heartbeat_s": 1}) as response:
            stream = SSE(response)
            assert await stream.next(10) == {"comment": "connected"}
            comments = [await stream.next(5) for _ in range(2)]
            assert {"comment": "heartbeat"} in comments
            stream.task.cancel()
        bad = await client.get(url, headers={"Last-Event-ID": "latest"})
        assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["detail"]
        bad = await client.get(url, params={"since": "soon"})
        assert bad.status_code == 422


# --- classify ----------------------------------------------------------------------------------------
def _sirens(result: dict) -> list[dict]:
    return [e for e in result["events"] if e["label"] == "siren"]


@pytest.mark.slow
def test_classify_finds_the_siren_in_the_fixture_wav(cloud_app):
    wav = (FIXTURES / "siren_street.wav").read_bytes()
    response = httpx.post(f"{cloud_app.http_url}/v1/classify", files={"file": ("siren.wav", wav, "audio/wav")},
                          timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()
    manifest = bundle.load_manifest(bundle.default_bundle_dir())
    assert result["model_version"] == manifest["model_version"]
    assert result["duration_s"] == 8.0 and result["windows"] == 8
    [siren] = _sirens(result)
    # the fixture's siren sounds from 2.0 s to 5.8 s; times count from the clip's start (epoch 0)
    assert siren["start_s"] <= 4.0 and siren["end_s"] >= 3.0, siren
    assert siren["start_s"] < SIREN_END_S and siren["end_s"] > SIREN_START_S
    assert siren["start_ns"] == round(siren["start_s"] * 1e9) and siren["start"].startswith("1970-01-01T00:00:0")
    assert 0.5 <= siren["score"] <= 1.0 and (siren["site"], siren["device"]) == ("upload", "clip")
    wire.SoundEvent.from_dict(siren)
    # nothing is stored: an upload is not a device
    assert cloud_app.store.events(site="upload") == []


@pytest.mark.slow
def test_classify_converts_a_44k1_stereo_wav_sent_as_raw_body(cloud_app, tmp_path):
    audio, rate_hz = soundfile.read(str(FIXTURES / "siren_street.wav"), dtype="float32")
    audio_44k = resample(audio, rate_hz, 44_100)  # (N,)
    stereo = np.stack([audio_44k, audio_44k], axis=1)  # (N, 2)
    response = httpx.post(f"{cloud_app.http_url}/v1/classify", content=_wav_bytes(stereo, 44_100, tmp_path),
                          headers={"Content-Type": "audio/wav"}, params={"device": "stereo-test"}, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()
    assert abs(result["duration_s"] - 8.0) < 0.01
    [siren] = _sirens(result)
    assert siren["start_s"] <= 4.0 and siren["end_s"] >= 3.0 and siren["device"] == "stereo-test"


def test_classify_refuses_bad_uploads_with_a_clear_4xx(cloud_app, tmp_path):
    url = f"{cloud_app.http_url}/v1/classify"

    def post(content: bytes, content_type: str = "audio/wav") -> httpx.Response:
        return httpx.post(url, content=content, headers={"Content-Type": content_type}, timeout=60)

    cases = {
        "garbage": (post(b"definitely not a RIFF file " * 100), 415, "not a WAV"),
        "empty": (post(b""), 400, "empty"),
        "text": (post(b"hello", "text/plain"), 415, "Content-Type"),
        "no file part": (httpx.post(url, data={"note": "x"}, files={"other": ("a.wav", b"RIFF")}, timeout=60),
                         400, "part named 'file'"),
        "too short": (post(_wav_bytes(np.zeros(8000, np.float32), 16_000, tmp_path)), 422, "too short"),
        # 601 s at 1 kHz, 8-bit: small in bytes, too long in time
        "too long": (post(_wav_bytes(np.zeros(601_000, np.float32), 1_000, tmp_path, "PCM_U8")), 422, "too long"),
        "too large": (post(bytes(MAX_UPLOAD_BYTES + 1)), 413, "too large"),
    }
    for name, (response, status, words) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        assert words in response.json()["detail"], (name, response.text)


# --- metrics -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_metrics_counts_traffic_rejections_latency_and_batches(cloud_app, mqtt_url, mqtt_client_factory,
                                                               tmp_path, device_id):
    before = _metrics(cloud_app)
    device = device_id("metrics")
    codebook_id = bundle.load_manifest(bundle.default_bundle_dir())["codebook_id"]
    good = wire.FramesMessage(codebook_id=codebook_id, seq=0, t_start_ns=time.time_ns(),
                              codes=np.arange(40, dtype=np.uint16)).to_bytes()
    mqtt_client_factory().publish(wire.frames_topic(SITE, f"{device}-bad"), good[:20], qos=1).wait_for_publish(5)
    agent = _stream_wav(mqtt_url, device, FIXTURES / "quiet_room.wav", tmp_path)

    def counter(metrics, name: str, **labels) -> float:
        return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    truncated = {"reason": "Truncated"}
    deadline = time.monotonic() + 30
    while True:
        after = _metrics(cloud_app)
        accepted = counter(after, "soundfleet_accepted_total") - counter(before, "soundfleet_accepted_total")
        rejected = (counter(after, "soundfleet_rejected_total", **truncated)
                    - counter(before, "soundfleet_rejected_total", **truncated))
        if (accepted >= agent.stats.messages and rejected >= 1) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert accepted >= agent.stats.messages and rejected >= 1, (accepted, rejected)
    received = counter(after, "soundfleet_received_total") - counter(before, "soundfleet_received_total")
    assert received >= agent.stats.messages + 1

    # gauges of the ingest replica that answered (labelled with its id when it has one)
    def gauge(name: str) -> float:
        [value] = after[name].values()
        return value

    assert gauge("soundfleet_ingest_up") == 1 and gauge("soundfleet_ingest_mqtt_connected") == 1
    assert gauge("soundfleet_ingest_workers_alive") >= 1 and gauge("soundfleet_ingest_queued") >= 0

    def check_histogram(name: str, **labels) -> float:
        buckets = sorted(((float(dict(k)["le"]), v) for k, v in after[f"{name}_bucket"].items()
                          if all(dict(k).get(n) == v2 for n, v2 in labels.items())))
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{name} buckets not cumulative: {buckets}"
        assert buckets[-1][0] == float("inf")
        count = counter(after, f"{name}_count", **labels)
        assert buckets[-1][1] == count and tuple(sorted(labels.items())) in after[f"{name}_sum"]
        return count

    assert check_histogram("soundfleet_latency_ms") >= agent.stats.messages
    assert check_histogram("soundfleet_batch_size", model="code_lm") >= 1
    assert check_histogram("soundfleet_batch_size", model="classifier") >= 1
    assert check_histogram("soundfleet_ingest_round_messages") >= 1
    for stage in ("decode", "accept", "peek", "models", "commit", "round"):  # each round times its stages
        assert check_histogram("soundfleet_ingest_stage_ms", stage=stage) >= 1, stage
    # "round" (the whole round) is read last, so its sum can only be ahead of the models' part
    stage_sums = {s: after["soundfleet_ingest_stage_ms_sum"][(("stage", s),)] for s in ("models", "round")}
    assert 0 < stage_sums["models"] <= stage_sums["round"]
