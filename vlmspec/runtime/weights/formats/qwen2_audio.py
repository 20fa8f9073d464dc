"""Qwen2-Audio (`Qwen2AudioForConditionalGeneration`): Whisper's encoder with a stride-2 average pool before
its final LayerNorm (`audio_tower.`), one linear projection (`multi_modal_projector.linear`), a Qwen2 text
model (`language_model.model.`, `language_model.lm_head.`), prefix fusion at `<|AUDIO|>` placeholders.

The encoder's parameter names are Whisper's in the runtime too, so each part maps by prefix alone. The log-mel
front end comes from `preprocessor_config.json` (WhisperFeatureExtractor: `feature_size`, `sampling_rate`,
`hop_length`, `n_fft`, `chunk_length`) where the folder has one; its clip length must be the one the encoder's
`max_source_positions` was learned for, or the features could not go through it.

Export (`vlm export-hf`) writes a spec of that shape back (config, weights, the feature extractor's file).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import LLAVA_LM, Export, VLMFormat, does_not_fit, refuse_unplaced
from vlmspec.runtime.weights.formats.llava import text_config
from vlmspec.runtime.weights.hf_folder import read_json
from vlmspec.runtime.weights.spec_text import fields, language_block, need, tie

if TYPE_CHECKING:
    from pathlib import Path

    from vlmspec.compiler.ir import ModelIR
    from vlmspec.runtime.session import Session

AUDIO_TOKEN = "<|AUDIO|>"
_HINT = ("Qwen2-Audio is one `whisper` audio encoder with `pool = 2`, a biased `linear` connector, a Qwen2 `llama` "
         "(`qkv_bias = true`) and a causal `prefix` fusion")


def _front_end(folder: str | Path) -> dict[str, Any]:
    from pathlib import Path

    pre = read_json(Path(folder) / "preprocessor_config.json")
    if not pre:
        nested = read_json(Path(folder) / "processor_config.json").get("feature_extractor")
        pre = nested if isinstance(nested, dict) else {}
    return pre


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    ac, tc = config["audio_config"], config["text_config"]
    need(ac.get("activation_function", "gelu") == "gelu", f"audio activation {ac.get('activation_function')}")
    need(not ac.get("scale_embedding", False), "an audio encoder with `scale_embedding` (embeddings x sqrt(width))")
    positions = int(ac.get("max_source_positions", 1500))
    pre = _front_end(folder)
    rate, hop = int(pre.get("sampling_rate", 16000)), int(pre.get("hop_length", 160))
    frames = positions * 2
    need(frames * hop % rate == 0, f"an encoder of {positions} positions at hop {hop}: not a whole number of seconds")
    seconds = frames * hop // rate
    need(int(pre.get("chunk_length", seconds)) == seconds, f"feature extractor clips of {pre.get('chunk_length')} s "
         f"for an encoder learned on {seconds} s")
    mels = int(ac.get("num_mel_bins", 128))
    need(int(pre.get("feature_size", mels)) == mels, f"feature extractor with {pre.get('feature_size')} mels for an "
         f"encoder of {mels}")
    audio = [("mels", mels), ("width", ac.get("d_model", 1280)), ("depth", ac.get("encoder_layers", 32)),
             ("heads", ac.get("encoder_attention_heads", 20)), ("mlp", ac.get("encoder_ffn_dim", 5120)),
             ("pool", 2), ("seconds", seconds), ("sample_rate", rate), ("hop", hop),
             ("n_fft", int(pre.get("n_fft", 400))), ("weights", f"{folder}#audio")]
    proj = fields([("weights", f"{folder}#projector")])
    return [
        f"  audio enc = whisper {{\n{fields(audio)}\n  }}",
        f"  connector proj = linear(enc -> llm) {{\n{proj}\n  }}",
        language_block(tc, f"{folder}#language", tie(config, tc)),
        f"  fusion prefix(proj -> llm) {{\n{fields([('image_token', AUDIO_TOKEN)])}\n  }}",
    ], int(config.get("audio_token_index", config.get("audio_token_id", 151646)))


# ------------------------------------------------------------------ export


def claims(ir: ModelIR) -> bool:
    """A model with an audio encoder is Qwen2-Audio's to export (what does not fit is said by `write`)."""
    return bool(ir.by_role("audio"))


def _fit(cond: bool, what: str) -> None:
    does_not_fit(cond, "Qwen2-Audio", what, _HINT)


def write(session: Session) -> Export:
    ir = session.analysis.ir
    audio, cons, fus, lm = ir.by_role("audio"), ir.by_role("connector"), ir.by_role("fusion"), ir.language
    _fit(len(audio) == 1 and len(cons) == 1 and len(fus) == 1 and lm is not None,
         "a model with other than one audio encoder, connector, LM and fusion")
    enc, con, f = audio[0], cons[0], fus[0]
    a, c, t = enc.config, con.config, lm.config
    refuse_unplaced(enc, _fit, {"mels", "width", "depth", "heads", "mlp", "seconds", "sample_rate", "hop", "n_fft",
                                "weights", "dtype"}, {"pool": 2})
    _fit(con.kind == "linear" and c.bias and c.group == 1 and list(con.sources) == [enc.name],
         f"connector `{con.name}` ({con.kind})")
    _fit(lm.kind == "llama" and t.qkv_bias and t.moe is None and not t.extra_vocab and t.rope == "default"
         and t.act == "silu" and not t.embed_extra, f"language model `{lm.name}` ({lm.kind})")
    _fit(f.kind == "prefix" and f.config.prefix_attention == "causal", f"fusion `{f.name}` ({f.kind})")
    _fit(a.frames == 2 * a.positions, f"audio `{enc.name}` with an odd number of frames ({a.frames})")
    config = {
        "model_type": "qwen2_audio", "architectures": ["Qwen2AudioForConditionalGeneration"],
        "audio_config": {"model_type": "qwen2_audio_encoder", "num_mel_bins": a.mels, "d_model": a.width,
                         "encoder_layers": a.depth, "encoder_attention_heads": a.heads,
                         "encoder_ffn_dim": a.mlp_dim, "max_source_positions": a.positions,
                         "activation_function": "gelu", "scale_embedding": False},
        "text_config": text_config(t), "audio_token_index": int(session.model.image_token_id),
        "tie_word_embeddings": t.tie_embeddings,
    }
    extractor = {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": a.mels,
                 "sampling_rate": a.sample_rate, "hop_length": a.hop, "chunk_length": a.seconds, "n_fft": a.n_fft,
                 "n_samples": a.seconds * a.sample_rate, "nb_max_frames": a.frames, "padding_side": "right",
                 "padding_value": 0.0, "return_attention_mask": True, "processor_class": "Qwen2AudioProcessor"}
    return Export(config, {enc.name: lay(("audio_tower.", "")), con.name: lay(("multi_modal_projector.", "")),
                           lm.name: LLAVA_LM[0]}, {"preprocessor_config.json": extractor})


FORMAT = VLMFormat(
    model_types=("qwen2_audio",),
    family=MultiFamily("qwen2_audio", {
        "audio": Part("audio", (lay(("model.audio_tower.", "")), lay(("audio_tower.", ""))),
                      kinds=frozenset({"whisper"})),
        "projector": Part("connector", (lay(("model.multi_modal_projector.", "")),
                                        lay(("multi_modal_projector.", ""))), kinds=frozenset({"linear"})),
        "language": Part("language", LLAVA_LM, sub_config="text_config"),
    }, {"audio": "audio", "connector": "projector", "language": "language"}),
    components={"enc": "audio", "proj": "projector", "llm": "language"},
    read=read,
    claims=claims,
    write=write,
    hf_class="Qwen2AudioForConditionalGeneration",
    processor="`Qwen2AudioProcessor`: `WhisperFeatureExtractor` (log-mel, each clip padded to `seconds`), one "
              "`<|AUDIO|>` per audio token",
    chat_template="kept (the spec's `chat_template`), or translated into `prompt` / `answer` / `system` where exact; exported",
)
