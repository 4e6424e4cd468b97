"""The loss of one micro-batch, in the form megatron-core's schedules expect.

The contract (docs/TRAINING.md, "The path we use"): the data pipeline gives every target
token its weight w_t from the whole global batch, so the loss is only

    loss = sum_t w_t * nll_t            (over the micro-batch's tokens)

and nothing downstream may rescale it. `loss_func` returns megatron's 3-tuple
`(loss, num_target_tokens, report)`; with `TransformerConfig.calculate_per_token_loss`
the schedule then leaves the loss alone (no division by num_tokens or by the number of
micro-batches), DDP sums gradients over DP ranks, and the trainer's finalize function
(`finalize_grads_as_sum`) skips megatron's division by the all-reduced token count.
The applied gradient is therefore exactly grad(sum_t w_t * nll_t) over the global batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Report keys (summed over micro-batches and ranks by the trainer).
LOSS = "loss"  # sum_t w_t * nll_t: the training objective's share of this micro-batch
NLL_SUM = "nll_sum"  # sum of nll over target tokens (w_t > 0), unweighted
NUM_TARGETS = "num_targets"  # target tokens (w_t > 0)


def loss_func(loss_weights: Tensor, token_nll: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """megatron `loss_func` for one micro-batch.

    loss_weights: [T] or [1, T] float, the pipeline's w_t (0 on non-targets and padding).
    token_nll: the model's per-token cross entropy, same number of elements.
    Returns (sum_t w_t * nll_t, target token count as an int tensor, report).
    """
    nll = token_nll.float().reshape(-1)
    weights = loss_weights.to(nll.device, torch.float32).reshape(-1)
    if weights.numel() != nll.numel():
        raise ValueError(f"{weights.numel()} loss weights for {nll.numel()} token losses")
    loss = (weights * nll).sum()
    targets = weights > 0
    num_targets = targets.sum().to(torch.int)
    # where(), not nll * targets: an inf on a non-target position must not become NaN
    # here (the weighted loss above still carries it, which is what the trainer checks).
    nll_sum = torch.where(targets, nll, torch.zeros_like(nll)).sum().detach()
    report = {
        # clone(): the schedule divides the returned loss in place in its other modes,
        # and a detach()ed view would share that storage.
        LOSS: loss.detach().clone(),
        NLL_SUM: nll_sum,
        NUM_TARGETS: num_targets.to(torch.float32),
    }
    return loss, num_targets, report
