"""Peer training benchmark: one stage of a tiny LLaVA trained by `vlm train` and by TRL's `SFTTrainer`.

    .venv/bin/pip install -e '.[bench]'          # TRL (the peer); torch is left as it is
    flock /tmp/vlmspec-cpu.lock .venv/bin/python bench/train_peer.py [--steps 20] [--batch 8] [--threads 2] [--no-record]
                                                                      [--packing]

Builds one Hugging Face LLaVA checkpoint folder here (random weights: CLIP 64 px / 8 px patches, 4 layers of
width 256, a 4-layer Llama of width 256; a character tokenizer with `<image>`, a `LlavaProcessor` with the
llava-1.5 chat template) and synthetic LLaVA-format conversations (`vlm data synth`). Then, each in its own
subprocess (so peak RSS is its own), trains the same stage on the same data, in the same order, from the same
weights: projector + language model (embeddings and head included) trained, vision tower frozen, AdamW
lr 1e-4, no weight decay, linear schedule without warm-up, gradient clipping at 1.0, fp32, batch B, N steps,
activation checkpointing off on both sides (TRL's `SFTConfig` turns `gradient_checkpointing` on by default, which
trades its speed for memory; the bench sets it off, or on for both with `--checkpointing`):

* vlmspec: `vlm import-hf` on the folder, a `stage` block added to the imported model, `vlm train`;
* TRL: `SFTTrainer` on `LlavaForConditionalGeneration.from_pretrained(folder)` with the folder's processor,
  the conversations as prompt/completion messages (loss on the completion only, as `vlm train` does), the
  vision tower frozen by hand (`requires_grad_(False)`), sequential sampling in vlmspec's data order.

TRL's processor gets the same chat template with the tokenizer's BOS in front and its EOS after the answer
(TRL's prompt/completion collator adds no special tokens; `vlm train` encodes both), so the two train on the
same token sequences and supervise the same tokens (the answer + EOS); the bench prints sample 1 as each
side tokenized it. Both end by saving the trained weights (`vlm train` always does; `trainer.save_model()`).

Measured: tokens/s = non-padding tokens (image placeholders + text, the attention mask's sum) of steps 2..N
over the wall-clock time between the end of step 1 and the end of step N (step 1 is the warm-up); peak RSS
(`ru_maxrss`) of each child, also as it stood after imports and at the end of the last step; the losses of
step 1 and step N (same batches, same weights: they should agree). Packing: TRL refuses
`packing=True` for vision datasets (the bench checks that it still does), so TRL runs unpacked. With
`--packing` the questions get a seeded random number (0-12) of extra sentences, so sample lengths vary as
in real instruction data, and `vlm train` also runs the stage with `packing = true` (a third child): the
same samples per step, laid out several to a row; tokens/s counts the same real tokens. Prints a table and
the ratios; appends a row to bench/RESULTS.md (goal: >= 1.0x TRL's speed at <= its memory).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE_TOKEN = 100
LLAVA_TEMPLATE = (  # llava-hf/llava-1.5-7b-hf's chat template, as tests/weights/test_import_folder.py writes it
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(ENV)


def char_tokenizer(transformers):
    """A Llama-like character tokenizer (BOS in front), `<image>` at IMAGE_TOKEN, 128 ids."""
    from tokenizers import Tokenizer, decoders, models, processors

    table = ["<unk>", "<s>", "</s>", "<pad>"] + [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    table += [f"<x{i}>" for i in range(len(table), IMAGE_TOKEN)] + ["<image>"]
    table += [f"<x{i}>" for i in range(len(table), 128)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(table)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert fast.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    return fast


def hf_folder(out: Path) -> int:
    """The LLaVA checkpoint folder both trainers start from; returns its parameter count."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=256, intermediate_size=1024,
                           num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8, projection_dim=256),
        text_config=dict(model_type="llama", vocab_size=128, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3),
        image_token_id=IMAGE_TOKEN, image_seq_length=64, vision_feature_select_strategy="default",
        vision_feature_layer=-2)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg)
    model.save_pretrained(str(out))
    images = transformers.CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                                resample=3)
    proc = transformers.LlavaProcessor(image_processor=images, tokenizer=char_tokenizer(transformers), patch_size=8,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=LLAVA_TEMPLATE)
    proc.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def stage_block(batch: int, steps: int, packing: bool = False, checkpointing: bool = False) -> str:
    return ("  stage sft {\n    train proj, llm\n    freeze clip\n    optim adamw(lr = 1e-4, weight_decay = 0.0)\n"
            f'    data llava("train.json")\n    batch {batch}\n    steps {steps}\n    precision fp32\n'
            "    warmup = 0.0\n    schedule = \"linear\"\n    clip_grad = 1.0\n"
            + ("    packing = true\n" if packing else "")
            + ("    activation_checkpointing = true\n" if checkpointing else "") + "  }\n")


FILLER = ("Look at the picture carefully.", "Take your time.", "Answer with one word.", "The image is small.",
          "There is exactly one shape.", "Ignore the background.")


def vary_lengths(data: Path, seed: int = 0) -> None:
    """Give each question 0-12 extra sentences (seeded), so that sample lengths vary."""
    import random

    rng = random.Random(seed)
    path = data / "train.json"
    records = json.loads(path.read_text())
    for r in records:
        turn = r["conversations"][0]
        turn["value"] += " " + " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 12)))
    path.write_text(json.dumps(records))


def with_stage(spec: str, model: str, block: str) -> str:
    """The imported spec with `block` added at the end of `model { ... }`."""
    start = spec.index(f"model {model}")
    depth, i = 0, spec.index("{", start)
    while True:
        depth += {"{": 1, "}": -1}.get(spec[i], 0)
        if depth == 0:
            return spec[:i] + block + spec[i:]
        i += 1


def data_order(n: int, seed: int = 0) -> list[int]:
    """`vlm train`'s order of the first epoch (loop.py: randperm seeded with stage.seed * 7919 + epoch)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919)).tolist()


# ---------------------------------------------------------------------------------------------- children


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_vlmspec(work: Path, batch: int, steps: int, spec: str = "train.vlm") -> dict:
    """`vlm train` through its CLI entry point, with the step ends and batch sizes recorded."""
    import vlmspec.runtime.train.loop as loop
    from vlmspec.cli import app
    from vlmspec.runtime.inputs.processor import Processor

    ends, tokens, losses, trainable, first, rss_train, slots = [], [], [], [], {}, [], []
    metric, batcher, packer = loop.append_metric, Processor.training_batch, loop.packed_batch
    rss_imports = rss_mib()

    def append_metric(run_dir, row):
        if "loss" in row and "step" in row:
            ends.append(time.perf_counter())
            losses.append(row["loss"])
            rss_train.append(rss_mib())
        return metric(run_dir, row)

    def packed_batch(processor, examples, rows, *a, **k):
        out = packer(processor, examples, rows, *a, **k)
        tokens.append(int(out["attention_mask"].sum()))
        slots.append(out["attention_mask"].numel())
        return out

    def training_batch(self, examples, *a, **k):
        out = batcher(self, examples, *a, **k)
        tokens.append(int(out["attention_mask"].sum()))
        slots.append(out["attention_mask"].numel())
        if not first:
            mask = out["attention_mask"][0].bool()
            first.update(ids=out["input_ids"][0][mask].tolist(), labels=out["labels"][0][mask].tolist(),
                         supervised=int((out["labels"] != -100).sum()))
        return out

    loop.append_metric, Processor.training_batch, loop.packed_batch = append_metric, training_batch, packed_batch
    make_optimizer = loop.make_optimizer

    def counting_optimizer(groups, stage):
        trainable.append(sum(p.numel() for g in groups for p in g["params"]))
        return make_optimizer(groups, stage)

    loop.make_optimizer = counting_optimizer
    try:
        app(["train", str(work / spec), "-o", str(work / ("run-" + spec)), "--data", str(work / "data"),
             "--save-every", "100000"], standalone_mode=False)
    finally:
        loop.append_metric, Processor.training_batch, loop.packed_batch = metric, batcher, packer
    return {"ends": ends, "tokens": tokens, "losses": losses, "trainable": trainable[0] if trainable else None,
            "first": first, "rss_imports_mib": rss_imports, "rss_train_mib": rss_train[-1],
            "padding": 1 - sum(tokens) / max(1, sum(slots))}


def trl_dataset(data: Path):
    """train.json as TRL's conversational prompt/completion records, in vlm train's order."""
    from datasets import Dataset
    from PIL import Image

    records = json.loads((data / "train.json").read_text())
    rows = []
    for i in data_order(len(records)):
        r = records[i]
        human, gpt = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert len(r["conversations"]) == 2 and human.startswith("<image>\n")
        rows.append({"images": [Image.open(data / r["image"]).convert("RGB")],
                     "prompt": [{"role": "user", "content": [{"type": "image"},
                                                             {"type": "text", "text": human[len("<image>\n"):]}]}],
                     "completion": [{"role": "assistant", "content": [{"type": "text", "text": gpt}]}]})
    return Dataset.from_list(rows)


def trl_config(out: Path, batch: int, steps: int, max_length: int | None = None, **kw):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
                     weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
                     optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, bf16=False,
                     fp16=False, use_cpu=True, logging_steps=1, save_strategy="no", report_to="none",
                     dataloader_num_workers=0, train_sampling_strategy="sequential", seed=0, max_length=max_length,
                     disable_tqdm=True, **kw)


def run_trl(work: Path, batch: int, steps: int) -> dict:
    import transformers
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from trl import SFTTrainer

    transformers.utils.logging.set_verbosity_error()
    rss_imports = rss_mib()
    folder = str(work / "hf")
    processor = AutoProcessor.from_pretrained(folder)
    # BOS in front and EOS after the answer, as `vlm train` encodes a conversation (TRL's prompt/completion
    # collator adds no special tokens of its own): both then train on exactly the same token sequences
    processor.chat_template = "{{ bos_token }}" + LLAVA_TEMPLATE.replace(
        "{% endgeneration %}{% endfor %}{% endif %}", "{% endgeneration %}{% endfor %}{{ eos_token }}{% endif %}")
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    model.model.vision_tower.requires_grad_(False)
    data = trl_dataset(work / "data")

    ends, tokens, losses, rss_train = [], [], [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            rss_train.append(rss_mib())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    # TRL's SFTConfig turns gradient checkpointing on by default; the bench sets it as `vlm train`'s stage does
    ckpt = os.environ.get("BENCH_CHECKPOINTING") == "1"
    trainer = SFTTrainer(model=model, args=trl_config(work / "trl", batch, steps, gradient_checkpointing=ckpt),
                         train_dataset=data,
                         processing_class=processor, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(examples):
        out = collate(examples)
        tokens.append(int(out["attention_mask"].sum()))
        return out

    trainer.data_collator = counting
    # the collator is captured by the dataloader when it is built, in train(): set it before
    first = counting([dict(data[i]) for i in range(batch)])
    tokens.clear()
    mask = first["attention_mask"][0].bool()
    sample = {"ids": first["input_ids"][0][mask].tolist(), "labels": first["labels"][0][mask].tolist(),
              "supervised": int((first["labels"] != -100).sum())}
    trainer.train()
    trainer.save_model(str(work / "trl" / "final"))  # as `vlm train` writes the stage's weights at its end
    return {"ends": ends, "tokens": tokens, "losses": losses, "first": sample, "rss_imports_mib": rss_imports,
            "rss_train_mib": rss_train[-1],
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def trl_packing(work: Path, batch: int) -> str:
    """What TRL says to `packing=True` on this vision dataset."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import SFTTrainer

    folder = str(work / "hf")
    try:
        SFTTrainer(model=LlavaForConditionalGeneration.from_pretrained(folder),
                   args=trl_config(work / "trl-packed", batch, 1, max_length=256, packing=True), train_dataset=trl_dataset(work / "data"),
                   processing_class=AutoProcessor.from_pretrained(folder))
    except Exception as e:  # the refusal is the result
        return f"refused: {type(e).__name__}: {e}"
    return "accepted"


def child(which: str, work: Path, batch: int, steps: int, threads: int, out: Path) -> None:
    import torch

    torch.set_num_threads(threads)
    if which == "vlmspec-packed":
        result = run_vlmspec(work, batch, steps, "train-packed.vlm")
    else:
        result = {"vlmspec": run_vlmspec, "trl": run_trl}[which](work, batch, steps)
    result["peak_rss_mib"] = rss_mib()
    if which == "trl":
        result["packing"] = trl_packing(work, batch)
    out.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------- parent


def measure(which: str, work: Path, args) -> dict:
    out = work / f"{which}.json"
    cmd = [sys.executable, __file__, "--child", which, "--work", str(work), "--batch", str(args.batch),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(args.threads)}
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{which} child failed:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t
    # accelerate's dataloader collates one batch ahead: TRL's collator runs steps + 1 times
    ends, tokens = res["ends"], res["tokens"][: args.steps]
    assert len(ends) == args.steps and len(tokens) == args.steps, (which, len(ends), len(res["tokens"]))
    res["tok_s"] = sum(tokens[1:]) / (ends[-1] - ends[0])
    res["step_ms"] = 1e3 * (ends[-1] - ends[0]) / (args.steps - 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--packing", action="store_true", help="varied lengths; also `vlm train` with `packing = true`")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on both sides (`vlm "
                    "train`'s `activation_checkpointing = true`, TRL's `gradient_checkpointing`); off by default on "
                    "both, TRL's own default being on")
    ap.add_argument("--child", choices=["vlmspec", "vlmspec-packed", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.work, args.batch, args.steps, args.threads, args.work / f"{args.child}.json")
        return
    assert args.steps >= 2
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        params = hf_folder(work / "hf")
        vlm = [str(Path(sys.executable).with_name("vlm"))]
        subprocess.run([*vlm, "data", "synth", "-o", str(work / "data"), "--n", "256", "--test", "4", "--size", "64"],
                       check=True, capture_output=True)
        subprocess.run([*vlm, "import-hf", str(work / "hf"), "-o", str(work / "imported.vlm")], check=True,
                       capture_output=True)
        spec = (work / "imported.vlm").read_text()
        name = next(line.split()[1] for line in spec.splitlines() if line.startswith("model "))
        if args.checkpointing:
            os.environ["BENCH_CHECKPOINTING"] = "1"  # read by the TRL child (`run_trl`)
        ck = args.checkpointing
        (work / "train.vlm").write_text(with_stage(spec, name, stage_block(args.batch, args.steps, checkpointing=ck)))
        packed = None
        if args.packing:
            vary_lengths(work / "data")
            (work / "train-packed.vlm").write_text(with_stage(spec, name, stage_block(args.batch, args.steps, True, ck)))
            packed = measure("vlmspec-packed", work, args)
        ours = measure("vlmspec", work, args)
        theirs = measure("trl", work, args)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(work / "hf"))
        for res in (ours, theirs):
            f = res["first"]
            f["text"] = tok.decode(f["ids"]).replace("<image>" * 64, "<image>*64")
            f["target"] = tok.decode([i for i, x in zip(f["ids"], f["labels"], strict=True) if x != -100])

    speed = ours["tok_s"] / theirs["tok_s"]
    memory = ours["peak_rss_mib"] / theirs["peak_rss_mib"]
    memory_train = ours["rss_train_mib"] / theirs["rss_train_mib"]
    rows = [("", "vlm train", "TRL SFTTrainer"),
            ("tokens/s (steps 2..N)", f"{ours['tok_s']:.0f}", f"{theirs['tok_s']:.0f}"),
            ("step (ms)", f"{ours['step_ms']:.1f}", f"{theirs['step_ms']:.1f}"),
            ("peak RSS (MiB)", f"{ours['peak_rss_mib']:.0f}", f"{theirs['peak_rss_mib']:.0f}"),
            ("  after imports", f"{ours['rss_imports_mib']:.0f}", f"{theirs['rss_imports_mib']:.0f}"),
            ("  at the last step", f"{ours['rss_train_mib']:.0f}", f"{theirs['rss_train_mib']:.0f}"),
            ("loss step 1", f"{ours['losses'][0]:.4f}", f"{theirs['losses'][0]:.4f}"),
            (f"loss step {args.steps}", f"{ours['losses'][-1]:.4f}", f"{theirs['losses'][-1]:.4f}"),
            ("tokens step 1", str(ours["tokens"][0]), str(theirs["tokens"][0])),
            ("trainable params", str(ours["trainable"]), str(theirs["trainable"])),
            ("child wall (s)", f"{ours['wall_s']:.1f}", f"{theirs['wall_s']:.1f}")]
    if packed is not None:
        rows = [(*r, p) for r, p in zip(rows, ("packed", f"{packed['tok_s']:.0f}", f"{packed['step_ms']:.1f}",
                                                f"{packed['peak_rss_mib']:.0f}", f"{packed['rss_imports_mib']:.0f}",
                                                f"{packed['rss_train_mib']:.0f}", f"{packed['losses'][0]:.4f}",
                                                f"{packed['losses'][-1]:.4f}", str(packed["tokens"][0]),
                                                str(packed["trainable"]), f"{packed['wall_s']:.1f}"), strict=True)]
        rows.append(("padding (of slots)", f"{100 * ours['padding']:.1f}%", "-", f"{100 * packed['padding']:.1f}%"))
    for r in rows:
        print(f"{r[0]:<24}{r[1]:>14}{r[2]:>18}" + (f"{r[3]:>14}" if len(r) > 3 else ""))
    print(f"TRL packing=True: {theirs['packing'][:200]}")
    for who, res in (("vlm train", ours), ("TRL", theirs)):
        f = res["first"]
        print(f"{who}: batch 1 supervised {f['supervised']} tokens; sample 1 {f['text']!r}, "
              f"supervised {f['target']!r}")
    ratio = (f"{speed:.2f}x speed, {memory:.2f}x peak memory ({memory_train:.2f}x up to the last step) "
             "vlm train vs TRL SFTTrainer (unpacked)")
    if packed is not None:
        ratio += (f"; packed {packed['tok_s'] / ours['tok_s']:.2f}x unpacked vlm train, "
                  f"{packed['tok_s'] / theirs['tok_s']:.2f}x TRL (padding {100 * ours['padding']:.0f}% -> "
                  f"{100 * packed['padding']:.0f}%)")
    print(ratio)
    from importlib.metadata import version

    line = (f"one stage (proj + llm trained, clip frozen), {params / 1e6:.1f}M params, batch {args.batch}, "
            f"{args.steps} steps, fp32, {args.threads} threads, activation checkpointing "
            f"{'on' if args.checkpointing else 'off'} on both sides: vlm train {ours['tok_s']:.0f} tok/s, peak RSS "
            f"{ours['peak_rss_mib']:.0f} MiB ({ours['rss_train_mib']:.0f} at the last step) vs TRL {version('trl')} "
            f"SFTTrainer {theirs['tok_s']:.0f} tok/s, {theirs['peak_rss_mib']:.0f} MiB "
            f"({theirs['rss_train_mib']:.0f}); loss step 1 {ours['losses'][0]:.4f} vs {theirs['losses'][0]:.4f}, "
            f"step {args.steps} {ours['losses'][-1]:.4f} vs {theirs['losses'][-1]:.4f} (same token sequences); "
            "tokens = non-padding (image + text) of steps 2..N; " + (
                f"questions of varied length; vlm train packed {packed['tok_s']:.0f} tok/s, "
                f"{packed['peak_rss_mib']:.0f} MiB, loss step 1 {packed['losses'][0]:.4f}, step {args.steps} "
                f"{packed['losses'][-1]:.4f}; TRL unpacked (it refuses packing for vision data)" if packed is not None
                else "unpacked on both sides (TRL refuses packing for vision data)"))
    if not args.no_record:
        cmd = "python bench/train_peer.py " + " ".join(sys.argv[1:])
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"| {dt.date.today()} | `{cmd.strip()}` | {line} | {ratio} |\n")


if __name__ == "__main__":
    main()
