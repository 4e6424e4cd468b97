"""One training step, as the Trainer runs it (`TrainStep`):

1. the planner's GlobalBatch gives this DP rank its micro-batch plans; TrainData turns
   them into THD MicroBatches (every pipeline stage builds them: each needs
   position_ids and cu_seqlens);
2. `get_forward_backward_func()` runs them with `loss_func` (training/loss.py;
   `run_micro_batches` with `MicroBatchForward`, which validation runs forward only);
3. the loss sums are reduced over the job (`reduce_reports`); loss and gradient norm
   are checked: a non-finite step is skipped (gradients zeroed, no optimizer or
   scheduler update);
4. otherwise: clip, scheduler step, optimizer update (`clip_and_step`).

`count_bad_steps` is the bad-step policy: `train.max_consecutive_bad_steps` bad steps in
a row stop the run with `NonFiniteTrainingError`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_longalign.config.training import LongAlignConfig
from megatron_longalign.data.microbatch import MicroBatch
from megatron_longalign.data.planner import GlobalBatch
from megatron_longalign.data.train_data import TrainData
from megatron_longalign.megatron_compat import clip_and_step
from megatron_longalign.training import loss as loss_keys
from megatron_longalign.training import metrics as metrics_lib
from megatron_longalign.training.checkpoint import TrainingState
from megatron_longalign.training.loss import loss_func
from megatron_longalign.training.schedule import current_lr

log = logging.getLogger("megatron_longalign.train")


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


@dataclass
class StepResult:
    step: int  # 1-based iteration number (skipped steps count)
    epoch: int
    loss: float  # sum_t w_t * nll_t over the global batch: the objective
    token_mean_loss: float  # unweighted mean nll over the global batch's target tokens
    target_tokens: int
    real_tokens: int
    lr: float  # the lr of this step's update (or of the update it would have been)
    grad_norm: float  # before clipping
    skipped: bool
    step_time: float  # seconds
    rank_imbalance: float  # max / mean estimated rank cost of the global batch
    flops: float = 0.0  # model FLOPs of the step, whole job (metrics.training_flops)
    packing_efficiency: float = 0.0  # real tokens / token budget of the global batch

    @property
    def tokens_per_sec(self) -> float:
        """Real (non-padding) tokens of the global batch per second, all ranks together."""
        return self.real_tokens / self.step_time if self.step_time > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """This step's own values under the documented metric names (training/metrics.py)."""
        return {
            metrics_lib.LOSS: self.loss,
            metrics_lib.TOKEN_MEAN_LOSS: self.token_mean_loss,
            metrics_lib.LR: self.lr,
            metrics_lib.GRAD_NORM: self.grad_norm,
            metrics_lib.SKIPPED: float(self.skipped),
            metrics_lib.TOKENS_PER_SEC: self.tokens_per_sec,
            metrics_lib.RANK_IMBALANCE: self.rank_imbalance,
            metrics_lib.PACKING_EFFICIENCY: self.packing_efficiency,
        }


@dataclass
class LossSums:
    """Sums over the micro-batches run, identical on every rank after `reduce_reports`."""

    loss: float = 0.0  # sum_t w_t * nll_t
    nll_sum: float = 0.0  # sum of nll over target tokens
    num_targets: float = 0.0  # target tokens

    def __iadd__(self, other: LossSums) -> LossSums:
        self.loss += other.loss
        self.nll_sum += other.nll_sum
        self.num_targets += other.num_targets
        return self


class MicroBatchForward:
    """megatron's `forward_step_func` for THD MicroBatches, with `loss_func` as the loss
    and every micro-batch's per-token losses added to `loss_by_length` (documents
    bucketed by their real length from `sample_lengths`, indexed by global sample id).
    Training (TrainStep) and validation (training/validation.py) both run it."""

    def __init__(
        self,
        device: torch.device,
        sample_lengths: np.ndarray,
        loss_by_length: metrics_lib.LossByLength,
    ) -> None:
        self.device = device
        self.sample_lengths = sample_lengths
        self.loss_by_length = loss_by_length

    def __call__(self, data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
        """The THD micro-batch goes to every stage (the first stage reads tokens, every
        stage needs positions and cu_seqlens, the last one labels)."""
        from megatron_longalign.model import model_inputs

        micro_batch = next(data_iterator)
        inputs = model_inputs(micro_batch, self.device)
        weights = torch.as_tensor(micro_batch.loss_weights, device=self.device)
        # The loss is sum_t w_t nll_t, so the chunked loss can make its gradients in
        # forward (model/fused_loss.py `grad_hint`; any other loss falls back safely;
        # without gradients, as in validation, the hint is not used).
        output = model(**inputs, loss_mask=weights.to(torch.float32).view(1, -1))
        return output, functools.partial(self._loss_func, micro_batch, weights)

    def _loss_func(self, micro_batch: MicroBatch, weights: torch.Tensor, token_nll):
        """`loss_func`, and the per-token losses into the loss-by-length buckets."""
        from megatron.core import parallel_state

        cp_group = parallel_state.get_context_parallel_group() if micro_batch.cp_size > 1 else None
        self.loss_by_length.add_microbatch(
            micro_batch,
            token_nll.detach(),
            sample_lengths=self.sample_lengths,
            cp_group=cp_group,
        )
        return loss_func(weights, token_nll)


def run_micro_batches(
    model: list[torch.nn.Module],
    micro_batches: list[MicroBatch],
    forward: MicroBatchForward,
    *,
    forward_only: bool,
) -> LossSums:
    """This rank's micro-batches through `get_forward_backward_func()` (pipeline stages
    exchange activations as megatron schedules them; with `forward_only` nothing runs
    backward), the loss sums reduced over the job. Collective over every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reports = get_forward_backward_func()(
        forward_step_func=forward,
        data_iterator=iter(micro_batches),
        model=model,
        num_microbatches=len(micro_batches),
        # Only used for fixed pipeline shapes; THD stages exchange shapes instead.
        seq_length=max(mb.num_tokens for mb in micro_batches),
        micro_batch_size=1,  # THD: one packed row per micro-batch
        forward_only=forward_only,
    )
    return reduce_reports(reports, forward.device)


def reduce_reports(reports: list[dict[str, torch.Tensor]], device: torch.device) -> LossSums:
    """Sum the micro-batch reports over the whole job. Only last-stage ranks have
    reports; each TP rank of the last stage has the same ones, hence / TP. CP and DP
    ranks hold different tokens: their sums add up."""
    from megatron.core import parallel_state

    local = torch.zeros(3, dtype=torch.float64, device=device)
    for report in reports:
        local[0] += report[loss_keys.LOSS].double()
        local[1] += report[loss_keys.NLL_SUM].double()
        local[2] += report[loss_keys.NUM_TARGETS].double()
    torch.distributed.all_reduce(local)
    local /= parallel_state.get_tensor_model_parallel_world_size()
    loss, nll_sum, num_targets = local.tolist()
    return LossSums(loss, nll_sum, num_targets)


class TrainStep:
    """Runs one optimizer step of the model chunks (under DDP), the optimizer and the
    scheduler on a global batch. `loss_by_length` holds the last step's per-document
    losses (not finite when the step was skipped)."""

    def __init__(
        self,
        config: LongAlignConfig,
        data: TrainData,
        model: list[torch.nn.Module],
        optimizer: Any,
        scheduler: Any,
        device: torch.device,
    ) -> None:
        self.config = config
        self.data = data
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.loss_by_length = metrics_lib.LossByLength()
        self.forward = MicroBatchForward(device, data.planner.lengths, self.loss_by_length)

    def __call__(self, batch: GlobalBatch, step: int) -> StepResult:
        """One optimizer step on `batch`; `step` is its 1-based iteration number."""
        start = time.perf_counter()
        micro_batches = self.data.micro_batches(batch)
        self.zero_grads()
        self.loss_by_length.reset()
        stats = run_micro_batches(self.model, micro_batches, self.forward, forward_only=False)
        return self._update(batch, stats, start, step)

    def zero_grads(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _update(self, batch: GlobalBatch, stats: LossSums, start: float, step: int) -> StepResult:
        """The update (`clip_and_step`: megatron's ChainedOptimizer.step() with the
        finiteness check between computing the gradient norm and applying anything) and
        the scheduler step; a bad step undoes the latter and zeroes the gradients."""
        optimizer, clip = self.optimizer, self.config.optim.clip_grad
        # lr for update number (applied + 1); undone below if the update does not happen.
        self.scheduler.step(1)
        lr = current_lr(optimizer)
        stepped, grad_norm = clip_and_step(optimizer, clip, math.isfinite(stats.loss))
        bad = not stepped
        if bad:
            self.scheduler.step(-1)
            self.zero_grads()
        metrics_lib.cuda_synchronize()  # the step's kernels are done before the clock stops
        step_time = time.perf_counter() - start
        planner, data_config = self.data.planner, self.config.data
        result = StepResult(
            step=step,
            epoch=batch.epoch,
            loss=stats.loss,
            token_mean_loss=stats.nll_sum / max(stats.num_targets, 1.0),
            target_tokens=int(round(stats.num_targets)),
            real_tokens=batch.real_tokens,
            lr=lr,
            grad_norm=grad_norm,
            skipped=bad,
            step_time=step_time,
            rank_imbalance=batch.imbalance,
            flops=metrics_lib.training_flops(
                self.config.model, metrics_lib.batch_document_lengths(batch, planner.lengths)
            ),
            packing_efficiency=metrics_lib.batch_packing_efficiency(
                batch, data_config.micro_batch_size, data_config.seq_length
            ),
        )
        return result


def count_bad_steps(state: TrainingState, result: StepResult, limit: int, is_rank0: bool) -> None:
    """The bad-step policy: count a skipped step in `state` (said in the log on rank 0),
    and stop the run with NonFiniteTrainingError after `limit` in a row."""
    if not result.skipped:
        state.consecutive_bad_steps = 0
        return
    state.consecutive_bad_steps += 1
    state.skipped_steps += 1
    if is_rank0:
        log.warning(
            "step %d skipped: non-finite loss (%s) or gradient norm (%s); no update "
            "(%d bad step(s) in a row, limit train.max_consecutive_bad_steps=%d)",
            result.step,
            result.loss,
            result.grad_norm,
            state.consecutive_bad_steps,
            limit,
        )
    if state.consecutive_bad_steps >= limit:
        raise NonFiniteTrainingError(
            f"{state.consecutive_bad_steps} consecutive steps (the last: step "
            f"{result.step}, epoch {result.epoch}) had a non-finite loss or gradient "
            f"norm, reaching train.max_consecutive_bad_steps={limit}; the model was "
            "not updated by them. Lower optim.lr, keep optim.clip_grad > 0, check the "
            "data, or raise train.max_consecutive_bad_steps"
        )
