"""Hugging Face checkpoints in and out of spec-built models.

- `load_component_weights` / `apply_spec_weights` / `build_with_weights`: fill components whose spec
  sets `weights = "DIR"` (or `"DIR#part"` for one part of a multi-part checkpoint) by explicit per-family
  key tables, with a `CoverageReport`.
- `import_hf(dir)`: a LLaVA / BLIP-2 / InstructBLIP / PaliGemma / Qwen2-VL / IDEFICS folder -> an
  equivalent `.vlm` spec.
- `weights.export.export_hf(model_dir, out_dir)`: a model folder -> the HF format that holds it
  (not imported here: it reads model folders through `runtime.session`, which imports this package).
"""

from vlmspec.runtime.weights.importer import import_hf
from vlmspec.runtime.weights.loader import (
    apply_spec_weights,
    build_with_weights,
    load_component_weights,
    params_on_meta,
)
from vlmspec.runtime.weights.report import ComponentCoverage, CoverageReport

__all__ = ["ComponentCoverage", "CoverageReport", "apply_spec_weights", "build_with_weights", "export_hf",
           "import_hf", "load_component_weights", "params_on_meta"]
