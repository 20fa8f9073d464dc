"""The `t5` language kind: its closed-form parameter counts equal `T5ForConditionalGeneration`'s and the BLIP-2
Flan-T5 specs' equal `Blip2ForConditionalGeneration`'s (meta device); its stages train from the CLI on the
synthetic shapes data (the LM encoder frozen, or LoRA on the decoder), the trainer's loss on a processor batch
equals transformers' at step 0; the combinations it cannot honour are located errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vlmspec.cli import app
from vlmspec.compiler.compile import check_file, load_analysis
from vlmspec.compiler.summary import summarise

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "weights"))

T5_SPEC = """model m {{
  vision v = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64 }}
  connector proj = mlp(v -> llm) {{ layers = 1 }}
  language llm = t5 {{
    width = {width}
    depth = {depth}
    {dec}
    heads = {heads}
    head_dim = {hd}
    ffn = {ffn}
    gated = {gated}
    act = {act}
    vocab = {vocab}
    tie_embeddings = {tie}
  }}
  fusion prefix(proj -> llm)
}}
"""


@pytest.mark.parametrize(("gated", "tie", "dec"), [(True, False, None), (False, True, None), (True, True, 3)])
def test_t5_counts_equal_transformers(write_spec, gated: bool, tie: bool, dec: int | None) -> None:
    spec = write_spec(T5_SPEC.format(width=48, depth=2, dec=f"decoder_depth = {dec}" if dec else "", heads=4, hd=10,
                                     ffn=80, gated=str(gated).lower(), act="gelu_tanh" if gated else "relu", vocab=100,
                                     tie=str(tie).lower()))
    analysis = load_analysis(f"{spec}:m")[0]
    ours = analysis.shapes.total("llm")
    cfg = transformers.T5Config(vocab_size=100, d_model=48, d_kv=10, d_ff=80, num_layers=2, num_decoder_layers=dec,
                                num_heads=4, feed_forward_proj="gated-gelu" if gated else "relu",
                                tie_word_embeddings=tie)
    with torch.device("meta"):
        ref = transformers.T5ForConditionalGeneration(cfg)
        if not tie:  # the untied head a Flan-T5 checkpoint holds (transformers ties one built from a config)
            ref.lm_head.weight = torch.nn.Parameter(torch.empty(100, 48))
    assert ours == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("size", ["xl", "xxl"])
def test_blip2_flan_t5_specs_count_as_transformers(size: str) -> None:
    """`vlm summary`'s count of the full-size spec = the HF class's on the meta device (with Flan-T5's untied
    head), plus the Q-Former's first-stage text side the class leaves out."""
    from test_spec_library import _eva_vision, _one, _qformer, blip2_first_stage

    analysis = load_analysis(f"{ROOT}/specs/blip2-flan-t5-{size}.vlm:blip2_flan_t5_{size}")[0]
    ours = summarise(analysis)["params"]["total"]
    v, qf, lm = _one(analysis.ir, "vision"), _one(analysis.ir, "connector", "qformer"), _one(analysis.ir, "language")
    text = dict(model_type="t5", vocab_size=lm.vocab, d_model=lm.width, d_kv=lm.head_dim, d_ff=lm.ffn,
                num_layers=lm.depth, num_decoder_layers=lm.n_dec, num_heads=lm.heads, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False)
    qformer = dict(_qformer(qf, v), use_qformer_text_input=qf.text_ffn)
    cfg = transformers.Blip2Config(vision_config=_eva_vision(v), qformer_config=qformer, text_config=text,
                                   num_query_tokens=qf.queries, image_token_id=32100)
    with torch.device("meta"):
        ref = transformers.Blip2ForConditionalGeneration(cfg)
        ref.language_model.lm_head.weight = torch.nn.Parameter(torch.empty(lm.vocab, lm.width))
    theirs = sum(p.numel() for p in ref.parameters())
    assert ours - blip2_first_stage(analysis) == theirs
    released = theirs - 56_687_616  # the released Q-Former has no text feed-forwards
    header = (ROOT / "specs" / f"blip2-flan-t5-{size}.vlm").read_text()
    assert f"{released:,}" in header and f"{ours:,}" in header


STAGES = """
model t5_stages extends blip2_flan_t5_xl_tiny {
  stage encoder_frozen {
    train qf, llm
    freeze eva, llm.encoder, llm.embed, qf.pretrain
    objective lm
    optim adamw(lr = 1e-3)
    data "train.json"
    batch 4
    steps 2
    precision fp32
  }
  stage lora_decoder {
    train qf
    freeze eva, qf.pretrain
    lora llm(rank = 4, targets = [decoder.attn.q, decoder.attn.v, decoder.cross.q, decoder.mlp.wo])
    objective lm
    optim adamw(lr = 1e-3)
    data "train.json"
    batch 4
    steps 2
    precision fp32
  }
}
"""


def test_t5_stages_train_from_the_cli(shapes: Path, tmp_path: Path) -> None:
    """The encoder frozen (and the embedding it shares), the decoder trained; then LoRA on decoder layers."""
    spec = tmp_path / "t5.vlm"
    spec.write_text((ROOT / "specs" / "blip2-flan-t5-xl.vlm").read_text() + STAGES)
    analysis = load_analysis(f"{spec}:t5_stages")[0]
    plans = {p.name: p for p in analysis.plans}
    lm = analysis.ir.language.config
    assert plans["encoder_frozen"].trainable["llm"] == lm.decoder_params() + lm.vocab * lm.width  # + the head
    assert plans["lora_decoder"].lora_params == 4 * lm.n_dec * (3 * (lm.width + lm.inner) + (lm.ffn + lm.width))
    for stage in ("encoder_frozen", "lora_decoder"):
        r = CliRunner().invoke(app, ["train", f"{spec}:t5_stages", "--data", str(shapes), "-o",
                                     str(tmp_path / stage), "--stage", stage])
        assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "lora_decoder" / "final"), "--image",
                                 str(next(shapes.rglob("*.png"))), "--prompt", "What colour is it?",
                                 "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output


def test_training_batch_loss_equals_transformers(tmp_path: Path) -> None:
    """The trainer's step-0 loss (processor batch -> `logits_for = "labels"` -> cross-entropy against
    `label_targets`) equals `Blip2ForConditionalGeneration`'s loss on the same prompts, images and answers."""
    import torch.nn.functional as F
    from hf_tiny import imported
    from test_parity_blip2_t5 import blip2_t5

    from vlmspec.runtime.inputs.processor import Processor
    from vlmspec.runtime.inputs.tokenizer import load_tokenizer
    from vlmspec.runtime.model import label_targets

    hf = blip2_t5(tmp_path / "hf", seed=2)
    ours, _, mapping = imported(tmp_path / "hf", tmp_path)
    ours.eval()
    analysis = load_analysis(f"{tmp_path / 'model.vlm'}:{mapping['model']}")[0]
    processor = Processor(analysis, load_tokenizer(tmp_path / "hf"))
    examples = [processor.encode_example("What colour is it?", "red"),
                processor.encode_example("Which shape?", "a big blue square")]
    px = torch.randn(2, 3, 32, 32)
    batch = processor.training_batch(examples, px)
    labels = batch.pop("labels")
    with torch.no_grad():
        out = ours(**batch, labels=labels, logits_for="labels")
        _, targets = label_targets(labels)
        loss = F.cross_entropy(out.logits, targets)
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=px,
                 labels=labels[:, 1:].contiguous()).loss
    assert abs(float(loss) - float(ref)) < 1e-4, (float(loss), float(ref))
    # the encoder read the prompt (image tokens first, EOS last); the decoder's targets are the answer and EOS
    assert batch["input_ids"][0, : 4].tolist() == [processor.image_token_id] * 4
    assert targets[: len("red") + 1].tolist() == processor.tokenizer("red")["input_ids"]


BAD = """model m {{
  vision v = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64 }}
  connector proj = mlp(v -> llm) {{ layers = 1 }}
  language llm = t5 {{ width = 64  depth = 2  heads = 4  head_dim = 16  ffn = 128  vocab = 100{extra} }}
  {fusion}
}}
"""


@pytest.mark.parametrize(("fusion", "extra", "code", "needle"), [
    ("fusion cross_attention(proj -> llm) { every = 1 }", "", "E0255", "cannot extend a `t5`"),
    ("fusion visual_expert(proj -> llm)", "", "E0255", "`visual_expert` fusion"),
    ("fusion prefix(proj -> llm) { prefix_attention = bidirectional }", "", "E0256", "bidirectional prefix"),
    ("fusion prefix(proj -> llm)", "  buckets = 32  max_distance = 16", "E0257", "max_distance = 16"),
    ("fusion prefix(proj -> llm)", "  decoder_start = 100", "E0258", "decoder_start = 100"),
    ("fusion prefix(proj -> llm)", "  rope_theta = 10000.0", "E0104", "rope_theta"),
])
def test_what_a_t5_cannot_honour_is_a_located_error(write_spec, fusion: str, extra: str, code: str,
                                                    needle: str) -> None:
    result = check_file(write_spec(BAD.format(fusion=fusion, extra=extra)))
    errors = [d for d in result.diagnostics if d.severity == "error"]
    assert errors and errors[0].code == code, [(d.code, d.message) for d in errors]
    assert needle in errors[0].message and errors[0].span is not None


def test_packing_an_encoder_decoder_is_refused(write_spec) -> None:
    text = BAD.format(fusion="fusion prefix(proj -> llm)", extra="").rstrip().rstrip("}") + """
  stage s {
    train proj
    freeze v, llm
    objective lm
    packing = true
  }
}
"""
    result = check_file(write_spec(text))
    assert "E0235" in [d.code for d in result.diagnostics]


@pytest.mark.parametrize("size", ["xl", "xxl"])
def test_tiny_flan_t5_trains_its_schedule(shapes: Path, tmp_path: Path, size: str) -> None:
    """The tiny twin's own two stages (the Q-Former's itc + itm + itg, then the prefix-LM stage into the frozen
    T5) from the CLI on the synthetic data, and the trained folder answers."""
    ref = f"{ROOT}/specs/blip2-flan-t5-{size}.vlm:blip2_flan_t5_{size}_tiny"
    r = CliRunner().invoke(app, ["train", ref, "--data", str(shapes), "-o", str(tmp_path / "run"), "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert "qformer_align" in r.output and "generative" in r.output
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "run" / "final"), "--image", str(next(shapes.rglob("*.png"))),
                                 "--prompt", "What colour is the shape?", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output


def test_t5_folder_is_weights_of_a_t5_component(write_spec, tmp_path: Path) -> None:
    """`weights = "DIR"` of a `T5ForConditionalGeneration` folder: every key loads (the stacks' `embed_tokens`
    read from `shared`) and the encoder + decoder give transformers' logits."""
    from hf_tiny import randomise

    from vlmspec.runtime.weights import build_with_weights

    cfg = transformers.T5Config(vocab_size=100, d_model=48, d_kv=10, d_ff=80, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                relative_attention_num_buckets=8, relative_attention_max_distance=20)
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    hf.lm_head.weight = torch.nn.Parameter(hf.shared.weight.detach().clone())
    randomise(hf)
    hf.save_pretrained(str(tmp_path / "t5"))
    text = T5_SPEC.format(width=48, depth=2, dec="buckets = 8\n    max_distance = 20", heads=4, hd=10, ffn=80,
                          gated="true", act="gelu_tanh", vocab=100, tie="false")
    text = text.replace("    tie_embeddings = false\n", f'    tie_embeddings = false\n    weights = "{tmp_path / "t5"}"\n')
    analysis = load_analysis(f"{write_spec(text)}:m")[0]
    model, report = build_with_weights(analysis)
    assert report.ok
    ids = torch.tensor([[5, 9, 12, 40, 1], [7, 7, 30, 1, 0]])
    mask = (torch.arange(5) < torch.tensor([[5], [4]])).long()
    dec = torch.tensor([[0, 3, 8, 9], [0, 11, 2, 2]])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        lm = model.llm
        got = lm.logits(lm.decode(dec, lm.encode(lm.embed(ids), mask), mask))
    assert float((got - ref).abs().max()) < 1e-4


def test_checkpointed_blocks_recompute_exactly(tmp_path: Path) -> None:
    """`activation_checkpointing` on a t5 recomputes both stacks' blocks: same loss, same gradients."""
    from vlmspec.runtime.encoder_decoder import decoder_batch
    from vlmspec.runtime.model import build_model

    analysis = load_analysis(f"{ROOT}/specs/blip2-flan-t5-xl.vlm:blip2_flan_t5_xl_tiny")[0]
    torch.manual_seed(0)
    model = build_model(analysis).train()
    ids = torch.tensor([[model.image_token_id] * 4 + [5, 9, 12, 1]])
    dec, labels = decoder_batch([[7, 8, 1]], 0, 0)
    px = torch.randn(1, 3, 32, 32)
    results = []
    for on in (False, True):
        model.llm.checkpoint_blocks = on
        model.zero_grad()
        loss = model(ids, pixel_values=px, decoder_input_ids=dec, labels=labels).loss
        loss.backward()
        results.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    model.llm.checkpoint_blocks = False
    assert results[0][0] == results[1][0]
    assert all(torch.allclose(g, results[1][1][n], atol=1e-6) for n, g in results[0][1].items())


def test_run_time_errors(tmp_path: Path) -> None:
    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.encoder_decoder import seq2seq_training_batch
    from vlmspec.runtime.inputs.processor import Encoded
    from vlmspec.runtime.model import build_model

    analysis = load_analysis(f"{ROOT}/specs/blip2-flan-t5-xl.vlm:blip2_flan_t5_xl_tiny")[0]
    model = build_model(analysis).eval()
    ids = torch.tensor([[5, 9, 12, 1]])
    with pytest.raises(UserInputError) as e:
        model(ids, prefix_mask=torch.ones_like(ids, dtype=torch.bool))
    assert e.value.diagnostics[0].code == "E0562"
    # labels alone are transformers' targets: the decoder reads them shifted right
    dec, causal = torch.tensor([[0, 5, 9, 12, 1]]), torch.tensor([[-100, 5, 9, 12, 1]])
    with torch.no_grad():
        alone, laid = model(ids, labels=ids), model(ids, decoder_input_ids=dec, labels=causal)
    assert torch.allclose(alone.logits, laid.logits[:, :-1]) and torch.allclose(alone.loss, laid.loss)

    class P:  # what seq2seq_training_batch reads of a processor
        pad_id = 0

        def __init__(self, a):
            self.analysis = a

        def image_kwargs(self, facts):
            return {}

    two_turns = Encoded([5, 6, 7, 8, 9, 10], [-100, -100, 7, -100, -100, 10])
    with pytest.raises(UserInputError) as e:
        seq2seq_training_batch(P(analysis), [two_turns], None)
    assert e.value.diagnostics[0].code == "E0563"


def test_eval_runs_and_serve_and_export_refuse(shapes: Path, tmp_path: Path) -> None:
    """`vlm eval` answers with an encoder-decoder; `vlm serve` refuses it at start-up (E0564) and `vlm export`
    with the reason (E0571)."""
    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.serve import create_app
    from vlmspec.runtime.session import load_session

    runner = CliRunner()
    built = tmp_path / "built"
    r = runner.invoke(app, ["build", f"{ROOT}/specs/blip2-flan-t5-xl.vlm:blip2_flan_t5_xl_tiny", "-o", str(built)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", str(built), "--data", str(shapes / "test_vqa.jsonl"), "--limit", "4",
                            "--max-new-tokens", "3"])
    assert r.exit_code == 0 and "vqa_accuracy" in r.output, r.output
    r = runner.invoke(app, ["export", str(built), "-o", str(tmp_path / "exported")])
    assert r.exit_code != 0 and "E0571" in r.output and "encoder-decoder" in r.output, r.output
    with pytest.raises(UserInputError) as e:
        create_app(load_session(str(built)))
    assert e.value.diagnostics[0].code == "E0564"
