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

Export (`write`) is the inverse: the same keys (the cross-attention layout of the spec's interval), an
IdeficsConfig, IdeficsImageProcessor's plain resize, and the chat template IdeficsProcessor's users render
and split at `<image>`: an imported spec's with the import's layout taken off again, else one written from
a prompt that puts its image as `<fake>{image}<fake>`. What IDEFICS cannot hold is refused (E0586).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmspec.runtime.weights.chat_template import PROMPT_TURN, conversation_template
from vlmspec.runtime.weights.families import Layout, MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import (
    Export,
    VLMFormat,
    does_not_fit,
    refuse_unplaced,
    special_token_ids,
)
from vlmspec.runtime.weights.formats.llava import ACT_HF
from vlmspec.runtime.weights.hf_folder import RESAMPLE, image_fields, image_processor
from vlmspec.runtime.weights.spec_text import VISION_ACT, fields, need, rope_theta

if TYPE_CHECKING:
    from vlmspec.compiler.ir import Component, ModelIR
    from vlmspec.runtime.session import Session

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
#: what `processor_template` puts around the rendered template (and `write` takes off again)
_WRAP_HEAD, _WRAP_TAIL = "{%- set vlm_rendered -%}", "{%- endset -%}" + _LAYOUT


def processor_template(template: str | None) -> tuple[str, str]:
    """(chat template, note): the folder's template (else one that renders the conversation's images and
    text in order) with IdeficsProcessor's layout applied to what it renders. IdeficsProcessor cannot take a
    rendered chat template (its `apply_chat_template` leaves `<image>` in the text and appends the image
    after it); what it does with the rendered text split at each image is: BOS in front, every text piece
    stripped of spaces, each image wrapped in `<fake_token_around_image>` (one shared between adjacent
    images). The template is kept, wrapped in that layout, never translated into `prompt` / `answer`."""
    own = template is not None
    body = template if own else _PLAIN
    wrapped = _WRAP_HEAD + body + _WRAP_TAIL
    what = "the checkpoint's Jinja template" if own else "the conversation's images and text in order (the folder " \
        "has no chat template)"
    return wrapped, (f"# Chat template: {what}, laid out as IdeficsProcessor lays out a prompt split at its images "
                     f"(BOS, each piece stripped of spaces, each image between {FAKE} tokens).")


# ------------------------------------------------------------------ export

VISION_LAYOUT = lay(("model.vision_model.", ""))
RESAMPLER_LAYOUT = lay(("model.perceiver_resampler.", ""))
LANGUAGE_LAYOUT = lay(("model.embed_tokens.", "model.embed_tokens."), ("model.layers.", "model.layers."),
                      ("model.norm.", "model.norm."), ("lm_head.", "lm_head."))
_NAME = "IDEFICS"
_HINT = ("IDEFICS is one CLIP-style `vit` read at its last layer, an optional ReLU `perceiver`, a `llama` without "
         "grouped-query attention and tanh-gated `cross_attention` blocks before every N-th layer that see the "
         "latest image, unquantized, the prompt laid out as IdeficsProcessor lays it")
_RESAMPLE_CODE = {name: code for code, name in RESAMPLE.items()}  # PIL's codes, as the image processor stores them

# attributes each config below carries (or `write` checks against it); every other attribute must keep its
# kind's default, or the value `fixed` names (see `unplaced_attribute`)
_VIT = {"image_size", "patch_size", "channels", "width", "depth", "heads", "mlp", "act", "norm_eps", "feature",
        "mean", "std", "resize", "weights", "dtype"}
# one source, so `merge` merges nothing; without `project`, `out` is never read
_PERCEIVER = {"latents", "depth", "heads", "head_dim", "qk_norm", "merge", "out", "weights", "dtype"}
_PERCEIVER_FIXED = {"mlp_ratio": 4, "act": "relu"}
_LLAMA = {"width", "depth", "heads", "kv_heads", "head_dim", "ffn", "vocab", "extra_vocab", "max_positions",
          "norm_eps", "rope_theta", "tie_embeddings", "weights", "tokenizer", "dtype"}
_CROSS = {"every", "offset", "layers", "qk_norm", "vector_gates", "weights"}
_CROSS_FIXED = {"image_attention": "latest", "image_token": "<image>"}


def claims(ir: ModelIR) -> bool:
    """Cross-attention fusion fed by the encoder or a perceiver: IDEFICS' shape (Mllama's goes through a
    linear projector; what does not fit IDEFICS is then said by `write`)."""
    return [f.kind for f in ir.by_role("fusion")] == ["cross_attention"] and \
        [c.kind for c in ir.by_role("connector")] in ([], ["perceiver"])


def _fit(cond: bool, what: str) -> None:
    does_not_fit(cond, _NAME, what, _HINT)



def _parts(ir: ModelIR) -> tuple[Component, Component | None, Component, Component]:
    """(vision, perceiver or None, language, fusion), wired as IDEFICS wires them."""
    by = {r: ir.by_role(r) for r in ("vision", "connector", "language", "fusion")}
    _fit(all(len(by[r]) == 1 for r in ("vision", "language", "fusion")) and len(by["connector"]) <= 1
         and len(ir.components) == 3 + len(by["connector"]),
         "a model with other than one encoder, at most one resampler, one language model and one fusion")
    vis, lm, fus = by["vision"][0], by["language"][0], by["fusion"][0]
    con = by["connector"][0] if by["connector"] else None
    _fit(con is None or (con.kind == "perceiver" and list(con.sources) == [vis.name]),
         f"connector `{con.name if con else ''}` reading {', '.join(con.sources) if con else ''}")
    source = con.name if con is not None else vis.name
    _fit(list(fus.sources) == [source], f"fusion `{fus.name}` reading {', '.join(fus.sources)} (IDEFICS' "
         f"cross-attention reads `{source}`)")
    return vis, con, lm, fus


def _vision(vis: Component) -> dict[str, Any]:
    """`vision_config`: a CLIP-style tower whose last layer's tokens (class token included, no
    post-LayerNorm: `last_hidden_state`) the resampler or the cross-attention reads."""
    v = vis.config
    _fit(vis.kind == "vit", f"vision `{vis.name}` ({vis.kind})")
    _fit(list(v.feature.layers) in ([-1], [v.depth]) and v.feature.tokens == "all",
         f"vision `{vis.name}` with feature = {v.feature.to_vlm()} (IDEFICS reads the last layer's tokens, "
         "`layer(-1).all`)")
    refuse_unplaced(vis, _fit, _VIT)
    return {"model_type": "idefics_vision", "embed_dim": v.width, "image_size": v.image_size,
            "intermediate_size": v.mlp_dim, "patch_size": v.patch_size, "num_hidden_layers": v.depth,
            "num_attention_heads": v.heads, "num_channels": v.channels, "hidden_act": ACT_HF[v.act],
            "layer_norm_eps": v.norm_eps}


def _perceiver(con: Component | None) -> dict[str, Any]:
    """`perceiver_config` (`use_resampler` also sits in the top-level config)."""
    if con is None:
        return {"model_type": "idefics_perciever", "use_resampler": False}
    c = con.config
    refuse_unplaced(con, _fit, _PERCEIVER, _PERCEIVER_FIXED)
    return {"model_type": "idefics_perciever", "use_resampler": True, "resampler_n_latents": c.latents,
            "resampler_depth": c.depth, "resampler_n_heads": c.heads, "resampler_head_dim": c.head_dim,
            "qk_layer_norms_perceiver": c.qk_norm}


def _text(lm: Component) -> dict[str, Any]:
    """The Llama fields IdeficsConfig keeps at its top level: one head width (`hidden_size // heads`), no
    grouped-query attention, default RoPE, SwiGLU; the extra rows in `additional_embedding` /
    `additional_fc`, untied (IDEFICS would tie the extra head rows to the extra embedding rows too)."""
    t = lm.config
    _fit(lm.kind == "llama", f"language model `{lm.name}` ({lm.kind})")
    _fit(t.n_kv == t.heads and t.hd * t.heads == t.width, f"language model `{lm.name}` with kv_heads = {t.n_kv}, "
         f"head_dim = {t.hd} (IDEFICS' heads split its width, without grouped-query attention)")
    _fit(not (t.tie_embeddings and t.extra_vocab), f"language model `{lm.name}` with tie_embeddings and "
         f"extra_vocab = {t.extra_vocab} (IDEFICS would tie the extra head rows to the extra embedding rows)")
    refuse_unplaced(lm, _fit, _LLAMA)
    return {"vocab_size": t.vocab, "additional_vocab_size": t.extra_vocab, "hidden_size": t.width,
            "intermediate_size": t.ffn, "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
            "hidden_act": "silu", "rms_norm_eps": t.norm_eps, "max_position_embeddings": t.max_positions,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "tie_word_embeddings": t.tie_embeddings}


def cross_interval(fus: Component, depth: int) -> int:
    """`cross_layer_interval`: IDEFICS puts a block before each layer whose index is a multiple of it, and
    builds `depth // interval` blocks, so the interval must divide the depth."""
    ids = fus.config.layer_ids(depth)
    interval = ids[1] - ids[0] if len(ids) > 1 else depth
    _fit(ids == list(range(0, depth, interval)) and depth % interval == 0,
         f"fusion `{fus.name}` with blocks before layers {ids} of {depth} (IDEFICS puts one before every N-th "
         "layer from 0, N dividing the depth)")
    return interval


def _cross(fus: Component, depth: int) -> dict[str, Any]:
    c = fus.config
    _fit(fus.kind == "cross_attention", f"fusion `{fus.name}` ({fus.kind})")
    refuse_unplaced(fus, _fit, _CROSS, _CROSS_FIXED)
    return {"cross_layer_interval": cross_interval(fus, depth), "qk_layer_norms": c.qk_norm,
            "alpha_type": "vector" if c.vector_gates else "float"}


def _special_ids(session: Session, vocab: int) -> dict[str, Any]:
    """BOS, EOS (the spec's stop ids) and pad. The pad id is the embedding's `padding_idx`, which must be
    one of its `vocab_size` rows; it changes no output, so a pad among the extra rows is written as none."""
    ids = special_token_ids(session)
    pad = ids.get("pad_token_id")
    ids["pad_token_id"] = pad if pad is not None and pad < vocab else None
    return ids


def idefics_config(session: Session) -> dict[str, Any]:
    """The `IdeficsConfig` fields of a spec-built model (E0586 for what it cannot hold). The freezing
    switches are written as IDEFICS' own defaults: they are transformers' training settings, and a spec
    says what trains in its stages."""
    ir = session.analysis.ir
    vis, con, lm, fus = _parts(ir)
    text = _text(lm)
    config = {"model_type": "idefics", "architectures": ["IdeficsForVisionText2Text"], **text,
              **_cross(fus, lm.config.depth), "use_resampler": con is not None, "dropout": 0.0,
              "use_cache": True, "vision_config": _vision(vis), "perceiver_config": _perceiver(con),
              "freeze_text_layers": True, "freeze_text_module_exceptions": [], "freeze_lm_head": False,
              "freeze_vision_layers": True, "freeze_vision_module_exceptions": []}
    if session.tokenizer is not None:
        config.update(_special_ids(session, text["vocab_size"]))
    return config


def processor_files(vis: Component) -> dict[str, dict[str, Any]]:
    """`preprocessor_config.json`: IdeficsImageProcessor's plain resize to the encoder's square size with
    its filter (its only way to fit an image), 1/255, the spec's mean and std; `processor_config.json`."""
    v = vis.config
    s = v.image_size
    image = {"image_processor_type": "IdeficsImageProcessor", "processor_class": "IdeficsProcessor",
             "image_size": s, "size": {"height": s, "width": s}, "image_num_channels": v.channels,
             "do_resize": True, "resample": _RESAMPLE_CODE[v.resize], "do_rescale": True, "rescale_factor": 1 / 255,
             "do_normalize": True, "image_mean": list(v.mean), "image_std": list(v.std), "do_convert_rgb": True}
    return {"preprocessor_config.json": image, "processor_config.json": {"processor_class": "IdeficsProcessor"}}


def _from_prompt(session: Session) -> str:
    """The template of a spec without one, for IdeficsProcessor to get split at each `<image>` (as the
    import's wrapper assumes): `prompt` with `<fake>{image}<fake>` -> one `<image>` per image part (the
    processor puts BOS in front and the fake tokens back). Its prompt must put each image as IdeficsProcessor does: BOS
    first (IdeficsProcessor's own), `<fake>{image}<fake>` once, and no spaces next to the image or at the
    ends, which the processor strips. (IdeficsProcessor puts the fake tokens only around an image, and one
    between adjacent images: a prompt with no image or several differs from the spec's `<fake>{image}<fake>`.)"""
    settings, bos = session.analysis.ir.settings, session.tokenizer.bos_token
    wrapped = FAKE + "{image}" + FAKE
    prompt = settings.prompt.removeprefix(bos) if not settings.system else settings.prompt
    what = f"prompt = {json.dumps(settings.prompt)} (IdeficsProcessor starts with BOS and puts each image as {wrapped})"
    _fit(prompt.count(wrapped) == 1 and prompt.count("{image}") == 1 and bos not in prompt, what)
    prompt = prompt.replace(wrapped, "{image}")
    _fit(all(p == p.strip(" ") for p in prompt.split("{image}")), what.replace("(", "(its pieces stripped of "
         "spaces; ", 1))
    _fit(not (settings.system or "").startswith(" "), "a `system` that starts with a space (IdeficsProcessor "
         "strips it)")
    return conversation_template("IdeficsProcessor adds BOS and the fake tokens around each image", PROMPT_TURN,
                                 {"PROMPT": prompt, "ANSWER": settings.answer, "IMAGE_TOKEN": "<image>"},
                                 system=settings.system)


def chat_template(session: Session) -> str:
    """`chat_template.jinja` for rendering, splitting at `<image>` and handing the pieces to IdeficsProcessor
    (which cannot take a rendered template itself): an imported spec's template with the import's layout
    taken off again (`processor_template`'s inverse), else one written from `prompt`, `answer`, `system`."""
    own = session.analysis.ir.settings.chat_template
    if own is None:
        return _from_prompt(session)
    body = own[len(_WRAP_HEAD):-len(_WRAP_TAIL)] if own.startswith(_WRAP_HEAD) and own.endswith(_WRAP_TAIL) else None
    _fit(body is not None, "a spec `chat_template` not wrapped in IdeficsProcessor's layout as `vlm import-hf` "
         "writes it (the processor adds BOS and the fake tokens itself)")
    return body  # type: ignore[return-value]


def _check_tokenizer(session: Session) -> None:
    """IdeficsProcessor starts each prompt with the BOS token and finds images by `<image>`."""
    tok = session.tokenizer
    _fit(bool(tok.bos_token), "a tokenizer without a BOS token (IdeficsProcessor starts every prompt with it)")
    image = tok.convert_tokens_to_ids("<image>")
    _fit(image == session.model.image_token_id, f"image token id {session.model.image_token_id} (the tokenizer's "
         f"`<image>`, which IdeficsProcessor uses, is {image})")


def write(session: Session) -> Export:
    """The IDEFICS checkpoint of an IDEFICS-shaped model, in the layout transformers saves
    (`model.vision_model.`, `model.perceiver_resampler.`, Llama's `model.*` / `lm_head` with the decoupled
    `additional_embedding` / `additional_fc`, `model.gated_cross_attn_layers.K.`)."""
    config = idefics_config(session)
    vis, con, lm, fus = _parts(session.analysis.ir)
    layouts = {vis.name: VISION_LAYOUT, lm.name: LANGUAGE_LAYOUT,
               fus.name: CrossLayout(((CROSS, "layers."),), interval=config["cross_layer_interval"])}
    if con is not None:
        layouts[con.name] = RESAMPLER_LAYOUT
    if session.tokenizer is None:  # no processor without a tokenizer: the exporter writes weights and config
        return Export(config, layouts)
    _check_tokenizer(session)
    return Export(config, layouts, processor_files(vis), chat_template=chat_template(session))


FORMAT = VLMFormat(
    model_types=("idefics",),
    family=MultiFamily("idefics", {
        "vision": Part("vision", (VISION_LAYOUT,), kinds=frozenset({"vit"})),
        "resampler": Part("connector", (RESAMPLER_LAYOUT,), kinds=frozenset({"perceiver"})),
        "language": Part("language", (LANGUAGE_LAYOUT,), kinds=frozenset({"llama"})),
        "cross_attention": Part("fusion", _cross_layouts(), kinds=frozenset({"cross_attention"})),
    }, {"vision": "vision", "connector": "resampler", "language": "language", "fusion": "cross_attention"}),
    components={"clip": "vision", "resampler": "resampler", "llm": "language", "cross_attention": "cross_attention"},
    read=read,
    claims=claims,
    write=write,
    hf_class="IdeficsForVisionText2Text",
    processor='`IdeficsProcessor`: `IdeficsImageProcessor` (plain resize)',
    chat_template="kept (rendered, then split at `<image>` as IDEFICS' processor takes it); exported",
)
