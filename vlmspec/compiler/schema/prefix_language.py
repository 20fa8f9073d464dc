"""What the language kinds that are not decoder-only transformers share (`mamba`, `t5`).

Such a model hosts only the fusion that puts image tokens into its input sequence (`prefix`): the other
styles reach into attention or FFN weights of a decoder-only model's layers, which it does not have. Each
kind says why in its own words and reports with its own codes; the rule itself lives here once, as do the
fields every language model has (where its weights and tokenizer are, its dtype) and the answers shared
code asks of any language kind (no extra vocabulary rows, no experts).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from vlmspec.compiler.schema.base import ComponentSchema, Dtype, Quantize, ShapeContext

#: fusion kinds these models can host: the image tokens go into the input sequence
HOSTED_FUSIONS = ("prefix",)


class PrefixOnlyLanguage(ComponentSchema):
    """A language model that hosts only `prefix` fusion; subclasses set the ClassVars below."""

    role = "language"
    checkpointable = True
    #: packing keeps samples apart with an attention mask over one sequence (compiler/packing.py)
    masks_attention: ClassVar[bool] = False
    #: why packed samples cannot stay apart in it (E0235)
    unpackable: ClassVar[str] = ""
    #: (code for a fusion style it cannot host, code for a bidirectional prefix)
    fusion_codes: ClassVar[tuple[str, str]] = ("", "")
    #: fusion kind -> what that style does that this model has no place for
    cannot_host: ClassVar[dict[str, str]] = {}
    #: the reason a style not in `cannot_host` fails, the sentence after it, and the hint
    default_need: ClassVar[str] = ""
    lacks: ClassVar[str] = ""
    host_help: ClassVar[str] = ""
    #: why a bidirectional prefix cannot be honoured (continuing "a `kind` language model"), and its hint
    no_bidirectional: ClassVar[str] = ""
    bidirectional_help: ClassVar[str] = ""

    weights: str | None = Field(default=None, description="local checkpoint folder to load this model from")
    tokenizer: str | None = Field(default=None, description="local tokenizer folder (default: the weights folder)")
    dtype: Dtype = Field(default="fp32", description="parameter dtype")
    quantize: Quantize = Field(default="none", description="weight-only quantization at load time")

    # --- what shared code reads of every language kind (none of these exist here)
    @property
    def extra_vocab(self) -> int:
        return 0

    @property
    def embed_extra(self) -> int:
        return 0

    @property
    def moe(self) -> None:
        return None

    def hosts_fusion(self, ctx: ShapeContext, fusion: ComponentSchema) -> bool:
        """Whether `fusion` (the fusion component `ctx.name`'s schema) can extend this model: the kind's first
        code at the fusion when its style cannot, the second at its attribute when the style can but the
        setting cannot."""
        style_code, prefix_code = self.fusion_codes
        kind = type(fusion).kind
        if kind in HOSTED_FUSIONS:
            if getattr(fusion, "prefix_attention", "causal") != "causal":
                ctx.sink.error(prefix_code, f"fusion `{ctx.name}` asks for a bidirectional prefix, but a `{self.kind}` "
                               f"language model{self.no_bidirectional}", ctx.span_of("prefix_attention"),
                               help=self.bidirectional_help)
                return False
            return True
        what = self.cannot_host.get(kind, self.default_need)
        ctx.sink.error(style_code, f"a `{kind}` fusion cannot extend a {self.kind_phrase} language model: it {what}, "
                       f"{self.lacks}", ctx.span_of(""), help=self.host_help)
        return False

    @property
    def kind_phrase(self) -> str:
        return f"`{self.kind}`"
