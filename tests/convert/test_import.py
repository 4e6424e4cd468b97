"""HF -> trainer checkpoint: the imported model's logits equal transformers' (plain and
packed THD input), the vocab padding, the files written beside the checkpoint, and
streaming reads."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_longalign.convert.hf_import import SOURCE_FILE, import_hf_checkpoint
from megatron_longalign.convert.hf_reader import HFCheckpointReader
from tests.convert.conftest import (
    CASES,
    TOL,
    batch,
    hf_reference_logits,
    load_checkpoint,
    megatron_logits,
)


@pytest.mark.parametrize("name", list(CASES))
def test_imported_logits_equal_transformers(name, hf_models, imported):
    result = imported[name]
    config = result.model_config
    model = load_checkpoint(result.output, config)
    inputs = batch(config.vocab_size)
    ours = megatron_logits(model, inputs)
    reference = hf_reference_logits(hf_models[name], inputs)
    vocab = config.vocab_size
    for kind in ("plain", "packed"):
        assert ours[kind].shape[-1] == config.padded_vocab_size(1)
        diff = (ours[kind][:, :vocab] - reference[kind]).abs().max().item()
        assert diff <= TOL, f"{name} {kind}: max |logit diff| {diff}"
        # Zero output rows for the padding: padded logits are exactly 0.
        assert torch.count_nonzero(ours[kind][:, vocab:]) == 0
    # The check is sensitive: the packed documents differ from running them as one
    # plain sequence (positions and the cross-document mask matter).
    assert reference["packed"].abs().max() > 1.0


def test_loss_over_padded_vocab_equals_hf_loss(hf_models, imported):
    """The model's loss masks the padded vocabulary (model/gpt.py), so the imported
    model's per-token loss is HF's cross entropy exactly, although its padded logits
    (zero rows) are 0 and would otherwise add log(1 + P / sum(exp(z)))."""
    result = imported["llama_gqa"]
    config = result.model_config
    model = load_checkpoint(result.output, config)
    inputs = batch(config.vocab_size)
    tokens = inputs["plain"][None]
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(tokens.shape[1])[None]
    with torch.no_grad():
        ours = model(tokens, positions, labels=labels)[0]
        hf_logits = hf_models["llama_gqa"](tokens).logits[0]
    hf_loss = torch.nn.functional.cross_entropy(hf_logits, labels[0], reduction="none")
    padding = config.padded_vocab_size(1) - config.vocab_size
    assert padding > 0
    torch.testing.assert_close(ours, hf_loss, atol=TOL, rtol=0)
    unmasked = hf_loss + torch.log1p(padding / torch.exp(hf_logits).sum(-1))
    assert (unmasked - hf_loss).min() > 10 * TOL  # the padding would have been visible


def test_outputs_beside_the_checkpoint(hf_dirs, imported):
    result = imported["qwen2_tied"]
    root = result.output
    assert (root / "latest").read_text().strip() == result.checkpoint.name
    marker = json.loads((result.checkpoint / "complete.json").read_text())
    recorded = marker["extra"]["hf_import"]
    assert recorded["hf_dir"] == str(hf_dirs["qwen2_tied"].resolve())
    assert recorded["model_type"] == "qwen2"
    assert recorded["tokenizer_files"] == [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ]
    assert json.loads((root / SOURCE_FILE).read_text()) == recorded
    assert marker["layout"]["tensor_model_parallel_size"] == 1
    assert result.yaml_path == root / "conf" / "model" / "qwen2_tied.yaml"


@pytest.mark.parametrize("name", ["llama3", "qwen2_tied"])
def test_model_yaml_composes_with_hydra_searchpath(name, imported):
    """The documented command line: hydra.searchpath=[file://<output>/conf] model=<name>
    train.init_from=<output> composes to exactly the imported ModelConfig."""
    from hydra import compose, initialize_config_dir

    from megatron_longalign.config.training import register_configs, to_config
    from tests.convert.test_hf_config import REPO

    result = imported[name]
    register_configs()
    overrides = [
        f"hydra.searchpath=[file://{result.output}/conf]",
        f"model={result.model_config.name}",
        f"train.init_from={result.output}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        config = to_config(compose(config_name="config", overrides=overrides))
    assert config.model == result.model_config
    assert config.train.init_from == str(result.output)


def test_reads_are_slices_and_bin_files_are_memory_mapped(tmp_path, hf_dirs, monkeypatch):
    """Streaming: no read is larger than the largest HF tensor (never a state dict),
    and .bin shards are opened with torch.load(mmap=True, weights_only=True)."""
    import megatron_longalign.convert.hf_reader as hf_reader

    with HFCheckpointReader(hf_dirs["mistral"]) as reader:
        largest = max(_numel(reader.shape(n)) for n in reader.names())
    read_elements = []
    original_read = HFCheckpointReader.read

    def spy_read(self, name, rows=None, cols=None):
        out = original_read(self, name, rows, cols)
        read_elements.append(out.numel())
        return out

    load_calls = []
    original_load = torch.load

    def spy_load(*args, **kwargs):
        load_calls.append(kwargs)
        return original_load(*args, **kwargs)

    monkeypatch.setattr(HFCheckpointReader, "read", spy_read)
    monkeypatch.setattr(hf_reader.torch, "load", spy_load)
    import_hf_checkpoint(hf_dirs["mistral"], tmp_path / "out", dtype="fp32", progress=False)
    assert load_calls and all(c.get("mmap") and c.get("weights_only") for c in load_calls)
    assert read_elements and max(read_elements) <= largest


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def test_bf16_import_rounds_fp32_weights(tmp_path, hf_dirs, imported):
    """--dtype bf16 stores bf16 parameters equal to the fp32 ones rounded."""
    from tests.convert.conftest import checkpoint_tensors

    result = import_hf_checkpoint(
        hf_dirs["llama_gqa"], tmp_path / "bf16", dtype="bf16", progress=False
    )
    config = result.model_config
    bf16 = checkpoint_tensors(result.output, config, torch.bfloat16)
    fp32 = checkpoint_tensors(imported["llama_gqa"].output, config)
    assert set(bf16) == set(fp32)
    for name in fp32:
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], fp32[name].to(torch.bfloat16)), name
