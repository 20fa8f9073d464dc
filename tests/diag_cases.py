"""One small spec per diagnostic code: the test renders each and compares with tests/snapshots/CODE.txt."""

BASE_PARTS = {
    "vision": "  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64 }\n",
    "connector": "  connector proj = mlp(clip -> llm) { layers = 2 }\n",
    "language": "  language llm = llama { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512  max_positions = 256 }\n",
    "fusion": "  fusion prefix(proj -> llm)\n",
    "stages": "  stage align { train proj  freeze clip, llm  optim adamw(lr = 1e-3) }\n",
}


def spec(**replace: str) -> str:
    parts = {**BASE_PARTS, **replace}
    return "model tiny {\n" + "".join(parts.values()) + "}\n"


CASES: dict[str, str] = {
    # syntax
    "E0001": spec(connector="  connector proj = mlp(clip -> llm) { layers: 2 }\n"),
    "E0002": "model tiny {\n  vision clip = vit {\n    width = 32\n",
    "E0006": spec(language="  language llm = llama { width = " + "1 + " * 101 + "48"
                  + "  depth = 2  heads = 4  ffn = 96  vocab = 512 }\n"),
    "E0003": spec(connector="  connector proj = mlp(clip -> llm) { layers = }\n"),
    "E0008": spec(language="  language llm = llama { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 1"
                  + "0" * 300 + " }\n"),
    # names
    "E0101": spec(fusion="  fusion prefix(porj -> llm)\n"),
    "E0102": spec(connector="  connector proj = mlp(clip -> llm)\n  connector proj = linear(clip -> llm)\n"),
    "E0103": "model tiny extends llava_bsae {\n}\n",
    "E0104": spec(connector="  connector proj = mlp(clip -> llm) { layer = 2 }\n"),
    "E0105": spec(connector="  connector proj = mpl(clip -> llm)\n"),
    "E0106": 'import "missing/base.vlm"\n' + spec(),
    "E0107": "model a extends b {\n}\nmodel b extends a {\n}\n",
    "E0108": spec(vision="  vision clip = vit { image_size = 32  patch_size = 8  width = proj.out  depth = 2  heads = 2 }\n",
                  connector="  connector proj = mlp(clip -> llm) { out = clip.width }\n"),
    "E0109": spec(connector="  connector proj = mlp(clip -> llm) { hidden = llm.widht * 2 }\n"),
    # types and shapes
    "E0201": spec(connector="  connector proj = mlp(clip -> llm) { layers = \"two\" }\n"),
    "E0202": spec(connector="  connector proj = mlp(clip -> llm) { layers = 0 }\n"),
    "E0203": spec(connector="  connector proj = mlp(clip -> llm) { out = 64 }\n"),
    "E0204": spec(fusion="  fusion prefix(proj -> llm) { tokens = 576 }\n"),
    "E0205": spec(vision="  vision clip = vit { image_size = 30  patch_size = 8  temporal_patch = 2  width = 32  depth = 2  heads = 2 }\n"),
    "E0206": spec(language="  language llm = llama { width = 50  depth = 2  heads = 4  ffn = 96  vocab = 512 }\n"),
    "E0207": spec(language="  language llm = llama { width = 48  depth = 2  heads = 4  kv_heads = 3  ffn = 96  vocab = 512 }\n"),
    "E0208": spec(vision="  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "feature = layer(-5).patches }\n"),
    "E0209": spec(language="  language llm = llama { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512  "
                           "rope = mrope(sections = [2, 2, 3]) }\n"),
    "E0211": spec(language="  language llm = llama { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512  "
                           "max_positions = 8 }\n"),
    "E0212": spec(language="  language llm = llama { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 1"
                  + "0" * 150 + " * 1" + "0" * 150 + " }\n"),
    "E0213": spec(vision="  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "class_token = false  window = 20 }\n"),
    "E0214": spec(vision="  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "class_token = false  window = 16  full_layers = [2] }\n"),
    "E0215": spec(vision="  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "full_layers = [1] }\n"),
    "E0216": spec(vision="  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "window = 16 }\n"),
    "E0217": spec(vision="  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "layout = anyres(pinpoints = [[32, 48]]) }\n"),
    "E0218": spec(vision="  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "fit = crop  layout = anyres(pinpoints = [[32, 64]]) }\n"),
    "E0219": spec(vision="  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "layout = anyres(pinpoints = [[32, 64]]) }\n"
                         "  vision clip2 = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2 }\n",
                  connector="  connector proj = mlp(clip + clip2 -> llm) { layers = 2  merge = concat }\n"),
    "E0220": spec(vision="  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "layout = anyres(pinpoints = [[32, 64]]) }\n",
                  connector="  connector proj = linear(clip -> llm)\n"),
    "E0221": spec(vision="  vision clip = eva { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "qk_norm = true }\n"),
    # activation checkpointing (stages)
    "E0230": spec(stages="  stage align { train proj, llm  freeze clip  activation_checkpointing = [lm] }\n"),
    "E0231": spec(stages="  stage align { train proj, llm  freeze clip  activation_checkpointing = [llm, proj] }\n"),
    "E0232": spec(stages="  stage align { train proj  freeze clip, llm  activation_checkpointing = [clip] }\n"),
    # graph and fusion rules
    "E0301": spec(fusion="  fusion cross_attention(proj -> llm) { layers = [1, 5] }\n"),
    "E0302": spec(language="  language llm = llama { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512  "
                           "moe { experts = 2  top_k = 4 } }\n"),
    "E0303": spec(language="  language llm = llama { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512  "
                           "moe { experts = 4 } }\n",
                  fusion="  fusion moe(proj -> llm)\n"),
    "E0304": spec(fusion=""),
    "E0305": spec(connector="  connector proj = mlp(clip + back -> llm)\n  connector back = linear(proj -> proj)\n"),
    "E0310": spec(vision="  vision clip = vit(img -> proj) { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2 }\n"),
    "E0311": spec(connector="  connector proj = mlp { layers = 2 }\n"),
    "E0312": spec(fusion="  fusion prefix(proj -> clip)\n"),
    "E0313": spec(language=""),
    "E0314": spec(connector="  connector pre = linear(clip -> proj)\n  connector proj = mlp(clip -> llm)\n"),
    # stages
    "E0401": spec(stages="  stage align { train proj  freeze clip }\n"),
    "E0402": spec(stages="  stage align { freeze clip, llm, proj }\n"),
    "E0403": spec(stages="  stage align { train proj  freeze clip  lora llm(rank = 8, targets = [attn.qq]) }\n"),
    "E0404": spec(stages="  stage align { train proj  freeze clip, llm }\n  stage two extends algin { train llm }\n"),
    "E0406": spec(stages="  stage align { train proj  freeze clip, llm, llm.atn }\n"),
    "E0407": spec(stages="  stage align { train proj  freeze clip, llm  upcycle llm.mlp -> llm.moe }\n"),
    "E0408": spec(stages="  stage align { train proj  freeze clip, llm  objective lm + itx }\n"),
    "E0409": spec(stages="  stage align { train proj  freeze clip, llm  objective itc + itm }\n"),
    "E0411": spec(stages="  stage align { train proj, fusion(lr = 1e-4)  freeze clip, llm }\n"),
    "E0410": spec(connector="  connector qf = qformer(clip -> llm) { queries = 4  width = 32  depth = 2  heads = 2  "
                  "mlp = 64  text_ffn = false }\n",
                  fusion="  fusion prefix(qf -> llm)\n",
                  stages="  stage align { train qf  freeze clip, llm  objective itc + itm }\n"),
    # warnings
    "W0111": spec(language="  language llm = llama { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512  "
                  "max_positions = 256  weights = \"checkpoints/vicuna-tiny\" }\n"),
    "W0301": spec(vision=BASE_PARTS["vision"] + "  vision extra = siglip { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2 }\n"),
}
