"""S1 8-bit mu-law companding: audio in [-1, 1] <-> 256 classes.

Verma & Chafe (2021) model raw audio as a sequence of 8-bit mu-law codes, so
next-sample prediction is a 256-way classification. The companding itself is
torchaudio's (``mu_law_encoding`` / ``mu_law_decoding``, present in the pinned
torchaudio 2.11); this module only fixes the class count in one place and
clamps the input, because torchaudio does not and a sample slightly over full
scale would otherwise become class 256 or more.

Class ``c`` decodes to the level at ``y = 2c/255 - 1`` on the companded axis,
so silence (0.0) encodes to class 128 and decodes to about 8.5e-5.
"""

from __future__ import annotations

import torch

from shared_models.torch_pair import torchaudio_functional

AF = torchaudio_functional()  # torchaudio's functional API, once torch and torchaudio are one release

MU_LAW_CLASSES = 256
"""8-bit mu-law: mu = 255, one class per code."""

MU_LAW_SILENCE = MU_LAW_CLASSES // 2
"""The class that 0.0 encodes to; a neutral padding value for missing past samples."""


def encode(audio: torch.Tensor) -> torch.Tensor:
    """Float audio in [-1, 1] (any shape) -> int64 classes in [0, 255], same shape.

    Values outside [-1, 1] are clipped to full scale first.
    """
    if not audio.is_floating_point():
        raise TypeError(f"mu-law encode expects float audio in [-1, 1], got {audio.dtype}")
    return AF.mu_law_encoding(audio.clamp(-1.0, 1.0), MU_LAW_CLASSES)


def decode(codes: torch.Tensor) -> torch.Tensor:
    """Integer classes in [0, 255] (any shape) -> float32 audio in [-1, 1], same shape."""
    if codes.is_floating_point():
        raise TypeError(f"mu-law decode expects integer classes, got {codes.dtype}")
    return AF.mu_law_decoding(codes.to(torch.float32), MU_LAW_CLASSES)
