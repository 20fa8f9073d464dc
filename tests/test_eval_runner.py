"""Evaluation data formats (bad records with file and line), the runner end to end on a stand-in model
with the real processor and tokenizer, results files, and the OpenAI-compatible server client."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vlmspec.compiler.compile import load_analysis
from vlmspec.diagnostics import UserInputError
from vlmspec.evaluation import read_eval_data, run_eval, run_eval_server, write_results
from vlmspec.runtime.inputs.processor import Processor
from vlmspec.runtime.inputs.synth import COLORS, corpus, synthesize
from vlmspec.runtime.inputs.tokenizer import train_tokenizer
from vlmspec.runtime.session import Session

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "eval"
TINY = f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny"


def code_of(e: pytest.ExceptionInfo[UserInputError]) -> str:
    return e.value.diagnostics[0].code


def line_of(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def fixture_dir(tmp_path: Path, *names: str) -> Path:
    """Fixture files copied beside small images named as they reference them."""
    for name in names:
        shutil.copy(FIXTURES / name, tmp_path / name)
    for name, color in (("a.png", "red"), ("b.png", "blue"), ("COCO_val2014_000000000042.jpg", "red"),
                        ("COCO_val2014_000000000073.jpg", "blue")):
        Image.new("RGB", (16, 16), COLORS[color]).save(tmp_path / name)
    return tmp_path


# ---------------------------------------------------------------- formats
def test_vqa_jsonl_bad_records_have_lines(tmp_path: Path) -> None:
    d = fixture_dir(tmp_path, "vqa.jsonl")
    es = read_eval_data(d / "vqa.jsonl", "vqa")
    assert [s.id for s in es.samples] == [1, "q-b", 3]
    assert es.samples[1].answers == ["circle"] and es.samples[1].answer_type == "other"
    assert es.samples[2].answers == ["yes"]
    where = {b.where: b.reason for b in es.bad}
    assert list(where) == [f"{d / 'vqa.jsonl'}:{n}" for n in (4, 6, 7, 8, 9)]
    assert "invalid JSON" in where[f"{d / 'vqa.jsonl'}:4"]
    assert "image not found" in where[f"{d / 'vqa.jsonl'}:6"]
    assert "question" in where[f"{d / 'vqa.jsonl'}:7"] and where[f"{d / 'vqa.jsonl'}:8"] == "no answers"
    es.check(5)
    with pytest.raises(UserInputError) as e:
        es.check(4)
    assert code_of(e) == "E0550"
    msg = e.value.diagnostics[0].message
    assert "5 bad records" in msg and "--max-bad 4" in msg and "vqa.jsonl:4: invalid JSON" in msg


def test_caption_jsonl(tmp_path: Path) -> None:
    d = fixture_dir(tmp_path, "captions.jsonl")
    es = read_eval_data(d / "captions.jsonl", "caption")
    assert [s.references for s in es.samples] == [["A red circle.", "A round red shape on gray."], ["A blue square."]]
    assert [b.where.rsplit(":", 1)[1] for b in es.bad] == ["3", "4", "5"]
    assert read_eval_data(d / "captions.jsonl", "retrieval").task == "retrieval"


def test_vqav2_pair_found_from_either_file(tmp_path: Path) -> None:
    q, a = "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"
    d = fixture_dir(tmp_path, q, a)
    for given in (q, a):
        es = read_eval_data(d / given, "vqa")
        assert [s.id for s in es.samples] == [420, 421, 730]
        assert es.samples[0].image == d / "COCO_val2014_000000000042.jpg"
        assert es.samples[2].answer_type == "number" and len(es.samples[2].answers) == 10
        assert es.path == str(d / q)
        reasons = {b.where: b.reason for b in es.bad}
        assert list(reasons) == [f"{d / q}:{line_of(d / q, str(n))} (questions[{i}])"
                                 for n, i in ((990, 3), (731, 4), (732, 5))]
        assert "image not found" in reasons[f"{d / q}:{line_of(d / q, '990')} (questions[3])"]
        assert "no annotation" in reasons[f"{d / q}:{line_of(d / q, '732')} (questions[5])"]
    # An explicit pattern replaces COCO's naming.
    (d / "img-42.png").write_bytes((d / "a.png").read_bytes())
    es = read_eval_data(d / q, "vqa", image_pattern="img-{image_id}.png")
    assert [s.id for s in es.samples] == [420, 421]


def test_vqav2_without_partner_is_an_error(tmp_path: Path) -> None:
    d = fixture_dir(tmp_path, "v2_OpenEnded_mscoco_val2014_questions.json")
    with pytest.raises(UserInputError) as e:
        read_eval_data(d / "v2_OpenEnded_mscoco_val2014_questions.json", "vqa")
    assert code_of(e) == "E0551" and "no annotations" in e.value.diagnostics[0].message


def test_coco_captions(tmp_path: Path) -> None:
    d = fixture_dir(tmp_path, "coco_captions.json")
    p = d / "coco_captions.json"
    es = read_eval_data(p, "caption")
    assert [(s.id, s.references) for s in es.samples] == [
        (42, ["A red circle on a gray background.", "A round red shape."]), (73, ["Two blue squares."])]
    reasons = {b.where: b.reason for b in es.bad}
    assert f"{p}:{line_of(p, chr(34) + 'id' + chr(34) + ': 4}')} (annotations[3])" in reasons
    assert "image not found" in reasons[f"{p}:{line_of(p, 'missing.jpg')} (images[2])"]
    assert "no caption" in reasons[f"{p}:{line_of(p, chr(34) + 'id' + chr(34) + ': 100')} (images[3])"]
    assert f"{p}:{line_of(p, 'no-id.jpg')} (images[4])" in reasons


def test_whole_file_errors(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"images": [1, 2,, 3]}')
    with pytest.raises(UserInputError) as e:
        read_eval_data(tmp_path / "x.json", "caption")
    assert code_of(e) == "E0551" and "x.json:1:" in e.value.diagnostics[0].message
    (tmp_path / "y.json").write_text('{"questions": []}')
    with pytest.raises(UserInputError) as e:
        read_eval_data(tmp_path / "y.json", "caption")
    assert code_of(e) == "E0551" and "y.json is not COCO caption JSON" in e.value.diagnostics[0].message
    with pytest.raises(UserInputError) as e:
        read_eval_data(tmp_path / "nope.jsonl", "vqa")
    assert code_of(e) == "E0551" and "no such data file" in e.value.diagnostics[0].message
    with pytest.raises(UserInputError) as e:
        read_eval_data(tmp_path / "x.json", "ocr")
    assert code_of(e) == "E0551" and "unknown task `ocr`" in e.value.diagnostics[0].message


# ---------------------------------------------------------------- a stand-in model
def as_session(model: Any) -> Session:
    """What `vlmspec.load` returns, around a stand-in (or real) model that carries its processor."""
    return Session(model.analysis, model, model.processor.tokenizer)


class FakeVLM:
    """The attributes and methods `run_eval` uses, with a real processor: it "sees" the colour of the
    largest coloured area, answers colour questions right and shape questions with "circle"."""

    def __init__(self, processor: Processor):
        self.processor = processor
        self.analysis = processor.analysis
        self.prompts: list[str] = []
        t = processor.transform
        self._mean, self._std = t.mean, t.std

    def _colors(self, pixel_values: torch.Tensor) -> list[str]:
        rgb = ((pixel_values * self._std + self._mean) * 255).permute(0, 2, 3, 1)   # [b h w 3]
        names = list(COLORS)
        ref = torch.tensor([COLORS[n] for n in names], dtype=torch.float32)
        dist = (rgb[:, :, :, None, :] - ref).abs().sum(-1)                           # [b h w colours]
        counts = (dist < 60).flatten(1, 2).sum(1)                                     # [b colours]
        return [names[int(i)] for i in counts.argmax(1)]

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                 max_new_tokens: int, **_: Any) -> torch.Tensor:
        tok = self.processor.tokenizer
        rows = []
        for ids, color in zip(input_ids.tolist(), self._colors(pixel_values), strict=True):
            prompt = tok.decode(ids, skip_special_tokens=True)
            self.prompts.append(prompt)
            text = "circle" if "shape is this" in prompt else (color if "color" in prompt else f"a {color} shape")
            rows.append([*tok(text, add_special_tokens=False)["input_ids"][:max_new_tokens], self.processor.eos_id])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.processor.eos_id] * (width - len(r)) for r in rows])

    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        onehot = torch.eye(len(COLORS))[[list(COLORS).index(c) for c in self._colors(pixel_values)]]
        return onehot[:, None, :].repeat(1, 4, 1)                                     # [b tokens width]

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tok = self.processor.tokenizer
        out = torch.full((input_ids.shape[0], len(COLORS)), 0.01)
        for i, ids in enumerate(input_ids.tolist()):
            words = tok.decode(ids, skip_special_tokens=True).split()
            for j, c in enumerate(COLORS):
                out[i, j] += float(c in words)
        return out


@pytest.fixture(scope="module")
def processor() -> Processor:
    analysis, _ = load_analysis(TINY)
    return Processor(analysis, train_tokenizer([*corpus(), "USER: ASSISTANT: </s>"], 400))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synth")
    synthesize(d, n_train=2, n_test=8, size=32, seed=1)
    return d


def test_vqa_end_to_end(processor: Processor, synth: Path, tmp_path: Path) -> None:
    model = FakeVLM(processor)
    res = run_eval(as_session(model), "vqa", str(synth / "test_vqa.jsonl"), batch_size=3, max_new_tokens=4, progress=False)
    records = [json.loads(line) for line in (synth / "test_vqa.jsonl").read_text().splitlines()]
    right = [r["answers"][0] in {"circle", *COLORS} and (r["question"].startswith("What color")
                                                         or r["answers"][0] == "circle") for r in records]
    assert res["metrics"]["vqa_accuracy"] == pytest.approx(100 * sum(right) / len(records))
    assert res["metrics"]["questions"] == len(records) == len(res["samples"])
    first = res["samples"][0]
    assert set(first) == {"id", "image", "question", "prediction", "answers", "accuracy"}
    assert first["question"] == records[0]["question"] and first["answers"] == records[0]["answers"]
    assert res["task"] == "vqa" and res["model"] == "llava_1_5_7b_tiny" and res["skipped"] == []
    assert res["spec_hash"] == hashlib.sha256(processor.analysis.ir.model_dump_json().encode()).hexdigest()[:16]
    assert res["generation"] == {"max_new_tokens": 4, "temperature": 0.0, "decoding": "greedy", "batch_size": 3,
                                 "prompt_template": "USER: {image}\n{q} ASSISTANT:"}
    # The spec's prompt template wrapped the question as it is.
    assert model.prompts[0].startswith("USER:") and records[0]["question"] in model.prompts[0]
    out = write_results(res, tmp_path / "out" / "results.json")
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]          # no temporary left behind


def test_caption_end_to_end(processor: Processor, synth: Path) -> None:
    pytest.importorskip("pycocoevalcap")
    model = FakeVLM(processor)
    res = run_eval(as_session(model), "caption", str(synth / "test_captions.jsonl"), batch_size=4, progress=False)
    assert all("Describe the image." in p for p in model.prompts)
    assert res["generation"]["prompt"] == "Describe the image."
    m = res["metrics"]
    assert set(m) >= {"bleu4", "cider"} and 0 < m["bleu4"] < 1 and m["cider"] > 0 and m["images"] == 8
    row = res["samples"][0]
    assert set(row) == {"id", "image", "prediction", "references", "bleu4", "cider"}
    assert row["prediction"].startswith("a ") and len(row["references"]) == 2
    res2 = run_eval(as_session(FakeVLM(processor)), "caption", str(synth / "test_captions.jsonl"), prompt="Caption:",
                    progress=False, limit=2)
    assert res2["generation"]["prompt"] == "Caption:" and len(res2["samples"]) == 2


def test_retrieval_end_to_end(processor: Processor, synth: Path) -> None:
    res = run_eval(as_session(FakeVLM(processor)), "retrieval", str(synth / "test_captions.jsonl"), batch_size=3, progress=False)
    m = res["metrics"]
    assert m["images"] == 8 and m["captions"] == 16
    for d in ("i2t", "t2i"):
        assert 0 < m[f"{d}_r1"] <= m[f"{d}_r5"] <= m[f"{d}_r10"] <= 100
    for row in res["samples"]:
        color = next(c for c in COLORS if c in row["references"][0].split())
        assert color in row["prediction"].split() and row["rank"] >= 1   # the top caption has its colour


def test_retrieval_needs_features(processor: Processor, synth: Path) -> None:
    bare = types.SimpleNamespace(processor=processor, analysis=processor.analysis)   # no extract_features
    with pytest.raises(UserInputError) as e:
        run_eval(as_session(bare), "retrieval", str(synth / "test_captions.jsonl"), progress=False)
    assert code_of(e) == "E0554"


def test_unreadable_images_count_as_bad(processor: Processor, synth: Path, tmp_path: Path) -> None:
    lines = (synth / "test_vqa.jsonl").read_text().splitlines()[:4]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines.insert(1, json.dumps({"image": str(tmp_path / "broken.png"), "question": "What color is the shape?",
                                "answers": ["red"] * 10}))
    data = tmp_path / "vqa.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserInputError) as e:
        run_eval(as_session(FakeVLM(processor)), "vqa", str(data), images=str(synth), progress=False)
    assert code_of(e) == "E0550" and f"{data}:2" in e.value.diagnostics[0].message
    res = run_eval(as_session(FakeVLM(processor)), "vqa", str(data), images=str(synth), max_bad=1, progress=False)
    assert len(res["samples"]) == 4 and res["skipped"][0]["where"] == f"{data}:2"
    assert "not a valid image" in res["skipped"][0]["reason"]


def test_progress_bar_runs(processor: Processor, synth: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_eval(as_session(FakeVLM(processor)), "vqa", str(synth / "test_vqa.jsonl"), progress=True, limit=2)
    assert "eval vqa" in capsys.readouterr().err


def test_tiny_built_model(processor: Processor, synth: Path) -> None:
    """The real model, when `vlmspec/runtime/model.py` exists: evaluation runs end to end on it."""
    model_mod = pytest.importorskip("vlmspec.runtime.model")
    model = model_mod.build_model(processor.analysis, image_token_id=processor.image_token_id)
    model.eval()
    model.processor, model.analysis = processor, processor.analysis
    res = run_eval(as_session(model), "vqa", str(synth / "test_vqa.jsonl"), max_new_tokens=2, progress=False, limit=3)
    assert len(res["samples"]) == 3 and 0 <= res["metrics"]["vqa_accuracy"] <= 100
    res = run_eval(as_session(model), "retrieval", str(synth / "test_captions.jsonl"), progress=False, limit=4)
    assert res["metrics"]["images"] == 4 and res["metrics"]["captions"] == 8
    m = res["metrics"]   # 8 captions and 4 images: everything is within the top 10 and the top 5
    assert 0 <= m["i2t_r1"] <= m["i2t_r5"] <= m["i2t_r10"] == 100.0 and m["t2i_r5"] == 100.0


# ---------------------------------------------------------------- an OpenAI-compatible server
class ChatHandler(BaseHTTPRequestHandler):
    fail = False
    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatHandler.seen.append({"path": self.path, "body": body})
        if ChatHandler.fail:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"boom")
            return
        url = body["messages"][0]["content"][1]["image_url"]["url"]
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        r, g, b = img.getpixel((img.width // 2, img.height // 2))
        color = min(COLORS, key=lambda c: sum(abs(x - y) for x, y in zip(COLORS[c], (r, g, b), strict=True)))
        reply = {"model": "fake-server", "choices": [{"message": {"role": "assistant", "content": f" {color}\n"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ChatHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    ChatHandler.fail, ChatHandler.seen = False, []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_server_eval(server: str, tmp_path: Path) -> None:
    d = fixture_dir(tmp_path, "vqa.jsonl")
    res = run_eval_server(server, "vqa", str(d / "vqa.jsonl"), max_bad=5, batch_size=2, max_new_tokens=5,
                          progress=False)
    assert [s["prediction"] for s in res["samples"]] == ["red", "blue", "red"]
    assert res["metrics"]["vqa_accuracy"] == pytest.approx(100 / 3)
    assert res["server"] == server and res["model"] == "fake-server" and res["spec_hash"] is None
    assert len(res["skipped"]) == 5
    assert len(ChatHandler.seen) == 3
    req = next(r for r in ChatHandler.seen if "color" in r["body"]["messages"][0]["content"][0]["text"])
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["temperature"] == 0 and req["body"]["max_tokens"] == 5
    content = req["body"]["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": "What color is the shape?"}
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_server_errors(server: str, tmp_path: Path) -> None:
    d = fixture_dir(tmp_path, "captions.jsonl")
    ChatHandler.fail = True
    with pytest.raises(UserInputError) as e:
        run_eval_server(server, "caption", str(d / "captions.jsonl"), max_bad=3, progress=False)
    assert code_of(e) == "E0553" and "HTTP 500" in e.value.diagnostics[0].message
    with pytest.raises(UserInputError) as e:
        run_eval_server(server, "retrieval", str(d / "captions.jsonl"), progress=False)
    assert code_of(e) == "E0554"
    with pytest.raises(UserInputError) as e:
        run_eval_server("http://127.0.0.1:9", "caption", str(d / "captions.jsonl"), max_bad=3, progress=False)
    assert code_of(e) == "E0553"


def test_server_uses_httpx_when_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []

    class Response:
        status_code = 200
        text = json.dumps({"choices": [{"message": {"content": "red"}}]})

    class Client:
        def __init__(self, timeout: float):
            self.timeout = timeout

        def post(self, url: str, content: bytes, headers: dict[str, str]) -> Response:
            calls.append(url)
            assert json.loads(content)["temperature"] == 0
            return Response()

    monkeypatch.setitem(sys.modules, "httpx", types.SimpleNamespace(Client=Client))
    d = fixture_dir(tmp_path, "vqa.jsonl")
    res = run_eval_server("http://example.invalid/", "vqa", str(d / "vqa.jsonl"), max_bad=5, progress=False)
    assert calls == ["http://example.invalid/v1/chat/completions"] * 3
    assert res["samples"][0]["prediction"] == "red" and res["model"] is None


def test_results_json_is_strict(tmp_path: Path) -> None:
    out = write_results({"metrics": {"cider": float("nan")}, "rows": [np.float64(1.5).item()]}, tmp_path / "r.json")
    assert json.loads(out.read_text()) == {"metrics": {"cider": None}, "rows": [1.5]}
