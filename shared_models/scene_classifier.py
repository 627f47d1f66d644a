"""Scene/event classifier over a window of frames (S3 style, multi-label).

Input per frame: the code Transformer's hidden state concatenated with the
codebook centroid of that frame's code (the cloud has the codebook, so it can
recover a quantized front-end embedding from a code without any audio).
A small bidirectional Transformer mixes the window, then mean and max pooling
feed one sigmoid per event label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from shared_models.constants import EMBEDDING_DIM, FRAMES_PER_SECOND, NUM_LABELS


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
        self.head = nn.Linear(2 * config.d_model, config.num_labels)

    def forward(self, lm_hidden: torch.Tensor, code_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, W, lm_dim), (B, W, emb_dim) -> logits (B, num_labels)."""
        W = lm_hidden.shape[1]
        x = self.inp(torch.cat([lm_hidden, code_embeddings], dim=-1))  # (B, W, C)
        x = self.encoder(x + self.pos_emb[:W])  # (B, W, C)
        pooled = torch.cat([x.mean(dim=1), x.amax(dim=1)], dim=-1)  # (B, 2C)
        return self.head(pooled)  # (B, L)
