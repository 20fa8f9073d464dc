"""Audio -> the features `forward` and `generate` splice in (`image_features = ...`).

The audio encoder, then the connectors after it in data-flow order, then each clip's real tokens only: a
clip shorter than `seconds` takes `audio_token_count` placeholders, and the features past them are padding.
Rows are right-padded to the longest clip with each row's count under `IMAGE_LENGTHS`, the key the splice
already reads for images of different token counts, so one splice serves both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vlmspec.diagnostics import user_error
from vlmspec.runtime.audio.encoder import audio_token_count
from vlmspec.runtime.blocks import VisualTokens
from vlmspec.runtime.decoding import IMAGE_LENGTHS

if TYPE_CHECKING:
    from vlmspec.runtime.model import VisionLanguageModel


def audio_encoder_name(model: VisionLanguageModel) -> str:
    names = [n for n in model.order if model.roles[n] == "audio"]
    if not names:
        raise user_error("E0613", "this model has no audio encoder to read audio",
                         help="give it an `audio enc = whisper { ... }` component, or pass an image instead")
    return names[0]


def encode_audio(model: VisionLanguageModel, features: Tensor, lengths: Tensor | None = None) -> dict[str, Tensor]:
    """features [b x mels x frames] (one padded clip per sample), lengths [b] real frames per clip (default:
    all) -> {fusion: [b x most tokens x d], IMAGE_LENGTHS: [b] tokens per clip}."""
    name = audio_encoder_name(model)
    enc = model.components[name]
    if lengths is None:
        lengths = torch.full((features.shape[0],), features.shape[-1], dtype=torch.long)
    outs: dict[str, VisualTokens] = {name: enc(features, lengths)}
    for n in model.order:
        if model.roles[n] == "connector":
            outs[n] = model.components[n]([outs[s] for s in model.sources[n]], None)
    counts = audio_token_count(lengths.long(), enc.cfg.pool).to(outs[name].x.device)
    result: dict[str, Tensor] = {}
    for f in model.fusions:
        x = torch.cat([outs[s].x for s in model.sources[f]], dim=1)
        keep = int(counts.max())
        result[f] = x[:, :keep]
        result[IMAGE_LENGTHS] = counts
    return result
