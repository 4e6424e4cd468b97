"""Validation during training, in this process (world size 1, CPU): the held-out split
(deterministic, disjoint from training, the same for any DP size), the validation
loss against a plain per-document computation, validation leaving training untouched,
and what is logged (console line, metrics.jsonl). Layouts: test_validation_layouts.py."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from megatron_longalign.config.data import DatasetSource
from megatron_longalign.data.holdout import HOLDOUT_SALT, held_out_mask, holdout_draw
from megatron_longalign.data.planner import weighted_as_one_set
from megatron_longalign.data.train_data import build_data, build_validation_data
from megatron_longalign.data.weights import per_token_weights
from megatron_longalign.training.builders import build_transformer_config
from megatron_longalign.training.logger import format_console_line
from megatron_longalign.training.metrics import bucket_labels
from megatron_longalign.training.metrics_file import read_metrics
from megatron_longalign.training.trainer import Trainer
from megatron_longalign.training.validation import is_validation_step
from tests.helpers.tiny_training import Recorder, tiny_training_config

pytestmark = pytest.mark.usefixtures("distributed_teardown")

FRACTION = 0.25
MASK64 = (1 << 64) - 1


def splitmix64_reference(index: int, salt: int) -> float:
    """SplitMix64's finaliser in plain Python integers (the published constants)."""
    z = ((index + salt) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return (z >> 11) / 2.0**53


def test_holdout_draw_is_splitmix64_of_the_index_and_salt():
    indices = [0, 1, 2, 7, 1000, 123_456_789, 2**40 + 3]
    got = holdout_draw(np.asarray(indices))
    want = [splitmix64_reference(i, HOLDOUT_SALT) for i in indices]
    assert got.tolist() == want
    assert not np.array_equal(holdout_draw(np.arange(5), salt=1), holdout_draw(np.arange(5)))


def test_held_out_mask_per_dataset_and_fraction():
    mask = held_out_mask([40_000, 7], 0.1)
    assert mask.shape == (40_007,)
    assert abs(mask[:40_000].mean() - 0.1) < 0.006  # ~4 sigma of a binomial(40000, 0.1)
    # Index within its dataset: the second dataset's samples get the first's draws.
    assert np.array_equal(mask[40_000:], mask[:7])
    assert np.array_equal(held_out_mask([7], 0.1), mask[:7])
    # A larger fraction holds out a superset (the draw is fixed, only the cut moves).
    assert not (mask & ~held_out_mask([40_000, 7], 0.2)).any()
    assert not held_out_mask([100], 0.0).any()
    with pytest.raises(ValueError, match="valid_fraction"):
        held_out_mask([3], 1.0)


def training_ids(data, epochs: int = 2) -> set[int]:
    """Every global id the training planner puts in a batch in `epochs` epochs."""
    ids = set()
    for batch in data.planner.iterate(epochs=epochs):
        for rank in batch.micro_batches:
            for plan in rank:
                ids.update(plan.samples.tolist())
    return ids


def validation_ids(valid) -> list[int]:
    return sorted(
        int(i)
        for batch in valid.batches
        for rank in batch.micro_batches
        for plan in rank
        for i in plan.samples
    )


def test_the_split_is_disjoint_complete_and_the_same_for_any_dp_size(sample_prefixes):
    config = tiny_training_config(sample_prefixes, global_batch_size=4)
    config.data.valid_fraction = FRACTION
    seen = {}
    for dp in (1, 2, 4):
        data = build_data(config, 0, dp)
        valid = build_validation_data(config, 0, dp, train_mixture=data.mixture)
        seen[dp] = training_ids(data), validation_ids(valid)
        held = held_out_mask(data.mixture.sizes, FRACTION)
        fits = data.mixture.lengths <= config.data.seq_length
        train, held_ids = seen[dp]
        assert not train & set(held_ids)  # the training planner never sees one
        assert held_ids == np.flatnonzero(held & fits).tolist()  # each exactly once
        assert train == set(np.flatnonzero(~held & fits).tolist())
    assert seen[1] == seen[2] == seen[4]
    # Another data seed reorders training, not the split.
    other = replace(config, data=replace(config.data, seed=99))
    data = build_data(other, 0, 1)
    assert training_ids(data) == seen[1][0]
    assert validation_ids(build_validation_data(other, 0, 1)) == seen[1][1]


def test_set_weights_do_not_depend_on_how_the_set_is_cut(sample_prefixes):
    """Over the whole set, the weights are per_token_weights of all its sequences; with
    another global batch size (other batches, other micro-batches) each sample keeps its
    weight."""

    def weights_by_sample(global_batch_size: int, mode: str) -> dict[int, float]:
        config = tiny_training_config(
            sample_prefixes, global_batch_size=global_batch_size, loss_reduction=mode
        )
        config.data.valid_fraction = FRACTION
        valid = build_validation_data(config, 0, 1)
        assert len(valid.batches) > 1 or global_batch_size > 2
        return {
            int(s): float(w)
            for batch in valid.batches
            for rank in batch.micro_batches
            for plan in rank
            for s, w in zip(plan.samples, plan.weights, strict=True)
        }

    for mode in ("sequence", "token", "sqrt"):
        small, large = weights_by_sample(2, mode), weights_by_sample(8, mode)
        assert small.keys() == large.keys()
        for sample in small:
            assert small[sample] == pytest.approx(large[sample], rel=1e-12)
    # The function itself: one per_token_weights over the concatenated batches.
    config = tiny_training_config(sample_prefixes, global_batch_size=2)
    data = build_data(config, 0, 1)
    batches = [data.planner.global_batch(0, s) for s in range(3)]
    plans = [p for b in batches for r in b.micro_batches for p in r]
    counts = np.concatenate([data.planner.target_counts[p.samples] for p in plans])
    got = np.concatenate(
        [
            p.weights
            for b in weighted_as_one_set(batches, data.planner.target_counts, "sqrt")
            for r in b.micro_batches
            for p in r
        ]
    )
    np.testing.assert_allclose(got, per_token_weights(counts, "sqrt"), rtol=0, atol=0)


def deterministic_weights(chunks) -> None:
    from tests.helpers.tiny_gpt import set_deterministic_weights

    for chunk in chunks:
        set_deterministic_weights(chunk, seed=7)


def validation_trainer(sample_prefixes, mode: str = "sequence", **train) -> Trainer:
    """The configuration of workers/valid_run.py, on one process."""
    config = tiny_training_config(
        sample_prefixes, max_steps=1, global_batch_size=4, loss_reduction=mode, **train
    )
    config.data.valid_fraction = FRACTION
    return Trainer(config, init_weights=deterministic_weights)


def per_document_reference(trainer: Trainer, sample_ids) -> list[tuple[int, np.ndarray]]:
    """(length, target NLLs) of each sample: one document at a time through a plain copy
    of the model's logits and torch's cross entropy over the real vocabulary."""
    import torch.nn.functional as F

    from megatron_longalign.model import build_gpt_model, packed_seq_params_from

    config = trainer.config
    reference = build_gpt_model(
        config.model, transformer_config=build_transformer_config(config, torch.float32, True)
    )
    with torch.no_grad():
        for ref, ours in zip(
            reference.parameters(), trainer.unwrapped_model[0].parameters(), strict=True
        ):
            ref.copy_(ours)
    reference.eval()
    mixture = trainer.data.mixture
    documents = []
    for sample_id in sample_ids:
        sample = mixture[int(sample_id)]
        tokens = torch.as_tensor(sample.tokens, dtype=torch.int64)
        length = tokens.numel()
        with torch.no_grad():
            logits = reference(
                tokens[None],
                torch.arange(length)[None],
                packed_seq_params=packed_seq_params_from(
                    torch.tensor([0, length], dtype=torch.int32), length
                ),
            )[0]
        nll = F.cross_entropy(logits[:-1, : config.model.vocab_size], tokens[1:], reduction="none")
        is_target = torch.as_tensor(sample.loss_mask[1:], dtype=torch.bool)
        documents.append((length, nll[is_target].double().numpy()))
    return documents


def reduce_by_hand(documents, mode: str) -> dict[str, float]:
    means = np.array([nll.mean() for _, nll in documents if nll.size])
    counts = np.array([nll.size for _, nll in documents if nll.size], dtype=np.float64)
    if mode == "sequence":
        loss = means.mean()
    elif mode == "sqrt":
        loss = (np.sqrt(counts) * means).sum() / np.sqrt(counts).sum()
    else:
        loss = (counts * means).sum() / counts.sum()
    by_len: dict[str, list[float]] = {}
    edges = [0, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
    labels = bucket_labels(edges)
    for length, nll in documents:
        if nll.size:
            bucket = int(np.searchsorted(edges, length, side="right")) - 1
            by_len.setdefault(labels[bucket], []).append(nll.mean())
    result = {
        "valid/loss": loss,
        "valid/token_loss": (counts * means).sum() / counts.sum(),
        "valid/sequences": float(means.size),
        "valid/target_tokens": counts.sum(),
    }
    result.update({f"valid/loss_by_len/{k}": float(np.mean(v)) for k, v in by_len.items()})
    return result


@pytest.mark.parametrize("mode", ["sequence", "sqrt"])
def test_validation_loss_equals_a_per_document_reference(sample_prefixes, mode):
    trainer = validation_trainer(sample_prefixes, mode)
    valid = trainer.validator.data
    assert len(valid.batches) == valid.available_batches > 1
    got = trainer.validate()
    want = reduce_by_hand(per_document_reference(trainer, validation_ids(valid)), mode)
    assert got.keys() == want.keys()
    assert len(want) > 5  # loss, token loss, counts and at least two length buckets
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    # The modes are different reductions of the same NLLs.
    assert got["valid/loss"] != pytest.approx(got["valid/token_loss"], rel=1e-4)


def test_eval_iters_validates_the_first_batches_only(sample_prefixes):
    trainer = validation_trainer(sample_prefixes, eval_iters=1)
    valid = trainer.validator.data
    assert len(valid.batches) == 1 and valid.available_batches > 1
    got = trainer.validate()
    want = reduce_by_hand(per_document_reference(trainer, validation_ids(valid)), "sequence")
    assert got["valid/loss"] == pytest.approx(want["valid/loss"], rel=1e-5)
    assert got["valid/sequences"] == valid.batches[0].num_sequences


def run(sample_prefixes, tmp_path, valid_sources=(), eval_interval=0, steps=5):
    config = tiny_training_config(
        sample_prefixes, max_steps=steps, global_batch_size=2, eval_interval=eval_interval
    )
    # Validation on the long samples; training on the short chats only.
    config.data.sources = [DatasetSource(sample_prefixes["short"])]
    config.data.valid_sources = [DatasetSource(p) for p in valid_sources]
    config.logging.metrics_file = str(tmp_path / "metrics.jsonl")
    recorder = Recorder()
    trainer = Trainer(config, metrics_logger=recorder)
    history = trainer.train()
    params = [p.detach().clone() for p in trainer.unwrapped_model[0].parameters()]
    return trainer, history, params, recorder


def test_validation_changes_nothing_of_the_training(sample_prefixes, tmp_path):
    off, off_history, off_params, _ = run(sample_prefixes, tmp_path / "off")
    on, on_history, on_params, recorder = run(
        sample_prefixes, tmp_path / "on", [sample_prefixes["long"]], eval_interval=2
    )
    assert off.validator is None and on.validator is not None
    assert [r.loss for r in on_history] == [r.loss for r in off_history]
    assert [r.grad_norm for r in on_history] == [r.grad_norm for r in off_history]
    assert all(torch.equal(a, b) for a, b in zip(on_params, off_params, strict=True))
    assert on.state.consumed_samples == off.state.consumed_samples
    assert on.state.plan_position == off.state.plan_position
    rng = torch.get_rng_state()
    on.validate()
    assert torch.equal(torch.get_rng_state(), rng)
    # Validated after steps 2 and 4 and at the end (5), in eval mode, back in train mode.
    valid_steps = [s for s, m in recorder.logged if "valid/loss" in m]
    assert valid_steps == [2, 4, 5] and on.last_validated_step == 5
    assert all(chunk.training for chunk in on.model)
    # metrics.jsonl: a train line per step, a valid line per validation, in order.
    lines = read_metrics(tmp_path / "on" / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in lines] == [
        (1, "train"),
        (2, "train"),
        (2, "valid"),
        (3, "train"),
        (4, "train"),
        (4, "valid"),
        (5, "train"),
        (5, "valid"),
    ]
    assert lines[-1]["valid/loss"] == pytest.approx(on.last_valid_metrics["valid/loss"])
    assert lines[0]["train/loss"] == pytest.approx(on_history[0].loss)
    # The model did train: the end validates lower than the first.
    assert lines[-1]["valid/token_loss"] < lines[2]["valid/token_loss"]


def test_validation_runs_at_the_end_only_by_default(sample_prefixes, tmp_path):
    trainer, _, _, recorder = run(
        sample_prefixes, tmp_path, [sample_prefixes["long"]], eval_interval=0, steps=3
    )
    assert [s for s, m in recorder.logged if "valid/loss" in m] == [3]
    # Training lines never carry validation values, and vice versa.
    for _, metrics in recorder.logged:
        assert ("valid/loss" in metrics) != ("train/loss" in metrics)


def test_is_validation_step():
    assert [s for s in range(0, 8) if is_validation_step(s, 3, 7)] == [3, 6, 7]
    assert [s for s in range(0, 8) if is_validation_step(s, 0, 7)] == [7]
    assert [s for s in range(0, 8) if is_validation_step(s, None, 7)] == [7]


def test_console_line_shows_validation():
    line = format_console_line(
        10,
        {
            "valid/loss": 2.5,
            "valid/token_loss": 2.25,
            "valid/sequences": 18,
            "valid/target_tokens": 1184,
            "valid/loss_by_len/0-512": 2.0,
        },
    )
    assert line == (
        "step 10 | valid loss 2.5000 | valid token loss 2.2500 | 18 seqs | 1184 targets"
    )


def test_empty_validation_set_is_a_config_error(sample_prefixes):
    from megatron_longalign.config.errors import ConfigError

    config = tiny_training_config(sample_prefixes, max_steps=1)
    config.data.valid_fraction = 1e-9  # holds out nothing of 72 samples
    with pytest.raises(ConfigError, match="validation set is empty.*valid_fraction"):
        Trainer(config)


def test_metrics_file_lines_are_json(tmp_path):
    from megatron_longalign.training.metrics_file import MetricsFile

    path = tmp_path / "m.jsonl"
    writer = MetricsFile(path, start_step=0)
    writer.append(1, "train", {"train/loss": 2.0, "train/grad_norm": float("nan")})
    writer.close()
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["step"] == 1 and record["split"] == "train"
    assert record["train/loss"] == 2.0 and record["train/grad_norm"] is None


def write_lines(path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_metrics_file_drops_steps_after_the_resumed_one(tmp_path):
    from megatron_longalign.training.metrics_file import MetricsFile, dropped_path

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "split": split}) for s in range(1, 6) for split in "tv"]
    write_lines(path, lines)
    with open(path, "a") as handle:
        handle.write('{"step": 6, "spl')  # torn by a kill
    writer = MetricsFile(path, start_step=3)
    writer.append(4, "train", {"train/loss": 1.5})
    writer.close()
    got = read_metrics(path)
    assert [(r["step"], r["split"]) for r in got] == [
        (1, "t"),
        (1, "v"),
        (2, "t"),
        (2, "v"),
        (3, "t"),
        (3, "v"),
        (4, "train"),
    ]
    # Nothing deleted: the dropped lines (and the torn one) are kept aside.
    dropped = dropped_path(path).read_text().splitlines()
    assert dropped == lines[6:] + ['{"step": 6, "spl']
    # A fresh start (step 0) moves every old line aside.
    MetricsFile(path, start_step=0).close()
    assert read_metrics(path) == []
    assert len(dropped_path(path).read_text().splitlines()) == len(dropped) + 7


def test_a_resumed_run_appends_after_its_checkpoint(sample_prefixes, tmp_path):
    def config(steps: int):
        c = tiny_training_config(
            sample_prefixes,
            max_steps=steps,
            checkpoint_dir=str(tmp_path / "ckpt"),
            save_interval=2,
            eval_interval=2,
        )
        c.data.valid_sources = [DatasetSource(sample_prefixes["long"])]
        c.optim.lr_decay_steps = 6
        c.logging.metrics_file = str(tmp_path / "metrics.jsonl")
        return c

    Trainer(config(4), metrics_logger=Recorder()).train()
    path = tmp_path / "metrics.jsonl"
    # A killed run got to step 5 after the step-4 checkpoint.
    with open(path, "a") as handle:
        handle.write(json.dumps({"step": 5, "split": "train", "train/loss": 9.0}) + "\n")
    resumed = Trainer(config(6), metrics_logger=Recorder())
    assert resumed.state.step == 4
    resumed.train()
    got = [(r["step"], r["split"]) for r in read_metrics(path)]
    assert got == [
        (1, "train"),
        (2, "train"),
        (2, "valid"),
        (3, "train"),
        (4, "train"),
        (4, "valid"),
        (5, "train"),
        (6, "train"),
        (6, "valid"),
    ]
    assert read_metrics(path)[6]["train/loss"] != 9.0
