"""`convnext`: ConvNeXt as a vision tower (ConvLLaVA).

The tokens are one stage's feature map [n x c x h x w] read row by row as h * w tokens of width c, the
grid kept so pooling connectors can use it. Parameter names are transformers' `ConvNextModel`'s
(`embeddings.patch_embeddings`, `encoder.stages.i.downsampling_layer.{0,1}`,
`encoder.stages.i.layers.j.{dwconv,layernorm,pwconv1,pwconv2,layer_scale_parameter}`, `layernorm`), so a
`save_pretrained` folder loads by key. Only the stages up to the selected one run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.convnext import EXPANSION, KERNEL, ConvNeXt
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import CheckpointedBlocks, VisualTokens, activation
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.spec_paths import GROUP, SpecPart

#: the epsilon of every LayerNorm but the final one (fixed in ConvNeXt and in transformers)
BLOCK_EPS = 1e-6
#: where a fresh layer scale starts (transformers' `layer_scale_init_value`)
LAYER_SCALE_INIT = 1e-6


class ChannelsFirstNorm(nn.LayerNorm):
    """LayerNorm over the channels of an [n x c x h x w] map (the stem's and the down-sampling layers')."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """x + scale * pwconv2(act(pwconv1(norm(dwconv(x))))), the MLP applied channels-last."""

    def __init__(self, dim: int, act: str, layer_scale: bool):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, KERNEL, padding=KERNEL // 2, groups=dim)
        self.layernorm = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.pwconv1 = nn.Linear(dim, EXPANSION * dim)
        self.act = activation(act)
        self.pwconv2 = nn.Linear(EXPANSION * dim, dim)
        self.layer_scale_parameter = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT)) if layer_scale else None

    def init_weights(self, std: float) -> None:
        if self.layer_scale_parameter is not None:
            nn.init.constant_(self.layer_scale_parameter, LAYER_SCALE_INIT)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pwconv2(self.act(self.pwconv1(self.layernorm(h))))
        if self.layer_scale_parameter is not None:
            h = self.layer_scale_parameter.to(h.dtype) * h
        return x + h.permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    """A stage: (after the first) LayerNorm + 2 x 2 / 2 convolution, then its blocks."""

    def __init__(self, d_in: int, d_out: int, depth: int, first: bool, cfg: ConvNeXt):
        super().__init__()
        self.downsampling_layer = nn.ModuleList() if first else nn.ModuleList(
            [ChannelsFirstNorm(d_in, eps=BLOCK_EPS), nn.Conv2d(d_in, d_out, 2, 2)])
        self.layers = nn.ModuleList([ConvNeXtBlock(d_out, cfg.act, cfg.layer_scale) for _ in range(depth)])


class ConvNeXtEmbeddings(nn.Module):
    def __init__(self, cfg: ConvNeXt):
        super().__init__()
        d = cfg.dims[0]
        self.patch_embeddings = nn.Conv2d(cfg.channels, d, cfg.patch_size, cfg.patch_size)
        self.layernorm = ChannelsFirstNorm(d, eps=BLOCK_EPS)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.layernorm(self.patch_embeddings(pixels))


class ConvNeXtStages(nn.Module):
    def __init__(self, cfg: ConvNeXt):
        super().__init__()
        dims = cfg.dims
        self.stages = nn.ModuleList([ConvNeXtStage(dims[max(i - 1, 0)], d, n, i == 0, cfg)
                                     for i, (d, n) in enumerate(zip(dims, cfg.depths, strict=True))])


class ConvNeXtEncoder(nn.Module, CheckpointedBlocks):
    """ConvNeXt returning the selected stage's feature map as tokens (`out_stage`, default the last)."""

    def __init__(self, cfg: ConvNeXt):
        super().__init__()
        if len(cfg.dims) != len(cfg.depths):  # the front end reports it (E0240); a programmatic config may not
            raise user_error("E0589", f"a convnext encoder needs one depth per stage: dims has {len(cfg.dims)}, "
                             f"depths {len(cfg.depths)}")
        self.cfg = cfg
        self.embeddings = ConvNeXtEmbeddings(cfg)
        self.encoder = ConvNeXtStages(cfg)
        self.layernorm = nn.LayerNorm(cfg.dims[-1], eps=cfg.norm_eps)  # the pooled output's norm
        self.last = cfg.stage_index

    @property
    def image_dims(self) -> int:
        return 3

    def _blocks(self) -> list[ConvNeXtBlock]:
        return [block for stage in self.encoder.stages for block in stage.layers]

    def spec_parts(self) -> list[SpecPart]:
        blocks = self._blocks()
        stages = [SpecPart(f"stage{i}", [stage], GROUP) for i, stage in enumerate(self.encoder.stages)]
        return [SpecPart("embeddings", [self.embeddings], GROUP), SpecPart("stages", [self.encoder.stages], GROUP),
                *stages, SpecPart("mlp", [m for b in blocks for m in (b.pwconv1, b.pwconv2)]),
                SpecPart("norm", [self.layernorm])]

    def _check(self, pixels: Tensor) -> None:
        cfg = self.cfg
        if pixels.dim() != 4:
            raise user_error("E0588", f"images for a convnext encoder must be [batch x channels x height x width], "
                             f"got shape {tuple(pixels.shape)}")
        c, h, w = pixels.shape[-3:]
        if c != cfg.channels or h < cfg.stride or w < cfg.stride:
            raise user_error("E0588", f"images are {c} x {h} x {w}; this convnext encoder takes {cfg.channels} "
                             f"channels and sides of at least {cfg.stride} pixels (its stride at stage "
                             f"{cfg.stage_index})",
                             help=f"the spec's processor feeds {cfg.channels} x {cfg.image_size} x {cfg.image_size}")

    def forward(self, pixels: Tensor) -> VisualTokens:
        """[n x c x H x W] -> tokens [n x (h * w) x dims[stage]] on the h x w grid of that stage."""
        self._check(pixels)
        x = self.embeddings(pixels.to(self.embeddings.patch_embeddings.weight.dtype))
        for stage in self.encoder.stages[:self.last + 1]:
            for layer in stage.downsampling_layer:
                x = layer(x)
            for block in stage.layers:
                x = self.run_block(block, x)
        grid = (x.shape[-2], x.shape[-1])
        tokens = x.flatten(2).transpose(1, 2)
        if self.cfg.feature_norm:
            tokens = self.layernorm(tokens)
        return VisualTokens(tokens, grid)


@register("vision", "convnext")
def build_convnext(comp: Component, ctx: BuildContext) -> ConvNeXtEncoder:
    return ConvNeXtEncoder(comp.config)
