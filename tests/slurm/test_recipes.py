"""The cluster recipes (conf/experiment/train_64k*.yaml, train_128k.yaml) compose with
Hydra and pass the trainer's start-up validation for the world sizes they target: one
or two nodes of 8 GPUs (slurm/train_64k.sh asks for 2)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from megatron_longalign.config.training import LongAlignConfig, register_configs, to_config
from megatron_longalign.training.schedule import warmup_steps
from megatron_longalign.training.validate import config_problems
from tests.helpers.launch import REPO

RECIPES = ("train_64k", "train_64k_sorted", "train_128k")
WORLD_SIZES = (8, 16)


def compose_config(*overrides: str) -> LongAlignConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))


def problems(config: LongAlignConfig, world_size: int) -> list[str]:
    """Every start-up problem except a missing Transformer Engine (no GPU here)."""
    return [
        p
        for p in config_problems(config, world_size, check_files=False)
        if "needs the package 'transformer_engine'" not in p
    ]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_validates(recipe):
    config = compose_config(f"+experiment={recipe}")
    assert config.name == recipe
    for world_size in WORLD_SIZES:
        assert problems(config, world_size) == [], (recipe, world_size)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_is_longalign(recipe):
    config = compose_config(f"+experiment={recipe}")
    optim, train, data, parallel = config.optim, config.train, config.data, config.parallel
    assert (optim.optimizer, optim.lr, optim.lr_decay_style) == ("adam", 2e-5, "cosine")
    assert (optim.adam_beta1, optim.adam_beta2, optim.weight_decay) == (0.9, 0.95, 0.0)
    assert optim.lr_warmup_fraction == 0.03 and optim.lr_warmup_steps == 0
    assert warmup_steps(optim, 1000) == 30  # 3% of the run
    assert (train.epochs, train.max_steps) == (2, None)
    assert (train.loss_reduction, train.precision) == ("sequence", "bf16")
    assert config.model.attention_backend == "te"
    assert parallel.tensor_model_parallel_size > 1 and parallel.sequence_parallel
    assert {"SIGUSR1", "SIGTERM"} <= set(train.preemption_signals)
    # Long data and short chats, two sources.
    assert [s.prefix.rsplit("/", 1)[-1] for s in data.sources] == ["long", "short_chat"]
    # RoPE and every other model field as the base model's YAML sets them.
    base = compose_config("model=llama3_8b").model
    assert config.model.rope_theta == base.rope_theta == 500000.0
    assert config.model.rope_scaling == base.rope_scaling
    assert config.model.max_position_embeddings == base.max_position_embeddings
    assert config.model.max_position_embeddings >= data.seq_length


def test_recipe_variants():
    packed = compose_config("+experiment=train_64k")
    # A world size it does not fit is refused (the TE filter hides nothing else): 12 GPUs
    # are not a multiple of TP 8; 24 = DP 3, and 8 packs do not split over 3 ranks.
    assert any("world size 12" in p for p in problems(packed, 12))
    assert any("global_batch_size" in p for p in problems(packed, 24))
    assert packed.data.batching == "packed" and packed.data.seq_length == 65536
    # The planner's layout with the chunked loss (docs/PLANNING.md): TP 8 + SP, no
    # recompute; padded to TP x CP = 8.
    parallel = packed.parallel
    assert (
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.context_parallel_size,
    ) == (8, 1, 1)
    assert packed.train.recompute.granularity is None
    assert packed.data.pad_to_multiple_of == 8
    assert packed.model.loss_impl == "chunked"  # what the planner counted
    sorted_ = compose_config("+experiment=train_64k_sorted")
    assert sorted_.data.batching == "sorted"
    assert sorted_.parallel == packed.parallel and sorted_.optim == packed.optim
    assert sorted_.train.recompute == packed.train.recompute
    long = compose_config("+experiment=train_128k")
    assert long.data.seq_length == 131072
    assert (long.parallel.tensor_model_parallel_size, long.parallel.context_parallel_size) == (
        2,
        4,
    )
    recompute = long.train.recompute
    assert (recompute.granularity, recompute.method, recompute.num_layers) == ("full", "uniform", 1)
    assert long.data.pad_to_multiple_of == 8
    assert long.model == packed.model  # RoPE unchanged: Llama-3.1-8B covers 128k
