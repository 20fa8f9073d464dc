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


#: a Qwen2-VL-style encoder reading videos, its `frames(...)` filled in per case, and its 2 x 2 merger
VIDEO_VIT = ("  vision clip = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
             "position = rope2d  class_token = false  temporal_patch = 2  "
             "resolution = dynamic(min_pixels = 1024, max_pixels = 4096)  video = frames({}) }}\n")
VIDEO_MERGER = "  connector proj = patch_merger(clip -> llm) { merge = 2 }\n"
#: a fixed-square encoder reading videos as LLaVA-OneVision does (`frames(pool = ...)`)
POOLED_VIT = ("  vision clip = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
              "class_token = false  video = frames({}) }}\n")

#: a tiny Whisper-style audio encoder named like the base spec's vision encoder (so its connector reads it)
AUDIO = "  audio clip = whisper { mels = 16  width = 32  depth = 2  heads = 2  mlp = 64  seconds = 1  pool = 2 }\n"

#: a tiny CLIP: an image tower and a text tower compared by a contrastive head (no language model)
CLIP_PARTS = {
    "vision": "  vision img = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64  "
              "feature = pooled }\n",
    "text": "  text txt = clip_text { width = 32  depth = 2  heads = 2  vocab = 260  max_positions = 16  "
            "eos_token_id = 2 }\n",
    "fusion": "  fusion contrastive(img + txt) { dim = 16 }\n",
    "stages": "  stage pretrain { train img, txt, fusion  objective contrastive }\n",
}


def clip_spec(**replace: str) -> str:
    parts = {**CLIP_PARTS, **replace}
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
    # text towers and pooled image towers (CLIP / SigLIP)
    "E0222": clip_spec(text="  text txt = clip_text { width = 32  depth = 2  heads = 2  vocab = 260  max_positions = 16  "
                            "eos_token_id = 300 }\n"),
    "E0225": clip_spec(text="  text txt = clip_text { width = 32  depth = 2  heads = 2  vocab = 260  max_positions = 16  "
                            "pool = argmax  eos_token_id = 259 }\n"),
    "E0223": clip_spec(vision="  vision img = siglip { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                              "mlp = 64  feature = pooled }\n"),
    "E0224": clip_spec(vision="  vision img = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                              "mlp = 64  feature = pooled  tiles = 2 }\n"),
    # dinov2 and convnext encoders
    "E0240": spec(vision="  vision clip = convnext { image_size = 64  dims = [8, 16, 24, 32]  depths = [1, 1, 2] }\n"),
    "E0241": spec(vision="  vision clip = dinov2 { image_size = 28  patch_size = 7  width = 32  depth = 2  heads = 2  "
                         "registers = -4 }\n"),
    "E0242": spec(vision="  vision clip = dinov2 { image_size = 28  patch_size = 7  width = 32  depth = 2  heads = 2  "
                         "position = rope2d }\n"),
    "E0243": spec(vision="  vision clip = convnext { image_size = 48  dims = [8, 16, 24, 32]  depths = [1, 1, 1, 1] }\n"),
    "E0244": spec(vision="  vision clip = convnext { image_size = 64  dims = [8, 16, 24, 32]  depths = [1, 1, 1, 1]  "
                         "out_stage = 4 }\n"),
    "E0245": spec(language="  language llm = mamba { width = 48  depth = 2  vocab = 512  max_positions = 256 }\n",
                  fusion="  fusion visual_expert(proj -> llm)\n"),
    "E0246": spec(language="  language llm = mamba { width = 48  depth = 2  vocab = 512  max_positions = 256 }\n",
                  fusion="  fusion prefix(proj -> llm) { prefix_attention = bidirectional }\n"),
    # the encoder-decoder (t5) language model
    "E0255": spec(language="  language llm = t5 { width = 48  depth = 2  heads = 4  head_dim = 12  ffn = 96  vocab = 512 }\n",
                  fusion="  fusion cross_attention(proj -> llm) { every = 1 }\n"),
    "E0256": spec(language="  language llm = t5 { width = 48  depth = 2  heads = 4  head_dim = 12  ffn = 96  vocab = 512 }\n",
                  fusion="  fusion prefix(proj -> llm) { prefix_attention = bidirectional }\n"),
    "E0257": spec(language="  language llm = t5 { width = 48  depth = 2  heads = 4  head_dim = 12  ffn = 96  vocab = 512  "
                           "max_distance = 16 }\n"),
    "E0258": spec(language="  language llm = t5 { width = 48  depth = 2  heads = 4  head_dim = 12  ffn = 96  vocab = 512  "
                           "decoder_start = 512 }\n"),
    # Pixtral's ViT
    "E0260": spec(vision="  vision clip = pixtral { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "mlp = 64  class_token = true }\n"),
    "E0261": spec(vision="  vision clip = pixtral { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "mlp = 64  resolution = fixed }\n"),
    "E0262": spec(vision="  vision clip = pixtral { image_size = 32  patch_size = 8  width = 36  depth = 2  heads = 6  "
                         "mlp = 64 }\n"),
    "E0264": spec(vision="  vision clip = pixtral { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "mlp = 64 }\n  vision clip2 = pixtral { image_size = 32  patch_size = 8  width = 32  depth = 2  "
                         "heads = 2  mlp = 64 }\n",
                  connector="  connector proj = pixtral_merger(clip + clip2 -> llm)\n",
                  stages="  stage align { train proj  freeze clip, clip2, llm  optim adamw(lr = 1e-3) }\n"),
    "E0263": spec(vision="  vision clip = pixtral { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "mlp = 64  end_token = \"[IMG_BREAK]\" }\n"),
    # SAM / ViTDet and DeepSeek-VL's hybrid aligner (two encoders paired token by token)
    "E0265": spec(vision="  vision clip = siglip { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2 }\n"
                         "  vision sam = sam { image_size = 64  patch_size = 8  width = 24  depth = 2  heads = 2  "
                         "window = 24  global_layers = [1]  neck = 8 }\n",
                  connector="  connector proj = hybrid(sam + clip -> llm)\n",
                  stages="  stage align { train proj  freeze clip, sam, llm  optim adamw(lr = 1e-3) }\n"),
    "E0266": spec(vision="  vision clip = sam { image_size = 64  patch_size = 8  width = 24  depth = 2  heads = 2  "
                         "window = 24  global_layers = [1, 2]  neck = 8  downsample = 4 }\n"),
    "E0267": spec(vision="  vision clip = sam { image_size = 64  patch_size = 8  width = 24  depth = 2  heads = 2  "
                         "window = 24  global_layers = [1]  neck = 8  global_neck = 1 }\n"),
    "E0268": spec(vision="  vision clip = sam { image_size = 64  patch_size = 8  width = 24  depth = 2  heads = 2  "
                         "window = 24  global_layers = [1]  neck = 8  downsample = 4 }\n",
                  connector="  connector proj = hybrid(clip -> llm)\n"),
    # video input (`video = frames(...)` on a dynamic-resolution encoder)
    "E0270": spec(vision="  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                         "video = frames(fps = 2) }\n"),
    "E0271": spec(vision=VIDEO_VIT.format("fps = 1, num_frames = 8"), connector=VIDEO_MERGER),
    "E0272": spec(vision=VIDEO_VIT.format("fps = 2, max_frames = 768"), connector=VIDEO_MERGER),
    "E0273": spec(vision=VIDEO_VIT.format("max_tokens = 2"), connector=VIDEO_MERGER),
    "E0274": spec(vision=VIDEO_VIT.format("max_tokens = 64, tokens_per_second = 2"), connector=VIDEO_MERGER),
    # LLaVA-OneVision's pooled frames (`frames(pool = 2)` on a fixed-resolution encoder)
    "E0275": spec(vision=VIDEO_VIT.format("num_frames = 8, pool = 2"), connector=VIDEO_MERGER),
    "E0276": spec(vision=POOLED_VIT.format("fps = 1, pool = 2")),
    "E0277": spec(vision=POOLED_VIT.format("num_frames = 64, pool = 2")),
    # encoder-free patches (Fuyu) and the persimmon language model
    "E0250": spec(vision="  vision clip = patches { patch_size = 8  layout = rows(canvas = [64, 60]) }\n",
                  connector="  connector proj = linear(clip -> llm)\n"),
    "E0251": spec(vision="  vision clip = patches { patch_size = 8  mean = [0.5, 0.5]  layout = rows(canvas = [64, 64]) }\n",
                  connector="  connector proj = linear(clip -> llm)\n"),
    "E0252": spec(language="  language llm = persimmon { width = 48  depth = 2  heads = 4  kv_heads = 2  ffn = 96  "
                           "vocab = 512  max_positions = 256 }\n"),
    "E0253": spec(language="  language llm = persimmon { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512  "
                           "max_positions = 256  partial_rotary = 0.05 }\n"),
    "E0254": spec(language="  language llm = persimmon { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512  "
                           "max_positions = 256  moe { experts = 2  top_k = 1 } }\n"),
    # kosmos2 language models and latent_queries connectors
    "E0290": spec(language="  language llm = kosmos2 { width = 48  depth = 2  heads = 4  kv_heads = 2  ffn = 96  "
                           "vocab = 512  max_positions = 256 }\n"),
    "E0291": spec(language="  language llm = kosmos2 { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512  "
                           "max_positions = 256  rope_theta = 10000 }\n"),
    "E0292": spec(connector="  connector proj = latent_queries(clip -> llm) { latents = 8  heads = 5 }\n"),
    "E0293": spec(language="  language llm = kosmos2 { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512  "
                           "max_positions = 256  moe { experts = 2  top_k = 1 } }\n"),
    # grounding: how the model writes a box (`boxes = ...`)
    "E0294": spec(fusion='  fusion prefix(proj -> llm)\n  boxes = coordinates(format = "[{x1}, {y1}, {w}, {h}]", scale = 100)\n'),
    "E0295": spec(fusion="  fusion prefix(proj -> llm)\n  boxes = patch_index(bins = 500)\n"),
    "E0296": spec(fusion='  fusion prefix(proj -> llm)\n  boxes = coordinates(format = "[{x1}, {y1}, {x2}, {y2}]", scale = "px")\n'),
    "E0297": spec(fusion='  fusion prefix(proj -> llm)\n  boxes = coordinates(format = "{x1}{y1}{x2}{y2}", scale = 100)\n'),
    "E0298": spec(vision="  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64"
                  "  fit = pad }\n",
                  fusion='  fusion prefix(proj -> llm)\n  boxes = coordinates(format = "[{x1}, {y1}, {x2}, {y2}]", '
                  'scale = "pixels")\n'),
    # contrastive pre-training (CLIP / SigLIP): `fusion contrastive(img + txt)`, no language model
    "E0283": spec(connector="  connector proj = mlp(clip) { layers = 2 }\n"),
    "E0284": clip_spec(fusion="  fusion contrastive(img + txt -> txt) { dim = 16 }\n"),
    "E0285": clip_spec(vision="  vision img = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  "
                       "mlp = 64  feature = pooled }\n  vision img2 = vit { image_size = 32  patch_size = 8  width = 32  "
                       "depth = 2  heads = 2  mlp = 64  feature = pooled }\n",
                       fusion="  fusion contrastive(img + img2) { dim = 16 }\n"),
    "E0286": clip_spec(stages="  language llm = llama { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512 }\n"),
    "E0287": clip_spec(fusion="  fusion contrastive(img + txt) { dim = 16  loss = softmax  bias = -10.0 }\n"),
    "E0288": clip_spec(fusion="  fusion contrastive(img + txt) { loss = sigmoid }\n",
                       text="  text txt = siglip_text { width = 48  depth = 2  heads = 2  vocab = 260  "
                       "max_positions = 16 }\n"),
    "E0289": clip_spec(fusion="  fusion contrastive(img + txt) { dim = 16 }\n  fusion again = contrastive(img + txt)\n"),
    "E0315": spec(stages="  stage align { train proj  freeze clip, llm  objective contrastive }\n"),
    "E0316": clip_spec(stages="  stage pretrain { train img, txt, fusion }\n"),
    # activation checkpointing (stages)
    "E0230": spec(stages="  stage align { train proj, llm  freeze clip  activation_checkpointing = [lm] }\n"),
    "E0231": spec(stages="  stage align { train proj, llm  freeze clip  activation_checkpointing = [llm, proj] }\n"),
    "E0232": spec(stages="  stage align { train proj  freeze clip, llm  activation_checkpointing = [clip] }\n"),
    "E0237": spec(connector="  connector proj = mlp(clip -> llm) { layers = 2  hidden = [128, 64] }\n"),
    "E0233": spec(fusion="  fusion cross_attention(proj -> llm) { every = 1 }\n",
                  stages="  stage align { train proj, fusion  freeze clip, llm  packing = true }\n"),
    "E0234": spec(connector="  connector qf = qformer(clip -> llm) { queries = 4  width = 32  depth = 2  heads = 2  "
                  "mlp = 64  pretrain = true }\n",
                  fusion="  fusion prefix(qf -> llm)\n",
                  stages="  stage align { train qf  freeze clip, llm  objective itc + itg  packing = true }\n"),
    "E0235": spec(language="  language llm = mamba { width = 48  depth = 2  vocab = 512  max_positions = 256 }\n",
                  stages="  stage align { train proj  freeze clip, llm  packing = true }\n"),
    "E0236": spec(stages="  stage align { train proj  freeze clip, llm  packing = 4096 }\n"),
    # the audio role (a Whisper-style encoder read by a linear / mlp connector into a prefix fusion)
    "E0278": spec(vision=AUDIO + AUDIO.replace("clip", "mic"), connector="  connector proj = mlp(clip + mic -> llm)\n"),
    "E0279": spec(vision=AUDIO, fusion="  fusion cross_attention(proj -> llm) { every = 1 }\n"),
    "E0280": spec(vision=AUDIO.replace("pool = 2", "hop = 150")),
    "E0281": spec(vision=BASE_PARTS["vision"] + AUDIO.replace("clip", "mic")),
    "E0282": spec(vision=AUDIO, connector="  connector proj = patch_merger(clip -> llm) { merge = 2 }\n"),
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
