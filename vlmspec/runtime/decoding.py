"""What persists between decoding steps (`KVCache`) and what one pass carries (`DecodeState`), plus
the position ids and attention masks that left padding and caching need.

Every cache write goes through `KVCache.update`, which writes slices into buffers (no `index_copy_`,
which TensorRT cannot convert), so a fixed-size static variant for export is a subclass that never
grows, without touching the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import Rotary

#: Image-features entries beside one per fusion: a tiled encoder's aspect-ratio ids [b x images], and the
#: token grid of the images [b x 2] (rows, columns) for M-RoPE positions. Features travel as one dict
#: through generation, beam search and serving, and these must follow them. No fusion can have these
#: names (a fusion is named by its kind).
ASPECT_RATIO_IDS = "aspect_ratio_ids"
IMAGE_GRID = "image_grid"
#: per row [b], how many of the in-sequence features are real when anyres images of different sizes give rows
#: different counts (the features are then right-padded to the longest row)
IMAGE_LENGTHS = "image_lengths"
#: a video's (temporal patches, rows, columns) token grid [b x 3] and M-RoPE time ids per temporal patch [b]
#: (`vlmspec.runtime.video_features`): their presence marks the features as a video's
VIDEO_GRID = "video_grid"
VIDEO_TIME = "video_time"
IMAGE_FACTS = (ASPECT_RATIO_IDS, IMAGE_GRID, IMAGE_LENGTHS, VIDEO_GRID, VIDEO_TIME)


class KVCache:
    """Per-layer self-attention keys / values, plus cross-attention keys / values of the images.

    Keys and values live in buffers [b x kv_heads x capacity x d] that grow geometrically (or are sized
    once with `reserve`, as generation does); a step writes its slice and attends over a view of the
    filled part, so decoding copies O(new tokens) per step, not O(sequence). `cross[name]` holds one
    fusion layer's visual K/V, computed once per image at prefill and reused at every later step.
    """

    def __init__(self, reserve: int = 0) -> None:
        self.reserve = reserve
        self._k: dict[int, Tensor] = {}
        self._v: dict[int, Tensor] = {}
        self._used: dict[int, int] = {}
        self.cross: dict[str, tuple[Tensor, Tensor]] = {}
        self.extras: dict[str, Tensor] = {}  # per-sequence facts later steps need (M-RoPE position offsets)

    def length(self) -> int:
        """Tokens already cached (the past length of the next pass)."""
        for n in self._used.values():
            return n
        return 0

    def layer_ids(self) -> list[int]:
        """The layers with cached keys / values (for code that reshapes a cache: the server's batching)."""
        return sorted(self._used)

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Cached keys and values of layer i: [b x hk x t x d] each."""
        n = self._used[i]
        return self._k[i][:, :, :n], self._v[i][:, :, :n]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this pass's k / v [b x hk x s x d] and return everything to attend over."""
        used = self._used.get(layer, 0)
        end = used + k.shape[2]
        buf_k = self._k.get(layer)
        if buf_k is None or end > buf_k.shape[2]:
            cap = max(end, self.reserve, 2 * used)
            grown_k = k.new_empty(*k.shape[:2], cap, k.shape[3])
            grown_v = v.new_empty(*v.shape[:2], cap, v.shape[3])
            if buf_k is not None:
                grown_k[:, :, :used] = buf_k[:, :, :used]
                grown_v[:, :, :used] = self._v[layer][:, :, :used]
            self._k[layer], self._v[layer] = grown_k, grown_v
        self._k[layer][:, :, used:end] = k
        self._v[layer][:, :, used:end] = v
        self._used[layer] = end
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (beam search), in that order."""
        for d in (self._k, self._v):
            for i, t in d.items():
                d[i] = t.index_select(0, index)
        self.cross = {n: (k.index_select(0, index), v.index_select(0, index)) for n, (k, v) in self.cross.items()}
        self.extras = {n: t.index_select(0, index) for n, t in self.extras.items()}


@dataclass(slots=True)
class DecodeState:
    """Everything the decoder layers and fusion hooks read during one forward pass.

    mask: bool [b x 1 x s x t] (True = may attend) or None with `causal` telling SDPA what to do;
    image_mask: [b x s] True at image-token positions of this pass's input; token_mask: [b x s] True
    at real (non-padding) tokens; visual: fusion name -> features [b x n x d]; aspect_ratio_ids:
    [b x images] tile layouts of a tiled encoder's images (None: every image in its first tile).
    """

    rotary: Rotary | None
    mask: Tensor | None
    causal: bool
    cache: KVCache | None = None
    image_mask: Tensor | None = None
    token_mask: Tensor | None = None
    visual: dict[str, Tensor] = field(default_factory=dict)
    aux: list[Tensor] = field(default_factory=list)
    aspect_ratio_ids: Tensor | None = None
    #: what one pass computes once for all the layers that read it (a fusion's visual mask)
    memo: dict[str, tuple[Tensor | None, ...]] = field(default_factory=dict)


def check_mask_length(attention_mask: Tensor | None, past: int, s: int) -> None:
    if attention_mask is not None and attention_mask.shape[1] != past + s:
        raise user_error("E0506", f"attention_mask covers {attention_mask.shape[1]} tokens but the cache holds {past} "
                         f"and input_ids adds {s}", help="pass the mask of the whole sequence so far (past + new)")


def default_position_ids(attention_mask: Tensor | None, past: int, s: int, batch: int, device: torch.device) -> Tensor:
    """[b x s] positions of this pass's tokens; with left padding they count real tokens only, so a padded
    prompt sees the same positions as an unpadded one (padding itself sits at position 0)."""
    if attention_mask is None:
        return torch.arange(past, past + s, device=device).unsqueeze(0).expand(batch, -1)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -s:]


def attention_mask_4d(attention_mask: Tensor | None, past: int, s: int, device: torch.device,
                      prefix: Tensor | None = None) -> tuple[Tensor | None, bool]:
    """(bool mask [b x 1 x s x (past+s)], causal flag) for SDPA.

    Without padding no mask is materialised: SDPA's own causal path for a prompt, nothing for one new
    token. Padding queries keep their own position visible so no softmax row is empty (no NaN).
    prefix: bool [b x s], True at this pass's tokens of a bidirectional prefix (PaliGemma's prefix-LM):
    those attend to each other in both directions; every other pair stays causal. Earlier passes'
    tokens are in the past of every new token, so only this pass's block changes.
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    bidirectional = prefix is not None and s > 1 and bool(prefix.any())
    if not padded and not bidirectional:
        if past == 0:
            return None, s > 1
        if s == 1:
            return None, False
    t = past + s
    q_pos = torch.arange(past, t, device=device)[:, None]
    k_pos = torch.arange(t, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # [1 x 1 x s x t]
    if bidirectional and prefix is not None:
        p = prefix.to(device=device, dtype=torch.bool)
        block = p[:, :, None] & p[:, None, :]  # [b x s x s]
        mask = mask | torch.nn.functional.pad(block, (past, 0))[:, None]
    if padded and attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
        mask = mask | (k_pos == q_pos)[None, None]
    return mask, False


def segment_mask(segments: Tensor, prefix: Tensor | None = None) -> Tensor:
    """Bool mask [b x 1 x s x s] for SDPA over packed rows: segments [b x s] numbers each row's samples
    1, 2, ... (0 = padding). A token reads the tokens of its own sample up to itself, and, inside a
    bidirectional prefix (prefix [b x s], True at each sample's prompt), the whole of that sample's prefix.
    Padding reads only itself, so no softmax row is empty."""
    s = segments.shape[1]
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    order = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()[None]
    if prefix is not None:
        p = prefix.to(device=segments.device, dtype=torch.bool)
        order = order | (p[:, :, None] & p[:, None, :])
    eye = torch.eye(s, dtype=torch.bool, device=segments.device)[None]
    return ((same & order) | eye)[:, None]


def segment_positions(segments: Tensor) -> Tensor:
    """[b x s] positions that restart at 0 with each sample of a packed row (padding at 0)."""
    s = segments.shape[1]
    idx = torch.arange(s, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return torch.where(segments > 0, idx - first, torch.zeros_like(idx))


def segment_prefix(labels: Tensor, segments: Tensor, ignore_index: int = -100) -> Tensor:
    """[b x s] True at each packed sample's tokens before its first label (`prefix_from_labels`, per sample)."""
    labelled = (labels != ignore_index) & (segments > 0)
    out = torch.zeros_like(segments, dtype=torch.bool)
    for k in segments.unique().tolist():
        if k == 0:
            continue
        inside = segments == k
        out |= inside & ((labelled & inside).long().cumsum(-1) == 0)
    return out


def prefix_from_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """[b x s] True at the tokens before a row's first one with a label: the prompt of a prompt + answer
    example (PaliGemma's `token_type_ids == 0`); a row without labels is all prompt."""
    return (labels != ignore_index).long().cumsum(-1) == 0
