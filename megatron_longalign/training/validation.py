"""Validation during training: the training model, forward only, over the validation
set (data/train_data.py `ValidationData`: data.valid_sources or the held-out
data.valid_fraction of the training sources).

It runs the training's own forward path (step.py `run_micro_batches` with
`MicroBatchForward`: megatron's forward_backward_func, `forward_only=True`, the same
`loss_func`), so it works at every TP / PP / CP / DP layout the training does, under
`torch.no_grad()` with the model chunks in eval mode. Nothing of the training changes:
no gradient is touched, no optimizer or scheduler step runs, the validation plan is its
own (training's data position and consumed samples are not read), and every RNG state is
restored afterwards (training/checkpoint.py `capture_rng_state`).

The reported values (docs/TRAINING.md "Validation"), over all validation batches run:
- `valid/loss`: train.loss_reduction over the whole set, as the set's loss weights give
  it (`weighted_as_one_set`): sequence -> the mean over validation sequences of each
  sequence's mean target-token NLL; token -> sum NLL / target tokens; sqrt -> sum_i
  sqrt(N_i) * mean_i / sum_i sqrt(N_i). It does not depend on how the set is cut into
  global batches, micro-batches or ranks;
- `valid/token_loss`: sum NLL / target tokens;
- `valid/sequences`, `valid/target_tokens`: what they were computed over;
- `valid/loss_by_len/<bucket>`: metrics.LossByLength over the set.
"""

from __future__ import annotations

import logging

import torch

from megatron_longalign.config.training import LongAlignConfig
from megatron_longalign.data.train_data import ValidationData
from megatron_longalign.training import metrics as metrics_lib
from megatron_longalign.training.checkpoint import capture_rng_state, restore_rng_state
from megatron_longalign.training.step import LossSums, MicroBatchForward, run_micro_batches

log = logging.getLogger("megatron_longalign.train")


def is_validation_step(step: int, interval: int | None, last_step: int) -> bool:
    """Validate after `step`: every `interval` steps (0/None: never in between) and at
    `last_step`, the end of the run."""
    if step <= 0:
        return False
    return step >= last_step or bool(interval) and step % interval == 0


class Validator:
    """Runs the validation set through the model chunks (under DDP) forward only.
    `run()` is collective over every rank of the job."""

    def __init__(
        self,
        config: LongAlignConfig,
        data: ValidationData,
        model: list[torch.nn.Module],
        device: torch.device,
    ) -> None:
        self.config = config
        self.data = data
        self.model = model
        self.device = device

    def run(self) -> dict[str, float]:
        """The validation metrics (identical on every rank)."""
        loss_by_length = metrics_lib.LossByLength()
        forward = MicroBatchForward(self.device, self.data.data.planner.lengths, loss_by_length)
        totals = LossSums()
        rng = capture_rng_state()
        modes = [chunk.training for chunk in self.model]
        try:
            for chunk in self.model:
                chunk.eval()
            with torch.no_grad():
                for batch in self.data.batches:
                    micro_batches = self.data.micro_batches(batch)
                    totals += run_micro_batches(
                        self.model, micro_batches, forward, forward_only=True
                    )
        finally:
            for chunk, mode in zip(self.model, modes, strict=True):
                chunk.train(mode)
            restore_rng_state(rng)
        # Every rank's documents (non-last pipeline stages add zeros; TP duplicates scale
        # sums and counts alike, so the means are right).
        loss_by_length.all_reduce()
        return metrics_lib.validation_metrics(
            loss=totals.loss,
            nll_sum=totals.nll_sum,
            num_targets=totals.num_targets,
            num_sequences=self.data.num_sequences,
            loss_by_len=loss_by_length.means(),
        )

    def describe(self) -> str:
        """One line for the start-up log."""
        data, train = self.data, self.config.train
        source = (
            ", ".join(s.prefix for s in self.config.data.valid_sources)
            or f"{self.config.data.valid_fraction:g} of the training sources (held out)"
        )
        when = f"every {train.eval_interval} steps and " if train.eval_interval else ""
        return (
            f"validation: {data.num_samples} samples ({data.num_sequences} with targets) in "
            f"{len(data.batches)} of {data.available_batches} global batches from {source}; "
            f"{when}at the end of the run, loss reduction {train.loss_reduction}"
        )
