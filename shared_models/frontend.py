"""S3 learned front end: dense layers over raw 25 ms waveform patches.

Verma & Berger (2021) replace the mel filterbank with a learned dense front
end (2000 units, then 64) applied to each raw 25 ms patch. The edge runs this
model through ONNX, so it must stay a plain MLP: no torchaudio, no FFT.
The paper's width is ``hidden_dim=2000``; the edge default is lighter so that
the agent keeps >= 1000x real time per core.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared_models.constants import EMBEDDING_DIM, PATCH_SAMPLES

# Patches are divided by their RMS so the network sees shape, not level, and
# the level itself is given as one extra input (log10 RMS). The floor keeps
# digital silence from being blown up into unit-power noise.
RMS_FLOOR = 1e-3


@dataclass
class FrontEndConfig:
    patch_samples: int = PATCH_SAMPLES
    hidden_dim: int = 256  # the paper uses 2000; 256 keeps the edge fast
    embedding_dim: int = EMBEDDING_DIM


class LearnedFrontEnd(nn.Module):
    def __init__(self, config: FrontEndConfig):
        super().__init__()
        self.config = config
        # +1 input: the patch's log10 RMS level
        self.fc1 = nn.Linear(config.patch_samples + 1, config.hidden_dim)
        self.fc2 = nn.Linear(config.hidden_dim, config.embedding_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # patches: (N, P) float waveform in [-1, 1]
        rms = patches.pow(2).mean(dim=-1, keepdim=True).sqrt()  # (N, 1)
        shape = patches / (rms + RMS_FLOOR)  # (N, P)
        level = torch.log10(rms + 1e-5)  # (N, 1), about -5 (silence) .. 0 (full scale)
        h = F.relu(self.fc1(torch.cat([shape, level], dim=-1)))  # (N, H)
        return self.fc2(h)  # (N, D)


class FrameTaggingHead(nn.Module):
    """Training-only head: tags each frame from a short neighbourhood of embeddings.

    The front end is trained to make frame embeddings predictive of which
    events are sounding; the head (a temporal convolution) is thrown away and
    only the front end ships to the edge.
    """

    def __init__(self, embedding_dim: int, num_labels: int, kernel_frames: int = 9):
        super().__init__()
        self.conv = nn.Conv1d(embedding_dim, 128, kernel_frames, padding=kernel_frames // 2)
        self.out = nn.Conv1d(128, num_labels, 1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        # embeddings: (B, T, D) -> logits (B, T, L)
        x = embeddings.transpose(1, 2)  # (B, D, T)
        x = self.out(F.relu(self.conv(x)))  # (B, L, T)
        return x.transpose(1, 2)  # (B, T, L)
