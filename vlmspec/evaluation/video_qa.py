"""`vlm eval --task video_qa`: multiple-choice accuracy on videos, scored as lmms-eval scores MVBench-style sets.

Each record is one video, a question and its options (JSONL):

    {"video": "videos/000001.mp4", "question": "Which way does the shape move?",
     "options": ["left", "right", "up", "down"], "answer": "left"}

`answer` is the right option's text or its letter (`"A"`). The model is asked the question with the options
lettered beneath it (`mc_prompt`, MVBench's layout: `(A) left` ... and "Only give the best option."), and
its free-text answer is matched back to one option (`match_option`): a leading letter (`A`, `(A)`, `A.`,
`A) left`), else the one option whose text it is or names. An answer that names none or several options
is wrong, never guessed. Accuracy is the share of questions whose matched option is the right one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmspec.diagnostics import VlmSpecError, user_error
from vlmspec.evaluation.formats import RecordSet, jsonl_records
from vlmspec.runtime.inputs.data import BadRecord

if TYPE_CHECKING:
    from vlmspec.runtime.session import Session

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
INSTRUCTION = "Only give the best option."


@dataclass(slots=True)
class VideoQuestion:
    id: int | str
    video: Path
    question: str
    options: list[str]
    answer: int  # index of the right option
    where: str


VideoQASet = RecordSet[VideoQuestion]


def mc_prompt(question: str, options: list[str]) -> str:
    """The question with its options lettered beneath it, as MVBench's lmms-eval task asks it."""
    lines = [question, "Options:", *(f"({LETTERS[i]}) {o}" for i, o in enumerate(options)), INSTRUCTION]
    return "\n".join(lines)


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def match_option(prediction: str, options: list[str]) -> int | None:
    """The option a free-text answer picks (see the module docstring), or None."""
    text = prediction.strip()
    m = re.match(r"^\(?([A-Z])(?:[).:\s]|$)", text)
    if m and LETTERS.index(m.group(1)) < len(options):
        return LETTERS.index(m.group(1))
    said = _words(text)
    exact = [i for i, o in enumerate(options) if _words(o) == said]
    if len(exact) == 1:
        return exact[0]
    named = [i for i, o in enumerate(options) if _contains(said, _words(o))]
    return named[0] if len(named) == 1 else None


def _contains(words: list[str], part: list[str]) -> bool:
    n = len(part)
    return n > 0 and any(words[i:i + n] == part for i in range(len(words) - n + 1))


def read_video_qa(data: str | Path, videos: str | Path | None = None) -> VideoQASet:
    """The records of a video-QA JSONL file; unusable ones (no video, fewer than two options, an answer
    that is not an option) become bad records with their line."""
    path = Path(data)
    base = Path(videos) if videos else path.parent
    es = VideoQASet(str(path))
    for where, n, rec in jsonl_records(path, es.bad):
        reason = _record_problem(rec)
        if reason is not None:
            es.bad.append(BadRecord(where, reason))
            continue
        options = [str(o) for o in rec["options"]]
        answer = str(rec["answer"])
        index = options.index(answer) if answer in options else LETTERS.index(answer.strip("()"))
        video = base / str(rec["video"])
        if not video.exists():
            es.bad.append(BadRecord(where, f"video not found: {video}"))
            continue
        es.samples.append(VideoQuestion(rec.get("id", n), video, str(rec["question"]), options, index, where))
    return es


def _record_problem(rec: Any) -> str | None:
    if not isinstance(rec, dict) or not isinstance(rec.get("video"), str) or not isinstance(rec.get("question"), str):
        return "a record needs `video` and `question` strings"
    options = rec.get("options")
    if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
        return f"a record needs 2 to {len(LETTERS)} `options`"
    answer = rec.get("answer")
    if not isinstance(answer, str):
        return "a record needs an `answer` (an option's text or letter)"
    letter = answer.strip("()")
    if answer not in [str(o) for o in options] and not (len(letter) == 1 and letter in LETTERS[:len(options)]):
        return f"the answer {answer!r} is not one of the options or their letters"
    return None


def video_qa_scores(predictions: list[str], samples: list[VideoQuestion]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, per-sample rows): accuracy in percent, and how many answers matched no single option."""
    rows, right, unmatched = [], 0, 0
    for s, p in zip(samples, predictions, strict=True):
        picked = match_option(p, s.options)
        unmatched += picked is None
        right += picked == s.answer
        rows.append({"id": s.id, "video": str(s.video), "question": s.question, "options": s.options,
                     "answer": s.options[s.answer], "prediction": p,
                     "picked": s.options[picked] if picked is not None else None, "correct": picked == s.answer})
    n = len(samples)
    return {"video_qa_accuracy": 100.0 * right / n if n else 0.0, "questions": n, "unmatched": unmatched}, rows


def run_video_qa(session: Session, data: str, videos: str | None = None, max_new_tokens: int = 16,
                 max_bad: int = 0, progress: bool = True, limit: int | None = None) -> tuple[
                     VideoQASet, dict[str, Any], list[dict[str, Any]]]:
    """Answer every question greedily (`vlm generate --video`'s path, one video at a time) and score it. An
    unreadable video counts as a bad record, under the same `max_bad` limit."""
    from vlmspec.evaluation.batching import progress_bar
    from vlmspec.runtime.video_features import answer_video

    es = read_video_qa(data, videos)
    es.ready("video_qa", limit, max_bad)
    done: list[VideoQuestion] = []
    predictions: list[str] = []
    with progress_bar(progress, len(es.samples), "eval video_qa") as advance:
        for s in es.samples:
            try:
                predictions.append(answer_video(session, mc_prompt(s.question, s.options), str(s.video),
                                                max_new_tokens=max_new_tokens))
                done.append(s)
            except VlmSpecError as e:
                if not e.diagnostics or e.diagnostics[0].code not in ("E0601", "E0602", "E0603"):
                    raise
                es.bad.append(BadRecord(s.where, e.diagnostics[0].message))
                es.check(max_bad)
            advance(1)
    if not done:
        raise user_error("E0551", f"no sample of {data} could be evaluated ({len(es.bad)} skipped)")
    metrics, rows = video_qa_scores(predictions, done)
    return es, metrics, rows


def run_video_qa_server(client: Any, data: str, videos: str | None = None, max_new_tokens: int = 16,
                        max_bad: int = 0, progress: bool = True, limit: int | None = None,
                        concurrency: int = 4) -> tuple[VideoQASet, dict[str, Any], list[dict[str, Any]]]:
    """The same questions and scoring as `run_video_qa`, asked of an OpenAI-compatible server: each video as a
    `video_url` part (`ChatClient.complete_video`), greedy, `concurrency` requests in flight. A video the server
    refuses (HTTP 400: unreadable, truncated, over its token budget) is a bad record under `max_bad`, as an
    unreadable video is on a model folder; any other server failure stops the run."""
    from concurrent.futures import ThreadPoolExecutor

    from vlmspec.evaluation.batching import batches, progress_bar

    es = read_video_qa(data, videos)
    es.ready("video_qa", limit, max_bad)

    def ask(s: VideoQuestion) -> str | VlmSpecError:
        try:
            return client.complete_video(mc_prompt(s.question, s.options), s.video, max_new_tokens)
        except VlmSpecError as e:
            if e.diagnostics and e.diagnostics[0].code == "E0544":
                return e
            raise

    done: list[VideoQuestion] = []
    predictions: list[str] = []
    with progress_bar(progress, len(es.samples), "eval video_qa (server)") as advance, \
            ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for chunk in batches(es.samples, max(1, concurrency)):
            for s, answer in zip(chunk, pool.map(ask, chunk), strict=True):
                if isinstance(answer, VlmSpecError):
                    es.bad.append(BadRecord(s.where, answer.diagnostics[0].message))
                else:
                    predictions.append(answer)
                    done.append(s)
            es.check(max_bad)
            advance(len(chunk))
    if not done:
        raise user_error("E0551", f"no sample of {data} could be evaluated ({len(es.bad)} skipped)")
    metrics, rows = video_qa_scores(predictions, done)
    return es, metrics, rows
