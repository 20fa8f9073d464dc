"""`ExportedModel`: greedy generation from an export folder, with no model code, only the artefacts.

It drives the three programs the way `vlmspec.runtime.generate` drives the eager model (encode the
images once, prefill the prompt, then one decode step per token with the static cache), so its
tokens can be compared with eager `model.generate` one for one. Backends: `pt2` (torch.export.load),
`onnx` (onnxruntime), `tensorrt` (the `.trt.ep` engines, on CUDA with torch_tensorrt).

The checks the exported graphs cannot hold (image-token counts, vocabulary range, room in the cache)
run here, before the first program call, as E0575 errors.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlmspec.runtime.export import manifest as mf
from vlmspec.runtime.export.errors import bad_folder, bad_input, bad_option, missing
from vlmspec.runtime.export.interface import DECODE, ENCODER, PREFILL
from vlmspec.runtime.language.mrope import mrope_positions

BACKENDS = ("pt2", "onnx", "tensorrt")


class _Pt2Program:
    """A `.pt2` (or TensorRT `.trt.ep`) file run as the module torch.export unflattens it to."""

    def __init__(self, path: Path, device: str):
        with warnings.catch_warnings():  # torch's own deserializer warns about its pytree internals
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.export.load(str(path)).module()
        self.device = device

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        out = self.module(*(a.to(self.device) for a in args))
        return tuple(out) if isinstance(out, list | tuple) else (out,)


class _OrtProgram:
    """An ONNX file run by onnxruntime; inputs are fed by the manifest's names."""

    def __init__(self, path: Path, inputs: list[str], threads: int | None, providers: list[str] | None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise missing("onnxruntime", "running ONNX artefacts") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self.inputs = inputs

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(self.inputs, args, strict=True)}
        return tuple(torch.from_numpy(o) for o in self.session.run(None, feeds))


class ExportedModel:
    """The exported halves of one model, ready to generate: `ExportedModel(OUT, backend="onnx")`.

    `processor` (the tokenizer-backed prompt builder) comes from the folder's own spec and tokenizer;
    `manifest` is the parsed manifest.json. ONNX runs on onnxruntime's CPU provider unless `providers`
    names others (e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"]); `threads` caps its threads.
    """

    def __init__(self, folder: str | Path, backend: str = "pt2", *, threads: int | None = None,
                 providers: list[str] | None = None):
        self.folder = Path(folder)
        self.manifest = mf.read(self.folder)
        if backend not in BACKENDS:
            raise bad_option(f"unknown backend `{backend}`", help="one of: " + ", ".join(BACKENDS))
        have = self.manifest["artefacts"]
        if backend not in have:
            raise bad_folder(f"{self.folder} has no {backend} artefacts",
                             help="it has: " + (", ".join(have) or "none") + f"; export with --format {backend}")
        self.backend = backend
        m = self.manifest
        self.image_token_id: int = m["image_token_id"]
        self.max_len: int = m["max_len"]
        self.max_batch: int = m["max_batch"]
        self.fusions: list[str] = m["interface"]["fusions"]
        self.in_sequence: list[str] = m["interface"]["in_sequence"]
        self.cross: dict[str, list[int]] = m["interface"]["cross_attention"]
        self.tiled: bool = m["interface"]["tiled"]
        self.programs = {p: self._load(p, spec, threads, providers) for p, spec in have[backend].items()}
        if set(self.programs) != {ENCODER, PREFILL, DECODE}:
            raise bad_folder(f"{self.folder}: the {backend} artefacts are incomplete ({', '.join(self.programs)})")
        self._share_weights()
        self._processor: Any = None
        self.mrope_delta: Tensor | None = None  # M-RoPE: how far the last prefill's images moved positions

    # ------------------------------------------------------------ loading
    def _load(self, program: str, spec: dict[str, Any], threads: int | None, providers: list[str] | None) -> Any:
        path = self.folder / spec["file"]
        if not path.is_file():
            raise bad_folder(f"{path} is missing", help="export the model again")
        if self.backend == "onnx":
            if any(t["dtype"] == "bfloat16" for t in spec["inputs"]):
                raise bad_option("onnxruntime cannot be fed bfloat16 tensors from numpy",
                                 help="run the pt2 artefacts, or export with dtype fp32 / fp16 for ONNX")
            return _OrtProgram(path, [t["name"] for t in spec["inputs"]], threads, providers)
        if self.backend == "tensorrt":
            try:
                import torch_tensorrt  # noqa: F401  (registers the engine op torch.export.load needs)
            except ImportError:
                raise missing("torch_tensorrt", "running TensorRT artefacts", extra="tensorrt") from None
            return _Pt2Program(path, "cuda")
        return _Pt2Program(path, "cpu")

    def _share_weights(self) -> None:
        """Prefill and decode hold the same language-model weights: keep one copy in memory."""
        pre, dec = self.programs[PREFILL], self.programs[DECODE]
        if isinstance(pre, _Pt2Program) and isinstance(dec, _Pt2Program) and self.backend == "pt2":
            shared = {k: v for k, v in pre.module.state_dict().items() if k in dec.module.state_dict()}
            dec.module.load_state_dict(shared, strict=False, assign=True)

    @property
    def processor(self) -> Any:
        """The folder's `Processor` (None without a tokenizer); its spec must still hash to the manifest's."""
        if self._processor is None and (self.folder / "tokenizer.json").is_file():
            from vlmspec.compiler.compile import load_analysis
            from vlmspec.runtime.inputs.processor import Processor
            from vlmspec.runtime.inputs.tokenizer import ensure_special_tokens, load_tokenizer

            analysis, _ = load_analysis(f"{self.folder / self.manifest['spec']}:{self.manifest['model']}")
            if mf.spec_hash(analysis) != self.manifest["spec_hash"]:
                raise bad_folder(f"{self.folder}/spec.vlm no longer matches the exported architecture "
                                 f"(hash {mf.spec_hash(analysis)} != {self.manifest['spec_hash']})",
                                 help="export the model again")
            self._processor = Processor(analysis, ensure_special_tokens(load_tokenizer(self.folder), analysis))
        return self._processor

    # ------------------------------------------------------------ the three programs
    def encode_images(self, pixel_values: Tensor, aspect_ratio_ids: Tensor | None = None) -> dict[str, Tensor]:
        """pixels [b x 3 x H x W] -> {fusion: visual tokens [b x n x w]}."""
        args = [pixel_values.float()]
        if self.tiled:
            ids = aspect_ratio_ids if aspect_ratio_ids is not None else torch.ones(pixel_values.shape[0],
                                                                                   dtype=torch.long)
            args.append(ids.long())
        return dict(zip(self.fusions, self.programs[ENCODER](*args), strict=True))

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, features: dict[str, Tensor],
                aspect_ratio_ids: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        """-> (logits [b x vocab], (keys, values, cross K / V, visual masks ...)) for `step`."""
        if input_ids.shape[1] > self.max_len:
            raise bad_input(f"the prompt is {input_ids.shape[1]} tokens but the exported cache holds {self.max_len}",
                            help="shorten the prompt, or export with a larger max_len")
        extra = []
        self.mrope_delta = None
        grid = self.manifest["interface"].get("image_grid")
        if grid is not None:  # M-RoPE: positions by a Python loop over the prompt, outside the graph
            pos3, self.mrope_delta = mrope_positions(input_ids.long(), attention_mask.long(), self.image_token_id,
                                                     (int(grid[0]), int(grid[1])))
            extra.append(pos3)
        if self.manifest["interface"].get("prefill_aspect"):
            extra.append(aspect_ratio_ids.long() if aspect_ratio_ids is not None
                         else torch.ones(input_ids.shape[0], dtype=torch.long))
        out = self.programs[PREFILL](input_ids.long(), attention_mask.long(), *extra,
                                     *(features[f] for f in self.fusions))
        return out[0], tuple(out[1:])

    def step(self, token: Tensor, position: Tensor, mask: Tensor, cache: tuple[Tensor, ...],
             write_index: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One decode step: token [b], position [b] (real tokens before it; M-RoPE's offset from the last
        `prefill` is added here), mask [b x max_len] -> (logits, cache)."""
        if self.mrope_delta is not None:
            position = position + self.mrope_delta
        keys, values, *cross = cache
        out = self.programs[DECODE](token.long()[:, None], position.long()[:, None], mask, keys, values,
                                    torch.tensor([write_index], dtype=torch.long), *cross)
        return out[0], (out[1], out[2], *cross)

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                 max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, image_features: dict[str, Tensor] | None = None,
                 aspect_ratio_ids: Tensor | None = None) -> Tensor:
        """Greedy decoding, as eager `model.generate(do_sample=False)`: new tokens [b x n], n <= max_new_tokens;
        rows that stopped at an eos are filled with the pad token (default: the first eos, else 0)."""
        if max_new_tokens < 0:
            raise bad_input(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        input_ids = input_ids.cpu().long()
        mask = attention_mask.cpu().long() if attention_mask is not None else torch.ones_like(input_ids)
        b, s = input_ids.shape
        self._check(input_ids, mask, pixel_values, image_features, max_new_tokens)
        if max_new_tokens == 0:
            return input_ids.new_empty(b, 0)
        features = image_features if image_features is not None else self.encode_images(pixel_values,
                                                                                        aspect_ratio_ids)
        logits, cache = self.prefill(input_ids, mask, features, aspect_ratio_ids)
        slots = torch.zeros(b, self.max_len, dtype=torch.long)
        slots[:, :s] = mask
        position = mask.sum(1)
        eos_t = torch.tensor(eos, dtype=torch.long)
        finished = torch.zeros(b, dtype=torch.bool)
        out: list[Tensor] = []
        for t in range(max_new_tokens):
            logits = logits.float().cpu()
            if self.in_sequence:
                logits[:, self.image_token_id] = float("-inf")  # the placeholder is never generated
            tok = torch.where(finished, torch.full((b,), pad, dtype=torch.long), logits.argmax(-1))
            out.append(tok)
            if eos:
                finished |= torch.isin(tok, eos_t)
                if bool(finished.all()):
                    break
            if t == max_new_tokens - 1:
                break
            slots[:, s + t] = 1
            logits, cache = self.step(tok, position, slots, cache, s + t)
            position = position + 1
        return torch.stack(out, dim=1)

    def _check(self, ids: Tensor, mask: Tensor, pixels: Tensor | None, features: dict[str, Tensor] | None,
               max_new: int) -> None:
        b, s = ids.shape
        if mask.shape != ids.shape:
            raise bad_input(f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}")
        if not 1 <= b <= self.max_batch:
            raise bad_input(f"batch of {b} prompts; this export takes 1..{self.max_batch}",
                            help="export again with a larger max_batch")
        if pixels is None and features is None:
            raise bad_input("the exported model needs images (pixel_values or image_features)")
        n_img = pixels.shape[0] if pixels is not None else next(iter(features.values())).shape[0]  # type: ignore[union-attr]
        if n_img != b:
            raise bad_input(f"{n_img} images for {b} prompts", help="give one image per prompt")
        vocab = (self.manifest["interface"].get("embed_rows")
                 or self.manifest["interface"]["programs"][PREFILL]["outputs"][0]["shape"][1])
        if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            raise bad_input(f"token id {int(ids.max())} is outside the vocabulary of {vocab}")
        want = sum(self._visual_tokens(f) for f in self.in_sequence)
        if self.in_sequence:
            counts = (ids == self.image_token_id).sum(1)
            if bool((counts != want).any()):
                bad = int(counts[counts != want][0])
                raise bad_input(f"the prompt has {bad} image tokens but the images give {want} features per sample",
                                help=f"put {want} image tokens (id {self.image_token_id}) in every prompt")
        if s + max(max_new - 1, 0) > self.max_len:
            raise bad_input(f"{s} prompt tokens + {max_new} new ones exceed the exported cache of {self.max_len}",
                            help="shorten the prompt or max_new_tokens, or export with a larger max_len")

    def _visual_tokens(self, fusion: str) -> int:
        for t in self.manifest["interface"]["programs"][ENCODER]["outputs"]:
            if t["name"] == f"visual_{fusion}":
                return int(t["shape"][1])
        raise bad_folder(f"the manifest declares no visual tokens for fusion `{fusion}`")
