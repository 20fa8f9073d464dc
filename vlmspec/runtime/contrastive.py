"""A contrastive model (CLIP, SigLIP): an image tower and a text tower embedded into one space.

`fusion contrastive(img + txt)` makes the model two towers and a head; there is no language model and
nothing is generated. The head holds the optional bias-free projections into the shared space
(`dim`), the learned log-scale (CLIP's `logit_scale`; training keeps its exp at most 100, as CLIP's training
does, and inference reads it as stored, as transformers does) and, for the sigmoid
loss, SigLIP's learned `logit_bias`. With `learn_temperature = false` those two stay parameters (so the
parameter count and the checkpoint keys match the learned form) with `requires_grad` off.

Interface of the towers (the text kinds register as ("text", KIND)):
- image side: each vision / connector module in `order`, as in `VisionLanguageModel`; its output is
  either `[B x width]` (a pooled tower) or tokens (`VisualTokens.x`, `[B x N x width]`), which are
  mean-pooled (a connector's tokens have no class token to pick);
- text tower: `module(input_ids, attention_mask) -> [B x width]`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.compiler.schema.contrastive import MAX_LOGIT_SCALE, Contrastive
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import DTYPES, init_weights
from vlmspec.runtime.registry import BuildContext, build_component, load_builders, register

if TYPE_CHECKING:
    from vlmspec.compiler.compile import Analysis
    from vlmspec.compiler.ir import Component


def contrastive_head(analysis: Analysis) -> Component | None:
    """The model's contrastive fusion, if it has one (then it is a `ContrastiveModel`)."""
    return next((c for c in analysis.ir.by_role("fusion") if isinstance(c.config, Contrastive)), None)


class ContrastiveHead(nn.Module):
    """Projections into the shared space, the learned log-scale and (sigmoid loss) the learned bias."""

    def __init__(self, cfg: Contrastive, image_width: int, text_width: int):
        super().__init__()
        self.cfg = cfg
        self.proj_image = nn.Linear(image_width, cfg.dim, bias=False) if cfg.dim is not None else None
        self.proj_text = nn.Linear(text_width, cfg.dim, bias=False) if cfg.dim is not None else None
        learn = cfg.learn_temperature
        self.logit_scale = nn.Parameter(torch.tensor(cfg.initial_log_scale()), requires_grad=learn)
        self.logit_bias = (nn.Parameter(torch.tensor(cfg.initial_bias()), requires_grad=learn)
                           if cfg.loss == "sigmoid" else None)

    def fixed_parameters(self) -> set[str]:
        """With `learn_temperature = false`, the scale and bias no stage may train (`train.freeze.apply_stage`)."""
        if self.cfg.learn_temperature:
            return set()
        return {"logit_scale"} | ({"logit_bias"} if self.logit_bias is not None else set())

    def init_weights(self, std: float) -> None:
        """The spec's temperature and bias: `blocks.init_weights` calls this after the generic rules, also when
        the head is materialised from meta beside towers that load a checkpoint."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Back to the spec's temperature and bias (the generic initialiser touches only linear layers)."""
        with torch.no_grad():
            self.logit_scale.fill_(self.cfg.initial_log_scale())
            if self.logit_bias is not None:
                self.logit_bias.fill_(self.cfg.initial_bias())

    def scale(self) -> Tensor:
        """exp(log-scale) as stored: a checkpoint whose scale sits a hair above 100 (CLIP's 4.6052) scores
        exactly as transformers scores it."""
        return self.logit_scale.exp()

    def clamp_scale(self) -> None:
        """CLIP's training rule: after each step the scale is kept at most 100 (temperature 0.01), so the
        softmax loss cannot sharpen without bound. SigLIP's sigmoid loss trains its scale unclamped."""
        if self.cfg.loss == "softmax":
            with torch.no_grad():
                self.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))

    def logits(self, image: Tensor, text: Tensor) -> Tensor:
        """`[B_image x B_text]`: scaled cosine similarities (plus the bias for the sigmoid loss)."""
        out = self.scale() * image @ text.t()
        return out + self.logit_bias if self.logit_bias is not None else out


@register("fusion", "contrastive")
def build_contrastive_head(comp: Component, ctx: BuildContext) -> ContrastiveHead:
    ir = ctx.analysis.ir
    widths = {ir.components[s].role: ctx.output_shape(s).width for s in comp.sources}
    image = widths.get("vision", widths.get("connector"))
    return ContrastiveHead(comp.config, image, widths["text"])  # type: ignore[arg-type]


def _pooled(out: Any) -> Tensor:
    x = getattr(out, "x", out)
    return x if x.dim() == 2 else x.mean(dim=1)


class ContrastiveModel(nn.Module):
    """Two towers and a contrastive head; `components[name]` is the module of component `name`."""

    #: commands that generate (generate, serve, export) check this and refuse with E0615
    generative = False

    def __init__(self, components: dict[str, nn.Module], *, roles: dict[str, str], sources: dict[str, list[str]],
                 image_order: list[str], text: str, head: str, max_positions: int):
        super().__init__()
        self.components = nn.ModuleDict(components)
        self.roles = roles
        self.sources = sources
        self.image_order = image_order
        self.text = text
        self.head = head
        self.max_positions = max_positions

    @property
    def contrastive(self) -> ContrastiveHead:
        return self.components[self.head]  # type: ignore[return-value]

    @property
    def loss_kind(self) -> str:
        return self.contrastive.cfg.loss

    def _image_features(self, pixel_values: Tensor) -> Tensor:
        outs: dict[str, Any] = {}
        for name in self.image_order:
            comp = self.components[name]
            if self.roles[name] == "vision":
                outs[name] = comp(pixel_values)
            else:
                outs[name] = comp([outs[s] for s in self.sources[name]], None)
        return _pooled(outs[self.image_order[-1]])

    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        """`[B x dim]`, L2-normalised."""
        x = self._image_features(pixel_values)
        head = self.contrastive
        if head.proj_image is not None:
            x = head.proj_image(x)
        return F.normalize(x.float(), dim=-1)

    def text_embeds(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """`[B x dim]`, L2-normalised; ids longer than the tower's `max_positions` are cut."""
        input_ids = input_ids[:, : self.max_positions]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask[:, : self.max_positions]
        x = _pooled(self.components[self.text](input_ids, attention_mask))
        head = self.contrastive
        if head.proj_text is not None:
            x = head.proj_text(x)
        return F.normalize(x.float(), dim=-1)

    def logits(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """`[B_image x B_text]` logits of every image against every caption."""
        return self.contrastive.logits(self.image_embeds(pixel_values), self.text_embeds(input_ids, attention_mask))

    def loss(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The head's loss on a batch of matching pairs (row i of the images goes with row i of the text)."""
        from vlmspec.runtime.train.objectives_contrastive import contrastive_loss

        return contrastive_loss(self.logits(pixel_values, input_ids, attention_mask), self.loss_kind)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.loss(pixel_values, input_ids, attention_mask)

    # evaluation's duck-typed interface (vlmspec.evaluation.embeddings): one vector per image / caption
    def extract_features(self, pixel_values: Tensor, **_: Any) -> Tensor:
        return self.image_embeds(pixel_values)

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.text_embeds(input_ids, attention_mask)


def refuse_generation(model: Any, command: str) -> None:
    """Commands that generate text (generate, serve, export) on a contrastive model: a coded error."""
    if isinstance(model, ContrastiveModel):
        raise user_error("E0615", f"`{command}` needs a language model, and this is a contrastive (CLIP / SigLIP) "
                         "model: it embeds images and text and generates nothing",
                         help="evaluate it with `vlm eval MODEL --task retrieval` or `--task zero_shot`")


def is_contrastive_folder(model_dir: str | Path) -> bool:
    """Whether a model folder holds a contrastive model, decided from its spec alone (no weights read); a
    folder that is not a model folder, or whose spec does not check, is left to the command to report."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.checkpoint import read_config

    path = Path(model_dir)
    if not (path / "config.json").is_file() or not (path / "spec.vlm").is_file():
        return False
    try:
        analysis, _ = load_analysis(f"{path / 'spec.vlm'}:{read_config(path)['model']}")
    except Exception:  # noqa: BLE001  (the command itself reports a spec that does not check)
        return False
    return contrastive_head(analysis) is not None


def refuse_contrastive_folder(model_dir: str | Path, command: str) -> None:
    """`refuse_generation` for commands that read a model folder themselves (`vlm export`)."""
    if is_contrastive_folder(model_dir):
        raise user_error("E0615", f"`{command}` writes a generative model, and {model_dir} holds a contrastive (CLIP "
                         "/ SigLIP) model: it embeds images and text and generates nothing",
                         help="use the model folder itself (`vlm eval MODEL --task zero_shot` or `--task "
                         "retrieval`), or write a transformers folder with `vlm export-hf`")


def build_contrastive(analysis: Analysis, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype | str | None = None) -> ContrastiveModel:
    """Build the towers and the head a checked contrastive spec describes (fresh weights)."""
    load_builders()
    ir = analysis.ir
    head = contrastive_head(analysis)
    if head is None:
        raise ValueError(f"build_contrastive: model `{ir.name}` has no contrastive fusion (a caller's bug)")
    topo = analysis.graph.topological_order()
    text = next(s for s in head.sources if ir.components[s].role == "text")
    image_root = next(s for s in head.sources if s != text)
    needed = _ancestors(image_root, {n: list(c.sources) for n, c in ir.components.items()})
    image_order = [n for n in topo if n in needed]
    ctx = BuildContext(analysis)
    with torch.device(device):
        for name in [*image_order, text, head.name]:
            ctx.built[name] = build_component(ir.components[name], ctx)
        if torch.device(device).type != "meta":
            for module in ctx.built.values():
                init_weights(module)
    override = DTYPES[dtype] if isinstance(dtype, str) else dtype
    for name, module in ctx.built.items():
        cfg = ir.components[name].config
        module.to(dtype=override or DTYPES[getattr(cfg, "dtype", "fp32")])
    ctx.built[head.name].float()  # the scale, bias and projections stay fp32: logits are compared in fp32
    max_positions = getattr(ir.components[text].config, "max_positions", 1 << 30)
    return ContrastiveModel({n: ctx.built[n] for n in ir.components if n in ctx.built},
                            roles={n: c.role for n, c in ir.components.items()},
                            sources={n: list(c.sources) for n, c in ir.components.items()},
                            image_order=image_order, text=text, head=head.name, max_positions=max_positions)


def _ancestors(root: str, sources: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    todo = [root]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(sources.get(n, []))
    return seen


__all__ = ["ContrastiveHead", "is_contrastive_folder", "refuse_contrastive_folder", "ContrastiveModel", "build_contrastive", "contrastive_head",
           "refuse_generation"]
