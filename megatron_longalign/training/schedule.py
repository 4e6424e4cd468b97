"""Learning-rate schedule: linear warmup, then cosine or linear decay to min_lr (or
constant), through megatron-core's `OptimizerParamScheduler`.

Convention: `scheduler.num_steps` counts *applied* optimizer updates, and update k
(k = 1, 2, ...) runs with megatron's lr(k). The trainer calls `scheduler.step(1)` just
before it applies an update and undoes it (`step(-1)`) when the update is skipped, so:

    warmup (k <= W):  lr_warmup_init + (lr - lr_warmup_init) * k / W
    decay (W < k <= D), r = (k - W) / (D - W):
        cosine: min_lr + (lr - min_lr) * (1 + cos(pi * r)) / 2
        linear: min_lr + (lr - min_lr) * (1 - r)
    after D: min_lr;  constant: lr after warmup

With D = the run's total steps the last update uses exactly min_lr, and the first one
uses lr / W rather than megatron's usual lr(0) = lr_warmup_init, which would spend a
whole step at lr 0. Weight decay is constant (`optim.weight_decay`).
"""

from __future__ import annotations

from typing import Any

from megatron_longalign.config.training import OptimConfig


def decay_steps(optim: OptimConfig, total_steps: int) -> int:
    return optim.lr_decay_steps if optim.lr_decay_steps is not None else total_steps


def warmup_steps(optim: OptimConfig, total_steps: int) -> int:
    """W: `lr_warmup_steps`, or floor(lr_warmup_fraction x decay steps) when the fraction
    is set (as Megatron's --lr-warmup-fraction)."""
    if optim.lr_warmup_fraction is None:
        return optim.lr_warmup_steps
    return int(optim.lr_warmup_fraction * decay_steps(optim, total_steps))


def build_scheduler(optimizer: Any, optim: OptimConfig, total_steps: int):
    """megatron OptimizerParamScheduler for `optimizer` (a MegatronOptimizer, or anything
    with `param_groups`). Sets lr(0) on the groups now; see the module docstring."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    steps = decay_steps(optim, total_steps)
    warmup = warmup_steps(optim, total_steps)
    if not 0 <= warmup < steps:
        raise ValueError(
            f"the warmup ({warmup} steps: optim.lr_warmup_steps, or optim.lr_warmup_fraction "
            f"x decay steps) must be in [0, {steps}), the decay steps (optim.lr_decay_steps, "
            "or the run's total steps)"
        )
    return OptimizerParamScheduler(
        optimizer,
        init_lr=optim.lr_warmup_init,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=steps,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(steps, 1),
        wd_incr_style="constant",
        # Resuming restores num_steps; the schedule itself always comes from the config.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def current_lr(optimizer: Any) -> float:
    """The learning rate the scheduler last set (megatron's canonical group)."""
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    if lr is None:  # plain torch optimizers (tests) have no default_config flag
        lr = optimizer.param_groups[0]["lr"]
    return float(lr)
