"""Streaming the code LM with a key/value cache computes what the full pass computes.

Both a small random model and the shipped one (shared_models/default_bundle), fed in
chunks of 1, 7, 40 codes and mixed sizes, must match forward() on the whole sequence.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shared_models
from shared_models.code_transformer import (
    CodeTransformer,
    CodeTransformerConfig,
    ContextOverflowError,
    StreamState,
)

BUNDLE = Path(shared_models.__file__).parent / "default_bundle"
ATOL = 1e-4
CHUNK_PLANS = {
    "ones": [1] * 160,
    "sevens": [7] * 22 + [6],  # 160 codes, the last chunk shorter
    "messages_of_40": [40] * 4,  # one 1 s message per step
    "mixed": [1, 40, 7, 3, 40, 1, 2, 30, 36],
}


def _small_model(dropout: float = 0.1) -> CodeTransformer:
    torch.manual_seed(0)
    config = CodeTransformerConfig(
        vocab_size=32, context_frames=160, d_model=32, n_heads=4, n_layers=2, dropout=dropout
    )
    return CodeTransformer(config).eval()


@pytest.fixture(scope="module")
def shipped_model() -> CodeTransformer:
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    model = CodeTransformer(CodeTransformerConfig(**manifest["code_lm_config"]))
    model.load_state_dict(torch.load(BUNDLE / "cloud.pt", weights_only=True)["code_lm"])
    return model.eval()


def _codes(model: CodeTransformer, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)  # (B, T)


@torch.no_grad()
def _stream(model: CodeTransformer, codes: torch.Tensor, plan: list[int]):
    """Feed codes chunk by chunk; return the concatenated (logits, hidden) and the state."""
    state, logits, hidden, start = None, [], [], 0
    for size in plan:
        chunk_logits, chunk_hidden, state = model.forward_step(codes[:, start : start + size], state)
        assert chunk_logits.shape[1] == size and chunk_hidden.shape[1] == size
        logits.append(chunk_logits)
        hidden.append(chunk_hidden)
        start += size
    assert start == codes.shape[1] and state.positions == start
    return torch.cat(logits, dim=1), torch.cat(hidden, dim=1), state  # (B, T, V), (B, T, C)


def _max_diffs(model: CodeTransformer, codes: torch.Tensor, plan: list[int]) -> tuple[float, float]:
    with torch.no_grad():
        full_logits, full_hidden = model(codes)
    logits, hidden, _ = _stream(model, codes, plan)
    return (full_logits - logits).abs().max().item(), (full_hidden - hidden).abs().max().item()


@pytest.mark.parametrize("plan", CHUNK_PLANS.values(), ids=CHUNK_PLANS.keys())
def test_streaming_random_model_matches_full_pass(plan):
    model = _small_model()
    logits_diff, hidden_diff = _max_diffs(model, _codes(model, batch=3, length=sum(plan)), plan)
    assert logits_diff < ATOL and hidden_diff < ATOL


@pytest.mark.parametrize("plan", CHUNK_PLANS.values(), ids=CHUNK_PLANS.keys())
def test_streaming_shipped_model_matches_full_pass(shipped_model, plan):
    codes = _codes(shipped_model, batch=2, length=sum(plan))
    logits_diff, hidden_diff = _max_diffs(shipped_model, codes, plan)
    assert logits_diff < ATOL and hidden_diff < ATOL


def test_shipped_model_full_pass_is_unchanged(shipped_model):
    """Values recorded from forward() before the KV cache was added."""
    codes = ((torch.arange(160) * 37 + 11) % 256).unsqueeze(0)  # (1, 160)
    with torch.no_grad():
        logits, hidden = shipped_model(codes)
        loss = shipped_model.next_code_loss(codes)
    expected_logits = torch.tensor([-1.93127, 1.24642, 1.31414, 3.57652])
    expected_hidden = torch.tensor([-0.94369, 1.3328, 1.08527, 0.82215])
    assert torch.allclose(logits[0, -1, :4], expected_logits, atol=ATOL)
    assert torch.allclose(hidden[0, -1, :4], expected_hidden, atol=ATOL)
    assert abs(loss.item() - 7.16105) < ATOL


def test_batched_streams_are_independent():
    model = _small_model()
    codes = _codes(model, batch=4, length=80)
    batched_logits, batched_hidden, _ = _stream(model, codes, [40, 40])
    for b in range(4):
        logits, hidden, _ = _stream(model, codes[b : b + 1], [1, 39, 40])
        assert (logits - batched_logits[b : b + 1]).abs().max() < ATOL
        assert (hidden - batched_hidden[b : b + 1]).abs().max() < ATOL


def test_state_batch_mismatch_is_rejected():
    model = _small_model()
    _, _, state = _stream(model, _codes(model, batch=2, length=10), [10])
    with pytest.raises(ValueError, match="batch"):
        model.forward_step(_codes(model, batch=3, length=1), state)


def test_exceeding_context_raises_and_leaves_state_usable():
    model = _small_model()
    codes = _codes(model, batch=2, length=160)
    _, _, state = _stream(model, codes[:, :150], [40, 40, 40, 30])
    with pytest.raises(ContextOverflowError, match="re-prime"):
        model.forward_step(codes[:, :20], state)  # 150 + 20 > 160
    assert state.positions == 150
    # The failed step changed nothing: the remaining 10 codes still match the full pass.
    logits, hidden, full_state = model.forward_step(codes[:, 150:], state)
    with torch.no_grad():
        full_logits, full_hidden = model(codes)
    assert (logits - full_logits[:, 150:]).abs().max() < ATOL
    assert (hidden - full_hidden[:, 150:]).abs().max() < ATOL
    with pytest.raises(ContextOverflowError):
        model.forward_step(codes[:, :1], full_state)  # a full cache takes nothing more
    with pytest.raises(ContextOverflowError):
        model(torch.cat([codes, codes[:, :1]], dim=1))  # the full pass, too


def test_reprime_from_recent_codes_equals_full_pass_on_that_context():
    """The documented way on past the context: a fresh state from the latest codes."""
    model = _small_model()
    codes = _codes(model, batch=2, length=200)  # longer than the 160-code context
    recent = codes[:, -120:]  # (B, 120)
    with torch.no_grad():
        logits, hidden, state = model.forward_step(recent, None)  # batched prefill
        full_logits, full_hidden = model(recent)
    assert state.positions == 120
    assert (logits - full_logits).abs().max() < ATOL
    assert (hidden - full_hidden).abs().max() < ATOL


def test_dropout_is_off_in_eval_and_on_in_training():
    model = _small_model(dropout=0.5)
    codes = _codes(model, batch=2, length=80)
    logits_diff, hidden_diff = _max_diffs(model, codes, [40, 40])
    assert logits_diff < ATOL and hidden_diff < ATOL
    first, _, _ = _stream(model, codes, [7] * 11 + [3])
    second, _, _ = _stream(model, codes, [7] * 11 + [3])
    assert torch.equal(first, second)
    # Proof the eval test has teeth: the same model in training mode is random.
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(codes)[0], model(codes)[0])


def test_step_with_cache_processes_only_new_positions(monkeypatch):
    """A 40-code step after 120 cached codes: every Linear sees 40 rows per stream,
    attention has 40 queries over 160 keys, and the past is not recomputed."""
    model = _small_model()
    codes = _codes(model, batch=2, length=160)
    _, _, state = _stream(model, codes[:, :120], [40, 40, 40])
    assert isinstance(state, StreamState) and state.positions == 120
    assert all(k.shape[2] == 120 and v.shape[2] == 120 for k, v in state.layers)

    linear_rows: list[int] = []
    hooks = [
        m.register_forward_hook(lambda _m, args, _out: linear_rows.append(args[0].shape[1]))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    attention_shapes: list[tuple[int, int]] = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, **kwargs):
        attention_shapes.append((q.shape[2], k.shape[2]))  # (queries, keys)
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    with torch.no_grad():
        logits, hidden, state = model.forward_step(codes[:, 120:], state)
    for hook in hooks:
        hook.remove()

    n_layers = model.config.n_layers
    assert logits.shape == (2, 40, model.config.vocab_size)
    assert hidden.shape == (2, 40, model.config.d_model)
    # qkv, proj and two MLP layers per block, plus lm_head: all on the 40 new rows.
    assert linear_rows == [40] * (4 * n_layers + 1)
    assert attention_shapes == [(40, 160)] * n_layers
    assert state.positions == 160
    assert all(k.shape[2] == 160 for k, _ in state.layers)


@pytest.mark.parametrize("length,keep", [(160, 40), (120, 40), (40, 40), (100, 1)])
def test_tail_hidden_equals_the_full_pass_tail(shipped_model, length, keep):
    """The cloud's path: the last block runs only the kept positions, and there are no logits."""
    codes = _codes(shipped_model, batch=3, length=length)
    with torch.no_grad():
        _, full = shipped_model(codes)
        tail = shipped_model.tail_hidden(codes, keep)
    assert tail.shape == (3, keep, shipped_model.config.d_model)
    assert (full[:, -keep:] - tail).abs().max().item() < ATOL


def test_window_states_of_many_contexts_match_one_at_a_time(shipped_model):
    """Mixed context lengths and more contexts than one chunk: each row is its own context's."""
    from shared_models.detector import LM_CHUNK, lm_window_states

    g = torch.Generator().manual_seed(3)
    lengths = [160] * (LM_CHUNK + 5) + [40, 80, 120, 160]
    contexts = [torch.randint(0, 256, (n,), generator=g) for n in lengths]
    batched = lm_window_states(shipped_model, contexts, 40)  # (B, W, C)
    assert batched.shape == (len(contexts), 40, shipped_model.config.d_model)
    for i in (0, LM_CHUNK, len(contexts) - 3, len(contexts) - 1):
        with torch.no_grad():
            _, alone = shipped_model(contexts[i].unsqueeze(0))
        assert (alone[0, -40:] - batched[i]).abs().max().item() < ATOL
