"""A stage's `activation_checkpointing`, applied to the model for the length of the stage.

The compiler decides which components are checkpointed (`StagePlan.checkpointed`, see
`vlmspec.compiler.checkpointing`); here each module of those components that runs a stack of blocks
(`CheckpointedBlocks`) gets its flag set, and every flag is cleared when the stage ends, so the next stage,
evaluation and the saved model run as if it had never been set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from vlmspec.runtime.blocks import CheckpointedBlocks


def set_checkpointing(components: nn.ModuleDict, names: list[str]) -> list[str]:
    """Set `checkpoint_blocks` on the block stacks of components `names` and clear it everywhere else;
    returns the components it was set on."""
    for name, comp in components.items():
        stacks = [m for m in comp.modules() if isinstance(m, CheckpointedBlocks)]
        if name in names and not stacks:  # a bug, not a user's error: tests hold the two to one answer
            raise RuntimeError(f"component `{name}`: its kind declares `checkpointable` blocks, its module runs none")
        for m in stacks:
            m.checkpoint_blocks = name in names
    return [n for n in components if n in names]


@contextmanager
def checkpointing(components: nn.ModuleDict, names: list[str]) -> Iterator[list[str]]:
    """`set_checkpointing` for the body of a `with`, cleared after it however it ends."""
    try:
        yield set_checkpointing(components, names)
    finally:
        set_checkpointing(components, [])
