"""The user's path end to end, in one process on CPU: a Hugging Face model on disk ->
`import` -> the Trainer fine-tunes it from `train.init_from` -> `export` -> transformers
loads the result and computes the trained model's logits."""

from __future__ import annotations

import dataclasses
import json

import torch

from megatron_longalign.convert.hf_export import export_checkpoint
from megatron_longalign.convert.hf_import import import_hf_checkpoint
from tests.convert.conftest import (
    TOL,
    Case,
    batch,
    hf_reference_logits,
    make_hf_model,
    megatron_logits,
    save_hf,
    write_tokenizer_files,
)
from tests.helpers.tiny_training import VOCAB, tiny_training_config


def test_import_train_export_roundtrip(sample_prefixes, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_longalign.training.trainer import Trainer

    # A tiny Llama whose vocabulary covers the test tokenizer's 600 pieces.
    case = Case("llama", "safetensors", dict(num_key_value_heads=2, vocab_size=VOCAB))
    hf_dir = save_hf(make_hf_model(case), tmp_path / "hf", case.layout)
    write_tokenizer_files(hf_dir)
    imported = import_hf_checkpoint(hf_dir, tmp_path / "imported", dtype="fp32", progress=False)

    config = tiny_training_config(
        sample_prefixes,
        max_steps=2,
        checkpoint_dir=str(tmp_path / "run"),
        init_from=str(imported.output),
    )
    # Long-context fine-tuning raises the context (packs of 1024 > the base model's 256).
    config.model = dataclasses.replace(
        imported.model_config, attention_backend="sdpa", max_position_embeddings=4096
    )
    trainer = Trainer(config)
    start = {n: p.detach().clone() for n, p in trainer.unwrapped_model[0].named_parameters()}
    history = trainer.train()
    assert len(history) == 2 and not any(r.skipped for r in history)
    model = trainer.unwrapped_model[0].eval()
    trained = dict(model.named_parameters())
    assert any(not torch.equal(start[n], trained[n]) for n in start), "training changed nothing"

    exported = tmp_path / "exported"
    # No --model-config, no --tokenizer: the trainer's checkpoint records what it trained
    # and carries the import's source along.
    export_checkpoint(tmp_path / "run", exported, dtype="fp32", progress=False)
    assert (exported / "tokenizer.json").is_file()
    hf_config = json.loads((exported / "config.json").read_text())
    assert hf_config["max_position_embeddings"] == 4096  # the trained config, not the import's
    hf_trained = AutoModelForCausalLM.from_pretrained(exported, torch_dtype=torch.float32).eval()
    inputs = batch(VOCAB)
    ours = megatron_logits(model, inputs)
    theirs = hf_reference_logits(hf_trained, inputs)
    for kind in ("plain", "packed"):
        torch.testing.assert_close(ours[kind][:, :VOCAB], theirs[kind], atol=TOL, rtol=0)
    # ...and the fine-tuned model is not the original one.
    original = hf_reference_logits(make_hf_model(case), inputs)
    assert (original["plain"] - theirs["plain"]).abs().max() > 10 * TOL


def test_a_checkpoint_trained_from_scratch_exports_its_data_tokenizer_and_template(
    sample_prefixes, tmp_path, caplog
):
    """No import and no flags: the checkpoint records the data's tokenizer (path and
    sha256) and chat template, and export writes both; a tokenizer changed since the data
    was made is not exported (with a warning), as the ids would no longer match."""
    from megatron_longalign.convert import hf_export
    from megatron_longalign.convert.export_template import exported_template
    from megatron_longalign.data.indexed import SFTIndexedDataset
    from megatron_longalign.training.checkpoint import read_marker
    from megatron_longalign.training.trainer import Trainer

    config = tiny_training_config(
        sample_prefixes, max_steps=1, checkpoint_dir=str(tmp_path / "run")
    )
    Trainer(config).train()
    metadata = SFTIndexedDataset(next(iter(sample_prefixes.values()))).metadata
    record = read_marker(tmp_path / "run" / "step_00000001")["extra"]["data"]
    assert record["template"] == metadata["template"]
    assert record["tokenizer"]["sha256"] == metadata["tokenizer"]["sha256"]

    result = export_checkpoint(tmp_path / "run", tmp_path / "hf", dtype="fp32", progress=False)
    assert result.copied == ["tokenizer.model"] and result.template == metadata["template"]["name"]
    assert exported_template(tmp_path / "hf") == metadata["template"]["name"]

    changed = dict(record["tokenizer"], sha256="0" * 64)
    with caplog.at_level("WARNING"):
        assert hf_export._training_tokenizer(changed) is None
    assert "changed since the data was made" in caplog.text
