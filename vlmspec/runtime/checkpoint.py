"""Model folders in the Hugging Face layout, and `vlmspec.load`.

    DIR/config.json         {"vlmspec": version, "model": name, "ir": resolved IR, "image_token_id": ...}
    DIR/model.safetensors   every tensor, keys as in `VisionLanguageModel.state_dict()`
    DIR/spec.vlm            the spec the model was built from (so the folder is self-describing)
    DIR/tokenizer.json ...  the tokenizer, when there is one
    DIR/qformer_tokenizer/  an instruction-aware Q-Former's own tokenizer (InstructBLIP), when there is one

A folder is written to a temporary sibling and renamed into place, so a crash never leaves half a model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vlmspec.compiler.compile import Analysis, load_analysis
from vlmspec.diagnostics import SpecValidationError, VlmSpecError, user_error
from vlmspec.fsutil import fsync_dir_files, replace_dir

FORMAT_VERSION = 1
INSTRUCTION_TOKENIZER = "qformer_tokenizer"  # the sub-folder name Hugging Face's InstructBLIP processor uses


def dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share memory with an earlier one (tied embeddings); return the aliases."""
    kept: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.device.type != "meta" else None
        if key is not None and key in kept:
            aliases[k] = kept[key]
            continue
        if key is not None:
            kept[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out, aliases


def save_state(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Safetensors, atomically, with tied tensors stored once (their aliases in the metadata)."""
    from safetensors.torch import save

    from vlmspec.fsutil import atomic_write_bytes

    tensors, aliases = dedupe(state)
    meta = {"format": "pt", **(metadata or {})}
    if aliases:
        meta["vlmspec_aliases"] = json.dumps(aliases)
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise user_error("E0541", f"cannot read {path}: {e}") from None
    for alias, target in json.loads(meta.get("vlmspec_aliases", "{}")).items():
        state[alias] = state[target]
    return state


def save_model_dir(model: torch.nn.Module, analysis: Analysis, out: str | Path, tokenizer: Any = None,
                   spec_text: str | None = None, extra: dict[str, Any] | None = None,
                   progress: Any = None, state: dict[str, torch.Tensor] | None = None,
                   instruction_tokenizer: Any = None) -> Path:
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        state = state if state is not None else model.state_dict()
        if progress is not None:
            progress(f"writing {len(state)} tensors")
        save_state(tmp / "model.safetensors", state, {"vlmspec": str(FORMAT_VERSION)})
        config = {"vlmspec": FORMAT_VERSION, "model": analysis.ir.name, "architectures": ["VisionLanguageModel"],
                  "image_token_id": getattr(model, "image_token_id", None),
                  "ir": json.loads(analysis.ir.model_dump_json()), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        text = spec_text if spec_text is not None else Path(analysis.file).read_text(encoding="utf-8")
        (tmp / "spec.vlm").write_text(text)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if instruction_tokenizer is not None:  # where Hugging Face's InstructBLIP processor keeps it
            instruction_tokenizer.save_pretrained(str(tmp / INSTRUCTION_TOKENIZER))
            fsync_dir_files(tmp / INSTRUCTION_TOKENIZER)
        fsync_dir_files(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def analysis_of_dir(path: Path) -> Analysis:
    config = _config(path)
    spec = path / "spec.vlm"
    try:
        analysis, _ = load_analysis(f"{spec}:{config['model']}")
    except SpecValidationError as e:
        raise VlmSpecError(e.diagnostics, e.sources) from None
    return analysis


def _config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise user_error("E0540", f"{path} is not a vlmspec model folder (no config.json)",
                         help="make one with `vlm build SPEC -o DIR` or `vlm train`")
    try:
        config = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise user_error("E0540", f"{cfg} is not valid JSON: {e.msg}") from None
    if "vlmspec" not in config or "model" not in config:
        raise user_error("E0540", f"{cfg} was not written by vlmspec",
                         help="import Hugging Face checkpoints with `weights = \"DIR\"` in a spec")
    return config


def has_weights(analysis: Analysis) -> bool:
    return any(getattr(c.config, "weights", None) for c in analysis.ir.components.values())


def build_from_spec(analysis: Analysis, *, image_token_id: int | None = None, device: str = "cpu"):
    """Build a spec's model; components with `weights = "DIR"` load them (with a coverage report)."""
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.quantize import apply_quantization

    report = None
    if has_weights(analysis) and device != "meta":
        from vlmspec.runtime.weights import build_with_weights

        model, report = build_with_weights(analysis, image_token_id=image_token_id, device=device)
    else:
        model = build_model(analysis, image_token_id=image_token_id, device=device)
    if device != "meta":
        apply_quantization(model, analysis)
    return model, report


def load(source: str | Path, device: str = "cpu"):
    """A model from a folder written by `vlm build` / `vlm train`, or built fresh from `spec.vlm[:model]`.

    Returns the `VisionLanguageModel`; its `processor` attribute holds the tokenizer-backed processor
    when the folder has a tokenizer.
    """
    from vlmspec.runtime.model import build_model

    path = Path(str(source).split(":")[0]) if not Path(str(source)).is_dir() else Path(source)
    if not path.is_dir():
        analysis, _ = load_analysis(str(source))
        model = build_from_spec(analysis, device=device)[0]
        model.analysis, model.processor = analysis, None
        return model
    config = _config(path)
    analysis = analysis_of_dir(path)
    model = build_model(analysis, image_token_id=config.get("image_token_id"), device=device)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise user_error("E0541", f"{path} has no model.safetensors")
    state = load_state(weights)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise user_error("E0542", f"{weights} does not fit the spec: {len(missing)} missing, {len(unexpected)} "
                         f"unexpected tensors" + (f" (e.g. missing {missing[0]})" if missing else
                                                  f" (e.g. unexpected {unexpected[0]})"))
    model.load_state_dict(state, strict=True)
    model.eval()
    from vlmspec.runtime.quantize import apply_quantization

    apply_quantization(model, analysis)
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        from vlmspec.runtime.processor import Processor
        from vlmspec.runtime.tokenizer import load_tokenizer

        qf_dir = path / INSTRUCTION_TOKENIZER
        qf_tok = load_tokenizer(qf_dir, plain=True) if qf_dir.is_dir() else None
        model.processor = Processor(analysis, load_tokenizer(path), qf_tok)
    else:
        model.processor = None
    model.analysis = analysis
    return model
