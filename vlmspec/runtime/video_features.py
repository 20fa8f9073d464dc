"""A video through a model's vision path: frames -> temporal patches -> encoder and connectors -> features.

Qwen2-VL reads a video as its images: each temporal patch (`temporal_patch` consecutive frames, one 3-D
patch embedding) is encoded on its own (its tokens attend within that patch, as transformers splits the
tower's attention per frame group), the merger runs on each, and the video's tokens are the patches' one
after another. So the encoders and connectors run unchanged on [(b x patches) x c x T x h x w]; what
differs is where the features go (the video placeholder) and how M-RoPE numbers them (a time axis), which
the two entries `VIDEO_GRID` and `VIDEO_TIME` carry through generation with the features.

`answer_video` is `vlm generate --video`: the spec's reader, the prompt with one video placeholder per token
where an image would go, the features, then the ordinary `generate`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vlmspec.diagnostics import user_error
from vlmspec.runtime.decoding import VIDEO_GRID, VIDEO_TIME

if TYPE_CHECKING:
    from vlmspec.compiler.compile import Analysis
    from vlmspec.runtime.inputs.processor import Processor
    from vlmspec.runtime.inputs.video import VideoReader
    from vlmspec.runtime.model import VisionLanguageModel
    from vlmspec.runtime.session import Session


def video_encoder(model: VisionLanguageModel) -> str:
    """The one vision encoder that reads videos (`video = frames(...)`), else E0604."""
    names = [n for n in model.order if model.roles[n] == "vision"]
    readers = [n for n in names if getattr(model.components[n].cfg, "video", None) is not None]
    if len(names) != 1 or len(readers) != 1 or len(model.in_sequence) != 1:
        raise user_error("E0604", "this model does not read videos: it needs one vision encoder with `video = "
                         "frames(...)` feeding one in-sequence fusion",
                         help="add `video = frames(fps = 2)` to the encoder (with `resolution = dynamic(...)`)")
    return readers[0]


def encode_videos(model: VisionLanguageModel, frames: Tensor, seconds: Tensor | None = None) -> dict[str, Tensor]:
    """frames [b x F x c x h x w] (one video per sample, F a multiple of the encoder's `temporal_patch`, the
    reader's padding included) -> {fusion: [b x (patches * tokens) x d], VIDEO_GRID: [b x 3], VIDEO_TIME: [b]}.
    seconds: [b] seconds of video per temporal patch (`Video.seconds_per_patch`), read when the spec has
    `tokens_per_second` (absolute time ids, Qwen2.5-VL); default 1."""
    name = video_encoder(model)
    cfg = model.components[name].cfg
    if cfg.video.pool:
        return encode_pooled(model, frames)
    t = cfg.temporal_patch
    if not isinstance(frames, Tensor) or frames.dim() != 5 or frames.shape[1] % t:
        shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise user_error("E0604", f"videos must be [b x frames x c x h x w] with frames a multiple of "
                         f"temporal_patch = {t}, got {shape}", help="read them with `VideoReader`, which pads them")
    b, f, c, h, w = frames.shape
    groups = frames.reshape(b * f // t, t, c, h, w)
    groups = groups.transpose(1, 2) if t > 1 else groups[:, 0]
    outs = {}
    for comp_name in model.order:
        comp = model.components[comp_name]
        if model.roles[comp_name] == "vision":
            outs[comp_name] = comp(groups)
        else:
            outs[comp_name] = comp([outs[s] for s in model.sources[comp_name]], None)
    (fusion,) = model.in_sequence
    sources = model.sources[fusion]
    x = torch.cat([outs[s].x for s in sources], dim=1)
    grid = outs[sources[0]].grid
    if grid is None or grid[0] * grid[1] != x.shape[1]:
        raise user_error("E0604", f"the video's tokens in `{fusion}` keep no (rows, columns) grid to number",
                         help="read videos through an encoder and connector that keep the patch grid")
    features = {fusion: x.reshape(b, (f // t) * x.shape[1], x.shape[2])}
    features[VIDEO_GRID] = torch.tensor([[f // t, grid[0], grid[1]]] * b, device=x.device)
    tps = cfg.video.tokens_per_second
    per_patch = (seconds.float().reshape(b) if seconds is not None else torch.ones(b)) * tps if tps \
        else torch.ones(b)
    features[VIDEO_TIME] = per_patch.to(device=x.device, dtype=torch.float32)
    return features


def pool_frames(x: Tensor, side: int) -> Tensor:
    """[n x g*g x d] projected frame tokens -> [n x side*side x d]: the square grid shrunk bilinearly (without
    corner alignment) to side x side, LLaVA-OneVision's `apply_pooling`."""
    n, tokens, d = x.shape
    g = math.isqrt(tokens)
    if g * g != tokens:
        raise user_error("E0609", f"frames(pool = ...) pools a square grid of tokens, but a frame gives {tokens}",
                         help="read frames through an encoder whose feature keeps every patch and no class token "
                         "(`feature(tokens = patches)`)")
    grid = x.reshape(n, g, g, d).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.interpolate(grid, size=(side, side), mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(n, side * side, d)


def encode_pooled(model: VisionLanguageModel, frames: Tensor) -> dict[str, Tensor]:
    """OneVision's video path: frames [b x F x c x s x s], each through the encoder and connectors as one
    square image, pooled (`pool_frames`), the frames' tokens one after another and the connector's
    `image_newline` once after the last -> {fusion: [b x (F * side^2 + 1) x d], VIDEO_GRID, VIDEO_TIME}
    (the grid marks the features as a video's, so that its placeholders are read as visual tokens)."""
    from vlmspec.compiler.video import pooled_side

    name = video_encoder(model)
    cfg = model.components[name].cfg
    s = cfg.image_size
    if not isinstance(frames, Tensor) or frames.dim() != 5 or tuple(frames.shape[-2:]) != (s, s):
        shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise user_error("E0609", f"pooled videos must be [b x frames x c x {s} x {s}] (frames(pool = ...) reads "
                         f"each frame as the encoder's square), got {shape}",
                         help="read them with `VideoReader`, which resizes each frame to the square")
    b, f, c = frames.shape[:3]
    outs: dict[str, Any] = {}
    for comp_name in model.order:
        comp = model.components[comp_name]
        if model.roles[comp_name] == "vision":
            outs[comp_name] = comp(frames.reshape(b * f, c, s, s))
        else:
            outs[comp_name] = comp([outs[src] for src in model.sources[comp_name]], None)
    (fusion,) = model.in_sequence
    sources = model.sources[fusion]
    side = pooled_side(cfg)
    x = pool_frames(torch.cat([outs[src].x for src in sources], dim=1), side).reshape(b, f * side * side, -1)
    newline = next((getattr(model.components[src], "image_newline", None) for src in sources), None)
    if newline is None:
        raise user_error("E0609", f"frames(pool = ...) ends a video with the connector's `image_newline`, but "
                         f"`{sources[0]}` has none", help="give the encoder `layout = anyres(..., newline = true)` "
                         "(LLaVA-OneVision), whose connector keeps the newline")
    x = torch.cat([x, newline.to(x.dtype)[None, None].expand(b, 1, -1)], dim=1)
    return {fusion: x, VIDEO_GRID: torch.tensor([[f, side, side]] * b, device=x.device),
            VIDEO_TIME: torch.ones(b, device=x.device)}


def video_reader(analysis: Analysis) -> VideoReader:
    """The `VideoReader` of the spec's video encoder (E0604 when none reads videos)."""
    from vlmspec.compiler.video import video_encoders, video_factor
    from vlmspec.runtime.inputs.video import VideoReader

    names = video_encoders(analysis.ir)
    if len(names) != 1:
        raise user_error("E0604", "this model does not read videos: no vision encoder has `video = frames(...)`",
                         help="add `video = frames(fps = 2)` to the encoder (with `resolution = dynamic(...)`)")
    cfg = analysis.ir.components[names[0]].config
    if cfg.video.pool:  # OneVision's square frames: no merge factor to size them by
        return VideoReader.pooled(cfg)
    return VideoReader.from_encoder(cfg, video_factor(analysis.ir, names[0]))


def video_slot(processor: Processor, model: VisionLanguageModel, tokens: int) -> str:
    """The text a video stands for in a prompt: its placeholder (the tokenizer's token for `frames(token_id)`,
    Qwen2-VL's `<|video_pad|>`; else the image placeholder) once per visual token. Written where an image
    goes, it lands between the chat template's `<|vision_start|>` and `<|vision_end|>` as Qwen2-VL's
    template writes a video."""
    token = processor.image_token
    if model.video_token_id is not None:
        token = processor.tokenizer.convert_ids_to_tokens(model.video_token_id)
        if not isinstance(token, str) or processor.tokenizer.get_vocab().get(token) != model.video_token_id:
            raise user_error("E0604", f"the tokenizer has no token for the video placeholder id "
                             f"{model.video_token_id}", help="set frames(token_id = ...) to the tokenizer's "
                             "`<|video_pad|>` id, or drop it to use the image placeholder")
    return token * tokens


def answer_video(session: Session, prompt: str, video: str, *, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, num_beams: int = 1, seed: int | None = None) -> str:
    """One answer to `prompt` about the video file or frame folder `video` (`vlm generate --video`)."""
    from vlmspec.runtime.devices import move

    processor = session.require_processor()
    model = session.model
    reader = video_reader(session.analysis)
    clip = reader(video)
    ids = processor.encode_prompt(prompt, 1, tokens=video_slot(processor, model, clip.tokens))
    input_ids = torch.tensor([ids], device=session.device)
    frames = move(clip.frames[None], session.device)
    seconds = torch.tensor([clip.seconds_per_patch(reader.rule.temporal)])
    stop_ids = session.facts.stop_ids
    with torch.no_grad():
        features = model.encode_videos(frames, seconds)
        new = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), image_features=features,
                             max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else 1.0, top_p=top_p, num_beams=num_beams,
                             eos_token_id=list(stop_ids), seed=seed)
    kept = []
    for t in new[0].tolist():
        if t in stop_ids:
            break
        kept.append(t)
    return processor.decode(kept)
