"""The exported halves as plain modules around a `VisionLanguageModel`: encoder, prefill, decode step.

The split follows TensorRT-LLM's two engines: pixels -> visual tokens (the connector outputs
`encode_images` returns, one tensor per fusion), and the language model taking those tokens with the
prompt. Each wrapper's `forward` takes and returns flat tensors in the order the interface
(`vlmspec.runtime.export.interface`) declares, so torch.export, ONNX and TensorRT see the same graph.

The decoder halves are `VisionLanguageModel.forward` itself, step by step: they call the model's
`embed` (embedding and image splice), `positions`, `decode_state`, `decode` and the language model's
`logits`, and supply only what a graph needs instead of the eager bookkeeping: a `StaticKVCache`
(inputs and outputs of fixed size, written at a tensor index), attention masks built from tensors
(`prefill_mask`, `step_mask`; the eager `attention_mask_4d` decides with Python `bool`s whether to
build one), and decode-step positions as an input. The checks in those steps that read tensor values
(token ids in the vocabulary, image-token counts) are skipped while torch.export traces
(`blocks.tracing()`; the ONNX exporter converts the traced program), and the runner makes them
before it calls a graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmspec.runtime.decoding import ASPECT_RATIO_IDS
from vlmspec.runtime.export.cache import StaticKVCache
from vlmspec.runtime.model import VisionLanguageModel


def view(model: VisionLanguageModel, parts: list[str]) -> VisionLanguageModel:
    """A `VisionLanguageModel` over some of `model`'s components (shared, not copied).

    `torch.export` keeps every parameter of the module it traces, used or not, so the encoder half is
    traced on a view holding only the encoders and connectors, the decoder halves on one holding only
    the language model and fusions; each artefact then carries only its own weights.
    """
    return VisionLanguageModel({n: model.components[n] for n in parts}, roles=model.roles, sources=model.sources,
                               order=model.order, language=model.language, image_token_id=model.image_token_id,
                               image_grid=model.image_grid)


def encoder_parts(model: VisionLanguageModel) -> list[str]:
    return list(model.order)


def decoder_parts(model: VisionLanguageModel) -> list[str]:
    return [model.language, *model.fusions]


def prefill_mask(attention_mask: Tensor, bidirectional: bool = False) -> Tensor:
    """bool [b x 1 x s x s]: causal (or, for a prefix-LM such as PaliGemma, the whole prompt both ways),
    padding keys hidden, each query sees itself (no empty softmax row)."""
    s = attention_mask.shape[1]
    pos = torch.arange(s, device=attention_mask.device)
    seen = (torch.ones(s, s, dtype=torch.bool, device=attention_mask.device) if bidirectional
            else pos[None, :] <= pos[:, None])
    keep = seen[None, None] & attention_mask.bool()[:, None, None, :]
    return keep | (pos[None, :] == pos[:, None])[None, None]


def step_mask(attention_mask: Tensor, write_index: Tensor) -> Tensor:
    """bool [b x 1 x 1 x max_len]: real slots up to and including the one written now (write_index: [1])."""
    slots = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    keep = attention_mask.bool() & (slots <= write_index)[None, :]
    return (keep | (slots == write_index)[None, :])[:, None, None, :]


class EncoderHalf(nn.Module):
    """pixels [b x 3 x H x W] (tiled: [b x T x 3 x H x W] + aspect_ratio_ids [b]) -> one visual-token
    tensor [b x n x w] per fusion, in `fusions` order."""

    def __init__(self, model: VisionLanguageModel, fusions: list[str], tiled: bool):
        super().__init__()
        self.model = view(model, encoder_parts(model))
        self.fusions = fusions
        self.tiled = tiled

    def forward(self, pixel_values: Tensor, aspect_ratio_ids: Tensor | None = None) -> tuple[Tensor, ...]:
        feats = self.model.encode_images(pixel_values, aspect_ratio_ids=aspect_ratio_ids if self.tiled else None)
        return tuple(feats[f] for f in self.fusions)


class _DecoderHalf(nn.Module):
    """What prefill and decode share: the pass through the language model with a static cache."""

    def __init__(self, model: VisionLanguageModel, fusions: list[str], cross: dict[str, list[int]], max_len: int):
        super().__init__()
        self.model = model = view(model, decoder_parts(model))
        self.fusions = fusions  # every fusion, in interface order (visual inputs of prefill)
        self.cross = cross  # cross-attention fusion -> its layer ids (cached visual K / V)
        self.max_len = max_len
        # cross-attention fusions whose per-token visual mask travels with the cache (prefill -> decode)
        self.masked = [f for f in cross if model.fusion(f).masked]
        self.prefill_aspect = any(model.fusion(f).tiles is not None for f in self.masked)
        self.mrope = model.llm.c.mrope is not None

    def run(self, input_ids: Tensor, pos: Tensor, mask: Tensor, cache: StaticKVCache,
            features: dict[str, Tensor], token_mask: Tensor) -> Tensor:
        """`VisionLanguageModel.forward`'s pass with this graph's cache, mask and positions -> logits
        [b x vocab] (float32) of the last position."""
        model = self.model
        h = model.embed(input_ids, features)
        state = model.decode_state(input_ids, pos, h.dtype, mask, False, cache, features, token_mask=token_mask)
        return model.llm.logits(model.decode(h, pos, state)[:, -1]).float()

    def cross_outputs(self, cache: StaticKVCache) -> tuple[Tensor, ...]:
        out: list[Tensor] = []
        for f, ids in self.cross.items():
            out.append(torch.stack([cache.cross[f"{f}.{i}"][0] for i in ids]))
            out.append(torch.stack([cache.cross[f"{f}.{i}"][1] for i in ids]))
        out += [cache.extras[f"{f}.visible"].long() for f in self.masked]
        return tuple(out)


class PrefillHalf(_DecoderHalf):
    """(input_ids [b x s], attention_mask [b x s], [M-RoPE: position_ids [3 x b x s]], [aspect_ratio_ids [b]],
    visual tokens per fusion) -> (logits [b x vocab] of the last position, present_keys, present_values
    [layers x b x kv_heads x max_len x head_dim], then per cross-attention fusion its visual keys / values
    [xlayers x b x kv_heads x n x head_dim], then the visual masks of `masked` fusions).

    M-RoPE positions come in from the runner (`mrope_positions`, a Python loop over the prompt that a
    graph cannot hold); later tokens' positions are 1-D plus the offset it returns."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *visual: Tensor) -> tuple[Tensor, ...]:
        if self.mrope:
            pos, *visual = visual  # type: ignore[assignment]
        else:
            pos = self.model.positions(input_ids, attention_mask, None, 0)
        aspect = None
        if self.prefill_aspect:
            aspect, *visual = visual  # type: ignore[assignment]
        features = dict(zip(self.fusions, visual, strict=True))
        if aspect is not None:
            features[ASPECT_RATIO_IDS] = aspect[:, None]
        cache = StaticKVCache(self.max_len)
        mask = prefill_mask(attention_mask, self.model.bidirectional_prefix)
        logits = self.run(input_ids, pos, mask, cache, features, attention_mask.bool())
        return (logits, *cache.stacked(), *self.cross_outputs(cache))


class DecodeHalf(_DecoderHalf):
    """(input_ids [b x 1], position_ids [b x 1], attention_mask [b x max_len], past_keys, past_values,
    write_index [1], cross-attention K / V) -> (logits [b x vocab], present_keys, present_values)."""

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, past_keys: Tensor,
                past_values: Tensor, write_index: Tensor, *cross: Tensor) -> tuple[Tensor, ...]:
        cache = StaticKVCache(self.max_len, list(past_keys.unbind(0)), list(past_values.unbind(0)), write_index)
        it = iter(cross)
        for f, ids in self.cross.items():
            ks, vs = next(it), next(it)
            for j, i in enumerate(ids):
                cache.cross[f"{f}.{i}"] = (ks[j], vs[j])
        for f in self.masked:
            cache.extras[f"{f}.visible"] = next(it).bool()
        logits = self.run(input_ids, position_ids, step_mask(attention_mask, write_index), cache, {},
                          torch.ones_like(input_ids, dtype=torch.bool))
        return (logits, *cache.stacked())
