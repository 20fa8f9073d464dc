"""Front-end fuzz run: mutate every spec in specs/ and check that each mutant ends in a diagnostic, never a crash.

Each mutant starts from one specs/*.vlm file and gets one to three mutations (seeded, so a run repeats):

- byte:      bit flips, inserted/deleted/replaced bytes (invalid UTF-8, NUL, control characters, odd
             line breaks), truncation (also in the middle of a multi-byte character);
- token:     a token (found with the spec lexer) deleted, duplicated, swapped with another, or replaced
             by a token of another spec;
- structure: a `{`/`}`/`(`/`[` dropped or duplicated, a deeply nested expression, a huge number, a very
             long name or line, lines swapped in from another spec, a block duplicated or cut.

Every mutant goes through what `vlm check FILE` runs, in-process: `check_file` on the text (a mutant that
is not UTF-8 is written to a temporary file and read from disk, as the CLI does), then `render_all` as
the CLI prints it, then `format_text` (what `vlm fmt` runs). A mutant is

- clean:      no error;
- located:    errors, every one with a span inside the file, whose rendered source line is the line
              the span points at;
- unlocated:  an error without a span, or with a span outside the text, or rendered on another line
              (a failure: the text exists, so a location does; file-level E0004 errors without text
              are counted apart, as `file`, and are not failures);
- exception:  anything raised other than a typed `VlmSpecError` (what `vlm` reports as "internal
              error"), or a mutant that takes longer than --timeout seconds.

    python scripts/fuzz.py                          # 10,000 mutants, seed 0
    python scripts/fuzz.py -n 500 --seed 3 --show 5 # a quick run; print 5 failing mutants
    python scripts/fuzz.py --lock /tmp/vlmspec-cpu.lock --append bench/RESULTS.md

Failing mutants are saved under --save (default: none) as NNNNN.vlm for replay with `vlm check`.
Exit status: 0 when no mutant fails, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlmspec.compiler.compile import check_file  # noqa: E402
from vlmspec.compiler.printer import format_text  # noqa: E402
from vlmspec.diagnostics import LONG_LINE, Diagnostic, VlmSpecError, render, render_all  # noqa: E402
from vlmspec.grammar.parser import _parser  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutate import locked  # noqa: E402  (the CPU lock both scripts take)

# ---------------------------------------------------------------- seeds


def load_seeds(folder: Path = ROOT / "specs") -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.vlm"))]


def _enc(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


def _dec(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def tokens(text: str) -> list[tuple[int, int]]:
    """(start, end) of every token the spec lexer finds, comments included, up to the first it cannot read."""
    out = []
    with contextlib.suppress(Exception):
        for tok in _parser().lex(text, dont_ignore=True):
            if tok.type not in ("WS", "__IGNORE_0"):
                out.append((tok.start_pos, tok.end_pos))
    return out


# ---------------------------------------------------------------- mutations: (rng, text, seeds) -> text

Mutator = Callable[[random.Random, str, list[str]], str]

ODD_BYTES = [b"\xff", b"\xfe", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80", b"\x00", b"\x1b",
             b"\r", b"\x0b", b"\x0c", b"\x1c", b"\x85", b"\xef\xbb\xbf", b"\xe2\x80\xa8", b"\xe2\x80\xae",
             b"\xf0\x9f\x98\x80", b"\xcc\x81", b"\t", b"\\", b'"', b"#"]


def _pos(rng: random.Random, n: int) -> int:
    return rng.randint(0, n) if n else 0


def byte_flip(rng, text, seeds):
    data = bytearray(_enc(text))
    for _ in range(rng.randint(1, 3)):
        if data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    return _dec(bytes(data))


def byte_insert(rng, text, seeds):
    data = _enc(text)
    i = _pos(rng, len(data))
    ins = rng.choice(ODD_BYTES) if rng.random() < 0.6 else bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    return _dec(data[:i] + ins * rng.choice([1, 1, 1, 2, 50]) + data[i:])


def byte_delete(rng, text, seeds):
    data = _enc(text)
    i = _pos(rng, len(data))
    return _dec(data[:i] + data[i + rng.randint(1, 16):])


def byte_replace(rng, text, seeds):
    data = _enc(text)
    i = _pos(rng, len(data))
    return _dec(data[:i] + bytes([rng.randrange(256)]) + data[i + 1:])


def truncate(rng, text, seeds):
    data = _enc(text)
    return _dec(data[:_pos(rng, len(data))])


def _token(rng, text) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    toks = tokens(text)
    return toks, (rng.choice(toks) if toks else None)


def token_delete(rng, text, seeds):
    _, t = _token(rng, text)
    return text if t is None else text[:t[0]] + text[t[1]:]


def token_duplicate(rng, text, seeds):
    _, t = _token(rng, text)
    return text if t is None else text[:t[1]] + " " + text[t[0]:t[1]] + text[t[1]:]


def token_swap(rng, text, seeds):
    toks = tokens(text)
    if len(toks) < 2:
        return text
    a, b = sorted(rng.sample(toks, 2))
    return text[:a[0]] + text[b[0]:b[1]] + text[a[1]:b[0]] + text[a[0]:a[1]] + text[b[1]:]


def token_foreign(rng, text, seeds):
    other = rng.choice(seeds)
    _, t = _token(rng, text)
    toks = tokens(other)
    if t is None or not toks:
        return text
    s, e = rng.choice(toks)
    return text[:t[0]] + other[s:e] + text[t[1]:]


def _chars(rng, text, chars: str) -> list[int]:
    return [i for i, c in enumerate(text) if c in chars]


def brace_drop(rng, text, seeds):
    at = _chars(rng, text, "{}()[]")
    if not at:
        return text
    i = rng.choice(at)
    return text[:i] + text[i + 1:]


def brace_duplicate(rng, text, seeds):
    at = _chars(rng, text, "{}()[]")
    if not at:
        return text
    i = rng.choice(at)
    return text[:i] + text[i] * rng.choice([1, 2, 5, 200]) + text[i:]


def _value_slot(rng, text) -> int | None:
    """A position just after some `=`, where a value starts."""
    at = [i + 1 for i in _chars(rng, text, "=")]
    return rng.choice(at) if at else None


def _deep(rng) -> str:
    n = rng.choice([5, 50, 99, 100, 101, 150, 1000, 5000, 20000])
    shape = rng.choice(["paren", "neg", "sum", "prod", "list", "call", "mixed"])
    if shape == "paren":
        return "(" * n + "1" + ")" * n
    if shape == "neg":
        return "-" * n + "1"
    if shape == "sum":
        return " + ".join(["1"] * n)
    if shape == "prod":
        return "2" + " * (2" * n + ")" * n
    if shape == "list":
        return "[" * n + "1" + "]" * n
    if shape == "call":
        return "f(" * n + "1" + ")" * n
    return "(" * n + "-1 + " * n + "2" + ")" * n


def deep_nesting(rng, text, seeds):
    i = _value_slot(rng, text)
    if i is None:
        return text
    end = text.find("\n", i)
    end = len(text) if end < 0 else end
    keep_old = rng.random() < 0.3
    return text[:i] + " " + _deep(rng) + (text[i:] if keep_old else text[end:])


def _huge_number(rng) -> str:
    kind = rng.choice(["int", "int", "float", "exp", "neg", "underscore", "zero"])
    digits = rng.choice([19, 20, 39, 309, 4300, 4301, 5000, 100_000])
    if kind == "int":
        return "9" * digits
    if kind == "float":
        return "9" * digits + ".5"
    if kind == "exp":
        return rng.choice(["1e999", "1e-999", "9e308", "1e400000", "1" + "0" * 400 + ".0", "1e" + "9" * digits])
    if kind == "neg":
        return "-" + "9" * digits
    if kind == "underscore":
        return "1" + "_" * digits + "1"
    return "0" * digits


def huge_number(rng, text, seeds):
    at = [t for t in tokens(text) if text[t[0]].isdigit()]
    num = _huge_number(rng)
    if at and rng.random() < 0.8:
        s, e = rng.choice(at)
        return text[:s] + num + text[e:]
    i = _value_slot(rng, text)
    return text if i is None else text[:i] + " " + num + text[i:]


def huge_arithmetic(rng, text, seeds):
    """A value that is small to write but large to compute (`9...9 * 9...9`, a whole number times a float)."""
    i = _value_slot(rng, text)
    if i is None:
        return text
    big = "9" * rng.choice([20, 155, 160, 299, 300])
    expr = rng.choice([f"{big} * {big}", f"{big} * 1.5", f"{big} / 3", f"{big} * {big} / 7", f"-{big} * {big}",
                       f"{big} + {big} * 10", " * ".join([big] * rng.randint(2, 30)), f"1e308 * {big}",
                       f"{big} / 1e-300", "1e308 * 1e308 - 1e308 * 1e308"])
    end = text.find("\n", i)
    return text[:i] + " " + expr + text[len(text) if end < 0 else end:]


def scale_numbers(rng, text, seeds):
    """Every whole number times 2**k: the relations between them mostly hold, so later passes see huge values."""
    k = rng.choice([10, 31, 32, 63, 64, 200, 500, 990])
    out, last = [], 0
    for s, e in tokens(text):
        word = text[s:e]
        if word.isdigit() and len(word) < 50:
            out += [text[last:s], str(int(word) << k)]
            last = e
    return "".join(out) + text[last:]


def long_name(rng, text, seeds):
    names = [t for t in tokens(text) if text[t[0]].isalpha() or text[t[0]] == "_"]
    if not names:
        return text
    s, e = rng.choice(names)
    n = rng.choice([256, 10_000, 200_000])
    return text[:s] + text[s:e] + "x" * n + text[e:]


def long_line(rng, text, seeds):
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    what = rng.choice(["comment", "string", "spaces", "repeat", "attrs"])
    n = rng.choice([1000, 50_000, 500_000])
    if what == "comment":
        lines[i] += " #" + "c" * n
    elif what == "string":
        lines[i] += ' "' + "s" * n + '"'
    elif what == "spaces":
        lines[i] = " " * n + lines[i]
    elif what == "repeat":
        lines[i] = " ".join([lines[i]] * max(1, n // max(1, len(lines[i]) + 1) // 10))
    else:
        lines[i] += " ".join(f"a{k} = {k}" for k in range(n // 20))
    return "\n".join(lines)


def lines_foreign(rng, text, seeds):
    lines = text.split("\n")
    other = rng.choice(seeds).split("\n")
    for _ in range(rng.randint(1, 4)):
        j = rng.randrange(len(other))
        if rng.random() < 0.5:
            lines[rng.randrange(len(lines))] = other[j]
        else:
            lines.insert(rng.randint(0, len(lines)), other[j])
    return "\n".join(lines)


def lines_shuffle(rng, text, seeds):
    lines = text.split("\n")
    if len(lines) < 2:
        return text
    if rng.random() < 0.5:
        a, b = rng.sample(range(len(lines)), 2)
        lines[a], lines[b] = lines[b], lines[a]
    else:
        i = rng.randrange(len(lines))
        del lines[i:i + rng.randint(1, 8)]
    return "\n".join(lines)


def block_duplicate(rng, text, seeds):
    at = _chars(rng, text, "{")
    if not at:
        return text
    s = rng.choice(at)
    depth, e = 0, s
    while e < len(text):
        depth += {"{": 1, "}": -1}.get(text[e], 0)
        e += 1
        if depth == 0:
            break
    ls = text.rfind("\n", 0, s) + 1
    if rng.random() < 0.5:
        return text[:e] + "\n" + text[ls:e] + text[e:]  # the block twice
    return text[:ls] + text[e:]  # the block cut out


MUTATORS: dict[str, list[tuple[str, Mutator]]] = {
    "byte": [("flip", byte_flip), ("insert", byte_insert), ("delete", byte_delete), ("replace", byte_replace),
             ("truncate", truncate)],
    "token": [("delete", token_delete), ("duplicate", token_duplicate), ("swap", token_swap),
              ("foreign", token_foreign)],
    "structure": [("brace-drop", brace_drop), ("brace-dup", brace_duplicate), ("deep", deep_nesting),
                  ("huge-number", huge_number), ("huge-arith", huge_arithmetic), ("scale", scale_numbers),
                  ("long-name", long_name), ("long-line", long_line),
                  ("lines-foreign", lines_foreign), ("lines-shuffle", lines_shuffle),
                  ("block", block_duplicate)],
}


def mutant(rng: random.Random, seeds: list[str]) -> tuple[bytes, str]:
    """One mutant (bytes) and what was done to it, e.g. `token:swap+byte:flip`."""
    text = rng.choice(seeds)
    done = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        family = rng.choice(list(MUTATORS))
        name, fn = rng.choice(MUTATORS[family])
        text = fn(rng, text, seeds)
        done.append(f"{family}:{name}")
    return _enc(text), "+".join(done)


# ---------------------------------------------------------------- running one mutant

KINDS = ("clean", "located", "file", "unlocated", "exception")


@dataclass
class Outcome:
    kind: str
    detail: str = ""
    codes: list[str] = field(default_factory=list)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _bad_location(d: Diagnostic, sources: dict[str, str], split: dict[str, list[str]]) -> str | None:
    """Why a diagnostic's span does not point into its text, or None when it does."""
    s = d.span
    if s is None:
        return "no span"
    if s.file not in sources:
        return f"span in `{s.file}`, whose text is not kept"
    if s.file not in split:
        split[s.file] = sources[s.file].split("\n")
    lines = split[s.file]
    if not (1 <= s.line <= len(lines)) or s.col < 1 or s.col > len(lines[s.line - 1]) + 2:
        return f"span {s.line}:{s.col} is outside the text"
    key = f"{s.file}\0{s.line}"  # each line expanded once, however many diagnostics it has
    if key not in split:
        split[key] = [lines[s.line - 1].removesuffix("\r").expandtabs(1)]
    line = split[key][0]
    shown = render(d, sources, False, split).split("\n")
    row = next((r for r in shown if r.startswith(f"{s.line} | ")), None)
    if row is None:
        return "rendered without its source line"
    row = row[len(f"{s.line} | "):]
    if len(line) > LONG_LINE:  # a window of the line, `...` where it is cut
        row = row.removeprefix("...").removesuffix("...")
        if line.find(row, max(0, s.col - 1 - 200), s.col - 1 + 200 + len(row)) < 0:
            return f"rendered with a window that is not of line {s.line}"
    elif row != line:
        return f"rendered with another source line than line {s.line}"
    return None


def check_mutant(data: bytes, folder: str, timeout: float = 20.0) -> Outcome:
    """Run `data` through the front end as `vlm check` and `vlm fmt` do and classify what came out."""
    path = os.path.join(folder, "mutant.vlm")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        try:
            text: str | None = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None:  # only a file can hold bytes that are not UTF-8: read it the way the CLI does
            with open(path, "wb") as f:
                f.write(data)
            result = check_file(path)
        else:
            result = check_file(path, text=text)
        shown = render_all(result.diagnostics, result.sources)
        if text is not None:
            with contextlib.suppress(VlmSpecError):
                format_text(text, path)
    except VlmSpecError as e:  # raised rather than collected: still typed, `vlm` renders it
        result = None
        diags, sources = e.diagnostics, e.sources
        shown = render_all(diags, sources)
    except _Timeout:
        return Outcome("exception", f"took longer than {timeout:g} s")
    except BaseException as e:  # noqa: BLE001 - every other exception is what the run looks for
        if isinstance(e, KeyboardInterrupt):
            raise
        return Outcome("exception", f"{type(e).__name__}: {str(e)[:200]}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    if result is not None:
        diags, sources = result.diagnostics, result.sources
    codes = [d.code for d in diags]
    if "internal error" in shown:
        return Outcome("exception", "rendered text says `internal error`", codes)
    errors = [d for d in diags if d.severity == "error"]
    if not errors:
        return Outcome("clean", codes=codes)
    bad, split = [], {}
    for d in errors:
        why = _bad_location(d, sources, split)
        if why is not None:
            bad.append((d, why))
    if not bad:
        return Outcome("located", codes=codes)
    if all(d.code == "E0004" and d.span is None and not sources.get(path) for d, _ in bad):
        return Outcome("file", f"{bad[0][0].code}: {bad[0][0].message[:120]}", codes)
    d, why = bad[0]
    return Outcome("unlocated", f"{d.code} ({why}): {d.message[:160]}", codes)


# ---------------------------------------------------------------- the run


@dataclass
class Report:
    n: int = 0
    counts: collections.Counter = field(default_factory=collections.Counter)
    codes: collections.Counter = field(default_factory=collections.Counter)
    ops: collections.Counter = field(default_factory=collections.Counter)
    failures: list[tuple[int, str, Outcome, bytes]] = field(default_factory=list)
    seconds: float = 0.0
    slowest: float = 0.0

    @property
    def failed(self) -> int:
        return self.counts["unlocated"] + self.counts["exception"]

    def summary(self) -> str:
        parts = ", ".join(f"{k} {self.counts[k]}" for k in KINDS)
        return f"{self.n} mutants: {parts}; {self.seconds:.0f} s (slowest mutant {self.slowest:.1f} s)"


def run(n: int, seed: int = 0, seeds: list[str] | None = None, timeout: float = 20.0,
        progress: bool = False) -> Report:
    seeds = seeds if seeds is not None else load_seeds()
    report = Report()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlm-fuzz-") as folder:
        for i in range(n):
            rng = random.Random(f"{seed}:{i}")  # mutant i is the same whatever -n is
            data, ops = mutant(rng, seeds)
            t = time.perf_counter()
            out = check_mutant(data, folder, timeout)
            report.slowest = max(report.slowest, time.perf_counter() - t)
            report.n += 1
            report.counts[out.kind] += 1
            report.codes.update(set(out.codes))
            report.ops.update(ops.split("+"))
            if out.kind in ("unlocated", "exception"):
                report.failures.append((i, ops, out, data))
            if progress and (i + 1) % 1000 == 0:
                print(f"  {i + 1}/{n}  {time.perf_counter() - t0:.0f} s  failures {report.failed}",
                      file=sys.stderr, flush=True)
    report.seconds = time.perf_counter() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="how many mutants (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds one mutant may take")
    ap.add_argument("--show", type=int, default=10, help="failing mutants to describe")
    ap.add_argument("--save", help="write failing mutants to this folder")
    ap.add_argument("--lock", help="hold this flock file for the whole run (a shared CPU)")
    ap.add_argument("--append", help="append a row to this results table (bench/RESULTS.md)")
    args = ap.parse_args(argv)

    with locked(args.lock):
        report = run(args.n, args.seed, timeout=args.timeout, progress=True)
    print(report.summary())
    print("mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(report.ops.items())))
    print("codes: " + ", ".join(f"{k} {v}" for k, v in sorted(report.codes.items())))
    by_detail = collections.Counter(f"{o.kind}: {o.detail}" for _, _, o, _ in report.failures)
    for detail, count in by_detail.most_common(args.show):
        first = next(i for i, _, o, _ in report.failures if f"{o.kind}: {o.detail}" == detail)
        print(f"  {count}x {detail}  (first: mutant {first})")
    if args.save and report.failures:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        for i, _ops, _, data in report.failures:
            Path(args.save, f"{i:05d}.vlm").write_bytes(data)
    if args.append:
        cmd = f"python scripts/fuzz.py -n {args.n} --seed {args.seed}" + (f" --lock {args.lock}" if args.lock else "")
        c = report.counts
        figures = (f"{report.n} mutants of the {len(load_seeds())} specs/*.vlm (byte, token, structure): "
                   f"clean {c['clean']}, located diagnostic {c['located']}, file-level without text "
                   f"{c['file']}, unlocated {c['unlocated']}, exceptions/internal errors {c['exception']}; "
                   f"{report.seconds:.0f} s, slowest mutant {report.slowest:.1f} s")
        ratio = f"{report.failed} failures" if report.failed else "0 tracebacks, 0 unlocated"
        row = f"| {datetime.date.today()} | `{cmd}` | {figures} | {ratio} |\n"
        with open(args.append, "a") as f:
            f.write(row)
        print(f"appended to {args.append}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
