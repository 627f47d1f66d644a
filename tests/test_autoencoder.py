"""S2 front end: log-mel patch features, the autoencoder, its ONNX export and its Ray Train stage."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchaudio

from shared_models.autoencoder import (
    LOG_MEL_FLOOR,
    AutoencoderConfig,
    LogMelPatches,
    PatchAutoencoder,
)
from shared_models.codebook import EdgeEncoder, codebook_id
from shared_models.constants import SAMPLE_RATE_HZ
from shared_models.frontend import FrontEndConfig, LearnedFrontEnd
from shared_models.frontends import FRONT_END_KINDS, build_front_end
from shared_models.synth import random_scene
from shared_models.wavio import read_wav
from training.dataset import frame_patches
from training.export import export_edge_onnx

FIXTURES = Path(__file__).parent / "fixtures"


def _real_frames() -> np.ndarray:
    frames = [
        frame_patches(read_wav(FIXTURES / name)[0])
        for name in ("siren_street.wav", "smoke_alarm_kitchen.wav", "quiet_room.wav")
    ]
    return np.concatenate(frames)  # (800, 400) float32: 20 s of sirens, beeps, hum, pink noise


def _sine_patches(freq_hz: float, n: int = 3, amplitude: float = 0.5) -> torch.Tensor:
    t_s = torch.arange(n * 400, dtype=torch.float64) / SAMPLE_RATE_HZ
    return (amplitude * torch.sin(2 * math.pi * freq_hz * t_s)).float().reshape(n, 400)


def _htk_band_centres_hz(n_mels: int, f_max_hz: float) -> np.ndarray:
    """Centre frequency of each HTK mel band, from the textbook formula (not the model's code)."""
    mel_max = 2595 * np.log10(1 + f_max_hz / 700)
    mels = np.linspace(0, mel_max, n_mels + 2)[1:-1]
    return 700 * (10 ** (mels / 2595) - 1)


# 1 kHz, and the centres of bands from 400 Hz up: below that the HTK bands are narrower than
# the 100 Hz DFT bins of a 10 ms sub-frame, so neighbouring low bands cannot be told apart
SINE_FREQS_HZ = [1000.0, *(_htk_band_centres_hz(32, SAMPLE_RATE_HZ / 2)[[5, 12, 20, 31]])]


@pytest.mark.parametrize("freq_hz", SINE_FREQS_HZ, ids=lambda f: f"{f:.0f}Hz")
def test_log_mel_of_a_sine_peaks_in_the_band_centred_nearest_its_frequency(freq_hz):
    config = AutoencoderConfig()
    assert config.n_mels == 32
    features = LogMelPatches(config)(_sine_patches(freq_hz))
    assert features.shape == (3, config.n_subframes * config.n_mels) == (3, 128)
    per_subframe = features.reshape(3, config.n_subframes, config.n_mels)  # (N, S, M)
    centres_hz = _htk_band_centres_hz(config.n_mels, SAMPLE_RATE_HZ / 2)
    nearest = int(np.argmin(np.abs(centres_hz - freq_hz)))
    # every sub-frame of every patch: the feature layout is (sub-frame, mel), not (mel, sub-frame)
    assert (per_subframe.argmax(dim=-1) == nearest).all()
    # and clearly above the bands far from it
    far = [m for m in range(config.n_mels) if abs(m - nearest) > 3]
    assert (per_subframe[..., nearest, None] - per_subframe[..., far] > 5.0).all()


def test_silence_maps_every_feature_to_the_log_floor():
    features = LogMelPatches(AutoencoderConfig())(torch.zeros(5, 400))
    assert features.shape == (5, 128)
    assert torch.allclose(features, torch.full_like(features, math.log(LOG_MEL_FLOOR)))


def test_matmul_dft_log_mel_matches_torchaudio_mel_spectrogram_on_real_audio():
    config = AutoencoderConfig()
    patches = torch.tensor(_real_frames())
    reference = torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE_HZ,
        n_fft=160,
        hop_length=80,
        n_mels=32,
        center=False,
        power=2.0,
        window_fn=torch.hann_window,  # periodic, as LogMelPatches
        mel_scale="htk",
        norm=None,
    ).double()
    mel = reference(patches.double())  # (N, M, S), in float64 so it is the exact answer
    expected = torch.log(mel + LOG_MEL_FLOOR).transpose(1, 2).flatten(1)  # (N, S * M)
    features = LogMelPatches(config)(patches)
    assert features.dtype == torch.float32
    error = (features.double() - expected).abs()
    # float32 rounding alone (torchaudio's own float32 result is as far off) leaves ~7e-5 in
    # quiet bands next to loud ones; a wrong window, frame or DFT sign is off by > 1e-2
    assert error.max() < 1e-4, f"max |error| {error.max():.2e}"
    assert error.mean() < 1e-5


def _encoder_with_fitted_normalisation(frames: np.ndarray) -> EdgeEncoder:
    torch.manual_seed(0)
    model = PatchAutoencoder(AutoencoderConfig())
    with torch.no_grad():
        model.fit_normalisation(model.features(torch.tensor(frames)))
        # K=64 random centroids where the embeddings are (as k-means would put them), so that the
        # codes vary from frame to frame; randn centroids would all lie far from the embeddings
        picked = torch.randperm(len(frames))[:64]
        centroids = model(torch.tensor(frames[picked.numpy()])) + 0.01 * torch.randn(64, 64)
    return EdgeEncoder(model.eval(), centroids).eval()


def test_normalisation_standardises_training_features_and_is_saved_in_the_state_dict():
    frames = _real_frames()
    model = _encoder_with_fitted_normalisation(frames).front_end
    with torch.no_grad():
        normalised, _ = model.reconstruct(torch.tensor(frames))
    assert normalised.mean(dim=0).abs().max() < 1e-3
    assert (normalised.std(dim=0) - 1).abs().max() < 1e-3
    state = model.state_dict()
    assert torch.equal(state["feature_mean"], model.feature_mean)
    assert not torch.equal(state["feature_std"], torch.ones(128))
    # the fixed DSP data is rebuilt from the config, not carried in checkpoints
    assert not any(k.startswith("features.") for k in state)
    rebuilt = PatchAutoencoder(AutoencoderConfig())
    rebuilt.load_state_dict(state)
    assert torch.equal(rebuilt(torch.tensor(frames)), model(torch.tensor(frames)))


def test_exported_autoencoder_edge_graph_matches_torch_and_has_no_stft(tmp_path):
    frames = _real_frames()
    encoder = _encoder_with_fitted_normalisation(frames)
    centroids = encoder.centroids.numpy()
    path = tmp_path / "edge.onnx"
    export_edge_onnx(encoder, path, {"codebook_id": str(codebook_id(centroids))})

    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert not ops & {"STFT", "DFT", "MelWeightMatrix"}, sorted(ops)
    assert "Gemm" in ops or "MatMul" in ops
    # only the encoder half ships: no decoder weights in the graph (256 -> 128 is its last layer)
    assert not [t.name for t in graph.initializer if "decoder" in t.name]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_emb, onnx_codes = session.run(None, {"patches": frames})
    with torch.no_grad():
        torch_emb, torch_codes = encoder(torch.tensor(frames))
    assert onnx_emb.shape == (len(frames), 64)
    assert np.abs(onnx_emb - torch_emb.numpy()).max() < 1e-4
    assert np.array_equal(onnx_codes, torch_codes.numpy())
    assert len(np.unique(onnx_codes)) > 10  # the codes are not trivially constant
    for n in (1, 7):  # the frame axis stays dynamic
        emb, codes = session.run(None, {"patches": frames[:n]})
        assert emb.shape == (n, 64) and codes.shape == (n,)


@pytest.mark.parametrize(
    ("kind", "config", "model_cls"),
    [
        ("dense", FrontEndConfig(hidden_dim=32), LearnedFrontEnd),
        ("autoencoder", AutoencoderConfig(hidden_dims=(96, 48), n_mels=24), PatchAutoencoder),
    ],
)
def test_build_front_end_rebuilds_each_kind_from_its_json_manifest_config(kind, config, model_cls):
    manifest_config = json.loads(json.dumps(dataclasses.asdict(config)))
    model = build_front_end(kind, manifest_config)
    assert type(model) is model_cls
    assert model.config == config  # hidden_dims came back as a tuple, so the configs compare equal
    assert model(torch.zeros(2, 400)).shape == (2, 64)
    assert kind in FRONT_END_KINDS


def test_build_front_end_rejects_an_unknown_kind_naming_the_known_ones():
    with pytest.raises(KeyError, match="unknown front end kind 'mfcc'.*dense.*autoencoder"):
        build_front_end("mfcc", {})
    with pytest.raises(ValueError, match="no field"):
        build_front_end("dense", {"hidden_units": 3})


@pytest.mark.slow
def test_ray_train_stage_lowers_the_reconstruction_loss(ray_session, tmp_path):
    from training.autoencoder_stage import (
        fit_autoencoder,
        fit_normalisation,
        reconstruction_loss,
    )
    from training.ray_stage import StageSpec

    rng = np.random.default_rng(7)
    audio = np.concatenate([random_scene(rng, duration_s=10.0).audio for _ in range(8)])
    patches = frame_patches(audio)  # (3200, 400)
    config = AutoencoderConfig()

    torch.manual_seed(0)
    untrained = PatchAutoencoder(config)
    norm = fit_normalisation(patches, config)
    untrained.set_normalisation(torch.tensor(norm["mean"]), torch.tensor(norm["std"]))
    before = reconstruction_loss(untrained, patches)

    spec = StageSpec("autoencoder", epochs=2, lr=2e-3, batch_size=64, seed=0)
    run = {"workers": 1, "storage_path": tmp_path / "ray", "use_gpu": False}
    model, _ = fit_autoencoder(patches, config, spec, run)
    after = reconstruction_loss(model, patches)

    assert not model.training
    # the driver's normalisation comes back with the trained weights
    assert torch.allclose(model.feature_mean, torch.tensor(norm["mean"]))
    assert after < 0.5 * before, f"reconstruction MSE {before:.3f} -> {after:.3f}"
    assert list((tmp_path / "ray" / "autoencoder").glob("checkpoint_*"))
