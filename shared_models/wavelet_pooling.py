"""Parameter-free wavelet-inspired multi-scale pooling of intermediate embeddings (S3).

Verma & Berger, "Audio Transformers: Transformer Architectures for Large Scale
Audio Understanding. Adieu Convolutions", 2021 (arXiv:2105.00335), pool the
intermediate embeddings of their Transformer stack the way a wavelet
decomposition looks at a signal at several resolutions: part of every frame's
embedding is kept at full time resolution, part is averaged over 2 frames,
part over 4, ..., and the last part over the whole sequence. Each layer then
sees fine detail and coarse context side by side, and the pooling adds no
parameters at all.

Conventions (written down once, here):

- Channels. The C channels are cut into ``num_scales`` contiguous groups as
  evenly as possible, in order; the first ``C % num_scales`` groups get one
  channel more (the ``numpy.array_split`` rule). Group 0 holds the first
  channels. For C=64 and 7 scales: 10, 9, 9, 9, 9, 9, 9.
- Time. Group k < num_scales - 1 is averaged over non-overlapping blocks of
  ``2**k`` frames starting at frame 0; every frame is replaced by the mean of
  its block, so the shape stays (B, T, C). A last block that is cut short by
  the end of the sequence is the mean of the frames it has. The last group is
  averaged over the whole sequence (one summary vector, repeated over T).
- Default number of scales for a window of T frames: one group per dyadic
  block size smaller than T, plus the whole-sequence group, i.e.
  ``max(2, ceil(log2 T) + 1)``. For the 1 s window (T=40): block sizes
  1, 2, 4, 8, 16, 32, then the whole sequence, 7 scales. A block of 64 would
  already cover the whole window, so the dyadic ladder stops at 32.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_SCALES = 2
"""Full resolution plus the whole-sequence summary: the smallest useful pooling."""


def default_num_scales(window_frames: int) -> int:
    """Scales needed to go from single frames to the whole window: dyadic blocks < T, then T."""
    if window_frames < 1:
        raise ValueError(f"window_frames must be >= 1, got {window_frames}")
    dyadic_below_window = math.ceil(math.log2(window_frames))  # block sizes 2**k < T
    return max(MIN_SCALES, dyadic_below_window + 1)


def block_sizes(num_scales: int) -> list[int | None]:
    """Block size in frames of each group; None marks the whole-sequence group."""
    if num_scales < MIN_SCALES:
        raise ValueError(f"num_scales must be >= {MIN_SCALES}, got {num_scales}")
    return [2**k for k in range(num_scales - 1)] + [None]


def split_channels(channels: int, num_scales: int) -> list[int]:
    """Channels per group: as even as possible, the first groups take the remainder."""
    if num_scales > channels:
        raise ValueError(f"num_scales ({num_scales}) cannot exceed the channel count ({channels})")
    base, extra = divmod(channels, num_scales)
    return [base + 1 if k < extra else base for k in range(num_scales)]


def block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """Replace every frame by the mean of its block of ``block`` frames: (B, T, C) -> (B, T, C).

    Blocks are non-overlapping and start at frame 0; the last block may be short.
    """
    B, T, C = x.shape
    if block <= 1:
        return x
    n_blocks = -(-T // block)  # ceil(T / block)
    pad = n_blocks * block - T
    padded = F.pad(x, (0, 0, 0, pad))  # (B, n_blocks * block, C), zeros at the end
    sums = padded.reshape(B, n_blocks, block, C).sum(dim=2)  # (B, n_blocks, C)
    # frames really present in each block: `block`, except possibly the last one
    starts = torch.arange(n_blocks, device=x.device) * block
    counts = (T - starts).clamp(max=block).to(x.dtype)  # (n_blocks,)
    means = sums / counts[:, None]  # (B, n_blocks, C)
    return means.repeat_interleave(block, dim=1)[:, :T]  # (B, T, C)


class WaveletPooling(nn.Module):
    """Multi-scale average pooling over time of channel groups; no parameters, no buffers.

    ``channels`` is the embedding width C; ``num_scales`` the number of channel
    groups (default: ``default_num_scales(window_frames)``, which needs
    ``window_frames``). The grouping is fixed at construction so a model sees
    the same channel layout for every input length; only the whole-sequence
    group adapts to the actual T.
    """

    def __init__(self, channels: int, num_scales: int | None = None, window_frames: int | None = None):
        super().__init__()
        if num_scales is None:
            if window_frames is None:
                raise ValueError("give num_scales or window_frames")
            num_scales = default_num_scales(window_frames)
        self.channels = channels
        self.block_sizes = block_sizes(num_scales)
        self.split_sizes = split_channels(channels, num_scales)

    @property
    def num_scales(self) -> int:
        return len(self.block_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), each channel group averaged at its own time scale."""
        if x.shape[-1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got shape {tuple(x.shape)}")
        T = x.shape[1]
        groups = x.split(self.split_sizes, dim=-1)  # num_scales x (B, T, C_k)
        pooled = [
            block_mean(group, T if block is None else block)  # (B, T, C_k)
            for group, block in zip(groups, self.block_sizes, strict=True)
        ]
        return torch.cat(pooled, dim=-1)  # (B, T, C)

    def extra_repr(self) -> str:
        blocks = ", ".join("whole" if b is None else str(b) for b in self.block_sizes)
        return f"channels={self.channels}, block_sizes=[{blocks}], split_sizes={self.split_sizes}"
