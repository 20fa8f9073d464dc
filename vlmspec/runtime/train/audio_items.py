"""Audio samples in training: read as `vlm generate --audio` reads them, written in the prompt as it writes them.

A stage's data loader (`StageImages`) holds one source and one transform per sample. For a stage with audio
records the source is an `AudioRef` and the transform an `AudioTransform`, which gives the clip's log-mel
features at the spec's front end (`log_mel`: Whisper's extractor, padded to `seconds`) and its real frame
count, so training sees exactly the numbers generation and Qwen2AudioProcessor give. The prompt takes one
placeholder per audio token the clip gives (`audio_token_count`), as `vlmspec.runtime.audio.answer` writes it.

What cannot be trained is refused rather than silently changed: an audio model's stage given image or video
records (E0543: it has no vision encoder, and dropping the pictures would train on text alone), audio and
non-audio samples in one micro-batch (E0545), and packed rows of audio (E0547).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlmspec.diagnostics import user_error
from vlmspec.runtime.audio.encoder import audio_token_count
from vlmspec.runtime.inputs.audio import log_mel, read_wav


@dataclass(frozen=True, slots=True)
class AudioRef:
    """A sample's WAV file, as `StageImages` holds it beside image paths."""

    path: Path


@dataclass(frozen=True, slots=True)
class AudioItem:
    """One clip's features [mels x frames] (padded to the encoder's `seconds`) and its real frame count."""

    features: Tensor
    frames: int
    tokens: int


class AudioTransform:
    """`AudioRef` -> the clip's `AudioItem` at the audio encoder's front end (`cfg`: its schema)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def __call__(self, src: Any) -> AudioItem:
        if not isinstance(src, AudioRef):
            raise user_error("E0543", "this model reads audio, and a sample holds an image or a video",
                             help="give the audio model's stages records with `\"audio\": \"clip.wav\"`")
        features, frames = log_mel(self.cfg, [read_wav(src.path)])
        n = int(frames[0])
        return AudioItem(features[0], n, int(audio_token_count(frames, self.cfg.pool)[0]))


def is_audio_batch(items: Sequence[Any], stage: str) -> bool:
    """Whether a micro-batch's items are clips; E0545 when it mixes clips with other samples."""
    kinds = {isinstance(x, AudioItem) for x in items}
    if kinds == {True, False}:
        raise user_error("E0545", f"stage `{stage}`: a micro-batch mixes audio and non-audio samples, which one "
                         "forward cannot take", help="give the stage audio records only")
    return kinds == {True}


def audio_training_batch(processor: Any, examples: Sequence[Any], items: Sequence[AudioItem],
                         stage: Any) -> dict[str, Any]:
    """A micro-batch of audio samples: the processor's right-padded ids and labels, the clips' features
    (`audio` [b x mels x frames]) and real frame counts (`audio_lengths` [b]) that the forward encodes."""
    if stage.packs:
        raise user_error("E0547", f"stage `{stage.name}` packs rows, but its samples are audio clips: packed rows "
                         "number one image grid per sample", help="drop `packing` from the stage")
    return {**processor.training_batch(examples, None),
            "audio": torch.stack([x.features for x in items]),
            "audio_lengths": torch.tensor([x.frames for x in items], dtype=torch.long)}


def audio_config(analysis: Any) -> Any | None:
    """The schema of the model's audio encoder, or None for a model that reads no audio."""
    found = [c for c in analysis.ir.components.values() if c.role == "audio"]
    return found[0].config if found else None
