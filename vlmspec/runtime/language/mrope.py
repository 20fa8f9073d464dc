"""Qwen2-VL's multimodal rotary positions (M-RoPE): (time, row, column) ids per token.

Text tokens get t = h = w = their running index. An image's gh x gw tokens all get t = start and
h = start + row, w = start + column; the text after it resumes at start + max(gh, gw). During cached
decoding a new token's position is its 1-D position plus a per-sequence offset `delta` (how far the
images moved the running index), which the cache keeps.

The grid of an image is the fusion's static token grid (fixed-resolution encoders), or for native-size
images each row's own (the images of one row share a size).
"""

from __future__ import annotations

import torch
from torch import Tensor


def mrope_positions(input_ids: Tensor, attention_mask: Tensor | None, image_token_id: int,
                    grid: tuple[int, int] | list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """(positions [3 x b x s], delta [b]). `grid`: the images' token grid, one for every row or one per row.
    Padding positions are 0; `delta` = next index - real tokens."""
    b, s = input_ids.shape
    grids = grid if isinstance(grid, list) else [grid] * b
    pos = torch.zeros(3, b, s, dtype=torch.long, device=input_ids.device)
    delta = torch.zeros(b, dtype=torch.long, device=input_ids.device)
    for i in range(b):
        gh, gw = grids[i]
        per_image = gh * gw
        rows = torch.arange(gh, device=input_ids.device).repeat_interleave(gw)
        cols = torch.arange(gw, device=input_ids.device).repeat(gh)
        real = attention_mask[i].bool() if attention_mask is not None else torch.ones(s, dtype=torch.bool)
        where = real.nonzero().flatten().tolist()
        is_img = (input_ids[i] == image_token_id).tolist()
        cur, j = 0, 0
        while j < len(where):
            p = where[j]
            if is_img[p] and j + per_image <= len(where) and all(is_img[q] for q in where[j:j + per_image]):
                idx = torch.tensor(where[j:j + per_image], device=input_ids.device)
                pos[0, i, idx] = cur
                pos[1, i, idx] = cur + rows
                pos[2, i, idx] = cur + cols
                cur += max(gh, gw)
                j += per_image
            else:
                pos[:, i, p] = cur
                cur += 1
                j += 1
        delta[i] = cur - len(where)
    return pos, delta


def video_mrope_positions(input_ids: Tensor, attention_mask: Tensor | None, token_id: int,
                          grids: list[tuple[int, int, int]], intervals: Tensor) -> tuple[Tensor, Tensor]:
    """(positions [3 x b x s], delta [b]) of rows holding one video each: its t x gh x gw tokens get time
    start + floor(k * interval) for temporal patch k (interval 1: Qwen2-VL's patch count; Qwen2.5-VL's
    `tokens_per_second x seconds per patch`: absolute time), rows and columns as an image's; the text after
    resumes at start + max(gh, gw), as transformers 5 numbers it. intervals: float32 [b]. Time ids may pass the
    text's, so `delta` = highest position + 1 - real tokens (what cached decoding continues from)."""
    b, s = input_ids.shape
    dev = input_ids.device
    pos = torch.zeros(3, b, s, dtype=torch.long, device=dev)
    delta = torch.zeros(b, dtype=torch.long, device=dev)
    for i in range(b):
        t, gh, gw = grids[i]
        n = t * gh * gw
        times = (torch.arange(t, device=dev) * intervals[i].to(dev)).long().repeat_interleave(gh * gw)
        rows = torch.arange(gh, device=dev).repeat_interleave(gw).repeat(t)
        cols = torch.arange(gw, device=dev).repeat(gh * t)
        real = attention_mask[i].bool() if attention_mask is not None else torch.ones(s, dtype=torch.bool, device=dev)
        where = real.nonzero().flatten().tolist()
        is_vid = (input_ids[i] == token_id).tolist()
        cur, j, top = 0, 0, -1
        while j < len(where):
            if is_vid[where[j]] and j + n <= len(where) and all(is_vid[q] for q in where[j:j + n]):
                idx = torch.tensor(where[j:j + n], device=dev)
                pos[0, i, idx], pos[1, i, idx], pos[2, i, idx] = cur + times, cur + rows, cur + cols
                top = max(top, cur + int(times[-1]), cur + gh - 1, cur + gw - 1)
                cur += max(gh, gw)
                j += n
            else:
                pos[:, i, where[j]] = cur
                top = max(top, cur)
                cur += 1
                j += 1
        delta[i] = top + 1 - len(where)
    return pos, delta
