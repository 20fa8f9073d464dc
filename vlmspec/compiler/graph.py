"""The model as a graph: components are nodes, tensor flows are edges annotated with shapes.

Passes walk `FlowGraph`, a small adjacency structure ordered with the standard library's
`graphlib`; `to_networkx()` gives the same graph as a networkx `DiGraph` for `vlm graph`, `vlm diff`
and users' own analyses. Importing networkx costs ~0.1 s, a fifth of the budget of `vlm check`, so
it is imported only when a networkx graph is asked for (see docs/design.md).
"""

from __future__ import annotations

import graphlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlmspec.compiler.ir import ModelIR

if TYPE_CHECKING:
    import networkx as nx


@dataclass(slots=True)
class FlowGraph:
    name: str
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    edges: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def successors(self, node: str) -> list[str]:
        return [b for (a, b) in self.edges if a == node]

    def predecessors(self, node: str) -> list[str]:
        return [a for (a, b) in self.edges if b == node]

    def cycle(self) -> list[str] | None:
        """One cycle of the data flow, or None."""
        try:
            self.topological_order()
        except graphlib.CycleError as e:
            nodes = list(e.args[1])
            return nodes[:-1] if len(nodes) > 1 and nodes[0] == nodes[-1] else nodes
        return None

    def topological_order(self) -> list[str]:
        ts: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
        for n in self.nodes:
            ts.add(n, *self.predecessors(n))
        return list(ts.static_order())

    def to_networkx(self) -> nx.DiGraph:
        import networkx as nx

        g = nx.DiGraph(name=self.name)
        for n, data in self.nodes.items():
            g.add_node(n, **data)
        for (a, b), data in self.edges.items():
            g.add_edge(a, b, **data)
        return g


def build_graph(ir: ModelIR) -> FlowGraph:
    """Edges: vision -> connector -> connector -> fusion -> language (only between existing components)."""
    g = FlowGraph(ir.name)
    for c in ir.components.values():
        g.nodes[c.name] = {"role": c.role, "kind": c.kind}
    for c in ir.components.values():
        for src in c.sources:
            if src in ir.components:
                g.edges[(src, c.name)] = {}
        if c.role == "fusion" and c.target in ir.components:
            g.edges[(c.name, c.target)] = {}
    return g


def to_mermaid(g: FlowGraph, labels: dict[str, str]) -> str:
    shapes = {"vision": ("[/", "/]"), "connector": ("[", "]"), "fusion": ("{{", "}}"), "language": ("([", "])")}
    lines = ["flowchart LR"]
    for node, data in g.nodes.items():
        left, right = shapes.get(data.get("role", ""), ("[", "]"))
        label = labels.get(node, node).replace("\n", "<br/>").replace('"', "'")
        lines.append(f'  {node}{left}"{label}"{right}')
    for (a, b), data in g.edges.items():
        label = data.get("shape")
        lines.append(f'  {a} -->|"{label}"| {b}' if label else f"  {a} --> {b}")
    return "\n".join(lines) + "\n"


def to_dot(g: FlowGraph, labels: dict[str, str]) -> str:
    shapes = {"vision": "parallelogram", "connector": "box", "fusion": "hexagon", "language": "ellipse"}
    lines = [f'digraph "{g.name}" {{', "  rankdir=LR;"]
    for node, data in g.nodes.items():
        label = labels.get(node, node).replace('"', '\\"').replace("\n", "\\n")
        lines.append(f'  "{node}" [shape={shapes.get(data.get("role", ""), "box")}, label="{label}"];')
    for (a, b), data in g.edges.items():
        label = data.get("shape")
        lines.append(f'  "{a}" -> "{b}"' + (f' [label="{label}"];' if label else ";"))
    lines.append("}")
    return "\n".join(lines) + "\n"
