"""training/builders.py without a Trainer: the forward-only model of a checkpoint
(`build_inference_model`) has the trained weights and computes what the trained model
computes (world size 1, CPU, gloo)."""

from __future__ import annotations

import pytest
import torch

from megatron_longalign.data.planner import PlanPosition
from megatron_longalign.model import model_inputs
from megatron_longalign.training.builders import build_inference_model
from megatron_longalign.training.checkpoint import CheckpointError
from megatron_longalign.training.trainer import Trainer
from tests.helpers.tiny_training import tiny_training_config

pytestmark = pytest.mark.usefixtures("distributed_teardown")


def test_inference_model_from_a_trainer_checkpoint(sample_prefixes, tmp_path):
    root = tmp_path / "ckpt"
    config = tiny_training_config(sample_prefixes, max_steps=2, checkpoint_dir=str(root))
    trainer = Trainer(config)
    trainer.train()
    trained = trainer.unwrapped_model[0].eval()

    # The root (the checkpoint `latest` names) or the step directory itself.
    for source in (root, root / "step_00000002"):
        (model,) = build_inference_model(config, source)
        assert type(model) is type(trained), "no DDP (and no Float16Module in fp32)"
        assert not model.training
        ours, theirs = dict(model.named_parameters()), dict(trained.named_parameters())
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[name], theirs[name]) for name in ours)

    batch = next(trainer.data.planner.iterate(start=PlanPosition()))
    with torch.no_grad():
        for micro_batch in trainer.data.micro_batches(batch):
            inputs = model_inputs(micro_batch)
            expected = trained(**inputs)
            assert torch.equal(model(**inputs), expected)
            assert torch.isfinite(expected).all()


def test_inference_model_needs_a_checkpoint(sample_prefixes, tmp_path):
    config = tiny_training_config(sample_prefixes, max_steps=1)
    Trainer(config)  # joins the single-process job
    with pytest.raises(CheckpointError, match="neither a complete checkpoint"):
        build_inference_model(config, tmp_path)
