"""Procedural, deterministic sound event synthesis: the built-in labelled corpus's source.

numpy only (the edge's synthetic source imports it). Everything is drawn from
a ``np.random.Generator``, so a seed fixes the audio bit for bit. The code
lives in four modules, all re-exported here:

- :mod:`shared_models.synth_events`: one generator per event class
  (:data:`~shared_models.constants.EVENT_LABELS`) and :func:`generate_event`;
- :mod:`shared_models.synth_speech`: speech (espeak-ng if installed, else a
  formant synthesiser);
- :mod:`shared_models.synth_scene`: backgrounds, reverb and mixing into
  labelled :class:`Scene` s (:func:`random_scene`, :func:`scripted_scene`);
- :mod:`shared_models.synth_dsp`: the small FFT-based DSP helpers they share.

Example::

    scene = scripted_scene([("siren", 2.0)], duration_s=8.0, seed=1)
    scene.audio      # float32 mono at SAMPLE_RATE_HZ, peak <= 1
    scene.events     # [LabelledEvent(label='siren', onset_s=2.0, offset_s=...)]
"""

from __future__ import annotations

from shared_models.synth_events import (
    EVENT_GENERATORS,
    EVENT_PEAK,
    EXTRA_GENERATORS,
    T3_CYCLE_S,
    T4_CYCLE_S,
    generate_event,
    t3_gate,
    t4_gate,
)
from shared_models.synth_scene import (
    BACKGROUND_GENERATORS,
    BACKGROUNDS,
    LabelledEvent,
    Scene,
    active_rms,
    add_reverb,
    generate_background,
    random_scene,
    scripted_scene,
)
from shared_models.synth_speech import espeak_available, formant_speech

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_GENERATORS",
    "EVENT_GENERATORS",
    "EVENT_PEAK",
    "EXTRA_GENERATORS",
    "T3_CYCLE_S",
    "T4_CYCLE_S",
    "LabelledEvent",
    "Scene",
    "active_rms",
    "add_reverb",
    "espeak_available",
    "formant_speech",
    "generate_background",
    "generate_event",
    "random_scene",
    "scripted_scene",
    "t3_gate",
    "t4_gate",
]
