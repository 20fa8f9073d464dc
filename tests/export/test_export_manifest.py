"""The export folder is self-contained and its manifest declares the interface: files, names, shapes
with named symbolic dims, dtypes, spec hash, versions, image token id."""

from __future__ import annotations

import hashlib
import json
import shutil

import onnx
import pytest
import torch

from vlmspec.diagnostics import UserInputError
from vlmspec.runtime.export import ExportedModel


def llava_ref() -> str:
    from export_helpers import SPECS

    return f"{SPECS / 'llava-1.5-7b.vlm'}:llava_1_5_7b_tiny"


@pytest.fixture(scope="module")
def case(exports):
    return exports(llava_ref())


def test_manifest_declares_every_artefact(case):
    m = case.manifest
    assert json.loads((case.out / "manifest.json").read_text()) == m
    assert m["model"] == "llava_1_5_7b_tiny"
    assert m["spec_hash"] == hashlib.sha256(case.analysis.ir.model_dump_json().encode()).hexdigest()[:16]
    assert m["image_token_id"] == case.model.image_token_id and m["ban_image_token"] is True
    assert m["max_len"] == 128 and m["dtype"] == "float32"
    assert m["dims"]["batch"]["min"] == 1 and m["dims"]["seq"] == {"min": 1, "max": 128}
    assert set(m["versions"]) >= {"torch", "onnx", "onnxruntime", "vlmspec"}
    assert m["versions"]["torch"] == torch.__version__
    files = {fmt: {p: a["file"] for p, a in progs.items()} for fmt, progs in m["artefacts"].items()}
    assert files == {
        "pt2": {"encoder": "encoder.pt2", "prefill": "decoder_prefill.pt2", "decode": "decoder_step.pt2"},
        "onnx": {"encoder": "encoder.onnx", "prefill": "decoder_prefill.onnx", "decode": "decoder_step.onnx"},
    }
    for progs in m["artefacts"].values():
        for a in progs.values():
            assert (case.out / a["file"]).stat().st_size == a["bytes"]
    assert m["artefacts"]["pt2"]["encoder"]["half"] == "encoder"
    assert m["artefacts"]["onnx"]["decode"]["half"] == "decoder"


def test_manifest_shapes_name_the_symbolic_dims(case):
    progs = case.manifest["artefacts"]["pt2"]
    io = {p: {t["name"]: (t["shape"], t["dtype"]) for t in (*a["inputs"], *a["outputs"])} for p, a in progs.items()}
    assert io["encoder"]["pixel_values"] == (["batch", 3, 64, 64], "float32")
    assert io["encoder"]["visual_prefix"] == (["batch", 64, 48], "float32")
    assert io["prefill"]["input_ids"] == (["batch", "seq"], "int64")
    assert io["prefill"]["attention_mask"] == (["batch", "seq"], "int64")
    assert io["prefill"]["logits"] == (["batch", 512], "float32")
    cache = ([2, "batch", 4, 128, 12], "float32")  # layers x batch x kv_heads x max_len x head_dim
    assert io["prefill"]["present_keys"] == cache and io["prefill"]["present_values"] == cache
    assert io["decode"]["past_keys"] == cache and io["decode"]["present_values"] == cache
    assert io["decode"]["input_ids"] == (["batch", 1], "int64")
    assert io["decode"]["position_ids"] == (["batch", 1], "int64")
    assert io["decode"]["attention_mask"] == (["batch", 128], "int64")
    assert io["decode"]["write_index"] == ([1], "int64")


def test_onnx_graphs_carry_the_declared_names(case):
    for prog, a in case.manifest["artefacts"]["onnx"].items():
        graph = onnx.load(str(case.out / a["file"])).graph
        assert [i.name for i in graph.input] == [t["name"] for t in a["inputs"]], prog
        assert [o.name for o in graph.output] == [t["name"] for t in a["outputs"]], prog
        for value, declared in zip(graph.input, a["inputs"], strict=True):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == declared["shape"], (prog, value.name, dims)


def test_folder_is_self_contained(case):
    assert (case.out / "spec.vlm").read_text() == (case.model_dir / "spec.vlm").read_text()
    assert (case.out / "tokenizer.json").is_file()
    runner = case.runner("pt2")
    p = runner.processor
    assert p.image_token_id == case.model.image_token_id
    assert p.tokens_per_image == 64


def test_edited_spec_is_refused(case, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(case.out, copy)
    spec = copy / "spec.vlm"
    spec.write_text(spec.read_text().replace("ffn = 96", "ffn = 100"))
    with pytest.raises(UserInputError) as e:
        ExportedModel(copy, "onnx").processor  # noqa: B018
    assert e.value.diagnostics[0].code == "E0574" and "no longer matches" in str(e.value)


def test_decode_graph_writes_the_cache_without_index_copy(case):
    """TensorRT cannot convert `index_copy_` (HF StaticCache); the step must write by mask / slice."""
    ep = torch.export.load(str(case.out / "decoder_step.pt2"))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "index_copy" in t or "index_put" in t or "scatter" in t], targets
    assert any("where" in t for t in targets)
    ops = {n.op_type for n in onnx.load(str(case.out / "decoder_step.onnx")).graph.node}
    assert not ops & {"ScatterND", "ScatterElements", "Scatter"}, ops
