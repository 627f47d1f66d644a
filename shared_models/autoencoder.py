"""S2 edge front end: a dense autoencoder over log-mel spectrogram patches.

Verma & Smith (2020) summarise each 25 ms patch of audio as a small log-mel
spectrogram and learn a 64-d code for it with a fully connected autoencoder
(3 layers down, 3 layers up), trained only to reconstruct its input, so it
needs no labels. The encoder half is the front end: its 64-d output is what
the codebook quantizes, so :class:`PatchAutoencoder` is a drop-in for
:class:`~shared_models.frontend.LearnedFrontEnd` inside
:class:`~shared_models.codebook.EdgeEncoder`.

Design choices:

- The log-mel features are computed inside the model, so the edge's one ONNX
  graph goes from waveform patches to codes. The edge runs onnxruntime and
  nothing else, so the DSP must be plain tensor ops: each 25 ms patch is cut
  into 4 fixed sub-frames of 10 ms (n_fft=160, hop 80, no padding), and the
  real DFT is two constant matmuls (cos and sin bases with the Hann window
  folded in). No ONNX STFT/DFT op is needed, and at n_fft=160 a matmul is as
  fast as an FFT would be. The price of 10 ms sub-frames is 100 Hz bins: below
  about 400 Hz the 32 mel bands are narrower than a bin, so neighbouring low
  bands see nearly the same power.
- The mel filterbank is fixed data (whisper stores its filters the same way):
  built once from ``torchaudio.functional.melscale_fbanks`` and kept as a
  buffer, so ONNX bakes it in as a constant. HTK mel scale with unit-height
  triangles (``norm=None``) because that is torchaudio's ``MelSpectrogram``
  default: anyone can reproduce the features with the stock transform (the
  tests do), and every band's power is on the same scale as the DFT bins.
- The DSP buffers are derived from the config, so they are not persistent:
  the checkpoint holds only what was learned or fitted. The per-feature
  normalisation (mean/std, fitted on training data) is persistent, so it
  ships in cloud.pt and is baked into the ONNX graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared_models.constants import EMBEDDING_DIM, PATCH_SAMPLES, SAMPLE_RATE_HZ
from shared_models.torch_pair import torchaudio_functional

AF = torchaudio_functional()  # torchaudio's functional API, once torch and torchaudio are one release

LOG_MEL_FLOOR = 1e-6
"""Added to the mel power before the natural log: digital silence maps to log(1e-6), about -13.8
(a full-scale sine reaches about +7.4, so the features span roughly 90 dB)."""

NORMALISATION_STD_FLOOR = 1e-2
"""A feature that barely varies in the training data (a band that is always at the floor) is
divided by at least this, so it cannot blow up into large inputs on new audio."""


@dataclass
class AutoencoderConfig:
    patch_samples: int = PATCH_SAMPLES  # 400 samples = 25 ms
    sample_rate_hz: int = SAMPLE_RATE_HZ
    n_fft: int = 160  # 10 ms sub-frames, 100 Hz DFT bins
    hop_samples: int = 80  # 5 ms: 4 sub-frames exactly cover a 400-sample patch
    n_mels: int = 32
    hidden_dims: tuple[int, ...] = (256, 128)
    embedding_dim: int = EMBEDDING_DIM

    @property
    def n_subframes(self) -> int:
        return (self.patch_samples - self.n_fft) // self.hop_samples + 1  # 4 by default

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1  # one-sided DFT bins: 81 by default

    @property
    def feature_dim(self) -> int:
        return self.n_subframes * self.n_mels  # 128 by default


class LogMelPatches(nn.Module):
    """(N, patch_samples) waveform -> (N, n_subframes * n_mels) log-mel, sub-frame-major.

    Matches ``torchaudio.transforms.MelSpectrogram(n_fft, hop_length=hop_samples,
    center=False, power=2.0, mel_scale="htk", norm=None)`` (periodic Hann window)
    followed by ``log(mel + LOG_MEL_FLOOR)``, transposed to (sub-frame, mel).
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        if config.n_subframes < 1:
            raise ValueError(
                f"n_fft={config.n_fft} is longer than the patch ({config.patch_samples})"
            )
        # sample index of each sub-frame: row i is i*hop .. i*hop + n_fft - 1
        starts = torch.arange(config.n_subframes) * config.hop_samples
        frame_index = starts[:, None] + torch.arange(config.n_fft)[None, :]  # (S, n_fft)
        self.register_buffer("frame_index", frame_index, persistent=False)
        # real DFT as two matmuls, Hann window folded into the bases; built in float64 so the
        # float32 bases are correctly rounded
        n = torch.arange(config.n_fft, dtype=torch.float64)
        k = torch.arange(config.n_freqs, dtype=torch.float64)
        window = torch.hann_window(config.n_fft, periodic=True, dtype=torch.float64)  # (n_fft,)
        angle = 2.0 * math.pi * n[:, None] * k[None, :] / config.n_fft  # (n_fft, F)
        self.register_buffer(
            "dft_cos", (window[:, None] * torch.cos(angle)).float(), persistent=False
        )
        self.register_buffer(
            "dft_sin", (window[:, None] * torch.sin(angle)).float(), persistent=False
        )
        mel_fbank = AF.melscale_fbanks(
            n_freqs=config.n_freqs,
            f_min=0.0,
            f_max=config.sample_rate_hz / 2,
            n_mels=config.n_mels,
            sample_rate=config.sample_rate_hz,
            norm=None,
            mel_scale="htk",
        )  # (F, M)
        self.register_buffer("mel_fbank", mel_fbank.float(), persistent=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        frames = patches[:, self.frame_index]  # (N, S, n_fft): one GatherND in ONNX
        real = frames @ self.dft_cos  # (N, S, F)
        imag = frames @ self.dft_sin  # (N, S, F); the sign of the imaginary part is lost in power
        power = real.square() + imag.square()  # (N, S, F)
        log_mel = torch.log(power @ self.mel_fbank + LOG_MEL_FLOOR)  # (N, S, M)
        return log_mel.flatten(1)  # (N, S * M), sub-frame-major


def _mlp(dims: list[int]) -> nn.Sequential:
    """Fully connected layers through ``dims``, ReLU between them and none after the last."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PatchAutoencoder(nn.Module):
    """Log-mel patch features -> 64-d embedding -> reconstructed (normalised) features."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.features = LogMelPatches(config)
        dims = [config.feature_dim, *config.hidden_dims, config.embedding_dim]  # 128, 256, 128, 64
        self.encoder = _mlp(dims)
        self.decoder = _mlp(dims[::-1])  # 64, 128, 256, 128
        # fitted on training features before training (fit_normalisation); identity until then
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_std", torch.ones(config.feature_dim))

    @torch.no_grad()
    def fit_normalisation(self, features: torch.Tensor) -> None:
        """Set the per-feature mean/std from raw log-mel ``features`` (N, feature_dim)."""
        features = features.double()  # sums over many rows of values near -13.8
        self.set_normalisation(features.mean(dim=0), features.std(dim=0))

    @torch.no_grad()
    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Load a normalisation computed elsewhere (e.g. by the training driver)."""
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32).clamp_min(NORMALISATION_STD_FLOOR)
        if mean.shape != self.feature_mean.shape or std.shape != self.feature_std.shape:
            raise ValueError(
                f"normalisation must have shape {tuple(self.feature_mean.shape)}, "
                f"got mean {tuple(mean.shape)} and std {tuple(std.shape)}"
            )
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def normalised_features(self, patches: torch.Tensor) -> torch.Tensor:
        # patches: (N, P) -> (N, feature_dim), about zero mean and unit variance on training data
        return (self.features(patches) - self.feature_mean) / self.feature_std

    def encode_features(self, features: torch.Tensor) -> torch.Tensor:
        # normalised features: (N, feature_dim) -> embeddings (N, D)
        return self.encoder(features)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # patches: (N, P) float waveform -> embeddings (N, D), as LearnedFrontEnd
        return self.encode_features(self.normalised_features(patches))

    def reconstruct(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, P) -> (normalised features, their reconstruction), both (N, feature_dim)."""
        features = self.normalised_features(patches)
        return features, self.decoder(self.encode_features(features))

    def reconstruction_loss(self, patches: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the reconstruction, in normalised feature units."""
        features, reconstruction = self.reconstruct(patches)
        return F.mse_loss(reconstruction, features)
