"""One training forward/backward of a tiny LongAlignGPTModel on packed micro-batches,
on any (TP, PP, CP) layout, in `token` and `sequence` loss modes. Writes, per mode:
per-document weighted loss and unweighted nll sums (summed over the CP group), the
micro-batch losses and target counts of this rank, and the full gradient of the
objective sum_t w_t * nll_t (TP and CP rank 0 of every stage).

The data exercises what breaks CP with packing: a document shorter than 2 * CP tokens,
odd lengths, a micro-batch whose only target lands on one CP rank (the others hold no
target at all), and SkipAlign position ids (skips at region boundaries).

The CP = 1 run of this same worker, with unpadded documents, is the reference.

    torchrun --nproc-per-node N context_parallel.py --out DIR --cp 2 [--tp 2] [--pp 2]
        [--backend sdpa|flex|flash|te] [--forward-only]

`sdpa` trains on CPU (gloo); `flex` has no CPU backward, so use --forward-only there;
`flash` runs its CP path on CPU with flash-attn replaced by the stand-in
(tests/helpers/flash_standin.py, behind the real import seam);
`te` runs on CUDA GPUs (NCCL) in bf16 with Transformer Engine's own CP attention.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path

import numpy as np
import torch

from megatron_longalign.config.data import SkipAlignConfig
from megatron_longalign.config.model import ModelConfig
from megatron_longalign.config.parallel import ParallelConfig
from megatron_longalign.data.indexed import SFTSample
from megatron_longalign.data.microbatch import MicroBatchBuilder, shard_for_context_parallel
from megatron_longalign.data.planner import MicroBatchPlan
from megatron_longalign.data.weights import per_token_weights
from megatron_longalign.model.config import to_transformer_config
from megatron_longalign.parallel.distributed import initialize_distributed
from megatron_longalign.training.loss import NLL_SUM, NUM_TARGETS, loss_func
from tests.helpers import flash_standin
from tests.helpers.tiny_gpt import (
    build_ddp_model,
    full_tensors,
    samples_from_regions,
    unwrap,
    write_rank_result,
)
from tests.helpers.tiny_model import tiny_model_config

TEMPLATE, USER, ASSISTANT, CONTEXT = 0, 2, 3, 4
# (region kind, length) per sample; lengths chosen odd, and one sample (2 tokens) shorter
# than 2 * CP for CP >= 2.
SAMPLES = [
    [(TEMPLATE, 1), (CONTEXT, 13), (USER, 4), (ASSISTANT, 9)],  # 27
    [(TEMPLATE, 1), (USER, 1)],  # 2 tokens, no target
    [(TEMPLATE, 1), (CONTEXT, 20), (USER, 3), (ASSISTANT, 7), (USER, 2), (ASSISTANT, 8)],  # 41
    [(USER, 1), (ASSISTANT, 1)],  # 2 tokens, one target: on CP rank 0 only
    [(TEMPLATE, 1), (USER, 5), (ASSISTANT, 3)],  # 9
    [(CONTEXT, 30), (USER, 2), (ASSISTANT, 15)],  # 47
]
# Micro-batches of this rank (no DP here): the second holds only the 2-token document,
# so CP ranks other than 0 get a micro-batch without any target token.
PLANS = [[0, 1, 2], [3], [4, 5]]
MODES = ("token", "sequence")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True, help="directory for rank*.json")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cp", type=int, required=True)
    parser.add_argument("--backend", default="sdpa", choices=("sdpa", "flex", "flash", "te"))
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--loss-impl", default=None, choices=("chunked", "standard"))
    return parser.parse_args()


def model_config(backend: str = "sdpa") -> ModelConfig:
    return tiny_model_config(
        name="cp-test",
        num_layers=4,  # 2 per stage at PP 2
        vocab_size=512,
        make_vocab_size_divisible_by=64,  # 512 at TP 1 and 2: the same softmax
        attention_backend=backend,
    )


def samples() -> list[SFTSample]:
    return samples_from_regions(SAMPLES, seed=3)


def micro_batches(cp: int, mode: str):
    """Whole micro-batches (documents padded to 2 * CP when CP > 1) and their weights
    from the global batch (all plans)."""
    data = samples()
    counts = np.array([int(s.loss_mask[1:].sum()) for s in data])
    weights = per_token_weights(counts, mode)
    multiple = 2 * cp if cp > 1 else 1
    builder = MicroBatchBuilder(
        data.__getitem__,
        pad_to_multiple_of=multiple,
        document_multiple=multiple,
        # Short samples with skips of up to 4096 - length: positions far past the lengths.
        skipalign=SkipAlignConfig(enabled=True, target_context_length=4096),
        seed=17,
    )
    return [builder.build(MicroBatchPlan(np.array(plan), weights[plan]), epoch=0) for plan in PLANS]


def build(cp: int, backend: str, device: torch.device):
    from megatron.core import parallel_state

    # TE's packed CP attention needs fp16/bf16; the CPU backends run fp32.
    dtype = torch.bfloat16 if backend == "te" else torch.float32
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    overrides = dict(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        calculate_per_token_loss=True,
        use_cpu_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        variable_seq_lengths=pp > 1,
    )
    if cp > 1:
        overrides["cp_comm_type"] = "p2p"
    if pp > 1:
        overrides["moe_token_dispatcher_type"] = "alltoall"
    config = model_config(backend)
    transformer_config = to_transformer_config(config, **overrides)
    # The trainer's build_model: DDP with SUM, finalize_grads_as_sum (and, in bf16,
    # megatron's Float16Module, as in training).
    return build_ddp_model(transformer_config, 7, model_config=config, device=device)


def per_document_sums(mb, token_nll: torch.Tensor) -> torch.Tensor:
    """[D, 2]: (sum w * nll, sum nll over targets) of each real document, summed over
    the CP group (each rank holds a share of every document)."""
    from megatron.core import parallel_state

    nll = token_nll.detach().reshape(-1).double()
    weights = torch.as_tensor(mb.loss_weights, dtype=torch.float64, device=nll.device)
    bounds = mb.local_document_bounds
    sums = torch.zeros(mb.sample_ids.size, 2, dtype=torch.float64, device=nll.device)
    for doc in range(mb.sample_ids.size):
        lo, hi = int(bounds[doc]), int(bounds[doc + 1])
        sums[doc, 0] = (weights[lo:hi] * nll[lo:hi]).sum()
        sums[doc, 1] = torch.where(weights[lo:hi] > 0, nll[lo:hi], 0.0).sum()
    if mb.cp_size > 1:
        torch.distributed.all_reduce(sums, group=parallel_state.get_context_parallel_group())
    return sums


def run_mode(model, cp: int, mode: str, device: torch.device, forward_only: bool) -> dict:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_longalign.model import model_inputs

    cp_rank = parallel_state.get_context_parallel_rank()
    batches = [shard_for_context_parallel(mb, cp, cp_rank) for mb in micro_batches(cp, mode)]
    documents: list[list[list[float]]] = []

    def forward_step(data_iterator, model_chunk):
        mb = next(data_iterator)
        output = model_chunk(**model_inputs(mb, device))
        weights = torch.as_tensor(mb.loss_weights, device=device)

        def loss(token_nll):
            documents.append(per_document_sums(mb, token_nll).tolist())
            return loss_func(weights, token_nll)

        return output, loss

    model.zero_grad_buffer()
    # forward_only does not stop autograd from recording (flex has no CPU backward).
    with torch.set_grad_enabled(not forward_only):
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=max(mb.num_tokens for mb in batches),
            micro_batch_size=1,
            forward_only=forward_only,
        )
    result = {
        "documents": documents,
        "losses": [float(r["loss"]) for r in reports],
        "targets": [float(r[NUM_TARGETS]) for r in reports],
        "nll_sums": [float(r[NLL_SUM]) for r in reports],
        "positions_max": [int(mb.position_ids.max()) for mb in batches],
        "tokens_held": [mb.num_tokens for mb in batches],
    }
    if forward_only:
        return result
    grads = {k: g.float().cpu() for k, g in full_tensors(unwrap(model), "main_grad").items()}
    result["grads_finite"] = all(math.isfinite(float(g.abs().sum())) for g in grads.values())
    if parallel_state.get_tensor_model_parallel_rank() == 0 and cp_rank == 0:
        result["grads"] = grads
    return result


def main() -> None:
    args = parse_args()
    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        context_parallel_size=args.cp,
    )
    on_gpu = args.backend == "te"
    initialize_distributed(parallel, seed=1234, cpu=not on_gpu)
    from megatron.core import parallel_state

    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    # flash: the model resolves and imports flash-attn through the real seam.
    with flash_standin.installed() if args.backend == "flash" else contextlib.nullcontext():
        model = build(args.cp, args.backend, device)
        if args.loss_impl:
            unwrap(model).loss_impl = args.loss_impl
        result = {mode: run_mode(model, args.cp, mode, device, args.forward_only) for mode in MODES}
    result["cp_rank"] = parallel_state.get_context_parallel_rank()
    write_rank_result(args.out, result)


if __name__ == "__main__":
    main()
