"""`qformer`: BLIP-2's Q-Former. Learned queries read the image through cross-attention every
`cross_every` layers; InstructBLIP's variant also lets instruction text into the self-attention; with `pretrain` the
connector also holds BLIP-2's first-stage text side (text embeddings; ITC, ITM and ITG heads), which
`vlmspec.runtime.train.objectives` trains.

Keys follow Hugging Face's Blip2 / InstructBlip (`query_tokens`, `qformer.layernorm` or
`qformer.embeddings.*`, `qformer.encoder.layer.N.attention.attention.query`, `crossattention`,
`intermediate_query`, `output_query`, `language_projection`). BERT layout: post-LayerNorm residuals.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.connectors import QFormer
from vlmspec.runtime.blocks import (
    CheckpointedBlocks,
    VisualTokens,
    attend,
    check_divisible,
    param_dtype,
    split_heads,
)
from vlmspec.runtime.connectors.base import Connector, Instruction, merge_sources
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.spec_paths import GROUP, SpecPart


class MultiHead(nn.Module):
    """query / key / value projections and attention; key and value read `kv_width` features."""

    def __init__(self, width: int, heads: int, kv_width: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        q = split_heads(self.query(x), self.heads)
        k = split_heads(self.key(context), self.heads)
        v = split_heads(self.value(context), self.heads)
        return attend(q, k, v, mask)


class AddNorm(nn.Module):
    """BERT's output block: LayerNorm(dense(h) + residual)."""

    def __init__(self, d_in: int, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)  # noqa: N815  (Hugging Face's key)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, kv_width: int, eps: float):
        super().__init__()
        self.attention = MultiHead(width, heads, kv_width)
        self.output = AddNorm(width, width, eps)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.output(self.attention(x, context, mask), x)


class Intermediate(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(width, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    """Self-attention over [queries; text], cross-attention (queries only) on some layers, and two
    feed-forwards: `*_query` for the queries, the plain one for instruction text."""

    def __init__(self, width: int, heads: int, hidden: int, enc_width: int, eps: float, cross: bool, text_ffn: bool):
        super().__init__()
        self.attention = Attention(width, heads, width, eps)
        self.crossattention = Attention(width, heads, enc_width, eps) if cross else None
        if text_ffn:
            self.intermediate = Intermediate(width, hidden)
            self.output = AddNorm(hidden, width, eps)
        self.text_ffn = text_ffn
        self.intermediate_query = Intermediate(width, hidden)
        self.output_query = AddNorm(hidden, width, eps)

    def forward(self, h: Tensor, image: Tensor | None, n_query: int, mask: Tensor | None) -> Tensor:
        h = self.attention(h, h, mask)
        q, text = h[:, :n_query], h[:, n_query:]
        if n_query:
            if self.crossattention is not None:
                q = self.crossattention(q, image)
            q = self.output_query(self.intermediate_query(q), q)
        if text.shape[1] == 0:
            return q
        if self.text_ffn:
            text = self.output(self.intermediate(text), text)
        return torch.cat([q, text], dim=1) if n_query else text


class Encoder(nn.Module):
    def __init__(self, layers: list[QFormerLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TextEmbeddings(nn.Module):
    """InstructBLIP's instruction embeddings: words + absolute positions, LayerNorm over [queries; text]."""

    def __init__(self, vocab: int, positions: int, width: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width)
        self.position_embeddings = nn.Embedding(positions, width)
        self.layernorm = nn.LayerNorm(width, eps=eps)

    def forward(self, queries: Tensor | None, ids: Tensor | None) -> Tensor:
        return self.layernorm(join(queries, self.word_embeddings, self.position_embeddings, ids))


class TextWords(nn.Module):
    """BLIP-2's first-stage text embeddings (words + absolute positions); the Q-Former's own
    LayerNorm normalises [queries; text], as in Hugging Face's `Blip2ForImageTextRetrieval`."""

    def __init__(self, vocab: int, positions: int, width: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width)
        self.position_embeddings = nn.Embedding(positions, width)


def join(queries: Tensor | None, words: nn.Embedding, positions: nn.Embedding, ids: Tensor | None) -> Tensor:
    """[queries; words(ids) + positions] (either part may be absent)."""
    if ids is None:
        if queries is None:
            raise ValueError("the Q-Former needs queries, text, or both")
        return queries
    pos = torch.arange(ids.shape[1], device=ids.device)
    text = words(ids) + positions(pos)[None]
    if queries is None:
        return text
    return torch.cat([queries, text.to(queries.dtype)], dim=1)


class LMHead(nn.Module):
    """BERT's prediction head for image-grounded text generation: dense + GELU + LayerNorm, then the
    word embeddings (tied) plus a bias."""

    def __init__(self, width: int, vocab: int, eps: float):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(width, width)
        self.transform.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def init_weights(self, std: float) -> None:
        nn.init.zeros_(self.bias)

    def forward(self, h: Tensor, words: Tensor) -> Tensor:
        h = self.transform.LayerNorm(torch.nn.functional.gelu(self.transform.dense(h)))
        return torch.nn.functional.linear(h, words, self.bias)


class QFormerModel(nn.Module, CheckpointedBlocks):
    def __init__(self, cfg: QFormer, enc_width: int, text_ffn: bool):
        super().__init__()
        w, eps = cfg.width, cfg.norm_eps
        if cfg.instruction:
            self.embeddings = TextEmbeddings(cfg.text_vocab, cfg.max_text, w, eps)
        else:
            self.layernorm = nn.LayerNorm(w, eps=eps)
        self.instruction = cfg.instruction
        self.encoder = Encoder([
            QFormerLayer(w, cfg.heads, cfg.mlp, enc_width, eps, i % cfg.cross_every == 0, text_ffn)
            for i in range(cfg.depth)
        ])

    def forward(self, queries: Tensor, image: Tensor, instruction: Instruction | None) -> Tensor:
        """queries [n x q x w], image [n x t x e] -> [n x q x w]."""
        n_query = queries.shape[1]
        mask = None
        if self.instruction:
            ids = instruction.ids if instruction is not None else None
            h = self.embeddings(queries, ids)
            if instruction is not None and instruction.mask is not None:
                keys = torch.cat([torch.ones_like(instruction.mask[:, :1]).expand(-1, n_query),
                                  instruction.mask], dim=1).bool()
                mask = keys[:, None, None, :]
        else:
            h = self.layernorm(queries)
        return self.run(h, image, n_query, mask)[:, :n_query]

    def run(self, h: Tensor, image: Tensor | None, n_query: int, mask: Tensor | None) -> Tensor:
        """The layers over embedded [queries; text]; `mask` is bool [n x 1 x s|1 x s], True = may attend."""
        for layer in self.encoder.layer:
            h = self.run_block(layer, h, image, n_query, mask)
        return h


class QFormerConnector(Connector):
    """[n x t x e] image features -> [n x queries x out] (or x width without the projection)."""

    def __init__(self, name: str, cfg: QFormer, enc_width: int, out_width: int):
        super().__init__(name, cfg.merge)
        check_divisible(cfg.width, cfg.heads, f"Q-Former `{name}`")
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.queries, cfg.width))
        self.qformer = QFormerModel(cfg, enc_width, getattr(cfg, "text_ffn", True))
        self.language_projection = nn.Linear(cfg.width, out_width) if cfg.project else None
        self.pretrain = cfg.pretrain
        if cfg.pretrain:
            if not cfg.instruction:  # InstructBLIP's instruction embeddings double as the text side
                self.embeddings = TextWords(cfg.text_vocab, cfg.max_text, cfg.width)
            self.vision_projection = nn.Linear(cfg.width, cfg.embed_dim)
            self.text_projection = nn.Linear(cfg.width, cfg.embed_dim)
            self.itm_head = nn.Linear(cfg.width, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
            self.itg_head = LMHead(cfg.width, cfg.text_vocab, cfg.norm_eps)

    def spec_parts(self) -> list[SpecPart]:
        heads = ("embeddings", "vision_projection", "text_projection", "itm_head", "temp", "itg_head")
        return [SpecPart("queries", [self.query_tokens]), SpecPart("layers", [self.qformer.encoder], GROUP),
                SpecPart("proj", [self.language_projection]),
                SpecPart("pretrain", [getattr(self, n, None) for n in heads] if self.pretrain else [])]

    def init_weights(self, std: float) -> None:
        """Zero queries, as transformers' Blip2 initialises them: with random 0.02-scale layers a zero query is
        what lets the cross-attention's read of the image dominate the first steps (normal-initialised queries
        leave the query outputs nearly the same for every image, and ITC starts stuck at chance)."""
        nn.init.zeros_(self.query_tokens)
        if self.pretrain:
            with torch.no_grad():
                self.temp.fill_(0.07)

    # ---- BLIP-2's first stage (objectives itc / itm / itg); see vlmspec.runtime.train.objectives
    def word_table(self) -> tuple[nn.Embedding, nn.Embedding]:
        """(word, position) embeddings of the text side."""
        emb = self.qformer.embeddings if self.qformer.instruction else self.embeddings
        return emb.word_embeddings, emb.position_embeddings

    def embed(self, queries: Tensor | None, ids: Tensor | None) -> Tensor:
        """LayerNorm([queries; text embeddings]) -- the Q-Former's input."""
        if self.qformer.instruction:
            return self.qformer.embeddings(queries, ids)
        words, positions = self.word_table()
        return self.qformer.layernorm(join(queries, words, positions, ids))

    def queries_for(self, n: int) -> Tensor:
        return self.query_tokens.expand(n, -1, -1)

    def merged_features(self, sources: list[VisualTokens]) -> Tensor:
        """The image features the Q-Former cross-attends to (after the connector's source merge)."""
        return merge_sources(sources, self.merge, self.name).x.to(param_dtype(self))

    def project(self, x: VisualTokens, instruction: Instruction | None = None) -> VisualTokens:
        queries = self.query_tokens.expand(x.x.shape[0], -1, -1)
        h = self.qformer(queries, x.x, instruction)
        if self.language_projection is not None:
            h = self.language_projection(h)
        return VisualTokens(h, None)


@register("connector", "qformer")
def build_qformer(comp: Component, ctx: BuildContext) -> QFormerConnector:
    return QFormerConnector(comp.name, comp.config, ctx.input_shape(comp.name).width,
                            ctx.output_shape(comp.name).width)
