"""Reading a local Hugging Face folder: `config.json` and its tensors, safetensors first.

Tensors are read one at a time straight from the (memory-mapped) safetensors files, so a caller can
convert each into its target dtype and drop it before reading the next: the peak stays near the
checkpoint size. Pickles (`.bin`, `.pt`) can run code when unpickled, so they are refused unless the
caller opts in, and then only through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlmspec.runtime.weights.errors import BAD_FILE, CONVERT_HINT, NO_FOLDER, PICKLE, weights_error

SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's `config.json` as a dict (E0580 when absent or not JSON)."""
    if not folder.is_dir():
        raise weights_error(NO_FOLDER, f"weights folder {folder} does not exist",
                            help="point `weights` at a local folder written by `save_pretrained`")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise weights_error(NO_FOLDER, f"{folder} has no config.json, so its model family is unknown",
                            help="save the checkpoint with `save_pretrained`, which writes config.json")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise weights_error(NO_FOLDER, f"{cfg} is not valid JSON: {e}") from None


class CheckpointSource:
    """The tensors of one folder: names, shapes, and one tensor at a time in a requested dtype."""

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False):
        self.folder = Path(folder)
        self._where: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        files = self._safetensors_files()
        if files:
            self._index_safetensors(files)
        else:
            self._load_pickles(allow_pickle)

    # ------------------------------------------------------------ discovery
    def _safetensors_files(self) -> list[Path]:
        index = self.folder / SAFE_INDEX
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise weights_error(BAD_FILE, f"{index} is not a valid shard index: {e}") from None
            shards = sorted({self.folder / f for f in weight_map.values()})
            for shard in shards:
                if not shard.is_file():
                    raise weights_error(BAD_FILE, f"shard {shard.name} named in {SAFE_INDEX} is missing from "
                                        f"{self.folder}", help="download or copy the complete checkpoint")
            return shards
        return sorted(self.folder.glob("*.safetensors"))

    def _index_safetensors(self, files: list[Path]) -> None:
        from safetensors import safe_open

        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
                names = list(handle.keys())
            except Exception as e:  # safetensors raises its own types for truncated or foreign files
                raise weights_error(BAD_FILE, f"cannot read {path}: {_one_line(e)}",
                                    help="the file is truncated or not safetensors; copy it again") from None
            self._open[path] = handle
            for name in names:
                self._where[name] = path

    def _load_pickles(self, allow_pickle: bool) -> None:
        pickles = sorted(p for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickles:
            raise weights_error(BAD_FILE, f"{self.folder} holds no *.safetensors file",
                                help="save the checkpoint with `save_pretrained(DIR, safe_serialization=True)`")
        if not allow_pickle:
            raise weights_error(PICKLE, f"{pickles[0]} is a pickle checkpoint, which can run code when loaded; "
                                "vlmspec reads safetensors only", help=CONVERT_HINT.replace("DIR", repr(str(self.folder))))
        state: dict[str, torch.Tensor] = {}
        for path in pickles:
            try:
                loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise weights_error(BAD_FILE, f"cannot read {path}: {_one_line(e)}") from None
            if not isinstance(loaded, dict):
                raise weights_error(BAD_FILE, f"{path} does not hold a state dict")
            state.update(loaded)
        self._pickled = state

    # ------------------------------------------------------------ access
    def keys(self) -> list[str]:
        return list(self._pickled) if self._pickled is not None else list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._pickled if self._pickled is not None else key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[key].shape)
        return tuple(self._open[self._where[key]].get_slice(key).get_shape())

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, converted to `dtype` (a fresh CPU tensor; the file stays untouched)."""
        if self._pickled is not None:
            t = self._pickled[key]
        else:
            path = self._where[key]
            try:
                t = self._open[path].get_tensor(key)
            except Exception as e:
                raise weights_error(BAD_FILE, f"cannot read tensor {key} from {path}: {_one_line(e)}") from None
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
