"""S2 code-level Transformer: a causal language model over VQ codes.

Verma & Smith (2020): a Transformer trained to predict the next code learns a
representation of the audio; its hidden states, read by a small head,
classify scenes. Readable top to bottom, in the style of nanoGPT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared_models.constants import DEFAULT_CODEBOOK_SIZE, FRAMES_PER_SECOND


@dataclass
class CodeTransformerConfig:
    vocab_size: int = DEFAULT_CODEBOOK_SIZE
    context_frames: int = 4 * FRAMES_PER_SECOND  # 4 s of 25 ms codes
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    dropout: float = 0.1


class CausalSelfAttention(nn.Module):
    def __init__(self, config: CodeTransformerConfig):
        super().__init__()
        assert config.d_model % config.n_heads == 0
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, config: CodeTransformerConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model),
            nn.GELU(),
            nn.Linear(4 * config.d_model, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CodeTransformer(nn.Module):
    def __init__(self, config: CodeTransformerConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_frames, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """codes (B, T) int64 -> (logits (B, T, V) for the next code, hidden (B, T, C))."""
        B, T = codes.shape
        if T > self.config.context_frames:
            raise ValueError(f"sequence of {T} codes exceeds context {self.config.context_frames}")
        pos = torch.arange(T, device=codes.device)
        x = self.drop(self.tok_emb(codes) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        hidden = self.ln_f(x)  # (B, T, C)
        return self.lm_head(hidden), hidden

    def next_code_loss(self, codes: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of predicting codes[:, t+1] from codes[:, :t+1]."""
        logits, _ = self(codes[:, :-1])  # (B, T-1, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes[:, 1:].reshape(-1))
