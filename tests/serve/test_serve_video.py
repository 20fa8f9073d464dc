"""`video_url` parts in `vlm serve`: a data-URL MPEG-4 and a frame folder under --files-root get the answer `vlm
generate --video` gives (greedy), and a truncated video, a video outside the served folder or a video sent to a
model that reads none is a 400 with the reason, with nothing left queued."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from vlmspec.cli import app as cli

ROOT = Path(__file__).resolve().parents[2]
TINY = f"{ROOT}/specs/qwen2-vl-2b.vlm:qwen2_vl_2b_tiny"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Qwen2-VL after one instruct step on synthetic MPEG-4 videos, and the data."""
    pytest.importorskip("av")
    from vlmspec.runtime.session import load_session

    root = tmp_path_factory.mktemp("video")
    for args in (["data", "synth", "--video", "--video-format", "mp4", "-o", str(root / "d"), "--n", "4", "--test",
                  "2"],
                 ["train", TINY, "--data", str(root / "d" / "train_video.json"), "-o", str(root / "run"), "--steps",
                  "1", "--stage", "instruct", "--workers", "0"]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, r.output
    return load_session(root / "run" / "final"), root / "d"


def _chat(session, files_root: Path, parts: list[dict], max_tokens: int = 6) -> httpx.Response:
    from vlmspec.runtime.serve import ServeConfig, create_app

    app = create_app(session, ServeConfig(files_root=str(files_root)))

    async def go() -> tuple[httpx.Response, int]:
        engine = app.state.engine
        await engine.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                r = await client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens, "temperature": 0})
            return r, engine.depth()
        finally:
            await engine.stop()

    r, depth = asyncio.run(go())
    assert depth == 0  # nothing left queued or half-prepared
    return r


def _video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


QUESTION = "Which way does the shape move?"


def test_data_url_and_file_answer_as_generate(trained):
    from vlmspec.runtime.video_features import answer_video

    session, data = trained
    clip = data / "videos" / "000004.mp4"
    want = answer_video(session, QUESTION, str(clip), max_new_tokens=6)
    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    for part in (_video_part(url), _video_part("videos/000004.mp4")):
        r = _chat(session, data, [part, {"type": "text", "text": QUESTION}])
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want


def test_truncated_video_is_a_400(trained):
    session, data = trained
    whole = (data / "videos" / "000004.mp4").read_bytes()
    url = "data:video/mp4;base64," + base64.b64encode(whole[: len(whole) // 2]).decode()
    r = _chat(session, data, [_video_part(url), {"type": "text", "text": QUESTION}])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] in ("E0601", "E0603") and any(
        says in err["message"] for says in ("truncated", "cannot read", "no video stream"))


@pytest.mark.parametrize("url, says", [
    ("../outside.mp4", "outside the served folder"),
    ("videos/missing.mp4", "video not found"),
    ("data:image/png;base64,AAAA", "data:video/"),
    ("https://example.com/a.mp4", "does not fetch remote videos"),
])
def test_bad_video_urls_are_400s(trained, url, says):
    session, data = trained
    r = _chat(session, data, [_video_part(url), {"type": "text", "text": QUESTION}])
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_video_to_a_model_without_video_is_a_400(tmp_path, trained):
    """The tiny LLaVA reads images only: its engine refuses the video before queueing it (E0604)."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.checkpoint import save_model_dir
    from vlmspec.runtime.inputs.synth import corpus
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.session import load_session

    _, data = trained
    analysis, _ = load_analysis(f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny")
    tok = train_tokenizer(corpus(), 400)
    save_model_dir(build_model(analysis, image_token_id=tok.convert_tokens_to_ids("<image>")), analysis,
                   tmp_path / "llava", tokenizer=tok)
    r = _chat(load_session(tmp_path / "llava"), data, [_video_part("videos/000004.mp4"),
                                                       {"type": "text", "text": QUESTION}])
    assert r.status_code == 400 and r.json()["error"]["code"] == "E0604", r.text
    assert json.loads(r.text)["error"]["message"].startswith("this model does not read videos")


def test_video_qa_over_a_server_scores_as_the_folder(trained, tmp_path):
    """`vlm eval --server URL --task video_qa` against `vlm serve` on 127.0.0.1: MPEG-4 files go inline as data URLs,
    frame folders as file:// URLs under --files-root; the answers and accuracy equal `vlm eval MODEL`'s, and a
    truncated video the server refuses (400) is a skipped record under --max-bad, not a crash."""
    import socket
    import threading
    import time

    import uvicorn

    from vlmspec.evaluation import run_eval, run_eval_server
    from vlmspec.runtime.serve import ServeConfig, create_app

    session, data = trained
    qa = tmp_path / "qa.jsonl"
    whole = (data / "videos" / "000004.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    frames = tmp_path / "frames"
    frames.mkdir()
    import av

    with av.open(str(data / "videos" / "000005.mp4")) as box:
        for k, frame in enumerate(box.decode(video=0)):
            frame.to_image().save(frames / f"{k:03d}.png")
    rows = [json.loads(x) for x in (data / "test_video_qa.jsonl").read_text().splitlines()]
    rows = [{**r, "video": str(data / r["video"])} for r in rows]
    rows.append({**rows[0], "video": str(frames)})
    qa.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with_bad = tmp_path / "bad.jsonl"
    with_bad.write_text(qa.read_text() + json.dumps({**rows[0], "video": str(tmp_path / "cut.mp4")}) + "\n")

    app = create_app(session, ServeConfig(files_root=str(tmp_path.parent)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        url = f"http://127.0.0.1:{port}"
        remote = run_eval_server(url, "video_qa", str(qa), max_new_tokens=6, progress=False, batch_size=2)
        local = run_eval(session, "video_qa", str(qa), max_new_tokens=6, progress=False)
        assert [r["prediction"] for r in remote["samples"]] == [r["prediction"] for r in local["samples"]]
        assert remote["metrics"] == local["metrics"] and remote["metrics"]["questions"] == len(rows)
        skipped = run_eval_server(url, "video_qa", str(with_bad), max_new_tokens=6, progress=False, max_bad=1)
        assert skipped["metrics"]["questions"] == len(rows) and len(skipped["skipped"]) == 1
        assert "HTTP 400" in skipped["skipped"][0]["reason"]
    finally:
        server.should_exit = True
        thread.join(10)
