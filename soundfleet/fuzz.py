"""Mutation fuzzing of every wire decoder: hostile payloads must raise a named WireError.

A decoder reads bytes from the network; whatever they are, it either returns a message that
re-encodes cleanly or raises a :class:`~shared_models.wire.WireError` subclass. Anything else
(``RecursionError``, ``OverflowError``, ``ValueError`` from ``int()``, a message that cannot be
encoded again because it holds a lone surrogate) is a finding: it would escape into a paho
callback or a Redis write.

The inputs are seeded and deterministic. Each is a valid payload of the decoder's type
mutated once by one of: byte flips, cuts, splices, truncation, a hostile JSON token inserted
at a random place (deep nesting, a 5,000-digit integer, 1e999, NaN, a lone surrogate), or a
field of the decoded object replaced by a hostile value and the object re-serialised (which
gets past the JSON syntax to the field checks). Frames payloads get their CRC recomputed
half the time, so the mutations reach the checks after the checksum.

``soundfleet bench fuzz --json`` runs 100,000 inputs per decoder; the test suite a seeded few
thousand (tests/test_wire_fuzz.py)."""

from __future__ import annotations

import json
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared_models.wire import (
    CRC,
    CRC_BYTES,
    FramesMessage,
    ModelAnnouncement,
    SoundEvent,
    StatusMessage,
    WireError,
)

T0_EXAMPLE_NS = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z

# tokens a hostile publisher puts into JSON; each broke a decoder once or is a classic
HOSTILE_TOKENS: tuple[str, ...] = (
    "[" * 5000, '{"a":' * 3000, "9" * 5000, "-" + "9" * 400, "1e999", "-1e400", "1" + "0" * 400 + ".5",
    "NaN", "Infinity", "-Infinity", '"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"', "null", "true",
    "[]", "{}", '""', "0.0", "-0", "1e-400", '"' + "x" * 10_000 + '"',
)


def _hostile_values(rng: random.Random) -> Any:
    """A hostile Python value for one field, JSON-serialisable (json.dumps escapes surrogates)."""
    depth = rng.choice((2, 50, 500))
    nested: Any = 0
    for _ in range(depth):
        nested = [nested]
    return rng.choice((
        nested, {"x": nested}, 10 ** rng.choice((19, 20, 400)), -(10 ** rng.choice((1, 19, 400))),
        rng.choice((1.7e308, -1.7e308, 5e-324)), "\ud800", "x\udc00y", "", "a" * 70, True, None,
        rng.randrange(-(2**64), 2**64), rng.random() * 10 ** rng.randrange(0, 300),
    ))


def _json_seeds() -> dict[str, tuple[Callable[[bytes], Any], list[bytes]]]:
    status = StatusMessage(state="online", agent_version="0.2.0", model_version="sf1-a9143974",
                           codebook_id=2836674932, t_ns=T0_EXAMPLE_NS, uptime_s=3600.2, spool_depth=3,
                           cpu_percent=0.4, rss_mb=74.1)
    announcement = ModelAnnouncement(model_version="sf1-a9143974", codebook_id=2836674932, wire_version=1,
                                     sha256="ab" * 32, size=123_456, url="https://example.org/edge.tar",
                                     t_ns=T0_EXAMPLE_NS)
    event = SoundEvent(event_id="3f2a", site="home", device="kitchen", label="siren", score=0.91,
                       start_ns=T0_EXAMPLE_NS, end_ns=T0_EXAMPLE_NS + 2_000_000_000, model_version="sf1-x",
                       codebook_id=7, seq_first=10, seq_last=12)
    return {
        "StatusMessage": (StatusMessage.from_bytes, [status.to_bytes(), StatusMessage(state="offline").to_bytes()]),
        "ModelAnnouncement": (ModelAnnouncement.from_bytes, [announcement.to_bytes()]),
        "SoundEvent": (SoundEvent.from_bytes, [event.to_bytes()]),
    }


def _frames_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, 40)
    silent = np.zeros(40, bool)
    silent[5:12] = True
    return [
        FramesMessage(codebook_id=7, seq=1, t_start_ns=T0_EXAMPLE_NS, codes=codes).to_bytes(),
        FramesMessage(codebook_id=7, seq=2, t_start_ns=T0_EXAMPLE_NS, codes=codes,
                      loudness_dbfs=rng.uniform(-60, 0, 40), silent=silent).to_bytes(),
        FramesMessage(codebook_id=7, seq=3, t_start_ns=T0_EXAMPLE_NS, codes=codes[:4],
                      embeddings=rng.normal(size=(4, 8))).to_bytes(),
    ]


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rng.randrange(5)
    if op == 0:  # flip 1-4 bytes
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 1:  # cut a span
        i = rng.randrange(len(b))
        del b[i : i + rng.randint(1, 16)]
    elif op == 2:  # splice a span of the payload elsewhere into it
        i, j = rng.randrange(len(b)), rng.randrange(len(b))
        b[j:j] = b[i : i + rng.randint(1, 32)]
    elif op == 3:  # truncate
        del b[rng.randrange(len(b)) :]
    else:  # random bytes appended
        b += rng.randbytes(rng.randint(1, 64))
    return bytes(b)


def _mutate_json(rng: random.Random, data: bytes) -> bytes:
    op = rng.randrange(3)
    if op == 0:
        return _mutate_bytes(rng, data)
    if op == 1:  # a hostile token at a random place
        text = data.decode()
        i = rng.randrange(len(text) + 1)
        return (text[:i] + rng.choice(HOSTILE_TOKENS) + text[i:]).encode("utf-8", "surrogatepass")
    obj = json.loads(data)  # a field replaced (or added) with a hostile value, then re-serialised
    obj[rng.choice([*obj, "extra"])] = _hostile_values(rng)
    try:
        return json.dumps(obj).encode()
    except (ValueError, RecursionError):  # the serialiser itself refused it (e.g. too deep)
        return data


def _mutate_frames(rng: random.Random, data: bytes) -> bytes:
    mutated = _mutate_bytes(rng, data)
    if rng.random() < 0.5 and len(mutated) > CRC_BYTES:  # a valid CRC: the checks after it run
        body = mutated[:-CRC_BYTES]
        mutated = body + CRC.pack(zlib.crc32(body))
    return mutated


def _check_json(decode: Callable[[bytes], Any], payload: bytes) -> None:
    message = decode(payload)
    again = type(message).from_bytes(message.to_bytes())  # accepted means it encodes again
    if again != message:
        raise AssertionError(f"{type(message).__name__} does not round-trip")


def _check_frames(payload: bytes) -> None:
    message = FramesMessage.from_bytes(payload)
    if FramesMessage.from_bytes(message.to_bytes()) != message:
        raise AssertionError("FramesMessage does not round-trip")


@dataclass
class DecoderReport:
    decoder: str
    inputs: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # named WireError subclass -> count
    findings: Counter = field(default_factory=Counter)  # anything else: exception type -> count
    examples: dict[str, str] = field(default_factory=dict)  # first payload (repr, cut) per finding
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"decoder": self.decoder, "inputs": self.inputs, "accepted": self.accepted,
                "rejected": dict(self.rejected.most_common()), "findings": dict(self.findings),
                "examples": self.examples, "seconds": round(self.seconds, 2),
                "inputs_per_s": round(self.inputs / self.seconds) if self.seconds else None}


def targets() -> Iterator[tuple[str, Callable[[bytes], None], list[bytes], Callable]]:
    """(name, check one payload, valid seed payloads, mutator) for every decoder."""
    for name, (decode, seeds) in _json_seeds().items():
        yield name, (lambda payload, d=decode: _check_json(d, payload)), seeds, _mutate_json
    yield "FramesMessage", _check_frames, _frames_seeds(), _mutate_frames


def fuzz(inputs: int, seed: int = 0, progress: Callable[[str, int], None] | None = None) -> list[DecoderReport]:
    """``inputs`` mutated payloads per decoder; a report per decoder (findings empty = pass)."""
    reports = []
    for name, check, seeds, mutate in targets():
        rng = random.Random(f"{seed}:{name}")
        report = DecoderReport(name)
        started = time.perf_counter()
        for i in range(inputs):
            payload = mutate(rng, rng.choice(seeds))
            report.inputs += 1
            try:
                check(payload)
                report.accepted += 1
            except WireError as exc:
                report.rejected[type(exc).__name__] += 1
            except Exception as exc:  # noqa: BLE001 - every other exception is what we look for
                kind = type(exc).__name__
                report.findings[kind] += 1
                report.examples.setdefault(kind, repr(payload[:200]))
            if progress is not None and (i + 1) % 10_000 == 0:
                progress(name, i + 1)
        report.seconds = time.perf_counter() - started
        reports.append(report)
    return reports
