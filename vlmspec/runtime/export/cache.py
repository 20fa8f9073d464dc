"""A fixed-size KV cache whose writes are masked selects, so exported graphs convert everywhere.

`KVCache` grows and writes slices at a Python offset; an exported decode step needs the opposite: a
cache of one static size `[layers x b x kv_heads x max_len x head_dim]` that is a graph input and
output, written at a *tensor* index. Hugging Face's `StaticCache` does that with `index_copy_`, which
Torch-TensorRT cannot convert; here a write is `torch.where(one_hot(index), new, old)` over the time
axis (decode) or a zero pad to `max_len` (prefill, which always starts at slot 0), both of which
`torch.export`, the ONNX exporter and TensorRT handle. The decoder layers are unchanged: they call
`cache.update(layer, k, v)` as they do with the eager cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmspec.runtime.decoding import KVCache


class StaticKVCache(KVCache):
    """One pass's view of a static cache.

    prefill (`write_index is None`): the prompt's k / v [b x hk x s x d] are attended over as they are
    (exactly the eager computation) and stored zero-padded to `max_len`.
    decode (`write_index` an int64 tensor [1]): the single new k / v lands at that slot of the input
    buffers and the layer attends over all `max_len` slots; the caller's mask hides the empty ones.
    `cross` holds cross-attention K / V per fusion layer, as in the eager cache.
    """

    def __init__(self, max_len: int, keys: list[Tensor] | None = None, values: list[Tensor] | None = None,
                 write_index: Tensor | None = None) -> None:
        super().__init__()
        self.max_len = max_len
        self.inputs_k = keys or []
        self.inputs_v = values or []
        self.write_index = write_index
        self.out_k: dict[int, Tensor] = {}
        self.out_v: dict[int, Tensor] = {}

    def length(self) -> int:
        """Not meaningful for a static cache: positions and masks come from the caller's tensors."""
        return 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.write_index is None:
            pad = self.max_len - k.shape[2]
            self.out_k[layer] = F.pad(k, (0, 0, 0, pad))
            self.out_v[layer] = F.pad(v, (0, 0, 0, pad))
            return k, v
        slot = torch.arange(self.max_len, device=k.device) == self.write_index  # [max_len] one-hot
        slot = slot.view(1, 1, -1, 1)
        new_k = torch.where(slot, k, self.inputs_k[layer])
        new_v = torch.where(slot, v, self.inputs_v[layer])
        self.out_k[layer], self.out_v[layer] = new_k, new_v
        return new_k, new_v

    def stacked(self) -> tuple[Tensor, Tensor]:
        """The written cache, [layers x b x kv_heads x max_len x head_dim] for keys and for values."""
        n = len(self.out_k)
        return (torch.stack([self.out_k[i] for i in range(n)]), torch.stack([self.out_v[i] for i in range(n)]))

    def reorder(self, index: Tensor) -> None:
        raise TypeError("a static export cache is reordered by the runner, not in the graph (no beam search here)")
