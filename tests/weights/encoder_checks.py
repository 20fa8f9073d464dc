"""Checks every vision-encoder kind owes the rest of vlmspec, shared by the `dinov2` and `convnext` tests:
the compiler's per-path counts equal what the built module declares (freezing, learning rates, LoRA),
each LoRA target is a linear layer, and recomputing the blocks (`activation_checkpointing`) changes neither
the output nor any gradient."""

from __future__ import annotations

import torch

from vlmspec.compiler.passes import part_params, valid_paths
from vlmspec.runtime.model import build_model
from vlmspec.runtime.spec_paths import ParamTable


def assert_wired(analysis, name: str = "enc") -> None:
    model = build_model(analysis, device="meta")
    table = ParamTable.of(model, analysis)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    paths = [p for p in valid_paths(analysis.ir) if p.split(".")[0] == name]
    assert len(paths) > 1, paths
    for path in paths:
        assert sum(sizes[n] for n in table.covered(path)) == part_params(analysis.ir, analysis.shapes, path), path
    for target in analysis.ir.components[name].config.lora_targets():
        modules = table.lora_modules(name, [target])
        assert modules, target

    torch.manual_seed(0)
    enc = build_model(analysis).components[name].train()
    cfg = analysis.ir.components[name].config
    px = torch.randn(2, cfg.channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(3))

    def run(checkpoint: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        enc.zero_grad()
        enc.checkpoint_blocks = checkpoint
        out = enc(px).x
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), [p.grad.clone() for p in enc.parameters() if p.grad is not None]

    (a, ga), (b, gb) = run(False), run(True)
    enc.checkpoint_blocks = False
    assert torch.equal(a, b) and len(ga) == len(gb) and all(torch.allclose(x, y) for x, y in zip(ga, gb, strict=True))
