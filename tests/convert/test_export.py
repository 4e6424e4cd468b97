"""Trainer checkpoint -> HF directory: transformers loads it and computes the same
logits, export then re-import is bit-identical, shards and index, tokenizer files."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from megatron_longalign.convert.errors import ConversionError
from megatron_longalign.convert.hf_export import (
    export_checkpoint,
    parse_size,
    shard_file_names,
    shard_plan,
)
from megatron_longalign.convert.hf_import import import_hf_checkpoint
from tests.convert.conftest import CASES, TOL, batch, checkpoint_tensors, hf_reference_logits
from tests.convert.test_hf_config import REPO


def _load_hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_transformers_and_reimports_bit_identically(
    name, tmp_path, hf_models, imported
):
    original = imported[name]
    config = original.model_config
    out = tmp_path / "hf"
    result = export_checkpoint(original.output, out, dtype="fp32", progress=False)
    assert result.output == out and result.dtype == torch.float32

    exported = _load_hf(out)
    assert type(exported).__name__ == type(hf_models[name]).__name__
    reference_state = hf_models[name].state_dict()
    for key, value in exported.state_dict().items():
        assert torch.equal(value, reference_state[key]), key
    inputs = batch(config.vocab_size)
    ours, reference = (
        hf_reference_logits(exported, inputs),
        hf_reference_logits(hf_models[name], inputs),
    )
    for kind in ours:
        assert (ours[kind] - reference[kind]).abs().max().item() <= TOL

    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["vocab_size"] == config.vocab_size  # unpadded
    assert hf_config["torch_dtype"] == "float32"
    assert hf_config["tie_word_embeddings"] == config.tie_word_embeddings
    # Tokenizer files come from the recorded import source.
    assert (out / "tokenizer.json").read_text() == '{"fake": true}\n'
    assert "generation_config.json" in result.copied

    again = import_hf_checkpoint(out, tmp_path / "again", dtype="fp32", progress=False)
    assert dataclasses.replace(again.model_config, name=config.name) == config
    first = checkpoint_tensors(original.output, config)
    second = checkpoint_tensors(again.output, config)
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_sharded_export_writes_an_index(tmp_path, imported):
    from safetensors import safe_open

    out = tmp_path / "hf"
    result = export_checkpoint(
        imported["llama3"].output, out, dtype="fp32", max_shard_size="100KB", progress=False
    )
    assert len(result.files) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == result.files
    total = 0
    for file in result.files:
        with safe_open(str(out / file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                assert index["weight_map"][key] == file
                total += f.get_tensor(key).numel() * 4
        size = (out / file).stat().st_size
        assert size <= 100_000 + 4096 or len(index_members(index, file)) == 1
    assert index["metadata"]["total_size"] == total
    assert not (out / "model.safetensors").exists()


def index_members(index: dict, file: str) -> list[str]:
    return [k for k, v in index["weight_map"].items() if v == file]


def test_bf16_export_of_fp32_checkpoint_rounds(tmp_path, hf_models, imported):
    out = tmp_path / "hf"
    export_checkpoint(imported["qwen2_tied"].output, out, dtype="bf16", progress=False)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    reference = hf_models["qwen2_tied"].state_dict()
    assert "lm_head.weight" not in tensors  # tied: HF ties it on load
    for key, value in tensors.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, reference[key].to(torch.bfloat16)), key


def test_checkpoint_without_import_record_needs_a_model_config(tmp_path, imported):
    import shutil

    source = imported["llama_gqa"]
    root = tmp_path / "trained"
    shutil.copytree(source.output, root)
    marker_path = root / source.checkpoint.name / "complete.json"
    marker = json.loads(marker_path.read_text())
    marker["extra"] = {"name": "run"}  # as the trainer's own checkpoints have it
    marker_path.write_text(json.dumps(marker))
    with pytest.raises(ConversionError, match="--model-config"):
        export_checkpoint(root, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.model").write_bytes(b"sp")
    result = export_checkpoint(
        root,
        tmp_path / "hf",
        model_config=source.model_config,
        tokenizer_dir=tokenizer,
        progress=False,
    )
    assert result.model_type == "llama" and result.copied == ["tokenizer.model"]
    assert _load_hf(tmp_path / "hf").config.vocab_size == 300


def test_wrong_model_config_is_refused(tmp_path, imported):
    import dataclasses

    config = imported["llama_gqa"].model_config
    with pytest.raises(ConversionError, match="vocab_size 1000"):
        export_checkpoint(
            imported["llama_gqa"].output,
            tmp_path / "hf",
            model_config=dataclasses.replace(config, vocab_size=1000),
            progress=False,
        )
    with pytest.raises(ConversionError, match="cannot load"):
        export_checkpoint(
            imported["llama_gqa"].output,
            tmp_path / "hf",
            model_config=dataclasses.replace(config, ffn_hidden_size=256),
            progress=False,
        )
    assert list(tmp_path.iterdir()) == []


def test_shard_planning_and_sizes():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("100KB") == 100_000
    assert parse_size(123) == 123
    with pytest.raises(ConversionError, match="max shard size"):
        parse_size("lots")
    shapes = {"a": (10,), "b": (10,), "c": (30,), "d": (1,)}
    assert shard_plan(shapes, torch.float32, 80) == [["a", "b"], ["c"], ["d"]]
    assert shard_plan(shapes, torch.float32, 10**9) == [["a", "b", "c", "d"]]
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(2) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_cli_export(tmp_path, imported):
    out = tmp_path / "hf"
    command = [sys.executable, str(REPO / "tools" / "convert_hf.py"), "export"]
    args = ["--checkpoint", str(imported["mistral"].output), "--output", str(out)]
    result = subprocess.run(
        [*command, *args, "--max-shard-size", "50KB", "--dtype", "fp32", "--no-progress"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"-> {out} (mistral)" in result.stdout
    assert (out / "model.safetensors.index.json").is_file()
    assert _load_hf(out).config.model_type == "mistral"
