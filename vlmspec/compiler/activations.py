"""Activation memory of one training micro-batch: a pure estimate from the IR, the micro-batch, the sequence
length, the precision and the checkpointed components (no torch, nothing allocated).

The backward pass needs what the forward pass saved, so the activation peak is reached at the end of a
micro-batch's forward pass plus what the backward pass allocates while it starts. What is counted, per
component the backward pass runs through (`checkpointing.backward_path`: trained, LoRA-adapted, or
downstream of either; a frozen component upstream of everything trained saves nothing), per token:

- language model, per decoder layer: 4 width-sized tensors kept in fp32 whatever the autocast (the residual
  stream and the norms' inputs), 6 width-sized tensors at the compute precision (the inputs of q/k/v and
  output projections, q, k, v after the rotary embedding, the attention output), and the MLP's intermediates
  (4 ffn-sized for a gated MLP: gate, act(gate), up, their product; 3 for a plain one). Attention goes
  through `scaled_dot_product_attention`, whose fused CPU kernel saves only a logsumexp per head and token,
  never the seq x seq scores: no quadratic term. Plus the embeddings and the final norm (2 width-sized,
  fp32), and the head's logits with their softmax (2 x vocab, fp32) at the supervised positions only
  (`logits_for = "labels"`), bounded here by the text tokens;
- an encoder (or a connector) with transformer blocks, per block: 8 width-sized and 3 mlp-sized tensors at
  the compute precision, on its own tokens (tokens per image x images per sample);
- a block-free component (an MLP or linear connector): 3 output-width tensors per token;
- under bf16 autocast, the bf16 copies of the weights of those components (autocast casts each weight once
  per forward, and the backward pass keeps the copy);
- a checkpointed component keeps only each block's input (width, fp32), and recomputes one block at a time
  in the backward pass: one block's activations on top.

No separate term for the backward pass's own gradients: measured, they take about what it frees as it goes
(each block's saved tensors are released once its gradients are computed), so the peak is the end of the
forward pass (a working-set term of one more block overestimated the measured peaks by 10-70%).

The per-block constants were counted with `torch.autograd.graph.saved_tensors_hooks` on the runtime's own
modules (deduplicated by storage), and the total checked against the peak RSS of real CPU training steps
(tests/train/test_memory_plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmspec.compiler.checkpointing import backward_path
from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.passes import StagePlan

#: text tokens assumed per sample when neither the data nor a `max_length` says
DEFAULT_TEXT_TOKENS = 512
#: bytes per element at each stage precision (what autocast computes in)
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4


@dataclass(frozen=True, slots=True)
class Sequence:
    """One sample's length in the language model, and what it rests on (printed beside the estimate)."""

    tokens: int  # image + text tokens in the language model's sequence
    image_tokens: int  # of which image tokens
    source: str  # where the numbers come from, in words

    @property
    def text_tokens(self) -> int:
        return max(self.tokens - self.image_tokens, 0)


@dataclass(frozen=True, slots=True)
class ActivationEstimate:
    """Bytes of activations one micro-batch holds at its peak, and per component."""

    micro_batch: int
    sequence: Sequence
    total: int
    by_component: dict[str, int] = field(default_factory=dict)


def image_tokens_per_image(analysis: Analysis) -> int:
    """The image tokens one image puts in the language model's sequence: the fusion's count, or for an
    encoder with an image layout the most any image can take."""
    shapes = analysis.shapes
    fusions = [f for f in analysis.ir.by_role("fusion") if f.name in shapes.out]
    tokens = shapes.out[fusions[0].name].tokens if fusions else 0
    from vlmspec.compiler.summary import image_layouts  # summary imports this module: import here

    for lay in image_layouts(analysis).values():
        tokens = max(tokens, lay["max"])
    return tokens


def spec_sequence(analysis: Analysis, stage_index: int) -> Sequence:
    """The sequence length the spec alone gives (no data): its `max_length` when set (samples are
    truncated to it), else the image tokens per image plus `DEFAULT_TEXT_TOKENS`, within the LM's context."""
    stage = analysis.ir.stages[stage_index]
    if analysis.ir.language is None:  # a contrastive model: one image and one caption a sample, nothing spliced
        towers = analysis.ir.by_role("text")
        caption = towers[0].config.block_tokens() if towers else 0
        return Sequence(caption, 0, f"1 image + a {caption}-token caption (the text tower's max_positions)")
    image = image_tokens_per_image(analysis) if _splices_images(analysis) else 0
    limit = stage.max_length or analysis.ir.settings.max_length
    if limit:
        return Sequence(limit, min(image, limit), f"max_length {limit}, an upper bound")
    lm = analysis.ir.language
    context = getattr(lm.config, "max_positions", None) if lm else None
    tokens = image + DEFAULT_TEXT_TOKENS
    if context and tokens > context:
        return Sequence(context, min(image, context), f"the LM's context {context}, an upper bound")
    return Sequence(tokens, image, f"{image} image + {DEFAULT_TEXT_TOKENS} text tokens assumed")


def micro_batch(analysis: Analysis, stage_index: int, ranks: int = 1) -> int:
    """Samples one rank runs through one forward pass: the trainer splits the global batch over the
    accumulation steps and the ranks (vlmspec.runtime.train.loop)."""
    stage = analysis.ir.stages[stage_index]
    return max(stage.batch // (stage.grad_accum * max(ranks, 1)), 1)


def activation_bytes(analysis: Analysis, stage_index: int, batch: int, sequence: Sequence) -> ActivationEstimate:
    """The activation estimate of stage `stage_index` for `batch` samples of `sequence` (see the module
    docstring for what is counted)."""
    ir, shapes = analysis.ir, analysis.shapes
    plan: StagePlan = analysis.plans[stage_index]
    stage = ir.stages[stage_index]
    cb = COMPUTE_BYTES[stage.precision]
    path = backward_path(ir, plan.status)
    images = _images_per_sample(analysis, sequence)
    by: dict[str, int] = {}
    for name, comp in ir.components.items():
        if name not in path:
            continue
        cfg = comp.config
        if comp.role == "language":
            tokens = sequence.tokens
        elif comp.role == "fusion":
            continue  # its blocks run inside the LM's layers: counted with them
        else:
            out = shapes.out.get(name)
            inner = cfg.block_tokens() if hasattr(cfg, "block_tokens") else None  # a pooled tower's patches
            tokens = (inner or (out.tokens if out is not None else 0)) * (1 if comp.role == "text" else images)
        width = getattr(cfg, "width", None) or (shapes.out[name].width if name in shapes.out else 0)
        depth = getattr(cfg, "depth", 0) if cfg.checkpointable else 0
        if comp.role == "language":
            per_block = 4 * width * FP32 + (6 * width + _mlp_tensors(comp.kind, cfg) * cfg.ffn) * cb
            extra = 2 * width * FP32 * tokens + 2 * getattr(cfg, "vocab", 0) * FP32 * sequence.text_tokens
        elif depth:
            per_block = (8 * width + 3 * _mlp_width(cfg, width)) * cb
            extra = 0
        else:
            per_block, extra = 0, 3 * width * cb * tokens
        block = per_block * tokens
        if name in plan.checkpointed:
            stored = depth * width * FP32 * tokens + block
        else:
            stored = depth * block
        weights = analysis.shapes.total(name) * 2 if cb == 2 else 0
        by[name] = batch * (stored + extra) + weights
    return ActivationEstimate(batch, sequence, int(sum(by.values())), {k: int(v) for k, v in by.items()})


def _splices_images(analysis: Analysis) -> bool:
    """Whether image tokens take places in the LM's sequence (not so for cross-attention fusion)."""
    fusions = analysis.ir.by_role("fusion")
    return bool(fusions) and any(f.kind != "cross_attention" for f in fusions)


def _images_per_sample(analysis: Analysis, sequence: Sequence) -> int:
    """Encoder passes per sample: one per image, or per tile for a laid-out encoder (image tokens over a
    tile's tokens); none when the sequence holds no image."""
    if not analysis.ir.by_role("vision"):
        return 0
    if not _splices_images(analysis) or analysis.ir.language is None:  # cross-attention, or contrastive pairs
        return 1
    if sequence.image_tokens <= 0:
        return 0
    tiles = [o.tile_tokens for o in analysis.shapes.out.values() if getattr(o, "tile_tokens", None)]
    if tiles:
        return -(-sequence.image_tokens // min(tiles))
    per_image = image_tokens_per_image(analysis) or 1
    return max(-(-sequence.image_tokens // per_image), 1)


#: language-model kinds whose FFN is a plain fc1 / act / fc2 (the others' is gated: SwiGLU, GeGLU)
PLAIN_MLP_KINDS = ("opt", "phi")


def _mlp_tensors(kind: str, cfg: object) -> int:
    """Tensors the FFN saves at ffn width: gate, act(gate), up and their product; fc1's output (twice: as
    the activation's input, and reshaped for fc2) and the activation's for a plain MLP."""
    return 3 if getattr(cfg, "gated_mlp", kind not in PLAIN_MLP_KINDS) is False else 4


def _mlp_width(cfg: object, width: int) -> int:
    for attr in ("mlp", "ffn"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    ratio = getattr(cfg, "mlp_ratio", None)
    return int(ratio * width) if isinstance(ratio, int | float) else 4 * width
