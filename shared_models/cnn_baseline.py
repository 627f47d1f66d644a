"""The S3 comparison's convolutional baseline: a CNN over a window's log-mel image.

Verma & Berger (2021) compare their Transformer with convolutional models of
at least its size. This one reads the same 1 s windows as the scene
classifier, as a log-mel image (time sub-frames x mel bins, from
``LogMelPatches``), averaged over ``time_pool`` sub-frames (4 = one column per
25 ms frame: the convolutions then cost 4x less, which is what makes the
baseline trainable on 2 CPU cores), through VGG-style blocks (two 3x3 convolutions, batch
norm, ReLU, 2x2 max pooling), then global mean + max pooling and one sigmoid
per label. ``width`` scales every block; ``widen_to`` picks the smallest width
whose parameter count reaches a target, so the report can show the CNN is at
least as large as the Transformer it is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class CnnConfig:
    n_mels: int = 32
    num_labels: int = 9
    width: int = 16  # channels of the first block; block b has width * 2**b
    n_blocks: int = 4
    time_pool: int = 4  # sub-frames averaged into one image column before the convolutions
    dropout: float = 0.2


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class LogMelCnn(nn.Module):
    def __init__(self, config: CnnConfig):
        super().__init__()
        self.config = config
        widths = [config.width * 2**b for b in range(config.n_blocks)]
        self.blocks = nn.Sequential(*(_block(c_in, c_out) for c_in, c_out in zip([1, *widths], widths, strict=False)))
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(2 * widths[-1], config.num_labels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, T, n_mels) log-mel -> logits (B, num_labels)."""
        x = F.avg_pool2d(image.unsqueeze(1), (self.config.time_pool, 1))  # (B, 1, T / time_pool, n_mels)
        x = self.blocks(x)  # (B, C, T / time_pool / 2**n, n_mels / 2**n)
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=-1)  # (B, 2C)
        return self.head(self.drop(pooled))


def parameter_count(config: CnnConfig) -> int:
    return sum(p.numel() for p in LogMelCnn(config).parameters())


def widen_to(config: CnnConfig, min_parameters: int, max_width: int = 256) -> CnnConfig:
    """The narrowest ``width`` (same depth) whose CNN has at least ``min_parameters``."""
    for width in range(1, max_width + 1):
        wider = replace(config, width=width)
        if parameter_count(wider) >= min_parameters:
            return wider
    raise ValueError(f"no width <= {max_width} reaches {min_parameters} parameters")
