"""The vision encoder that CLIP-style ViT (`vit`), SigLIP (`siglip`), EVA / BLIP-2 (`eva`) and InternViT
(`internvit`) build.

One module covers the four kinds (their builders: `vit.py`, `siglip.py`, `eva.py`, `internvit.py`) because
they differ only in switches the schema already declares (class token, pre-LayerNorm, patch bias,
activation, layer scale, qk-norm) and in the attention layout (EVA's fused QKV, also used by a `vit` with
`position = rope2d`, Qwen2-VL's tower). Parameter names follow
the Hugging Face vision towers (`embeddings.patch_embedding`, `pre_layrnorm`,
`encoder.layers.N.self_attn.q_proj`, `post_layernorm`; EVA and rope2d: `self_attn.qkv`,
`self_attn.projection`) so an importer can load checkpoints by key (Qwen2-VL's `blocks.N.attn.qkv`
through a renaming layout, see `weights/formats/qwen2_vl.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.compiler.schema.vision import SigLIP, ViTBase
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import (
    CheckpointedBlocks,
    RMSNorm,
    Rotary,
    VisualTokens,
    activation,
    attend,
    check_divisible,
    inv_frequencies,
    split_heads,
    tiles_in_use,
    tracing,
)
from vlmspec.runtime.spec_paths import GROUP, SpecPart


def rotate_fp32(rotary: Rotary, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q and k in float32 (the tables are float32) and return them in their own dtype, as
    Qwen2-VL's `apply_rotary_pos_emb_vision` does; a bf16 encoder then attends in bf16."""
    dtype = q.dtype
    q, k = rotary.apply(q.float(), k.float())
    return q.to(dtype), k.to(dtype)


#: InternViT's query / key RMSNorm epsilon (fixed, whatever the encoder's `norm_eps`)
QK_NORM_EPS = 1e-6


class VisionAttention(nn.Module):
    """CLIP / SigLIP / InternViT attention: separate q, k, v and output projections (biased unless
    `attn_bias = false`, as in Llama 3.2 Vision; InternViT keeps the output's bias), and with `qk_norm` an
    RMSNorm over the whole width of q and of k before they are split into heads (InternViT-6B)."""

    def __init__(self, width: int, heads: int, bias: bool = True, out_bias: bool | None = None,
                 qk_norm: bool = False):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=bias)
        self.k_proj = nn.Linear(width, width, bias=bias)
        self.v_proj = nn.Linear(width, width, bias=bias)
        self.out_proj = nn.Linear(width, width, bias=bias if out_bias is None else out_bias)
        self.q_norm = RMSNorm(width, eps=QK_NORM_EPS) if qk_norm else None
        self.k_norm = RMSNorm(width, eps=QK_NORM_EPS) if qk_norm else None

    def forward(self, x: Tensor, rotary: Rotary | None = None, mask: Tensor | None = None) -> Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        if rotary is not None:
            q, k = rotate_fp32(rotary, q, k)
        return self.out_proj(attend(q, k, v, mask))


class EVAAttention(nn.Module):
    """EVA / BLIP-2 attention: one fused QKV projection (bias stored whole, as HF Blip2 does) and `projection`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.projection = nn.Linear(width, width)

    def forward(self, x: Tensor, rotary: Rotary | None = None, mask: Tensor | None = None) -> Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        if rotary is not None:
            q, k = rotate_fp32(rotary, q, k)
        return self.projection(attend(q, k, v, mask))


class VisionMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedVisionMLP(nn.Module):
    """`gated_mlp = true` (Qwen2.5-VL's SwiGLU): down(act(gate(x)) * up(x)), biased, keys `gate_proj`,
    `up_proj`, `down_proj` as in the checkpoint."""

    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.gate_proj = nn.Linear(width, hidden)
        self.up_proj = nn.Linear(width, hidden)
        self.down_proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def vision_norm(cfg: ViTBase, kind: str | None = None) -> nn.Module:
    """The encoder's normalisation (`norm`, or `kind`): LayerNorm, or RMSNorm (statistics in float32) for
    Qwen2.5-VL and InternViT-6B."""
    kind = kind or cfg.norm
    return RMSNorm(cfg.width, eps=cfg.norm_eps) if kind == "rms" else nn.LayerNorm(cfg.width, eps=cfg.norm_eps)


def vision_mlp(cfg: ViTBase) -> nn.Module:
    return (GatedVisionMLP if cfg.gated_mlp else VisionMLP)(cfg.width, cfg.mlp_dim, cfg.act)


#: where InternViT starts its layer scales (its `layer_scale_init_value`)
LAYER_SCALE_INIT = 0.1


class VisionLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)); a gated one (Llama 3.2 Vision's
    global layers) scales each branch by tanh of its own scalar (`gate_attn`, `gate_ffn`); with
    `layer_scale` (InternViT) each branch is also multiplied channel-wise by its own learned vector
    (`scale_attn`, `scale_ffn`)."""

    def __init__(self, cfg: ViTBase, fused_qkv: bool, gated: bool = False):
        super().__init__()
        w = cfg.width
        self.self_attn = EVAAttention(w, cfg.heads) if fused_qkv else VisionAttention(
            w, cfg.heads, cfg.attn_bias, cfg.out_bias, cfg.qk_norm)
        self.layer_norm1 = vision_norm(cfg)
        self.mlp = vision_mlp(cfg)
        self.layer_norm2 = vision_norm(cfg)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))
        self.scaled = cfg.layer_scale
        if self.scaled:
            self.scale_attn = nn.Parameter(torch.full((w,), LAYER_SCALE_INIT))
            self.scale_ffn = nn.Parameter(torch.full((w,), LAYER_SCALE_INIT))

    def init_weights(self, std: float) -> None:
        if self.gated:  # Meta's initialisation: each branch starts at tanh(pi / 4) ~ 0.66 of its weight
            nn.init.constant_(self.gate_attn, math.pi / 4)
            nn.init.constant_(self.gate_ffn, math.pi / 4)
        if self.scaled:
            nn.init.constant_(self.scale_attn, LAYER_SCALE_INIT)
            nn.init.constant_(self.scale_ffn, LAYER_SCALE_INIT)

    def forward(self, x: Tensor, rotary: Rotary | None = None, mask: Tensor | None = None) -> Tensor:
        a = self.self_attn(self.layer_norm1(x), rotary, mask)
        if self.scaled:
            a = self.scale_attn.to(a.dtype) * a
        x = x + (torch.tanh(self.gate_attn).to(a.dtype) * a if self.gated else a)
        f = self.mlp(self.layer_norm2(x))
        if self.scaled:
            f = self.scale_ffn.to(f.dtype) * f
        return x + (torch.tanh(self.gate_ffn).to(f.dtype) * f if self.gated else f)


class AspectRatioEmbedding(nn.Module):
    """Mllama's gated per-tile embedding, chosen by the image's aspect-ratio id: x + tanh(gate) * E[id]."""

    def __init__(self, rows: int, tiles: int, width: int):
        super().__init__()
        self.tiles = tiles
        self.embedding = nn.Embedding(rows, tiles * width)
        self.gate = nn.Parameter(torch.zeros(1))

    def init_weights(self, std: float) -> None:
        nn.init.zeros_(self.gate)

    def forward(self, x: Tensor, aspect: Tensor) -> Tensor:
        """x: [n x tiles x t x w], aspect: [n] -> the same shape."""
        e = self.embedding(aspect).view(x.shape[0], self.tiles, 1, x.shape[-1])
        return x + torch.tanh(self.gate).to(x.dtype) * e.to(x.dtype)


class VisionEmbeddings(nn.Module):
    """Patch embedding (+ class token, + learned positions, + Mllama's gated tile embeddings).

    EVA keeps class token and positions as raw `[1 x n x w]` parameters, CLIP / SigLIP as a vector and
    an `nn.Embedding`; both layouts are kept so checkpoints load by key. With `temporal_patch` > 1
    the patch embedding is a 3-D convolution over `temporal_patch` copies of the frame (Qwen2-VL).
    With `tiles` = T an image is T tiles of image_size each; Mllama's three gated embeddings (before
    the class token, with the positions, after the encoder) pick their row by the aspect-ratio id.
    """

    def __init__(self, cfg: ViTBase, raw_params: bool):
        super().__init__()
        w, p = cfg.width, cfg.patch_size
        self.patch = p
        self.grid = cfg.grid
        self.temporal = cfg.temporal_patch
        self.raw = raw_params
        self.has_class = cfg.class_token
        self.learned = cfg.position == "learned"
        if self.temporal > 1:
            self.patch_embedding: nn.Module = nn.Conv3d(cfg.channels, w, (self.temporal, p, p), (self.temporal, p, p),
                                                        bias=cfg.patch_bias)
        else:
            self.patch_embedding = nn.Conv2d(cfg.channels, w, p, p, bias=cfg.patch_bias)
        if self.has_class:
            self.class_embedding = nn.Parameter(torch.zeros(1, 1, w) if raw_params else torch.zeros(w))
        n_pos = cfg.num_patches + (1 if self.has_class else 0)
        if self.learned:
            if raw_params:
                self.position_embedding: nn.Module | nn.Parameter = nn.Parameter(torch.zeros(1, n_pos, w))
            else:
                self.position_embedding = nn.Embedding(n_pos, w)
        self.tiles = cfg.tiles
        if self.tiles:
            rows = cfg.aspect_ratios + 1  # row 0: padding, as in Mllama
            self.tile_embedding = nn.Embedding(rows, self.tiles * n_pos * w)
            self.position_gate = nn.Parameter(torch.zeros(1))
            self.pre_tile_positional_embedding = AspectRatioEmbedding(rows, self.tiles, w)
            self.post_tile_positional_embedding = AspectRatioEmbedding(rows, self.tiles, w)

    def init_weights(self, std: float) -> None:
        if self.has_class:
            nn.init.normal_(self.class_embedding, std=std)
        if self.learned and self.raw:
            nn.init.normal_(self.position_embedding, std=std)
        if self.tiles:
            nn.init.zeros_(self.position_gate)

    def _positions(self) -> Tensor:
        pe = self.position_embedding
        return pe[0] if isinstance(pe, nn.Parameter) else pe.weight

    def forward(self, pixels: Tensor, aspect: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """[n x c x H x W] -> ([n x t x w], (rows, cols)); tiled: [(n*T) x c x H x W] and aspect [n]
        -> [n x T x t x w], in Mllama's order (pre-tile embedding, class token, gated positions)."""
        if self.temporal > 1 and pixels.dim() == 4:  # a still: its one frame repeated; a video's frames come 5-D
            pixels = pixels.unsqueeze(2).expand(-1, -1, self.temporal, -1, -1)
        x = self.patch_embedding(pixels)
        gh, gw = x.shape[-2], x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        if self.tiles and aspect is not None:
            n = x.shape[0] // self.tiles
            x = self.pre_tile_positional_embedding(x.view(n, self.tiles, *x.shape[1:]), aspect).flatten(0, 1)
        if self.has_class:
            cls = self.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, -1)
            x = torch.cat([cls.to(x.dtype), x], dim=1)
        if self.tiles and aspect is not None:
            n, t, w = x.shape[0] // self.tiles, x.shape[1], x.shape[2]
            gate = torch.tanh(self.position_gate).to(x.dtype)
            x = x.view(n, self.tiles, t, w)
            if self.learned:
                x = x + (1 - gate) * self._resized_positions(gh, gw).to(x.dtype)
            tile_pos = self.tile_embedding(aspect).view(n, self.tiles, t, w).to(x.dtype)
            return x + gate * tile_pos, (gh, gw)
        if self.learned:
            x = x + self._resized_positions(gh, gw).to(x.dtype)
        return x, (gh, gw)

    def _resized_positions(self, gh: int, gw: int) -> Tensor:
        """Learned positions for a gh x gw grid: bicubic interpolation of the trained square grid."""
        pos = self._positions()
        if (gh, gw) == (self.grid, self.grid):
            return pos.unsqueeze(0)
        cls, grid = (pos[:1], pos[1:]) if self.has_class else (pos[:0], pos)
        g = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2).float()
        g = F.interpolate(g, size=(gh, gw), mode="bicubic", align_corners=False)
        g = g.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pos.dtype)
        return torch.cat([cls, g], dim=0).unsqueeze(0)


class VisionRotary2d(nn.Module):
    """2-D rotary positions (Qwen2-VL's vision rope): half the rotated channels follow the row, half the column.

    The class token, if any, gets no rotation (position-free), which is a choice: Qwen2-VL has none.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_frequencies(head_dim // 2, theta), persistent=False)

    def forward(self, grid: tuple[int, int], has_class: bool, device: torch.device) -> Rotary:
        gh, gw = grid
        rows = torch.arange(gh, device=device).repeat_interleave(gw).float()
        cols = torch.arange(gw, device=device).repeat(gh).float()
        inv = self.inv_freq.to(device)
        freqs = torch.cat([rows[:, None] * inv, cols[:, None] * inv], dim=-1)  # [t x d/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if has_class:
            cos = torch.cat([torch.ones_like(cos[:1]), cos])
            sin = torch.cat([torch.zeros_like(sin[:1]), sin])
        return Rotary.of(cos[None, None], sin[None, None])


class Windows:
    """Window attention (`window`, Qwen2.5-VL): the grid cut into side x side windows from the top-left, those
    at the bottom and right edges partial, each window one sequence of a batch of n * windows.

    Qwen2.5-VL reorders the tokens window by window and attends within each run of them; attention does
    not depend on the order of its tokens (each keeps its own rotary angle), so the same result comes from
    gathering each window's tokens, padded to side^2 with keys no query may attend to, and scattering
    them back after the layer. Costs O(tokens x side^2), not O(tokens^2) as a block-diagonal mask would.
    """

    def __init__(self, grid: tuple[int, int], side: int, n: int, rotary: Rotary | None, device: torch.device):
        gh, gw = grid
        tokens, rows, cols = gh * gw, -(-gh // side), -(-gw // side)
        index = torch.full((rows * side, cols * side), tokens, dtype=torch.long, device=device)  # padding: `tokens`
        index[:gh, :gw] = torch.arange(tokens, device=device).view(gh, gw)
        self.index = index.view(rows, side, cols, side).transpose(1, 2).reshape(rows * cols, side * side)
        flat = self.index.flatten()
        self.where = torch.empty(tokens, dtype=torch.long, device=device)
        self.where[flat[flat < tokens]] = torch.arange(flat.numel(), device=device)[flat < tokens]
        self.n = n
        padded = bool(gh % side or gw % side)
        real = (self.index < tokens)[:, None, None, :]  # [windows x 1 x 1 x side^2]: keys that exist
        self.mask = real.repeat(n, 1, 1, 1) if padded else None
        self.rotary = None if rotary is None else Rotary(self._gather_table(rotary.cos, 1.0),
                                                         self._gather_table(rotary.sin_signed, 0.0))

    def _gather_table(self, table: Tensor, pad: float) -> Tensor:
        """[1 x 1 x t x r] -> [(n * windows) x 1 x side^2 x r]; padding rows are the identity rotation."""
        t = torch.cat([table[0, 0], torch.full_like(table[0, 0, :1], pad)])
        return t[self.index][:, None].repeat(self.n, 1, 1, 1)

    def split(self, x: Tensor) -> Tensor:
        """[n x t x w] -> [(n * windows) x side^2 x w] (padding tokens are zeros)."""
        x = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], dim=1)
        return x[:, self.index].flatten(0, 1)

    def join(self, x: Tensor) -> Tensor:
        """[(n * windows) x side^2 x w] -> [n x t x w], the padding dropped."""
        return x.reshape(self.n, -1, x.shape[-1])[:, self.where]


class SiglipPoolHead(nn.Module):
    """SigLIP's attention-pooling head (a probe attends over the tokens). VLMs do not use it; it is
    built when `pool_head = true` so the parameters (and a checkpoint's keys) are there."""

    def __init__(self, cfg: ViTBase):
        super().__init__()
        w = cfg.width
        self.probe = nn.Parameter(torch.zeros(1, 1, w))
        self.attention = nn.MultiheadAttention(w, cfg.heads, batch_first=True)
        self.layernorm = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.mlp = VisionMLP(w, cfg.mlp_dim, cfg.act)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.probe, std=std)
        nn.init.normal_(self.attention.in_proj_weight, std=std)
        nn.init.zeros_(self.attention.in_proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        """[n x t x w] -> [n x w]."""
        probe = self.probe.expand(x.shape[0], -1, -1)
        h = self.attention(probe, x, x, need_weights=False)[0]
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class Encoder(nn.Module):
    def __init__(self, layers: list[VisionLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class VisionEncoder(nn.Module, CheckpointedBlocks):
    """A ViT that returns the hidden states the spec selects (`feature = layers([...]).patches`).

    Only the layers up to the deepest selected one run: LLaVA's `layer(-2)` skips the last block,
    which changes nothing in the output and saves its compute.
    """

    def __init__(self, cfg: ViTBase, *, fused_qkv: bool, raw_params: bool):
        super().__init__()
        check_divisible(cfg.width, cfg.heads, "vision encoder")
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg, raw_params)
        if cfg.pre_norm:
            self.pre_layrnorm = vision_norm(cfg)  # sic: Hugging Face's CLIP key
        local = cfg.depth - cfg.global_layers
        self.encoder = Encoder([VisionLayer(cfg, fused_qkv, gated=i >= local) for i in range(cfg.depth)])
        if cfg.post_norm:
            self.post_layernorm = vision_norm(cfg, cfg.post_norm_kind)
        if isinstance(cfg, SigLIP) and cfg.pool_head:
            self.head = SiglipPoolHead(cfg)
        self.rotary = VisionRotary2d(cfg.width // cfg.heads) if cfg.position == "rope2d" else None
        if cfg.tiles and (cfg.position != "learned" or cfg.resolution != "fixed"):
            raise user_error("E0519", "a tiled encoder (`tiles`) needs learned positions and a fixed resolution",
                             help="drop `tiles`, or use `position = learned` and `resolution = fixed`")
        if (cfg.global_layers or cfg.tile_padding) and not cfg.tiles:
            raise user_error("E0519", "`global_layers` and `tile_padding` belong to a tiled encoder (`tiles`)",
                             help="set `tiles`, or drop them")
        if fused_qkv and not cfg.attn_bias:
            raise user_error("E0519", "`attn_bias = false` needs separate q / k / v projections; this encoder's "
                             "attention is one fused, biased `qkv` (EVA, rope2d)", help="drop `attn_bias`")
        if cfg.global_layers >= cfg.depth:
            raise user_error("E0519", f"global_layers = {cfg.global_layers} leaves no local layer of the "
                             f"{cfg.depth}", help=f"use global_layers < depth = {cfg.depth}")
        if cfg.tiles:
            self.register_buffer("tiles_in_use", torch.tensor(cfg.tiles_in_use), persistent=False)
        depth = cfg.depth
        self.selected = [i if i >= 0 else depth + 1 + i for i in cfg.feature.layers]

    # --- what each spec path (`clip.attn`, `clip.norm`, ...) covers; see vlmspec.runtime.spec_paths
    def spec_parts(self) -> list[SpecPart]:
        layers = list(self.encoder.layers)
        return [SpecPart("embeddings", [self.embeddings], GROUP), SpecPart("layers", [self.encoder.layers], GROUP),
                SpecPart("attn", [layer.self_attn for layer in layers]),
                SpecPart("mlp", [layer.mlp for layer in layers]),
                SpecPart("norm", [getattr(self, "pre_layrnorm", None), getattr(self, "post_layernorm", None)])]

    def lora_parts(self) -> dict[str, list[nn.Module]]:
        out: dict[str, list[nn.Module]] = {}
        for layer in self.encoder.layers:
            a = layer.self_attn
            linears = ({"attn.q": a.qkv, "attn.k": a.qkv, "attn.v": a.qkv, "attn.o": a.projection}
                       if isinstance(a, EVAAttention) else
                       {"attn.q": a.q_proj, "attn.k": a.k_proj, "attn.v": a.v_proj, "attn.o": a.out_proj})
            for target, linear in linears.items():
                out.setdefault(target, []).append(linear)
            mlp = layer.mlp
            # a gated MLP's gate and up projections are both its first layer
            first = [mlp.gate_proj, mlp.up_proj] if isinstance(mlp, GatedVisionMLP) else [mlp.fc1]
            out.setdefault("mlp.fc1", []).extend(first)
            out.setdefault("mlp.fc2", []).append(mlp.down_proj if isinstance(mlp, GatedVisionMLP) else mlp.fc2)
        return out

    @property
    def image_dims(self) -> int:
        """Dimensions of one image: [c x h x w], or [tiles x c x h x w] for a tiled encoder."""
        return 4 if self.cfg.tiles else 3

    def _check(self, pixels: Tensor) -> None:
        cfg = self.cfg
        if cfg.temporal_patch > 1 and pixels.dim() == 5 and pixels.shape[2] == cfg.temporal_patch:
            pixels = pixels[:, :, 0]  # a video's temporal patches [n x c x T x h x w]: checked as one frame each
        if pixels.dim() != self.image_dims + 1:
            layout = "tiles x channels x height x width" if cfg.tiles else "channels x height x width"
            raise user_error("E0593", f"images must be [batch x {layout}], got shape {tuple(pixels.shape)}")
        if cfg.tiles and pixels.shape[1] != cfg.tiles:
            raise user_error("E0593", f"images have {pixels.shape[1]} tiles but the encoder takes {cfg.tiles}",
                             help="pad with empty tiles and give the layout in aspect_ratio_ids")
        c, h, w = pixels.shape[-3:]
        if c != cfg.channels:
            raise user_error("E0593", f"images have {c} channels but the encoder expects {cfg.channels}")
        fixed = cfg.resolution == "fixed"
        if (h % cfg.patch_size or w % cfg.patch_size) and not (fixed and (h, w) == (cfg.image_size, cfg.image_size)):
            raise user_error("E0593", f"image size {h}x{w} is not a multiple of patch_size {cfg.patch_size}")
        if fixed and (h, w) != (cfg.image_size, cfg.image_size):
            raise user_error("E0593", f"images are {h}x{w} but the encoder takes {cfg.image_size}x{cfg.image_size}",
                             help="resize them first (the spec's preprocessing does), or declare "
                             "`resolution = dynamic(...)`")

    def forward(self, pixels: Tensor, aspect_ratio_ids: Tensor | None = None) -> VisualTokens:
        """[n x c x H x W] -> tokens [n x t x (w * selected layers)] on a (H/p) x (W/p) grid.

        Tiled encoders take [n x T x c x H x W] and attend over all tiles of an image at once (Mllama);
        aspect_ratio_ids [n] (1-based into the tile layouts, Mllama's numbering) default to 1.
        """
        self._check(pixels)
        if self.cfg.tiles:
            return self._tiled(pixels, aspect_ratio_ids)
        if self.cfg.feature.pooled:
            return self._pooled(pixels)
        dtype = self.embeddings.patch_embedding.weight.dtype
        x, grid = self.embeddings(pixels.to(dtype))
        if self.cfg.pre_norm:
            x = self.pre_layrnorm(x)
        rotary = self.rotary(grid, self.cfg.class_token, x.device) if self.rotary is not None else None
        windows = Windows(grid, self.cfg.window // self.cfg.patch_size, x.shape[0], rotary, x.device) \
            if self.cfg.window else None
        full = set(self.cfg.full_layers)
        states = {0: x}
        last = max(self.selected)
        for i, layer in enumerate(self.encoder.layers[:last]):
            if windows is not None and i not in full:
                x = windows.join(self.run_block(layer, windows.split(x), windows.rotary, windows.mask))
            else:
                x = self.run_block(layer, x, rotary)
            states[i + 1] = x
        # SigLIP and EVA towers normalise their last hidden state (`feature_norm`); CLIP only its pooled token
        if self.cfg.feature_norm and self.cfg.post_norm and last == self.cfg.depth:
            states[last] = self.post_layernorm(states[last])
        feats = [states[i] for i in self.selected]
        out = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
        if self.cfg.class_token and self.cfg.feature.tokens == "patches":
            return VisualTokens(out[:, 1:], grid)
        return VisualTokens(out, grid if not self.cfg.class_token else None)

    def _pooled(self, pixels: Tensor) -> VisualTokens:
        """`feature = pooled`: one vector per image, [n x 1 x w], as the towers' `pooler_output`: SigLIP's
        attention-pooling head over the post-LayerNormed tokens, or (CLIP) the class token's last state
        through the post-LayerNorm."""
        dtype = self.embeddings.patch_embedding.weight.dtype
        x, _ = self.embeddings(pixels.to(dtype))
        if self.cfg.pre_norm:
            x = self.pre_layrnorm(x)
        for layer in self.encoder.layers:
            x = self.run_block(layer, x, None)
        head = getattr(self, "head", None)
        if head is None and not (self.cfg.class_token and self.cfg.post_norm):
            raise user_error("E0622", f"feature = pooled: this `{self.cfg.kind}` encoder has no pooled output",
                             help="set `pool_head = true` (siglip), or keep the class token and post_norm")
        if head is not None:
            pooled = head(self.post_layernorm(x) if self.cfg.post_norm else x)
        else:
            pooled = self.post_layernorm(x[:, 0])
        return VisualTokens(pooled[:, None], None)

    def tile_mask(self, aspect: Tensor) -> Tensor:
        """bool [n x T]: the tiles an image's aspect-ratio id puts to use (the rest are padding)."""
        if not tracing() and bool(((aspect < 0) | (aspect >= len(self.tiles_in_use))).any()):
            raise user_error("E0593", f"aspect_ratio_ids must be in 0..{len(self.tiles_in_use) - 1} for "
                             f"{self.cfg.tiles} tiles, got {aspect.tolist()}")
        return tiles_in_use(self.tiles_in_use, aspect, self.cfg.tiles)

    def _tiled(self, pixels: Tensor, aspect_ratio_ids: Tensor | None) -> VisualTokens:
        """Llama 3.2 Vision's tiled encoder: every tile of an image in one sequence, each tile's tokens
        padded with zeros to a multiple of `tile_padding`; a token may attend to another unless both are
        padding (a padding tile's or a padding position's), as Mllama's reference does; the local layers,
        then (with `global_layers`) the post-LayerNorm, the post-tile embedding and the gated global
        layers (without them the post-tile embedding comes after the last layer). Padding positions are
        dropped from the output, padding tiles kept (cross-attention masks them)."""
        cfg = self.cfg
        n, tiles = pixels.shape[0], cfg.tiles
        aspect = aspect_ratio_ids if aspect_ratio_ids is not None else torch.ones(
            n, dtype=torch.long, device=pixels.device)
        real_tiles = self.tile_mask(aspect)
        dtype = self.embeddings.patch_embedding.weight.dtype
        x, _ = self.embeddings(pixels.flatten(0, 1).to(dtype), aspect)  # [n x T x t x w]
        if cfg.pre_norm:
            x = self.pre_layrnorm(x)
        t, w = x.shape[2], x.shape[3]
        pad = (-t) % cfg.tile_padding if cfg.tile_padding else 0
        length = t + pad
        x = F.pad(x, (0, 0, 0, pad)).reshape(n, tiles * length, w)
        real = (real_tiles[:, :, None] & (torch.arange(length, device=x.device) < t)[None, None]).reshape(n, -1)
        mask = None if not tracing() and bool(real.all()) else (real[:, :, None] | real[:, None, :])[:, None]
        states = {0: x}
        last = max(self.selected)
        seam = cfg.depth - cfg.global_layers if cfg.global_layers else cfg.depth
        post_tile = self.embeddings.post_tile_positional_embedding
        for i, layer in enumerate(self.encoder.layers[:last]):
            if i == seam:
                if cfg.post_norm:
                    x = self.post_layernorm(x)
                x = post_tile(x.view(n, tiles, length, w), aspect).reshape(n, tiles * length, w)
            x = self.run_block(layer, x, None, mask)
            states[i + 1] = x
        if last == cfg.depth and not cfg.global_layers:
            if cfg.feature_norm and cfg.post_norm:
                states[last] = self.post_layernorm(states[last])
            states[last] = post_tile(states[last].view(n, tiles, length, w), aspect).reshape(n, tiles * length, w)
        feats = [states[i] for i in self.selected]
        out = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
        out = out.view(n, tiles, length, -1)[:, :, :t]
        if cfg.class_token and cfg.feature.tokens == "patches":
            out = out[:, :, 1:]
        return VisualTokens(out.reshape(n, -1, out.shape[-1]), None)
