"""S3 wavelet-inspired multi-scale pooling, and the classifier's `pooling` switch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared_models import bundle
from shared_models.scene_classifier import SceneClassifier, SceneClassifierConfig
from shared_models.wavelet_pooling import (
    WaveletPooling,
    block_mean,
    block_sizes,
    default_num_scales,
    split_channels,
)

# Logits of the shipped classifier on the deterministic inputs of `_probe_inputs`,
# computed with the classifier code as it was before the `pooling` switch existed.
REFERENCE_CLOUD_PT_SHA256 = "6d3594bf6a6ff78c6fe04b4dab27498753db012321c3da288565caabf5040cf2"
REFERENCE_LOGITS = [
    [-5.52972, -4.96335, -4.55737, -4.41536, -5.51155, -7.87589, -6.97802, -7.58622, -7.97442],
    [-5.73502, -5.32985, -3.68972, -3.47225, -5.68986, -8.0445, -7.08816, -7.45227, -8.69227],
]


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _groups(pool: WaveletPooling, y: torch.Tensor) -> list[torch.Tensor]:
    return list(y.split(pool.split_sizes, dim=-1))


def test_default_scales_reach_the_whole_window():
    assert default_num_scales(40) == 7
    assert block_sizes(7) == [1, 2, 4, 8, 16, 32, None]
    assert default_num_scales(32) == 6  # 1..16, then the whole 32 frames
    assert default_num_scales(33) == 7
    assert default_num_scales(1) == 2
    pool = WaveletPooling(64, window_frames=40)
    assert pool.num_scales == 7
    assert pool.split_sizes == [10, 9, 9, 9, 9, 9, 9]


def test_channel_split_is_even_with_remainder_to_first_groups():
    assert split_channels(64, 4) == [16, 16, 16, 16]
    assert split_channels(10, 3) == [4, 3, 3]
    assert sum(split_channels(67, 7)) == 67
    with pytest.raises(ValueError, match="cannot exceed"):
        split_channels(3, 4)
    with pytest.raises(ValueError, match=">= 2"):
        block_sizes(1)


def test_pooling_module_has_no_parameters_or_buffers():
    pool = WaveletPooling(64, window_frames=40)
    assert list(pool.parameters()) == []
    assert list(pool.buffers()) == []
    assert pool.state_dict() == {}


def test_output_shape_equals_input_shape():
    pool = WaveletPooling(64, window_frames=40)
    for T in (1, 7, 40, 41):
        x = _randn(3, T, 64)
        assert pool(x).shape == x.shape


def test_group_zero_is_unchanged():
    pool = WaveletPooling(64, window_frames=40)
    x = _randn(2, 40, 64)
    g0 = _groups(pool, pool(x))[0]
    assert torch.equal(g0, x[..., : pool.split_sizes[0]])


@pytest.mark.parametrize("T", [40, 37])  # 37: every block size >= 2 leaves a partial last block
def test_each_group_is_constant_within_its_blocks_and_equals_the_block_mean(T: int):
    pool = WaveletPooling(64, num_scales=7)
    x = _randn(2, T, 64, seed=1)
    in_groups = _groups(pool, x)
    out_groups = _groups(pool, pool(x))
    for k, block in enumerate(pool.block_sizes[:-1]):
        assert block == 2**k
        for start in range(0, T, block):
            stop = min(start + block, T)
            expected = in_groups[k][:, start:stop].mean(dim=1, keepdim=True)  # (B, 1, C_k)
            got = out_groups[k][:, start:stop]
            torch.testing.assert_close(got, expected.expand_as(got), rtol=0, atol=1e-6)


def test_partial_last_block_is_the_mean_of_the_frames_present():
    x = torch.arange(5, dtype=torch.float32).reshape(1, 5, 1)  # frames 0..4
    y = block_mean(x, 4)
    assert y.flatten().tolist() == [1.5, 1.5, 1.5, 1.5, 4.0]
    y = block_mean(x, 2)
    assert y.flatten().tolist() == [0.5, 0.5, 2.5, 2.5, 4.0]
    y = block_mean(x, 8)  # block longer than the sequence: the whole-sequence mean
    assert y.flatten().tolist() == [2.0] * 5


def test_last_group_is_constant_over_time_and_equals_the_sequence_mean():
    pool = WaveletPooling(64, window_frames=40)
    for T in (40, 23):
        x = _randn(2, T, 64, seed=2)
        last_in = _groups(pool, x)[-1]
        last_out = _groups(pool, pool(x))[-1]
        expected = last_in.mean(dim=1, keepdim=True).expand_as(last_out)
        torch.testing.assert_close(last_out, expected, rtol=0, atol=1e-6)


def test_gradient_flows_to_every_input_element():
    pool = WaveletPooling(64, window_frames=40)
    x = _randn(2, 37, 64, seed=3).requires_grad_()
    (pool(x) * _randn(2, 37, 64, seed=4)).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert (x.grad != 0).all()


def test_unknown_pooling_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="meanmax, wavelet"):
        SceneClassifierConfig(pooling="attention")


def _config(**overrides) -> SceneClassifierConfig:
    return SceneClassifierConfig(lm_dim=16, embedding_dim=16, window_frames=40, d_model=32,
                                 n_heads=4, n_layers=2, num_labels=5, dropout=0.0, **overrides)


def test_wavelet_classifier_has_the_same_parameters_and_state_dict_keys():
    plain = SceneClassifier(_config(pooling="meanmax"))
    wavelet = SceneClassifier(_config(pooling="wavelet"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(wavelet) == count(plain)
    assert list(wavelet.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in wavelet.named_parameters()] == [n for n, _ in plain.named_parameters()]
    # the plain weights load into the wavelet model and the pooling really changes the output
    wavelet.load_state_dict(plain.state_dict())
    plain.eval()
    wavelet.eval()
    lm, emb = _randn(2, 40, 16, seed=5), _randn(2, 40, 16, seed=6)
    with torch.no_grad():
        assert not torch.allclose(plain(lm, emb), wavelet(lm, emb), atol=1e-4)


def test_wavelet_pooling_runs_after_every_layer():
    model = SceneClassifier(_config(pooling="wavelet")).eval()
    lm, emb = _randn(2, 40, 16, seed=7), _randn(2, 40, 16, seed=8)
    with torch.no_grad():
        x = model.inp(torch.cat([lm, emb], dim=-1)) + model.pos_emb[:40]
        for layer in model.encoder.layers:
            x = WaveletPooling(32, window_frames=40)(layer(x))
        expected = model.head(torch.cat([x.mean(dim=1), x.amax(dim=1)], dim=-1))
        torch.testing.assert_close(model(lm, emb), expected, rtol=0, atol=1e-6)


def _shipped_classifier() -> tuple[dict, SceneClassifier]:
    bundle_dir = bundle.default_bundle_dir()
    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    weights = torch.load(Path(bundle_dir) / bundle.CLOUD_WEIGHTS, map_location="cpu", weights_only=True)
    # a config as saved before the switch existed: no pooling keys (the shipped manifest has none)
    config = {k: v for k, v in manifest["classifier_config"].items() if k not in ("pooling", "pooling_scales")}
    classifier = SceneClassifier(SceneClassifierConfig(**config))
    classifier.load_state_dict(weights["classifier"])  # strict: same keys as the shipped weights
    return manifest, classifier.eval()


def _probe_inputs(window: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = 2 * window * 64
    lm = torch.sin(0.37 * torch.arange(n, dtype=torch.float32)).reshape(2, window, 64)
    emb = torch.cos(0.11 * torch.arange(n, dtype=torch.float32)).reshape(2, window, 64)
    return lm, emb


def test_shipped_bundle_without_pooling_key_behaves_as_before():
    manifest, classifier = _shipped_classifier()
    assert classifier.config.pooling == "meanmax"
    assert classifier.intermediate_pool is None
    lm, emb = _probe_inputs(manifest["classifier_config"]["window_frames"])
    with torch.no_grad():
        logits = classifier(lm, emb)
        # the forward pass as written before the switch: encoder as one block, then mean + max
        x = classifier.inp(torch.cat([lm, emb], dim=-1))
        x = classifier.encoder(x + classifier.pos_emb[: lm.shape[1]])
        manual = classifier.head(torch.cat([x.mean(dim=1), x.amax(dim=1)], dim=-1))
    torch.testing.assert_close(logits, manual, rtol=0, atol=1e-6)
    if manifest["sha256"][bundle.CLOUD_WEIGHTS] != REFERENCE_CLOUD_PT_SHA256:
        pytest.skip("the bundle was retrained; REFERENCE_LOGITS belong to the previous weights")
    torch.testing.assert_close(logits, torch.tensor(REFERENCE_LOGITS), rtol=0, atol=1e-4)


def test_small_wavelet_classifier_trains():
    torch.manual_seed(0)
    model = SceneClassifier(_config(pooling="wavelet"))
    lm, emb = _randn(16, 40, 16, seed=9), _randn(16, 40, 16, seed=10)
    targets = (_randn(16, 5, seed=11) > 0).float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(lm, emb), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
