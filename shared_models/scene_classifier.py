"""Scene/event classifier over a window of frames (S3 style, multi-label).

Input per frame: the code Transformer's hidden state concatenated with the
codebook centroid of that frame's code (the cloud has the codebook, so it can
recover a quantized front-end embedding from a code without any audio).
A small bidirectional Transformer mixes the window, then mean and max pooling
feed one sigmoid per event label.

``pooling`` picks what happens to the intermediate embeddings:
- "meanmax": nothing; the encoder runs as one block (the shipped bundle).
- "wavelet": S3's parameter-free multi-scale pooling (`WaveletPooling`) after
  every Transformer layer, i.e. before the next layer and before the final
  mean + max readout. It adds no parameters, so both variants share one
  state_dict layout and compare fairly in the ablation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from shared_models.constants import EMBEDDING_DIM, FRAMES_PER_SECOND, NUM_LABELS
from shared_models.wavelet_pooling import WaveletPooling


@dataclass
class SceneClassifierConfig:
    lm_dim: int = 64
    embedding_dim: int = EMBEDDING_DIM
    window_frames: int = FRAMES_PER_SECOND  # 1 s decision window
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 1
    num_labels: int = NUM_LABELS
    dropout: float = 0.2
    pooling: str = "meanmax"  # a key of INTERMEDIATE_POOLINGS
    pooling_scales: int | None = None  # "wavelet" only; None: enough to reach the whole window

    def __post_init__(self) -> None:
        intermediate_pooling_factory(self.pooling)  # fail at config time, not at model build


def _no_intermediate_pooling(config: SceneClassifierConfig) -> None:
    return None


def _wavelet_pooling(config: SceneClassifierConfig) -> nn.Module:
    return WaveletPooling(config.d_model, config.pooling_scales, window_frames=config.window_frames)


INTERMEDIATE_POOLINGS: dict[str, Callable[[SceneClassifierConfig], nn.Module | None]] = {
    "meanmax": _no_intermediate_pooling,
    "wavelet": _wavelet_pooling,
}
"""Pooling name -> factory of the parameter-free module applied after each layer (None: none)."""


def intermediate_pooling_factory(name: str) -> Callable[[SceneClassifierConfig], nn.Module | None]:
    try:
        return INTERMEDIATE_POOLINGS[name]
    except KeyError:
        known = ", ".join(sorted(INTERMEDIATE_POOLINGS))
        raise ValueError(f"unknown classifier pooling {name!r}; known: {known}") from None


class SceneClassifier(nn.Module):
    def __init__(self, config: SceneClassifierConfig):
        super().__init__()
        self.config = config
        self.inp = nn.Linear(config.lm_dim + config.embedding_dim, config.d_model)
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
        # no parameters and no buffers: the state_dict keys do not depend on `pooling`
        self.intermediate_pool = intermediate_pooling_factory(config.pooling)(config)
        self.head = nn.Linear(2 * config.d_model, config.num_labels)

    def forward(self, lm_hidden: torch.Tensor, code_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, W, lm_dim), (B, W, emb_dim) -> logits (B, num_labels)."""
        W = lm_hidden.shape[1]
        x = self.inp(torch.cat([lm_hidden, code_embeddings], dim=-1))  # (B, W, C)
        x = x + self.pos_emb[:W]  # (B, W, C)
        if self.intermediate_pool is None:
            x = self.encoder(x)  # (B, W, C)
        else:
            # run the layers ourselves to pool between them; same parameter names as above
            for layer in self.encoder.layers:
                x = self.intermediate_pool(layer(x))  # (B, W, C)
            if self.encoder.norm is not None:
                x = self.encoder.norm(x)
        pooled = torch.cat([x.mean(dim=1), x.amax(dim=1)], dim=-1)  # (B, 2C)
        return self.head(pooled)  # (B, L)


class ExtendedClassifier(nn.Module):
    """A bundle's classifier plus a user's own classes (``soundfleet train --base``): the base
    classifier's outputs, unchanged, then those of a small classifier of the new labels trained
    on the same inputs. ``config`` is the base's with every output counted."""

    def __init__(self, base: SceneClassifier, custom: SceneClassifier):
        super().__init__()
        if custom.config.window_frames != base.config.window_frames:
            raise ValueError("the custom classifier must read the base classifier's window")
        self.base, self.custom = base, custom
        self.config = dataclasses.replace(base.config, num_labels=base.config.num_labels + custom.config.num_labels)

    def forward(self, lm_hidden: torch.Tensor, code_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, W, lm_dim), (B, W, emb_dim) -> logits (B, base labels + custom labels)."""
        return torch.cat([self.base(lm_hidden, code_embeddings), self.custom(lm_hidden, code_embeddings)], dim=-1)
