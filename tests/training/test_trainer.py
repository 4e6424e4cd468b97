"""The Trainer in this process (world size 1, CPU, gloo): it learns, it applies exactly
the gradient of the LongAlign objective, it follows the LR schedule, and it skips
non-finite steps."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_longalign.data.planner import PlanPosition
from megatron_longalign.model import fused_loss
from megatron_longalign.training.builders import build_transformer_config
from megatron_longalign.training.step import NonFiniteTrainingError
from megatron_longalign.training.trainer import Trainer
from tests.helpers.tiny_training import tiny_training_config

pytestmark = pytest.mark.usefixtures("distributed_teardown")


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped_model[0].named_parameters()}


def same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def poison_output(trainer: Trainer, when=lambda: True):
    """A forward hook making the final norm's output inf (so loss and gradients become
    non-finite) whenever `when()` is true."""

    def hook(module, inputs, output):
        return output * math.inf if when() else output

    return trainer.unwrapped_model[0].decoder.final_layernorm.register_forward_hook(hook)


def expected_lr(update: int, lr=3e-3, min_lr=3e-4, warmup=2, total=24) -> float:
    if update <= warmup:
        return lr * update / warmup
    ratio = (update - warmup) / (total - warmup)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * ratio)) / 2


def test_loss_falls_and_lr_follows_the_schedule(sample_prefixes):
    trainer = Trainer(tiny_training_config(sample_prefixes, max_steps=24))
    history = trainer.train()
    assert [r.step for r in history] == list(range(1, 25))
    assert not any(r.skipped for r in history)
    losses = [r.loss for r in history]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # Random init starts near ln(640) = 6.46; the tiny model learns the chat format fast.
    assert first > 5.5
    assert last < first - 1.0, losses
    assert [r.lr for r in history] == pytest.approx([expected_lr(k) for k in range(1, 25)])
    assert all(r.grad_norm > 0 and math.isfinite(r.grad_norm) for r in history)
    assert all(r.tokens_per_sec > 0 and r.target_tokens > 0 for r in history)
    metrics = history[-1].metrics()
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec"} <= metrics.keys()
    assert trainer.state.step == 24 and trainer.state.skipped_steps == 0
    assert trainer.scheduler.num_steps == 24  # applied updates


def reference_step(trainer: Trainer, batch) -> tuple[float, float, float]:
    """Plain autograd on a copy of the model: (LongAlign objective computed from the
    per-token losses and sample boundaries, token-mean loss, gradient norm of the sum
    of w_t * nll_t over the global batch)."""
    from megatron_longalign.model import build_gpt_model, model_inputs

    config = trainer.config
    reference = build_gpt_model(
        config.model, transformer_config=build_transformer_config(config, torch.float32, True)
    )
    with torch.no_grad():
        for ref, ours in zip(
            reference.parameters(), trainer.unwrapped_model[0].parameters(), strict=True
        ):
            ref.copy_(ours)
    per_sequence_means, nll_total, targets_total = [], 0.0, 0
    for micro_batch in trainer.data.micro_batches(batch):
        nll = reference(**model_inputs(micro_batch))[0]
        weights = torch.as_tensor(micro_batch.loss_weights)
        (weights * nll).sum().backward()
        bounds = micro_batch.cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            is_target = weights[start:end] > 0
            if is_target.any():
                per_sequence_means.append(nll[start:end][is_target].mean().item())
                nll_total += nll[start:end][is_target].sum().item()
                targets_total += int(is_target.sum())
    assert len(per_sequence_means) == batch.num_sequences  # M
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in reference.parameters()))
    objective = sum(per_sequence_means) / len(per_sequence_means)
    return objective, nll_total / targets_total, grad_norm.item()


@pytest.mark.parametrize("loss_reduction", ["sequence", "token"])
def test_step_applies_the_gradient_of_the_objective(sample_prefixes, loss_reduction):
    # Global batch of 4 packs, one per micro-batch: 4 micro-batches accumulated.
    config = tiny_training_config(
        sample_prefixes, global_batch_size=4, loss_reduction=loss_reduction, max_steps=2
    )
    trainer = Trainer(config)
    batch = next(trainer.batches())
    objective, token_mean, grad_norm = reference_step(trainer, batch)
    result = trainer.train_step(batch)
    if loss_reduction == "sequence":  # LongAlign: mean over sequences of their means
        assert result.loss == pytest.approx(objective, rel=1e-5)
    else:  # token: the global token mean
        assert result.loss == pytest.approx(token_mean, rel=1e-5)
    assert result.token_mean_loss == pytest.approx(token_mean, rel=1e-5)
    assert result.target_tokens == batch.target_tokens
    # The optimizer saw grad(sum w_t nll_t): no division by micro-batches or tokens.
    assert result.grad_norm == pytest.approx(grad_norm, rel=1e-5)


def test_a_non_finite_step_is_skipped_and_training_continues(sample_prefixes):
    trainer = Trainer(tiny_training_config(sample_prefixes, max_steps=6))
    batches = trainer.batches()
    trainer.train_step(next(batches))
    before = params(trainer)
    hook = poison_output(trainer)
    bad = trainer.train_step(next(batches))
    hook.remove()
    assert bad.skipped and not math.isfinite(bad.loss)
    assert same_params(params(trainer), before), "a skipped step changed the weights"
    assert trainer.scheduler.num_steps == 1  # the schedule did not advance either
    good = trainer.train_step(next(batches))
    assert not good.skipped and math.isfinite(good.loss)
    assert good.lr == pytest.approx(bad.lr)  # update 2 runs with update 2's lr
    assert not same_params(params(trainer), before)
    assert trainer.state.step == 3 and trainer.state.skipped_steps == 1
    assert trainer.state.consecutive_bad_steps == 0


def test_train_skips_exactly_the_poisoned_step(sample_prefixes, caplog):
    trainer = Trainer(tiny_training_config(sample_prefixes, max_steps=5))
    poison_output(trainer, when=lambda: trainer.state.step == 2)  # the third step
    with caplog.at_level("WARNING", logger="megatron_longalign.train"):
        history = trainer.train()
    assert [r.skipped for r in history] == [False, False, True, False, False]
    assert all(math.isfinite(r.loss) for i, r in enumerate(history) if i != 2)
    assert "step 3 skipped" in caplog.text


def test_consecutive_bad_steps_stop_the_run(sample_prefixes):
    config = tiny_training_config(sample_prefixes, max_steps=6, max_consecutive_bad_steps=2)
    trainer = Trainer(config)
    initial = params(trainer)
    poison_output(trainer)
    with pytest.raises(NonFiniteTrainingError, match=r"train\.max_consecutive_bad_steps=2"):
        trainer.train()
    assert trainer.state.step == 2 and trainer.state.skipped_steps == 2
    assert same_params(params(trainer), initial)


def test_epochs_mode_runs_one_epoch(sample_prefixes):
    config = tiny_training_config(sample_prefixes, global_batch_size=8, max_steps=None, epochs=1)
    trainer = Trainer(config)
    steps = trainer.data.planner.num_steps(0)
    assert trainer.total_steps == steps
    history = trainer.train()
    assert len(history) == steps
    assert trainer.state.plan_position == PlanPosition(0, steps)
    usable = int((trainer.data.mixture.lengths <= config.data.seq_length).sum())
    assert trainer.state.consumed_samples == usable  # every usable sample exactly once


@pytest.mark.parametrize(
    "recompute",
    [
        {"granularity": "full", "method": "uniform", "num_layers": 1},
        {"granularity": "selective", "modules": ["core_attn", "mlp"]},
    ],
)
def test_activation_recomputation_gives_the_same_step(sample_prefixes, recompute):
    def first_step(**recompute_fields):
        config = tiny_training_config(sample_prefixes, max_steps=2)
        for key, value in recompute_fields.items():
            setattr(config.train.recompute, key, value)
        trainer = Trainer(config)
        if recompute_fields:
            assert trainer.transformer_config.recompute_granularity == recompute["granularity"]
        return trainer.train_step(next(trainer.batches()))

    plain, recomputed = first_step(), first_step(**recompute)
    assert recomputed.loss == pytest.approx(plain.loss, rel=1e-6)
    assert recomputed.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)


def test_init_from_loads_weights_and_refreshes_the_optimizer(sample_prefixes, tmp_path):
    """train.init_from: weights only, and the optimizer's main params follow them (else
    the first update would start from the random initialisation). bf16, as on GPUs: the
    optimizer then keeps fp32 main copies (in fp32 they are views of the weights)."""
    source = Trainer(
        tiny_training_config(
            sample_prefixes, max_steps=3, checkpoint_dir=str(tmp_path / "a"), precision="bf16"
        )
    )
    source.train()
    trained = params(source)
    config = tiny_training_config(
        sample_prefixes,
        max_steps=1,
        checkpoint_dir=str(tmp_path / "b"),
        init_from=str(tmp_path / "a"),  # a root with `latest`
        seed=99,  # a different random init, overwritten by the loaded weights
        precision="bf16",
    )
    fresh = Trainer(config)
    assert fresh.resumed_from is None and fresh.state.step == 0
    assert same_params(params(fresh), trained)
    fresh.train_step(next(fresh.batches()))
    stepped = params(fresh)
    # One Adam step moves every weight by about lr (3e-3 at most); stale main params
    # would jump back to the random init, which differs by ~init std (0.02) or more.
    moved = max((stepped[k] - trained[k]).float().abs().max().item() for k in trained)
    assert 0 < moved < 0.01


def test_init_from_rejects_a_path_without_checkpoint(sample_prefixes, tmp_path):
    from megatron_longalign.training.checkpoint import CheckpointError

    config = tiny_training_config(sample_prefixes, max_steps=1, init_from=str(tmp_path))
    with pytest.raises(CheckpointError, match="train.init_from"):
        Trainer(config)


@pytest.mark.parametrize("loss_reduction", ["sequence", "token"])
def test_chunked_loss_reproduces_the_standard_trajectory(
    sample_prefixes, loss_reduction, monkeypatch
):
    """model.loss_impl=chunked (the fused linear cross entropy, chunks of 100 tokens that
    divide no pack) against standard (megatron's output layer and cross entropy): the
    same loss, gradient norm and lr over 4 optimizer steps. The chunked loss gets the
    loss weights and makes its gradients in forward."""

    def trajectory(impl: str) -> list[tuple[float, float, float]]:
        config = tiny_training_config(sample_prefixes, max_steps=4, loss_reduction=loss_reduction)
        config.model.loss_impl = impl
        config.model.loss_chunk_tokens = 100
        trainer = Trainer(config)
        assert trainer.unwrapped_model[0].loss_impl == impl
        return [(r.loss, r.grad_norm, r.lr) for r in trainer.train()]

    standard = trajectory("standard")

    def no_recompute(*args, **kwargs):
        raise AssertionError("the chunked loss recomputed its logits in backward")

    # The trainer's loss is sum_t w_t nll_t with the weights it gives the model, so the
    # gradients made in forward are used, never discarded and recomputed.
    monkeypatch.setattr(fused_loss, "_gradients", no_recompute)
    chunked = trajectory("chunked")
    assert len(chunked) == len(standard) == 4
    for (loss, grad_norm, lr), (want_loss, want_norm, want_lr) in zip(
        chunked, standard, strict=True
    ):
        assert loss == pytest.approx(want_loss, rel=1e-5)
        assert grad_norm == pytest.approx(want_norm, rel=1e-4)
        assert lr == want_lr
    assert chunked[-1][0] < chunked[0][0]  # it trains
