"""Mutation check: does the fast suite catch the bugs an audit found it let through?

Each mutation below is one small, plausible bug: an exact source snippet in one runtime file and its
replacement. For each, the script copies the repository (tracked and untracked, non-ignored files) to a
temporary folder once, writes the mutated file there, runs the mutation's fast test files (`-m "not
slow"`) in the copy, and puts the file back; the working tree is never written. A mutation is *caught*
when a test fails, *survives* when all pass, and is an *error* when pytest cannot run (collection error,
timeout). Before any mutation runs, every snippet must occur exactly once in its file (or the script
stops: the list has gone stale as the code moved, so refresh it), and the same tests must pass unmutated.

    python scripts/mutate.py                     # all mutations, their own test files
    python scripts/mutate.py --only qkv-bias-dropped --only rmsnorm-ignores-weight
    python scripts/mutate.py --tests tests/weights   # one test selection for every mutation
    python scripts/mutate.py --lock /tmp/vlmspec-cpu.lock --append bench/RESULTS.md

Exit status: 0 when every mutation is caught, 1 when one survives (or errs), 2 when the list is stale
or the unmutated tests fail.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WEIGHTS = ["tests/weights"]
QFORMER = ["tests/weights/test_parity_instructblip.py", "tests/weights/test_weights_parity.py"]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    edits: list[tuple[str, str]]  # (exact snippet, replacement); each snippet must occur exactly once
    tests: list[str]  # pytest arguments: files, folders or node ids
    what: str = ""
    timeout: int = 900


# ---------------------------------------------------------------- the list (refresh the snippets when code moves)

MUTATIONS: list[Mutation] = [
    Mutation(
        "vision-layernorm-ignores-affine", "vlmspec/runtime/vision/encoder.py",
        [("a = self.self_attn(self.layer_norm1(x), rotary, mask)",
          "a = self.self_attn(torch.nn.functional.layer_norm(x, x.shape[-1:], eps=self.layer_norm1.eps), rotary, mask)")],
        WEIGHTS, "the vision layers' first LayerNorm drops its weight and bias"),
    Mutation(
        "vision-layernorms-swapped", "vlmspec/runtime/vision/encoder.py",
        [("a = self.self_attn(self.layer_norm1(x), rotary, mask)", "a = self.self_attn(self.layer_norm2(x), rotary, mask)"),
         ("f = self.mlp(self.layer_norm2(x))", "f = self.mlp(self.layer_norm1(x))")],
        WEIGHTS, "layer_norm1 before the MLP, layer_norm2 before attention"),
    Mutation(
        "rmsnorm-ignores-weight", "vlmspec/runtime/blocks.py",
        [("return self.weight * (h if dtype == torch.float32 else h.to(dtype))",
          "return (h if dtype == torch.float32 else h.to(dtype))")],
        WEIGHTS, "Llama's RMSNorm drops its weight"),
    Mutation(
        "lm-qkv-bias-dropped", "vlmspec/runtime/language/layers.py",
        [("return self.q_proj(x), self.k_proj(x), self.v_proj(x)",
          "return (torch.nn.functional.linear(x, self.q_proj.weight), torch.nn.functional.linear(x, self.k_proj.weight),"
          " torch.nn.functional.linear(x, self.v_proj.weight))")],
        WEIGHTS, "the language model's q / k / v projections drop their biases (OPT, Qwen2, Phi)"),
    Mutation(
        "qformer-query-tokens-zeroed", "vlmspec/runtime/connectors/qformer.py",
        [("queries = self.query_tokens.expand(x.x.shape[0], -1, -1)",
          "queries = torch.zeros_like(self.query_tokens).expand(x.x.shape[0], -1, -1)")],
        QFORMER, "the Q-Former starts from zero queries instead of its learned query_tokens"),
    Mutation(
        "qformer-reads-zero-image", "vlmspec/runtime/connectors/qformer.py",
        [("h = self.qformer(queries, x.x, instruction)", "h = self.qformer(queries, torch.zeros_like(x.x), instruction)")],
        ["tests/weights/test_parity_instructblip.py"],
        "the Q-Former cross-attends to a zero image (InstructBLIP's tests alone must see it)"),
    Mutation(
        "lm-loss-gradient-ascent", "vlmspec/runtime/train/loop.py",
        [("loss = loss_sum * dist.world / max(1, total_tokens)", "loss = -loss_sum * dist.world / max(1, total_tokens)")],
        ["tests/train/test_learning.py"], "the trainer climbs the language-model loss"),
    Mutation(
        "export-decode-position-off-by-one", "vlmspec/runtime/export/runner.py",
        [("position = mask.sum(1)\n", "position = mask.sum(1) + 1\n")],
        ["tests/export/test_export_parity.py"], "the exported runner's decode steps start one position late"),
    Mutation(
        "resume-ignores-checkpoint", "vlmspec/runtime/train/loop.py",
        [("if opts.resume and (ckpt / \"state.json\").is_file():",
          "if False and opts.resume and (ckpt / \"state.json\").is_file():")],
        ["tests/train/test_first_stage.py::test_first_stage_resume_is_bitwise",
         "tests/train/test_trainer.py::test_kill_and_resume_is_bitwise"],
        "`--resume` trains the stage again from step 0 (same seed: the same final weights)"),
]


# ---------------------------------------------------------------- running


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # caught / survived / error
    failed: list[str] = field(default_factory=list)
    total: int = 0
    seconds: float = 0.0
    detail: str = ""


def check_snippets(mutations: list[Mutation], root: Path) -> list[str]:
    """Every snippet occurs exactly once in its file (in order, after the previous edits): the problems."""
    problems = []
    for m in mutations:
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        text = path.read_text()
        for old, new in m.edits:
            n = text.count(old)
            if n != 1:
                problems.append(f"{m.name}: {m.file} holds {n} copies of {old!r} (want exactly 1)")
                break
            text = text.replace(old, new)
    return problems


def copy_repo(dest: Path) -> None:
    """The files git tracks or would track (not ignored), as they are in the working tree."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@contextlib.contextmanager
def locked(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def env_for(copy: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("UPDATE_SNAPSHOTS", None)
    return env


def pytest(copy: Path, args: list[str], timeout: int, lock: str | None) -> tuple[int, list[str], int, str, float]:
    """Run pytest in the copy: (exit code, failed test ids, tests run, tail of the output, seconds it ran,
    not counting any wait for the lock)."""
    report = copy / ".mutate-junit.xml"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", "--tb=line",
           f"--junitxml={report}", *args]
    with locked(lock):
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return -1, [], 0, f"timed out after {timeout} s", time.perf_counter() - t0
        seconds = time.perf_counter() - t0
    failed, total = [], 0
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            total += 1
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return r.returncode, failed, total, (r.stdout + r.stderr)[-3000:], seconds


def run_one(m: Mutation, copy: Path, tests: list[str] | None, lock: str | None) -> Outcome:
    path = copy / m.file
    original = path.read_text()
    mutated = original
    for old, new in m.edits:
        mutated = mutated.replace(old, new)
    try:
        path.write_text(mutated)
        code, failed, total, tail, seconds = pytest(copy, tests or m.tests, m.timeout, lock)
    finally:
        path.write_text(original)
    if code == 0:
        return Outcome(m, "survived", [], total, seconds)
    if code == 1 and failed:
        return Outcome(m, "caught", failed, total, seconds, tail)
    return Outcome(m, "error", failed, total, seconds, tail)


def short(test_id: str) -> str:
    return test_id.rsplit(".", 1)[-1] if "::" in test_id else test_id


def table(outcomes: list[Outcome]) -> str:
    rows = ["| mutation | file | result | failing tests / run | first failure | seconds |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        first = short(o.failed[0]) if o.failed else ""
        rows.append(f"| {o.mutation.name} | {o.mutation.file} | {o.status} | {len(o.failed)} / {o.total} | {first} | "
                    f"{o.seconds:.0f} |")
    return "\n".join(rows)


def results_row(outcomes: list[Outcome], seconds: float, command: str) -> str:
    caught = [o for o in outcomes if o.status == "caught"]
    others = [o for o in outcomes if o.status != "caught"]
    figures = "; ".join(f"{o.mutation.name} {o.status} ({len(o.failed)}/{o.total} tests fail)" for o in outcomes)
    ratio = f"{len(caught)}/{len(outcomes)} caught, {len(others)} survivors; {seconds:.0f} s of mutated fast-test runs"
    return f"| {datetime.date.today().isoformat()} | `{command}` | {figures} | {ratio} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], help="run this mutation (repeatable)")
    ap.add_argument("--tests", nargs="+", help="pytest arguments to use for every mutation instead of its own")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    ap.add_argument("--lock", help="hold this flock(2) file around each pytest run (shared machines)")
    ap.add_argument("--append", type=Path, help="append a row with the figures to this RESULTS.md table")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the end of pytest's output for each mutation")
    args = ap.parse_args()

    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"unknown mutation(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:36} {m.file:42} {m.what}")
        return 0
    problems = check_snippets(chosen, ROOT)
    if problems:
        print("stale mutation list (refresh the snippets at the top of scripts/mutate.py):", file=sys.stderr)
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still remove the copy
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vlmspec-mutate-"))
    copy = tmp / "repo"
    try:
        copy_repo(copy)
        where = subprocess.run([sys.executable, "-c", "import vlmspec; print(vlmspec.__file__)"], cwd=copy,
                               env=env_for(copy), capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(copy)):
            print(f"the copy's vlmspec is not the one imported ({where})", file=sys.stderr)
            return 2
        if not args.no_baseline:
            union = list(dict.fromkeys(t for m in chosen for t in (args.tests or m.tests)))
            print(f"baseline: {' '.join(union)}", flush=True)
            code, failed, total, tail, seconds = pytest(copy, union, 3600, args.lock)
            print(f"  {total} tests, {len(failed)} failing, {seconds:.0f} s", flush=True)
            if code != 0:
                print(f"the unmutated tests do not pass (exit {code}): {failed[:5]}\n{tail}", file=sys.stderr)
                return 2
        outcomes = []
        for m in chosen:
            print(f"{m.name}: {m.file} ...", end=" ", flush=True)
            o = run_one(m, copy, args.tests, args.lock)
            outcomes.append(o)
            print(f"{o.status} ({len(o.failed)}/{o.total} failing, {o.seconds:.0f} s)", flush=True)
            if o.status == "error" or args.verbose:
                print(o.detail, file=sys.stderr)
    finally:
        if args.keep:
            print(f"copy kept at {copy}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = sum(o.seconds for o in outcomes)  # pytest time under the mutations (no lock waits, no baseline)
    print()
    print(table(outcomes))
    survivors = [o.mutation.name for o in outcomes if o.status != "caught"]
    print(f"\n{len(outcomes) - len(survivors)}/{len(outcomes)} caught; survivors: {', '.join(survivors) or 'none'}; "
          f"{seconds:.0f} s of mutated test runs, {time.perf_counter() - t_start:.0f} s in all")
    if args.append:
        command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *[a for a in sys.argv[1:]
                                                                        if not a.startswith("--append")
                                                                        and a != str(args.append)]])
        with open(args.append, "a") as f:
            f.write(results_row(outcomes, seconds, command) + "\n")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
