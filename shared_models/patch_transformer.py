"""Window encoder for the S2 baselines: a Transformer over per-frame log-mel patches.

Verma & Smith (2020) compare the linear probe on the code LM's hidden states
with two models that see the same spectrogram patches directly:

- a fully supervised model, trained end to end on the labels;
- a contrastive (SimCLR-style) encoder, trained without labels on two
  augmented views of each window, then read by a linear probe.

Both use this encoder, sized like the code LM (same width, heads and depth),
so the comparison is about the training signal, not the capacity. It reads a
window of frames, each frame one log-mel patch (``LogMelPatches`` features of
a 25 ms patch), and returns one hidden state per frame; ``pooled`` averages
them into the window's representation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from shared_models.constants import FRAMES_PER_SECOND


@dataclass
class PatchTransformerConfig:
    feature_dim: int = 128  # LogMelPatches features per frame (4 sub-frames x 32 mels)
    window_frames: int = FRAMES_PER_SECOND
    d_model: int = 64  # as the code LM
    n_heads: int = 4
    n_layers: int = 2
    dropout: float = 0.1


class PatchTransformer(nn.Module):
    def __init__(self, config: PatchTransformerConfig):
        super().__init__()
        self.config = config
        self.inp = nn.Linear(config.feature_dim, config.d_model)
        self.pos_emb = nn.Parameter(torch.zeros(config.window_frames, config.d_model))
        layer = nn.TransformerEncoderLayer(
            config.d_model,
            config.n_heads,
            dim_feedforward=4 * config.d_model,
            dropout=config.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(config.d_model)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, W, feature_dim) -> hidden states (B, W, d_model)."""
        W = features.shape[1]
        x = self.inp(features) + self.pos_emb[:W]  # (B, W, C)
        return self.ln_f(self.encoder(x))  # (B, W, C)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """(B, W, feature_dim) -> the window's representation (B, d_model): mean over frames."""
        return self(features).mean(dim=1)


class SupervisedPatchClassifier(nn.Module):
    """The fully supervised baseline: the encoder plus a linear head, trained end to end."""

    def __init__(self, config: PatchTransformerConfig, num_classes: int):
        super().__init__()
        self.encoder = PatchTransformer(config)
        self.head = nn.Linear(config.d_model, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, W, feature_dim) -> logits (B, num_classes)."""
        return self.head(self.encoder.pooled(features))


class ContrastiveEncoder(nn.Module):
    """SimCLR: the encoder plus a projection head used only by the NT-Xent loss.

    The probe reads ``encoder.pooled`` (before the projection), as in SimCLR,
    where the layer before the projection generalises better.
    """

    def __init__(self, config: PatchTransformerConfig, projection_dim: int = 64):
        super().__init__()
        self.encoder = PatchTransformer(config)
        self.projection = nn.Sequential(
            nn.Linear(config.d_model, config.d_model),
            nn.ReLU(),
            nn.Linear(config.d_model, projection_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, W, feature_dim) -> projections (B, projection_dim), not normalised."""
        return self.projection(self.encoder.pooled(features))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy over 2B views.

    z1[i] and z2[i] are the two views of item i: each view must pick its
    partner out of the other 2B - 2 views of the batch.
    """
    B = z1.shape[0]
    z = nn.functional.normalize(torch.cat([z1, z2]), dim=-1)  # (2B, P)
    sim = z @ z.T / temperature  # (2B, 2B)
    sim.fill_diagonal_(float("-inf"))  # a view is not its own partner
    partner = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)  # (2B,)
    return nn.functional.cross_entropy(sim, partner)
