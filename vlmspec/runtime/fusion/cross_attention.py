"""`cross_attention` (Flamingo, IDEFICS, Llama 3.2 Vision): a tanh-gated cross-attention block (+ gated
FFN) before chosen decoder layers; gates start at 0, so a frozen language model computes exactly what
it did before, at step 0. Visual keys / values are computed once per image and kept in the cache while
generating. A text token attends to all its sample's images, or (`image_attention = latest`, Flamingo /
IDEFICS) only to the last one before it; IDEFICS checkpoints load into it (`weights/formats/idefics.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.fusion import CrossAttention as CrossAttentionSpec
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import RMSNorm, attend, split_heads, tiles_in_use, tracing
from vlmspec.runtime.decoding import DecodeState
from vlmspec.runtime.fusion.base import Fusion, fusion_spec, language_model
from vlmspec.runtime.language import CausalLM, LayerHooks, LMConfig
from vlmspec.runtime.registry import BuildContext, register


class CrossAttention(nn.Module):
    """Text queries attend to visual keys / values (Mllama's keys: q_proj, k_proj, v_proj, o_proj, q_norm, k_norm)."""

    def __init__(self, c: LMConfig, visual_width: int, qk_norm: bool):
        super().__init__()
        q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
        self.heads, self.kv_heads = c.heads, c.kv_heads
        self.q_proj = nn.Linear(c.width, q, bias=False)
        self.k_proj = nn.Linear(visual_width, kv, bias=False)
        self.v_proj = nn.Linear(visual_width, kv, bias=False)
        self.o_proj = nn.Linear(q, c.width, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.eps) if qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.eps) if qk_norm else None

    def kv(self, visual: Tensor) -> tuple[Tensor, Tensor]:
        """[b x n x dv] -> k, v [b x hk x n x d]; computed once per image."""
        k = split_heads(self.k_proj(visual), self.kv_heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, split_heads(self.v_proj(visual), self.kv_heads)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """mask: bool [b x 1 x s x n] (True = may attend) or None (every visual token)."""
        q = split_heads(self.q_proj(x), self.heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return self.o_proj(attend(q, k, v, mask))


class CrossAttentionLayer(nn.Module):
    """h + tanh(g_attn) * xattn(norm(h)), then h + tanh(g_mlp) * ffn(norm(h)) (Mllama's layout and keys).

    Gates are one scalar per branch, or with `vector_gates` one per channel, shaped [1 x 1 x width]
    as IDEFICS stores them."""

    def __init__(self, llm: CausalLM, visual_width: int, spec: CrossAttentionSpec):
        super().__init__()
        self.gated = spec.gate == "tanh"
        shape = (1, 1, llm.c.width) if getattr(spec, "vector_gates", False) else (1,)
        self.cross_attn = CrossAttention(llm.c, visual_width, spec.qk_norm)
        self.input_layernorm = llm.make_norm()
        if self.gated:
            self.cross_attn_attn_gate = nn.Parameter(torch.zeros(shape))
        self.mlp = llm.make_ffn() if spec.mlp else None
        if spec.mlp:
            self.post_attention_layernorm = llm.make_norm()
            if self.gated:
                self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(shape))

    def init_weights(self, std: float) -> None:
        for name in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
            p = getattr(self, name, None)
            if isinstance(p, nn.Parameter):
                nn.init.zeros_(p)

    def _gate(self, name: str, x: Tensor) -> Tensor:
        return torch.tanh(getattr(self, name)).to(x.dtype) * x if self.gated else x

    def forward(self, h: Tensor, k: Tensor | None, v: Tensor | None, mask: Tensor | None = None,
                seen: Tensor | None = None, ffn_rows: Tensor | None = None) -> Tensor:
        """k, v None: no image at all (the cross-attention adds nothing, the feed-forward still runs).
        mask: bool [b x 1 x s x n] or None; seen: bool [b x s], False where a token sees no image, whose
        cross-attention output is then zero (IDEFICS' `cross_attention_gate`), or None (every token sees one);
        ffn_rows: bool [b x s], False where the feed-forward output is zeroed (Mllama's
        `full_text_row_masked_out_mask`), or None."""
        if k is not None and v is not None:
            a = self.cross_attn(self.input_layernorm(h), k, v, mask)
            if seen is not None:
                a = a.masked_fill(~seen[..., None], 0.0)
            h = h + self._gate("cross_attn_attn_gate", a)
        if self.mlp is not None:
            f = self.mlp(self.post_attention_layernorm(h))
            if ffn_rows is not None:
                f = f * ffn_rows[..., None].to(f.dtype)
            h = h + self._gate("cross_attn_mlp_gate", f)
        return h


class CrossBlockHook:
    """Runs one cross-attention layer before decoder layer `idx`; a plain object, so the module stays
    registered once (under the fusion)."""

    def __init__(self, fusion: CrossAttentionFusion, idx: int):
        self.fusion, self.idx = fusion, idx

    def __call__(self, h: Tensor, state: DecodeState) -> Tensor:
        f = self.fusion
        if f.masked:
            return f.masked_block(self.idx, h, state)
        if f.latest:
            return f.latest_block(self.idx, h, state)
        kv = f.visual_kv(self.idx, state, h.dtype)
        if kv is None:
            return h  # no image in this conversation: the language model alone
        return f.layers[str(self.idx)](h, *kv)


class CrossAttentionFusion(Fusion):
    """Flamingo / IDEFICS / Llama 3.2 Vision: gated cross-attention blocks before chosen decoder layers.

    `image_attention = all`: every text token attends to every visual token of its sample (all its
    images). `image_attention = latest` (Flamingo, IDEFICS): a text token attends only to the visual
    tokens of the last image whose image token is at or before it in the pass that brings the images
    (images in order, `tokens_per_image` visual tokens each); a token before its row's first image
    token, or whose image is beyond the images given, sees none: its cross-attention output is zero
    (the gated feed-forward still runs), as Hugging Face IDEFICS does with the processor's
    `image_attention_mask`. Later cached passes (decoding) see the image of the prompt's last token, as
    transformers' IDEFICS `generate` does: the cache keeps, per row, that image's keys / values tiled to
    the full visual length (values zero when the row saw none), so decoding attends without a mask and
    the cache keeps its shapes (beam search, serving's row merges and the exported halves need no
    extra state). Not modelled: the processor's reset after an end-of-sequence token inside a prompt
    (packed documents). A generated `<image>` token is text: cached decoding never sees it as an image,
    and recomputing generation (no cache) passes the prompt's image positions (`forward(image_mask=)`).
    """

    in_sequence = False

    def __init__(self, name: str, llm: CausalLM, visual_width: int, spec: CrossAttentionSpec,
                 tokens_per_image: int | None = None, tiles: TileLayout | None = None):
        super().__init__(name)
        self.layer_ids = spec.layer_ids(llm.c.depth)
        self.layers = nn.ModuleDict({str(i): CrossAttentionLayer(llm, visual_width, spec) for i in self.layer_ids})
        self.image_attention = spec.image_attention
        self.no_image = spec.no_image
        self.latest = self.image_attention == "latest"
        self.uses_image_mask = self.image_attention != "all"  # image-token positions say which image a token sees
        self.tokens_per_image = tokens_per_image
        self.tiles = tiles
        # the general path: a per-token mask over the visual tokens, kept in the cache for decoding; the
        # `latest` + `skip_attention` path (IDEFICS) folds its mask into the cached keys / values instead
        self.masked = (self.image_attention == "latest_group" or tiles is not None
                       or (self.latest and self.no_image != "skip_attention"))

    def visual_kv(self, idx: int, state: DecodeState, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        key = f"{self.name}.{idx}"
        visual = state.visual.get(self.name)
        if visual is None:
            if state.cache is not None and key in state.cache.cross:
                return state.cache.cross[key]
            return None
        kv = self.layers[str(idx)].cross_attn.kv(visual.to(dtype))
        if state.cache is not None:
            state.cache.cross[key] = kv
        return kv

    def latest_block(self, idx: int, h: Tensor, state: DecodeState) -> Tensor:
        """One block under `image_attention = latest` (see the class docstring)."""
        layer = self.layers[str(idx)]
        key = f"{self.name}.{idx}"
        visual = state.visual.get(self.name)
        if visual is None:
            kv = state.cache.cross.get(key) if state.cache is not None else None
            if kv is None:
                return layer(h, None, None)  # no image: no token sees one; the gated feed-forward still runs
            return layer(h, *kv)  # decoding: the prompt's last image, as the cache holds it
        if state.image_mask is None:
            raise user_error("E0593", f"fusion `{self.name}` needs the image-token positions of the prompt")
        k, v = layer.cross_attn.kv(visual.to(h.dtype))
        n_visual = k.shape[2]
        t = self.tokens_per_image or n_visual
        if n_visual % t:
            raise user_error("E0593", f"fusion `{self.name}` got {n_visual} visual tokens per sample, not a "
                             f"multiple of the {t} tokens of one image")
        n = n_visual // t
        image = state.image_mask.long().cumsum(-1) - 1  # [b x s] the image each token sees, -1: none yet
        seen = (image >= 0) & (image < n)
        mask = None
        if n > 1:
            owner = torch.arange(n_visual, device=h.device) // t  # the image of each visual token
            mask = ((owner[None, None, :] == image[:, :, None]) | ~seen[:, :, None])[:, None]  # unseen: zeroed after
        if state.cache is not None:
            state.cache.cross[key] = _latest_kv(k, v, image[:, -1], seen[:, -1], n, t)
        return layer(h, k, v, mask, seen)

    def visible(self, state: DecodeState, n_visual: int, b: int, s: int, device: torch.device) -> Tensor:
        """bool [b x s x n_visual]: the visual tokens each text token of this pass may attend to."""
        t = self.tokens_per_image or n_visual
        if n_visual % t:
            raise user_error("E0593", f"fusion `{self.name}` got {n_visual} visual tokens per sample, not a "
                             f"multiple of the {t} tokens of one image")
        n = n_visual // t
        owner = torch.arange(n_visual, device=device) // t  # the image of each visual token
        if self.image_attention == "all":
            sees = torch.ones(b, s, n_visual, dtype=torch.bool, device=device)
        else:
            if state.image_mask is None:
                raise user_error("E0593", f"fusion `{self.name}` needs the image-token positions of the prompt")
            marks = state.image_mask
            image = torch.arange(n, device=device)
            hi = marks.long().cumsum(-1) - 1  # [b x s] the latest image at or before each token (-1: none)
            sees_image = (image <= hi[..., None]) & (hi[..., None] >= 0)  # [b x s x n]
            if self.image_attention == "latest":
                sees_image = sees_image & (image >= hi[..., None])
            else:  # latest_group: the images in the same run of adjacent image tokens as the latest one
                first = torch.arange(s, device=device) == 0
                starts = marks & ~(marks.roll(1, dims=-1) & ~first)
                run = starts.long().cumsum(-1) - 1  # [b x s] the run of the latest image token so far
                token_of = marks[..., None] & (hi[..., None] == image)  # [b x s x n]: image j's own token
                run_of = (token_of.long() * run[..., None]).sum(1)  # [b x n] the run of image j
                sees_image = sees_image & (run_of[:, None, :] == run[..., None])
            sees = sees_image[..., owner]
        if self.tiles is not None:
            sees = sees & self.tiles.valid(state.aspect_ratio_ids, b, n, device)[:, None, :]
        return sees

    def masked_block(self, idx: int, h: Tensor, state: DecodeState) -> Tensor:
        """One block under a per-token visual mask (`latest_group`, tiled images, `no_image` choices).

        The prompt pass computes what each token sees; the cache keeps the visual keys / values and what the
        prompt's last token saw, which every later token sees too (as transformers extends Mllama's
        `cross_attention_mask` by repeating its last row)."""
        layer = self.layers[str(idx)]
        key, mask_key = f"{self.name}.{idx}", f"{self.name}.visible"
        visual = state.visual.get(self.name)
        if visual is None:
            kv = state.cache.cross.get(key) if state.cache is not None else None
            if kv is None:
                return h  # no image in this conversation: the language model alone
        else:
            kv = layer.cross_attn.kv(visual.to(h.dtype))
            if state.cache is not None:
                state.cache.cross[key] = kv
        if self.name not in state.memo:  # once per pass, for all this fusion's layers
            if visual is None:
                sees = state.cache.extras[mask_key][:, None, :].expand(-1, h.shape[1], -1)  # type: ignore[union-attr]
            else:
                sees = self.visible(state, visual.shape[1], h.shape[0], h.shape[1], h.device)
                if state.cache is not None:
                    state.cache.extras[mask_key] = sees[:, -1]
            seen = sees.any(-1)  # [b x s]
            mask = sees | ~seen[..., None]  # a token that sees nothing attends to all (then, or not, zeroed)
            state.memo[self.name] = (None if not tracing() and bool(mask.all()) else mask[:, None], seen)
        mask4, seen = state.memo[self.name]
        zero_attn = None if self.no_image == "attend_all" else seen
        zero_ffn = None if self.no_image == "skip_attention" else seen
        return layer(h, *kv, mask4, zero_attn, zero_ffn)

    def contribute(self, hooks: list[LayerHooks]) -> None:
        for i in self.layer_ids:
            hooks[i].before.append(CrossBlockHook(self, i))


@dataclass(frozen=True)
class TileLayout:
    """How a tiled encoder's visual tokens lie: `tiles` tiles of `per_tile` tokens per image, and the number
    of tiles each aspect-ratio id puts to use (Mllama's layouts; id 0, a padding image, keeps one)."""

    tiles: int
    per_tile: int
    in_use: tuple[int, ...]

    def valid(self, aspect: Tensor | None, b: int, n: int, device: torch.device) -> Tensor:
        """bool [b x (n * tiles * per_tile)]: False at the tokens of padding tiles."""
        ids = aspect if aspect is not None else torch.ones(b, n, dtype=torch.long, device=device)
        ids = ids.reshape(b, -1).to(device)
        if ids.shape[1] != n:
            raise user_error("E0593", f"aspect_ratio_ids give {ids.shape[1]} images per sample, the features {n}")
        real = tiles_in_use(torch.tensor(self.in_use, device=device), ids.clamp(0, len(self.in_use) - 1), self.tiles)
        return real.repeat_interleave(self.per_tile, dim=-1).reshape(b, -1)  # [b x n x T] -> per visual token


def _latest_kv(k: Tensor, v: Tensor, image: Tensor, seen: Tensor, n: int, t: int) -> tuple[Tensor, Tensor]:
    """Keys / values [b x h x (n*t) x d] -> each row's image `image` [b] repeated n times (the same
    attention output as over its t tokens alone, at the shape the cache and the exported halves
    expect); values zero in rows where `seen` [b] is False, so attending gives exactly 0."""
    if n == 1:
        return k, v * seen[:, None, None, None].to(v.dtype)
    b, hk, _, d = k.shape
    pick = image.clamp(0, n - 1).view(b, 1, 1, 1, 1).expand(b, hk, 1, t, d)
    k1 = k.view(b, hk, n, t, d).gather(2, pick)
    v1 = v.view(b, hk, n, t, d).gather(2, pick) * seen[:, None, None, None, None].to(v.dtype)
    return k1.expand(b, hk, n, t, d).reshape(b, hk, n * t, d), v1.expand(b, hk, n, t, d).reshape(b, hk, n * t, d)


@register("fusion", "cross_attention")
def build_cross_attention(comp: Component, ctx: BuildContext) -> CrossAttentionFusion:
    spec = fusion_spec(comp, CrossAttentionSpec)
    visual = ctx.input_shape(comp.name)
    tiles = _tile_layout(comp, ctx, visual.tokens)
    tokens = None
    if spec.image_attention != "all" or tiles is not None:
        if visual.dynamic or visual.tokens <= 0:
            raise user_error("E0592", f"fusion `{comp.name}` has `image_attention = {spec.image_attention}` but its "
                             "images give a varying number of visual tokens", help="use a fixed-resolution "
                             "encoder, or `image_attention = all`")
        tokens = visual.tokens
    return CrossAttentionFusion(comp.name, language_model(ctx, comp), ctx.output_shape(comp.name).width, spec, tokens, tiles)


def _tile_layout(comp: Component, ctx: BuildContext, tokens: int) -> TileLayout | None:
    """The tile layout of the visual tokens when one tiled encoder (`tiles` > 1) feeds this fusion through
    per-token connectors (each tile keeps its tokens, so padding tiles can be masked); else None."""
    components = ctx.analysis.ir.components
    seen: list[Component] = []
    todo = list(comp.sources)
    while todo:
        c = components[todo.pop()]
        if c.role == "vision":
            seen.append(c)
        else:
            todo.extend(c.sources)
    tiled = [c for c in seen if getattr(c.config, "tiles", 0) > 1]
    if len(seen) != 1 or not tiled:
        return None
    enc = tiled[0].config
    if tokens <= 0 or tokens % enc.tiles or tokens != ctx.output_shape(tiled[0].name).tokens:
        return None
    return TileLayout(enc.tiles, tokens // enc.tiles, enc.tiles_in_use)
