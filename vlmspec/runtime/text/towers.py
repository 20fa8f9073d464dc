"""The caption towers of contrastive models: `clip_text` and `siglip_text`.

Both are a token + learned-position embedding, pre-LN transformer blocks (the vision towers' attention
and MLP, `runtime/vision/encoder.py`) and a final LayerNorm; they differ in the attention mask (CLIP's
is causal, SigLIP's bidirectional) and in the pooled vector (CLIP's end-of-text token; SigLIP's last
position through `head`). Parameter names follow Hugging Face's `text_model` (`embeddings.token_embedding`,
`encoder.layers.N.self_attn.q_proj`, `final_layer_norm`, `head`) so checkpoints load by key.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.text_encoders import ClipText, SiglipText, TextTowerBase
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import CheckpointedBlocks, check_divisible, tracing
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.vision.encoder import VisionAttention, VisionMLP


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextTowerBase):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class TextLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x), mask), then x + mlp(ln2(x))."""

    def __init__(self, cfg: TextTowerBase):
        super().__init__()
        w = cfg.width
        self.self_attn = VisionAttention(w, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.mlp = VisionMLP(w, cfg.mlp_dim, cfg.act)
        self.layer_norm2 = nn.LayerNorm(w, eps=cfg.norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), None, mask)
        return x + self.mlp(self.layer_norm2(x))


class TextLayers(nn.Module):
    def __init__(self, cfg: TextTowerBase):
        super().__init__()
        self.layers = nn.ModuleList(TextLayer(cfg) for _ in range(cfg.depth))


class TextTower(nn.Module, CheckpointedBlocks):
    """`forward(input_ids, attention_mask) -> [batch x pooled width]`; subclasses choose mask and pooling."""

    causal = False

    def __init__(self, cfg: TextTowerBase):
        super().__init__()
        check_divisible(cfg.width, cfg.heads, "text tower")
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = TextLayers(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def _mask(self, attention_mask: Tensor | None, length: int, device: torch.device) -> Tensor | None:
        """bool [b x 1 x s x s], True = may attend: padding keys masked, and (causal) later keys too."""
        keys = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        if not self.causal:
            return None if keys is None or (not tracing() and bool(keys.all())) else keys
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        return causal if keys is None else causal & keys

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """[b x s] ids -> [b x s x width], after the final LayerNorm."""
        if input_ids.dim() != 2:
            raise user_error("E0620", f"input_ids must be [batch x length], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.cfg.max_positions:
            raise user_error("E0620", f"captions of {input_ids.shape[1]} tokens are longer than the text tower's "
                             f"max_positions = {self.cfg.max_positions}",
                             help=f"cut captions to {self.cfg.max_positions} tokens (the tokenizer's max_length)")
        x = self.embeddings(input_ids)
        mask = self._mask(attention_mask, input_ids.shape[1], x.device)
        for layer in self.encoder.layers:
            x = self.run_block(layer, x, mask)
        return self.final_layer_norm(x)


class ClipTextTower(TextTower):
    """CLIP: causal attention; pooled = the end-of-text token's state (`pool`)."""

    causal = True

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.hidden_states(input_ids, attention_mask)
        cfg: ClipText = self.cfg  # type: ignore[assignment]
        if cfg.pool == "argmax":
            where = input_ids.argmax(dim=-1)
        else:
            is_eos = input_ids == cfg.eos_token_id
            if not tracing() and not bool(is_eos.any(dim=-1).all()):
                raise user_error("E0621", f"a caption holds no end-of-text token (id {cfg.eos_token_id}), which "
                                 "`clip_text` pools", help="tokenize with the model's tokenizer, which appends it")
            where = is_eos.int().argmax(dim=-1)
        return h[torch.arange(h.shape[0], device=h.device), where]


class SiglipTextTower(TextTower):
    """SigLIP: bidirectional attention; pooled = the last position's state through `head`."""

    def __init__(self, cfg: SiglipText):
        super().__init__(cfg)
        self.head = nn.Linear(cfg.width, cfg.pooled_width)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.head(self.hidden_states(input_ids, attention_mask)[:, -1])


@register("text", "clip_text")
def build_clip_text(comp: Component, ctx: BuildContext) -> ClipTextTower:
    return ClipTextTower(comp.config)


@register("text", "siglip_text")
def build_siglip_text(comp: Component, ctx: BuildContext) -> SiglipTextTower:
    return SiglipTextTower(comp.config)
