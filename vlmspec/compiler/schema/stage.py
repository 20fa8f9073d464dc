"""The stage schedule and model-level settings, as typed data.

A stage is what one training run does: what is trained, frozen or LoRA-adapted (by graph path),
with which optimizer, data, batch and precision. Stages run in the order they are declared.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from vlmspec.compiler.schema.base import CallValue, Schema
from vlmspec.compiler.schema.boxes import Boxes, boxes_from_call

OBJECTIVES = ("lm", "itc", "itm", "itg", "contrastive")


class Optim(Schema):
    """`adamw(lr = 2e-5, weight_decay = 0.0)`; also `adam` and `sgd`."""

    name: Literal["adamw", "adam", "sgd"] = Field(default="adamw", description="optimizer")
    lr: float = Field(default=1e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(default=0.0, ge=0, description="decoupled weight decay")
    betas: list[float] = Field(default=[0.9, 0.999], min_length=2, max_length=2, description="Adam betas")
    eps: float = Field(default=1e-8, gt=0, description="Adam epsilon")
    momentum: float = Field(default=0.0, ge=0, description="SGD momentum")

    @model_validator(mode="before")
    @classmethod
    def _from_call(cls, v: Any) -> Any:
        if isinstance(v, CallValue):
            if v.args or v.attrs:
                raise ValueError("expected keyword arguments only, e.g. `adamw(lr = 2e-5)`")
            return {"name": v.name, **v.kw()}
        if isinstance(v, str):
            return {"name": v}
        return v

    def to_vlm(self) -> str:
        from vlmspec.compiler.schema.base import fmt_value

        default = Optim(name=self.name)
        parts = [f"lr = {fmt_value(self.lr)}"]
        for k in ("weight_decay", "betas", "eps", "momentum"):
            if getattr(self, k) != getattr(default, k):
                parts.append(f"{k} = {fmt_value(getattr(self, k))}")
        return f"{self.name}({', '.join(parts)})"


class DataSpec(Schema):
    """`data "train.json"` or `data llava("train.json", images = "imgs/")` / `captions(...)`."""

    path: str = Field(description="a LLaVA conversation JSON or an image-caption JSONL file")
    format: Literal["auto", "llava", "captions"] = Field(default="auto", description="file format")
    images: str | None = Field(default=None, description="image folder (default: next to the file)")

    @model_validator(mode="before")
    @classmethod
    def _from_call(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"path": v}
        if isinstance(v, CallValue):
            if v.name not in ("llava", "captions") or len(v.args) != 1:
                raise ValueError('expected "path", `llava("path", images = "dir")` or `captions("path")`')
            return {"path": v.args[0], "format": v.name, **v.kw()}
        return v

    def to_vlm(self) -> str:
        if self.format == "auto" and self.images is None:
            return f'"{self.path}"'
        fmt = "llava" if self.format == "auto" else self.format
        extra = f', images = "{self.images}"' if self.images else ""
        return f'{fmt}("{self.path}"{extra})'


class TrainTarget(Schema):
    path: str
    lr: float | None = Field(default=None, gt=0, description="learning rate for this part (default: the optimizer's)")


class LoraSpec(Schema):
    path: str
    rank: int = Field(default=8, ge=1, description="LoRA rank")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scaling numerator")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the LoRA branch")
    targets: list[str] | None = Field(default=None, description="linear layers inside the component, e.g. [attn.q, attn.v]")
    lr: float | None = Field(default=None, gt=0, description="learning rate for the adapters")


class Objective(Schema):
    name: Literal["lm", "itc", "itm", "itg", "contrastive"]
    weight: float = Field(default=1.0, gt=0)


class Upcycle(Schema):
    source: str
    dest: str


class Stage(Schema):
    """One stage of the schedule, after `extends` has been applied."""

    name: str
    extends: str | None = None
    train: list[TrainTarget] = Field(default_factory=list, description="parts that are trained")
    freeze: list[str] = Field(default_factory=list, description="parts that are frozen")
    lora: list[LoraSpec] = Field(default_factory=list, description="parts adapted with LoRA")
    optim: Optim = Field(default=Optim(), description="optimizer over the trainable parameters")
    data: DataSpec | None = Field(default=None, description="training data")
    batch: int = Field(default=8, ge=1, description="global batch size (per optimizer step)")
    epochs: int | None = Field(default=None, ge=1, description="passes over the data")
    steps: int | None = Field(default=None, ge=1, description="optimizer steps (overrides epochs)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(default="fp32", description="autocast precision on the "
                                                      "training device (fp16 with loss scaling)")
    objective: list[Objective] = Field(default=[Objective(name="lm")], min_length=1, description="loss terms")
    upcycle: list[Upcycle] = Field(default_factory=list, description="dense FFN -> experts initialisation")
    # stage attributes written `name = value`
    warmup: float = Field(default=0.03, ge=0, le=1, description="fraction of steps spent warming up")
    schedule: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="learning-rate schedule")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    clip_grad: float = Field(default=1.0, ge=0, description="gradient-norm clipping (0 disables)")
    seed: int = Field(default=0, ge=0, description="random seed")
    max_length: int | None = Field(default=None, ge=1, description="truncate samples to this many tokens")
    fsdp: bool = Field(default=False, description="shard with FSDP2 under torchrun")
    activation_checkpointing: bool | list[str] = Field(
        default=False, description="recompute transformer blocks in the backward pass instead of storing their "
        "activations: `true` (every component the stage backpropagates through) or a list of components")
    packing: bool | int = Field(
        default=False, description="pack several samples into each row of a micro-batch, attention kept inside each "
        "sample and positions restarted: `true` (rows as long as the micro-batch's longest sample) or a row length "
        "in tokens")

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        """One clear error for a list of anything but names (pydantic would report each union member)."""
        if isinstance(v, list) and not all(isinstance(x, str) for x in v):
            raise ValueError("expected `true`, `false` or a list of component names, e.g. `[llm, clip]`")
        return v

    @field_validator("packing", mode="before")
    @classmethod
    def _row_length(cls, v: Any) -> Any:
        """`true`, `false` or a positive row length; 0 or a negative length means nothing."""
        if isinstance(v, bool) or (isinstance(v, int) and v > 0):
            return v
        raise ValueError("expected `true`, `false` or a row length in tokens, e.g. `packing = 4096`")

    @property
    def packs(self) -> bool:
        return self.packing is not False


STAGE_ATTRS = ("warmup", "schedule", "grad_accum", "clip_grad", "seed", "max_length", "fsdp",
               "activation_checkpointing", "packing")
#: stage attributes whose values name components: `llm.attn` there is a path to report, not a reference to read
NAME_ATTRS = ("activation_checkpointing",)


class Settings(Schema):
    """Model-level settings written `name = value` directly inside `model { ... }`."""

    prompt: str = Field(default="{image}\n{q}", description="prompt template; `{image}` and `{q}` are filled in")
    answer: str = Field(default=" {a}", description="how an answer follows the prompt in training data")
    system: str | None = Field(default=None, description="system text put before every prompt")
    chat_template: str | None = Field(default=None, description="a Jinja chat template (Hugging Face's "
                                      "`apply_chat_template` format) that lays out prompts and answers instead of "
                                      "`prompt` and `answer`; set by `vlm import-hf` from the checkpoint's own")
    task_tokens: list[str] = Field(default_factory=list, description="task tokens such as MiniGPT-v2's `[vqa]`")
    stop: list[str] = Field(default_factory=list, description="extra stop strings for generation")
    max_length: int | None = Field(default=None, ge=1, description="longest prompt + answer (default: the LLM's)")
    image_token_id: int | None = Field(default=None, ge=0, description="id of the image placeholder in the "
                                       "checkpoint's tokenizer (set by `vlm import-hf`; default: the tokenizer's)")
    boxes: Boxes | None = Field(default=None, discriminator="kind", description="how the model writes a box in "
                                "its text: `patch_index(bins = 32)` (KOSMOS-2) or `coordinates(format = \"...\", "
                                "scale = 100 | \"pixels\")` (MiniGPT-v2, Qwen2.5-VL); see vlmspec/runtime/grounding.py")

    @field_validator("boxes", mode="before")
    @classmethod
    def _boxes_call(cls, v: Any) -> Any:
        return boxes_from_call(v)

