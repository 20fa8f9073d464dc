"""Shared helpers: the tiny specs, building + saving + exporting one, and batched left-padded inputs."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmspec.compiler.compile import Analysis, load_analysis
from vlmspec.runtime.checkpoint import save_model_dir
from vlmspec.runtime.model import VisionLanguageModel, build_model

SPECS = Path(__file__).resolve().parents[2] / "specs"

#: One spec per must-export style runs in the fast suite: prefix (LLaVA) and MoE (MoE-LLaVA's
#: routed experts). Each other tiny spec costs ~20 s of tracing on 2 cores, so it runs under `slow`.
FAST = {"llava_1_5_7b_tiny", "moe_llava_phi2_tiny"}

QUESTIONS = ["what is this?", "describe the picture in detail, please, with every colour you see"]


def tiny_refs() -> list[str]:
    """`file.vlm:model` for every `*_tiny` model in specs/ that has an export path, as the exporter itself
    decides (`check_exportable`, on the meta device); the others are refused in one line, see
    test_export_errors (an anyres spec's image token count varies with the image, a Mamba has no halves, ...)."""
    return [ref for ref in _all_tiny() if _refusal(ref) is None]


def unexportable_refs() -> list[str]:
    """The tiny specs the exporter refuses (E0571)."""
    return [ref for ref in _all_tiny() if _refusal(ref) is not None]


def _all_tiny() -> list[str]:
    refs = []
    for path in sorted(SPECS.glob("*.vlm")):
        for name in re.findall(r"^model (\w+_tiny)\b", path.read_text(), flags=re.M):
            refs.append(f"{path}:{name}")
    return refs


@functools.cache
def _refusal(ref: str) -> str | None:
    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.export.support import check_exportable

    model = build_model(load_analysis(ref)[0], device="meta")
    try:
        check_exportable(model)
    except UserInputError as e:
        return str(e)
    return None


def image_tokens() -> list[str]:
    """`<image>` and every other placeholder a spec in specs/ declares with `image_token = "..."`."""
    found = {"<image>"}
    for path in SPECS.glob("*.vlm"):
        found.update(re.findall(r'image_token\s*=\s*"([^"]+)"', path.read_text()))
    return sorted(found)


def tiny_params() -> list[Any]:
    """Every tiny spec as a pytest param, the ones outside FAST marked slow."""
    out = []
    for ref in tiny_refs():
        name = ref.rsplit(":", 1)[1]
        marks = () if name in FAST else (pytest.mark.slow,)
        out.append(pytest.param(ref, id=name, marks=marks))
    return out


@dataclass
class Exported:
    ref: str
    analysis: Analysis
    model: VisionLanguageModel
    model_dir: Path
    out: Path
    manifest: dict[str, Any]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    eos: int
    runners: dict[str, Any] = field(default_factory=dict)

    def runner(self, backend: str):
        from vlmspec.runtime.export import ExportedModel

        if backend not in self.runners:
            self.runners[backend] = ExportedModel(self.out, backend)
        return self.runners[backend]


def build(ref: str, tokenizer: Any, seed: int = 0) -> tuple[Analysis, VisionLanguageModel]:
    analysis, _ = load_analysis(ref)
    token = getattr(analysis.ir.by_role("fusion")[0].config, "image_token", None)  # none: a contrastive head
    torch.manual_seed(seed)
    model = build_model(analysis, image_token_id=tokenizer.get_vocab()[token] if token else None).eval()
    return analysis, model


def export_case(ref: str, tmp: Path, tokenizer: Any, formats: tuple[str, ...]) -> Exported:
    from vlmspec.runtime.export import export_model
    from vlmspec.runtime.inputs.processor import Processor

    analysis, model = build(ref, tokenizer)
    model_dir = save_model_dir(model, analysis, tmp / "model", tokenizer=tokenizer)
    out = tmp / "out"
    manifest = export_model(model_dir, out, list(formats), max_len=128)
    ids, mask = prompts(Processor(analysis, tokenizer))
    return Exported(ref, analysis, model, model_dir, out, manifest, ids, mask, pixels(manifest, len(QUESTIONS)),
                    tokenizer.eos_token_id)


def prompts(processor: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths with their image tokens, left-padded to one batch."""
    return processor.left_pad([processor.encode_prompt(q, 1) for q in QUESTIONS])


def pixels(manifest: dict[str, Any], batch: int, seed: int = 1) -> torch.Tensor:
    """Random images in the exported encoder's input shape (tiles included)."""
    shape = manifest["interface"]["programs"]["encoder"]["inputs"][0]["shape"]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape[1:], generator=g)


def generate_with_logits(runner: Any, ids: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`runner.generate(ids, **kwargs)` and the logits it chose each token from ([b x vocab] per token: the
    prefill's, then each decode step's), recorded as the runner's own `prefill` / `step` return them."""
    seen: list[torch.Tensor] = []

    def recording(call):
        def wrapped(*a, **kw):
            logits, state = call(*a, **kw)
            seen.append(logits.detach().float().clone())  # `generate` masks the image token in place
            return logits, state

        return wrapped

    runner.prefill, runner.step = recording(runner.prefill), recording(runner.step)
    try:
        tokens = runner.generate(ids, **kwargs)
    finally:
        del runner.prefill, runner.step  # the class's methods again
    return tokens, seen[: tokens.shape[1]]


def eager_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor | None, tokens: torch.Tensor,
                 **inputs: Any) -> list[torch.Tensor]:
    """The eager model's logits for each of `tokens` [b x n] generated after `ids`: one forward pass over the
    prompt and the generated tokens (no cache), read where each token was predicted."""
    b, s = ids.shape
    n = tokens.shape[1]
    mask = mask if mask is not None else torch.ones_like(ids)
    full = torch.cat([ids, tokens[:, : n - 1]], dim=1)
    full_mask = torch.cat([mask, torch.ones(b, n - 1, dtype=mask.dtype)], dim=1)
    if model.bidirectional_prefix:  # a prefix-LM's prompt attends both ways, the generated tokens causally
        inputs["prefix_mask"] = torch.cat([torch.ones(b, s, dtype=torch.bool), torch.zeros(b, n - 1, dtype=torch.bool)], 1)
    with torch.no_grad():
        logits = model(full, attention_mask=full_mask, **inputs).logits.float()
    return [logits[:, s - 1 + t] for t in range(n)]
