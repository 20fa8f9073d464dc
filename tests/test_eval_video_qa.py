"""`vlm eval --task video_qa`: answers matched to options as lmms-eval matches MVBench answers, and the runner
scoring a known set, with a stand-in model that really looks at each video (the moving shape's centroid) and
answers in different styles: every answer right is 100%, a model that always says `up` is 25%."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from vlmspec.evaluation.video_qa import match_option, mc_prompt, read_video_qa, video_qa_scores

OPTIONS = ["left", "right", "up", "down"]


@pytest.mark.parametrize("prediction, picked", [
    ("(B) right", 1), ("B", 1), ("b", None), ("C.", 2), ("D) down", 3), ("left", 0), ("Left.", 0),
    ("It moves up.", 2), ("down<|im_end|>", 3), ("left or right", None), ("", None), ("sideways", None),
    ("E", None),  # a letter past the options
])
def test_match_option(prediction, picked):
    assert match_option(prediction, OPTIONS) == picked


def test_prompt_letters_the_options():
    assert mc_prompt("Which way?", ["left", "right"]) == "Which way?\nOptions:\n(A) left\n(B) right\n" \
        "Only give the best option."


def test_scores_count_unmatched_as_wrong(tmp_path):
    (tmp_path / "v").mkdir()
    lines = [{"video": "v", "question": "q", "options": OPTIONS, "answer": a} for a in ("left", "B", "(C)", "down")]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines)
                                       + '{"video": "v", "question": "q", "options": ["a"], "answer": "a"}\n'
                                       + '{"video": "v", "question": "q", "options": ["a", "b"], "answer": "c"}\n'
                                       + '{"video": "nope", "question": "q", "options": ["a", "b"], "answer": "a"}\n')
    es = read_video_qa(tmp_path / "qa.jsonl")
    assert [s.answer for s in es.samples] == [0, 1, 2, 3]
    assert [b.reason for b in es.bad] == ["a record needs 2 to 26 `options`",
                                          "the answer 'c' is not one of the options or their letters",
                                          f"video not found: {tmp_path / 'nope'}"]
    metrics, rows = video_qa_scores(["A", "left", "up", "down and left"], es.samples)
    assert metrics == {"video_qa_accuracy": 50.0, "questions": 4, "unmatched": 1}
    assert [r["correct"] for r in rows] == [True, False, True, False]


def _direction(folder: Path) -> str:
    """What a model that sees would answer: where the shape's centroid went from the first frame to the last."""
    frames = sorted(folder.glob("*.png"))

    def centroid(p: Path) -> np.ndarray:
        a = np.asarray(Image.open(p), dtype=np.float32)
        ys, xs = np.nonzero(np.abs(a - a[0, 0]).sum(-1) > 30)
        return np.array([xs.mean(), ys.mean()])

    dx, dy = centroid(frames[-1]) - centroid(frames[0])
    return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")


def test_runner_scores_a_known_set(tmp_path, monkeypatch):
    from vlmspec.evaluation import describe_metrics, run_eval
    from vlmspec.runtime.inputs.synth import synthesize_video

    synthesize_video(tmp_path, n_train=0, n_test=12)
    data = str(tmp_path / "test_video_qa.jsonl")
    asked: list[str] = []

    def sees(session, prompt, video, **kw):  # answers in three styles: letter, "(X) text", text
        asked.append(prompt)
        d = _direction(Path(video))
        style = len(asked) % 3
        letter = "ABCD"[OPTIONS.index(d)]
        return letter if style == 0 else f"({letter}) {d}" if style == 1 else d

    monkeypatch.setattr("vlmspec.runtime.video_features.answer_video", sees)
    session = SimpleNamespace(name="oracle", analysis=None)
    results = run_eval(session, "video_qa", data, progress=False)
    assert results["metrics"] == {"video_qa_accuracy": 100.0, "questions": 12, "unmatched": 0}
    assert asked[0] == mc_prompt("Which way does the shape move?", OPTIONS)
    assert results["task"] == "video_qa" and len(results["samples"]) == 12
    assert "video_qa_accuracy 100.00%" in describe_metrics(results["metrics"])

    monkeypatch.setattr("vlmspec.runtime.video_features.answer_video", lambda *a, **k: "up")
    assert run_eval(session, "video_qa", data, progress=False)["metrics"]["video_qa_accuracy"] == 25.0
