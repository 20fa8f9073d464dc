"""Audio files -> the log-mel features an `audio` encoder reads (Whisper's front end).

The features are computed by transformers' `WhisperFeatureExtractor` (numpy only, built from the spec's
`mels`, `sample_rate`, `hop`, `n_fft`, `seconds`; no download), so they are the numbers Qwen2AudioProcessor
gives: each clip padded with silence (or cut) to `seconds`, with a mask of its real frames. WAV files are
read with the standard library's `wave`: PCM 8/16/24/32-bit, several channels averaged to one. A file that
is not a WAV, or whose data stop before its header says, is refused (E0610) rather than read in part; a
rate other than the spec's is refused (E0611), as the extractor refuses it, since resampling would change
the features silently.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlmspec.diagnostics import user_error


@dataclass(frozen=True, slots=True)
class Clip:
    """Mono samples in [-1, 1] and their rate."""

    samples: np.ndarray
    rate: int


def read_wav(source: str | Path | bytes, name: str | None = None) -> Clip:
    """A WAV file (a path or its bytes) as one mono clip; E0610 when it cannot be read whole."""
    label = name or (str(source) if not isinstance(source, bytes) else "the audio")
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise user_error("E0610", f"cannot read audio file {label}: {e.strerror or e}") from None
    try:
        with wave.open(io.BytesIO(raw), "rb") as w:
            channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            data = w.readframes(frames)
    except (wave.Error, EOFError, ValueError) as e:
        raise user_error("E0610", f"{label} is not a readable WAV file ({e})",
                         help="give a PCM .wav file (e.g. `ffmpeg -i in.mp3 -ar 16000 -ac 1 out.wav`)") from None
    if len(data) < frames * channels * width:
        raise user_error("E0610", f"{label} is truncated: its header says {frames} frames but it holds "
                         f"{len(data) // max(channels * width, 1)}", help="the file was cut short; write it again")
    if frames == 0:
        raise user_error("E0610", f"{label} holds no audio (0 frames)")
    if width == 1:
        x = (np.frombuffer(data, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    else:
        x = np.frombuffer(data, "<i4").astype(np.float32) / float(1 << 31)
    return Clip(x.reshape(-1, channels).mean(axis=1), rate)


def feature_extractor(cfg: Any) -> Any:
    """The Whisper feature extractor of an audio encoder's schema (`mels`, `sample_rate`, `hop`, `n_fft`,
    `seconds`)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=cfg.mels, sampling_rate=cfg.sample_rate, hop_length=cfg.hop,
                                   chunk_length=cfg.seconds, n_fft=cfg.n_fft)


def log_mel(cfg: Any, clips: list[Clip]) -> tuple[Tensor, Tensor]:
    """Clips -> (features [b x mels x frames] fp32, real frames per clip [b]), as Qwen2AudioProcessor pads
    them (`padding = max_length`); E0611 when a clip's rate is not the spec's `sample_rate`."""
    for c in clips:
        if c.rate != cfg.sample_rate:
            raise user_error("E0611", f"the audio is sampled at {c.rate} Hz but the encoder reads {cfg.sample_rate} "
                             "Hz", help=f"resample it first (e.g. `ffmpeg -i in.wav -ar {cfg.sample_rate} out.wav`)")
    out = feature_extractor(cfg)([c.samples for c in clips], sampling_rate=cfg.sample_rate, padding="max_length",
                                 return_attention_mask=True, return_tensors="np")
    return torch.from_numpy(out["input_features"]).float(), torch.from_numpy(out["attention_mask"]).sum(-1).long()


def tone(seconds: float, rate: int = 16000, hz: float = 440.0) -> bytes:
    """A sine tone as 16-bit mono WAV bytes (tests and demos make their clips with it)."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.5 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()
