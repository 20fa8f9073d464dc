"""The `vlm` command line. Front-end commands (check, fmt, show, summary, graph, diff, schema) never import
torch, so they answer in well under a second even for 70B specs."""

from __future__ import annotations

import difflib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

# pydantic looks up plugins through package metadata on first use (~25 ms); vlmspec uses none.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import typer  # noqa: E402 - after the environment above
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from vlmspec.diagnostics import Diagnostic, VlmSpecError, render_all, to_json

app = typer.Typer(
    name="vlm",
    help="[bold]vlmspec[/bold]: describe a vision-language model as text, then check, diff, build, train and serve it.\n\n"
    "A SPEC is a path to a .vlm file, optionally with a model name (`specs/llava.vlm:llava_tiny`; "
    "the file's first model by default) or a git revision (`HEAD~1:specs/llava.vlm`).",
    epilog="Try: [bold]vlm summary specs/llava-1.5-7b.vlm[/bold], then "
    "[bold]vlm diff specs/llava-1.5-7b.vlm specs/llava-1.5-13b.vlm[/bold]. "
    "The language: docs/language.md.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
DeviceOpt = Annotated[str, typer.Option(help="`auto` (the GPU when torch sees one, else the CPU), `cpu` or `cuda`")]


def command(*args, **kwargs):
    """`app.command`, plus: typed vlmspec errors render as diagnostics (exit 1), never as a traceback."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except VlmSpecError as e:
                _fail(e.diagnostics, e.sources)

        return app.command(*args, **kwargs)(run)

    return wrap


def _fail(diags: list[Diagnostic], sources: dict[str, str], as_json: bool = False) -> None:
    if as_json:
        print(to_json(diags))
    else:
        err.print(render_all(diags, sources, color=err.is_terminal), markup=False, highlight=False)
        n_err = sum(d.severity == "error" for d in diags)
        if n_err:
            err.print(f"[red]{n_err} error{'s' if n_err != 1 else ''}[/red]")
    raise typer.Exit(1)


def _load(ref: str):
    from vlmspec.compiler.compile import load_analysis

    try:
        analysis, _ = load_analysis(ref)
    except VlmSpecError as e:
        _fail(e.diagnostics, e.sources)
    return analysis


# ---------------------------------------------------------------- check
@command()
def check(
    specs: Annotated[list[str], typer.Argument(help="spec files (FILE or FILE:MODEL)", show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """Check specs: syntax, names, shapes, fusion rules, stage schedule. Exit 1 on any error."""
    from vlmspec.compiler.compile import check_file, split_ref
    from vlmspec.compiler.summary import human

    all_diags: list[Diagnostic] = []
    sources: dict[str, str] = {}
    report = []
    for ref in specs:
        path, model, rev = split_ref(ref)
        result = check_file(path, model, rev=rev)
        all_diags.extend(result.diagnostics)
        sources.update(result.sources)
        for a in result.analyses:
            tokens = sum(a.shapes.out[f.name].tokens for f in a.ir.by_role("fusion") if f.name in a.shapes.out)
            report.append({"file": a.file, "model": a.ir.name, "params": a.total_params,
                           "visual_tokens": tokens, "stages": [s.name for s in a.ir.stages],
                           "modality": "audio" if a.ir.by_role("audio") else "visual"})
    errors = [d for d in all_diags if d.severity == "error"]
    if as_json:
        print(json.dumps({"ok": not errors, "models": report, "diagnostics": [d.to_json() for d in all_diags]},
                         indent=2))
        raise typer.Exit(1 if errors else 0)
    if all_diags:
        err.print(render_all(all_diags, sources, color=err.is_terminal), markup=False)
    for r in report:
        stages = ", ".join(r["stages"]) or "no stages"
        out.print(f"[green]ok[/green] {r['file']}:{r['model']}  {human(r['params'])} params, "
                  f"{r['visual_tokens']} {r['modality']} tokens, stages: {stages}")
    if errors:
        err.print(f"[red]{len(errors)} error{'s' if len(errors) != 1 else ''}[/red]")
        raise typer.Exit(1)


# ---------------------------------------------------------------- fmt
@command()
def fmt(
    files: Annotated[list[str], typer.Argument(help="files to format in place; `-` reads stdin, writes stdout",
                                               show_default=False)],
    check_only: Annotated[bool, typer.Option("--check", help="change nothing; exit 1 if a file is not formatted")] = False,
    show_diff: Annotated[bool, typer.Option("--diff", help="print what would change")] = False,
) -> None:
    """Rewrite .vlm files in the canonical layout (comments kept; idempotent)."""
    from vlmspec.compiler.printer import format_text
    from vlmspec.fsutil import atomic_write_text

    unformatted = []
    for f in files:
        text = sys.stdin.read() if f == "-" else _read(f)
        try:
            new = format_text(text, f)
        except VlmSpecError as e:
            _fail(e.diagnostics, e.sources)
        if f == "-":
            sys.stdout.write(new)
            continue
        if new != text:
            unformatted.append(f)
            if show_diff:
                sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), f, f))
            if not check_only and not show_diff:
                atomic_write_text(f, new)
                out.print(f"formatted {f}")
    if check_only:
        for f in unformatted:
            err.print(f"would reformat {f}")
        if unformatted:
            raise typer.Exit(1)
        out.print(f"{len(files)} file{'s' if len(files) != 1 else ''} already formatted")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        from vlmspec.grammar.parser import not_utf8

        diag, shown = not_utf8(path, e)
        _fail([diag], {path: shown})
    except OSError as e:
        _fail([Diagnostic("E0004", f"cannot read {path}: {e.strerror or e}")], {})
    return ""


# ---------------------------------------------------------------- show
@command()
def show(
    spec: Annotated[str, typer.Argument(help="FILE or FILE:MODEL", show_default=False)],
    resolved: Annotated[bool, typer.Option("--resolved", help="flatten `extends`, write every default out")] = False,
    params: Annotated[bool, typer.Option("--params/--no-params", help="annotate parameter counts")] = True,
    textconv: Annotated[bool, typer.Option("--textconv", help="git diff driver: every model resolved; a file that "
                                           "does not check is shown as written; never fails")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print a model as written, or with --resolved: inherited values and defaults written out (a valid spec)."""
    from vlmspec.compiler.show import model_source, resolved_text

    if textconv:
        sys.stdout.write(_textconv(spec))
        return
    analysis = _load(spec)
    if as_json:
        print(analysis.ir.model_dump_json(indent=2))
        return
    if not resolved:
        sys.stdout.write(model_source(analysis))
        return
    sys.stdout.write(resolved_text(analysis, params=params))


def _textconv(path: str) -> str:
    """What `git diff` shows for a .vlm file: every model resolved, or the text itself when it does not check.

    Git hands textconv a temporary copy of an old version, beside which its imports are not found; so a
    file with imports is shown canonically formatted on both sides, and the diff is the lines that changed.
    No path appears in the output: git's temporary file name would make every version differ there."""
    from vlmspec.compiler.compile import check_file
    from vlmspec.compiler.printer import format_text
    from vlmspec.compiler.show import resolved_text
    from vlmspec.grammar.parser import parse

    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    try:
        if parse(text, path).imports:
            return "# vlm: a spec with imports, formatted (its imports are not resolved here)\n" + \
                format_text(text, path)
    except VlmSpecError:
        pass
    try:
        result = check_file(path)
    except OSError:
        result = None
    if result is not None and result.ok and result.analyses:
        return "\n".join(resolved_text(a) for a in result.analyses)
    n = sum(d.severity == "error" for d in result.diagnostics) if result is not None else 0
    first = next((d for d in result.diagnostics if d.severity == "error"), None) if result is not None else None
    note = f"# vlm: this version does not check ({n} error{'s' if n != 1 else ''}"
    note += f"; first: {first.code}" if first else ""
    return note + "); shown as written\n" + text


# ---------------------------------------------------------------- summary
@command()
def summary(
    spec: Annotated[str, typer.Argument(help="FILE or FILE:MODEL", show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """Parameters per component, visual tokens, and per stage the trainable parameters and memory."""
    from vlmspec.compiler.summary import human, summarise

    analysis = _load(spec)
    s = summarise(analysis)
    if as_json:
        print(json.dumps(s, indent=2))
        return
    t = Table(title=f"{s['model']}  ({human(s['params']['total'])} parameters)", title_justify="left")
    for col, just in (("component", "left"), ("role", "left"), ("kind", "left"), ("params", "right"),
                      ("output", "right"), ("dtype", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for c in s["components"]:
        shape = f"{c['tokens']} x {c['width']}" if c["tokens"] is not None else ""
        dtype = c["dtype"] or ""
        if c["quantize"] not in (None, "none"):
            dtype += f" ({c['quantize']})"
        t.add_row(c["name"], c["role"], c["kind"], human(c["params"]), shape, dtype)
    out.print(t)
    mem = s["memory"]
    line = f"weights in memory: {human(mem['weights'], 'B')}"
    if mem["weights"] != mem["weights_unquantized"]:
        line += f" (unquantized: {human(mem['weights_unquantized'], 'B')})"
    out.print(line)
    for name, lay in s["image_layouts"].items():
        out.print(f"image tokens of `{name}` ({lay['layout']}): {lay['min']}..{lay['max']} per image by its size, "
                  f"{lay['at_image_size']} at {lay['image_size']}x{lay['image_size']}")
    for name, vid in s.get("video_tokens", {}).items():
        out.print(f"video tokens of `{name}`: {vid['min']}..{vid['max']} per video (frames of {vid['min_pixels']}.."
                  f"{vid['max_pixels']} pixels)")
    if s["stages"]:
        st = Table(title="stages", title_justify="left")
        for col in ("stage", "trains", "frozen", "trainable", "optim", "activations", "memory"):
            st.add_column(col, justify="left" if col in ("stage", "trains", "frozen", "optim") else "right")
        for stage in s["stages"]:
            status = stage["status"]
            trains = ", ".join(f"{k} ({v})" if v not in ("trained",) else k for k, v in status.items()
                               if v in ("trained", "partial", "lora"))
            frozen = ", ".join(k for k, v in status.items() if v == "frozen")
            m = stage["memory"]
            st.add_row(stage["name"], trains, frozen, human(stage["params"]["trainable"]), stage["optim"],
                       human(m["activations"], "B"), human(m["total"], "B"))
        out.print(st)
        seqs = {f"{m['sequence']['tokens']:,} tokens ({m['sequence']['source']})"
                for m in (stage["memory"] for stage in s["stages"])}
        out.print("[dim]memory per process: weights + gradients and optimizer state (fp32) + activations of one "
                  f"micro-batch (batch / grad_accum) at {'; '.join(sorted(seqs))}[/dim]", highlight=False)


# ---------------------------------------------------------------- graph
@command()
def graph(
    spec: Annotated[str, typer.Argument(help="FILE or FILE:MODEL", show_default=False)],
    format: Annotated[str, typer.Option("--format", "-f", help="mermaid or dot")] = "mermaid",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write to a file")] = None,
) -> None:
    """Draw the data flow (encoders -> connectors -> fusion -> language model) as Mermaid or DOT."""
    from vlmspec.compiler.graph import to_dot, to_mermaid
    from vlmspec.compiler.summary import human
    from vlmspec.fsutil import atomic_write_text

    if format not in ("mermaid", "dot"):
        _fail([Diagnostic("E0005", f"unknown graph format `{format}`", help="use `mermaid` or `dot`")], {})
    a = _load(spec)
    labels = {n: f"{n}: {c.kind}\n{human(a.shapes.total(n))} params" for n, c in a.ir.components.items()}
    text = (to_mermaid if format == "mermaid" else to_dot)(a.graph, labels)
    if output:
        atomic_write_text(output, text)
        out.print(f"wrote {output}")
    else:
        sys.stdout.write(text)


# ---------------------------------------------------------------- diff
@command()
def diff(
    old: Annotated[str, typer.Argument(help="FILE, FILE:MODEL or REV:FILE", show_default=False)],
    new: Annotated[str, typer.Argument(help="FILE, FILE:MODEL or REV:FILE", show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """What changed in the architecture: components, resolved attributes, parameters per component and stage.

    Two files without model names compare every model they share by name (and list the others)."""
    from vlmspec.compiler.compile import split_ref
    from vlmspec.compiler.diff import diff_models, render_text

    pairs = [(old, new)]
    (_, m_old, _), (_, m_new, _) = split_ref(old), split_ref(new)
    only: list[str] = []
    if m_old is None and m_new is None:
        names_old, names_new = _model_names(old), _model_names(new)
        shared = [n for n in names_old if n in names_new]
        if len(shared) > 1 or (shared and (len(names_old) > 1 or len(names_new) > 1)):
            pairs = [(f"{old}:{n}", f"{new}:{n}") for n in shared]
            only = [f"only in {old}: {n}" for n in names_old if n not in names_new] + \
                [f"only in {new}: {n}" for n in names_new if n not in names_old]
    diffs = [diff_models(_load(a), _load(b), a, b) for a, b in pairs]
    if as_json:
        print(json.dumps(diffs[0] if len(diffs) == 1 and not only else {"models": diffs, "unpaired": only}, indent=2))
    else:
        sys.stdout.write("\n".join(render_text(d) for d in diffs) + "".join(f"{line}\n" for line in only))


def _model_names(ref: str) -> list[str]:
    """The models a spec file (or a file at a git revision) defines, in order; [] when it does not parse."""
    from vlmspec.compiler.compile import check_file, split_ref

    path, _, rev = split_ref(ref)
    result = check_file(path, None, rev=rev)
    return [a.ir.name for a in result.analyses]


# ---------------------------------------------------------------- schema
@command()
def schema(
    kind: Annotated[str | None, typer.Argument(help="one kind, e.g. `vit` or `mlp` (default: all)")] = None,
) -> None:
    """Print the JSON Schema of every component kind, the stage block and model settings."""
    from vlmspec.compiler.schema import REGISTRY, Settings, Stage

    doc: dict = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "vlmspec", "roles": {}}
    found = False
    for role, kinds in REGISTRY.by_role.items():
        for name, cls in sorted(kinds.items()):
            if kind is not None and name != kind:
                continue
            found = True
            s = cls.model_json_schema()
            s["description"] = (cls.__doc__ or "").strip()
            doc["roles"].setdefault(role, {})[name] = s
    if kind is None:
        doc["stage"] = Stage.model_json_schema()
        doc["settings"] = Settings.model_json_schema()
    elif not found:
        from vlmspec.diagnostics import did_you_mean

        all_kinds = [k for ks in REGISTRY.by_role.values() for k in ks]
        _fail([Diagnostic("E0105", f"unknown kind `{kind}`", help=did_you_mean(kind, all_kinds) or
                          "kinds: " + ", ".join(sorted(all_kinds)))], {})
    print(json.dumps(doc, indent=2))


# ---------------------------------------------------------------- build
@command()
def build(
    spec: Annotated[str, typer.Argument(help="FILE or FILE:MODEL", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="model folder to write")] = None,
    device: Annotated[str, typer.Option(help="`cpu`, `cuda`, `auto`, or `meta` to check the module without "
                                           "allocating")] = "cpu",
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer folder to bundle (with its qformer_tokenizer/, "
                                                     "if any, for InstructBLIP); default: the language model's "
                                                     "`tokenizer`, else its `weights` folder's")] = None,
    seed: Annotated[int, typer.Option(help="seed for the random initialisation")] = 0,
) -> None:
    """Build the PyTorch model and write it as a Hugging-Face-layout folder (config.json, model.safetensors)."""
    analysis = _load(spec)
    if output is None and device != "meta":
        _fail([Diagnostic("E0005", "`vlm build` needs --output DIR (or --device meta to only check the module)")], {})
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from vlmspec.compiler.summary import human

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=err, transient=True) as progress:
        from vlmspec.runtime.devices import resolve_device
        from vlmspec.runtime.session import build_session

        device = str(resolve_device(device))
        task = progress.add_task(f"building {analysis.ir.name} on {device}")

        # the folder holds the weights unquantized: loading it applies the spec's `quantize`
        session = build_session(analysis, tokenizer=tokenizer, device=device, seed=seed, quantize=output is None)
        model, report, tok = session.model, session.report, session.tokenizer
        n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        if output is not None and device != "meta":
            from vlmspec.runtime.checkpoint import save_model_dir

            progress.update(task, description=f"writing {output}")
            save_model_dir(model, analysis, output, tokenizer=tok, instruction_tokenizer=session.instruction_tokenizer,
                           progress=lambda msg: progress.update(task, description=msg))
    if report is not None:
        out.print(str(report), markup=False)
    expected = analysis.total_params
    status = "matches" if n == expected else f"DIFFERS from the spec's {expected:,}"
    out.print(f"built {analysis.ir.name} on {device}: {n:,} parameters ({human(n)}), {status}")
    if output is not None and device != "meta":
        out.print(f"wrote {output}/ (config.json, model.safetensors, spec.vlm{', tokenizer' if tok else ''})")
        if tok is not None:
            out.print(f"tokenizer: {session.tokenizer_origin}", markup=False)


# ---------------------------------------------------------------- generate
@command()
def generate(
    model_dir: Annotated[Path, typer.Argument(help="folder from `vlm build` or `vlm train`", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="the question or instruction")],
    image: Annotated[list[Path] | None, typer.Option("--image", "-i", help="image file (repeatable: one answer each)")] = None,
    video: Annotated[list[Path] | None, typer.Option("--video", help="video file or folder of frames (repeatable: "
                                                     "one answer each; needs `video = frames(...)`)")] = None,
    audio: Annotated[list[Path] | None, typer.Option("--audio", help="WAV file (repeatable: one answer each; "
                                                     "needs an `audio` encoder)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="stop after this many tokens")] = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 1.0,
    num_beams: Annotated[int, typer.Option(help="beam search width")] = 1,
    seed: Annotated[int | None, typer.Option(help="seed for sampling")] = None,
    boxes: Annotated[bool, typer.Option("--boxes", help="also print the boxes the answer holds, read in the "
                                        "spec's `boxes` format, in the image's pixels")] = False,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Answer a prompt about an image with a built or trained model."""
    from vlmspec.runtime.devices import resolve_device
    from vlmspec.runtime.inference import answer
    from vlmspec.runtime.session import load_session

    session = load_session(model_dir, device=str(resolve_device(device)))
    from vlmspec.runtime.contrastive import refuse_generation

    refuse_generation(session.model, "vlm generate")
    if audio or ((image or video) and session.analysis.ir.by_role("audio")):
        from vlmspec.runtime.audio.answer import answer_audio, refuse_pictures

        refuse_pictures(session, bool(image or video))
        for a in audio or []:
            out.print(answer_audio(session, prompt, a, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, num_beams=num_beams, seed=seed), markup=False)
        return
    if video:
        from vlmspec.diagnostics import user_error
        from vlmspec.runtime.video_features import answer_video

        if image:
            raise user_error("E0604", "give --image or --video, not both", help="ask about each in its own call")
        for v in video:
            out.print(answer_video(session, prompt, str(v), max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, num_beams=num_beams, seed=seed), markup=False)
        return
    texts = answer(session, [prompt] * max(1, len(image or [])), [str(i) for i in image] if image else None,
                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   num_beams=num_beams, seed=seed)
    if boxes or as_json:  # grounding: the text and, with --boxes, its boxes (vlmspec/runtime/grounding.py)
        from vlmspec.runtime.grounding import print_answers

        print_answers(session, texts, image or [], boxes, as_json, out)
        return
    for text in texts:
        out.print(text, markup=False)


# ---------------------------------------------------------------- train
@command()
def train(
    spec: Annotated[str, typer.Argument(help="FILE or FILE:MODEL", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="run folder (checkpoints, metrics, final model)")],
    data: Annotated[str | None, typer.Option(help="data file, or the folder stage `data` paths are relative to")] = None,
    images: Annotated[str | None, typer.Option(help="image folder (default: next to the data file)")] = None,
    stage: Annotated[list[str] | None, typer.Option("--stage", help="train only this stage (repeatable)")] = None,
    resume: Annotated[bool, typer.Option(help="continue a run that was interrupted")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan and memory estimate; train nothing")] = False,
    max_bad: Annotated[int, typer.Option(help="skip up to this many bad records")] = 0,
    steps: Annotated[int | None, typer.Option(help="override every stage's number of steps")] = None,
    save_every: Annotated[int, typer.Option(help="checkpoint every N optimizer steps")] = 50,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer folder (default: the LLM's, else trained on the data)")] = None,
    fsdp: Annotated[bool, typer.Option(help="shard trained components with FSDP2 under torchrun")] = False,
    eval_data: Annotated[str | None, typer.Option(
        "--eval", help="held-out data scored during training with `vlm eval`'s code, the task read off its "
        "records: VQA, video QA (`video`), grounding (`box`), zero-shot (`label`) or retrieval (`captions`)")] = None,
    eval_every: Annotated[int, typer.Option(help="steps between held-out evaluations (0: end of each stage)")] = 0,
    workers: Annotated[int | None, typer.Option(
        min=0, help="processes reading images ahead of training (0: on the training process; default: a quarter "
        "of the CPUs per torchrun process, at most 4)", show_default=False)] = None,
    ranks: Annotated[int | None, typer.Option(
        min=1, help="with --dry-run: plan memory per rank for N processes (default: torchrun's WORLD_SIZE, else 1)",
        show_default=False)] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Run the spec's stage schedule: freeze, train and LoRA exactly what each stage says."""
    analysis = _load(spec)
    if dry_run:
        _print_plan(analysis, data, images, stage, fsdp=fsdp, ranks=ranks, tokenizer=tokenizer)
        return
    if ranks is not None:
        _fail([Diagnostic("E0005", "--ranks only plans (with --dry-run); torchrun decides how many processes "
                                   "train")], {})
    from vlmspec.runtime.train import Trainer, TrainOptions

    path = spec.split(":")[0] if not Path(spec).is_file() else spec
    opts = TrainOptions(run_dir=output, data=data, images=images, stages=stage, resume=resume, max_bad=max_bad,
                        steps=steps, save_every=save_every, tokenizer=tokenizer, fsdp=fsdp,
                        eval_data=eval_data, eval_every=eval_every, workers=workers, device=device,
                        log=lambda m: err.print(m, markup=False, highlight=False))
    trainer = Trainer(analysis, opts, Path(analysis.file).read_text(encoding="utf-8"), path)
    if trainer.dist.world <= 1:
        trainer.run()
        return
    code = 0
    try:
        trainer.run()
    except VlmSpecError as e:
        err.print(render_all(e.diagnostics, e.sources, color=err.is_terminal), markup=False)
        code = 1
    except Exception as e:  # noqa: BLE001 - reported below; a worker must still shut down cleanly
        from rich.markup import escape

        err.print(f"[red]rank {trainer.dist.rank} failed[/red]: {type(e).__name__}: {escape(str(e))}")
        code = 2
    # gloo workers can abort at interpreter exit; this shutdown order never does (ENV-NOTES.md)
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        if code == 0:
            torch_dist.barrier()
        torch_dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _print_plan(analysis, data: str | None = None, images: str | None = None,
                only: list[str] | None = None, fsdp: bool = False, ranks: int | None = None,
                tokenizer: str | None = None) -> None:
    """Each stage's components, memory per rank (weights, gradients, optimizer state, activations of one
    micro-batch) and data. Ranks: `ranks`, else torchrun's WORLD_SIZE, else 1; the sequence length: the
    data's longest sample when there is data, else what the spec gives (the output says which)."""
    from rich.markup import escape

    from vlmspec.compiler.summary import human, summarise
    from vlmspec.runtime.train.data_plan import data_plan

    ranks = ranks or int(os.environ.get("WORLD_SIZE", "1") or 1)
    stages = {st.name: st for st in analysis.ir.stages}
    plans = {name: data_plan(analysis, st, data, images, tokenizer) for name, st in stages.items()
             if not only or name in only}
    s = summarise(analysis, ranks=ranks, fsdp=fsdp,
                  sequences={k: p.sequence for k, p in plans.items() if not isinstance(p, str)})
    out.print(f"[bold]{s['model']}[/bold]: {human(s['params']['total'])} parameters, "
              f"weights {human(s['memory']['weights'], 'B')}")
    for st in s["stages"]:
        if only and st["name"] not in only:
            continue
        t = Table(title=f"stage {st['name']}: {st['optim']}, batch {st['batch']}, {st['precision']}",
                  title_justify="left")
        for col in ("component", "status", "trainable"):
            t.add_column(col, justify="right" if col == "trainable" else "left")
        for comp, status in st["status"].items():
            if status != "empty":
                t.add_row(comp, status, human(st["params"]["by_component"].get(comp, 0)))
        if st["params"]["lora"]:
            t.add_row("(LoRA adapters)", "trained", human(st["params"]["lora"]))
        out.print(t)
        m = st["memory"]
        where = (f"per rank of {m['ranks']}" + (", trained components sharded (FSDP)" if m["sharded"] else "")
                 if m["ranks"] > 1 else "per rank (one process" + (
                     "; FSDP shards over WORLD_SIZE ranks under torchrun)" if fsdp or stages[st["name"]].fsdp
                     else ")"))
        out.print(f"  memory {where}: weights {human(m['weights'], 'B')} + grads {human(m['grads'], 'B')} + "
                  f"optimizer {human(m['optimizer'], 'B')} + activations {human(m['activations'], 'B')} "
                  f"= {human(m['total'], 'B')}", highlight=False)
        out.print(f"  activations: micro-batch {m['micro_batch']} x {m['sequence']['tokens']:,} tokens "
                  f"({escape(m['sequence']['source'])})", highlight=False)
        plan = plans[st["name"]]
        if isinstance(plan, str):
            out.print(f"  data: {escape(plan)}")
            continue
        read = f"{plan.samples:,} samples" + (f", the first {plan.read:,} read" if plan.read < plan.samples else "")
        out.print(f"  data: {read}; image tokens per sample {plan.fewest:,}..{plan.most:,} (mean {plan.mean:,.0f})"
                  + (f"; [yellow]{plan.over_context:,} exceed the context by their images alone[/yellow]"
                     if plan.over_context else ""))


# ---------------------------------------------------------------- serve
@command()
def serve(
    model_dir: Annotated[Path, typer.Argument(help="folder from `vlm build` or `vlm train`", show_default=False)],
    host: Annotated[str, typer.Option(help="interface to bind (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[str | None, typer.Option(help="require `Authorization: Bearer KEY`", envvar="VLMSPEC_API_KEY")] = None,
    files_root: Annotated[Path | None, typer.Option(help="allow image_url paths to local files under this folder")] = None,
    max_batch: Annotated[int, typer.Option(help="requests decoded together (the running batch)")] = 8,
    max_wait_ms: Annotated[float, typer.Option(help="how long an arrival waits for others to join the batch with it")] = 20.0,
    max_queue: Annotated[int, typer.Option(help="waiting requests before 503")] = 64,
    max_body_mb: Annotated[float, typer.Option(help="largest request body")] = 20.0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Serve a model over HTTP with the OpenAI chat-completions API (images as data URLs)."""
    import socket

    import uvicorn

    try:  # before the model loads: a busy port is said at once, as a diagnostic, not as uvicorn's errno
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        _fail([Diagnostic("E0007", f"cannot listen on {host}:{port}: {e.strerror or e}",
                          help="pass --port N for a free port, or stop what is listening there")], {})

    if threads:
        import torch

        torch.set_num_threads(threads)

    from vlmspec.runtime.devices import resolve_device
    from vlmspec.runtime.serve import ServeConfig, create_app
    from vlmspec.runtime.session import load_session

    session = load_session(model_dir, device=str(resolve_device(device)))
    from vlmspec.runtime.contrastive import refuse_generation

    refuse_generation(session.model, "vlm serve")
    if session.processor is None:
        _fail([Diagnostic("E0534", f"{model_dir} has no tokenizer, so it cannot read prompts",
                          help="build it with --tokenizer, or serve a `vlm train` output (RUN/final)")], {})
    cfg = ServeConfig(max_body=int(max_body_mb * 1024 * 1024), api_key=api_key,
                      files_root=str(files_root) if files_root else None, max_batch=max_batch,
                      max_wait_ms=max_wait_ms, max_queue=max_queue)
    err.print(f"serving {session.name} on http://{host}:{port}/v1 (POST /v1/chat/completions)")
    uvicorn.run(create_app(session, cfg), host=host, port=port, log_level="warning")


# ---------------------------------------------------------------- export
@command()
def export(
    model_dir: Annotated[Path, typer.Argument(help="folder from `vlm build` or `vlm train`", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="export folder (halves, manifest, tokenizer, spec)")],
    format: Annotated[str, typer.Option("--format", "-f", help="pt2, onnx, tensorrt, or several: pt2,onnx")] = "pt2",
    max_len: Annotated[int | None, typer.Option(help="static KV-cache length (default: the LLM's max_positions)")] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16")] = None,
    max_batch: Annotated[int, typer.Option(help="largest batch the exported programs accept")] = 64,
    quantize: Annotated[str | None, typer.Option(help="int8 or fp8 (TensorRT only)")] = None,
) -> None:
    """Export the encoder half and the decoder half (prefill + decode step, static KV cache) for serving."""
    from vlmspec.runtime.contrastive import refuse_contrastive_folder
    from vlmspec.runtime.export import export_model

    refuse_contrastive_folder(model_dir, "vlm export")
    manifest = export_model(str(model_dir), output, format, max_len=max_len, dtype=dtype, max_batch=max_batch,
                            quantize=quantize, progress=lambda msg: err.print(msg, markup=False, highlight=False))
    formats = ", ".join(manifest.get("artefacts", {}))
    out.print(f"exported {manifest.get('model', '')} to {output}/ ({formats}; interface and shapes in manifest.json)")


# ---------------------------------------------------------------- Hugging Face interchange
@command(name="import-hf")
def import_hf_cmd(
    folder: Annotated[Path, typer.Argument(help="a local Hugging Face checkpoint folder (the formats: docs/weights.md)",
                                           show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="the .vlm spec to write")],
    name: Annotated[str | None, typer.Option(help="model name in the spec")] = None,
) -> None:
    """Write a readable .vlm spec equivalent to a Hugging Face checkpoint; its components load that checkpoint."""
    from vlmspec.fsutil import atomic_write_text
    from vlmspec.runtime.weights import import_hf

    text, mapping = import_hf(str(folder), name=name)
    atomic_write_text(output, text)
    out.print(f"wrote {output}: model `{mapping['model']}` from {mapping['architecture']}; "
              f"`vlm build {output} -o DIR` loads the weights")


@command(name="export-hf")
def export_hf_cmd(
    model_dir: Annotated[Path, typer.Argument(help="folder from `vlm build` or `vlm train`", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="checkpoint folder to write")],
    format: Annotated[str | None, typer.Option("--format", help="the HF format to write (default: the one that "
                                               "holds the architecture; the table in docs/weights.md lists them)",
                                               show_default=False)] = None,
) -> None:
    """Write a model as a Hugging Face checkpoint folder, ready to serve (transformers, vLLM, SGLang)."""
    from vlmspec.runtime.contrastive import is_contrastive_folder
    from vlmspec.runtime.weights.export import export_hf

    path = export_hf(str(model_dir), str(output), format)
    if is_contrastive_folder(model_dir):
        out.print(f"wrote {path}: load it with transformers' AutoModel and AutoProcessor (an image-text embedding "
                  "model: no chat template, nothing to serve)", markup=False)
        return
    served = (path / "chat_template.jinja").is_file()
    out.print(f"wrote {path}: load it with transformers' AutoProcessor and AutoModelForImageTextToText"
              + (f", or serve it: transformers serve {path}" if served else
                 " (no tokenizer in the model folder: no processor, chat template or generation config)"),
              markup=False)


# ---------------------------------------------------------------- eval
@command(name="eval")
def evaluate(
    target: Annotated[str | None, typer.Argument(help="model folder, or SPEC (a fresh build)", show_default=False)] = None,
    task: Annotated[str, typer.Option(help="vqa, caption, retrieval, video_qa, zero_shot or grounding")] = "vqa",
    data: Annotated[str, typer.Option(help="JSONL, VQAv2 questions/annotations JSON or COCO captions JSON")] = "",
    images: Annotated[str | None, typer.Option(help="image folder (default: next to the data file)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="results JSON (per-sample predictions + metrics)")] = None,
    server: Annotated[str | None, typer.Option(help="evaluate an OpenAI-compatible server at this URL instead")] = None,
    api_key: Annotated[str | None, typer.Option(help="with --server: sent as `Authorization: Bearer KEY`",
                                                envvar="OPENAI_API_KEY", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="prompts generated together")] = 16,
    max_new_tokens: Annotated[int | None, typer.Option(
        help="longest answer (default 16; grounding: room for one box in the model's format, 64 over --server)",
        show_default=False)] = None,
    max_bad: Annotated[int, typer.Option(help="skip up to this many bad records")] = 0,
    limit: Annotated[int | None, typer.Option(help="evaluate the first N samples only")] = None,
    classes: Annotated[str | None, typer.Option(help="zero_shot: class names, comma-separated (default: the "
                                                "labels' set)", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option(help="zero_shot: the class prompt template (default: "
                                               "\"a photo of a {label}.\")", show_default=False)] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Score a model: VQA (VQAv2 accuracy), captioning (BLEU-4, CIDEr-D), retrieval (recall@1/5/10), video QA
    (multiple-choice accuracy), grounding (accuracy at IoU >= 0.5) or zero-shot classification (CLIP / SigLIP)."""
    from vlmspec.evaluation import describe_metrics, run_eval, run_eval_server, write_results

    if not data:
        _fail([Diagnostic("E0005", "`vlm eval` needs --data FILE")], {})
    if task not in ("vqa", "caption", "retrieval", "video_qa", "zero_shot", "grounding"):
        _fail([Diagnostic("E0005", f"unknown task `{task}`",
                          help="use vqa, caption, retrieval, video_qa, zero_shot or grounding")], {})
    zero_shot = {"classes": [c.strip() for c in classes.split(",") if c.strip()] if classes else None,
                 "zero_shot_prompt": prompt} if task == "zero_shot" else {}
    if server and task == "zero_shot":
        _fail([Diagnostic("E0619", "zero-shot classification needs the model's embeddings, which a server "
                          "does not give", help="evaluate the model folder: `vlm eval MODEL --task zero_shot`")], {})
    if server:
        results = run_eval_server(server, task, data, images, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                  max_bad=max_bad, limit=limit, api_key=api_key)
    else:   # a model folder needs no key (OPENAI_API_KEY may well be set for other tools): it is ignored
        if target is None:
            _fail([Diagnostic("E0005", "`vlm eval` needs a model folder (or --server URL)")], {})
        from vlmspec.runtime.devices import resolve_device
        from vlmspec.runtime.session import load_session

        results = run_eval(load_session(target, device=str(resolve_device(device))), task, data, images, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           max_bad=max_bad, limit=limit, **zero_shot)
    metrics = results["metrics"]
    out.print(f"{task} on {data}: {describe_metrics(metrics)}", markup=False)
    if output is not None:
        write_results(results, output)
        out.print(f"wrote {output}")


# ---------------------------------------------------------------- lsp
@command()
def lsp() -> None:
    """Run the language server for .vlm files on stdin/stdout (diagnostics, hover, completion, go to
    definition, formatting); editors start it themselves, see docs/editors.md."""
    from vlmspec.lsp import main as serve_lsp

    serve_lsp()


# ---------------------------------------------------------------- data
data_app = typer.Typer(help="Datasets: generate the bundled synthetic one.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    output: Annotated[Path, typer.Option("--output", "-o", help="folder to write")],
    n: Annotated[int, typer.Option("--n", help="training images")] = 2000,
    test: Annotated[int, typer.Option(help="held-out images")] = 200,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 64,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    video: Annotated[bool, typer.Option("--video", help="moving shapes instead: `which way does the shape move?` "
                                        "videos, with a video_qa test file")] = False,
    frames: Annotated[int, typer.Option(help="with --video: frames per video")] = 8,
    video_format: Annotated[str, typer.Option("--video-format", help="with --video: `frames` (a PNG folder per "
                                              "video) or `mp4` (MPEG-4 via PyAV)")] = "frames",
    audio: Annotated[bool, typer.Option("--audio", help="tones instead: `is the tone low, middle or high?` WAV "
                                        "clips of up to 1 s at 16 kHz")] = False,
    grounding: Annotated[bool, typer.Option("--grounding", help="grounding instead: `[refer] the red circle` -> its "
                                            "box (records carry `box` in pixels; training writes it in the spec's "
                                            "`boxes` format)")] = False,
    task_token: Annotated[str, typer.Option(help="with --grounding: the task token before each referring "
                                            "expression (\"\": a plain `Where is ...?`)")] = "[refer]",
    positions: Annotated[int, typer.Option(help="with --grounding: shapes on a P x P grid of cells (0: anywhere, "
                                           "any size)")] = 0,
) -> None:
    """Write coloured shapes with captions and question/answer conversations (LLaVA format); with --video,
    shapes moving left / right / up / down (`--size` defaults to 32 px then)."""
    from vlmspec.runtime.inputs.synth import synthesize, synthesize_video

    if grounding:
        from vlmspec.runtime.inputs.synth_grounding import synthesize_grounding

        counts = synthesize_grounding(output, n_train=n, n_test=test, size=size, seed=seed, task_token=task_token,
                                      positions=positions)
        out.print(f"wrote {output}: " + ", ".join(f"{v:.4g} {k.replace('_', ' ')}" for k, v in counts.items()))
        return
    if audio:
        from vlmspec.runtime.inputs.synth_audio import synthesize_audio

        counts = synthesize_audio(output, n_train=n, n_test=test, seed=seed)
        out.print(f"wrote {output}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
        return
    if video:
        if video_format not in ("frames", "mp4"):
            _fail([Diagnostic("E0005", f"unknown --video-format `{video_format}`", help="use frames or mp4")], {})
        counts = synthesize_video(output, n_train=n, n_test=test, size=32 if size == 64 else size, frames=frames,
                                  fmt=video_format, seed=seed)
        out.print(f"wrote {output}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
        return
    counts = synthesize(output, n_train=n, n_test=test, size=size, seed=seed)
    out.print(f"wrote {output}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))


def main() -> None:
    """Entry point: typed errors render as diagnostics; anything else is a bug, reported without a traceback."""
    try:
        app()
    except VlmSpecError as e:
        err.print(render_all(e.diagnostics, e.sources, color=err.is_terminal), markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last line of defence for "never a traceback"
        if os.environ.get("VLMSPEC_DEBUG"):
            raise
        from rich.markup import escape

        err.print(f"[red]internal error[/red]: {type(e).__name__}: {escape(str(e))}\n"
                  "this is a bug in vlmspec; rerun with VLMSPEC_DEBUG=1 for the traceback and report it")
        sys.exit(2)


if __name__ == "__main__":
    main()
