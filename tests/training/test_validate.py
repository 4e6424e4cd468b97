"""Start-up validation: every problem is reported, each naming the field to change; and
the YAML in conf/ composes into valid typed configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_longalign.config.training import LongAlignConfig, to_config
from megatron_longalign.training.validate import ConfigError, config_problems, validate_config
from tests.helpers import flash_standin
from tests.helpers.tiny_training import tiny_training_config

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture
def config(sample_prefixes) -> LongAlignConfig:
    return tiny_training_config(sample_prefixes, max_steps=10)


def problem_about(config: LongAlignConfig, *fields: str, world_size: int = 1) -> str:
    """The one problem that names all of `fields`."""
    problems = config_problems(config, world_size)
    matching = [p for p in problems if all(f in p for f in fields)]
    assert len(matching) == 1, (fields, problems)
    return matching[0]


def test_the_test_config_is_valid(config):
    validate_config(config, world_size=1)
    validate_config(config, world_size=2)  # DP 2: global batch 2 = 1 x 2


def test_tensor_parallel_must_divide_heads_and_kv_heads(config):
    config.parallel.tensor_model_parallel_size = 4
    config.model.num_query_groups = 2  # 4 query heads, 2 KV heads
    message = problem_about(
        config, "parallel.tensor_model_parallel_size", "model.num_query_groups", world_size=4
    )
    assert "(4) must divide" in message and "(2)" in message
    config.parallel.tensor_model_parallel_size = 3
    problem_about(
        config, "parallel.tensor_model_parallel_size", "model.num_attention_heads", world_size=3
    )


def test_global_batch_divisible_by_micro_batch_times_dp(config):
    config.data.global_batch_size = 6
    config.data.micro_batch_size = 2
    message = problem_about(config, "global_batch_size", "micro_batch_size", world_size=2)
    assert "data.global_batch_size (6)" in message and "data-parallel size (2)" in message


def test_pad_multiple_must_suit_sequence_and_context_parallelism(config):
    config.parallel.tensor_model_parallel_size = 4
    config.parallel.sequence_parallel = True
    config.parallel.context_parallel_size = 2
    config.model.num_attention_heads = config.model.num_query_groups = 4
    config.data.pad_to_multiple_of = 3
    config.data.seq_length = 1026  # keep DataConfig's own seq_length % pad check quiet
    message = problem_about(config, "data.pad_to_multiple_of=3", world_size=8)
    # Each CP rank's 1/2 share is split over TP 4 by sequence parallelism: lcm(TP x CP 8,
    # 2 x CP 4) = 8 (not lcm(TP, 2 x CP) = 4), and lcm(3, 8) = 24 is the suggestion.
    assert "multiple of 8" in message and "set data.pad_to_multiple_of=24" in message
    # The same layout also names what else it needs.
    problem_about(config, "parallel.sequence_parallel", "model.attention_backend", world_size=8)


def test_context_parallelism_is_accepted_with_every_attention_backend(config):
    config.parallel.context_parallel_size = 2
    config.data.pad_to_multiple_of = 4
    assert not [p for p in config_problems(config, 2) if "context" in p]
    config.data.seq_length = 1026  # packs hold documents padded to multiples of 4
    message = problem_about(config, "data.seq_length=1026", world_size=2)
    assert "set data.seq_length=1028" in message
    config.data.seq_length = 1024
    for backend in ("te", "flash", "flex", "auto"):
        config.model.attention_backend = backend
        assert not [p for p in config_problems(config, 2) if "context" in p], backend
    # flash, importable and usable (the CPU stand-in): CP 2 is a valid configuration.
    config.model.attention_backend = "flash"
    with flash_standin.installed():
        assert config_problems(config, 2) == []


def test_missing_data_files_name_the_source(config, tmp_path):
    config.data.sources[1].prefix = str(tmp_path / "nowhere")
    message = problem_about(config, "data.sources[1].prefix")
    assert "nowhere.json not found" in message and "tools/preprocess.py" in message
    # ... and only that source
    assert not [p for p in config_problems(config) if "data.sources[0]" in p]


def copy_set(prefix: str, to: Path) -> str:
    """A copy of the preprocessed set `prefix` (P.json and its files) under `to`, to damage."""
    import json
    import shutil

    meta = json.loads(Path(prefix + ".json").read_text())
    to.mkdir(parents=True, exist_ok=True)
    for name in [Path(prefix).name + ".json", *(r["name"] for r in meta["files"].values())]:
        shutil.copy(Path(prefix).parent / name, to / name)
    return str(to / Path(prefix).name)


def test_damaged_data_files_are_named_before_anything_is_built(config, tmp_path):
    import json

    copy = copy_set(config.data.sources[0].prefix, tmp_path)
    config.data.sources[0].prefix = copy
    meta = json.loads(Path(copy + ".json").read_text())
    data = tmp_path / meta["files"][".bin"]["name"]
    data.write_bytes(data.read_bytes()[:-2])  # a truncated .bin: nothing else notices it
    message = problem_about(config, "data.sources[0].prefix")
    assert str(data) in message and "truncated" in message and "tools/preprocess.py" in message
    meta["format"] = "megatron-longalign/sft-v1"
    Path(copy + ".json").write_text(json.dumps(meta))
    message = problem_about(config, "data.sources[0].prefix")
    assert "old data format" in message and f"--output-prefix {copy}" in message


def test_sources_preprocessed_with_different_tokenizers(config, tmp_path):
    import json

    copy = copy_set(config.data.sources[1].prefix, tmp_path)
    meta = json.loads(Path(copy + ".json").read_text())
    meta["tokenizer"]["sha256"] = "f" * 64
    Path(copy + ".json").write_text(json.dumps(meta))
    config.data.sources[1].prefix = copy
    message = problem_about(config, "different tokenizers")
    assert f"{copy}.json" in message and f"{config.data.sources[0].prefix}.json" in message


def test_samples_longer_than_seq_length(config):
    from megatron_longalign.data.indexed import open_dataset_files
    from megatron_longalign.training.validate import overlength_warnings

    lengths = [open_dataset_files(s.prefix).lengths for s in config.data.sources]
    config.data.seq_length = 16  # shorter than every sample
    message = problem_about(config, "every sample is longer than data.seq_length=16")
    total = sum(x.size for x in lengths)
    assert f"all {total} would be dropped" in message and "--max-length 16" in message
    assert f"data.seq_length >= {min(int(x.min()) for x in lengths)}" in message
    # Some too long: fine with on_overlength=drop (warned at start-up), a problem with error.
    config.data.seq_length = 2048
    too_long = [int((x > 2048).sum()) for x in lengths]
    assert too_long[0] and too_long[0] < lengths[0].size
    assert not [p for p in config_problems(config) if "seq_length=2048" in p]
    warnings = overlength_warnings(config, lengths)
    assert len(warnings) == sum(1 for n in too_long if n)
    assert f"data.sources[0] ({config.data.sources[0].prefix}): {too_long[0]} of " in warnings[0]
    config.data.on_overlength = "error"
    problem_about(config, f"{sum(too_long)} sample(s) are longer than data.seq_length=2048")


def test_tokenizer_vocabulary_must_fit_the_model(config):
    config.model.vocab_size = 512  # the test tokenizer has 600 pieces
    message = problem_about(config, "model.vocab_size (512)")
    assert "(600)" in message


def test_positions_must_fit_max_position_embeddings(config):
    config.model.max_position_embeddings = 512
    problem_about(config, "model.max_position_embeddings (512)", "data.seq_length (1024)")
    config.model.max_position_embeddings = 4096
    config.data.skipalign = type(config.data.skipalign)(enabled=True, target_context_length=8192)
    problem_about(config, "model.max_position_embeddings", "data.skipalign.target_context_length")


def test_run_length_schedule_and_recompute_fields(config):
    config.train.max_steps = None
    problem_about(config, "train.max_steps", "train.epochs")
    config.train.max_steps = 2
    config.optim.lr_warmup_steps = 2
    problem_about(config, "optim.lr_warmup_steps (2)")
    config.optim.lr_warmup_steps = 0
    config.train.recompute.granularity = "full"
    problem_about(config, "train.recompute.method")
    problem_about(config, "train.recompute.num_layers")
    config.train.recompute.granularity = "everything"
    problem_about(config, "train.recompute.granularity='everything'")


def test_choices_name_the_field(config):
    config.train.loss_reduction = "mean"
    config.train.precision = "fp8"
    config.optim.lr_decay_style = "step"
    config.train.max_consecutive_bad_steps = 0
    problem_about(config, "train.loss_reduction='mean'")
    problem_about(config, "train.precision='fp8'")
    problem_about(config, "optim.lr_decay_style='step'")
    problem_about(config, "train.max_consecutive_bad_steps")


def test_all_problems_in_one_error(config):
    config.parallel.pipeline_model_parallel_size = 3  # 2 layers
    config.data.global_batch_size = 3
    config.optim.lr = 0.0
    with pytest.raises(ConfigError) as caught:
        validate_config(config, world_size=3)
    text = str(caught.value)
    assert len(caught.value.problems) >= 3
    for field in ("model.num_layers", "optim.lr must be > 0", "pipeline_model_parallel_size"):
        assert field in text


# ---- conf/*.yaml ---------------------------------------------------------------------------


def compose(*overrides: str) -> LongAlignConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from megatron_longalign.config.training import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_config(hydra_compose(config_name="config", overrides=list(overrides)))


def test_smoke_experiment_composes_to_a_valid_config():
    config = compose("+experiment=smoke")
    assert isinstance(config, LongAlignConfig)
    assert config.model.name == "tiny" and config.data.seq_length == 4096
    assert config.data.on_overlength == "drop" and config.train.max_steps == 40
    assert [s.prefix for s in config.data.sources] == [
        "outputs/demo/long",
        "outputs/demo/short_chat",
    ]
    assert config.train.output_dir == "outputs/smoke"
    assert not config_problems(config, world_size=1, check_files=False)


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel=tp2"],
        ["parallel=pp2"],
        ["data=longalign", "model=llama2_7b", "model.max_position_embeddings=65536"],
        ["data.skipalign.enabled=true", "data.skipalign.target_context_length=8192"],
        ["train.max_steps=null", "train.epochs=2"],
    ],
)
def test_config_groups_compose_and_validate(overrides):
    config = compose(*overrides)
    world_size = 2 if any("parallel=" in o for o in overrides) else 1
    if "data=longalign" in overrides:
        config.data.global_batch_size = 8
    assert not config_problems(config, world_size, check_files=False), overrides


def test_unknown_keys_are_rejected_by_the_schema():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose("train.max_stepz=3")


def test_checkpoint_and_wandb_fields_are_validated(sample_prefixes):
    config = tiny_training_config(sample_prefixes, save_interval=-1, keep_last=0, resume="")
    config.logging.wandb.mode = "sometimes"
    config.logging.wandb.run_id = "bad id"
    problems = "\n".join(config_problems(config, check_files=False))
    assert "train.save_interval must be >= 0" in problems
    assert "train.keep_last must be >= 1" in problems
    assert "train.resume must be" in problems
    assert "logging.wandb.mode='sometimes'" in problems
    assert "logging.wandb.run_id='bad id'" in problems
    config = tiny_training_config(sample_prefixes, save_interval=5)  # no checkpoint_dir
    assert any(
        "needs train.checkpoint_dir" in p for p in config_problems(config, check_files=False)
    )


def test_checkpoint_optimizer_format_is_validated(sample_prefixes):
    config = tiny_training_config(sample_prefixes)
    assert config.train.checkpoint_optimizer_format == "dp_reshardable"
    assert not config_problems(config, check_files=False)
    config.train.checkpoint_optimizer_format = "fully_sharded_model_space"
    message = problem_about(config, "train.checkpoint_optimizer_format")
    assert "fully_reshardable" in message and "flattened_range is not supported" in message
    composed = compose("train.checkpoint_optimizer_format=fully_reshardable")
    assert composed.train.checkpoint_optimizer_format == "fully_reshardable"
    assert not [p for p in config_problems(composed, check_files=False) if "checkpoint" in p]


def test_one_dataset_in_one_line(sample_prefixes):
    """`data=single data.prefix=P` (README): P is the only source, weight 1."""
    prefix = sample_prefixes["long"]
    config = compose("data=single", f"data.prefix={prefix}", "data.on_overlength=drop")
    assert [(s.prefix, s.weight) for s in config.data.sources] == [(prefix, 1.0)]
    assert not [p for p in config_problems(config) if "data" in p]
    # Without the path: one problem that says what to set (and no file error besides).
    missing = compose("data=single")
    assert [(s.prefix, s.weight) for s in missing.data.sources] == [("", 1.0)]
    message = problem_about(missing, "data.sources[0].prefix is empty")
    assert "data=single, data.prefix=P" in message
    # data.prefix is read by data=single only: never ignored silently.
    other = compose(f"data.prefix={prefix}")
    problem_about(other, f"data.prefix='{prefix}' is not one of data.sources")


# ---- validation data and schedule ----------------------------------------------------------


def test_validation_fields_are_validated(config, tmp_path):
    from megatron_longalign.config.data import DatasetSource

    assert config.data.valid_fraction == 0.0 and config.train.eval_interval == 0
    for bad in (1.0, -0.1, 1.5):
        config.data.valid_fraction = bad
        assert "[0, 1)" in problem_about(config, "data.valid_fraction=")
    config.data.valid_fraction = 0.1
    validate_config(config)
    config.data.valid_sources = [DatasetSource(config.data.sources[0].prefix)]
    message = problem_about(config, "data.valid_sources", "data.valid_fraction=0.1")
    assert "both set" in message and "data.valid_fraction=0 or data.valid_sources=[]" in message
    config.data.valid_fraction = 0.0
    validate_config(config)
    config.data.valid_sources = [
        DatasetSource(str(tmp_path / "nowhere")),
        DatasetSource(config.data.sources[0].prefix, weight=2.0),
        DatasetSource(""),
    ]
    assert "nowhere.json not found" in problem_about(config, "data.valid_sources[0].prefix=")
    assert "is not used" in problem_about(config, "data.valid_sources[1]", "weight 2.0")
    assert "is empty" in problem_about(config, "data.valid_sources[2].prefix")
    config.data.valid_sources = []
    config.train.eval_interval, config.train.eval_iters = -1, 0
    assert "0 or null = validate at the end" in problem_about(config, "train.eval_interval")
    assert "null = the whole" in problem_about(config, "train.eval_iters")
    config.train.eval_interval, config.train.eval_iters = None, None
    validate_config(config)


def test_validation_sources_are_checked_like_training_sources(config, tmp_path):
    import json

    from megatron_longalign.config.data import DatasetSource

    copy = copy_set(config.data.sources[1].prefix, tmp_path)
    meta = json.loads(Path(copy + ".json").read_text())
    meta["tokenizer"]["sha256"] = "f" * 64
    Path(copy + ".json").write_text(json.dumps(meta))
    config.data.valid_sources = [DatasetSource(copy)]
    message = problem_about(config, "different tokenizers")
    assert "data.sources and data.valid_sources" in message and f"{copy}.json" in message
    # Samples that do not fit: an error with on_overlength=error, as for training.
    config.data.valid_sources = [DatasetSource(config.data.sources[0].prefix)]
    config.data.sources = config.data.sources[1:]  # short chats: all fit 1024 tokens
    config.data.on_overlength = "error"
    message = problem_about(config, "validation sample(s) of data.valid_sources")
    assert "data.on_overlength=drop" in message
    config.data.seq_length = 256  # with drop: no validation sample fits at all
    config.model.max_position_embeddings = 4096
    config.data.on_overlength = "drop"
    assert "validation set is empty" in problem_about(config, "data.valid_sources (")


def test_validation_keys_compose_from_the_yaml():
    config = compose("data.valid_fraction=0.02", "train.eval_interval=10")
    assert config.data.valid_fraction == 0.02 and config.data.valid_sources == []
    assert config.train.eval_interval == 10 and config.train.eval_iters is None
    assert config.logging.metrics_file == "outputs/longalign/metrics.jsonl"
    assert not config_problems(config, check_files=False)
    default = compose()
    assert default.train.eval_interval == 50 and default.data.valid_fraction == 0.0
