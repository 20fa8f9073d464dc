"""IDEFICS (`IdeficsForVisionText2Text`, model_type `idefics`): a CLIP-like ViT whose last hidden states
(class token included, no post-LayerNorm) feed an optional perceiver resampler, then tanh-gated
cross-attention blocks before every `cross_layer_interval`-th layer of a Llama text model with
decoupled embeddings and head (`additional_vocab_size` extra rows, `additional_embedding` /
`additional_fc`).

Each text token attends only to the latest image whose `<image>` token is at or before it, and a token
before the first image gets no cross-attention output: the spec says `image_attention = latest`, which
computes from the prompt's image tokens what the processor's `image_attention_mask` encodes (the
processor's reset after an end-of-sequence token inside a prompt, for packed documents, is not
modelled). The freezing switches (`freeze_text_layers`, `freeze_lm_head`, ...) are training settings,
not part of the model; a spec says what trains in its stages.

Keys: `model.vision_model.*` (CLIP's names), `model.perceiver_resampler.*` (ours), `model.embed_tokens`,
`model.layers.N`, `model.norm`, `lm_head` (Llama's), and `model.gated_cross_attn_layers.K.*`, the K-th
block, which our fusion keys by its decoder layer (`layers.{K * interval}.*`, Mllama's names):
`CrossLayout` maps one onto the other, once per possible interval, the one in use found from the
checkpoint's own counts of decoder and cross-attention layers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmspec.runtime.weights.families import Layout, MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import VLMFormat
from vlmspec.runtime.weights.hf_folder import image_fields, image_processor
from vlmspec.runtime.weights.spec_text import VISION_ACT, fields, need, rope_theta

CROSS = "model.gated_cross_attn_layers."
#: our key inside one block -> IDEFICS' (whole-name renames; the rest of the block's names agree)
_RENAMES = {"cross_attn_attn_gate": "alpha_cross_attn", "cross_attn_mlp_gate": "alpha_dense"}
_INNER = (("cross_attn.q_norm.", "cross_attn.q_layer_norm."), ("cross_attn.k_norm.", "cross_attn.k_layer_norm."))
#: the largest cross_layer_interval a checkpoint's keys are matched against
MAX_INTERVAL = 128


def _count(keys: Iterable[str], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in keys if (m := pat.match(k))})


@dataclass(frozen=True, slots=True)
class CrossLayout(Layout):
    """Our `layers.N.*` (N a decoder layer index, a multiple of `interval`) <-> IDEFICS'
    `model.gated_cross_attn_layers.{N // interval}.*`. Present in a checkpoint whose decoder depth is
    `interval` times its number of cross-attention blocks, which picks the one interval in use."""

    interval: int = 1

    def present(self, keys: Iterable[str]) -> bool:
        keys = list(keys)
        blocks = _count(keys, CROSS)
        return blocks > 0 and _count(keys, "model.layers.") == blocks * self.interval

    def to_checkpoint(self, key: str) -> str | None:
        if not key.startswith("layers."):
            return None
        idx, _, rest = key[len("layers."):].partition(".")
        if not idx.isdigit() or int(idx) % self.interval:
            return None
        rest = _RENAMES.get(rest, rest)
        for ours, theirs in _INNER:
            if rest.startswith(ours):
                rest = theirs + rest[len(ours):]
        return f"{CROSS}{int(idx) // self.interval}.{rest}"

    def owns(self, ckpt_key: str) -> bool:
        return ckpt_key.startswith(CROSS)


def _cross_layouts() -> tuple[Layout, ...]:
    return tuple(CrossLayout(((CROSS, "layers."),), interval=i) for i in range(1, MAX_INTERVAL + 1))


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def token_id(folder: str, token: str) -> int | None:
    """The id of an added token, from the folder's tokenizer files (None when none names it)."""
    root = Path(folder)
    found = _json(root / "added_tokens.json").get(token)
    if isinstance(found, int):
        return found
    for entry in _json(root / "tokenizer.json").get("added_tokens") or []:
        if isinstance(entry, dict) and entry.get("content") == token and isinstance(entry.get("id"), int):
            return int(entry["id"])
    for tid, entry in (_json(root / "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and entry.get("content") == token and str(tid).isdigit():
            return int(tid)
    return None


def _image_token(config: dict[str, Any], folder: str) -> tuple[int, str]:
    """(id of `<image>`, a comment for the spec when the id is inferred)."""
    vocab, extra = int(config.get("vocab_size", 32000)), int(config.get("additional_vocab_size", 0))
    found = token_id(folder, "<image>")
    if found is not None:
        need(0 <= found < vocab + extra, f"`<image>` token id {found} outside the model's {vocab + extra} rows")
        return found, ""
    need(extra > 0, "an IDEFICS folder whose tokenizer files do not name the `<image>` token (and no extra "
         "vocabulary row to assume it is)")
    note = (f"  # No tokenizer file here names `<image>`: assumed to be the last extra row ({vocab + extra - 1}), "
            "as in HuggingFaceM4/idefics-*.\n")
    return vocab + extra - 1, note


def _int(v: Any, what: str) -> int:
    need(isinstance(v, int), f"a non-square {what} {v}")
    return int(v)


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc = config.get("vision_config") or {}
    pc = config.get("perceiver_config") or {}
    depth, interval = int(config.get("num_hidden_layers", 32)), int(config.get("cross_layer_interval", 1))
    need(1 <= interval <= min(depth, MAX_INTERVAL) and depth % interval == 0,
         f"cross_layer_interval {interval} for {depth} decoder layers (IDEFICS builds depth // interval blocks "
         "and needs them to divide evenly)")
    alpha = config.get("alpha_type", "float")
    need(alpha in ("float", "vector"), f"alpha_type `{alpha}`")
    extra = int(config.get("additional_vocab_size", 0))
    tied = bool(config.get("tie_word_embeddings", False))
    need(not (tied and extra), "tied decoupled embeddings (the extra rows of the head tied to the extra "
         "embedding rows)")
    need(config.get("hidden_act", "silu") == "silu", f"text activation {config.get('hidden_act')}")

    act = vc.get("hidden_act", "gelu")
    need(act in VISION_ACT, f"vision activation {act}")
    size, patch = _int(vc.get("image_size", 224), "image_size"), _int(vc.get("patch_size", 14), "patch_size")
    need(size % patch == 0, f"image_size {size} not a multiple of patch_size {patch}")
    vwidth, vheads = int(vc.get("embed_dim", vc.get("hidden_size", 768))), int(vc.get("num_attention_heads", 16))
    need(vwidth % vheads == 0, f"vision width {vwidth} not divisible by {vheads} heads")
    pre = image_processor(folder)
    need(pre.get("image_size", size) == size, f"a processor image_size {pre.get('image_size')} other than the "
         f"vision tower's {size}")
    vision: list[tuple[str, Any]] = [
        ("image_size", size), ("patch_size", patch), ("channels", int(vc.get("num_channels", 3))),
        ("width", vwidth), ("depth", int(vc.get("num_hidden_layers", 32))), ("heads", vheads),
        ("mlp", int(vc.get("intermediate_size", 5120))), ("act", VISION_ACT[act]),
        ("norm_eps", float(vc.get("layer_norm_eps", 1e-5))), ("feature", "layer(-1).all")]
    # IdeficsImageProcessor: a plain (bicubic) resize to image_size x image_size, 1/255, CLIP's mean / std
    vision += image_fields(folder, size, resize="bicubic")
    vision.append(("weights", f"{folder}#vision"))
    blocks = [f"  vision clip = vit {{\n{fields(vision)}\n  }}"]

    source = "clip"
    if config.get("use_resampler", False):
        resampler = fields([
            ("latents", int(pc.get("resampler_n_latents", 64))), ("depth", int(pc.get("resampler_depth", 6))),
            ("heads", int(pc.get("resampler_n_heads", 16))), ("head_dim", int(pc.get("resampler_head_dim", 96))),
            ("mlp_ratio", 4), ("act", "relu"), ("qk_norm", bool(pc.get("qk_layer_norms_perceiver", False))),
            ("weights", f"{folder}#resampler")])
        blocks.append(f"  connector resampler = perceiver(clip -> llm) {{\n{resampler}\n  }}")
        source = "resampler"

    heads = int(config.get("num_attention_heads", 32))
    width = int(config.get("hidden_size", 4096))
    need(width % heads == 0, f"text width {width} not divisible by {heads} heads")
    language: list[tuple[str, Any]] = [
        ("width", width), ("depth", depth), ("heads", heads), ("ffn", int(config.get("intermediate_size", 11008))),
        ("vocab", int(config.get("vocab_size", 32000)))]
    if extra:
        language.append(("extra_vocab", extra))
    language += [("max_positions", int(config.get("max_position_embeddings", 2048))),
                 ("norm_eps", float(config.get("rms_norm_eps", 1e-6))), ("rope_theta", rope_theta(config)),
                 ("tie_embeddings", tied), ("weights", f"{folder}#language")]
    blocks.append(f"  language llm = llama {{\n{fields(language)}\n  }}")

    image_token, note = _image_token(config, folder)
    cross: list[tuple[str, Any]] = [("every", interval), ("gate", "tanh"), ("mlp", True),
                                    ("qk_norm", bool(config.get("qk_layer_norms", False))),
                                    ("image_attention", "latest")]
    if alpha == "vector":
        cross.append(("vector_gates", True))
    cross.append(("weights", f"{folder}#cross_attention"))
    blocks.append(note + f"  fusion cross_attention({source} -> llm) {{\n{fields(cross)}\n  }}")
    return blocks, image_token


FAKE = "<fake_token_around_image>"

#: without a chat template: the conversation's pieces in order, as one would hand them to IdeficsProcessor
#: (`[image, question]`: the image, then the question; an answer right after it)
_PLAIN = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
          "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")

#: IdeficsProcessor's layout of the rendered text split at each `<image>` (empty pieces dropped): BOS, each
#: piece stripped of spaces, each image as `<fake><image><fake>`, or `<image><fake>` right after another
_LAYOUT = ("{{- bos_token -}}{%- set parts = vlm_rendered.split('<image>') -%}{{- parts[0].strip(' ') -}}"
           "{%- for p in parts[1:] -%}{%- if loop.index0 > 0 and parts[loop.index0] == '' -%}<image>" + FAKE +
           "{%- else -%}" + FAKE + "<image>" + FAKE + "{%- endif -%}{{- p.strip(' ') -}}{%- endfor -%}")


def processor_template(template: str | None) -> tuple[str, str]:
    """(chat template, note): the folder's template (else one that renders the conversation's images and
    text in order) with IdeficsProcessor's layout applied to what it renders. IdeficsProcessor cannot take a
    rendered chat template (its `apply_chat_template` leaves `<image>` in the text and appends the image
    after it); what it does with the rendered text split at each image is: BOS in front, every text piece
    stripped of spaces, each image wrapped in `<fake_token_around_image>` (one shared between adjacent
    images). The template is kept, wrapped in that layout, never translated into `prompt` / `answer`."""
    own = template is not None
    body = template if own else _PLAIN
    wrapped = "{%- set vlm_rendered -%}" + body + "{%- endset -%}" + _LAYOUT
    what = "the checkpoint's Jinja template" if own else "the conversation's images and text in order (the folder " \
        "has no chat template)"
    return wrapped, (f"# Chat template: {what}, laid out as IdeficsProcessor lays out a prompt split at its images "
                     f"(BOS, each piece stripped of spaces, each image between {FAKE} tokens).")


FORMAT = VLMFormat(
    model_types=("idefics",),
    family=MultiFamily("idefics", {
        "vision": Part("vision", (lay(("model.vision_model.", "")),), kinds=frozenset({"vit"})),
        "resampler": Part("connector", (lay(("model.perceiver_resampler.", "")),), kinds=frozenset({"perceiver"})),
        "language": Part("language", (lay(("model.embed_tokens.", "model.embed_tokens."),
                                          ("model.layers.", "model.layers."), ("model.norm.", "model.norm."),
                                          ("lm_head.", "lm_head.")),), kinds=frozenset({"llama"})),
        "cross_attention": Part("fusion", _cross_layouts(), kinds=frozenset({"cross_attention"})),
    }, {"vision": "vision", "connector": "resampler", "language": "language", "fusion": "cross_attention"}),
    components={"clip": "vision", "resampler": "resampler", "llm": "language", "cross_attention": "cross_attention"},
    read=read,
)
