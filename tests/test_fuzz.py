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
