"""`vlm eval --task grounding` and `vlm generate --boxes` on a stand-in model with the real processor and
tokenizer of the tiny MiniGPT-v2 spec (which declares `boxes = coordinates(..., scale = 100)`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from vlmspec.compiler.compile import load_analysis
from vlmspec.diagnostics import UserInputError
from vlmspec.evaluation import run_eval
from vlmspec.evaluation.grounding import grounding_scores, read_grounding
from vlmspec.runtime.grounding import Box, print_answers
from vlmspec.runtime.inputs.processor import Processor
from vlmspec.runtime.inputs.tokenizer import train_tokenizer
from vlmspec.runtime.session import Session

ROOT = Path(__file__).resolve().parents[2]
MINIGPT = f"{ROOT}/specs/minigpt-v2-7b.vlm:minigpt_v2_7b_tiny"
LLAVA = f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny"
CORPUS = ["[INST] <Img></Img> [refer] where is the red box? [/INST] {<25><25><75><75>}</s> 0123456789 {}<>"] * 4


class BoxFinder:
    """Sees the red area of the (square-resized) input and writes its box as MiniGPT-v2 does."""

    def __init__(self, processor: Processor):
        self.processor, self.analysis = processor, processor.analysis
        t = processor.transform
        self._mean, self._std = t.mean, t.std

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                 max_new_tokens: int, **_: Any) -> torch.Tensor:
        rgb = (pixel_values * self._std + self._mean) * 255                       # [b 3 h w]
        red = (rgb[:, 0] > 160) & (rgb[:, 1] < 90) & (rgb[:, 2] < 90)              # [b h w]
        tok, rows = self.processor.tokenizer, []
        for mask in red:
            ys, xs = torch.nonzero(mask, as_tuple=True)
            h, w = mask.shape
            x1, x2 = xs.min().item() / w, (xs.max().item() + 1) / w
            y1, y2 = ys.min().item() / h, (ys.max().item() + 1) / h
            text = "{" + "".join(f"<{round(100 * v)}>" for v in (x1, y1, x2, y2)) + "}"
            rows.append([*tok(text, add_special_tokens=False)["input_ids"], self.processor.eos_id])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.processor.eos_id] * (width - len(r)) for r in rows])


def session_of(spec: str) -> Session:
    analysis, _ = load_analysis(spec)
    extra = ["<image>", "<ImageHere>", *analysis.ir.settings.task_tokens]
    model = BoxFinder(Processor(analysis, train_tokenizer(CORPUS, 300, extra)))
    return Session(model.analysis, model, model.processor.tokenizer)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Non-square images (80 x 40 and 40 x 120) with a red box; the second record's reference is wrong."""
    d = tmp_path_factory.mktemp("ground")
    recs = []
    for name, size, box, ref in (("a.png", (80, 40), (20, 10, 60, 30), (20, 10, 60, 30)),
                                 ("b.png", (40, 120), (0, 60, 20, 120), (20, 0, 40, 60))):
        img = Image.new("RGB", size, (128, 128, 128))
        img.paste((230, 20, 20), box)
        img.save(d / name)
        recs.append({"image": name, "question": "[refer] where is the red box?", "box": list(ref)})
    recs.append({"image": "a.png", "question": "bad", "box": [5, 5, 1, 1]})
    (d / "test_grounding.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return d


def test_eval_grounding_reads_boxes_in_original_pixels(data: Path) -> None:
    res = run_eval(session_of(MINIGPT), "grounding", str(data / "test_grounding.jsonl"), batch_size=2,
                   max_new_tokens=32, max_bad=1, progress=False)
    first, second = res["samples"]
    assert first["prediction"].replace(" ", "") == "{<25><25><75><75>}"
    assert first["box"] == pytest.approx([20, 10, 60, 30], abs=1.0) and first["iou"] > 0.9
    assert second["box"] == pytest.approx([0, 60, 20, 120], abs=1.5) and second["iou"] == 0.0
    assert res["metrics"]["grounding_accuracy"] == 50.0 and res["metrics"]["no_box"] == 0
    assert res["metrics"]["mean_iou"] == pytest.approx(first["iou"] / 2)
    assert len(res["skipped"]) == 1 and "x1 < x2" in res["skipped"][0]["reason"]
    assert res["generation"]["box"] == 'coordinates(format = "{<{x1}><{y1}><{x2}><{y2}>}", scale = 100)'


def test_eval_grounding_needs_a_box_format(data: Path) -> None:
    with pytest.raises(UserInputError) as e:
        run_eval(session_of(LLAVA), "grounding", str(data / "test_grounding.jsonl"), max_bad=1, progress=False)
    assert e.value.diagnostics[0].code == "E0627"


def test_scores_count_a_missing_box_as_a_miss() -> None:
    metrics, ious = grounding_scores([Box(None, 0, 0, 10, 10), None, Box(None, 0, 0, 10, 4)],
                                     [(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 10)])
    assert ious == [1.0, 0.0, pytest.approx(0.4)]
    assert metrics["grounding_accuracy"] == pytest.approx(100 / 3) and metrics["no_box"] == 1


def test_bad_records_are_located(tmp_path: Path) -> None:
    (tmp_path / "g.jsonl").write_text('{"image": "none.png", "question": "q", "box": [0, 0, 1, 1]}\nnot json\n')
    gs = read_grounding(tmp_path / "g.jsonl")
    assert [b.where.rsplit(":", 1)[1] for b in gs.bad] == ["1", "2"] and not gs.samples


def test_generate_boxes_table_and_json(data: Path) -> None:
    session = session_of(MINIGPT)
    console = Console(record=True, width=120)
    print_answers(session, ["{<25><25><75><75>}"], [data / "a.png"], True, False, console)
    shown = console.export_text()
    assert "x1" in shown and "20.0" in shown and "60.0" in shown
    console = Console(record=True, width=120)
    print_answers(session, ["<p>red box</p> {<25><25><75><75>}"], [data / "a.png"], True, True, console)
    got = json.loads(console.export_text())
    assert got["boxes"] == [{"label": "red box", "x1": 20.0, "y1": 10.0, "x2": 60.0, "y2": 30.0}]


def test_generate_boxes_without_a_declaration_is_an_error(data: Path) -> None:
    with pytest.raises(UserInputError) as e:
        print_answers(session_of(LLAVA), ["x"], [data / "a.png"], True, False, Console())
    assert e.value.diagnostics[0].code == "E0627"


def stand_in_server(with_boxes: bool):
    """An OpenAI-compatible server that finds the red area of each sent image and answers with its box, in the
    sent image's pixels, in the message's `boxes` field as `vlm serve` does (or, `with_boxes` off, as a server
    that knows nothing of boxes: text only)."""
    import base64
    import io
    import sys

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    sys.path.insert(0, str(ROOT / "tests" / "serve"))
    from test_server import Server

    async def chat(request):
        body = await request.json()
        parts = body["messages"][-1]["content"]
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        px = torch.from_numpy(np.asarray(img).copy())
        ys, xs = torch.nonzero((px[..., 0] > 160) & (px[..., 1] < 90), as_tuple=True)
        box = {"label": None, "x1": float(xs.min()), "y1": float(ys.min()), "x2": float(xs.max() + 1),
               "y2": float(ys.max() + 1)}
        message = {"role": "assistant", "content": "the box"}
        if with_boxes:
            message["boxes"] = [box]
        return JSONResponse({"model": "stand-in", "choices": [{"index": 0, "message": message}]})

    return Server(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]))


def test_grounding_over_a_server_reads_its_boxes_field(data: Path) -> None:
    """`vlm eval --server URL --task grounding` scores the first box of each message's `boxes` field: the same
    accuracy as the model folder's run above (the second record's reference is wrong), the CLI included."""
    from typer.testing import CliRunner

    from vlmspec.cli import app
    from vlmspec.evaluation import run_eval_server

    with stand_in_server(with_boxes=True) as server:
        res = run_eval_server(server.url, "grounding", str(data / "test_grounding.jsonl"), max_bad=1,
                              progress=False)
        r = CliRunner().invoke(app, ["eval", "--server", server.url, "--task", "grounding", "--data",
                                     str(data / "test_grounding.jsonl"), "--max-bad", "1"])
    first, second = res["samples"]
    assert first["box"] == [20, 10, 60, 30] and first["iou"] == 1.0 and second["iou"] == 0.0
    assert res["metrics"]["grounding_accuracy"] == 50.0 and res["model"] == "stand-in"
    assert r.exit_code == 0 and "grounding_accuracy 50.00%" in r.output, r.output


def test_grounding_over_a_server_without_boxes_is_refused(data: Path) -> None:
    from vlmspec.evaluation import run_eval_server

    with stand_in_server(with_boxes=False) as server, pytest.raises(UserInputError) as e:
        run_eval_server(server.url, "grounding", str(data / "test_grounding.jsonl"), max_bad=1, progress=False)
    assert e.value.diagnostics[0].code == "E0630" and "`boxes` field" in e.value.diagnostics[0].message


def test_generate_boxes_needs_an_image() -> None:
    with pytest.raises(UserInputError) as e:
        print_answers(session_of(MINIGPT), ["{<1><2><3><4>}"], [], True, False, Console())
    assert e.value.diagnostics[0].code == "E0628"
