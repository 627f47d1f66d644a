"""The edge agent: audio blocks -> frames messages on MQTT at QoS 1.

One thread does the work: read audio, run the ONNX front end + VQ, pack with
``shared_models.wire``, publish. paho's network loop runs in its own thread.
Status is retained on ``.../status`` (online now, offline on a clean stop)
and an MQTT last will publishes offline if the agent dies.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from edge.encoder import EdgeEncoder, Encoded
from shared_models.constants import HOP_SAMPLES, NS_PER_SECOND, PATCH_SAMPLES, SAMPLE_RATE_HZ
from shared_models.wire import (
    FramesMessage,
    StatusMessage,
    frames_topic,
    status_topic,
    validate_name,
)
from soundfleet.config import EdgeConfig
from soundfleet.services import mqtt_client

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
CONNECT_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 30.0


@dataclass
class AgentStats:
    messages: int = 0
    frames: int = 0
    payload_bytes: int = 0
    audio_seconds: float = 0.0
    first_seq: int | None = None
    last_seq: int | None = None


class SeqStore:
    """Persists the next sequence number so a restarted agent never reuses one.

    The cloud drops a frame whose seq it has already seen, so reusing a seq
    after a restart would silently lose audio. Written atomically (rename).
    """

    def __init__(self, state_dir: Path, site: str, device: str):
        self.path = Path(state_dir) / f"{site}.{device}.seq"

    def load(self) -> int:
        try:
            return int(self.path.read_text().strip())
        except FileNotFoundError:
            return 0
        except ValueError:
            log.warning("corrupt sequence file %s: starting at 0", self.path)
            return 0

    def save(self, next_seq: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(next_seq))
        os.replace(tmp, self.path)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "soundfleet"


def message_chunks(blocks: Iterator[np.ndarray], samples_per_message: int) -> Iterator[np.ndarray]:
    """Re-cut audio blocks of any length into one chunk of ``samples_per_message`` per message.

    The last chunk is cut to whole patches and may be shorter; less than one patch is dropped.
    """
    buffer = np.zeros(0, dtype=np.float32)
    for block in blocks:
        buffer = np.concatenate([buffer, block])
        while len(buffer) >= samples_per_message:
            chunk, buffer = buffer[:samples_per_message], buffer[samples_per_message:]
            yield chunk
    tail = len(buffer) // PATCH_SAMPLES * PATCH_SAMPLES
    if tail:
        yield buffer[:tail]


def pack_frames(
    encoded: Encoded,
    codebook_id: int,
    seq: int,
    t_start_ns: int,
    *,
    include_loudness: bool = False,
    include_embeddings: bool = False,
) -> FramesMessage:
    """One chunk's encoder output as the message the agent publishes (codes-only by default)."""
    return FramesMessage(
        codebook_id=codebook_id,
        seq=seq,
        t_start_ns=t_start_ns,
        codes=encoded.codes,
        loudness_dbfs=encoded.loudness_dbfs if include_loudness else None,
        embeddings=encoded.embeddings if include_embeddings else None,
    )


class EdgeAgent:
    def __init__(self, config: EdgeConfig, encoder: EdgeEncoder | None = None, state_dir: Path | None = None):
        config.validate()
        validate_name(config.site)
        validate_name(config.device)
        self.config = config
        self.encoder = encoder or EdgeEncoder(config.bundle_dir or None)
        self.seq_store = SeqStore(state_dir or default_state_dir(), config.site, config.device)
        self.stats = AgentStats()
        self._connected = threading.Event()
        self._client = self._make_client()

    # --- MQTT --------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        client, self._endpoint = mqtt_client(self.config.broker_url, f"sf-edge-{self.config.site}-{self.config.device}")
        client.max_inflight_messages_set(64)
        client.will_set(self._status_topic, self._status("offline"), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        return client

    @property
    def _status_topic(self) -> str:
        return status_topic(self.config.site, self.config.device)

    def _status(self, state: str) -> bytes:
        return StatusMessage(
            state=state,
            agent_version=AGENT_VERSION,
            model_version=self.encoder.model_version,
            codebook_id=self.encoder.codebook_id,
            t_ns=time.time_ns(),
        ).to_bytes()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused connection: %s", reason_code)
            return
        log.info("connected to %s", self.config.broker_url)
        client.publish(self._status_topic, self._status("online"), qos=1, retain=True)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if reason_code != 0:
            log.warning("disconnected from broker (%s); paho reconnects with backoff", reason_code)

    def connect(self) -> None:
        self._client.connect_async(self._endpoint.host, self._endpoint.port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT_S):
            self._client.loop_stop()
            raise ConnectionError(f"cannot reach MQTT broker at {self.config.broker_url} within {CONNECT_TIMEOUT_S:.0f} s")

    def close(self) -> None:
        """Publish offline (retained) and disconnect cleanly, so the last will does not fire."""
        if self._connected.is_set():
            self._client.publish(self._status_topic, self._status("offline"), qos=1, retain=True).wait_for_publish(5)
        self._client.disconnect()
        self._client.loop_stop()

    # --- streaming ---------------------------------------------------------
    def run(self, blocks: Iterator[np.ndarray]) -> AgentStats:
        """Stream ``blocks`` of 16 kHz mono audio until they end; returns what was sent."""
        self.connect()
        try:
            self._stream(blocks)
            self._drain()
        finally:
            self.close()
        log.info(
            "sent %d messages, %d frames, %.1f s of audio, %d payload bytes",
            self.stats.messages, self.stats.frames, self.stats.audio_seconds, self.stats.payload_bytes,
        )
        return self.stats

    def _stream(self, blocks: Iterator[np.ndarray]) -> None:
        per_message = self.config.frames_per_message * HOP_SAMPLES
        t0_ns, t0_mono = time.time_ns(), time.monotonic()
        self.t0_ns = t0_ns  # capture time of the first sample; frame timestamps count from here
        sent_samples = 0
        self._pending: list[mqtt.MQTTMessageInfo] = []
        topic = frames_topic(self.config.site, self.config.device)
        seq = self.seq_store.load()
        for chunk in message_chunks(blocks, per_message):
            t_start_ns = t0_ns + sent_samples * NS_PER_SECOND // SAMPLE_RATE_HZ
            seq = self._publish(topic, seq, chunk, t_start_ns)
            sent_samples += len(chunk)
            if self.config.realtime and len(chunk) == per_message:
                # publish no earlier than the audio could have been captured (not after the tail)
                delay = t0_mono + sent_samples / SAMPLE_RATE_HZ - time.monotonic()
                if delay > 0:
                    time.sleep(delay)

    def _publish(self, topic: str, seq: int, chunk: np.ndarray, t_start_ns: int) -> int:
        encoded = self.encoder.encode(chunk.reshape(-1, PATCH_SAMPLES))  # (N, PATCH_SAMPLES)
        message = pack_frames(
            encoded,
            self.encoder.codebook_id,
            seq,
            t_start_ns,
            include_loudness=self.config.include_loudness,
        )
        payload = message.to_bytes()
        self._pending.append(self._client.publish(topic, payload, qos=1))
        self._pending = [p for p in self._pending if not p.is_published()]
        self.seq_store.save(seq + 1)
        s = self.stats
        s.first_seq = seq if s.first_seq is None else s.first_seq
        s.last_seq = seq
        s.messages += 1
        s.frames += message.frame_count
        s.payload_bytes += len(payload)
        s.audio_seconds += len(chunk) / SAMPLE_RATE_HZ
        return seq + 1

    def _drain(self) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        for info in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._wait(info, remaining):
                unsent = sum(not p.is_published() for p in self._pending)
                raise TimeoutError(f"{unsent} frames messages not acknowledged by the broker")

    @staticmethod
    def _wait(info: mqtt.MQTTMessageInfo, timeout_s: float) -> bool:
        try:
            info.wait_for_publish(timeout_s)
        except (ValueError, RuntimeError):  # paho: message queue full / not connected
            return False
        return info.is_published()
