"""Bad input: each problem gets a message naming the file/tensor/key, and no output
directory (nor a temp one) is left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_longalign.convert.errors import ConversionError, UnsupportedModelError
from megatron_longalign.convert.hf_import import import_hf_checkpoint
from tests.convert.test_hf_config import REPO


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _import_fails(hf_dir: Path, tmp_path: Path, error=ConversionError, **kwargs) -> str:
    out = tmp_path / "out"
    with pytest.raises(error) as err:
        import_hf_checkpoint(hf_dir, out, dtype="fp32", progress=False, **kwargs)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    return str(err.value)


def _edit_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _rewrite_safetensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_unsupported_architecture(tmp_path, hf_dirs):
    hf_dir = _copy(hf_dirs["llama_gqa"], tmp_path / "hf")
    _edit_config(hf_dir, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    message = _import_fails(hf_dir, tmp_path, UnsupportedModelError)
    assert "model_type='gpt2'" in message and "GPT2LMHeadModel" in message
    assert "llama (LlamaForCausalLM)" in message  # says what is supported


def test_unsupported_rope_setting(tmp_path, hf_dirs):
    hf_dir = _copy(hf_dirs["llama_gqa"], tmp_path / "hf")
    _edit_config(hf_dir, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    message = _import_fails(hf_dir, tmp_path, UnsupportedModelError)
    assert "rope_parameters.rope_type='yarn'" in message


def test_missing_shard(tmp_path, hf_dirs):
    hf_dir = _copy(hf_dirs["llama3"], tmp_path / "hf")
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    (hf_dir / shards[1]).unlink()
    message = _import_fails(hf_dir, tmp_path)
    assert f"names shard {shards[1]}, which is missing" in message
    assert "model.safetensors.index.json" in message


def test_missing_tensor(tmp_path, hf_dirs):
    hf_dir = _copy(hf_dirs["llama_gqa"], tmp_path / "hf")
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_safetensors(hf_dir / "model.safetensors", lambda t: t.pop(name))
    message = _import_fails(hf_dir, tmp_path)
    assert f"tensor '{name}' is missing" in message


def test_index_naming_a_tensor_its_shard_lacks(tmp_path, hf_dirs):
    hf_dir = _copy(hf_dirs["llama3"], tmp_path / "hf")
    path = hf_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    name = "model.norm.weight"
    other = next(f for f in index["weight_map"].values() if f != index["weight_map"][name])
    index["weight_map"][name] = other
    path.write_text(json.dumps(index))
    message = _import_fails(hf_dir, tmp_path)
    assert f"'{name}' is missing" in message and other in message


def test_shape_mismatch(tmp_path, hf_dirs):
    hf_dir = _copy(hf_dirs["qwen2_tied"], tmp_path / "hf")
    name = "model.layers.0.self_attn.k_proj.bias"

    def shrink(tensors):
        tensors[name] = tensors[name][:-1].clone()

    _rewrite_safetensors(hf_dir / "model.safetensors", shrink)
    message = _import_fails(hf_dir, tmp_path)
    assert f"tensor '{name}' in model.safetensors has shape [31]" in message
    assert "config.json implies [32]" in message


def test_config_disagreeing_with_weights_is_a_shape_mismatch(tmp_path, hf_dirs):
    hf_dir = _copy(hf_dirs["mistral"], tmp_path / "hf")
    _edit_config(hf_dir, intermediate_size=96)
    message = _import_fails(hf_dir, tmp_path)
    assert (
        "'model.layers.0.mlp.gate_proj.weight' in pytorch_model.bin has shape [128, 64]" in message
    )


def test_unexpected_tensor_is_an_error_unless_ignored(tmp_path, hf_dirs):
    hf_dir = _copy(hf_dirs["llama_gqa"], tmp_path / "hf")
    extra = "model.layers.0.self_attn.q_norm.weight"

    def add(tensors):
        tensors[extra] = torch.ones(16)
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    _rewrite_safetensors(hf_dir / "model.safetensors", add)
    message = _import_fails(hf_dir, tmp_path)
    assert f"unexpected tensor '{extra}' in model.safetensors" in message
    assert "--ignore-extra" in message
    result = import_hf_checkpoint(
        hf_dir, tmp_path / "ok", dtype="fp32", ignore_extra=True, progress=False
    )
    assert sorted(result.ignored) == sorted([extra, "model.layers.0.self_attn.rotary_emb.inv_freq"])


def test_existing_output_is_refused(tmp_path, hf_dirs):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        import_hf_checkpoint(hf_dirs["llama_gqa"], out, progress=False)


def test_failure_while_saving_leaves_nothing(tmp_path, hf_dirs, monkeypatch):
    from megatron_longalign.training import checkpoint

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.CheckpointManager, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        import_hf_checkpoint(hf_dirs["llama_gqa"], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_input_exits_2_with_one_line(tmp_path, hf_dirs):
    hf_dir = _copy(hf_dirs["llama_gqa"], tmp_path / "hf")
    (hf_dir / "model.safetensors").unlink()
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "tools" / "convert_hf.py"), "import"]
    result = subprocess.run(
        [*command, "--hf-dir", str(hf_dir), "--output", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: no weights in {hf_dir}: expected model.safetensors.index.json, "
        "model.safetensors, pytorch_model.bin.index.json or pytorch_model.bin"
    ]
    assert not out.exists()
