"""S1 sample-level Transformer: a causal language model over 8-bit mu-law audio.

Verma & Chafe (2021): a decoder-only Transformer predicts the next mu-law
sample (256 classes) from the previous ones and beats a WaveNet of the same
size on top-5 next-sample accuracy. Attention costs O(n^2) in the window
length, so the window stays short (hundreds to a few thousand samples); the
paper's conditioned variant lets a cheap CNN look further back and hand the
Transformer a summary of that older audio.

Conditioning here (``cond_context > 0``): the ``cond_context`` samples that
precede the attended window are embedded with the same token embedding, run
through ``cond_layers`` strided convolutions (kernel = stride, so each output
summarises its own disjoint block of older samples; the whole block precedes
the window, so no future sample can leak in), averaged down to ``cond_tokens``
vectors (oldest first) and prepended to the window as a prefix. Causal
attention lets every window position read the whole prefix; the prefix
outputs are dropped, so logits stay (B, T, V). Readable top to bottom, in the
style of nanoGPT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared_models.code_transformer import Block  # the same pre-LN causal block as the code LM
from shared_models.mulaw import MU_LAW_CLASSES


@dataclass
class SampleTransformerConfig:
    vocab_size: int = MU_LAW_CLASSES
    context_samples: int = 512  # attended window: 32 ms at 16 kHz
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 4
    dropout: float = 0.1
    cond_context: int = 0  # past samples summarised by the CNN; 0 = no conditioning
    cond_tokens: int = 4  # summary vectors prepended to the window
    cond_stride: int = 4  # per conv layer; the CNN downsamples by cond_stride**cond_layers
    cond_layers: int = 3

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.cond_context:
            # Kernel = stride with no padding: a length that is not a multiple would
            # silently drop the oldest samples, so refuse it instead.
            downsample = self.cond_stride**self.cond_layers
            if self.cond_context % downsample or self.cond_context // downsample < self.cond_tokens:
                raise ValueError(
                    f"cond_context {self.cond_context} must be a multiple of "
                    f"cond_stride**cond_layers = {downsample} with at least cond_tokens "
                    f"= {self.cond_tokens} blocks"
                )


class PastEncoder(nn.Module):
    """Strided CNN: embedded past samples (B, P, C) -> cond_tokens summary vectors (B, K, C)."""

    def __init__(self, config: SampleTransformerConfig):
        super().__init__()
        C, s = config.d_model, config.cond_stride
        self.convs = nn.ModuleList(
            nn.Conv1d(C, C, kernel_size=s, stride=s) for _ in range(config.cond_layers)
        )
        self.cond_tokens = config.cond_tokens
        # Tells the Transformer which prefix vector covers which stretch of the past.
        self.prefix_pos = nn.Parameter(torch.zeros(config.cond_tokens, C))

    def forward(self, past_emb: torch.Tensor) -> torch.Tensor:
        h = past_emb.transpose(1, 2)  # (B, P, C) -> (B, C, P)
        for conv in self.convs:
            h = F.gelu(conv(h))  # (B, C, P / s^i)
        h = F.adaptive_avg_pool1d(h, self.cond_tokens)  # (B, C, K)
        return h.transpose(1, 2) + self.prefix_pos  # (B, K, C)


class SampleTransformer(nn.Module):
    def __init__(self, config: SampleTransformerConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_samples, config.d_model)
        self.past_encoder = PastEncoder(config) if config.cond_context else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    @property
    def conditioned(self) -> bool:
        return self.past_encoder is not None

    def forward(self, tokens: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) int64 mu-law classes -> logits (B, T, V) for the next sample.

        ``past`` (B, cond_context) holds the mu-law samples immediately before
        ``tokens`` (oldest first). It is required when the model is conditioned
        and refused when it is not; pad with ``mulaw.MU_LAW_SILENCE`` at the
        start of a recording.
        """
        B, T = tokens.shape
        if T > self.config.context_samples:
            raise ValueError(f"{T} samples exceed context {self.config.context_samples}")
        pos = torch.arange(T, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)  # (B, T, C)
        n_prefix = 0
        if self.past_encoder is not None:
            expected = (B, self.config.cond_context)
            if past is None or tuple(past.shape) != expected:
                got = None if past is None else tuple(past.shape)
                raise ValueError(f"conditioned model needs past of shape {expected}, got {got}")
            prefix = self.past_encoder(self.tok_emb(past))  # (B, K, C)
            x = torch.cat([prefix, x], dim=1)  # (B, K + T, C)
            n_prefix = prefix.shape[1]
        elif past is not None:
            raise ValueError("past given to a model without conditioning (cond_context = 0)")
        x = self.drop(x)
        for block in self.blocks:
            x, _ = block(x)  # the block also returns its keys/values (for streaming); unused here
        x = self.ln_f(x[:, n_prefix:])  # (B, T, C): prefix outputs predict nothing
        return self.lm_head(x)  # (B, T, V)

    def next_sample_loss(
        self, tokens: torch.Tensor, past: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cross-entropy of predicting tokens[:, t+1] from tokens[:, :t+1] (and ``past``)."""
        logits = self(tokens[:, :-1], past)  # (B, T-1, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
