"""S2 code-level Transformer: a causal language model over VQ codes.

Verma & Smith (2020): a Transformer trained to predict the next code learns a
representation of the audio; its hidden states, read by a small head,
classify scenes. Readable top to bottom, in the style of nanoGPT.

Two ways to run it, with the same weights and (in eval mode) the same numbers:
- ``forward(codes)``: the whole sequence at once, as in training.
- ``forward_step(chunk, state)``: streaming. Each call takes only the new codes
  (e.g. one 1 s message of 40 codes) and a ``StreamState`` holding every
  layer's keys/values for the codes already seen, so the past is never
  recomputed: a step costs O(t) projections/MLPs and O(t * (past + t))
  attention for t new codes, instead of re-running the whole context.

Beyond the context: the positional embeddings are absolute and learned for
positions ``0 .. context_frames - 1`` only, and every cached key was computed
with its own position baked in. A cache therefore cannot slide: dropping the
oldest entries would leave the rest at the wrong positions. ``forward_step``
raises ``ContextOverflowError`` (before computing anything, the state is left
intact) when a chunk would take the stream past ``context_frames``. To go on,
re-prime: start a new state from the most recent codes,
``forward_step(recent_codes[:, -keep:], None)``, which is exactly what the full
pass over that shorter context computes (the cloud's contexts also start at
position 0).
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


class ContextOverflowError(ValueError):
    """A stream would pass the model's context_frames; re-prime a new state (module doc)."""


# One layer's cached keys and values, each (B, nh, P, hs) for P past positions.
KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StreamState:
    """What a stream has consumed so far. Immutable: each step returns a new one,
    so a step that raises (or that the caller discards) leaves this one usable."""

    layers: tuple[KVCache, ...]  # one (keys, values) per block, each (B, nh, positions, hs)
    positions: int  # codes consumed = the absolute position of the next code

    @property
    def batch_size(self) -> int:
        return self.layers[0][0].shape[0]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: CodeTransformerConfig):
        super().__init__()
        assert config.d_model % config.n_heads == 0
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, keep: int | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """x (B, t, C) new positions, cache: keys/values of the P positions before them.
        Returns y (B, t, C), or (B, keep, C) for only the last ``keep`` positions (their
        queries alone are computed), and the keys/values of all P + t positions."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        if keep is not None:
            q = q[:, -keep:]  # (B, Q, C)
        Q = q.shape[1]
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, Q, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, Q, hs)
        k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (k, v))
        if cache is not None:
            # A new tensor, not an in-place append: the caller's old state stays valid.
            # The copy is at most context_frames positions, small beside the matmuls.
            k = torch.cat([cache[0], k], dim=2)  # (B, nh, P + T, hs)
            v = torch.cat([cache[1], v], dim=2)  # (B, nh, P + T, hs)
        dropout_p = self.dropout if self.training else 0.0
        offset = k.shape[2] - Q  # keys before the first query
        if offset == 0:
            # The full pass (and a first chunk): the same call as in training.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            # is_causal would align the triangle to the top-left (query i sees keys
            # 0..i), wrong with keys before the queries; query i sits at offset + i and
            # sees keys 0..offset + i. For Q == 1 this mask is all True.
            mask = torch.ones(Q, offset + Q, dtype=torch.bool, device=x.device).tril(diagonal=offset)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        # y: (B, nh, Q, hs)
        y = y.transpose(1, 2).contiguous().view(B, Q, C)  # (B, Q, C)
        return self.proj(y), (k, v)


class Block(nn.Module):
    """Pre-LN causal Transformer block; also used by the S1 sample Transformer (any config
    with ``d_model``, ``n_heads`` and ``dropout`` will do)."""

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

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, keep: int | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """x (B, t, C) -> (B, t, C), or (B, keep, C): only the last ``keep`` positions go
        through (the others still serve as keys and values)."""
        a, new_cache = self.attn(self.ln1(x), cache, keep)
        x = x[:, -a.shape[1] :] + a
        return x + self.mlp(self.ln2(x)), new_cache


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

    def _run(
        self, codes: torch.Tensor, state: StreamState | None
    ) -> tuple[torch.Tensor, torch.Tensor, StreamState]:
        """The one code path behind forward and forward_step: codes (B, t) at
        absolute positions state.positions .. state.positions + t - 1."""
        B, T = codes.shape
        start = 0 if state is None else state.positions
        pos = torch.arange(start, start + T, device=codes.device)  # (T,)
        x = self.drop(self.tok_emb(codes) + self.pos_emb(pos))  # (B, T, C)
        layers = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if state is None else state.layers[i])
            layers.append(kv)
        hidden = self.ln_f(x)  # (B, T, C)
        return self.lm_head(hidden), hidden, StreamState(tuple(layers), start + T)

    def forward(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """codes (B, T) int64 -> (logits (B, T, V) for the next code, hidden (B, T, C))."""
        T = codes.shape[1]
        if T > self.config.context_frames:
            raise ContextOverflowError(
                f"sequence of {T} codes exceeds context {self.config.context_frames}"
            )
        logits, hidden, _ = self._run(codes, None)
        return logits, hidden

    def tail_hidden(self, codes: torch.Tensor, keep: int) -> torch.Tensor:
        """codes (B, T) int64 -> hidden (B, keep, C) of the last ``keep`` positions, equal to
        ``forward(codes)[1][:, -keep:]`` at less cost: the last block computes only those
        positions (the earlier blocks need every position as keys and values), and there are
        no logits. What the cloud's classifier reads."""
        B, T = codes.shape
        if T > self.config.context_frames:
            raise ContextOverflowError(f"sequence of {T} codes exceeds context {self.config.context_frames}")
        x = self.drop(self.tok_emb(codes) + self.pos_emb(torch.arange(T, device=codes.device)))  # (B, T, C)
        for block in self.blocks[:-1]:
            x, _ = block(x)
        x, _ = self.blocks[-1](x, keep=keep)  # (B, keep, C)
        return self.ln_f(x)

    def forward_step(
        self, codes: torch.Tensor, state: StreamState | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, StreamState]:
        """Streaming: codes (B, t) int64, the next t codes of B streams, and the state
        returned by the previous step (None to start, or to re-prime from a batch of
        recent contexts, all positions at once: the batched full-context prefill).

        Returns logits (B, t, V) and hidden (B, t, C) for the new positions only, equal
        (eval mode) to the last t rows of forward() on the whole sequence so far, and
        the new state. Raises ContextOverflowError past context_frames (module doc).
        Call in eval mode (dropout) and under torch.no_grad() (else the cache keeps
        the autograd graph of every past step alive).
        """
        B, T = codes.shape
        start = 0 if state is None else state.positions
        if start + T > self.config.context_frames:
            raise ContextOverflowError(
                f"{T} new codes after {start} would exceed the context of "
                f"{self.config.context_frames} codes (learned absolute positions): "
                f"re-prime with forward_step(recent_codes[:, -keep:], None)"
            )
        if state is not None and state.batch_size != B:
            raise ValueError(f"chunk has batch {B} but the state holds {state.batch_size} streams")
        return self._run(codes, state)

    def next_code_loss(self, codes: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of predicting codes[:, t+1] from codes[:, :t+1]."""
        logits, _ = self(codes[:, :-1])  # (B, T-1, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes[:, 1:].reshape(-1))
