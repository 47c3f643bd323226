"""Audio -> normalised log-mel filterbank windows [A, L, mel_bins], as the GRAM paper's code prepares it.

decord's AudioReader resamples to 16 kHz mono (from a separate audio file or the video's own track), then
torchaudio's Kaldi-compatible fbank (25 ms window, 10 ms hop, 64 mel bins), normalised with the AudioSet
statistics the paper uses: (fbank - 15.41663) / (2 * 6.55582). The result is zero-padded or cut into A windows
of L frames (evenly spaced over the clip when it is longer than A * L frames).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi
from decord import AudioReader, DECORDError, cpu

from gram_ray.config import AudioConfig
from gram_ray.data.errors import DecodeError

__all__ = ["load_waveform", "fbank_windows", "decode_audio"]


def load_waveform(path: str, sample_rate: int) -> np.ndarray:
    """Mono float32 samples at sample_rate."""
    if not Path(path).is_file():
        raise DecodeError("audio file not found")
    try:
        samples = AudioReader(path, ctx=cpu(0), sample_rate=sample_rate, mono=True)[:].asnumpy()
    except DECORDError as e:
        raise DecodeError(f"no readable audio track ({str(e).splitlines()[0][:200]})") from None
    return samples.reshape(-1).astype(np.float32)


def fbank_windows(waveform: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    if waveform.size == 0 or np.abs(waveform).max() < cfg.silence_threshold:
        raise DecodeError("audio is silent")
    minimum = int(cfg.sample_rate * cfg.frame_length_ms / 1000)
    if waveform.size < minimum:
        raise DecodeError(f"audio is shorter than one {cfg.frame_length_ms} ms filterbank window")
    fbank = kaldi.fbank(
        torch.from_numpy(waveform)[None],
        htk_compat=True,
        sample_frequency=cfg.sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=cfg.mel_bins,
        dither=0.0,
        frame_length=cfg.frame_length_ms,
        frame_shift=cfg.frame_shift_ms,
    )
    fbank = ((fbank - cfg.norm_mean) / (2 * cfg.norm_std)).numpy()
    total, length = cfg.windows * cfg.window_frames, cfg.window_frames
    if fbank.shape[0] <= total:
        padded = np.zeros((total, cfg.mel_bins), dtype=np.float32)
        padded[: fbank.shape[0]] = fbank
        return padded.reshape(cfg.windows, length, cfg.mel_bins)
    starts = np.linspace(0, fbank.shape[0] - length, cfg.windows).astype(int)
    return np.stack([fbank[s : s + length] for s in starts]).astype(np.float32)


def decode_audio(audio_path: str | None, video_path: str | None, cfg: AudioConfig) -> np.ndarray:
    """[A, L, mel_bins] from the separate audio file when there is one, else from the video's own track."""
    source = audio_path or video_path
    if source is None:
        raise DecodeError("no audio file and no video to take the audio track from")
    return fbank_windows(load_waveform(source, cfg.sample_rate), cfg)
