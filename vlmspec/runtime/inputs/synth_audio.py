"""`vlm data synth --audio`: tones of three pitches, so that a tiny audio spec learns something measurable on CPU.

Each clip is a sine tone of a random length, loudness and frequency inside one of three bands an octave and
more apart (low 150-300 Hz, middle 600-1,000 Hz, high 2,000-3,500 Hz), with a little noise; the question asks
which band it is, with the bands as options written as `vlm eval --task video_qa` writes them, so the answer is
one word and the held-out score measures the audio alone (the question is the same for every clip).
"""

from __future__ import annotations

import io
import json
import random
import wave
from pathlib import Path

import numpy as np

from vlmspec.fsutil import atomic_write_text

PITCHES: dict[str, tuple[float, float]] = {"low": (150.0, 300.0), "middle": (600.0, 1000.0), "high": (2000.0, 3500.0)}
AUDIO_QUESTION = "Is the tone low, middle or high?"


def tone_wav(hz: float, seconds: float, rate: int, loudness: float, rng: np.random.Generator) -> bytes:
    """A sine tone with a short fade in and out (no click) and faint noise, as 16-bit mono WAV bytes."""
    t = np.arange(int(seconds * rate)) / rate
    ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)
    x = loudness * np.sin(2 * np.pi * hz * t) * ramp + rng.normal(0.0, 0.01, t.shape)
    pcm = (np.clip(x, -1.0, 1.0) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def synthesize_audio(out: str | Path, n_train: int = 400, n_test: int = 60, seconds: float = 1.0,
                     rate: int = 16000, seed: int = 0) -> dict:
    """Write tone clips with training conversations asking their pitch, and held-out ones:

        audio/NNNNNN.wav   train_audio.json   test_audio.json

    Clips last between half of `seconds` and all of it (a shorter clip gives fewer audio tokens, as in use);
    held-out clips cycle through the pitches, so chance is one in three. Deterministic for a given seed."""
    root = Path(out)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    pitches = list(PITCHES)
    question = "\n".join([AUDIO_QUESTION, "Options:", *(f"({'ABC'[i]}) {p}" for i, p in enumerate(pitches)),
                          "Only give the best option."])
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    idx = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(n):
            pitch = pitches[k % len(pitches)] if split == "test" else rng.choice(pitches)
            hz = rng.uniform(*PITCHES[pitch])
            length = rng.uniform(seconds / 2, seconds)
            name = f"audio/{idx:06d}.wav"
            (root / name).write_bytes(tone_wav(hz, length, rate, rng.uniform(0.2, 0.8), noise))
            splits[split].append({"id": f"{split}-{idx}", "audio": name, "conversations": [
                {"from": "human", "value": f"<audio>\n{question}"}, {"from": "gpt", "value": pitch}]})
            idx += 1
    atomic_write_text(root / "train_audio.json", json.dumps(splits["train"], indent=1))
    atomic_write_text(root / "test_audio.json", json.dumps(splits["test"], indent=1))
    return {"train_clips": n_train, "test_clips": n_test}
