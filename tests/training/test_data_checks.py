"""The Trainer's data checks (issue 10), in this process: samples longer than
data.seq_length are reported per dataset at start-up, and data that cannot train stops
the run with a ConfigError before the model is built, also when the file validation is
skipped (`check_files=False`)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from megatron_longalign.data.indexed import open_dataset_files
from megatron_longalign.training import trainer as trainer_module
from megatron_longalign.training.trainer import Trainer
from megatron_longalign.training.validate import ConfigError
from tests.helpers.tiny_training import tiny_training_config

pytestmark = pytest.mark.usefixtures("distributed_teardown")


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the trainer gets as far as building the model."""

    def build_model(*args, **kwargs):
        raise AssertionError("the model was built before the data problem was reported")

    monkeypatch.setattr(trainer_module, "build_model", build_model)


def test_dropped_samples_are_reported_per_dataset_before_the_model(sample_prefixes, caplog):
    config = tiny_training_config(sample_prefixes, max_steps=1, seq_length=2048)
    lengths = [open_dataset_files(s.prefix).lengths for s in config.data.sources]
    too_long = [int((x > 2048).sum()) for x in lengths]
    assert too_long[0] > 0 and too_long[1] == 0
    with caplog.at_level(logging.INFO, logger="megatron_longalign.train"):
        Trainer(config)
    records = [r for r in caplog.records if r.name == "megatron_longalign.train"]
    (warning,) = [r for r in records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert f"data.sources[0] ({config.data.sources[0].prefix}): {too_long[0]} of " in message
    assert f"longest {int(lengths[0].max())} tokens" in message and "--max-length 2048" in message
    model_line = next(i for i, r in enumerate(records) if "parameters on this rank" in r.msg)
    assert records.index(warning) < model_line


def test_an_empty_plan_stops_before_the_model(sample_prefixes, no_model):
    # Without the file validation, the trainer itself must find it.
    config = tiny_training_config(sample_prefixes, max_steps=1, seq_length=16)
    with pytest.raises(ConfigError, match="the data plan is empty") as err:
        Trainer(config, check_files=False)
    assert "data.sources[0]" in str(err.value) and "--max-length 16" in str(err.value)


def test_a_damaged_set_is_a_config_error_without_the_file_validation(
    sample_prefixes, tmp_path, no_model
):
    prefix = sample_prefixes["short"]
    meta = json.loads(Path(prefix + ".json").read_text())
    for name in [Path(prefix).name + ".json", *(r["name"] for r in meta["files"].values())]:
        shutil.copy(Path(prefix).parent / name, tmp_path / name)
    idx = tmp_path / meta["files"][".idx"]["name"]
    idx.write_bytes(idx.read_bytes()[:-8])
    config = tiny_training_config({"short": str(tmp_path / Path(prefix).name)}, max_steps=1)
    with pytest.raises(ConfigError, match="truncated") as err:
        Trainer(config, check_files=False)
    assert str(idx) in str(err.value)
