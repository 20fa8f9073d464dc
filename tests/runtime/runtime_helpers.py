"""Tiny specs for the runtime tests (written here, not read from specs/), and input builders.

Each case is one spec: a vision encoder, a connector, a language model and a fusion, small enough
that building, a training step and two 8-token generations take well under a second on one core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmspec.compiler.compile import Analysis, load_analysis

SPECS = Path(__file__).resolve().parents[2] / "specs"

VISION = {
    "vit": "vision enc = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64"
           "  feature = layer(-2).patches }",
    "siglip": "vision enc = siglip { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64"
              "  feature = layer(-1).patches  pool_head = true }",
    "eva": "vision enc = eva { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64"
           "  feature = layer(-1).all }",
    "rope2d": "vision enc = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64"
              "  position = rope2d  temporal_patch = 2  feature = layers([-1, -2]).patches }",
    "tiles": "vision enc = vit { image_size = 16  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64"
             "  tiles = 2  feature = layers([1, 2]).all }",
    "dynamic": "vision enc = siglip { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64"
               "  resolution = dynamic(min_pixels = 256, max_pixels = 4096) }",
}
CONNECTOR = {
    "linear": "connector proj = linear(enc -> llm)",
    "mlp": "connector proj = mlp(enc -> llm) { layers = 3  norm = true  hidden = 40 }",
    "qformer": "connector proj = qformer(enc -> llm) { queries = 4  width = 32  depth = 2  heads = 2  mlp = 64"
               "  cross_every = 2 }",
    "qformer_instruct": "connector proj = qformer(enc -> llm) { queries = 4  width = 32  depth = 2  heads = 2"
                        "  mlp = 64  cross_every = 1  instruction = true  text_vocab = 50  max_text = 16 }",
    "perceiver": "connector proj = perceiver(enc -> llm) { latents = 4  depth = 1  heads = 2  head_dim = 16"
                 "  project = true }",
    "perceiver_qk": "connector proj = perceiver(enc -> llm) { latents = 4  depth = 2  heads = 2  head_dim = 16"
                    "  qk_norm = true }",
    "perceiver_raw": "connector proj = perceiver(enc -> llm) { latents = 4  depth = 1  heads = 2  head_dim = 16 }",
    "patch_merger": "connector proj = patch_merger(enc -> llm) { merge = 2 }",
    "pixel_shuffle": "connector proj = pixel_shuffle(enc -> llm) { scale = 2 }",
    "ldp": "connector proj = ldp(enc -> llm) { pool = 2 }",
    "c_abstractor": "connector proj = c_abstractor(enc -> llm) { queries = 4  depth = 1  hidden = 24 }",
    "conv": "connector proj = conv(enc -> llm) { stride = 2 }",
}
_LM = "width = 48  heads = 4  ffn = 96  vocab = 300  max_positions = 128"
LANGUAGE = {
    "llama": f"language llm = llama {{ {_LM}  depth = 2 }}",
    "qwen": f"language llm = llama {{ {_LM}  depth = 3  kv_heads = 2  qkv_bias = true  tie_embeddings = true"
            "  extra_vocab = 2  rope_theta = 1000000.0 }",
    "mrope": f"language llm = llama {{ {_LM}  depth = 2  kv_heads = 2  head_dim = 16  rope = mrope(sections = [2, 3, 3]) }}",
    "gemma": f"language llm = gemma {{ {_LM}  depth = 2  head_dim = 16 }}",
    "opt": f"language llm = opt {{ {_LM}  depth = 2  embed_dim = 32 }}",
    "phi": f"language llm = phi {{ {_LM}  depth = 2  partial_rotary = 0.5 }}",
    "llama_moe": f"language llm = llama {{ {_LM}  depth = 4  moe {{ experts = 4  top_k = 2  every = 2  offset = 1"
                 "  shared = 1 } }",
    "phi_moe_ffn": f"language llm = phi {{ {_LM}  depth = 2  moe {{ experts = 3  top_k = 1  ffn = 64 }} }}",
}
FUSION = {
    "prefix": "fusion prefix(proj -> llm)",
    "cross_attention": "fusion xattn = cross_attention(proj -> llm) { every = 2  qk_norm = true }",
    "visual_expert": "fusion ve = visual_expert(proj -> llm)",
    "moe": "fusion experts = moe(proj -> llm) { experts = 3  top_k = 2  every = 1  shared = 1 }",
}
STAGES = {
    "prefix": "stage align { train proj  freeze enc, llm }\n  stage full { train proj, llm  freeze enc }",
    "cross_attention": "stage pretrain { train proj, fusion  freeze enc, llm }",
    "visual_expert": "stage pretrain { train proj, fusion  freeze enc, llm }",
    "moe": "stage moe { train fusion  freeze enc, proj, llm  upcycle llm.mlp -> fusion }",
    "llm_moe": "stage moe { train llm.moe  freeze enc, proj, llm  upcycle llm.mlp -> llm.moe }",
}


@dataclass(frozen=True)
class Case:
    vision: str = "vit"
    connector: str = "mlp"
    language: str = "llama"
    fusion: str = "prefix"
    extra: list[str] = field(default_factory=list)

    def text(self) -> str:
        stages = STAGES["llm_moe" if "moe {" in LANGUAGE[self.language] else self.fusion]
        lines = [VISION[self.vision], CONNECTOR[self.connector], LANGUAGE[self.language], FUSION[self.fusion],
                 *self.extra, stages]
        return "model m {\n  " + "\n  ".join(lines) + "\n}\n"


#: One case per connector kind, vision kind, language kind and fusion style (and a few combinations).
CASES: dict[str, Case] = {
    "connector-linear": Case(vision="eva", connector="linear"),
    "connector-mlp": Case(),
    "connector-qformer": Case(vision="eva", connector="qformer"),
    "connector-qformer-instruct": Case(vision="eva", connector="qformer_instruct"),
    "connector-perceiver": Case(vision="eva", connector="perceiver"),
    "connector-patch_merger": Case(connector="patch_merger"),
    "connector-pixel_shuffle": Case(connector="pixel_shuffle"),
    "connector-ldp": Case(connector="ldp"),
    "connector-c_abstractor": Case(connector="c_abstractor"),
    "connector-conv": Case(connector="conv"),
    "vision-siglip": Case(vision="siglip"),
    "vision-rope2d-temporal": Case(vision="rope2d"),
    "vision-tiles-cross_attention": Case(vision="tiles", connector="linear", fusion="cross_attention"),
    "lm-qwen-gqa-tied-extra": Case(language="qwen"),
    "lm-mrope": Case(language="mrope", connector="patch_merger"),
    "lm-gemma": Case(language="gemma"),
    "lm-opt": Case(language="opt"),
    "lm-phi": Case(language="phi"),
    "fusion-prefix-llm-moe": Case(language="llama_moe"),
    "fusion-prefix-phi-moe-ffn": Case(language="phi_moe_ffn"),
    "fusion-cross_attention": Case(fusion="cross_attention"),
    "fusion-cross_attention-gemma-perceiver": Case(language="gemma", fusion="cross_attention",
                                                   connector="perceiver_raw"),
    "fusion-cross_attention-perceiver-qk_norm": Case(vision="eva", fusion="cross_attention", connector="perceiver_qk"),
    "fusion-visual_expert": Case(fusion="visual_expert"),
    "fusion-visual_expert-phi": Case(language="phi", fusion="visual_expert"),
    "fusion-moe": Case(fusion="moe"),
    "fusion-moe-opt": Case(language="opt", fusion="moe"),
}


def analyse(tmp_path: Path, text: str, model: str = "m") -> Analysis:
    path = tmp_path / "spec.vlm"
    path.write_text(text)
    analysis, _ = load_analysis(f"{path}:{model}")
    return analysis


def image_tokens(analysis: Analysis) -> int:
    """Image placeholder tokens one image needs in a prompt (1 marker for cross-attention)."""
    fusion = analysis.ir.by_role("fusion")[0]
    anyres = [v.config for v in analysis.ir.by_role("vision") if not isinstance(getattr(v.config, "layout", "fixed"), str)]
    if anyres:  # `pixels` gives plain images, which an anyres model reads as base tiles alone (+ the newline)
        v = anyres[0]
        if not hasattr(v.layout, "newline"):  # a tile layout (dynamic_tiles, split): a plain image is one tile
            return int(analysis.shapes.out[fusion.name].tile_tokens)
        return v.num_patches + int(v.layout.newline)
    return analysis.shapes.out[fusion.name].tokens if type(fusion.config).in_sequence else 1


def prompts(image_token_id: int, n_image: int, batch: int = 2, text: int = 6, pad_step: int = 2,
            seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts [b x s]: row i has `pad_step * i` pad tokens, bos, the image tokens, then
    `text - pad_step * i` text tokens, so every row has the same length."""
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for i in range(batch):
        pad = pad_step * i
        words = torch.randint(3, image_token_id - 1, (text - pad,), generator=g)
        row = torch.cat([torch.zeros(pad, dtype=torch.long), torch.tensor([1]),
                         torch.full((n_image,), image_token_id), words])
        mask = torch.ones_like(row)
        mask[:pad] = 0
        rows.append(row)
        masks.append(mask)
    return torch.stack(rows), torch.stack(masks)


def pixels(analysis: Analysis, batch: int = 2, seed: int = 2) -> torch.Tensor | dict[str, torch.Tensor]:
    """Random images for every vision encoder: one tensor, or a dict when encoders differ in input shape."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for comp in analysis.ir.by_role("vision"):
        enc = comp.config
        tiles = (enc.tiles,) if getattr(enc, "tiles", 0) else ()
        shapes[comp.name] = (batch, *tiles, enc.channels, enc.image_size, enc.image_size)
    if len(set(shapes.values())) == 1:
        return torch.randn(*next(iter(shapes.values())), generator=g)
    return {name: torch.randn(*shape, generator=g) for name, shape in shapes.items()}


def labels_for(ids: torch.Tensor, mask: torch.Tensor, image_token_id: int) -> torch.Tensor:
    return ids.masked_fill(mask == 0, -100).masked_fill(ids == image_token_id, -100)
