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
