"""The attention probe through the tiny model on one packed micro-batch, on any (TP, CP)
layout (sdpa backend, gloo, CPU), forward only under torch.no_grad(). Writes the probe's
result for every layer and for the layer subset (2,), reduced over the TP and CP groups,
so every rank holds the whole answer.

Each sample's measured rows are its ASSISTANT tokens and its CONTEXT region is cut into
two segments; the request is placed on the micro-batch's token layout (documents padded
to 2 * CP under CP, unpadded at CP 1), which is what the scoring engine will do. The CP 1
run of this worker is the reference.

    torchrun --nproc-per-node N attention_probe.py --out DIR --cp 2 [--tp 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from megatron_longalign.config.parallel import ParallelConfig
from megatron_longalign.data.indexed import SFTSample
from megatron_longalign.data.microbatch import MicroBatchBuilder, shard_for_context_parallel
from megatron_longalign.data.planner import MicroBatchPlan
from megatron_longalign.model.attention_probe import AttentionProbe, ProbeRequest, attach_probe
from megatron_longalign.parallel.distributed import initialize_distributed
from tests.helpers.tiny_gpt import (
    build_model,
    samples_from_regions,
    tiny_config,
    write_rank_result,
)

TEMPLATE, USER, ASSISTANT, CONTEXT = 0, 2, 3, 4
# Odd lengths (CP pads them); the third sample has no context (no segment), the fourth
# no answer (its segments are NaN).
SAMPLES = [
    [(TEMPLATE, 1), (CONTEXT, 13), (USER, 4), (ASSISTANT, 9)],
    [(CONTEXT, 20), (USER, 3), (ASSISTANT, 7), (USER, 2), (ASSISTANT, 5)],
    [(USER, 3), (ASSISTANT, 4)],
    [(TEMPLATE, 1), (CONTEXT, 9), (USER, 3)],
]


def samples() -> list[SFTSample]:
    return samples_from_regions(SAMPLES, seed=5)


def request(data: list[SFTSample], layout: np.ndarray, layers) -> ProbeRequest:
    """ASSISTANT tokens measured; each CONTEXT region halved into two segments."""
    mask = np.zeros(int(layout[-1]), dtype=bool)
    segments = np.full(int(layout[-1]), -1, dtype=np.int32)
    next_id = 0
    for sample, start in zip(data, layout[:-1], strict=False):
        for lo, hi, kind in sample.regions.tolist():
            if kind == ASSISTANT:
                mask[start + lo : start + hi] = True
            if kind == CONTEXT:
                middle = (lo + hi) // 2
                segments[start + lo : start + middle] = next_id
                segments[start + middle : start + hi] = next_id + 1
                next_id += 2
    return ProbeRequest(mask, segments, next_id, layers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--cp", type=int, required=True)
    args = parser.parse_args()
    initialize_distributed(
        ParallelConfig(tensor_model_parallel_size=args.tp, context_parallel_size=args.cp),
        seed=1234,
        cpu=True,
    )
    from megatron.core import parallel_state

    from megatron_longalign.model import model_inputs

    overrides = {"context_parallel_size": args.cp}
    if args.cp > 1:
        overrides["cp_comm_type"] = "p2p"
    model = build_model(tiny_config(**overrides)).eval()
    data = samples()
    multiple = 2 * args.cp if args.cp > 1 else 1
    builder = MicroBatchBuilder(
        data.__getitem__, pad_to_multiple_of=multiple, document_multiple=multiple
    )
    whole = builder.build(MicroBatchPlan(np.arange(len(data)), np.ones(len(data))), epoch=0)
    cp_rank = parallel_state.get_context_parallel_rank()
    inputs = model_inputs(shard_for_context_parallel(whole, args.cp, cp_rank))
    inputs.pop("labels")
    groups = [parallel_state.get_tensor_model_parallel_group()]
    groups.append(parallel_state.get_context_parallel_group())
    result = {"cp_rank": cp_rank, "layout": whole.layout_cu_seqlens.tolist()}
    for name, layers in (("all", None), ("layer2", (2,))):
        probe = AttentionProbe(request(data, whole.layout_cu_seqlens, layers), key_chunk=8)
        with torch.no_grad(), attach_probe([model], probe):
            model(**inputs)
        result[name] = probe.result(groups).tolist()
    write_rank_result(args.out, result)


if __name__ == "__main__":
    main()
