"""Whatever the input, the front end answers with typed diagnostics, never a traceback."""

from __future__ import annotations

from diag_cases import CASES, spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmspec.compiler.compile import check_file
from vlmspec.compiler.printer import format_text
from vlmspec.diagnostics import Diagnostic, VlmSpecError, render_all

SEEDS = [spec(), *CASES.values()]
TOKENS = ["model", "m", "extends", "{", "}", "vision", "connector", "language", "fusion", "clip", "=", "vit",
          "mlp", "llama", "prefix", "(", ")", "->", "+", "-", "*", "/", "stage", "train", "freeze", "lora",
          "optim", "adamw", "lr", "1e-3", "2", "0", "-1", '"s"', "[", "]", ",", ".", "true", "upcycle", "batch",
          "objective", "itc", "layer", "patches", "import", "#c\n", "\n", "width", "heads", "llm.width", "moe"]


def _run(text: str) -> None:
    result = check_file("fuzz.vlm", text=text)
    for d in result.diagnostics:
        assert isinstance(d, Diagnostic) and d.code[0] in "EW"
    render_all(result.diagnostics, result.sources)
    try:
        format_text(text, "fuzz.vlm")
    except VlmSpecError as e:
        assert e.diagnostics


@st.composite
def mutated(draw) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["delete", "insert", "replace", "token", "swap"]))
        i = draw(st.integers(0, max(0, len(text) - 1)))
        j = min(len(text), i + draw(st.integers(1, 12)))
        if op == "delete":
            text = text[:i] + text[j:]
        elif op == "insert":
            text = text[:i] + draw(st.text(max_size=6)) + text[i:]
        elif op == "replace":
            text = text[:i] + draw(st.sampled_from("{}()=->.,+*#\"[]0123456789abcxyz \n\t")) + text[i + 1:]
        elif op == "token":
            text = text[:i] + " " + draw(st.sampled_from(TOKENS)) + " " + text[i:]
        else:
            text = text[i:j] + text[:i] + text[j:]
    return text


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(mutated())
def test_mutated_specs_never_traceback(text: str) -> None:
    _run(text)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(" ".join))
def test_token_soup_never_tracebacks(text: str) -> None:
    _run(text)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.text(max_size=200))
def test_random_text_never_tracebacks(text: str) -> None:
    _run(text)


# ---------------------------------------------------------------- scripts/fuzz.py, nesting, bytes, huge inputs

import importlib.util  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _fuzz_script():
    if "vlm_fuzz_script" not in sys.modules:  # registered before it runs: its dataclasses look it up
        spec_ = importlib.util.spec_from_file_location("vlm_fuzz_script", ROOT / "scripts" / "fuzz.py")
        module = importlib.util.module_from_spec(spec_)
        sys.modules["vlm_fuzz_script"] = module
        spec_.loader.exec_module(module)
    return sys.modules["vlm_fuzz_script"]


def _located(text: str, path: str = "fuzz.vlm") -> list[str]:
    """Check `text`; every error must be located inside it. Returns the codes."""
    result = check_file(path, text=text)
    render_all(result.diagnostics, result.sources)
    for d in result.diagnostics:
        if d.severity == "error":
            assert d.span is not None and d.span.file in result.sources, d
            assert 1 <= d.span.line <= result.sources[d.span.file].count("\n") + 1, d
    return [d.code for d in result.diagnostics]


def test_fuzz_script_mutants_all_end_in_located_diagnostics() -> None:
    """A few hundred mutants of scripts/fuzz.py (byte, token and structure mutations of every spec)."""
    fuzz = _fuzz_script()
    report = fuzz.run(300, seed=7)
    assert report.n == 300 and sum(report.counts.values()) == 300
    assert report.failed == 0, [(i, ops, o.detail) for i, ops, o, _ in report.failures]
    assert report.counts["located"] > 0 and {op.split(":")[0] for op in report.ops} == {"byte", "token", "structure"}


def test_fuzz_script_is_seeded() -> None:
    fuzz = _fuzz_script()
    seeds = fuzz.load_seeds()
    import random

    one = [fuzz.mutant(random.Random(f"3:{i}"), seeds) for i in range(20)]
    two = [fuzz.mutant(random.Random(f"3:{i}"), seeds) for i in range(20)]
    assert one == two


@pytest.mark.parametrize("shape", ["paren", "neg", "sum", "list", "call", "mixed"])
@pytest.mark.parametrize("depth", [20, 200, 20_000])
def test_nesting_depth(shape: str, depth: int) -> None:
    """Deep expressions: small ones check, deep ones are a located E0006, never a RecursionError."""
    n = depth
    value = {"paren": "(" * n + "48" + ")" * n, "neg": "-" * (2 * (n // 2)) + "48",
             "sum": " + ".join(["1"] * n) + " + 47", "list": "[" * n + "1" + "]" * n,
             "call": "f(" * n + "1" + ")" * n, "mixed": "(" * n + "-1 + " * n + "49" + ")" * n}[shape]
    text = spec(language=f"  language llm = llama {{ width = {value}  depth = 2  heads = 4  ffn = 96  vocab = 512 }}\n")
    t = time.perf_counter()
    codes = _located(text)
    assert time.perf_counter() - t < 10
    if depth > 100 and shape != "paren":  # parentheses only group: they nest nothing
        assert codes == ["E0006"]
    else:
        assert "E0006" not in codes


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=0, max_size=4),
                                                  st.integers(0, 3)), min_size=1, max_size=4))
def test_byte_corruption_is_located(seed: str, edits: list[tuple[int, bytes, int]]) -> None:
    """Raw bytes (invalid UTF-8, NUL, lone CR, form feeds) read from a file as `vlm check` reads them."""
    data = seed.encode()
    for at, ins, cut in edits:
        at %= len(data) + 1
        data = data[:at] + ins + data[at + cut:]
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "bytes.vlm")
        Path(path).write_bytes(data)
        result = check_file(path)
        shown = render_all(result.diagnostics, result.sources)
    for diag in result.diagnostics:
        if diag.severity == "error":
            assert diag.span is not None and diag.span.file == path, diag
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        assert [d.code for d in result.diagnostics] == ["E0004"] and "^" in shown


@pytest.mark.parametrize("line_break", ["\r", "\x0c", "\x0b", "\x1c", "\x85", "\u2028"])
def test_odd_line_breaks_render_the_right_line(line_break: str) -> None:
    """The caret's source line is the parser's line: only "\\n" ends one (splitlines() also broke at these)."""
    text = "model m {" + line_break + "  vision clip = vit { width = }\n}\n"
    result = check_file("odd.vlm", text=text)
    (d,) = result.diagnostics
    shown = render_all(result.diagnostics, result.sources)
    assert d.span.line == 1 and f"1 | {text.split(chr(10))[0].removesuffix(chr(13))}" in shown


def test_huge_numbers() -> None:
    def lang(value: str) -> str:
        return spec(language=f"  language llm = llama {{ width = 48  depth = 2  heads = 4  ffn = 96  vocab = {value} }}\n")

    assert _located(lang("9" * 100_000)) == ["E0008"]  # Python cannot even read it: int() refuses > 4300 digits
    assert _located(lang("1" + "_" * 1000 + "2")) == []  # underscores are not digits
    assert "E0008" not in _located(lang("9" * 300))
    big = "9" * 300
    for expr in [f"{big} * {big}", f"-{big} - {big}", f"{big} + {big}", " * ".join(["9" * 20] * 20)]:
        assert _located(lang(expr)) == ["E0212"], expr
    assert "E0212" not in _located(lang(f"{big} / 3"))
    for expr in ["1e999", f"{big} * 1.5 * {big}"]:  # floats overflow to inf, which is not a whole number
        assert _located(lang(expr)) == ["E0201"], expr
    # layer and head counts that passes loop over are bounded, so a typo is quick
    t = time.perf_counter()
    text = spec(language="  language llm = llama { width = 48  depth = 2000000000000  heads = 4000000000  ffn = 96 "
                         " vocab = 512 }\n",
                fusion="  fusion cross_attention(proj -> llm) { every = 1 }\n")
    codes = _located(text)
    assert codes.count("E0202") == 2 and time.perf_counter() - t < 5


def test_huge_inputs() -> None:
    """Megabyte files, lines and names: each ends in a diagnostic or a clean check, quickly and compactly."""
    seed = spec()
    cases = {
        "many models": "".join(seed.replace("model tiny", f"model tiny{i}") for i in range(300)),
        "many errors on a long line": seed.replace("layers = 2", "layers = 2 " + " ".join(f"a{i} = {i}"
                                                                                          for i in range(3000))),
        "an error at the end of a megabyte line": seed.replace("layers = 2", " " * 1_000_000 + "layers = "),
        "long name": seed.replace("proj", "p" * 200_000),
        "long comment": seed + "#" + "c" * 1_000_000 + "\n",
        "long string": seed.replace("adamw(lr = 1e-3)", '"' + "s" * 1_000_000 + '"'),
        "many lines": seed + "\n" * 500_000,
        "many braces": seed + "{" * 100_000,
    }
    for what, text in cases.items():
        t = time.perf_counter()
        result = check_file("huge.vlm", text=text)
        shown = render_all(result.diagnostics, result.sources)
        took = time.perf_counter() - t
        assert took < 20, (what, took)
        for d in result.diagnostics:
            assert d.span is not None, (what, d)
        # one long source line is shown as a window, not in full for every diagnostic
        assert len(shown) < 2000 * max(1, len(result.diagnostics)), (what, len(shown))
