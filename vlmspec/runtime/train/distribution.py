"""One process or many (torchrun): ranks, collectives, and DDP / FSDP2 around what a stage trains."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from vlmspec.diagnostics import user_error
from vlmspec.runtime.spec_paths import ParamTable
from vlmspec.runtime.train.objectives import FIRST_STAGE


@dataclass(slots=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives run: NCCL's on the GPU, gloo's on the CPU

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device | None = None) -> Dist:
        device = device or torch.device("cpu")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device)
        import torch.distributed as dist

        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over processes (x itself in one process), on the CPU."""
        if self.world > 1:
            import torch.distributed as dist

            x = x.to(self.device)
            dist.all_reduce(x)
        return x.cpu()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


#: per role, the methods `VisionLanguageModel` calls on a component instead of its `forward` (and that read
#: its parameters): FSDP2 gathers a sharded component's parameters around each of them too
FORWARD_METHODS: dict[str, tuple[str, ...]] = {"language": ("embed", "add_positions", "decode", "logits")}


def wrap(model: torch.nn.Module, dist: Dist, shard: bool, table: ParamTable,
         loss_module: torch.nn.Module | None = None) -> tuple[torch.nn.Module, bool]:
    """(what the training loop calls, whether the model is now sharded): the model, or `loss_module`
    (which computes the stage's losses from the model), under DDP or with the model's trained components
    sharded by FSDP2."""
    top = loss_module if loss_module is not None else model
    if dist.world <= 1:
        return top, False
    if shard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        trained = table.components_with(n for n, p in model.named_parameters() if p.requires_grad)
        fusions = sorted(n for n in trained if model.roles[n] == "fusion")
        if fusions:
            # its blocks run inside the language model's layers, called from hooks, not through a forward
            # FSDP2 could gather the shards around
            raise user_error("E0529", f"--fsdp cannot shard the trained fusion `{fusions[0]}` yet: its blocks run "
                             "inside the language model's layers", help="train this stage without --fsdp (several "
                             "processes then run it with DDP)")
        mesh = init_device_mesh(dist.device.type, (dist.world,))
        for name in sorted(trained):  # frozen components stay replicated
            module = model.components[name]
            fully_shard(module, mesh=mesh)
            # the model calls a language model through these rather than its forward: each must gather the
            # shards first, as forward does (else the embedding meets a sharded table)
            for method in FORWARD_METHODS.get(model.roles[name], ()):
                register_fsdp_forward_method(module, method)
        return top, True
    from torch.nn.parallel import DistributedDataParallel as DDP

    # a subset of the first-stage objectives leaves heads unused (itc alone never reaches the ITM head)
    unused = loss_module is not None and set(FIRST_STAGE) - loss_module.wanted
    return DDP(top, find_unused_parameters=bool(unused)), False

