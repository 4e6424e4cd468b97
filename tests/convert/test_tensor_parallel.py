"""TP=2 and PP=2 (torchrun, 2 processes): checkpoints imported at TP=1 load at TP=2 with
the same logits; importing directly at TP=2 (every rank reads only its slices) gives
the same logits, and the same checkpoint tensors as a TP=1 import; so does importing at
PP=2 (each stage its layers; the tied output layer on the last stage); exporting a
TP=2-saved checkpoint (resharded to TP=1 on load) reproduces the HF weights bit for
bit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_longalign.convert.hf_export import export_checkpoint
from tests.convert.conftest import (
    CASES,
    TOL,
    batch,
    checkpoint_tensors,
    hf_reference_logits,
)
from tests.helpers.launch import REPO, read_rank_results, run_workers

pytestmark = pytest.mark.slow

DIRECT_TP2_IMPORTS = ("llama3", "qwen2_tied")  # fc1 stride, column slices, bias, tied
WORKER = REPO / "tests" / "convert" / "workers" / "convert_layout.py"


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory, hf_models, hf_dirs, imported):
    root = tmp_path_factory.mktemp("tp2")
    references = {}
    for name in CASES:
        inputs = batch(imported[name].model_config.vocab_size)
        path = root / f"{name}.reference.pt"
        torch.save({"inputs": inputs, **hf_reference_logits(hf_models[name], inputs)}, path)
        references[name] = str(path)
    spec = {
        "load": [
            {
                "name": name,
                "root": str(imported[name].output),
                "model_config": dataclasses.asdict(imported[name].model_config),
                "reference": references[name],
            }
            for name in CASES
        ],
        "import": [
            {
                "name": name,
                "hf_dir": str(hf_dirs[name]),
                "output": str(root / f"{name}_tp2"),
                "reference": references[name],
            }
            for name in DIRECT_TP2_IMPORTS
        ],
    }
    (root / "spec.json").write_text(json.dumps(spec))
    out = root / "results"
    out.mkdir()
    run_workers(WORKER, 2, ["--out", str(out), "--spec", str(root / "spec.json")], timeout=300)
    return root, read_rank_results(out)


@pytest.fixture(scope="module")
def pp2_imports(tmp_path_factory, hf_dirs):
    """DIRECT_TP2_IMPORTS imported at PP=2 (one layer per stage)."""
    root = tmp_path_factory.mktemp("pp2")
    spec = {
        "load": [],
        "import": [
            {"name": n, "hf_dir": str(hf_dirs[n]), "output": str(root / n), "reference": ""}
            for n in DIRECT_TP2_IMPORTS
        ],
    }
    (root / "spec.json").write_text(json.dumps(spec))
    out = root / "results"
    out.mkdir()
    args = ["--out", str(out), "--spec", str(root / "spec.json"), "--tp", "1", "--pp", "2"]
    run_workers(WORKER, 2, args, timeout=300)
    return root


def test_pp2_import_equals_tp1_import(pp2_imports, imported):
    for name in DIRECT_TP2_IMPORTS:
        marker = json.loads((pp2_imports / name / "step_00000000" / "complete.json").read_text())
        assert marker["layout"]["pipeline_model_parallel_size"] == 2
        config = imported[name].model_config
        pp2 = checkpoint_tensors(pp2_imports / name, config)
        tp1 = checkpoint_tensors(imported[name].output, config)
        assert set(tp1) == set(pp2)
        for key in tp1:
            assert torch.equal(tp1[key], pp2[key]), (name, key)


def test_tp1_imports_load_at_tp2_with_equal_logits(tp2_run):
    _, ranks = tp2_run
    assert len(ranks) == 2
    for rank in ranks:
        for name in CASES:
            result = rank[f"load/{name}"]
            assert result["plain"] <= TOL and result["packed"] <= TOL, (name, result)
            assert result["padding_nonzero"] == 0, name


def test_direct_tp2_import_equals_tp1_import(tp2_run, imported):
    root, ranks = tp2_run
    for name in DIRECT_TP2_IMPORTS:
        for rank in ranks:
            result = rank[f"import/{name}"]
            assert result["plain"] <= TOL and result["packed"] <= TOL, (name, result)
            assert result["padding_nonzero"] == 0, name
        marker = json.loads((root / f"{name}_tp2" / "step_00000000" / "complete.json").read_text())
        assert marker["layout"]["tensor_model_parallel_size"] == 2
        config = imported[name].model_config
        tp2 = checkpoint_tensors(root / f"{name}_tp2", config)  # resharded to TP=1 here
        tp1 = checkpoint_tensors(imported[name].output, config)
        assert set(tp1) == set(tp2)
        for key in tp1:
            assert torch.equal(tp1[key], tp2[key]), (name, key)


def test_export_from_tp2_saved_checkpoint(tp2_run, tmp_path, hf_models):
    from safetensors.torch import load_file

    root, _ = tp2_run
    for name in DIRECT_TP2_IMPORTS:
        out = tmp_path / name
        export_checkpoint(
            root / f"{name}_tp2", out, dtype="fp32", max_shard_size="50GB", progress=False
        )
        exported = load_file(str(out / "model.safetensors"))
        reference = hf_models[name].state_dict()
        if CASES[name].config.get("tie_word_embeddings"):
            reference.pop("lm_head.weight")
        assert set(exported) == set(reference)
        for key, value in exported.items():
            assert torch.equal(value, reference[key]), (name, key)
