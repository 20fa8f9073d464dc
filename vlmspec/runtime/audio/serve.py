"""`vlm serve` with audio: OpenAI's `input_audio` content parts (`{"data": base64, "format": "wav"}`).

A clip rides in the request where an image would (`GenRequest.image`), marked as audio by its type
(`AudioBytes`); the engine's preparation step reads it whole (a truncated or unreadable file is a 400 before
the request waits in the queue), computes its log-mel features and lays the prompt out with one placeholder
per audio token; the prefill encodes the group's clips together (`encode_audio`), padded, with each row's
count, so clips of different lengths share one forward.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vlmspec.runtime.audio.answer import refuse_pictures
from vlmspec.runtime.audio.encoder import audio_token_count
from vlmspec.runtime.audio.features import audio_encoder_name
from vlmspec.runtime.inputs.audio import log_mel, read_wav

if TYPE_CHECKING:
    from vlmspec.runtime.serve.engine import Engine, GenRequest


class AudioBytes(bytes):
    """An `input_audio` part's file bytes, told apart from an image's by type."""


@dataclass(frozen=True, slots=True)
class PreparedClip:
    """One clip's log-mel features [mels x frames] and its real frames."""

    features: Tensor
    frames: int


def audio_part(part: dict[str, Any]) -> AudioBytes:
    """The bytes of an `input_audio` part; ValueError (the server's 400) naming what is wrong."""
    body = part.get("input_audio")
    if not isinstance(body, dict) or not isinstance(body.get("data"), str):
        raise ValueError("input_audio parts need `input_audio.data` (base64) and `input_audio.format`")
    if body.get("format", "wav") != "wav":
        raise ValueError(f"input_audio format {body.get('format')!r}: only `wav` is read")
    try:
        return AudioBytes(base64.b64decode(body["data"], validate=True))
    except (binascii.Error, ValueError):
        raise ValueError("input_audio holds invalid base64") from None


def prepare_audio(engine: Engine, req: GenRequest) -> bool:
    """Prepare a request that carries a clip (True), or leave it to the image path (False). E0613: audio to a
    model without an audio encoder; E0614: an image to one that reads audio only; E0610 / E0611: a bad clip."""
    model = engine.model
    is_audio = isinstance(req.image, AudioBytes)
    reads_audio = "audio" in getattr(model, "roles", {}).values()  # tests wrap the model in stand-ins
    if not is_audio and not reads_audio:
        return False
    session_like = _Facts(model)
    refuse_pictures(session_like, req.image is not None and not is_audio)  # type: ignore[arg-type]
    if not is_audio:
        return False  # a text-only request
    enc = model.components[audio_encoder_name(model)]
    feats, frames = log_mel(enc.cfg, [read_wav(bytes(req.image), "the input_audio part")])
    req.pixels = PreparedClip(feats[0], int(frames[0]))
    count = int(audio_token_count(frames, enc.cfg.pool)[0])
    req.ids = engine.processor.encode_chat(req.history, req.question, 1, count, system=req.system)
    return True


def audio_features(engine: Engine, group: list[GenRequest]) -> dict[str, Tensor] | None:
    """The group's clips through the encoder and connectors (None when its rows hold no clips)."""
    if not group or not isinstance(group[0].pixels, PreparedClip):
        return None
    feats = torch.stack([r.pixels.features for r in group]).to(engine.device)
    frames = torch.tensor([r.pixels.frames for r in group], device=engine.device)
    return engine.model.encode_audio(feats, frames)


@dataclass(frozen=True, slots=True)
class _Facts:
    """The part of a session `refuse_pictures` reads."""

    model: Any
