"""`whisper`: Whisper's audio encoder (and Qwen2-Audio's, with `pool = 2`), log-mel frames -> tokens.

Two GELU convolutions (kernel 3; the second halves the frames), learned positions, pre-LN blocks, then
an average over every `pool` tokens and the final LayerNorm. A clip is always `seconds` long (padded with
the silence the feature extractor writes); `lengths` says how many frames are real, and the blocks' keys
beyond them are masked, as Qwen2-Audio masks them. The tokens past a clip's real length are still returned:
`audio_token_count` says how many of them the prompt takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.audio import Whisper
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import VisualTokens
from vlmspec.runtime.registry import BuildContext, register


def conv_lengths(frames: Tensor) -> Tensor:
    """Tokens after the stride-2 convolution, for `frames` real log-mel frames."""
    return (frames - 1) // 2 + 1


def audio_token_count(frames: Tensor | int, pool: int) -> Tensor | int:
    """Tokens a clip of `frames` real frames takes in the prompt (Qwen2AudioProcessor's count for pool 2)."""
    conv = (frames - 1) // 2 + 1
    return (conv - pool) // pool + 1


class Attention(nn.Module):
    """Self-attention with biased q, v, out and an unbiased k (Whisper's layout and parameter names)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, t, w = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, w))


class Block(nn.Module):
    """Pre-LN block; parameter names as Whisper's checkpoints store them, so weights load by prefix alone."""

    def __init__(self, cfg: Whisper):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg.width, cfg.heads)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    """features [b x mels x frames] (+ real frames per clip, [b]) -> VisualTokens [b x positions/pool x width]."""

    def __init__(self, cfg: Whisper):
        super().__init__()
        self.cfg = cfg
        self.tiles = 0  # read by the image path's checks; audio has no tiles
        self.conv1 = nn.Conv1d(cfg.mels, cfg.width, 3, padding=1)
        self.conv2 = nn.Conv1d(cfg.width, cfg.width, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.positions, cfg.width)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.layer_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, features: Tensor, lengths: Tensor | None = None) -> VisualTokens:
        cfg = self.cfg
        if features.dim() != 3 or features.shape[1] != cfg.mels or features.shape[2] != cfg.frames:
            raise user_error("E0612", f"audio features must be [b x {cfg.mels} x {cfg.frames}] ({cfg.mels} mels, "
                             f"{cfg.seconds} s at hop {cfg.hop}), got {tuple(features.shape)}",
                             help="make them with vlmspec.runtime.inputs.audio.log_mel (it pads each clip)")
        x = features.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x)))).transpose(1, 2)
        x = x + self.embed_positions.weight.to(x.dtype)
        mask = None
        if lengths is not None:
            real = conv_lengths(lengths.to(x.device).long())
            keep = torch.arange(x.shape[1], device=x.device)[None, :] < real[:, None]  # [b x t] keys
            mask = keep[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        if cfg.pool > 1:
            x = F.avg_pool1d(x.transpose(1, 2), cfg.pool, cfg.pool).transpose(1, 2)
        return VisualTokens(self.layer_norm(x), None)


@register("audio", "whisper")
def build_whisper(comp: Component, ctx: BuildContext) -> AudioEncoder:
    return AudioEncoder(comp.config)
