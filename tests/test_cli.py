"""The front-end commands, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from vlmspec.cli import app
from vlmspec.compiler.compile import check_file

ROOT = Path(__file__).resolve().parent.parent
LLAVA = str(ROOT / "specs" / "llava-1.5-7b.vlm")
runner = CliRunner()


def vlm(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_check_ok_and_json() -> None:
    r = vlm("check", LLAVA)
    assert r.exit_code == 0, r.output
    assert "llava_1_5_7b  7.06B params, 576 visual tokens" in r.output
    r = vlm("check", LLAVA, "--json")
    data = json.loads(r.stdout)
    assert data["ok"] and {m["model"] for m in data["models"]} == {"llava_1_5_7b", "llava_1_5_7b_tiny"}


def test_check_errors_exit_1_with_location(write_spec) -> None:
    path = write_spec("model m {\n  vision clip = vit { widht = 3 }\n}\n")
    r = vlm("check", path)
    assert r.exit_code == 1
    assert f"{path}:2:23: error[E0104]: unknown attribute `widht`" in r.output
    assert "did you mean `width`?" in r.output
    r = vlm("check", path, "--json")
    diags = json.loads(r.stdout)["diagnostics"]
    assert r.exit_code == 1 and diags[0]["code"] == "E0104" and diags[0]["line"] == 2


def test_unreadable_file_and_unknown_model(tmp_path) -> None:
    r = vlm("check", str(tmp_path / "nope.vlm"))
    assert r.exit_code == 1 and "E0004" in r.output and "no such file" in r.output
    r = vlm("summary", f"{LLAVA}:llava_tiyn")
    assert r.exit_code == 1 and "E0110" in r.output and "did you mean `llava_1_5_7b_tiny`?" in r.output
    bad = tmp_path / "bin.vlm"
    bad.write_bytes(b"\xff\xfe\x00")
    r = vlm("fmt", str(bad))
    assert r.exit_code == 1 and "E0004" in r.output
    spec = tmp_path / "broken.vlm"
    spec.write_bytes(Path(LLAVA).read_bytes()[:200] + b"\xff" + Path(LLAVA).read_bytes()[200:])
    r = vlm("check", str(spec))
    line = Path(LLAVA).read_bytes()[:200].count(b"\n") + 1
    assert r.exit_code == 1 and f"broken.vlm:{line}:" in r.output and "error[E0004]" in r.output and "^" in r.output
    r = vlm("graph", LLAVA, "--format", "png")
    assert r.exit_code == 1 and "E0005" in r.output


def test_serve_on_a_busy_port_is_a_diagnostic(tmp_path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = vlm("serve", str(tmp_path / "no-model"), "--port", str(port))
    assert r.exit_code == 1 and "E0007" in r.output and f"127.0.0.1:{port}" in r.output


def test_fmt_check_and_write(write_spec) -> None:
    path = write_spec("model m {  vision clip = vit { width = 32 depth = 2 } }\n")
    r = vlm("fmt", "--check", path)
    assert r.exit_code == 1 and "would reformat" in r.output
    r = vlm("fmt", path)
    assert r.exit_code == 0
    assert Path(path).read_text() == "model m {\n  vision clip = vit {\n    width = 32\n    depth = 2\n  }\n}\n"
    assert vlm("fmt", "--check", path).exit_code == 0


def test_show_resolved_is_a_valid_equivalent_spec(tmp_path) -> None:
    r = vlm("show", "--resolved", f"{LLAVA}:llava_1_5_7b_tiny")
    assert r.exit_code == 0
    assert "kv_heads = 4" in r.stdout and "act = quick_gelu" in r.stdout  # derived and inherited defaults
    flat = tmp_path / "flat.vlm"
    flat.write_text(r.stdout)
    again = check_file(str(flat))
    orig = check_file(LLAVA, "llava_1_5_7b_tiny")
    assert again.ok, again.diagnostics
    a, b = again.analyses[0].ir, orig.analyses[0].ir

    def meaning(ir):
        return {n: (c.role, c.kind, c.sources, c.target, c.field_values(resolved=True)) for n, c in ir.components.items()}

    assert meaning(a) == meaning(b) and a.settings == b.settings
    assert [s.model_dump(exclude={"extends"}) for s in a.stages] == [s.model_dump(exclude={"extends"}) for s in b.stages]
    assert again.analyses[0].total_params == orig.analyses[0].total_params
    r = vlm("show", f"{LLAVA}:llava_1_5_7b_tiny")
    assert r.stdout.startswith("model llava_1_5_7b_tiny extends llava_1_5_7b {")


def test_summary_json() -> None:
    r = vlm("summary", f"{LLAVA}:llava_1_5_7b", "--json")
    s = json.loads(r.stdout)
    assert s["params"]["total"] == 7_062_902_784
    stages = {st["name"]: st for st in s["stages"]}
    assert stages["align"]["params"]["trainable"] == s["params"]["by_component"]["proj"]
    assert stages["instruct"]["params"]["trainable"] == s["params"]["by_component"]["proj"] + s["params"]["by_component"]["llm"]
    mem = stages["align"]["memory"]
    assert mem["total"] == mem["weights"] + mem["grads"] + mem["optimizer"] + mem["activations"] > 0
    assert mem["optimizer"] == 8 * stages["align"]["params"]["trainable"]
    r = vlm("summary", f"{LLAVA}:llava_1_5_7b")
    assert "7.06B parameters" in r.stdout and "stages" in r.stdout


def test_graph_formats() -> None:
    r = vlm("graph", LLAVA)
    assert r.stdout.startswith("flowchart LR") and 'clip -->|"576 x 1024"| proj' in r.stdout
    r = vlm("graph", LLAVA, "-f", "dot")
    assert r.stdout.startswith('digraph "llava_1_5_7b"') and '"proj" -> "prefix" [label="576 x 4096"];' in r.stdout


def test_diff_two_models_json() -> None:
    r = vlm("diff", f"{LLAVA}:llava_1_5_7b", f"{LLAVA}:llava_1_5_7b_tiny", "--json")
    d = json.loads(r.stdout)
    clip = next(c for c in d["components"] if c["name"] == "clip")
    assert clip["fields"]["width"] == {"old": "1024", "new": "32"}
    llm = next(c for c in d["components"] if c["name"] == "llm")
    assert llm["fields"]["kv_heads"] == {"old": "32", "new": "4"}  # a derived default, never written
    assert d["params"]["old"] == 7_062_902_784


def test_diff_git_revision(tmp_path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    spec = repo / "m.vlm"
    text = Path(LLAVA).read_text()
    spec.write_text(text)

    def git(*a: str) -> None:
        subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "x", "--allow-empty")
    git("add", "m.vlm")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "spec")
    spec.write_text(text.replace("layers = 2\n    act = gelu", "layers = 3\n    act = gelu"))
    import os

    cwd = os.getcwd()
    os.chdir(repo)
    try:
        r = vlm("diff", "HEAD:m.vlm", "m.vlm")
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    assert "~ connector proj (mlp) changed" in r.stdout and "layers: 2 -> 3" in r.stdout
    assert "~ stage align changed" in r.stdout


def test_schema() -> None:
    r = vlm("schema", "mlp")
    s = json.loads(r.stdout)
    assert s["roles"]["connector"]["mlp"]["properties"]["layers"]["description"] == "number of linear layers"
    r = vlm("schema")
    assert set(json.loads(r.stdout)["roles"]) == {"vision", "audio", "text", "connector", "language", "fusion"}
    r = vlm("schema", "mpl")
    assert r.exit_code == 1 and "error[E0105]: unknown kind `mpl`" in r.output and "did you mean `mlp`?" in r.output


def textconv_repo(repo: Path):
    """A fresh git repository at `repo` with `vlm show --textconv` as the .vlm diff driver; returns a
    function that runs git there and returns its output."""

    def git(*a: str) -> str:
        return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=repo, check=True,
                              capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "diff.vlm.textconv", f"{sys.executable} -m vlmspec.cli show --textconv")
    return git


def test_front_end_never_imports_torch() -> None:
    code = (f"import sys; from vlmspec.cli import main; sys.argv = ['vlm', 'summary', {LLAVA!r}]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_help_is_friendly() -> None:
    r = vlm("--help")
    assert r.exit_code == 0 and "check" in r.stdout and "diff" in r.stdout


def test_git_textconv_driver(tmp_path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    text = Path(LLAVA).read_text()
    (repo / "m.vlm").write_text(text)
    (repo / ".gitattributes").write_text("*.vlm diff=vlm\n")

    git = textconv_repo(repo)
    git("add", ".")
    git("commit", "-qm", "spec")
    (repo / "m.vlm").write_text(text.replace("heads = 4\n    ffn = 96", "heads = 4\n    kv_heads = 2\n    ffn = 96"))
    diff = git("diff")
    assert "-    kv_heads = 4" in diff and "+    kv_heads = 2" in diff  # the resolved default, not just the new line
    (repo / "m.vlm").write_text("model broken {\n")
    assert "does not check" in git("diff")  # a broken version still diffs


def test_diff_revision_reads_imports_at_that_revision(tmp_path, monkeypatch) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    (repo / "base.vlm").write_text(Path(LLAVA).read_text())
    (repo / "child.vlm").write_text('import "base.vlm"\nmodel child extends llava_1_5_7b_tiny {\n}\n')

    def git(*a: str) -> None:
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=repo, check=True,
                       capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    (repo / "base.vlm").write_text(Path(LLAVA).read_text().replace("depth = 2\n    heads = 2", "depth = 3\n    heads = 2"))
    monkeypatch.chdir(repo)
    r = vlm("diff", "HEAD:child.vlm", "child.vlm")
    assert r.exit_code == 0, r.output
    assert "depth: 2 -> 3" in r.stdout


def test_diff_says_what_a_new_stage_does_and_names_each_side(tmp_path, monkeypatch) -> None:
    base = ("model m {\n  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2 }\n"
            "  connector proj = mlp(clip -> llm)\n  language llm = llama { width = 48  depth = 2  heads = 4  "
            "ffn = 96  vocab = 512 }\n  fusion prefix(proj -> llm)\n"
            "  stage align { train proj  freeze clip, llm }\n}\n")
    old = tmp_path / "old.vlm"
    new = tmp_path / "new.vlm"
    old.write_text(base + base.replace("model m", "model n"))
    new.write_text(base.replace("  stage align", "  stage tune { train proj  lora llm(rank = 8, targets = [attn.q], "
                                "lr = 1e-4)  freeze clip  optim adamw(lr = 2e-5) }\n  stage align")
                   + base.replace("model m", "model n").replace("connector proj = mlp(clip -> llm)",
                                                              "connector proj = linear(clip -> llm)"))
    r = vlm("diff", str(old), str(new))
    assert r.exit_code == 0, r.output
    # both files' models are compared, each under its own label
    assert f"--- {old}:m" in r.stdout and f"+++ {new}:m" in r.stdout and f"--- {old}:n" in r.stdout
    assert "+ stage tune added" in r.stdout
    assert "    train = [proj]" in r.stdout and "    freeze = [clip]" in r.stdout
    assert "    lora = [llm(rank = 8, alpha = 16.0, targets = [attn.q], lr = 0.0001)]" in r.stdout
    assert "    optim = adamw(lr = 2e-05" in r.stdout and "    batch = " not in r.stdout  # defaults left out
    # a kind change: fields only one kind has are `(absent)`, not Python's None
    assert "None" not in r.stdout and "(absent)" in r.stdout


def test_textconv_shows_a_spec_with_imports_the_same_way_on_both_sides(tmp_path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "base.vlm").write_text(Path(LLAVA).read_text())
    (repo / "child.vlm").write_text('import "base.vlm"\nmodel child extends llava_1_5_7b_tiny {\n  llm { depth = 2 }\n}\n')
    (repo / ".gitattributes").write_text("*.vlm diff=vlm\n")

    git = textconv_repo(repo)
    git("add", ".")
    git("commit", "-qm", "one")
    (repo / "child.vlm").write_text('import "base.vlm"\nmodel child extends llava_1_5_7b_tiny {\n  llm { depth = 3 }\n}\n')
    diff = git("diff", "child.vlm")
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == ["-    depth = 2", "+    depth = 3"], diff
    assert "/tmp" not in diff
