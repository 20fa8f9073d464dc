"""Model folders in the Hugging Face layout: what `vlm build` and `vlm train` write (read by `runtime.session`).

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

from vlmspec.compiler.compile import Analysis
from vlmspec.diagnostics import user_error
from vlmspec.fsutil import fsync_dir_files, replace_dir

FORMAT_VERSION = 1
FOLDER_WEIGHTS = "model.safetensors"
INSTRUCTION_TOKENIZER = "qformer_tokenizer"  # the sub-folder name Hugging Face's InstructBLIP processor uses


def dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share memory with an earlier one (tied embeddings); return the aliases."""
    kept: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, v in state.items():
        if type(v) is not torch.Tensor and callable(getattr(v, "dequantize", None)):
            # a quantized weight (torchao) is stored dequantized: a folder holds what `load_session` quantizes
            # as the spec says, and int8 weight-only quantization of its own dequantized values is the same
            v = v.dequantize()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.device.type != "meta" else None
        if key is not None and key in kept:
            aliases[k] = kept[key]
            continue
        if key is not None:
            kept[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out, aliases


def save_state(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Safetensors, atomically, with tied tensors stored once (their aliases in the metadata); streamed to the
    file, so saving does not hold a second copy of the weights in memory."""
    from safetensors.torch import save_file

    from vlmspec.fsutil import atomic_write_with

    tensors, aliases = dedupe(state)
    meta = {"format": "pt", **(metadata or {})}
    if aliases:
        meta["vlmspec_aliases"] = json.dumps(aliases)
    atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


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
        save_state(tmp / FOLDER_WEIGHTS, state, {"vlmspec": str(FORMAT_VERSION)})
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


def read_config(path: Path) -> dict[str, Any]:
    """A model folder's config.json, checked to be vlmspec's."""
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
