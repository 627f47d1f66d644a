"""S1 baseline: WaveNet, next-sample prediction with dilated causal convolutions.

Verma & Chafe (2021) compare their sample-level Transformer against WaveNet
(van den Oord et al., 2016) at matched parameter counts. This is the classic
architecture: mu-law class embedding -> stacks of dilated causal convolutions
(dilations 1, 2, 4, ..., 2^(L-1), repeated ``n_stacks`` times), each with a
gated activation tanh * sigmoid, a residual connection to the next layer and a
skip connection to the output -> two 1x1 layers -> logits over 256 classes.

Logits at position t predict sample t+1 from samples <= t. Every convolution
is padded on the left only, so no output ever sees a later sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared_models.mulaw import MU_LAW_CLASSES


@dataclass
class WaveNetConfig:
    vocab_size: int = MU_LAW_CLASSES
    n_layers: int = 10  # per stack: dilations 1, 2, ..., 2^(n_layers-1)
    n_stacks: int = 2
    kernel_size: int = 2
    residual_channels: int = 32
    dilation_channels: int = 32  # width of the gated activation
    skip_channels: int = 64
    end_channels: int = 64  # width of the hidden 1x1 output layer


class ResidualLayer(nn.Module):
    """One dilated causal convolution with gate, residual and skip outputs."""

    def __init__(self, config: WaveNetConfig, dilation: int):
        super().__init__()
        # Left padding of (k-1)*d keeps the output length and makes the conv causal.
        self.left_pad = (config.kernel_size - 1) * dilation
        # One conv produces both halves of the gate (filter and gate) in a single pass.
        self.dilated = nn.Conv1d(
            config.residual_channels,
            2 * config.dilation_channels,
            config.kernel_size,
            dilation=dilation,
        )
        self.res = nn.Conv1d(config.dilation_channels, config.residual_channels, 1)
        self.skip = nn.Conv1d(config.dilation_channels, config.skip_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, R, T) -> (next layer's input (B, R, T), skip (B, S, T))."""
        h = self.dilated(F.pad(x, (self.left_pad, 0)))  # (B, 2D, T)
        filt, gate = h.chunk(2, dim=1)  # 2 x (B, D, T)
        z = torch.tanh(filt) * torch.sigmoid(gate)  # (B, D, T)
        return x + self.res(z), self.skip(z)


class WaveNet(nn.Module):
    def __init__(self, config: WaveNetConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.residual_channels)
        self.layers = nn.ModuleList(
            ResidualLayer(config, dilation=2**i)
            for _ in range(config.n_stacks)
            for i in range(config.n_layers)
        )
        self.out1 = nn.Conv1d(config.skip_channels, config.end_channels, 1)
        self.out2 = nn.Conv1d(config.end_channels, config.vocab_size, 1)

    @property
    def receptive_field(self) -> int:
        """Number of input samples (the current one included) each output depends on.

        Each layer reaches (k-1)*d samples further back, so
        1 + (k-1) * n_stacks * (1 + 2 + ... + 2^(L-1)) = 1 + (k-1) * n_stacks * (2^L - 1).
        """
        c = self.config
        return 1 + (c.kernel_size - 1) * c.n_stacks * (2**c.n_layers - 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 mu-law classes -> logits (B, T, V) for the next sample."""
        x = self.embed(tokens).transpose(1, 2)  # (B, T, R) -> (B, R, T)
        skip_sum = 0
        for layer in self.layers:
            x, skip = layer(x)  # (B, R, T), (B, S, T)
            skip_sum = skip_sum + skip
        h = self.out1(F.relu(skip_sum))  # (B, E, T)
        logits = self.out2(F.relu(h))  # (B, V, T)
        return logits.transpose(1, 2)  # (B, T, V)

    def next_sample_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of predicting tokens[:, t+1] from tokens[:, :t+1]."""
        logits = self(tokens[:, :-1])  # (B, T-1, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
