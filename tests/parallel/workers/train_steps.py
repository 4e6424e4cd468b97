"""Three optimizer steps of the tiny GPT with megatron DDP and the distributed
optimizer, the global batch (4 sequences) split over the data-parallel ranks.

--mode mean: megatron's default averaging. loss_func returns a 2-tuple with the mean
    token loss of the micro-batch; the schedule divides by num_microbatches and DDP by
    the DP size, so the step sees the mean over micro-batches of the micro-batch means.
    That equals the DP=1 run when every micro-batch has the same size (here: micro-batch
    size 1 in both runs, every token counts).
--mode sum: the LongAlign path, with the package's own code. Per-token weights
    w_t = 1/(N_i * M) (mean of per-sequence means, with a random loss mask),
    calculate_per_token_loss=True, the trainer's 3-tuple `loss_func` returning
    sum_t w_t * loss_t, and the trainer's DDP wrapping with `finalize_grads_as_sum`, so the
    applied gradient is d(sum_t w_t loss_t) over the whole global batch whatever the DP
    size or micro-batch size.
"""

from __future__ import annotations

import torch

from megatron_longalign.training.loss import loss_func
from tests.helpers.tiny_gpt import (
    SEQ,
    build_ddp_model,
    build_model,
    full_tensors,
    make_batches,
    parse_args,
    run_model,
    sequence_mean_weights,
    setup,
    tiny_config,
    write_rank_result,
)

GLOBAL_BATCH = 4
STEPS = 3


def mean_loss_func(token_losses: torch.Tensor):
    loss = token_losses.mean()
    # clone: the schedule divides the returned loss in place (by num_microbatches),
    # and a detach()ed view would see that division too.
    return loss, {"loss": loss.detach().clone()}


def make_forward_step(mode: str):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = run_model(model, batch)
        if mode == "mean":
            return output, mean_loss_func
        weights = sequence_mean_weights(batch["loss_mask"], GLOBAL_BATCH)
        return output, lambda losses: loss_func(weights, losses)

    return forward_step


def local_micro_batches(micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    from megatron_longalign.parallel.distributed import data_parallel_rank, data_parallel_size

    per_rank = GLOBAL_BATCH // (data_parallel_size() * micro_batch_size)
    batches = make_batches(GLOBAL_BATCH // micro_batch_size, micro_batch_size)
    start = data_parallel_rank() * per_rank
    return batches[start : start + per_rank]


def build_optimizer(model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=1e-2,
        weight_decay=0.0,
        use_distributed_optimizer=True,
        bf16=False,
        fp16=False,
        params_dtype=torch.float32,
        clip_grad=1e9,  # > 0 so the grad norm is computed; never clips at this size
    )
    return get_megatron_optimizer(config, [model])


def reduce_step_loss(reports: list[dict], mode: str) -> float:
    """The step's loss over the global batch: the mean of micro-batch means (mean
    mode) or the plain sum (sum mode)."""
    from megatron.core import parallel_state

    total = torch.stack([r["loss"] for r in reports]).sum()
    group = parallel_state.get_data_parallel_group()
    torch.distributed.all_reduce(total, group=group)
    if mode == "mean":
        total /= len(reports) * parallel_state.get_data_parallel_world_size()
    return total.item()


def train(mode: str, micro_batch_size: int) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = tiny_config(calculate_per_token_loss=(mode == "sum"))
    model = build_ddp_model(config, use_distributed_optimizer=True, sum_gradients=(mode == "sum"))
    optimizer = build_optimizer(model)
    batches = local_micro_batches(micro_batch_size)
    losses, grad_norms = [], []
    for _ in range(STEPS):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=make_forward_step(mode),
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=SEQ,
            micro_batch_size=micro_batch_size,
        )
        success, grad_norm, _ = optimizer.step()
        assert success, "optimizer step skipped"
        losses.append(reduce_step_loss(reports, mode))
        grad_norms.append(float(grad_norm))
    return {"losses": losses, "grad_norms": grad_norms, "params": full_tensors(model.module)}


def plain_weighted_grad_norm() -> float:
    """Reference for the sum path's first step: the norm of d(sum_t w_t loss_t) over the
    whole global batch, by plain autograd on one fresh model (no schedule, DDP or DP)."""
    model = build_model(tiny_config())
    for batch in make_batches(GLOBAL_BATCH, 1):
        weights = sequence_mean_weights(batch["loss_mask"], GLOBAL_BATCH)
        (weights * run_model(model, batch)).sum().backward()
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()


def main() -> None:
    args = parse_args({"sum-micro-batch-size": int})
    setup(args.tp, args.pp)
    from megatron_longalign.parallel.distributed import data_parallel_rank

    # Both modes in one launch: starting the ranks costs more than the steps.
    result = {"mean": train("mean", 1), "sum": train("sum", args.sum_micro_batch_size)}
    result["sum"]["plain_grad_norm"] = plain_weighted_grad_norm()
    if data_parallel_rank() != 0:
        for mode_result in result.values():
            mode_result.pop("params")  # identical on every DP rank after the all-gather
    write_rank_result(args.out, result)


if __name__ == "__main__":
    main()
