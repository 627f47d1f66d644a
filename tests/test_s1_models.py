"""S1 models: mu-law codes, WaveNet and the sample-level Transformer (tiny sizes, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from shared_models.mulaw import MU_LAW_CLASSES, MU_LAW_SILENCE, decode, encode
from shared_models.param_count import count_parameters
from shared_models.s1_configs import MATCH_TOLERANCE, matched_configs, parameter_count
from shared_models.s1_metrics import topk_accuracy
from shared_models.sample_transformer import SampleTransformer, SampleTransformerConfig
from shared_models.wavenet import WaveNet, WaveNetConfig

SAMPLE_RATE_HZ = 16_000
TINY_WAVENET = WaveNetConfig(
    n_layers=3, n_stacks=2, residual_channels=16, dilation_channels=16,
    skip_channels=32, end_channels=32,
)  # receptive field 1 + 2 * (1 + 2 + 4) = 15
TINY_TRANSFORMER = SampleTransformerConfig(
    context_samples=128, d_model=32, n_heads=4, n_layers=2, dropout=0.0
)
TINY_CONDITIONED = SampleTransformerConfig(
    context_samples=128, d_model=32, n_heads=4, n_layers=2, dropout=0.0,
    cond_context=64, cond_tokens=2, cond_stride=4, cond_layers=2,
)


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine is shared: keep each test on one core, and seeded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def random_tokens(*shape: int) -> torch.Tensor:
    return torch.randint(0, MU_LAW_CLASSES, shape)


def two_period_sine(frequency_hz: float = 250.0) -> torch.Tensor:
    """Two periods of a sine at 16 kHz as mu-law codes (250 Hz: 128 samples)."""
    n = round(2 * SAMPLE_RATE_HZ / frequency_hz)
    t = torch.arange(n) / SAMPLE_RATE_HZ
    return encode(0.8 * torch.sin(2 * math.pi * frequency_hz * t))


# --- mu-law -----------------------------------------------------------------


def test_mulaw_round_trip_error_is_bounded_and_classes_in_range():
    x = torch.linspace(-1.0, 1.0, 20_001)
    codes = encode(x)
    assert codes.dtype == torch.int64
    assert codes.min() == 0 and codes.max() == MU_LAW_CLASSES - 1
    assert (codes.diff() >= 0).all(), "encoding must be monotonic"
    err = (decode(codes) - x).abs()
    # Half a step on the companded axis: ln(256)/255 * (|x| + 1/255), about 2.2 % of
    # full scale at the loudest class and a few 1e-5 near silence.
    assert err.max() < 0.0225
    assert (err <= 0.0225 * (x.abs() + 1 / 255)).all()


def test_mulaw_silence_clipping_and_decode_range():
    assert encode(torch.tensor([0.0])).item() == MU_LAW_SILENCE
    assert encode(torch.tensor([-1.5, 1.5])).tolist() == [0, MU_LAW_CLASSES - 1]
    levels = decode(torch.arange(MU_LAW_CLASSES))
    assert (levels.diff() > 0).all()
    assert levels[0].item() == pytest.approx(-1.0) and levels[-1].item() == pytest.approx(1.0)
    with pytest.raises(TypeError):
        encode(torch.tensor([1, 2]))


# --- shapes and causality ----------------------------------------------------


@pytest.mark.parametrize("name", ["wavenet", "transformer", "conditioned"])
def test_logits_have_shape_batch_time_classes(name):
    model, past = tiny_model(name), None
    if name == "conditioned":
        past = random_tokens(3, TINY_CONDITIONED.cond_context)
    logits = forward(model, random_tokens(3, 50), past)
    assert logits.shape == (3, 50, MU_LAW_CLASSES)


@pytest.mark.parametrize("name", ["wavenet", "transformer", "conditioned"])
def test_changing_sample_t_changes_no_logits_before_t(name):
    model = tiny_model(name)
    tokens = random_tokens(2, 40)
    past = random_tokens(2, TINY_CONDITIONED.cond_context) if name == "conditioned" else None
    t = 17
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 100) % MU_LAW_CLASSES
    with torch.no_grad():
        before, after = forward(model, tokens, past), forward(model, changed, past)
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=1e-6)
    assert (before[:, t] - after[:, t]).abs().max() > 1e-4, "sample t must inform logits at t"


def test_wavenet_receptive_field_formula_matches_measurement():
    # float64: the oldest sample reaches the output through one chain of six gated
    # taps, an effect of about 1e-6 that float32 rounding could hide.
    model = tiny_model("wavenet").double()
    rf = model.receptive_field
    assert rf == 15
    assert WaveNet(WaveNetConfig(n_layers=10, n_stacks=2)).receptive_field == 2047
    T = rf + 10
    tokens = random_tokens(1, T)
    with torch.no_grad():
        base = model(tokens)[0, -1]
        reaches = []
        for p in range(T):
            changed = tokens.clone()
            changed[0, p] = (changed[0, p] + 100) % MU_LAW_CLASSES
            reaches.append(bool((model(changed)[0, -1] - base).abs().max() > 1e-12))
    # Exactly the last rf samples (the current one included) reach the last output.
    assert reaches == [False] * (T - rf) + [True] * rf


# --- conditioning -------------------------------------------------------------


def test_conditioned_transformer_depends_on_past():
    model = tiny_model("conditioned")
    tokens = random_tokens(2, 40)
    past = random_tokens(2, TINY_CONDITIONED.cond_context)
    other_past = past.clone()
    other_past[:, :8] = (other_past[:, :8] + 100) % MU_LAW_CLASSES  # only the oldest samples
    with torch.no_grad():
        diff = (model(tokens, past) - model(tokens, other_past)).abs().amax(dim=-1)  # (B, T)
    assert (diff > 1e-5).all(), "every position should see the summarised past"
    with pytest.raises(ValueError, match="past"):
        model(tokens)
    with pytest.raises(ValueError, match="past"):
        model(tokens, past[:, 1:])


def test_plain_transformer_has_no_past_input():
    model = tiny_model("transformer")
    assert not model.conditioned and model.past_encoder is None
    with pytest.raises(ValueError, match="without conditioning"):
        model(random_tokens(1, 10), random_tokens(1, 64))


def test_conditioning_length_must_fill_whole_cnn_blocks():
    with pytest.raises(ValueError, match="cond_context"):
        SampleTransformerConfig(cond_context=100, cond_stride=4, cond_layers=3)


# --- learning -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["wavenet", "transformer", "conditioned"])
def test_tiny_model_overfits_a_two_period_sine(name):
    model = tiny_model(name)
    tokens = two_period_sine()[None]  # (1, 128)
    past = None
    if name == "conditioned":
        past = torch.full((1, TINY_CONDITIONED.cond_context), MU_LAW_SILENCE)

    def top5() -> float:
        with torch.no_grad():
            logits = forward(model.eval(), tokens[:, :-1], past)  # (1, 127, 256)
        return topk_accuracy(logits, tokens[:, 1:], k=5)

    # Untrained it is near chance; "next = current +- 2" would score only about 0.5
    # here (the sine crosses zero in steps of up to 70 classes), so > 0.9 means learning.
    assert top5() < 0.2
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    args = (tokens,) if past is None else (tokens, past)
    for _ in range(100):
        loss = model.next_sample_loss(*args)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert top5() > 0.9


# --- metric and matched sizes -------------------------------------------------


def test_topk_accuracy_on_a_hand_made_example():
    logits = torch.tensor(
        [[0.1, 0.5, 0.2, 0.9],  # ranking 3, 1, 2, 0
         [1.0, 0.3, 0.2, 0.1],  # ranking 0, 1, 2, 3
         [0.0, 0.1, 1.0, 2.0]]  # ranking 3, 2, 1, 0
    )
    targets = torch.tensor([1, 3, 2])
    assert [topk_accuracy(logits, targets, k) for k in (1, 2, 3, 4)] == pytest.approx(
        [0.0, 2 / 3, 2 / 3, 1.0]
    )
    # Leading dimensions are flattened: (B, T, V) with (B, T).
    assert topk_accuracy(logits[None], targets[None], 2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        topk_accuracy(logits, targets[:2], 1)


def test_matched_configs_counts_within_ten_percent():
    target = 100_000
    configs = matched_configs(target)
    assert set(configs) == {"wavenet", "transformer", "conditioned_transformer"}
    assert configs["conditioned_transformer"].cond_context > 0
    assert configs["transformer"].cond_context == 0
    counts = [parameter_count(c) for c in configs.values()]
    assert max(counts) <= (1 + MATCH_TOLERANCE) * min(counts)
    assert all(abs(c - target) <= MATCH_TOLERANCE * target for c in counts)
    # The meta-device count is the real model's count.
    assert count_parameters(WaveNet(configs["wavenet"])) == counts[0]


def tiny_model(name: str) -> torch.nn.Module:
    config = {"wavenet": TINY_WAVENET, "transformer": TINY_TRANSFORMER,
              "conditioned": TINY_CONDITIONED}[name]
    model = WaveNet(config) if isinstance(config, WaveNetConfig) else SampleTransformer(config)
    return model.eval()


def forward(model: torch.nn.Module, tokens: torch.Tensor, past: torch.Tensor | None):
    """Logits from any S1 model; only the conditioned Transformer takes ``past``."""
    return model(tokens) if past is None else model(tokens, past)
