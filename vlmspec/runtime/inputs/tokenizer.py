"""Tokenizers from local folders, and a tiny byte-level BPE trained in-process (for demos and tests).

Nothing here touches a hub: a tokenizer is a folder on disk (`tokenizer.json` + config), loaded with
`PreTrainedTokenizerFast`, or one we train from text in ~50 ms.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from vlmspec.diagnostics import user_error

SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
IMAGE_TOKEN = "<image>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, extra_special: Iterable[str] = (IMAGE_TOKEN,)):
    """Train a byte-level BPE on `texts` with the special tokens every vlmspec model needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIALS.values(), *[t for t in extra_special if t not in SPECIALS.values()]]
    tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in SPECIALS.values()]})
    return fast


def byte_tokenizer(extra_special: Iterable[str] = (IMAGE_TOKEN,)):
    """A byte-level tokenizer with no merges: every UTF-8 byte is a token, so any text reads, in 256 rows
    plus the special tokens. What a spec that names no tokenizer is built with, so that its model folder
    can always read prompts."""
    return train_tokenizer([], 0, extra_special)


def load_tokenizer(path: str | Path, *, plain: bool = False):
    """A tokenizer saved with `save_pretrained` (or any HF tokenizer folder), offline, with a pad token.
    `plain` leaves it as saved: a Q-Former's BERT tokenizer reads instructions, not prompts. The image
    placeholders a spec needs are added by `ensure_special_tokens` (a checkpoint whose placeholder is its own,
    InternVL's `<IMG_CONTEXT>`, gets no `<image>` it would have no row for)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise user_error("E0510", f"no tokenizer in {p}", help="a tokenizer folder holds tokenizer.json "
                         "(save one with `tokenizer.save_pretrained(DIR)`)")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise user_error("E0510", f"cannot load the tokenizer in {p}: {e}") from None
    if plain:
        return tok
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def ensure_special_tokens(tok, analysis):
    """Add the spec's image placeholder(s) and task tokens the tokenizer lacks, as LLaVA adds `<image>`.

    The language model must have room for them: the tokenizer may not outgrow `vocab + extra_vocab + embed_extra`.
    """
    wanted = [f.config.image_token for f in analysis.ir.by_role("fusion") if hasattr(f.config, "image_token")]
    wanted += list(analysis.ir.settings.task_tokens)  # (a contrastive fusion has no placeholder)
    wanted += [t for v in analysis.ir.by_role("vision") for t in getattr(v.config, "row_tokens", ())]  # Pixtral's
    missing = [t for t in dict.fromkeys(wanted) if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    lm = analysis.ir.language.config if analysis.ir.language else None
    if lm is not None and len(tok) > lm.vocab + lm.extra_vocab + lm.embed_extra:
        raise user_error("E0512", f"the tokenizer has {len(tok)} tokens but `{analysis.ir.language.name}` has "
                         f"vocab = {lm.vocab}", help="use a matching tokenizer or raise `vocab`")
    return tok
