"""The declared interface between the exported halves: every program's inputs and outputs, by name,
with shapes whose dynamic dimensions are named, and dtypes.

One `Interface` value drives everything that must agree: the example inputs and `dynamic_shapes` of
`torch.export`, the ONNX input / output names, TensorRT's optimisation profiles, the manifest, and
the runner that feeds the programs. Symbolic dimensions:

- `batch`: one `torch.export.Dim` shared by every input of every program, so a batch of b prompts
  with b images is one consistent shape;
- `seq`: the prompt length of the prefill, at most `max_len`.

Everything else is static: image size and tiles (from the encoder spec), visual tokens per fusion
(from shape inference), cache length `max_len` (the spec's `max_positions` unless overridden).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vlmspec.runtime.decoding import IMAGE_GRID
from vlmspec.runtime.export.errors import not_exportable
from vlmspec.runtime.model import VisionLanguageModel

ENCODER, PREFILL, DECODE = "encoder", "prefill", "decode"
#: program -> the half it belongs to (TensorRT-LLM's two engines: vision, language).
HALF = {ENCODER: "encoder", PREFILL: "decoder", DECODE: "decoder"}
#: program -> artefact file stem
STEM = {ENCODER: "encoder", PREFILL: "decoder_prefill", DECODE: "decoder_step"}

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.int64: "int64", torch.bool: "bool"}
DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output: `shape` holds ints (static) and names (symbolic dims, see `Interface.dims`)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    doc: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "doc": self.doc}


@dataclass(frozen=True, slots=True)
class ProgramSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def half(self) -> str:
        return HALF[self.name]

    def to_json(self) -> dict[str, Any]:
        return {"half": self.half, "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}


@dataclass(slots=True)
class Interface:
    """What the model exposes after export; built from a model with `Interface.of`."""

    max_len: int
    max_batch: int
    dtype: torch.dtype
    fusions: list[str]  # every fusion, in order: one visual-token tensor each
    in_sequence: list[str]  # fusions whose tokens are spliced at image-token positions
    cross: dict[str, list[int]]  # cross-attention fusion -> decoder layers with cached visual K / V
    tiled: bool
    masked: list[str] = field(default_factory=list)  # cross-attention fusions whose visual mask the cache keeps
    prefill_aspect: bool = False  # prefill takes aspect_ratio_ids (a fusion masks padding tiles)
    embed_rows: int = 0  # token ids below this are valid input (the logits may be narrower)
    image_grid: list[int] | None = None  # M-RoPE: one image's token grid, for the positions the runner computes
    programs: dict[str, ProgramSpec] = field(default_factory=dict)
    dims: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: VisionLanguageModel, max_len: int, max_batch: int) -> Interface:
        """Read the interface off the model; one batch-1 image runs through the encoder for the visual
        token shapes and dtypes (exact, also for dynamic-resolution encoders fed at `image_size`)."""
        llm = model.llm.c
        fusions = list(model.fusions)
        vision = [model.components[n] for n in model.order if model.roles[n] == "vision"]
        cfg = vision[0].cfg
        tiled = bool(cfg.tiles)
        cross = {f: list(model.fusion(f).layer_ids) for f in fusions if not model.fusion(f).in_sequence}
        dtype = model.llm.dtype()
        act = dtype_name(dtype)
        device = next(model.parameters()).device
        probe = torch.zeros(1, *([cfg.tiles] if tiled else []), cfg.channels, cfg.image_size, cfg.image_size,
                            device=device)
        with torch.no_grad():
            feats = model.encode_images(probe, aspect_ratio_ids=torch.ones(1, dtype=torch.long, device=device)
                                        if tiled else None)
        visual = [TensorSpec(f"visual_{f}", ("batch", feats[f].shape[1], feats[f].shape[2]), dtype_name(feats[f].dtype),
                             f"visual tokens of fusion `{f}`") for f in fusions]
        pix = ("batch", *([cfg.tiles] if tiled else []), cfg.channels, cfg.image_size, cfg.image_size)
        enc_in = [TensorSpec("pixel_values", pix, "float32", "normalised images, one per prompt")]
        if tiled:
            enc_in.append(TensorSpec("aspect_ratio_ids", ("batch",), "int64", "tile layout id (1-based)"))
        cache = (llm.depth, "batch", llm.kv_heads, max_len, llm.head_dim)
        kv = [TensorSpec("present_keys", cache, act, "static KV cache: keys, all layers"),
              TensorSpec("present_values", cache, act, "static KV cache: values, all layers")]
        n_vis = {f: feats[f].shape[1] for f in fusions}
        cross_specs = [TensorSpec(f"cross_{kind}_{f}", (len(ids), "batch", llm.kv_heads, n_vis[f], llm.head_dim), act,
                                  f"cross-attention {kind} of `{f}`, computed once at prefill")
                       for f, ids in cross.items() for kind in ("keys", "values")]
        masked = [f for f in cross if model.fusion(f).masked]
        prefill_aspect = tiled and any(model.fusion(f).tiles is not None for f in masked)
        cross_specs += [TensorSpec(f"cross_visible_{f}", ("batch", n_vis[f]), "int64",
                                   f"1 at the visual tokens of `{f}` the prompt's last token sees (so do later ones)")
                        for f in masked]
        aspect = [TensorSpec("aspect_ratio_ids", ("batch",), "int64", "tile layout id (1-based): which tiles "
                             "cross-attention reads")] if prefill_aspect else []
        grid = None
        if llm.mrope is not None:
            if IMAGE_GRID not in feats:
                raise not_exportable("M-RoPE positions", "the images' token grid is unknown (the in-sequence "
                                     "fusion reads several sources, or its tokens keep no grid)")
            grid = [int(v) for v in feats[IMAGE_GRID][0].tolist()]
            aspect.insert(0, TensorSpec("position_ids", (3, "batch", "seq"), "int64", "M-RoPE (time, row, column) "
                                        "positions of the prompt (vlmspec.runtime.language.mrope.mrope_positions)"))
        logits = TensorSpec("logits", ("batch", llm.n_vocab), "float32", "next-token logits")
        programs = {
            ENCODER: ProgramSpec(ENCODER, tuple(enc_in), tuple(visual)),
            PREFILL: ProgramSpec(PREFILL, (
                TensorSpec("input_ids", ("batch", "seq"), "int64", "left-padded prompt with image tokens"),
                TensorSpec("attention_mask", ("batch", "seq"), "int64", "1 = real token, 0 = left padding"),
                *aspect, *visual), (logits, *kv, *cross_specs)),
            DECODE: ProgramSpec(DECODE, (
                TensorSpec("input_ids", ("batch", 1), "int64", "the token chosen last step"),
                TensorSpec("position_ids", ("batch", 1), "int64", "its position (real tokens before it)"),
                TensorSpec("attention_mask", ("batch", max_len), "int64", "1 = cache slot holds a real token"),
                TensorSpec("past_keys", cache, act, "the cache from prefill or the previous step"),
                TensorSpec("past_values", cache, act, "the cache from prefill or the previous step"),
                TensorSpec("write_index", (1,), "int64", "the cache slot this token is written to"),
                *cross_specs), (logits, *kv)),
        }
        dims = {"batch": {"min": 1, "max": max_batch}, "seq": {"min": 1, "max": max_len}}
        return cls(max_len, max_batch, dtype, fusions, list(model.in_sequence), cross, tiled, masked, prefill_aspect,
                   llm.embed_rows, grid, programs, dims)

    # ------------------------------------------------------------ torch.export inputs
    def example_inputs(self, program: str, model: VisionLanguageModel, batch: int = 2) -> tuple[Tensor, ...]:
        """Inputs a trace can run on: batch 2 and a prompt of several tokens, so no dynamic dim is 0 or 1
        (torch.export would specialise it); image tokens where the fusions expect them."""
        spec = self.programs[program]
        n_img = sum(self._size(f"visual_{f}", 1) for f in self.in_sequence)
        seq = n_img + 3
        out: list[Tensor] = []
        for t in spec.inputs:
            shape = tuple(batch if d == "batch" else seq if d == "seq" else d for d in t.shape)
            dtype = DTYPES[t.dtype]
            if t.name == "input_ids" and program == PREFILL:
                x = torch.full(shape, 1, dtype=dtype)
                x[:, 1:1 + n_img] = model.image_token_id
            elif t.name == "write_index":
                x = torch.full(shape, seq, dtype=dtype)
            elif t.name == "aspect_ratio_ids":
                x = torch.ones(shape, dtype=dtype)
            elif dtype == torch.int64:
                x = torch.ones(shape, dtype=dtype)
            else:
                x = torch.randn(shape).to(dtype)
            out.append(x)
        return tuple(out)

    def visual_spec(self, fusion: str) -> TensorSpec:
        """The prefill input carrying one fusion's visual tokens."""
        return next(t for t in self.programs[PREFILL].inputs if t.name == f"visual_{fusion}")

    def _size(self, name: str, dim: int) -> int:
        for p in self.programs.values():
            for t in (*p.inputs, *p.outputs):
                if t.name == name:
                    return int(t.shape[dim])
        raise KeyError(name)

    def dynamic_shapes(self, program: str) -> tuple[Any, ...]:
        """`dynamic_shapes` for torch.export: one named `Dim` per symbolic dimension, shared by all inputs.

        The wrappers take their visual tokens (prefill) and cross-attention K / V (decode) as `*args`,
        which torch.export wants as one nested tuple at the end.
        """
        from torch.export import Dim

        named = {n: Dim(n, min=r["min"], max=r["max"]) for n, r in self.dims.items()}
        per = [{i: named[d] for i, d in enumerate(t.shape) if isinstance(d, str)} or None
               for t in self.programs[program].inputs]
        fixed = {ENCODER: 2 if self.tiled else 1, PREFILL: 2, DECODE: 6}[program]  # (aspect ids travel in *visual)
        head, tail = per[:fixed], per[fixed:]
        if program == ENCODER and not self.tiled:
            return tuple(head)
        return (*head, tuple(tail)) if tail else tuple(head)

    def to_json(self) -> dict[str, Any]:
        return {"dims": self.dims, "max_len": self.max_len, "dtype": dtype_name(self.dtype),
                "fusions": self.fusions, "in_sequence": self.in_sequence, "cross_attention": self.cross,
                "tiled": self.tiled, "masked": self.masked, "prefill_aspect": self.prefill_aspect,
                "embed_rows": self.embed_rows, "image_grid": self.image_grid, "programs": {n: p.to_json() for n, p in self.programs.items()}}
