"""One answer about one audio clip (`vlm generate --audio`, `vlm serve`'s `input_audio` parts).

The clip is read whole or refused (`read_wav`), turned into log-mel features at the spec's front end, and
the prompt takes one placeholder per audio token the clip gives (`audio_token_count`), as
Qwen2AudioProcessor expands `<|AUDIO|>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlmspec.diagnostics import user_error
from vlmspec.runtime.audio.encoder import audio_token_count
from vlmspec.runtime.audio.features import audio_encoder_name
from vlmspec.runtime.inputs.audio import Clip, log_mel, read_wav

if TYPE_CHECKING:
    from vlmspec.runtime.session import Session


def prepared(session: Session, prompt: str, clip: Clip) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(input_ids [1 x s], the audio features to splice in) for a prompt about one clip."""
    model = session.model
    enc = model.components[audio_encoder_name(model)]
    feats, frames = log_mel(enc.cfg, [clip])
    count = int(audio_token_count(frames, enc.cfg.pool)[0])
    ids = session.require_processor().encode_prompt(prompt, 1, tokens=count)
    input_ids = torch.tensor([ids], device=session.device)
    with torch.no_grad():
        features = model.encode_audio(feats.to(session.device), frames.to(session.device))
    return input_ids, features


def refuse_pictures(session: Session, given: bool) -> None:
    """E0613 for a model without an audio encoder; E0614 when images or videos come to one that reads audio
    only (it has no vision encoder to read them)."""
    audio_encoder_name(session.model)
    if given:
        raise user_error("E0614", "this model reads audio, not images or videos",
                         help="ask about a WAV file with --audio (an `input_audio` part in `vlm serve`)")


def answer_audio(session: Session, prompt: str, audio: str | Path | bytes, *, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, num_beams: int = 1, seed: int | None = None) -> str:
    """The answer to `prompt` about the WAV file (or its bytes) `audio`."""
    audio_encoder_name(session.model)  # E0613 before the file is read, for a model without an audio encoder
    input_ids, features = prepared(session, prompt, read_wav(audio))
    stop_ids = session.facts.stop_ids
    with torch.no_grad():
        new = session.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), image_features=features,
                                     max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                     temperature=temperature if temperature > 0 else 1.0, top_p=top_p,
                                     num_beams=num_beams, eos_token_id=list(stop_ids), seed=seed)
    kept = []
    for t in new[0].tolist():
        if t in stop_ids:
            break
        kept.append(t)
    return session.require_processor().decode(kept)
