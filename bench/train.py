"""Training step: vlmspec vs Hugging Face Llava on the LLaVA stage-1 shape (frozen ViT + LLM, trained connector).

    .venv/bin/python bench/train.py [--batch 8] [--steps 10] [--threads 0]

Both models hold identical weights (bench/forward.py's mapping). The reference is
`LlavaForConditionalGeneration` with the vision tower and language model frozen by hand
(`requires_grad_(False)`), the projector trained with AdamW, as LLaVA's `pretrain.sh` does; vlmspec
freezes through `apply_stage` from the spec's stage and computes logits only where a target is, as
`vlm train` does. Each method runs in its own subprocess so peak
memory (VmHWM) is its own; step time is the best of N steps (forward + backward + optimizer step).
Appends a line to bench/RESULTS.md. Goal: >= 1.0x speed, peak memory at most the reference's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(which: str, batch: int, steps: int, threads: int, weights: str) -> dict:
    import tempfile

    import forward as fw  # bench/forward.py: the shared model definitions and key mapping
    import torch
    from safetensors.torch import load_file

    if threads:
        torch.set_num_threads(threads)
    state = load_file(weights)  # both workers read the same weights from disk: symmetric peak memory
    if which == "vlmspec":
        from vlmspec.compiler.compile import load_analysis
        from vlmspec.runtime.model import build_model
        from vlmspec.runtime.train.freeze import apply_stage

        spec = fw.SPEC.replace("}\n}\n", "}\n  stage align { train proj  freeze clip, llm }\n}\n")
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "b.vlm").write_text(spec)
            analysis, _ = load_analysis(f"{d}/b.vlm:bench")
        model = build_model(analysis, image_token_id=fw.IMAGE_TOKEN)
        model.load_state_dict({fw.hf_key(k): v for k, v in state.items()})
        del state
        apply_stage(model, analysis, "align")
        model.train()

        def loss_of(ids, mask, px, labels):  # as `vlm train` calls it: logits only where a target is
            return model(ids, attention_mask=mask, pixel_values=px, labels=labels, logits_for="labels").loss
    else:
        model = fw.hf_model().train()
        model.load_state_dict(state)
        del state
        model.model.vision_tower.requires_grad_(False)
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)

        def loss_of(ids, mask, px, labels):
            return model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels).loss

    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, fw.VOCAB - 2, (batch, 32), generator=g)
    ids = torch.cat([torch.full((batch, fw.TOKENS), fw.IMAGE_TOKEN), text], 1)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : fw.TOKENS] = -100
    px = torch.randn(batch, 3, fw.IMAGE, fw.IMAGE, generator=g)
    times, losses = [], []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        optim.zero_grad(set_to_none=True)
        loss = loss_of(ids, mask, px, labels)
        loss.backward()
        optim.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"which": which, "step": min(times[2:]), "peak_mb": peak_rss_mb(), "trainable": sum(p.numel() for p in params),
            "losses": losses[:3]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--worker")
    ap.add_argument("--weights")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.steps, args.threads, args.weights)))
        return
    import tempfile

    import forward as fw
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = str(Path(tempfile.mkdtemp()) / "weights.safetensors")
    save_file({k: v.contiguous() for k, v in fw.hf_model().state_dict().items()}, weights)
    rows = {}
    for which in ("hf", "vlmspec"):
        out = subprocess.run([sys.executable, __file__, "--worker", which, "--batch", str(args.batch), "--steps",
                              str(args.steps), "--threads", str(args.threads), "--weights", weights],
                             check=True, capture_output=True, text=True)
        rows[which] = json.loads(out.stdout.strip().splitlines()[-1])
        r = rows[which]
        print(f"{which:8s} step {r['step'] * 1000:7.1f} ms  peak RSS {r['peak_mb']:7.0f} MiB  trainable {r['trainable']:,}"
              f"  first losses {[round(x, 4) for x in r['losses']]}")
    speed = rows["hf"]["step"] / rows["vlmspec"]["step"]
    mem = rows["vlmspec"]["peak_mb"] / rows["hf"]["peak_mb"]
    print(f"vlmspec vs HF: {speed:.2f}x step speed, {mem:.2f}x peak memory")
    with (ROOT / "bench" / "RESULTS.md").open("a") as f:
        f.write(f"| {dt.date.today()} | `python bench/train.py --batch {args.batch}` | step HF "
                f"{rows['hf']['step'] * 1000:.1f} ms vs vlmspec {rows['vlmspec']['step'] * 1000:.1f} ms; peak RSS HF "
                f"{rows['hf']['peak_mb']:.0f} MiB vs vlmspec {rows['vlmspec']['peak_mb']:.0f} MiB | {speed:.2f}x speed, "
                f"{mem:.2f}x memory vs HF Llava with manual freezing |\n")


if __name__ == "__main__":
    main()
