"""Fixtures for the export tests: one tokenizer per session, and each spec's model exported once
(pt2 + ONNX) and shared by every test that needs it."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on 2 cores, threads fighting make them slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    from export_helpers import image_tokens

    from vlmspec.runtime.inputs import synth
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer

    # every image placeholder the specs declare (`<image>`, `<|image|>`, `<ImageHere>`, ...) is a special token
    return train_tokenizer(synth.corpus(), 400, extra_special=image_tokens())


@pytest.fixture(scope="session")
def exports(tmp_path_factory, tokenizer):
    """spec ref -> `Exported` (model folder, export folder, eager model, inputs), built on first use."""
    from export_helpers import export_case

    cache: dict = {}

    def get(ref: str, formats: tuple[str, ...] = ("pt2", "onnx")):
        key = (ref, formats)
        if key not in cache:
            cache[key] = export_case(ref, tmp_path_factory.mktemp("export"), tokenizer, formats)
        return cache[key]

    return get
