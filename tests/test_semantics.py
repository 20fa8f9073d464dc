"""What the language means: extends and overrides, references, merging encoders, chaining connectors, stages."""

from __future__ import annotations

from vlmspec.compiler.compile import check_file
from vlmspec.compiler.summary import summarise

BASE = """
model base {
  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2 }
  connector proj = mlp(clip -> llm) { layers = 2  hidden = llm.width * 2 }
  language llm = llama { width = 48  depth = 2  heads = 4  ffn = llm.width * 2  vocab = 512  max_positions = 256 }
  fusion prefix(proj -> llm)
  stage align { train proj  freeze clip, llm  optim adamw(lr = 1e-3)  batch 4 }
  stage instruct extends align { train llm  optim adamw(lr = 2e-5) }
}
"""


def analyse(text: str, name: str | None = None):
    r = check_file("t.vlm", name, text=text)
    assert r.ok, [(d.code, d.message) for d in r.diagnostics]
    return {a.ir.name: a for a in r.analyses}


def test_references_and_arithmetic() -> None:
    a = analyse(BASE)["base"]
    assert a.ir.components["llm"].config.ffn == 96
    assert a.ir.components["proj"].config.hidden == 96


def test_stage_extends_moves_parts_between_frozen_and_trained() -> None:
    a = analyse(BASE)["base"]
    instruct = a.ir.stages[1]
    assert [t.path for t in instruct.train] == ["proj", "llm"] and instruct.freeze == ["clip"]
    assert instruct.optim.lr == 2e-5 and instruct.batch == 4  # inherited
    plan = a.plans[1]
    assert plan.status == {"clip": "frozen", "proj": "trained", "llm": "trained", "prefix": "empty"}


def test_override_merges_and_new_component_replaces() -> None:
    text = BASE + """
model derived extends base {
  clip { depth = 3 }
  connector proj = linear(clip -> llm)
  stage align { train proj  freeze clip, llm  batch 8 }
}
"""
    d = analyse(text)["derived"]
    assert d.ir.components["clip"].config.depth == 3
    assert d.ir.components["clip"].config.width == 32  # kept from the base
    assert d.ir.components["proj"].kind == "linear"
    assert d.ir.lineage == ["derived", "base"]
    assert d.ir.stages[0].batch == 8 and d.ir.stages[1].name == "instruct"


def test_several_encoders_and_chained_connectors() -> None:
    text = """
model m {
  vision siglip = siglip { image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2 }
  vision sam = vit { image_size = 32  patch_size = 8  width = 16  depth = 1  heads = 2  feature = layer(-1).patches }
  connector qf = mlp(siglip + sam -> lin) { merge = concat  out = 40 }
  connector lin = linear(qf -> llm)
  language llm = llama { width = 64  depth = 2  heads = 4  ffn = 128  vocab = 512 }
  fusion prefix(lin -> llm)
  stage s { train qf, lin  freeze siglip, sam, llm }
}
"""
    a = analyse(text)["m"]
    assert str(a.shapes.out["qf"]) == "16 x 40"
    assert str(a.shapes.out["lin"]) == "16 x 64"
    assert a.shapes.params["qf"]["mlp"] == (48 * 40 + 40) + (40 * 40 + 40)
    assert list(a.graph.topological_order())[-1] == "llm"
    nx_graph = a.graph.to_networkx()
    assert set(nx_graph.successors("qf")) == {"lin"}


def test_token_counts_after_merging_and_resampling() -> None:
    text = """
model m {
  vision vit = vit { image_size = 64  patch_size = 8  width = 32  depth = 1  heads = 2 }
  connector merger = patch_merger(vit -> llm) { merge = 2 }
  language llm = llama { width = 64  depth = 4  heads = 4  ffn = 128  vocab = 512 }
  fusion prefix(merger -> llm) { tokens = 16 }
  stage s { train merger  freeze vit, llm }
}
"""
    a = analyse(text)["m"]
    assert a.shapes.out["merger"].tokens == 16  # 8x8 patches -> 4x4


def test_lora_and_partial_training_counts() -> None:
    text = BASE.replace("stage instruct extends align { train llm  optim adamw(lr = 2e-5) }",
                        "stage lora extends align { lora llm(rank = 4, targets = [attn.q, attn.v]) }\n"
                        "  stage embed extends align { train llm.embed }")
    a = analyse(text)["base"]
    s = {st["name"]: st for st in summarise(a)["stages"]}
    # rank x (in + out) per wrapped linear per layer: q and v are 48 -> 48 here
    assert s["lora"]["params"]["lora"] == 2 * 2 * 4 * (48 + 48)
    assert s["embed"]["params"]["trainable"] == a.shapes.total("proj") + 512 * 48
    assert s["embed"]["status"]["llm"] == "partial"


def test_a_whole_float_is_an_integer_a_quoted_number_is_not() -> None:
    a = analyse(BASE.replace("vocab = 512", "vocab = 5.12e2"))["base"]
    cfg = a.ir.components["llm"].config
    assert cfg.vocab == 512 and isinstance(cfg.vocab, int)
    text = BASE.replace("heads = 4", 'heads = "4"')
    r = check_file("t.vlm", None, text=text)
    (d,) = [d for d in r.diagnostics if d.severity == "error"]
    line = next(i for i, x in enumerate(text.splitlines(), 1) if '"4"' in x)
    where = (line, text.splitlines()[line - 1].index('"4"') + 1)
    assert d.code == "E0201" and (d.span.line, d.span.col) == where and "without quotes" in (d.help or "")


def test_a_list_element_with_too_few_values_is_malformed_not_missing() -> None:
    """`pinpoints = [[32]]` lacks a width: E0201 at the value with the field's description, not E0210
    (which says a required attribute was never written)."""
    text = BASE.replace("heads = 2 }", "heads = 2  layout = anyres(pinpoints = [[32]]) }", 1)
    assert text != BASE
    r = check_file("t.vlm", None, text=text)
    (d,) = [d for d in r.diagnostics if d.severity == "error"]
    assert d.code == "E0201" and "`layout.pinpoints`: too few values" in d.message
    assert "[height, width]" in (d.help or "")


def test_none_unsets_what_a_model_inherits() -> None:
    text = BASE.replace("max_positions = 256", 'max_positions = 256  tokenizer = "tok"') + \
        "model scratch extends base {\n  llm { tokenizer = none }\n}\n"
    models = analyse(text)
    assert models["base"].ir.components["llm"].config.tokenizer == "tok"
    assert models["scratch"].ir.components["llm"].config.tokenizer is None
    # where `none` is one of a field's own values it keeps that meaning
    q = analyse(BASE.replace("max_positions = 256", "max_positions = 256  quantize = none"))["base"]
    assert q.ir.components["llm"].config.quantize == "none"


def test_a_model_name_written_as_a_kind_says_how_to_write_it() -> None:
    r = check_file("t.vlm", None, text=BASE.replace("llm = llama", "llm = qwen2"))
    d = r.diagnostics[0]  # (references to the missing `llm` follow)
    assert d.code == "E0105" and "`llama` with `qkv_bias = true`" in (d.help or "")
    r = check_file("t.vlm", None, text=BASE.replace("clip = vit", "clip = clip"))
    assert r.diagnostics[0].code == "E0105" and "is a `vit`" in (r.diagnostics[0].help or "")
