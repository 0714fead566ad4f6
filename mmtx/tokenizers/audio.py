"""Audio -> log-mel frames -> tokens with 1D time positions.

The mel frontend is fixed signal processing (torchaudio), kept apart from the
learned stem, and runs in batches on the training device. Frames are computed
without centring (`center=False`): every frame lies inside its clip, so a clip
alone and the same clip zero-padded in a batch give the same frames, and the
key-padding mask marks exactly the frames (and tokens) that padding produced.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmtx.batch import AudioBatch, Tokens
from mmtx.errors import ConfigError, Count
from mmtx.nn.pos_embed import sincos_1d


def log_mel_normalise(mel: torch.Tensor) -> torch.Tensor:
    """Whisper's scaling of a power mel spectrogram: (log10(max(mel, 1e-10)) + 4) / 4.

    (Radford et al., 2022, without its per-clip dynamic-range floor, which would
    depend on the clip's loudest frame and so on padding.) Silence maps to -1.5,
    speech to roughly [-1, 1].
    """
    return (torch.log10(mel.clamp_min(1e-10)) + 4.0) / 4.0


def whisper_sinusoids(length: int, dim: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positions of the encoder (Radford et al., 2022, `sinusoids`): (length, dim), sines then
    cosines, the timescales spaced over dim / 2 - 1 steps (sincos_1d divides by dim / 2)."""
    if dim % 2:
        raise ConfigError(f"Whisper's positions need an even dim, got {dim}")
    step = math.log(max_timescale) / (dim // 2 - 1)
    inv = torch.exp(-step * torch.arange(dim // 2, dtype=torch.float64))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]  # (length, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


class WhisperLogMel(nn.Module):
    """Whisper's front end, as its feature extractor computes it: the clip zero-padded (or cut) to `seconds`,
    a centred STFT (reflect padding, Hann window, the last frame dropped), power, Slaney-scale mel filters,
    log10, a floor 8 below the clip's loudest value, then (x + 4) / 4. (B, L) -> (B, n_mels, seconds * rate / hop).
    Its filterbank and window are derived, not weights: non-persistent buffers."""

    def __init__(self, sample_rate: Count, n_fft: int, hop: int, n_mels: int, seconds: float = 30.0) -> None:
        super().__init__()
        import torchaudio.functional as AF

        self.n_fft, self.hop, self.samples = n_fft, hop, int(round(seconds * sample_rate))
        fb = AF.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate, norm="slaney",
                                mel_scale="slaney")  # (n_freqs, n_mels)
        self.register_buffer("fb", fb, persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        length = audio.shape[1]
        audio = F.pad(audio, (0, self.samples - length)) if length < self.samples else audio[:, :self.samples]
        stft = torch.stft(audio, self.n_fft, self.hop, window=self.window, return_complex=True)  # (B, n_freqs, F+1)
        power = stft[..., :-1].abs() ** 2  # (B, n_freqs, F)
        mel = (self.fb.T @ power).clamp_min(1e-10).log10()  # (B, n_mels, F)
        mel = torch.maximum(mel, mel.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (mel + 4.0) / 4.0


class MelTokenizer(nn.Module):
    """Waveforms (B, L) with lengths -> Tokens of log-mel frames.

    win_ms / hop_ms: the analysis window and hop (Whisper: 25 ms, 10 ms);
    n_mels: bands (None: 80 at 16 kHz, scaled to the sample rate, at least 20).
    stem: "stack" concatenates `stack` consecutive frames and projects them
    linearly; "conv" is Whisper's two 1D convolutions (the second with stride 2).
    front_end: "mmtx" (uncentred frames, so padding in a batch changes nothing; HTK mel; `log_mel_normalise`)
    or "whisper" (`WhisperLogMel`: every clip padded to 30 s and all of it attended to, as Whisper's weights
    expect). pos_embed: "sincos" (`sincos_1d`) or "whisper" (`whisper_sinusoids`).
    spec_augment: SpecAugment (Park et al., 2019) in training only:
    `num_masks` frequency masks of up to `freq_mask` bands and time masks of up
    to `time_mask` frames, drawn per example; null turns it off.
    """

    modality = "audio"  # the inputs it reads (mmtx.data.modalities)

    def __init__(
        self,
        dim: Count,
        sample_rate: Count = 16000,
        n_mels: int | None = None,
        win_ms: float = 25.0,
        hop_ms: float = 10.0,
        stem: str = "stack",
        stack: int = 1,
        spec_augment: dict | None = None,
        front_end: str = "mmtx",
        pos_embed: str = "sincos",
    ) -> None:
        super().__init__()
        import torchaudio.transforms as T

        if stem not in _STEMS:
            raise ConfigError(f"tokenizer.stem must be one of {sorted(_STEMS)}, got {stem!r}")
        if front_end not in ("mmtx", "whisper"):
            raise ConfigError(f"tokenizer.front_end must be mmtx or whisper, got {front_end!r}")
        if pos_embed not in ("sincos", "whisper"):
            raise ConfigError(f"tokenizer.pos_embed must be sincos or whisper for audio, got {pos_embed!r}")
        self.sample_rate = sample_rate
        self.n_fft = round(sample_rate * win_ms / 1000)
        self.hop = round(sample_rate * hop_ms / 1000)
        self.n_mels = n_mels or max(20, round(80 * sample_rate / 16000))
        self.front_end, self.pos_embed = front_end, pos_embed
        if front_end == "whisper":
            self.mel = WhisperLogMel(sample_rate, self.n_fft, self.hop, self.n_mels)
        else:
            self.mel = T.MelSpectrogram(
                sample_rate, n_fft=self.n_fft, hop_length=self.hop, n_mels=self.n_mels, center=False, power=2.0
            )
        self.stem = _STEMS[stem](self.n_mels, dim, stack)  # (B, F, n_mels) frames -> (B, T, D) tokens
        augment = spec_augment or {}
        self.freq_masks = nn.ModuleList(
            T.FrequencyMasking(augment["freq_mask"], iid_masks=True) for _ in range(augment.get("num_masks", 0))
        )
        self.time_masks = nn.ModuleList(
            T.TimeMasking(augment["time_mask"], iid_masks=True) for _ in range(augment.get("num_masks", 0))
        )
        self.dim = dim

    def frames(self, audio: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised log-mel frames (B, F, n_mels) and their validity mask (B, F)."""
        if self.front_end == "whisper":  # Whisper attends to its whole 30-second window, padding included
            with torch.autocast(audio.device.type, enabled=False):
                x = self.mel(audio.float())  # (B, L) -> (B, n_mels, F)
            x = self._augment(x).transpose(1, 2)  # (B, n_mels, F) -> (B, F, n_mels)
            return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if audio.shape[1] < self.n_fft:
            audio = F.pad(audio, (0, self.n_fft - audio.shape[1]))
        with torch.autocast(audio.device.type, enabled=False):  # the FFT and logs in float32
            mel = self._mel_power(audio.float())  # (B, L) -> (B, n_mels, F)
        x = self._augment(log_mel_normalise(mel)).transpose(1, 2)  # (B, n_mels, F) -> (B, F, n_mels)
        n = x.shape[1]
        if lengths is None:
            valid = torch.full((x.shape[0],), n, device=x.device)
        else:
            valid = ((lengths - self.n_fft) // self.hop + 1).clamp(1, n)  # frames inside each clip
        mask = torch.arange(n, device=x.device)[None, :] < valid[:, None]  # (B, F)
        return x * mask[..., None], mask

    def _mel_power(self, audio: torch.Tensor) -> torch.Tensor:
        """`self.mel(audio)` (torchaudio's MelSpectrogram: power, no centring) computed here from its own window and
        filterbank: torchaudio's spectrogram checks its arguments with `torch.jit.isinstance`, which torch.compile
        cannot trace (a graph break); the module stays for its buffers, which checkpoints hold."""
        spec = self.mel.spectrogram
        stft = torch.stft(audio, spec.n_fft, spec.hop_length, win_length=spec.win_length, window=spec.window,
                          center=False, normalized=False, onesided=True, return_complex=True)  # (B, n_freqs, F)
        power = torch.view_as_real(stft).pow(2).sum(-1)
        return torch.matmul(power.transpose(-1, -2), self.mel.mel_scale.fb).transpose(-1, -2)  # (B, n_mels, F)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """SpecAugment's masks on (B, n_mels, F) frames, in training."""
        if self.training:
            for mask in [*self.freq_masks, *self.time_masks]:
                x = mask(x)
        return x

    def forward(self, batch: AudioBatch) -> Tokens:
        x, mask = self.frames(batch.audio, batch.lengths)  # (B, F, n_mels), (B, F)
        return self.tokens(x, mask)

    def tokens(self, x: torch.Tensor, mask: torch.Tensor) -> Tokens:
        """Frames (B, F, n_mels) and their mask -> Tokens: the stem, then the positions."""
        x, mask = self.stem(x, mask)  # (B, T, D), (B, T)
        T = x.shape[1]
        if self.pos_embed == "whisper":
            pos = whisper_sinusoids(T, self.dim).to(x.device)
        else:
            pos = sincos_1d(torch.arange(T, device=x.device, dtype=torch.float32), self.dim)  # (T, D)
        return Tokens(x + pos.to(x.dtype), mask)


class StackStem(nn.Module):
    """`stack` consecutive frames concatenated and projected linearly: (B, F, n_mels) -> (B, ceil(F/k), D).
    A token is real if any of its frames is; its padding frames are zeros, as for the clip alone."""

    def __init__(self, n_mels: int, dim: Count, stack: int = 1) -> None:
        super().__init__()
        self.n_mels, self.stack = n_mels, stack
        self.frames_per_token = stack
        self.proj = nn.Linear(stack * n_mels, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, n, _ = x.shape
        pad = (-n) % self.stack
        x = F.pad(x, (0, 0, 0, pad))  # (B, F', n_mels), F' a multiple of stack
        x = self.proj(x.reshape(B, -1, self.stack * self.n_mels))  # (B, F'/k, k*n_mels) -> (B, T, D)
        return x, F.pad(mask, (0, pad)).reshape(B, -1, self.stack).any(-1)


class ConvStem(nn.Module):
    """Whisper's stem: two 1D convolutions with GELU, the second with stride 2: (B, F, n_mels) -> (B, ceil(F/2), D).
    Padding frames stay zero between the convolutions; token j is real if its centre frame 2j is."""

    def __init__(self, n_mels: int, dim: Count, stack: int = 1) -> None:  # `stack` is the other stem's
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.frames_per_token = 2  # the second convolution's stride

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask[:, None, :].to(x.dtype)  # (B, 1, F)
        h = F.gelu(self.conv1(x.transpose(1, 2))) * m  # (B, D, F); padding frames stay zero
        x = F.gelu(self.conv2(h)).transpose(1, 2)  # (B, D, ceil(F/2)) -> (B, T, D)
        return x, mask[:, ::2]


_STEMS = {"stack": StackStem, "conv": ConvStem}  # tokenizer.stem: frames -> tokens
