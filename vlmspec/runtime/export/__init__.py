"""Export a model as two halves with a declared interface, and run the result.

- encoder half: pixels [b x 3 x H x W] -> visual tokens per fusion;
- decoder half: `prefill` (prompt + visual tokens -> last logits + static KV cache) and `decode`
  (one token + its position + the cache + a write index -> logits + the cache).

Formats: `.pt2` (torch.export), ONNX (dynamo exporter, opset 20), TensorRT (torch_tensorrt, CUDA
only). `export_model` writes a self-contained folder with `manifest.json`; `ExportedModel` loads it
and generates greedily. See docs/export.md.
"""

from vlmspec.runtime.export.api import FORMATS, export_model
from vlmspec.runtime.export.runner import BACKENDS, ExportedModel

__all__ = ["BACKENDS", "FORMATS", "ExportedModel", "export_model"]
