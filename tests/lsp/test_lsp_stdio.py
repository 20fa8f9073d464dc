"""`vlm lsp` driven over stdio as an editor drives it: initialize, didOpen, publishDiagnostics, didChange,
hover, completion, definition, references, formatting, documentSymbol, shutdown and exit.

Ranges are asserted exactly: LSP lines and characters are 0-based, so `vlm check --json`'s line 3,
column 37 is (2, 36). Positions in the library spec are found by searching its text, so the tests do
not break when a comment above them changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from diag_cases import CASES, spec
from lsp_client import ROOT, LspClient, uri
from typer.testing import CliRunner

from vlmspec.cli import app
from vlmspec.compiler.printer import format_text

SPEC = ROOT / "specs" / "llava-1.5-7b.vlm"
TEXT = SPEC.read_text(encoding="utf-8")
URI = uri(SPEC)

#: A quiet period long enough that the three changes of the debounce test land inside one.
DEBOUNCE_MS = 150


@pytest.fixture(scope="module")
def lsp():
    client = LspClient(env={"VLM_LSP_DEBOUNCE_MS": str(DEBOUNCE_MS)})
    client.initialize()
    client.open(URI, TEXT)
    assert client.diagnostics(URI, 1) == []
    yield client
    client.kill()


def pos(text: str, needle: str, nth: int = 0, delta: int = 0) -> dict:
    """The LSP position of the `nth` occurrence of `needle` in `text`, moved `delta` characters right."""
    at = -1
    for _ in range(nth + 1):
        at = text.index(needle, at + 1)
    at += delta
    return {"line": text.count("\n", 0, at), "character": at - (text.rfind("\n", 0, at) + 1)}


def rng(text: str, needle: str, nth: int = 0, delta: int = 0, length: int | None = None) -> dict:
    start = pos(text, needle, nth, delta)
    n = len(needle) - delta if length is None else length
    return {"start": start, "end": {"line": start["line"], "character": start["character"] + n}}


def vlm_check(path: Path) -> list[dict]:
    r = CliRunner().invoke(app, ["check", "--json", str(path)])
    return json.loads(r.output)["diagnostics"]


def as_check(d: dict) -> tuple:
    """An LSP diagnostic in `vlm check --json`'s terms: code, severity, message, 1-based range."""
    r = d["range"]
    return (d["code"], {1: "error", 2: "warning"}[d["severity"]], d["message"].split("\nhelp: ")[0].split("\nnote: ")[0],
            r["start"]["line"] + 1, r["start"]["character"] + 1, r["end"]["line"] + 1, r["end"]["character"] + 1)


# ---------------------------------------------------------------- session and diagnostics


def test_initialize_advertises_every_feature() -> None:
    client = LspClient()
    try:
        result = client.initialize()
        caps = result["capabilities"]
        assert result["serverInfo"]["name"] == "vlm-lsp"
        assert caps["textDocumentSync"]["change"] == 1  # full text on every change
        assert caps["positionEncoding"] == "utf-16"
        for provider in ("hoverProvider", "definitionProvider", "referencesProvider", "documentFormattingProvider",
                         "documentSymbolProvider"):
            assert caps[provider], provider
        assert set(caps["completionProvider"]["triggerCharacters"]) >= {".", "=", "("}
        # a request about a document it never saw, and a position past the end: empty answers, no crash
        assert client.at("textDocument/hover", "file:///nowhere.vlm", 0, 0) is None
        client.open("file:///nowhere.vlm", "model m {\n}\n")
        client.diagnostics("file:///nowhere.vlm")
        assert client.at("textDocument/hover", "file:///nowhere.vlm", 99, 99) is None
        assert client.at("textDocument/definition", "file:///nowhere.vlm", 1, 0) == []
        assert client.shutdown() == 0
        assert b"Traceback" not in b"".join(client.stderr)
    finally:
        client.kill()


@pytest.mark.parametrize("code", sorted(CASES))
def test_every_diagnostic_code_matches_vlm_check(lsp: LspClient, code: str, tmp_path: Path) -> None:
    """One spec per diagnostic code (tests/diag_cases.py): the server reports what `vlm check` reports."""
    path = tmp_path / f"{code}.vlm"
    path.write_text(CASES[code], encoding="utf-8")
    lsp.open(uri(path), CASES[code])
    got = lsp.diagnostics(uri(path), 1)
    expected = [(d["code"], d["severity"], d["message"], d["line"], d["col"], d["end_line"], d["end_col"])
                for d in vlm_check(path)]
    assert [as_check(d) for d in got] == expected
    assert code in [d["code"] for d in got]
    lsp.close_document(uri(path))
    assert lsp.diagnostics(uri(path)) == []


def test_broken_spec_exact_ranges_then_fixed_by_a_change(lsp: LspClient, tmp_path: Path) -> None:
    text = spec(connector="  connector proj = mlp(clip -> llm) { layer = 2 }\n",
                language="  language llm = llama { width = 48  depth = 2  heads = 0  ffn = 96  vocab = 512 }\n")
    doc = uri(tmp_path / "broken.vlm")
    lsp.open(doc, text)
    got = lsp.diagnostics(doc, 1)
    assert [(d["code"], d["severity"], d["range"]) for d in got] == [
        ("E0104", 1, {"start": {"line": 2, "character": 38}, "end": {"line": 2, "character": 43}}),
        ("E0202", 1, {"start": {"line": 3, "character": 56}, "end": {"line": 3, "character": 57}}),
    ]
    assert got[0]["message"] == "unknown attribute `layer` for connector `proj` (mlp)\nhelp: did you mean `layers`?"
    assert got[0]["source"] == "vlm"
    # three quick edits: one check, of the last text, published with its version
    fixed = spec()
    lsp.change(doc, text.replace("layer =", "layers ="), 2)
    lsp.change(doc, fixed.replace("heads = 4", "heads = 0"), 3)
    lsp.change(doc, fixed, 4)
    assert lsp.diagnostics(doc) == []
    assert not [n for n in lsp.notifications if n["params"].get("uri") == doc]  # versions 2 and 3: never checked


def test_warnings_are_warnings(lsp: LspClient, tmp_path: Path) -> None:
    path = tmp_path / "w.vlm"
    path.write_text(CASES["W0111"], encoding="utf-8")
    lsp.open(uri(path), CASES["W0111"])
    (d,) = lsp.diagnostics(uri(path), 1)
    assert (d["code"], d["severity"]) == ("W0111", 2)
    assert d["range"] == rng(CASES["W0111"], '"checkpoints/vicuna-tiny"')


def test_utf16_columns_after_an_emoji(lsp: LspClient, tmp_path: Path) -> None:
    """An emoji is one character to the compiler and two UTF-16 units to the editor."""
    text = spec(connector='  connector proj = mlp(clip -> llm)\n',
                stages='  stage align { train proj  freeze clip, llm  data "🙂.json"  batch 0 }\n')
    doc = uri(tmp_path / "emoji.vlm")
    lsp.open(doc, text)
    (d,) = lsp.diagnostics(doc, 1)
    line = text.split("\n")[5]
    col = line.index("batch 0") + len("batch ")
    assert d["code"] == "E0202"
    assert d["range"] == {"start": {"line": 5, "character": col + 1}, "end": {"line": 5, "character": col + 2}}


# ---------------------------------------------------------------- files reached through `import`


def test_import_of_a_broken_file(lsp: LspClient, tmp_path: Path) -> None:
    base = spec(connector="  connector proj = mlp(clip -> llm) { layers = 0 }\n").replace("model tiny", "model base")
    (tmp_path / "base.vlm").write_text(base, encoding="utf-8")
    main = 'import "base.vlm"\n\nmodel derived extends base {\n  llm { depth = 4 }\n}\n'
    (tmp_path / "main.vlm").write_text(main, encoding="utf-8")
    lsp.open(uri(tmp_path / "main.vlm"), main)
    on_base = lsp.diagnostics(uri(tmp_path / "base.vlm"))
    on_main = lsp.diagnostics(uri(tmp_path / "main.vlm"), 1)
    where = rng(base, "0 }", length=1)
    assert [(d["code"], d["range"]) for d in on_base] == [("E0202", where)]
    (site,) = on_main
    assert site["code"] == "E0202" and site["severity"] == 1
    assert site["range"] == {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 17}}
    assert site["message"].startswith("`base.vlm` has 1 error; the first, at line 3, column 48: `layers` input should be greater than or equal to 1 "
                                     "(got 0)")
    (related,) = site["relatedInformation"]
    assert related["location"] == {"uri": uri(tmp_path / "base.vlm"), "range": where}
    # what `vlm check main.vlm` reports, the server reports: the same diagnostic, on base.vlm
    (cli,) = vlm_check(tmp_path / "main.vlm")
    assert (cli["code"], cli["line"], cli["col"]) == ("E0202", where["start"]["line"] + 1, where["start"]["character"] + 1)

    # fix base.vlm in the editor and save it: both files clear
    fixed = base.replace("layers = 0", "layers = 2")
    lsp.open(uri(tmp_path / "base.vlm"), base)
    assert [d["code"] for d in lsp.diagnostics(uri(tmp_path / "base.vlm"), 1)] == ["E0202"]
    lsp.change(uri(tmp_path / "base.vlm"), fixed, 2)
    (tmp_path / "base.vlm").write_text(fixed, encoding="utf-8")
    lsp.notify("textDocument/didSave", {"textDocument": {"uri": uri(tmp_path / "base.vlm")}})
    assert lsp.diagnostics(uri(tmp_path / "main.vlm")) == []
    assert lsp.diagnostics(uri(tmp_path / "base.vlm")) == []

    # an import that is not there: E0106 at the import, as from `vlm check`
    missing = main.replace("base.vlm", "nope.vlm")
    lsp.change(uri(tmp_path / "main.vlm"), missing, 2)
    (d,) = lsp.diagnostics(uri(tmp_path / "main.vlm"), 2)
    assert (d["code"], d["range"]) == ("E0106", {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 17}})


def test_a_file_that_is_not_utf8(lsp: LspClient, tmp_path: Path) -> None:
    path = tmp_path / "latin1.vlm"
    data = spec(connector='  connector proj = mlp(clip -> llm) { act = gelu }  # caf\xe9\n').encode("latin-1")
    path.write_bytes(data)
    (cli,) = vlm_check(path)
    assert cli["code"] == "E0004"
    expected = {"start": {"line": cli["line"] - 1, "character": cli["col"] - 1},
                "end": {"line": cli["line"] - 1, "character": cli["col"]}}
    assert expected == {"start": {"line": 2, "character": 57}, "end": {"line": 2, "character": 58}}
    # an editor that shows the bad byte as U+FFFD
    lsp.open(uri(path), data.decode("utf-8", errors="replace"))
    (d,) = lsp.diagnostics(uri(path), 1)
    assert (d["code"], d["range"], d["message"].split("\n")[0]) == ("E0004", expected, cli["message"])
    # a client that passes the raw byte through (a lone surrogate in the JSON text)
    lsp.change(uri(path), data.decode("utf-8", errors="surrogateescape"), 2)
    (d,) = lsp.diagnostics(uri(path), 2)
    assert (d["code"], d["range"]) == ("E0004", expected)
    # hover, formatting and symbols answer, and do not touch the bad text
    assert lsp.request("textDocument/formatting", {"textDocument": {"uri": uri(path)},
                                                   "options": {"tabSize": 2, "insertSpaces": True}}) == []
    assert lsp.at("textDocument/hover", uri(path), 2, 12)["contents"]["value"].startswith("**connector `proj`**")


# ---------------------------------------------------------------- hover


def test_hover_on_a_component(lsp: LspClient) -> None:
    h = lsp.at("textDocument/hover", URI, **pos(TEXT, "  clip {", delta=3))  # the tiny model's override
    assert h["range"] == rng(TEXT, "  clip {", delta=2, length=4)
    value = h["contents"]["value"]
    assert h["contents"]["kind"] == "markdown"
    lines = value.split("\n")
    assert lines[0] == "**vision `clip`** = `vit`: CLIP-style ViT: class token, pre-LayerNorm, QuickGELU (CLIP " \
                       "ViT-L/14, OpenCLIP ViT-H/14)."
    assert lines[2] == "parameters: 25,472 (25.47K) · output: 64 x 32 (tokens x width per image) · declared in " \
                       "`llava_1_5_7b`"
    assert "image_size = 64" in lines  # overridden here
    assert "depth = 2" in lines
    assert "feature = layer(-2).patches               # inherited from llava_1_5_7b" in lines
    assert "channels = 3                              # default" in lines
    assert "act = quick_gelu                          # default" in lines


def test_hover_on_the_7b_language_model(lsp: LspClient) -> None:
    h = lsp.at("textDocument/hover", URI, **pos(TEXT, "language llm", delta=9))
    lines = h["contents"]["value"].split("\n")
    assert lines[2] == "parameters: 6,738,415,616 (6.74B) · output: 32000 logits per token"
    assert lines[4:10] == ["```vlm", "width = 4096", "depth = 32", "heads = 32", "kv_heads = 32           # default",
                           "head_dim = 128          # default"]
    assert "rope_theta = 10000.0    # default" in lines and "norm_eps = 1e-05" in lines


def test_hover_on_a_stage(lsp: LspClient) -> None:
    h = lsp.at("textDocument/hover", URI, **pos(TEXT, "stage instruct", delta=7))
    assert h["range"] == rng(TEXT, "stage instruct", delta=6)
    assert h["contents"]["value"].split("\n\n") == [
        "**stage `instruct`** of `llava_1_5_7b`",
        "trains: `proj` (20.98M), `llm` (6.74B)",
        "freezes: `clip`",
        "trainable parameters: 6,759,395,328 (6.76B)",
        "optim `adamw(lr = 2e-05)` · batch 128 · precision bf16",
        "memory plan: weights 26.31 GiB + gradients 25.18 GiB + optimizer 50.36 GiB + activations 875.65 GiB = "
        "977.51 GiB (one process; activations of a micro-batch of 128 x 1,088 tokens)",
    ]


def test_hover_on_attributes(lsp: LspClient) -> None:
    h = lsp.at("textDocument/hover", URI, **pos(TEXT, "ffn = 11008", delta=1))
    assert h["range"] == rng(TEXT, "ffn = 11008", length=3)
    assert h["contents"]["value"] == ("**`ffn`** (`llama` language attribute): feed-forward hidden size\n\n"
                                      "type: int · range: > 0 · default: `11008` · here: `11008`")
    h = lsp.at("textDocument/hover", URI, **pos(TEXT, "warmup = 0.1", delta=2))
    assert h["contents"]["value"] == ("**`warmup`** (stage attribute): fraction of steps spent warming up\n\n"
                                      "type: float · range: >= 0, <= 1 · default: `0.03` · here: `0.1`")
    h = lsp.at("textDocument/hover", URI, **pos(TEXT, "prompt =", delta=1))
    assert h["contents"]["value"].startswith("**`prompt`** (model setting): prompt template;")


# ---------------------------------------------------------------- completion


def _complete(lsp: LspClient, tmp_path: Path, text: str, version: int = 1) -> list[dict]:
    at = text.index("|")
    text = text.replace("|", "", 1)
    doc = uri(tmp_path / "typing.vlm")
    lsp.open(doc, text)
    lsp.diagnostics(doc, 1)
    line, col = text.count("\n", 0, at), at - (text.rfind("\n", 0, at) + 1)
    result = lsp.at("textDocument/completion", doc, line, col)
    lsp.close_document(doc)
    lsp.diagnostics(doc)
    return result["items"]


def test_completion_kinds_for_a_role(lsp: LspClient, tmp_path: Path) -> None:
    items = _complete(lsp, tmp_path, "model m {\n  connector proj = m|\n}\n")
    from vlmspec.compiler.schema import REGISTRY

    assert [i["label"] for i in items] == REGISTRY.kinds("connector")  # every connector kind, sorted
    mlp = next(i for i in items if i["label"] == "mlp")
    assert mlp["textEdit"] == {"range": {"start": {"line": 1, "character": 19}, "end": {"line": 1, "character": 20}},
                               "newText": "mlp"}
    assert mlp["detail"] == "connector kind"


def test_completion_attributes_for_a_kind_and_enum_values(lsp: LspClient, tmp_path: Path) -> None:
    items = _complete(lsp, tmp_path, "model m {\n  language llm = llama {\n    |\n  }\n}\n")
    labels = [i["label"] for i in items]
    assert labels[:4] == ["width", "depth", "heads", "kv_heads"] and "moe" in labels and "qkv_bias" in labels
    width = items[0]
    assert width["detail"] == "int, default 4096"
    assert width["documentation"]["value"] == "hidden size\n\n`llama` attribute"
    assert width["textEdit"]["newText"] == "width = "
    values = _complete(lsp, tmp_path, "model m {\n  language llm = llama { act = | }\n}\n")
    assert [i["label"] for i in values] == ["silu", "gelu", "gelu_tanh"]
    nested = _complete(lsp, tmp_path, "model m {\n  language llm = llama { moe { t| } }\n}\n")
    assert "top_k" in [i["label"] for i in nested]


def test_completion_names_in_flows_and_stage_paths(lsp: LspClient, tmp_path: Path) -> None:
    head = "model m {\n  vision clip = vit\n  language llm = llama\n"
    sources = _complete(lsp, tmp_path, head + "  connector proj = mlp(|)\n}\n")
    assert [i["label"] for i in sources] == ["clip"]
    targets = _complete(lsp, tmp_path, head + "  connector proj = mlp(clip -> |)\n}\n")
    assert [i["label"] for i in targets] == ["llm"]  # not `proj` itself
    paths = _complete(lsp, tmp_path, head + "  stage a { train llm.a| }\n}\n")
    assert [i["label"] for i in paths] == ["llm.embed", "llm.layers", "llm.attn", "llm.mlp", "llm.norm", "llm.head"]
    attn = paths[2]
    assert attn["textEdit"] == {"range": {"start": {"line": 3, "character": 18}, "end": {"line": 3, "character": 23}},
                                "newText": "llm.attn"}
    statements = _complete(lsp, tmp_path, head + "  stage a { train llm  | }\n}\n")
    assert {"freeze", "lora", "optim", "batch", "warmup"} <= {i["label"] for i in statements}


# ---------------------------------------------------------------- definition and references


def test_definition_of_components_and_extends(lsp: LspClient) -> None:
    decl = rng(TEXT, "vision clip", delta=7)
    (loc,) = lsp.at("textDocument/definition", URI, **pos(TEXT, "  clip {", delta=2))
    assert loc == {"uri": URI, "range": decl}
    (loc,) = lsp.at("textDocument/definition", URI, **pos(TEXT, "freeze clip", 1, delta=8))
    assert loc == {"uri": URI, "range": decl}
    (loc,) = lsp.at("textDocument/definition", URI, **pos(TEXT, "extends llava_1_5_7b", delta=10))
    assert loc == {"uri": URI, "range": rng(TEXT, "model llava_1_5_7b ", delta=6, length=12)}


def test_references_of_a_component(lsp: LspClient) -> None:
    refs = lsp.at("textDocument/references", URI, **pos(TEXT, "language llm", delta=10),
                  context={"includeDeclaration": True})
    lines = [(r["range"]["start"]["line"], r["range"]["start"]["character"]) for r in refs]
    expected = [rng(TEXT, "language llm", delta=9)["start"], rng(TEXT, "clip -> llm", delta=8)["start"],
                rng(TEXT, "proj -> llm", delta=8)["start"], rng(TEXT, "freeze clip, llm", delta=13)["start"],
                rng(TEXT, "train proj, llm", delta=12)["start"], rng(TEXT, "  llm {", delta=2)["start"],
                rng(TEXT, "freeze clip, llm", 1, delta=13)["start"], rng(TEXT, "train proj, llm, clip", delta=12)["start"]]
    assert lines == sorted((p["line"], p["character"]) for p in expected)
    assert all(r["uri"] == URI and r["range"]["end"]["character"] == r["range"]["start"]["character"] + 3 for r in refs)
    without = lsp.at("textDocument/references", URI, **pos(TEXT, "language llm", delta=10),
                     context={"includeDeclaration": False})
    assert len(without) == len(refs) - 1


def test_definition_into_an_imported_file(lsp: LspClient, tmp_path: Path) -> None:
    base = spec().replace("model tiny", "model base")
    (tmp_path / "base.vlm").write_text(base, encoding="utf-8")
    main = 'import "base.vlm"\nmodel derived extends base {\n  llm { depth = 4 }\n}\n'
    doc = uri(tmp_path / "main.vlm")
    lsp.open(doc, main)
    assert lsp.diagnostics(doc, 1) == []
    (loc,) = lsp.at("textDocument/definition", doc, 2, 3)
    assert loc == {"uri": uri(tmp_path / "base.vlm"), "range": rng(base, "language llm", delta=9)}
    (loc,) = lsp.at("textDocument/definition", doc, 1, 24)
    assert loc == {"uri": uri(tmp_path / "base.vlm"), "range": rng(base, "model base", delta=6)}
    (loc,) = lsp.at("textDocument/definition", doc, 0, 10)
    assert loc["uri"] == uri(tmp_path / "base.vlm")
    h = lsp.at("textDocument/hover", doc, 2, 3)["contents"]["value"].split("\n")
    assert "depth = 4" in h and "width = 48              # inherited from base" in h
    refs = lsp.at("textDocument/references", doc, 2, 3, context={"includeDeclaration": True})
    assert [(r["uri"], r["range"]["start"]["line"]) for r in refs] == [
        (uri(tmp_path / "main.vlm"), 2), *[(uri(tmp_path / "base.vlm"), n) for n in (2, 3, 4, 5)]]


# ---------------------------------------------------------------- formatting, symbols, shutdown


def test_formatting_is_vlm_fmt(lsp: LspClient, tmp_path: Path) -> None:
    messy = "model m   {\nvision clip=vit{width=32}\n  language llm = llama\n\n\n\n}"
    doc = uri(tmp_path / "messy.vlm")
    lsp.open(doc, messy)
    (edit,) = lsp.request("textDocument/formatting", {"textDocument": {"uri": doc},
                                                      "options": {"tabSize": 2, "insertSpaces": True}})
    assert edit == {"range": {"start": {"line": 0, "character": 0}, "end": {"line": 6, "character": 1}},
                    "newText": format_text(messy)}
    assert edit["newText"] == "model m {\n  vision clip = vit {\n    width = 32\n  }\n  language llm = llama\n}\n"
    lsp.change(doc, edit["newText"], 2)
    assert lsp.request("textDocument/formatting", {"textDocument": {"uri": doc},
                                                   "options": {"tabSize": 2, "insertSpaces": True}}) == []


def test_document_symbols(lsp: LspClient) -> None:
    symbols = lsp.request("textDocument/documentSymbol", {"textDocument": {"uri": URI}})
    assert [(s["name"], s["detail"]) for s in symbols] == [("llava_1_5_7b", "model"),
                                                           ("llava_1_5_7b_tiny", "extends llava_1_5_7b")]
    big, tiny = symbols
    assert [(c["name"], c["detail"]) for c in big["children"]] == [
        ("clip", "vision vit"), ("proj", "connector mlp"), ("llm", "language llama"), ("prefix", "fusion prefix"),
        ("align", "stage"), ("instruct", "stage")]
    assert [c["name"] for c in tiny["children"]] == ["clip", "llm", "prefix", "align", "instruct"]
    assert big["selectionRange"] == rng(TEXT, "model llava_1_5_7b ", delta=6, length=12)
    assert big["range"]["start"] == pos(TEXT, "model llava_1_5_7b ")


def test_the_server_never_imports_torch() -> None:
    """The front end is all `vlm lsp` needs: importing the server costs no torch or transformers."""
    code = "import sys, vlmspec.cli, vlmspec.lsp.server; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
