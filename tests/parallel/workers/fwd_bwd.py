"""One forward/backward of the tiny GPT through megatron's pipeline schedule, on any
(TP, PP) layout. Writes per-token losses (last stage) and the full gradient of the
summed token losses for every parameter (TP rank 0 of each stage).

Loss path (the package's own code): calculate_per_token_loss=True, the trainer's 3-tuple
`loss_func` with weight 1 on every token (the summed token losses), and the trainer's DDP
wrapping (SUM reduction, `finalize_grads_as_sum`), so main_grad is exactly d(sum of all
token losses over both micro-batches). At TP = PP = 1 it also writes the same gradient
from plain autograd, as the reference for that claim.
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
    setup,
    tiny_config,
    unwrap,
    write_rank_result,
)

NUM_MICROBATCHES = 2
MICRO_BATCH_SIZE = 2


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = run_model(model, batch)

    def summed_loss(token_losses: torch.Tensor):
        loss, num_tokens, report = loss_func(torch.ones_like(token_losses), token_losses)
        return loss, num_tokens, {**report, "token_losses": token_losses.detach()}

    return output, summed_loss


def plain_autograd_grads() -> dict[str, torch.Tensor]:
    """The reference without megatron's schedule or DDP: backward of the summed token
    losses of both micro-batches on a fresh single-stage, single-rank model."""
    model = build_model(tiny_config())
    for batch in make_batches(NUM_MICROBATCHES, MICRO_BATCH_SIZE):
        run_model(model, batch).sum().backward()
    return full_tensors(model, "grad")


def main() -> None:
    args = parse_args()
    setup(args.tp, args.pp)
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = tiny_config(calculate_per_token_loss=True)
    model = build_ddp_model(config)
    if args.loss_impl:
        unwrap(model).loss_impl = args.loss_impl
    model.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(make_batches(NUM_MICROBATCHES, MICRO_BATCH_SIZE)),
        model=[model],
        num_microbatches=NUM_MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH_SIZE,
    )
    grads = full_tensors(unwrap(model), "main_grad")
    result = {}
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        result["grads"] = grads
        if parallel_state.is_pipeline_last_stage():
            result["token_losses"] = [r["token_losses"] for r in reports]
    if args.tp == args.pp == 1:
        result["plain_grads"] = plain_autograd_grads()
    write_rank_result(args.out, result)


if __name__ == "__main__":
    main()
