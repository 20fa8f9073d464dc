"""vlmspec: describe a vision-language model as text; check, diff, build, train, export and serve it.

`import vlmspec` is light: torch is imported only when a runtime function is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlmspec.compiler.compile import Analysis
    from vlmspec.runtime.session import Session

__version__ = "0.1.0"
__all__ = ["__version__", "check", "load"]


def check(ref: str) -> Analysis:
    """Check `file.vlm[:model]` and return its `Analysis` (IR, graph, shapes, stage plans); raises on errors."""
    from vlmspec.compiler.compile import load_analysis

    return load_analysis(ref)[0]


def load(source: str, device: str = "cpu") -> Session:
    """A `Session` (model, processor, tokenizer, run-time facts) from a folder written by `vlm build` /
    `vlm train`, or built fresh from `spec.vlm[:model]` with its `weights` loaded."""
    from vlmspec.runtime.session import load_session

    return load_session(source, device=device)
