"""Every HTTP route against hostile input: a clear 4xx, never a 500 (issue 14, fuzzing).

The operations and their parameters come from the running app's own ``/openapi.json``, so a
route or parameter added later is fuzzed without touching this file. Query values and headers
come from a seeded list of hostile shapes (empty, huge, NUL, numbers past every width, NaN,
bad times and stream ids, path tricks, random text); ``POST /v1/classify`` gets random bytes,
WAV headers with impossible fields, truncated files and wrong or broken content types.
Seeded, so a failure names an input that reproduces it.
"""

from __future__ import annotations

import io
import random
import struct
import wave

import httpx
import numpy as np
import pytest

SEED = 1234
REQUESTS_PER_OPERATION = 60
CLASSIFY_BODIES = 120
# routes that answer 503 by design when a dependency is away: their 5xx is not a crash
DEPENDENCY_ROUTES = {"/readyz", "/healthz"}

HOSTILE_TEXT = [
    "", " ", "a" * 5000, "\x00", "%00", "\x7f", "🚨" * 50, "-1", "0", "1", "1e309", "-1e309", "9" * 400,
    "-" + "9" * 400, "NaN", "nan", "inf", "-inf", "1.5", "0x10", "true", "null", "[]", "{}", "{\"a\":",
    "../../etc/passwd", "%2e%2e%2f", "1767225606123-0", "1767225606123-99999999999999999999999",
    "99999999999999999999999-0", "-1-0", "$", "*", "2026-13-45T99:99:99Z", "0000-00-00T00:00:00Z",
    "2026-01-01T12:00:00+99:00", "9999999-01-01", "1970-01-01T00:00:00Z", "\n\r", "<script>", "'; DROP",
]


def _hostile_value(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return rng.choice(HOSTILE_TEXT)
    n = rng.choice([1, 3, 20, 300, 3000])
    return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0x2FFF)])) for _ in range(n))


def _operations(base_url: str) -> list[tuple[str, str, list[dict]]]:
    spec = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
    return [(path, method.upper(), op.get("parameters", []))
            for path, methods in spec["paths"].items() for method, op in methods.items()]


def _check(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, f"{what}: HTTP {response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        body = response.json()  # a problem document, not a stack trace
        assert isinstance(body, dict) and ("detail" in body or "title" in body), f"{what}: {body}"


def test_the_openapi_document_lists_the_routes_the_fuzzer_covers(cloud_app):
    paths = {path for path, _, _ in _operations(cloud_app.http_url)}
    assert {"/v1/events", "/v1/events/stream", "/v1/devices", "/v1/classify", "/metrics"} <= paths


@pytest.mark.slow
def test_hostile_query_parameters_and_headers_never_cause_a_server_error(cloud_app):
    rng = random.Random(SEED)
    base = cloud_app.http_url
    sent = 0
    with httpx.Client(timeout=30) as client:
        for path, method, parameters in _operations(base):
            if method != "GET" or path in DEPENDENCY_ROUTES:
                continue
            for _ in range(REQUESTS_PER_OPERATION):
                params = {p["name"]: _hostile_value(rng) for p in parameters
                          if p["in"] == "query" and rng.random() < 0.7}
                headers = {p["name"]: "".join(c for c in _hostile_value(rng) if 32 <= ord(c) < 127)
                           for p in parameters if p["in"] == "header" and rng.random() < 0.7}
                what = f"GET {path} params={params!r} headers={headers!r}"
                with client.stream("GET", f"{base}{path}", params=params, headers=headers) as response:
                    if response.status_code < 400:  # an event stream stays open: its status is the answer
                        continue
                    response.read()
                    _check(response, what)
                sent += 1
    assert sent > 0


def _wav(rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(rng.choice([1, 2]))
        w.setsampwidth(2)
        w.setframerate(rng.choice([8000, 16000, 44100]))
        w.writeframes((np.sin(np.arange(rng.choice([100, 16000, 40000])) / 7) * 3000).astype("<i2").tobytes())
    return buffer.getvalue()


def _broken_wav(rng: random.Random) -> bytes:
    """A WAV whose header lies: impossible channels, rates, widths, sizes, or a cut body."""
    data = bytearray(_wav(rng))
    field = rng.choice(["riff_size", "channels", "rate", "byte_rate", "align", "bits", "data_size", "cut", "fmt"])
    offsets = {"riff_size": (4, "<I"), "channels": (22, "<H"), "rate": (24, "<I"), "byte_rate": (28, "<I"),
               "align": (32, "<H"), "bits": (34, "<H"), "data_size": (40, "<I")}
    if field == "cut":
        return bytes(data[: rng.randrange(0, len(data))])
    if field == "fmt":
        data[12:16] = rng.choice([b"fmt\x00", b"JUNK", b"data"])
        return bytes(data)
    offset, fmt = offsets[field]
    top = 2 ** (8 * struct.calcsize(fmt)) - 1
    struct.pack_into(fmt, data, offset, rng.choice([0, 1, 3, 7, 255, 65535, top, rng.randrange(top)]) & top)
    return bytes(data)


@pytest.mark.slow
def test_hostile_uploads_to_classify_never_cause_a_server_error(cloud_app):
    rng = random.Random(SEED + 1)
    url = f"{cloud_app.http_url}/v1/classify"
    content_types = ["audio/wav", "audio/x-wav", "application/octet-stream", "text/plain", "", "audio/flac",
                     "multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=x",
                     'audio/wav; charset="unterminated', "*/*", "a" * 3000]
    with httpx.Client(timeout=60) as client:
        for k in range(CLASSIFY_BODIES):
            shape = rng.choice(["random", "broken_wav", "broken_wav", "multipart", "empty"])
            if shape == "random":
                body = rng.randbytes(rng.choice([1, 44, 1000, 65536]))
            elif shape == "broken_wav":
                body = _broken_wav(rng)
            elif shape == "multipart":
                boundary = "b" + str(k)
                part = _broken_wav(rng) if rng.random() < 0.8 else rng.randbytes(100)
                body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{rng.choice(['file', 'x', ''])}\"; "
                        f"filename=\"a.wav\"\r\n\r\n").encode() + part + (f"\r\n--{boundary}--\r\n".encode()
                                                                         if rng.random() < 0.7 else b"")
                content_type = f"multipart/form-data; boundary={boundary}"
            else:
                body = b""
            if shape != "multipart":
                content_type = rng.choice(content_types)
            params = {"site": _hostile_value(rng)} if rng.random() < 0.3 else {}
            response = client.post(url, content=body, headers={"content-type": content_type}, params=params)
            _check(response, f"POST /v1/classify #{k} ({shape}, {content_type!r}, {len(body)} bytes)")
