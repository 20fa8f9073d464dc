"""The assembled model: components by name, images -> features -> fused language model -> logits.

`build_model(analysis)` calls one registered builder per component, in data-flow order, and wraps
them in `VisionLanguageModel`, whose submodules are `components[<spec name>]`. Read top to bottom:
`encode_images` (encoders, then connectors in graph order), `forward` (embed and splice, positions,
masks, the decode state, the decoder, logits and loss), `generate` (in `vlmspec.runtime.generate`).

`forward`'s steps are methods (`embed`, `positions`, `decode_state`, `decode`) that the exported
halves (`vlmspec.runtime.export.halves`) call too, so there is one forward. The checks among them that
read tensor values as Python numbers are skipped under tracing (`blocks.tracing()`, true under
torch.export and torch.compile), the way transformers guards them with `is_torchdynamo_compiling()`:
a graph cannot hold them (the export runner makes them before it calls one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.schema.fusion import FusionBase
from vlmspec.compiler.schema.layouts import AnyRes, best_resolution, pooled_grid, unpadded_grid
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import DTYPES, VisualTokens, init_weights, tracing
from vlmspec.runtime.connectors.base import Instruction
from vlmspec.runtime.decoding import (
    ASPECT_RATIO_IDS,
    IMAGE_FACTS,
    IMAGE_GRID,
    IMAGE_LENGTHS,
    VIDEO_GRID,
    VIDEO_TIME,
    DecodeState,
    KVCache,
    attention_mask_4d,
    check_mask_length,
    default_position_ids,
    prefix_from_labels,
    segment_mask,
    segment_positions,
    segment_prefix,
)
from vlmspec.runtime.fusion import Fusion
from vlmspec.runtime.generate import generate
from vlmspec.runtime.language import CausalLM, LayerHooks
from vlmspec.runtime.language.moe import SparseMoE, upcycle
from vlmspec.runtime.language.mrope import mrope_positions, video_mrope_positions
from vlmspec.runtime.registry import BuildContext, build_component, load_builders

IGNORE_INDEX = -100

__all__ = ["VLMOutput", "VisionLanguageModel", "build_model", "causal_lm_loss", "upcycle"]


@dataclass(slots=True)
class VLMOutput:
    """logits [b x s x vocab] (or [targets x vocab], one row per labelled position, with
    `logits_for = "labels"`); loss = LM loss (+ weighted MoE aux loss) when labels are given;
    aux_loss = the weighted load-balancing loss of the MoE layers (None without MoE); cache = the
    KV cache passed in, now holding this pass too."""

    logits: Tensor
    loss: Tensor | None = None
    aux_loss: Tensor | None = None
    cache: KVCache | None = None


class VisionLanguageModel(nn.Module):
    """A vision-language model built from a spec; `components[name]` is the module of component `name`."""

    #: the video placeholder's id (`frames(token_id = ...)`; None: videos use the image placeholder)
    video_token_id: int | None = None

    def __init__(self, components: dict[str, nn.Module], *, roles: dict[str, str], sources: dict[str, list[str]],
                 order: list[str], language: str, image_token_id: int, image_grid: tuple[int, int] | None = None):
        super().__init__()
        self.components = nn.ModuleDict(components)
        self.roles = roles
        self.sources = sources
        self.order = order  # vision encoders and connectors that feed a fusion, in data-flow order
        self.language = language
        self.fusions = [n for n, r in roles.items() if r == "fusion"]
        self.image_token_id = image_token_id
        self.image_grid = image_grid  # token grid of one image, for M-RoPE positions (None: 1-D positions)

    # ------------------------------------------------------------ parts
    @property
    def llm(self) -> CausalLM:
        return self.components[self.language]  # type: ignore[return-value]

    def fusion(self, name: str) -> Fusion:
        return self.components[name]  # type: ignore[return-value]

    @property
    def in_sequence(self) -> list[str]:
        return [f for f in self.fusions if self.fusion(f).in_sequence]

    def layer_hooks(self) -> list[LayerHooks] | None:
        """Per decoder layer, what the fusions add; None when no fusion reaches inside the layers."""
        if not any(self.fusion(f).reaches_layers for f in self.fusions):
            return None
        hooks = [LayerHooks() for _ in range(len(self.llm.layers))]
        for f in self.fusions:
            self.fusion(f).contribute(hooks)
        if not any(h.before or h.expert is not None or h.moe is not None for h in hooks):
            return None
        return hooks

    def moe_pairs(self) -> list[tuple[SparseMoE, nn.Module]]:
        """(MoE block, the decoder layer whose dense FFN is its expert 0), for up-cycling."""
        pairs = list(self.llm.moe_pairs())
        for f in self.fusions:
            mp = getattr(self.fusion(f), "moe_pairs", None)
            if mp is not None:
                pairs += mp(self.llm)
        return pairs

    def _reads(self, flag: str) -> bool:
        return any(getattr(self.fusion(f), flag) for f in self.fusions)

    def _needs_token_mask(self) -> bool:
        return (self._reads("uses_token_mask") or bool(self.llm.moe_pairs())
                or getattr(self.llm, "reads_token_mask", False))  # a scan masks padding by itself (mamba)

    @property
    def bidirectional_prefix(self) -> bool:
        """Whether the prompt attends bidirectionally (a `prefix_attention = bidirectional` fusion)."""
        return self._reads("bidirectional_prefix")

    def new_cache(self) -> KVCache:
        return KVCache()

    # ------------------------------------------------------------ images
    def encode_images(self, pixel_values: Tensor | dict[str, Tensor], instruction: Instruction | None = None,
                      aspect_ratio_ids: Tensor | None = None, image_sizes: Tensor | None = None) -> dict[str, Tensor]:
        """Images -> {fusion name: features [b x (n_images * tokens) x d]}.

        pixel_values: [b x c x h x w] (one image per sample), [b x n x c x h x w], or a dict giving each
        vision encoder its own tensor (encoders at different resolutions). A tiled encoder (`tiles = T`)
        takes [b (x n) x T x c x h x w], with `aspect_ratio_ids` [b (x n)] choosing the tile layout; the
        ids (default 1: the image in the first tile) come back as features[ASPECT_RATIO_IDS] [b x n], and
        for M-RoPE the images' token grid as features[IMAGE_GRID] [b x 2]. An encoder with an image layout
        (`anyres`, `dynamic_tiles`, `split`) takes its images' tiles [b (x n) x most tiles x c x h x w] with
        `image_sizes` [b (x n) x 2], each image's (height, width) (without them, each image's first tile
        alone). A dynamic-resolution encoder (Qwen2-VL) takes images of one size, or one image per sample
        padded at the bottom and right to [b x c x H x W] with `image_sizes` [b x 2] each one's own
        (height, width) (`_native_sizes`).
        """
        if image_sizes is not None and self._reads_native():
            return self._native_sizes(pixel_values, instruction, image_sizes)
        if "audio" in self.roles.values():
            raise user_error("E0614", "this model reads audio, not images", help="encode clips with `encode_audio`")
        outs: dict[str, VisualTokens] = {}
        # encoder with an image layout (and the connector reading it) -> (images' sizes, None for first tiles
        # alone; its config)
        laid: dict[str, tuple[list[tuple[int, int]] | None, Any]] = {}
        batch: tuple[int, int] | None = None
        for name in self.order:
            comp = self.components[name]
            if self.roles[name] == "vision":
                px = pixel_values.get(name) if isinstance(pixel_values, dict) else pixel_values
                if px is None:
                    raise user_error("E0593", f"no pixel_values for vision encoder `{name}`",
                                     help="pass a dict with one tensor per encoder: " + ", ".join(
                                         n for n in self.order if self.roles[n] == "vision"))
                # laid-out images come as tiles with their sizes; without sizes, each image is its first tile
                laid_out = not isinstance(getattr(comp.cfg, "layout", "fixed"), str)
                tiled = laid_out and image_sizes is not None
                px, bn = _flatten_images(px, 4 if tiled else comp.image_dims, name)
                if tiled and bn[1] > 1 and getattr(comp.cfg.layout, "multi_image", "tiles") == "square":
                    # several images in a prompt: each read as its one square tile (`one_of_several`)
                    tiled, px = False, px[:, 0]
                if batch is not None and bn != batch:
                    raise user_error("E0593", f"encoder `{name}` gets {bn[0]} x {bn[1]} images, another one "
                                     f"{batch[0]} x {batch[1]}", help="give every encoder the same images")
                batch = bn
                if tiled:
                    outs[name], laid[name] = self._real_tiles(comp, px, image_sizes, name)
                    continue
                if laid_out:
                    outs[name], laid[name] = comp(px), (None, comp.cfg)
                    continue
                aspect = aspect_ratio_ids.reshape(-1) if aspect_ratio_ids is not None else None
                outs[name] = comp(px, aspect) if comp.cfg.tiles else comp(px)
            else:
                per_image = _per_image(instruction, batch[1] if batch is not None else 1)
                outs[name] = comp([outs[s] for s in self.sources[name]], per_image)
                for s in self.sources[name]:
                    if s in laid:  # the connector that reads a laid-out encoder lays its tiles out
                        laid[name] = laid[s]
        if batch is None:
            raise user_error("E0593", "this model has no vision encoder to read pixel_values")
        b, n = batch
        features = {}
        for f in self.fusions:
            if any(s in laid for s in self.sources[f]):
                features[f], lengths = self._laid_out_features(f, outs, laid, b, n)
                if lengths is not None:
                    features[IMAGE_LENGTHS] = lengths
                continue
            x = torch.cat([outs[s].x for s in self.sources[f]], dim=1)
            features[f] = x.reshape(b, n * x.shape[1], x.shape[2])
        if any(getattr(self.components[e].cfg, "tiles", 0) for e in self.order if self.roles[e] == "vision"):
            # which tiles of each image are real: cross-attention masks the rest
            features[ASPECT_RATIO_IDS] = (aspect_ratio_ids.reshape(b, n) if aspect_ratio_ids is not None else
                                          torch.ones(b, n, dtype=torch.long, device=x.device))
        grid = self._token_grid(outs)
        if grid is not None:  # M-RoPE numbers an image's tokens by row and column of this grid
            features[IMAGE_GRID] = torch.tensor(grid, device=x.device).expand(b, 2)
        return features

    def encode_videos(self, frames: Tensor, seconds: Tensor | None = None) -> dict[str, Tensor]:
        """Videos [b x F x c x h x w] -> features for `forward` / `generate` (`image_features = ...`); see
        `vlmspec.runtime.video_features.encode_videos`."""
        from vlmspec.runtime.video_features import encode_videos

        return encode_videos(self, frames, seconds)

    def encode_audio(self, features: Tensor, lengths: Tensor | None = None) -> dict[str, Tensor]:
        """Clips' log-mel features [b x mels x frames] (real frames per clip in `lengths`) -> features for
        `forward` / `generate` (`image_features = ...`); see `vlmspec.runtime.audio.features`."""
        from vlmspec.runtime.audio.features import encode_audio

        return encode_audio(self, features, lengths)

    def _reads_native(self) -> bool:
        """Whether an encoder reads images at their own size (`resolution = dynamic(...)`)."""
        return any(not isinstance(getattr(self.components[e].cfg, "resolution", "fixed"), str)
                   for e in self.order if self.roles[e] == "vision")

    def _native_sizes(self, pixel_values: Tensor | dict[str, Tensor], instruction: Instruction | None,
                      sizes: Tensor) -> dict[str, Tensor]:
        """Features of images of several native sizes, one per sample, padded into one tensor: each size's
        samples encoded together (cut to their own size), each row's features right-padded to the longest
        with its count (`IMAGE_LENGTHS`) and its own token grid (`IMAGE_GRID`), as a batch of one row
        would give them."""
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or sizes.reshape(-1, 2).shape[0] != \
                pixel_values.shape[0]:
            raise user_error("E0593", "images of several native sizes come one per sample, padded to [b x c x H x "
                             "W], with image_sizes [b x 2]", help="the processor's `stack` makes them")
        hw = [(int(h), int(w)) for h, w in sizes.reshape(-1, 2).tolist()]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(hw):
            groups.setdefault(size, []).append(i)
        rows: dict[int, dict[str, Tensor]] = {}
        for (h, w), idx in groups.items():
            sub = None if instruction is None else Instruction(
                instruction.ids[idx], instruction.mask[idx] if instruction.mask is not None else None)
            got = self.encode_images(pixel_values[idx, :, :h, :w], sub)
            for k, i in enumerate(idx):
                rows[i] = {f: x[k] for f, x in got.items()}
        b = len(hw)
        out: dict[str, Tensor] = {}
        for f in self.fusions:
            if f not in rows[0]:
                continue
            xs = [rows[i][f] for i in range(b)]
            lengths = [x.shape[0] for x in xs]
            padded = xs[0].new_zeros(b, max(lengths), xs[0].shape[-1])
            for i, x in enumerate(xs):
                padded[i, : x.shape[0]] = x
            out[f] = padded
            if len(set(lengths)) > 1:
                out[IMAGE_LENGTHS] = torch.tensor(lengths, device=padded.device)
        if IMAGE_GRID in rows[0]:
            out[IMAGE_GRID] = torch.stack([rows[i][IMAGE_GRID] for i in range(b)])
        return out

    def _real_tiles(self, comp: nn.Module, px: Tensor, sizes: Tensor | None,
                    name: str) -> tuple[VisualTokens, tuple[list[tuple[int, int]], Any]]:
        """A laid-out encoder over the real tiles of px [images x most tiles x c x s x s] (as many as the
        layout cuts each image into, the zero tiles after them skipped), given the images' (height, width)
        in `sizes` [images x 2]."""
        cfg = comp.cfg
        if sizes is None or sizes.reshape(-1, 2).shape[0] != px.shape[0]:
            raise user_error("E0593", f"encoder `{name}` lays out images of any size: give each image's (height, "
                             "width) in image_sizes", help="the processor's generation_batch does")
        hw = [(int(h), int(w)) for h, w in sizes.reshape(-1, 2).tolist()]
        counts = [cfg.layout.tile_count(h, w, cfg.image_size) for h, w in hw]
        if max(counts) > px.shape[1]:
            raise user_error("E0593", f"encoder `{name}`: an image of size {hw[counts.index(max(counts))]} takes "
                             f"{max(counts)} tiles but pixel_values hold {px.shape[1]}",
                             help="lay the images out with the processor's transform for this encoder")
        tiles = torch.cat([px[i, :c] for i, c in enumerate(counts)])
        return comp(tiles), (hw, cfg)

    def _laid_out_features(self, fusion: str, outs: dict[str, VisualTokens],
                           laid: dict[str, tuple[list[tuple[int, int]] | None, Any]], b: int,
                           n: int) -> tuple[Tensor, Tensor | None]:
        """The fusion's features [b x tokens x d] of laid-out images: each image's tiles laid out (an anyres
        grid by `anyres_layout`; other layouts' tiles one after another), the n images of a sample one after
        another; when samples take different counts, right-padded to the longest, with each row's count
        (else None)."""
        (src,) = self.sources[fusion]
        hw, cfg = laid[src]
        x = outs[src].x
        newline = getattr(self.components[src], "image_newline", None)
        if hw is None:  # base tiles alone: each image's tokens then the newline, as transformers reads one tile
            if newline is not None:
                x = torch.cat([x, newline.to(x.dtype).expand(x.shape[0], 1, x.shape[2])], dim=1)
            return x.reshape(b, n * x.shape[1], x.shape[2]), None
        images, start = [], 0
        for h, w in hw:
            count = cfg.layout.tile_count(h, w, cfg.image_size)
            tiles = x[start: start + count]
            if isinstance(cfg.layout, AnyRes):
                rows, cols = (d // cfg.image_size for d in best_resolution(h, w, cfg.layout.pinpoints))
                images.append(anyres_layout(tiles, (h, w), rows, cols, cfg.layout, newline))
            else:
                images.append(tiles.reshape(-1, x.shape[-1]))
            start += count
        samples = [torch.cat(images[i * n:(i + 1) * n]) for i in range(b)]
        lengths = [s.shape[0] for s in samples]
        if len(set(lengths)) == 1:
            return torch.stack(samples), None
        padded = x.new_zeros(b, max(lengths), x.shape[-1])
        for i, s in enumerate(samples):
            padded[i, : s.shape[0]] = s
        return padded, torch.tensor(lengths, device=x.device)

    def _token_grid(self, outs: dict[str, VisualTokens]) -> tuple[int, int] | None:
        """The (rows, columns) grid of one image's tokens in the sequence, for M-RoPE: known when one
        in-sequence fusion reads one source that keeps a grid (a patch merger's output)."""
        # an exported encoder half holds no language model
        llm = self.components[self.language] if self.language in self.components else None
        if not isinstance(llm, CausalLM) or llm.c.mrope is None or len(self.in_sequence) != 1:
            return None
        sources = self.sources[self.in_sequence[0]]
        return outs[sources[0]].grid if len(sources) == 1 else None

    def extract_features(self, pixel_values: Tensor | dict[str, Tensor], aspect_ratio_ids: Tensor | None = None,
                         image_sizes: Tensor | None = None) -> Tensor:
        """Connector output embeddings [b x tokens x d], e.g. for retrieval (all fusions' inputs, in order)."""
        feats = [x for f, x in self.encode_images(pixel_values, aspect_ratio_ids=aspect_ratio_ids,
                                                    image_sizes=image_sizes).items()
                 if f not in IMAGE_FACTS]
        if len({f.shape[-1] for f in feats}) > 1:
            raise user_error("E0598", "fusions take features of different widths; use `encode_images` instead")
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)

    # ------------------------------------------------------------ text
    def embed(self, input_ids: Tensor, features: dict[str, Tensor], packed: bool = False) -> Tensor:
        """Embeddings [b x s x w] of input_ids [b x s], with the in-sequence image features spliced in."""
        return self.splice(self.llm.embed(input_ids), input_ids, features, packed)

    def splice(self, h: Tensor, input_ids: Tensor, features: dict[str, Tensor], packed: bool = False) -> Tensor:
        """Put in-sequence image features [b x n x w] at the image-token positions of h [b x s x w].
        packed: the rows hold several samples each (training with `packing`), and the features are one
        image per sample in the rows' reading order, so they fill the image tokens in that order.
        The image-token count check reads tensor values: skipped under tracing (see the module docstring)."""
        feats = [features[f] for f in self.in_sequence if f in features]
        if not feats:
            return h
        x = feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)
        counts = (input_ids == self.image_token_id).sum(1)
        lengths = features.get(IMAGE_LENGTHS)
        if packed:
            real = torch.cat([x[i, : int(n)] for i, n in enumerate(lengths.tolist())]) if lengths is not None \
                else x.reshape(-1, x.shape[-1])
            if int(counts.sum()) != real.shape[0]:
                raise user_error("E0513", f"the packed rows have {int(counts.sum())} image tokens but their images "
                                 f"give {real.shape[0]} features", help="put one image token per visual token in "
                                 "each sample (the processor's `image_tokens` counts them)")
            return h.masked_scatter((input_ids == self.image_token_id).unsqueeze(-1), real.to(h.dtype))
        if lengths is not None:  # anyres rows of different counts: each row's real features, in row order
            if not tracing() and bool((counts != lengths.to(counts.device)).any()):
                i = int((counts != lengths.to(counts.device)).nonzero()[0])
                raise user_error("E0513", f"the prompt has {int(counts[i])} image tokens but its images give "
                                 f"{int(lengths[i])} features", help="put one image token per visual token in "
                                 "each prompt (the processor's `image_tokens` counts them)")
            mask = (input_ids == self.image_token_id).unsqueeze(-1)
            real = torch.cat([x[i, : int(n)] for i, n in enumerate(lengths.tolist())])
            return h.masked_scatter(mask, real.to(h.dtype))
        if not tracing() and bool((counts != x.shape[1]).any()):
            bad = int(counts[counts != x.shape[1]][0])
            raise user_error("E0513", f"the prompt has {bad} image tokens but the images give {x.shape[1]} features "
                             "per sample", help=f"put {x.shape[1]} image tokens (id {self.image_token_id}) in every "
                             "prompt, one per visual token")
        mask = (input_ids == self.image_token_id).unsqueeze(-1)
        return h.masked_scatter(mask, x.to(h.dtype))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                pixel_values: Tensor | dict[str, Tensor] | None = None, labels: Tensor | None = None,
                image_features: dict[str, Tensor] | None = None, cache: KVCache | None = None,
                position_ids: Tensor | None = None, logits_to_keep: int = 0,
                instruction: Instruction | None = None, prefix_mask: Tensor | None = None,
                logits_for: str = "all", aspect_ratio_ids: Tensor | None = None,
                image_mask: Tensor | None = None, image_sizes: Tensor | None = None,
                segment_ids: Tensor | None = None, videos: Tensor | None = None,
                video_seconds: Tensor | None = None, audio: Tensor | None = None,
                audio_lengths: Tensor | None = None) -> VLMOutput:
        """input_ids [b x s] (the new tokens when a cache is given); attention_mask [b x (past + s)], 1 = real,
        0 = (left) padding; labels [b x s] with -100 where no loss is taken (shifted here).
        `logits_to_keep` = k > 0 computes logits for the last k positions only (generation).
        `logits_for = "labels"` (with labels) computes logits only where a next-token target exists, in
        row-major order (`label_targets(labels)` gives the targets): training needs nothing else, and the
        image and prompt positions are often most of the sequence.

        instruction: the instruction text of an instruction-aware connector (InstructBLIP's Q-Former:
        its own tokenizer's ids and mask, Hugging Face's `qformer_input_ids` / `qformer_attention_mask`),
        used when pixel_values are encoded here.
        prefix_mask: bool [b x s], True at the tokens of the bidirectional prefix (Hugging Face
        PaliGemma's `token_type_ids == 0`); read only when a fusion has `prefix_attention =
        bidirectional`. Default: with labels, the tokens before each row's first label; else, a prompt
        prefilled into an empty cache (generation, serving) is all prefix; else none (causal).
        aspect_ratio_ids: [b (x n)] tile layouts of a tiled encoder's images (Mllama's numbering), used
        when pixel_values are encoded here (`encode_images` puts them among the image features).
        image_sizes: [b (x n) x 2] each image's (height, width), for an encoder that lays images of any size
        out (`layout = anyres(...)`), used when pixel_values are encoded here.
        image_mask: bool [b x s], where the images' tokens are (default: input_ids == image_token_id);
        generation passes the prompt's, so that a generated image token is text, not a new image.
        segment_ids: [b x s] packed rows (training with `packing`): each row's samples numbered 1, 2, ...
        (0 = padding). Attention stays inside each sample, positions restart with each, a bidirectional
        prefix is each sample's own, and the image features (one image per sample, in reading order) fill
        the image tokens in order: each sample is computed as it would be alone.
        videos: [b x F x c x h x w] one video per row and video_seconds [b] (seconds per temporal patch), encoded
        here as `encode_videos` does, so that training takes the video path through the wrapped model.
        audio: [b x mels x frames] log-mel features, one clip per row, and audio_lengths [b] (real frames), encoded
        here as `encode_audio` does (training on audio records).
        """
        llm = self.llm
        if image_features is None and audio is not None:  # training on audio records (`encode_audio`)
            image_features = self.encode_audio(audio, audio_lengths)
        if image_features is None and videos is not None:  # training on video records (`encode_videos`)
            image_features = self.encode_videos(videos, video_seconds)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values, instruction, aspect_ratio_ids, image_sizes)
        features = image_features or {}
        b, s = input_ids.shape
        past = cache.length() if cache is not None else 0
        check_mask_length(attention_mask, past, s)
        if past + s > llm.c.max_positions:
            raise user_error("E0514", f"{past + s} tokens exceed the language model's max_positions = "
                             f"{llm.c.max_positions}", help="shorten the prompt or max_new_tokens")
        packed = segment_ids is not None
        if packed and cache is not None:
            raise ValueError("packed rows (segment_ids) are for training passes, not for decoding with a cache")
        if VIDEO_GRID in features and self.video_token_id is not None:  # a video's placeholders are visual tokens
            input_ids = input_ids.masked_fill(input_ids == self.video_token_id, self.image_token_id)
        h = self.embed(input_ids, features, packed)
        grid = features.get(IMAGE_GRID)
        grids = [(int(h), int(w)) for h, w in grid.tolist()] if grid is not None else None
        if position_ids is not None:
            pos = position_ids
        elif packed:
            pos = self.packed_positions(input_ids, segment_ids, grids)
        elif VIDEO_GRID in features and self.llm.c.mrope is not None and past == 0:
            pos, delta = video_mrope_positions(input_ids, attention_mask[:, -s:] if attention_mask is not None
                                               else None, self.image_token_id,
                                               [tuple(g) for g in features[VIDEO_GRID].tolist()], features[VIDEO_TIME])
            if cache is not None:
                cache.extras["mrope_delta"] = delta
        else:
            pos = self.positions(input_ids, attention_mask, cache, past, grids)
        prefix = None
        if self.bidirectional_prefix:
            prefix = prefix_mask
            if prefix is None and labels is not None:
                prefix = segment_prefix(labels, segment_ids) if packed else prefix_from_labels(labels)
            elif prefix is None and cache is not None and past == 0:
                prefix = torch.ones_like(input_ids, dtype=torch.bool)
        if packed:
            mask, causal = segment_mask(segment_ids.to(h.device), prefix), False
        else:
            mask, causal = attention_mask_4d(attention_mask, past, s, h.device, prefix)
        state = self.decode_state(input_ids, pos, h.dtype, mask, causal, cache, features, image_mask=image_mask,
                                  token_mask=attention_mask[:, -s:].bool() if attention_mask is not None else None)
        h = self.decode(h, pos, state)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        targets = None
        if labels is not None and logits_for == "labels":
            if labels.shape != input_ids.shape:
                raise user_error("E0515", f"labels have shape {tuple(labels.shape)} but input_ids {tuple(input_ids.shape)}")
            keep, targets = label_targets(labels.to(h.device))
            h = h[keep]
        elif logits_for not in ("all", "labels"):
            raise ValueError(f"logits_for must be 'all' or 'labels', not {logits_for!r}")
        logits = llm.logits(h)
        aux = torch.stack(state.aux).mean() if state.aux else None
        loss = None
        if labels is not None:
            if targets is not None:
                loss = F.cross_entropy(logits.float(), targets) if targets.numel() else logits.sum() * 0.0
            else:
                loss = causal_lm_loss(logits, labels)
            if aux is not None:
                loss = loss + aux
        return VLMOutput(logits, loss, aux, cache)

    def decode_state(self, input_ids: Tensor, pos: Tensor, dtype: torch.dtype, mask: Tensor | None, causal: bool,
                     cache: KVCache | None, features: dict[str, Tensor], *, image_mask: Tensor | None = None,
                     token_mask: Tensor | None = None) -> DecodeState:
        """What the decoder layers and fusion hooks read during one pass over input_ids [b x s].

        pos: `positions`' ids of the pass; mask / causal: as `attention_mask_4d` gives them; features: the
        image features (cross-attention fusions read theirs from here); image_mask: bool [b x s], where
        the images' tokens are (default: input_ids == image_token_id); token_mask: bool [b x s], True at
        real tokens. A mask no fusion (nor MoE routing) reads is left out.
        """
        return DecodeState(
            rotary=self.llm.rotary(pos, dtype), mask=mask, causal=causal, cache=cache,
            image_mask=(image_mask if image_mask is not None else input_ids == self.image_token_id)
            if self._reads("uses_image_mask") else None,
            token_mask=token_mask if self._needs_token_mask() else None,
            visual={f: x for f, x in features.items() if f not in IMAGE_FACTS and not self.fusion(f).in_sequence},
            aspect_ratio_ids=features.get(ASPECT_RATIO_IDS),
        )

    def decode(self, h: Tensor, pos: Tensor, state: DecodeState) -> Tensor:
        """The decoder layers, with every fusion's hooks, over embeddings h [b x s x w] at positions pos."""
        return self.llm.decode(self.llm.add_positions(h, pos), state, self.layer_hooks())

    def packed_positions(self, input_ids: Tensor, segments: Tensor,
                         grids: list[tuple[int, int]] | None = None) -> Tensor:
        """Positions of packed rows, each sample's as if it were alone in its row: [b x s], or [3 x b x s]
        for M-RoPE, whose samples with images take the images' grids (one per image, in reading order)."""
        pos = segment_positions(segments)
        if self.llm.c.mrope is None or (grids is None and self.image_grid is None):
            return pos
        out = pos.unsqueeze(0).repeat(3, 1, 1)
        queue = list(grids or [])
        static = self.image_grid or (1, 1)
        for i, row in enumerate(segments.tolist()):
            start = 0
            while start < len(row):
                end = start
                while end < len(row) and row[end] == row[start]:
                    end += 1
                if row[start] > 0:
                    ids = input_ids[i, start:end][None]
                    has_image = bool((ids == self.image_token_id).any())
                    mine = queue.pop(0) if queue and has_image else static
                    out[:, i, start:end] = mrope_positions(ids, None, self.image_token_id, mine)[0][:, 0]
                start = end
        return out

    def positions(self, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache | None, past: int,
                  grid: tuple[int, int] | list[tuple[int, int]] | None = None) -> Tensor:
        """[b x s] position ids (real tokens counted, left padding skipped), or [3 x b x s] for M-RoPE,
        whose image tokens are numbered on `grid` (the images' token grid, or each row's; default: the
        static one)."""
        b, s = input_ids.shape
        pos = default_position_ids(attention_mask, past, s, b, input_ids.device)
        grid = grid or self.image_grid
        if self.llm.c.mrope is None:
            return pos
        if past == 0:
            if grid is None:
                return pos
            mask = attention_mask[:, -s:] if attention_mask is not None else None
            pos3, delta = mrope_positions(input_ids, mask, self.image_token_id, grid)
            if cache is not None:
                cache.extras["mrope_delta"] = delta
            return pos3
        delta = cache.extras.get("mrope_delta") if cache is not None else None
        return pos if delta is None else pos + delta[:, None]

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 pixel_values: Tensor | dict[str, Tensor] | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, num_beams: int = 1,
                 eos_token_id: int | list[int] | None = None, seed: int | None = None, use_cache: bool = True,
                 image_features: dict[str, Tensor] | None = None, pad_token_id: int | None = None,
                 instruction: Instruction | None = None, aspect_ratio_ids: Tensor | None = None,
                 image_sizes: Tensor | None = None) -> Tensor:
        """New tokens only, [b x n_new]; see `vlmspec.runtime.generate.generate` (which reads this module
        only for its types, so the import runs one way)."""
        return generate(self, input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                        num_beams=num_beams, eos_token_id=eos_token_id, seed=seed, use_cache=use_cache,
                        image_features=image_features, pad_token_id=pad_token_id, instruction=instruction,
                        aspect_ratio_ids=aspect_ratio_ids, image_sizes=image_sizes)


def anyres_layout(tiles: Tensor, size: tuple[int, int], rows: int, cols: int, layout: Any,
                  newline: Tensor | None) -> Tensor:
    """One image's tile features [1 + rows * cols x g*g x d] (base tile first) -> its tokens [t x d]: the
    base tile's, then the other tiles' as one grid (rows of tiles, each g x g), the padding cut off
    (`unpad`, against the original `size`), pooled bilinearly when larger than `max_tiles` allows, the
    newline embedding after each grid row."""
    g = math.isqrt(tiles.shape[1])
    d = tiles.shape[2]
    grid = tiles[1:].view(rows, cols, g, g, d).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, d)
    if layout.unpad:
        r, c = unpadded_grid(size[0], size[1], rows * g, cols * g)
        top, left = (rows * g - r) // 2, (cols * g - c) // 2
        grid = grid[top: top + r, left: left + c]
    pooled = pooled_grid(grid.shape[0], grid.shape[1], g, layout.max_tiles)
    if pooled != tuple(grid.shape[:2]):
        grid = F.interpolate(grid.permute(2, 0, 1)[None], list(pooled), mode="bilinear")[0].permute(1, 2, 0)
    if newline is not None:
        grid = torch.cat([grid, newline.to(grid.dtype).expand(grid.shape[0], 1, d)], dim=1)
    return torch.cat([tiles[0], grid.reshape(-1, d)])


def label_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(bool [b x s]: positions that predict a labelled next token, their targets [n]), row-major."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    keep = shifted != IGNORE_INDEX
    return keep, shifted[keep]


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (0 when there are none)."""
    if labels.shape != logits.shape[:2]:
        raise user_error("E0515", f"labels have shape {tuple(labels.shape)} but input_ids {tuple(logits.shape[:2])}")
    # shift the labels, not the logits: slicing `[b x s x vocab]` logits would copy the largest tensor
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1).to(logits.device)
    flat = logits.reshape(-1, logits.shape[-1])
    total = F.cross_entropy(flat if flat.dtype == torch.float32 else flat.float(), shift_labels,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = (shift_labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def build_model(analysis: Analysis, *, image_token_id: int | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype | str | None = None) -> VisionLanguageModel:
    """Build the model a checked spec describes. Weights are freshly initialised (normal, std 0.02;
    cross-attention gates at 0); `device="meta"` allocates nothing (for counting and planning).

    image_token_id: the id of the image placeholder (default: the last row of the base vocabulary).
    dtype: overrides every component's spec `dtype` (a torch dtype or "fp32" / "bf16" / "fp16").
    """
    load_builders()
    ir = analysis.ir
    from vlmspec.runtime.contrastive import build_contrastive, contrastive_head

    if contrastive_head(analysis) is not None:  # CLIP / SigLIP: two towers and a head, no language model
        return build_contrastive(analysis, device=device, dtype=dtype)  # type: ignore[return-value]
    lm = ir.language
    if lm is None:
        raise user_error("E0592", f"model `{ir.name}` has no language model")
    topo = analysis.graph.topological_order()
    fusions = [n for n in topo if ir.components[n].role == "fusion"]
    needed = _ancestors(fusions, {n: list(c.sources) for n, c in ir.components.items()})
    front = [n for n in topo if ir.components[n].role in ("vision", "audio", "connector")]
    ctx = BuildContext(analysis)
    with torch.device(device):
        for name in [*front, lm.name, *fusions]:
            ctx.built[name] = build_component(ir.components[name], ctx)
        if torch.device(device).type != "meta":
            for module in ctx.built.values():
                init_weights(module)
    override = DTYPES[dtype] if isinstance(dtype, str) else dtype
    lm_dtype = override or DTYPES[getattr(lm.config, "dtype", "fp32")]
    for name, module in ctx.built.items():
        cfg = ir.components[name].config
        target = override or (lm_dtype if isinstance(cfg, FusionBase) else DTYPES[getattr(cfg, "dtype", "fp32")])
        module.to(dtype=target)
    llm = ctx.built[lm.name]
    n_vocab = llm.c.embed_rows  # type: ignore[union-attr]
    if image_token_id is None:
        image_token_id = ir.settings.image_token_id
    token = llm.c.vocab - 1 if image_token_id is None else image_token_id  # type: ignore[union-attr]
    if not 0 <= token < n_vocab:
        raise user_error("E0516", f"image_token_id {token} is outside the vocabulary of {n_vocab}")
    cls = VisionLanguageModel
    if getattr(llm, "encoder_decoder", False):  # an encoder, then a decoder (t5): the model class that drives both
        from vlmspec.runtime.encoder_decoder import EncoderDecoderVLM as cls
    model = cls(
        {n: ctx.built[n] for n in ir.components if n in ctx.built},
        roles={n: c.role for n, c in ir.components.items()},
        sources={n: list(c.sources) for n, c in ir.components.items()},
        order=[n for n in front if n in needed], language=lm.name, image_token_id=token,
        image_grid=_image_grid(analysis))
    video = [c.config.video for c in ir.by_role("vision") if getattr(c.config, "video", None) is not None]
    if video and video[0].token_id is not None:
        model.video_token_id = video[0].token_id
    model.layer_hooks()  # fusions that both replace one layer's weights are reported now, not at the first forward
    return model


def _ancestors(roots: list[str], sources: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        for s in sources.get(n, []):
            if s not in seen:
                seen.add(s)
                stack.append(s)
    return seen


def _image_grid(analysis: Analysis) -> tuple[int, int] | None:
    """The token grid of one image for M-RoPE: known statically when one fixed-resolution, square-grid
    fusion puts images in the sequence; otherwise None (positions stay 1-D)."""
    seq = [f for f in analysis.ir.by_role("fusion") if type(f.config).in_sequence]
    if len(seq) != 1:
        return None
    shape = analysis.shapes.out[seq[0].name]
    side = math.isqrt(shape.tokens)
    if shape.dynamic or side * side != shape.tokens:
        return None
    return side, side


def _flatten_images(px: Tensor, image_dims: int, name: str) -> tuple[Tensor, tuple[int, int]]:
    """[b x image] or [b x n x image] -> ([(b*n) x image], (b, n))."""
    if not isinstance(px, Tensor) or px.dim() not in (image_dims + 1, image_dims + 2):
        shape = tuple(px.shape) if isinstance(px, Tensor) else type(px).__name__
        one = "c x h x w" if image_dims == 3 else "tiles x c x h x w"
        raise user_error("E0593", f"pixel_values for `{name}` must be [b x {one}] or [b x n x {one}], got {shape}")
    if px.dim() == image_dims + 2:
        return px.flatten(0, 1), (px.shape[0], px.shape[1])
    return px, (px.shape[0], 1)


def _per_image(instruction: Instruction | None, n: int) -> Instruction | None:
    """One instruction per sample -> one per image (n images per sample)."""
    if instruction is None or n == 1:
        return instruction
    mask = instruction.mask.repeat_interleave(n, 0) if instruction.mask is not None else None
    return Instruction(instruction.ids.repeat_interleave(n, 0), mask)
