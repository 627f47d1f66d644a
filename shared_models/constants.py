"""Audio and model constants shared by the edge and the cloud (numpy/stdlib only).

Every constant carries its unit in its name and is derived from the others
where it can be, so changing the sample rate or the patch length changes
everything downstream consistently (the whisper ``audio.py`` pattern).
"""

from __future__ import annotations

# --- audio -----------------------------------------------------------------
SAMPLE_RATE_HZ = 16_000
"""Every stage works on 16 kHz mono audio; the edge resamples anything else."""

PATCH_MS = 25
"""S3: the raw waveform is cut into 25 ms patches, one front-end frame each."""

PATCH_SAMPLES = SAMPLE_RATE_HZ * PATCH_MS // 1000  # 400 samples
HOP_SAMPLES = PATCH_SAMPLES
"""Patches do not overlap: one code per 25 ms."""

FRAMES_PER_SECOND = SAMPLE_RATE_HZ // HOP_SAMPLES  # 40 frames/s
NS_PER_SECOND = 1_000_000_000
FRAME_DURATION_NS = HOP_SAMPLES * NS_PER_SECOND // SAMPLE_RATE_HZ  # 25_000_000 ns

DEFAULT_FRAMES_PER_MESSAGE = FRAMES_PER_SECOND
"""The edge publishes one frames message per second of audio by default."""

SILENCE_DBFS = -100.0
"""Loudness floor: digital silence is reported as this level (dB relative to full scale)."""

# --- models ----------------------------------------------------------------
EMBEDDING_DIM = 64
"""S3: the learned front end ends in a 64-unit layer; S2 also uses 64-d embeddings."""

DEFAULT_CODEBOOK_SIZE = 256
"""K for k-means vector quantization (S2: too few codes average everything out)."""

# --- labels ----------------------------------------------------------------
EVENT_LABELS: tuple[str, ...] = (
    "siren",
    "smoke_alarm",
    "doorbell",
    "dog_bark",
    "glass_break",
    "knock",
    "car_horn",
    "baby_cry",
    "speech",
)
"""Foreground sound event classes of the built-in corpus, in classifier output order.

Backgrounds (noise, hum, rain, babble) are not events: they have no label.
"""

LABEL_INDEX: dict[str, int] = {name: i for i, name in enumerate(EVENT_LABELS)}
NUM_LABELS = len(EVENT_LABELS)


def label_index(name: str) -> int:
    """Index of ``name`` in :data:`EVENT_LABELS`, with a helpful error for unknown names."""
    try:
        return LABEL_INDEX[name]
    except KeyError:
        known = ", ".join(EVENT_LABELS)
        raise KeyError(f"unknown event label {name!r}; known labels: {known}") from None
