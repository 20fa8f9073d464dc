"""Vision encoders: CLIP-style ViT (`vit`), SigLIP (`siglip`), EVA / BLIP-2 (`eva`) and InternViT (`internvit`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from vlmspec.compiler.schema.base import (
    MAX_TILES,
    CallValue,
    ComponentSchema,
    Dtype,
    Quantize,
    Schema,
    ShapeContext,
    TokenShape,
    layernorm,
    linear,
    register,
)
from vlmspec.compiler.schema.layouts import AnyRes
from vlmspec.compiler.schema.tile_layouts import DynamicTiles, Split

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class FeatureSelect(Schema):
    """Which hidden states leave the encoder: `layer(-2).patches`, `layers([-2, -5]).all`, or `pooled`: one
    vector per image, as a contrastive model compares them (CLIP: the class token after the post-LayerNorm;
    SigLIP: its attention-pooling head over the post-LayerNormed tokens)."""

    layers: list[int] = Field(default=[-1], min_length=1, description="hidden-state indices; several are concatenated along width")
    tokens: Literal["patches", "all", "pooled"] = Field(default="patches", description="`patches` drops the class "
                                                         "token; `pooled` is one vector per image")

    @model_validator(mode="before")
    @classmethod
    def _from_call(cls, v: Any) -> Any:
        if v == "pooled":
            return {"layers": [-1], "tokens": "pooled"}
        if not isinstance(v, CallValue):
            return v
        if v.name not in ("layer", "layers") or len(v.args) != 1 or v.kwargs or len(v.attrs) > 1:
            raise ValueError("expected `layer(N)`, `layer(N).patches`, `layer(N).all` or `layers([N, M]).patches`")
        arg = v.args[0]
        layers = list(arg) if isinstance(arg, list | tuple) else [arg]
        out: dict[str, Any] = {"layers": layers}
        if v.attrs:
            out["tokens"] = v.attrs[0]
        return out

    @property
    def pooled(self) -> bool:
        return self.tokens == "pooled"

    def to_vlm(self) -> str:
        if self.pooled:
            return "pooled"
        if len(self.layers) == 1:
            return f"layer({self.layers[0]}).{self.tokens}"
        return f"layers([{', '.join(map(str, self.layers))}]).{self.tokens}"


class DynamicResolution(Schema):
    """`dynamic(min_pixels = ..., max_pixels = ...)`: native-resolution inputs as in Qwen2-VL."""

    min_pixels: int = Field(default=56 * 56, gt=0, description="smallest image area after resizing")
    max_pixels: int = Field(default=28 * 28 * 1280, gt=0, description="largest image area after resizing")

    @model_validator(mode="before")
    @classmethod
    def _from_call(cls, v: Any) -> Any:
        if isinstance(v, CallValue):
            if v.name != "dynamic" or v.args:
                raise ValueError("expected `dynamic(min_pixels = N, max_pixels = M)` or `fixed`")
            return v.kw()
        return v

    def to_vlm(self) -> str:
        return f"dynamic(min_pixels = {self.min_pixels}, max_pixels = {self.max_pixels})"


class VideoFrames(Schema):
    """`video = frames(fps = 2, max_frames = 768, ...)`: how an encoder with `resolution = dynamic(...)` reads
    a video, as Qwen2-VL's video processor does: frames sampled at `fps` (or `num_frames` of them), resized
    within [min_pixels, max_pixels], grouped `temporal_patch` at a time into 3-D patches. Kept apart from
    `dynamic(...)` because the processors keep a separate, smaller pixel range for frames than for stills."""

    fps: float | None = Field(default=2.0, gt=0, description="frames sampled per second of video (Qwen2-VL: 2)")
    num_frames: int | None = Field(default=None, gt=0, description="a fixed number of frames instead of `fps`")
    min_frames: int = Field(default=4, gt=0, description="fewest frames sampled at `fps`")
    max_frames: int = Field(default=768, gt=0, description="most frames sampled at `fps`")
    min_pixels: int | None = Field(default=None, gt=0, description="smallest frame area after resizing "
                                   "(default: the encoder's `dynamic(min_pixels)`)")
    max_pixels: int | None = Field(default=None, gt=0, description="largest frame area after resizing "
                                   "(default: the encoder's `dynamic(max_pixels)`)")
    max_tokens: int | None = Field(default=None, gt=0, description="most visual tokens one video may give; a "
                                   "longer video is refused (E0602); the static check reads it")
    token_id: int | None = Field(default=None, ge=0, description="id of the video placeholder (Qwen2-VL's "
                                 "`<|video_pad|>`); default: the image placeholder's")
    tokens_per_second: float | None = Field(default=None, gt=0, description="absolute time ids: M-RoPE's time "
                                            "axis advances this many ids per second of video (Qwen2.5-VL); "
                                            "default: one per temporal patch (Qwen2-VL)")
    pool: int | None = Field(default=None, gt=0, description="LLaVA-OneVision's per-frame pooling: each of "
                             "`num_frames` frames read as the encoder's square, its projected token grid shrunk "
                             "bilinearly to ceil(side / pool) a side, one `image_newline` after the last frame "
                             "(OneVision: 2); needs a fixed-resolution encoder; see vlmspec/compiler/video.py")

    @model_validator(mode="before")
    @classmethod
    def _from_call(cls, v: Any) -> Any:
        if isinstance(v, CallValue):
            if v.name != "frames" or v.args:
                raise ValueError("expected `frames(fps = 2, max_frames = 768, ...)`")
            return v.kw()
        return v

    def to_vlm(self) -> str:
        """Every value in force (`fps` is not, beside `num_frames`; pooled frames only what they read), so that
        a resolved spec reads the same."""
        keys = [k for k in type(self).model_fields if getattr(self, k) is not None
                and not (k == "fps" and self.num_frames is not None)]
        if self.pool is not None:  # pooled frames read only these (the rest is E0276)
            keys = [k for k in keys if k in ("num_frames", "pool", "token_id")]
        return "frames(" + ", ".join(f"{k} = {getattr(self, k)}" for k in keys) + ")"


class ViTBase(ComponentSchema):
    """Fields every ViT encoder shares. Defaults follow CLIP; SigLIP and EVA override a few."""

    role = "vision"
    checkpointable = True
    image_size: int = Field(default=224, gt=0, description="input resolution in pixels (square)")
    patch_size: int = Field(default=14, gt=0, description="patch side in pixels")
    channels: int = Field(default=3, gt=0, description="input channels")
    width: int = Field(default=1024, gt=0, description="hidden size")
    depth: int = Field(default=24, gt=0, description="number of transformer layers")
    heads: int = Field(default=16, gt=0, description="attention heads")
    mlp: int | None = Field(default=None, gt=0, description="MLP hidden size (default: 4 x width)")
    act: Literal["quick_gelu", "gelu", "gelu_tanh", "silu"] = Field(default="quick_gelu", description="MLP activation")
    norm_eps: float = Field(default=1e-5, gt=0, description="LayerNorm epsilon")
    feature: FeatureSelect = Field(default=FeatureSelect(), description="hidden states passed on, e.g. `layer(-2).patches`")
    position: Literal["learned", "rope2d"] = Field(default="learned", description="position encoding")
    resolution: Literal["fixed"] | DynamicResolution = Field(default="fixed", description="`fixed` or `dynamic(...)`")
    temporal_patch: int = Field(default=1, ge=1, description="frames per patch (2 for Qwen2-VL video-ready patches)")
    video: VideoFrames | None = Field(default=None, description="`frames(...)`: read videos (needs `resolution = "
                                      "dynamic(...)`); see `VideoFrames`")
    layout: Literal["fixed"] | AnyRes | DynamicTiles | Split = Field(
        default="fixed", description="`fixed` (one image_size square), `anyres(...)` (LLaVA-NeXT's tiles on a "
        "best-fit canvas), `dynamic_tiles(...)` (InternVL's grid by aspect ratio + thumbnail) or `split(...)` "
        "(Idefics3's tiles + global image)")
    tiles: int = Field(default=0, ge=0, le=MAX_TILES, description="Llama 3.2 Vision tiling: up to N tiles, gated tile embeddings (0: none)")
    global_layers: int = Field(default=0, ge=0, description="the last N layers are gated global layers, after the "
                               "post-LayerNorm and the post-tile embedding (Llama 3.2 Vision: 8 of 40; needs `tiles`)")
    tile_padding: int = Field(default=0, ge=0, description="pad each tile's tokens with zeros to a multiple of N that "
                              "real tokens attend to and padding does not (Llama 3.2 Vision: 8; needs `tiles`)")
    attn_bias: bool = Field(default=True, description="biases in the attention projections (Llama 3.2 Vision: none)")
    norm: Literal["layer", "rms"] = Field(default="layer", description="the blocks' (and `pre_norm` / `post_norm`'s) "
                                          "normalisation: LayerNorm, or RMSNorm with no bias (Qwen2.5-VL)")
    gated_mlp: bool = Field(default=False, description="gated MLP `down(act(gate(x)) * up(x))`, all three biased, "
                            "`mlp` wide (Qwen2.5-VL: with `act = silu`, SwiGLU)")
    window: int = Field(default=0, ge=0, description="window attention: tokens attend within square windows of N "
                        "pixels (N / patch_size patches a side, from the top-left; partial at the grid's edge), "
                        "except in `full_layers` (Qwen2.5-VL: 112; 0: every layer attends over the whole image)")
    full_layers: list[int] = Field(default=[], description="layers (0-based) that attend over the whole image despite "
                                   "`window` (Qwen2.5-VL: [7, 15, 23, 31])")
    layer_scale: bool = Field(default=False, description="learned per-channel scales on each block's attention "
                              "and MLP outputs before they join the residual (InternViT's `lambda_1`, `lambda_2`)")
    qk_norm: bool = Field(default=False, description="RMSNorm (eps 1e-6) over all heads' queries and over all "
                          "heads' keys, each with its own width-sized weight, before attention (InternViT-6B)")
    mean: list[float] = Field(default=CLIP_MEAN, min_length=1, description="per-channel normalisation mean")
    std: list[float] = Field(default=CLIP_STD, min_length=1, description="per-channel normalisation std")
    resize: Literal["bicubic", "bilinear", "nearest", "lanczos"] = Field(default="bicubic", description="resize "
                                                                          "filter (Idefics3 / SmolVLM: lanczos)")
    fit: Literal["stretch", "crop", "pad"] = Field(default="stretch", description="how an image of another aspect "
                                                   "ratio becomes square: `stretch` resizes it to image_size x "
                                                   "image_size; `crop` resizes its shorter side to image_size and "
                                                   "keeps the centre (CLIP's processor); `pad` pads it to a square "
                                                   "with the mean colour first (LLaVA's `do_pad`)")
    weights: str | None = Field(default=None, description="local checkpoint folder to load this encoder from")
    dtype: Dtype = Field(default="fp32", description="parameter dtype")
    quantize: Quantize = Field(default="none", description="weight-only quantization at load time")

    # Layout switches that distinguish the families (declared per subclass, still overridable).
    class_token: bool = Field(default=True, description="prepend a learned class token")
    pre_norm: bool = Field(default=True, description="LayerNorm on the embeddings before the first layer")
    post_norm: bool = Field(default=True, description="LayerNorm after the last layer")
    patch_bias: bool = Field(default=False, description="bias in the patch-embedding convolution")
    feature_norm: bool = Field(default=False, description="the last layer's tokens pass through the post-LayerNorm "
                               "when `feature` selects them (CLIP: only its pooled token does)")

    @property
    def mlp_dim(self) -> int:
        return self.mlp if self.mlp is not None else 4 * self.width

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def check(self, ctx: ShapeContext) -> None:
        # a fixed-size image through the patch convolution keeps whole patches and drops the rest, as the
        # towers do (SigLIP so400m: 384 px in 14 px patches is 27 x 27); tiles and native resolution cut
        # images into whole patches
        remainder_dropped = self.resolution == "fixed" and not self.tiles and self.temporal_patch == 1
        if self.image_size % self.patch_size and not remainder_dropped:
            ctx.sink.error("E0205", f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}",
                           ctx.span_of("image_size"),
                           help=f"use image_size = {self.grid * self.patch_size} or {(self.grid + 1) * self.patch_size}")
        if self.width % self.heads:
            ctx.sink.error("E0206", f"width {self.width} is not divisible by heads {self.heads}", ctx.span_of("heads"),
                           help=_divisors_hint(self.width, self.heads))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            ctx.sink.error("E0201", f"mean and std need {self.channels} values (one per channel)", ctx.span_of("mean"))
        if self.fit != "stretch" and (self.tiles or self.resolution != "fixed"):
            ctx.sink.error("E0201", f"fit = {self.fit} applies to a fixed square input; this encoder "
                           + ("tiles its images" if self.tiles else "reads images at their own resolution"),
                           ctx.span_of("fit"), help="remove `fit`")
        self._check_window(ctx)
        self._check_layout(ctx)
        self._check_qk_norm(ctx)
        self._check_pooled(ctx)
        for layer in self.feature.layers:
            if not (-(self.depth + 1) <= layer <= self.depth):
                ctx.sink.error("E0208", f"feature layer {layer} is out of range for an encoder of depth {self.depth}",
                               ctx.span_of("feature"),
                               help=f"hidden states are numbered 0..{self.depth} (or -1..-{self.depth + 1} from the end)")

    @property
    def pool_source(self) -> Literal["head", "class_token"] | None:
        """What `feature = pooled` reads: SigLIP's attention-pooling head, else the class token through the
        post-LayerNorm (CLIP), else nothing this encoder has."""
        if getattr(self, "pool_head", False):
            return "head"
        return "class_token" if self.class_token and self.post_norm else None

    def _check_pooled(self, ctx: ShapeContext) -> None:
        """`feature = pooled` needs a pooled output, over one fixed square image."""
        if not self.feature.pooled:
            return
        if self.pool_source is None:
            fix = ("set `pool_head = true` (SigLIP's attention-pooling head)" if self.kind == "siglip"
                   else "keep `class_token = true` and `post_norm = true`")
            ctx.sink.error("E0223", f"feature = pooled: this `{self.kind}` encoder has neither a pooling head nor a "
                           "class token with a post-LayerNorm to pool", ctx.span_of("feature"),
                           help=fix + ", or select tokens, e.g. `feature = layer(-1).patches`")
        other = ("tiles" if self.tiles else "resolution = dynamic(...)" if self.resolution != "fixed"
                 else f"layout = {self.layout.call}(...)" if not isinstance(self.layout, str)
                 else "video = frames(...)" if self.video is not None else None)
        if other:
            ctx.sink.error("E0224", f"feature = pooled gives one vector per fixed square image; it cannot go with "
                           f"{other}", ctx.span_of("feature"), help=f"drop {other.split(' =')[0]}, or select tokens")

    def _check_layout(self, ctx: ShapeContext) -> None:
        """An image layout cuts images into whole `image_size` tiles, each a grid of whole patches with no
        class token among them, and replaces the other ways of reading images of any size."""
        if isinstance(self.layout, str):
            return
        bad = [p for p in getattr(self.layout, "pinpoints", []) if p[0] % self.image_size or p[1] % self.image_size]
        if bad:
            ctx.sink.error("E0217", f"pinpoint {list(bad[0])} is not [height, width] in whole tiles of image_size "
                           f"{self.image_size}", ctx.span_of("layout"),
                           help=f"use multiples of {self.image_size}, e.g. [{self.image_size}, {2 * self.image_size}]")
        other = ("tiles" if self.tiles else "resolution = dynamic(...)" if self.resolution != "fixed"
                 else f"fit = {self.fit}" if self.fit != "stretch"
                 else "feature `.all` with a class token" if self.class_token and self.feature.tokens == "all"
                 else None)
        if other:
            call = self.layout.call
            ctx.sink.error("E0218", f"layout = {call}(...) cannot go with {other}", ctx.span_of("layout"),
                           help=f"{call} lays out whole grids of patch tokens: drop the other setting")

    @property
    def fused_qkv(self) -> bool:
        """Whether the attention is one fused `qkv` projection (EVA's, and Qwen2-VL's `rope2d` tower): what
        each kind's builder in `vlmspec.runtime.vision` builds."""
        return self.position == "rope2d"

    def _check_qk_norm(self, ctx: ShapeContext) -> None:
        """The query / key norms sit between separate q and k projections and the heads; a fused `qkv`
        projection (EVA, rope2d) has no such place in its checkpoints' layout."""
        if self.qk_norm and self.fused_qkv:
            why = "an `eva` encoder" if self.kind == "eva" else "a `position = rope2d` encoder"
            ctx.sink.error("E0221", f"qk_norm needs separate q and k projections; {why} has one fused `qkv`",
                           ctx.span_of("qk_norm"), help="drop `qk_norm`")

    def _check_window(self, ctx: ShapeContext) -> None:
        """Window attention is defined on a grid of whole patches with no class token or tiles; a full layer
        names a real layer once, and only means something when there are windows."""
        if self.window and self.window % self.patch_size:
            lo = self.window // self.patch_size * self.patch_size
            ctx.sink.error("E0213", f"window = {self.window} pixels is not a whole number of {self.patch_size}-pixel "
                           "patches", ctx.span_of("window"),
                           help=f"use window = {lo + self.patch_size}" + (f" or {lo}" if lo else ""))
        bad = [i for i in self.full_layers if not 0 <= i < self.depth]
        twice = sorted({i for i in self.full_layers if self.full_layers.count(i) > 1})
        if bad or twice:
            what = (f"layer {bad[0]} is not one of the {self.depth} layers" if bad
                    else f"layer {twice[0]} is listed twice")
            ctx.sink.error("E0214", f"full_layers: {what}", ctx.span_of("full_layers"),
                           help=f"layers are numbered 0..{self.depth - 1}, each listed once")
        if self.full_layers and not self.window:
            ctx.sink.error("E0215", "full_layers without window attention: every layer already attends over the "
                           "whole image", ctx.span_of("full_layers"),
                           help="set `window` (in pixels), or drop `full_layers`")
        if self.window and (self.class_token or self.tiles):
            what = "a class token" if self.class_token else "tiles"
            ctx.sink.error("E0216", f"window attention cuts a grid of patches into windows; this encoder has {what}",
                           ctx.span_of("window"),
                           help="set `class_token = false`" if self.class_token else "drop `tiles` or `window`")

    def block_tokens(self) -> int | None:
        """Tokens the blocks run over per image when that is not the output's count: a pooled tower's patches
        (and class token) leave as one vector. None: the output's tokens are what the blocks ran over."""
        return self.num_patches + int(self.class_token) if self.feature.pooled else None

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        if self.feature.pooled:
            return TokenShape(1, self.width)
        tokens = self.num_patches
        if self.class_token and self.feature.tokens == "all":
            tokens += 1
        dynamic = self.resolution != "fixed"
        if isinstance(self.resolution, DynamicResolution):
            tokens = self.resolution.max_pixels // (self.patch_size * self.patch_size)
        if self.tiles:
            tokens *= self.tiles
        # (layout, tile size, patch size): what the connector needs to count the laid-out tokens
        layout = (self.layout, self.image_size, self.patch_size) if not isinstance(self.layout, str) else None
        # a laid-out encoder's tokens are per tile; the connector that reads them lays the tiles out
        return TokenShape(tokens, self.width * len(self.feature.layers), dynamic, layout)

    @property
    def tiles_in_use(self) -> tuple[int, ...]:
        """Tiles each aspect-ratio id puts to use: id k >= 1 is the k-th layout (w, h) with w * h <= tiles,
        in Mllama's order; id 0 (a padding image) keeps its first tile, as Mllama's processor marks it."""
        t = self.tiles
        return (1, *(w * h for w in range(1, t + 1) for h in range(1, t + 1) if w * h <= t))

    @property
    def aspect_ratios(self) -> int:
        """Tile layouts (w x h with w * h <= tiles) that get an aspect-ratio embedding, as in Mllama."""
        return sum(self.tiles // a for a in range(1, self.tiles + 1))

    def norm_params(self) -> int:
        """One normalisation layer: LayerNorm's weight and bias, or RMSNorm's weight alone."""
        return self.width if self.norm == "rms" else layernorm(self.width)

    def mlp_params(self) -> int:
        """One block's MLP: fc1 / fc2, or gate / up / down when `gated_mlp`."""
        w, m = self.width, self.mlp_dim
        return (2 if self.gated_mlp else 1) * linear(w, m) + linear(m, w)

    @property
    def out_bias(self) -> bool:
        """Whether the attention's output projection has a bias (with `attn_bias`, except in InternViT)."""
        return self.attn_bias

    @property
    def post_norm_kind(self) -> Literal["layer", "rms"]:
        """The post-norm's kind: `norm`'s, except in InternViT (always LayerNorm)."""
        return self.norm

    def attn_params(self) -> int:
        """One block's attention: q, k, v and output projections, plus the query / key norms."""
        w = self.width
        return 3 * linear(w, w, self.attn_bias) + linear(w, w, self.out_bias) + (2 * w if self.qk_norm else 0)

    def layer_params(self) -> int:
        scales = 2 * self.width if self.layer_scale else 0
        return self.attn_params() + self.mlp_params() + 2 * self.norm_params() + scales

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        w = self.width
        embed = self.channels * self.temporal_patch * self.patch_size**2 * w + (w if self.patch_bias else 0)
        if self.class_token:
            embed += w
        if self.position == "learned":
            embed += (self.num_patches + (1 if self.class_token else 0)) * w
        out = {"embeddings": embed, "layers": self.depth * self.layer_params() + 2 * self.global_layers}
        if self.tiles:
            # Mllama: a per-tile position embedding and pre- / post-encoder tile embeddings for every
            # aspect ratio (plus one padding row), each with a scalar tanh gate
            rows, positions = self.aspect_ratios + 1, self.num_patches + (1 if self.class_token else 0)
            out["tile_embeddings"] = rows * self.tiles * positions * w + 2 * rows * self.tiles * w + 3
        post = (self.width if self.post_norm_kind == "rms" else layernorm(self.width)) if self.post_norm else 0
        norms = int(self.pre_norm) * self.norm_params() + post
        if norms:
            out["norms"] = norms
        return out

    def part_params(self, sub: str, parts: dict[str, int], llm: Any = None) -> int:
        if sub == "attn":
            return self.depth * self.attn_params()
        if sub == "mlp":
            return self.depth * self.mlp_params()
        if sub == "norm":
            return parts.get("norms", 0)
        if sub == "embeddings":  # a tiled encoder's tile and tile-position embeddings sit with the patches'
            return parts.get("embeddings", 0) + parts.get("tile_embeddings", 0)
        return super().part_params(sub, parts, llm)

    def subpaths(self) -> list[str]:
        return ["embeddings", "layers", "attn", "mlp", "norm"]

    def lora_targets(self) -> list[str]:
        return ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2"]


@register
class ViT(ViTBase):
    """CLIP-style ViT: class token, pre-LayerNorm, QuickGELU (CLIP ViT-L/14, OpenCLIP ViT-H/14)."""

    kind = "vit"
    summary = "CLIP-style ViT with a class token and pre-LayerNorm"


@register
class SigLIP(ViTBase):
    """SigLIP: no class token, no pre-LayerNorm, tanh-GELU, biased patch embedding."""

    kind = "siglip"
    summary = "SigLIP ViT: no class token, optional attention-pooling head"
    class_token: bool = Field(default=False, description="prepend a learned class token")
    pre_norm: bool = Field(default=False, description="LayerNorm on the embeddings before the first layer")
    patch_bias: bool = Field(default=True, description="bias in the patch-embedding convolution")
    act: Literal["quick_gelu", "gelu", "gelu_tanh", "silu"] = Field(default="gelu_tanh", description="MLP activation")
    norm_eps: float = Field(default=1e-6, gt=0, description="LayerNorm epsilon")
    mean: list[float] = Field(default=[0.5, 0.5, 0.5], min_length=1, description="per-channel normalisation mean")
    std: list[float] = Field(default=[0.5, 0.5, 0.5], min_length=1, description="per-channel normalisation std")
    pool_head: bool = Field(default=False, description="keep SigLIP's attention-pooling head (what `feature = pooled` reads; unused by VLMs)")
    feature_norm: bool = Field(default=True, description="the last layer's tokens pass through the post-LayerNorm "
                               "when `feature` selects them (LLaVA reads SigLIP before it: `false`)")

    @property
    def fused_qkv(self) -> bool:
        return False

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        out = super().params(ctx)
        if self.pool_head:
            w, m = self.width, self.mlp_dim
            out["head"] = w + 3 * w * w + 3 * w + linear(w, w) + layernorm(w) + linear(w, m) + linear(m, w)
        return out


@register
class EVA(ViTBase):
    """EVA-CLIP as used by BLIP-2, InstructBLIP and MiniGPT-4: fused QKV with q/v biases, no pre-LN."""

    kind = "eva"
    summary = "EVA ViT (BLIP-2 layout): fused QKV with q and v biases"
    pre_norm: bool = Field(default=False, description="LayerNorm on the embeddings before the first layer")
    patch_bias: bool = Field(default=True, description="bias in the patch-embedding convolution")
    act: Literal["quick_gelu", "gelu", "gelu_tanh", "silu"] = Field(default="gelu", description="MLP activation")
    norm_eps: float = Field(default=1e-6, gt=0, description="LayerNorm epsilon")
    feature_norm: bool = Field(default=True, description="the last layer's tokens pass through the post-LayerNorm "
                               "when `feature` selects them (as BLIP-2 reads it)")

    @property
    def fused_qkv(self) -> bool:
        return True

    def attn_params(self) -> int:
        w = self.width
        # fused QKV whose bias is stored whole as [q_bias, 0, v_bias] (as in HF Blip2), then the output projection
        return linear(w, 3 * w) + linear(w, w)


INTERNVIT_MEAN = [0.485, 0.456, 0.406]
INTERNVIT_STD = [0.229, 0.224, 0.225]


@register
class InternViT(ViTBase):
    """InternViT (InternVL 2.5's tower): class token, no pre-norm, layer scale, a biased output projection.

    Two things differ from the other kinds without a switch of their own, because InternVL's
    configs cannot vary them: the attention's output projection is biased even with `attn_bias = false`
    (that field covers q, k and v, as InternVL's `attention_bias` does), and the post-norm is a LayerNorm
    even with `norm = rms` (transformers' `InternVLVisionModel` builds its final norm so whatever its
    `norm_type`, which sets the blocks' norms alone)."""

    kind = "internvit"
    summary = "InternViT (InternVL): class token, layer scale, optional qk-norm"
    pre_norm: bool = Field(default=False, description="LayerNorm on the embeddings before the first layer")
    post_norm: bool = Field(default=False, description="LayerNorm after the last layer (InternVL's "
                            "`use_mean_pooling = true` checkpoints have none)")
    patch_bias: bool = Field(default=True, description="bias in the patch-embedding convolution")
    act: Literal["quick_gelu", "gelu", "gelu_tanh", "silu"] = Field(default="gelu", description="MLP activation")
    norm_eps: float = Field(default=1e-6, gt=0, description="LayerNorm epsilon")
    feature_norm: bool = Field(default=True, description="the last layer's tokens pass through the post-LayerNorm "
                               "when `feature` selects them (with `post_norm`, as InternVL reads its tower)")
    layer_scale: bool = Field(default=True, description="learned per-channel scales on each block's attention "
                              "and MLP outputs before they join the residual (InternViT's `lambda_1`, `lambda_2`)")
    mean: list[float] = Field(default=INTERNVIT_MEAN, min_length=1, description="per-channel normalisation mean")
    std: list[float] = Field(default=INTERNVIT_STD, min_length=1, description="per-channel normalisation std")

    @property
    def fused_qkv(self) -> bool:
        return False

    @property
    def out_bias(self) -> bool:
        return True

    @property
    def post_norm_kind(self) -> Literal["layer", "rms"]:
        return "layer"


def _divisors_hint(width: int, heads: int) -> str:
    near = [h for h in range(max(1, heads - 8), heads + 9) if width % h == 0]
    best = sorted(near, key=lambda h: abs(h - heads))[:3]
    return "heads that divide width " + str(width) + ": " + ", ".join(map(str, sorted(best)))
