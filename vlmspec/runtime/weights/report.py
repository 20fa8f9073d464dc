"""What a weights import did, per component: keys loaded, missing, unexpected, shape-mismatched.

The report is complete whether or not the import succeeded: `strict=False` never hides a key, it only
stops the report from becoming an error. Printable as a rich table, serialisable with `to_json()`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ComponentCoverage:
    """One component. `source` is the weights folder (with `#part`), None for a newly initialised one."""

    component: str
    source: str | None = None
    family: str | None = None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, ours, file
    untied: list[str] = field(default_factory=list)  # tied in the spec, different tensors in the checkpoint
    new: list[str] = field(default_factory=list)  # initialised fresh, as allowed (no `weights`, or allow_new)
    tied: list[str] = field(default_factory=list)  # filled by the tie to another key

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched) + len(self.untied)

    @property
    def status(self) -> str:
        if self.source is None:
            return "new" if self.new else "no tensors"
        return "error" if self.problems else "loaded"

    def first_problem(self) -> str | None:
        if self.mismatched:
            k, ours, theirs = self.mismatched[0]
            return f"`{self.component}.{k}` is {list(ours)} in the spec but {list(theirs)} in the checkpoint"
        if self.missing:
            return f"`{self.component}.{self.missing[0]}` is not in the checkpoint"
        if self.unexpected:
            return f"checkpoint key `{self.unexpected[0]}` has no place in `{self.component}`"
        if self.untied:
            return f"`{self.component}.{self.untied[0]}` is tied in the spec but its own tensor in the checkpoint"
        return None

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "source": self.source, "family": self.family, "status": self.status,
                "loaded": len(self.loaded), "tied": self.tied, "new": self.new, "missing": self.missing,
                "unexpected": self.unexpected, "untied": self.untied,
                "mismatched": [{"key": k, "spec": list(a), "checkpoint": list(b)} for k, a, b in self.mismatched]}


@dataclass(slots=True)
class CoverageReport:
    components: dict[str, ComponentCoverage] = field(default_factory=dict)
    # E0587 errors: components whose attributes say otherwise than their checkpoint's config
    disagreements: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.problems == 0 for c in self.components.values())

    def summary(self) -> str:
        """One line: counts over all components, and the first problem when there is one."""
        cs = list(self.components.values())
        n = {k: sum(len(getattr(c, k)) for c in cs) for k in ("loaded", "missing", "unexpected", "mismatched", "new")}
        line = (f"{n['loaded']} loaded, {n['missing']} missing, {n['unexpected']} unexpected, "
                f"{n['mismatched']} shape-mismatched, {n['new']} new")
        first = next((p for c in cs if (p := c.first_problem())), None)
        return f"{line} ({first})" if first else line

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "summary": self.summary(),
                "components": [c.to_json() for c in self.components.values()]}

    def table(self) -> Any:
        """A `rich.table.Table`, one row per component."""
        from rich.table import Table

        t = Table(title="weights coverage")
        for col in ("component", "source", "family", "loaded", "missing", "unexpected", "mismatched", "new", "status"):
            t.add_column(col, justify="right" if col in ("loaded", "missing", "unexpected", "mismatched", "new")
                         else "left")
        for c in self.components.values():
            t.add_row(c.component, c.source or "-", c.family or "-", str(len(c.loaded)), str(len(c.missing)),
                      str(len(c.unexpected)), str(len(c.mismatched) + len(c.untied)), str(len(c.new)), c.status)
        return t

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=140, no_color=True).print(self.table())
        lines = [buf.getvalue().rstrip()]
        for c in self.components.values():
            for k in c.missing:
                lines.append(f"  missing     {c.component}.{k}")
            for k in c.unexpected:
                lines.append(f"  unexpected  {c.component}: {k}")
            for k, a, b in c.mismatched:
                lines.append(f"  mismatched  {c.component}.{k}: spec {list(a)} vs checkpoint {list(b)}")
            for k in c.untied:
                lines.append(f"  untied      {c.component}.{k}")
        return "\n".join(lines)
