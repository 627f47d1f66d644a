"""S1 training: the three matched models through Ray Train, scored on the same held-out samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared_models.mulaw import MU_LAW_CLASSES
from shared_models.s1_configs import MATCH_TOLERANCE
from training.s1_comparison import evaluate_s1, heldout_crops, run_s1_comparison
from training.s1_stage import (
    S1Experiment,
    build_model,
    crop_samples,
    past_samples,
    sample_crops,
    target_logits,
)

SAMPLE_RATE_HZ = 16_000
MODEL_NAMES = ("wavenet", "transformer", "conditioned_transformer")

# Tiny but real: the WaveNet keeps its 2047-sample receptive field, the Transformers
# attend over 64 samples and the conditioned one summarises 256 more.
TINY = S1Experiment(
    target_params=20_000,
    context_samples=64,
    cond_context=256,
    steps_per_epoch=110,
    epochs=1,  # Ray Train's start-up and each report cost seconds: one epoch
    batch_size=8,
    lr=1e-2,  # tiny models, few steps
    warmup_steps=10,
    eval_positions=2048,
    eval_targets=64,
    threads_per_worker=1,  # 2 workers on the 2-core test machine
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def sine_clips(n: int, seconds: float, seed: int) -> list[np.ndarray]:
    """Sums of 2-3 steady sines (50-400 Hz) with a little noise: predictable from the past."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE_HZ)) / SAMPLE_RATE_HZ
    clips = []
    for _ in range(n):
        k = rng.integers(2, 4)
        freqs, amps, phases = (
            rng.uniform(50, 400, k),
            rng.uniform(0.1, 0.3, k),
            rng.uniform(0, 6.3, k),
        )
        audio = (amps[:, None] * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None])).sum(0)
        audio += 0.003 * rng.standard_normal(len(t))
        clips.append(audio.astype(np.float32))
    return clips


# --- fast unit tests (no Ray) -------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_model_predicts_a_target_only_from_its_allowed_past(name):
    configs = TINY.configs()
    config = configs[name]
    model = build_model(config).eval()
    n = 16
    L = crop_samples(list(configs.values()), n)
    codes = torch.randint(0, MU_LAW_CLASSES, (2, L))
    with torch.no_grad():
        base = target_logits(model, config, codes, n)  # (2, n, V)
        assert base.shape == (2, n, MU_LAW_CLASSES)

        # Changing target j and everything after it leaves the predictions of targets <= j alone.
        j = 5
        future = codes.clone()
        future[:, L - n + j :] = torch.randint(0, MU_LAW_CLASSES, (2, n - j))
        changed = target_logits(model, config, future, n)
        torch.testing.assert_close(changed[:, : j + 1], base[:, : j + 1], rtol=0, atol=0)
        assert (changed[:, j + 1] - base[:, j + 1]).abs().max() > 1e-5

        # Samples older than the model's allowed past are never handed to it.
        oldest = L - n - past_samples(config)
        if oldest > 0:
            older = codes.clone()
            older[:, :oldest] = (older[:, :oldest] + 100) % MU_LAW_CLASSES
            torch.testing.assert_close(target_logits(model, config, older, n), base, rtol=0, atol=0)


def test_evaluate_s1_is_deterministic_and_scores_the_same_positions_for_every_model():
    experiment = S1Experiment(
        target_params=20_000, context_samples=64, cond_context=256, eval_positions=300,
        eval_targets=64, transformer_dropout=0.5,
    )  # fmt: skip
    clips = sine_clips(3, 0.5, seed=1)
    torch.testing.assert_close(heldout_crops(clips, experiment), heldout_crops(clips, experiment))
    scores = {}
    for name, config in experiment.configs().items():
        model = build_model(config).train()  # dropout on: evaluation must switch it off
        first, second = evaluate_s1(model, clips, experiment), evaluate_s1(model, clips, experiment)
        assert first == second, name
        assert model.training, "evaluation restores the model's mode"
        assert 0 <= first["top1"] <= first["top5"] <= 1 and first["nll"] > 0
        scores[name] = first
    # rounded up to whole runs of eval_targets, the same count for every model
    assert {s["positions"] for s in scores.values()} == {5 * 64}


def test_quiet_crops_are_redrawn_and_counted():
    loud = sine_clips(1, 0.5, seed=2)[0]
    quiet = np.zeros(len(loud), dtype=np.float32)
    rng = np.random.default_rng(0)
    batch = sample_crops([quiet, loud], 20, 256, rng, min_rms=0.01)
    assert batch.codes.shape == (20, 256) and batch.codes.dtype == torch.int64
    assert batch.skipped > 0, "about half the draws land in the silent clip"
    assert (batch.codes != 128).any(dim=1).all(), "no silent crop comes back"
    unfiltered = sample_crops([quiet, loud], 20, 256, np.random.default_rng(0))
    assert unfiltered.skipped == 0
    with pytest.raises(ValueError, match="no clip holds"):
        sample_crops([loud], 1, len(loud) + 1, rng)


# --- through Ray Train ---------------------------------------------------------------------


@pytest.mark.slow
def test_three_matched_models_train_through_ray_and_beat_the_unigram(ray_session, tmp_path):
    train_clips, test_clips = sine_clips(12, 1.0, seed=3), sine_clips(4, 1.0, seed=4)
    run = dict(workers=2, storage_path=tmp_path / "ray", use_gpu=False)
    results = run_s1_comparison(train_clips, test_clips, TINY, run)

    models = {name: results[name] for name in MODEL_NAMES}
    counts = [m["params"] for m in models.values()]
    assert max(counts) <= (1 + MATCH_TOLERANCE) * min(counts)
    unigram = results["baselines"]["unigram"]
    positions = {m["positions"] for m in models.values()} | {unigram["positions"]}
    assert positions == {TINY.eval_positions}, "every model scored on the same held-out samples"
    for name, m in models.items():
        assert m["epochs"] == TINY.epochs and m["starts"] == [0], name
        assert m["top5"] > unigram["top5"] + 0.1, f"{name} learned nothing: {m} vs {unigram}"
        assert m["nll"] < unigram["nll"], name
    assert models["wavenet"]["past_samples"] == 2047
    assert models["transformer"]["past_samples"] == 64
    assert models["conditioned_transformer"]["past_samples"] == 64 + 256
    for name in MODEL_NAMES:
        assert list((tmp_path / "ray" / f"s1_{name}").glob("checkpoint_*")), name
