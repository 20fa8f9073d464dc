"""Which models export, decided before any tracing so a refusal costs nothing and says why.

Every fusion style exports (prefix, cross_attention, visual_expert, moe; the language model's own
`moe` block too). What does not, and why (also in docs/export.md):

- Encoders at different resolutions (one pixel tensor per encoder): the encoder half takes one.
- Weight-quantized components (torchao tensor subclasses): neither the ONNX exporter nor TensorRT
  reads them; TensorRT quantizes by itself (`quantize="int8" | "fp8"` of the tensorrt format).

M-RoPE positions are (time, row, column) per image token, computed by a Python loop over each prompt
(`vlmspec.runtime.language.mrope.mrope_positions`): the runner computes them and feeds the prefill program.

Accepted with a note in the manifest: dynamic-resolution encoders are exported at `image_size`
(what the processor feeds them; eager positions are 1-D there too), and instruction-aware Q-Formers
run without the instruction (the encoder half takes pixels only).
"""

from __future__ import annotations

from torch import Tensor, nn

from vlmspec.runtime.export.errors import not_exportable
from vlmspec.runtime.fusion import CrossAttentionFusion, MoEFusionModule, PrefixFusion, VisualExpertFusion
from vlmspec.runtime.model import VisionLanguageModel

#: Fusion module classes with an export path (the decoder halves know how to feed each).
EXPORTABLE_FUSIONS = (PrefixFusion, CrossAttentionFusion, VisualExpertFusion, MoEFusionModule)


def check_exportable(model: VisionLanguageModel) -> list[str]:
    """Raise E0571 for what cannot export; return notes on what exports with a restriction."""
    notes: list[str] = []
    if not getattr(model, "generative", True):  # CLIP / SigLIP: two towers and a head, no decoder to export
        raise not_exportable("this model", "a contrastive (CLIP / SigLIP) model generates nothing, so it has no "
                             "decoder half", help="`vlm export-hf` writes it as a transformers CLIPModel / SiglipModel")
    refusal = getattr(model.llm, "export_refusal", None)  # a language model the halves cannot run says why (mamba)
    if refusal:
        raise not_exportable(f"language model `{model.language}`", refusal)
    for f in model.fusions:
        module = model.fusion(f)
        if not isinstance(module, EXPORTABLE_FUSIONS):
            raise not_exportable(f"fusion `{f}`", f"its style ({type(module).__name__}) has no export path yet",
                                 help="the exportable styles are prefix, cross_attention, visual_expert and moe")
    encoders = [n for n in model.order if model.roles[n] == "vision"]
    if not encoders:
        raise not_exportable("this model", "no vision encoder feeds a fusion, so there is no encoder half")
    cfgs = [model.components[n].cfg for n in encoders]
    for n, c in zip(encoders, cfgs, strict=True):
        call = getattr(getattr(c, "resolution", None), "call", None)
        if call == "longest_edge":  # Pixtral: rows of image tokens with break tokens, as many as the image's size
            raise not_exportable(f"encoder `{n}`", "`resolution = longest_edge()` reads each image at its own size "
                                 "and writes its rows with break tokens; the exported halves take a fixed count of "
                                 "image tokens", help="serve the model with `vlm serve`, or export a variant of "
                                 "the spec with a fixed image_size")
        if not isinstance(getattr(c, "layout", "fixed"), str):
            raise not_exportable(f"encoder `{n}`", f"its {c.layout.call} layout gives each image as many tokens as its size "
                                 "makes; the exported halves take a fixed count", help="export a variant without "
                                 "`layout` (one image_size square per image)")
    if len({(c.image_size, getattr(c, "tiles", 1), getattr(c, "channels", 3)) for c in cfgs}) > 1:
        raise not_exportable("encoders at different resolutions", "the encoder half takes one pixel tensor, "
                             "but " + ", ".join(f"`{n}` takes {c.image_size} px" for n, c in zip(encoders, cfgs,
                                                                                           strict=True)),
                             help="give every vision encoder the same image_size to export")
    quantized = [n for n, m in model.components.items() if _is_quantized(m)]
    if quantized:
        raise not_exportable(f"quantized component `{quantized[0]}`", "its weights are torchao tensor subclasses, "
                             "which ONNX and TensorRT cannot read",
                             help="export with `quantize = none` and let TensorRT quantize (tensorrt format, "
                             "quantize=\"int8\" or \"fp8\")")
    for n, c in zip(encoders, cfgs, strict=True):
        if c.resolution != "fixed":
            notes.append(f"`{n}` has a dynamic resolution; the encoder half takes {c.image_size}x{c.image_size} "
                         "images (what the processor produces)")
    for n in model.order:
        if any(getattr(m, "instruction", None) is True for m in model.components[n].modules()):
            notes.append(f"`{n}` is instruction-aware; the encoder half runs it without the instruction, "
                         "(the exported interface takes pixels only)")
    return notes


def _is_quantized(module: nn.Module) -> bool:
    return any(type(p.data) not in (Tensor, nn.Parameter) for p in module.parameters())
