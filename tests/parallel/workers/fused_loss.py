"""The model's output layer + loss, `chunked` against `standard`, on one (TP, SP) layout.

Feeds the same last hidden states (random, identical on every rank; with --sp the
chunked run gets each TP rank's sequence share, against standard on the whole sequence) and labels to the model's
`_postprocess` twice, once per `loss_impl`, and writes per-token NLL and the full
gradients of sum_t g_t * nll_t (random g_t) for the hidden states, the output weight and,
when tied, the embedding. The pytest side compares the two implementations.

    torchrun --nproc-per-node N fused_loss.py --out DIR --tp N [--sp] [--vocab V]
        [--tied] [--chunk C] [--forget-tp-reduce]

--vocab below a multiple of 64 x TP leaves padded columns; --forget-tp-reduce is the
mutation check: the chunked LSE without its TP all-reduces must disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from megatron_longalign.model import fused_loss
from tests.helpers.tiny_gpt import (
    MODEL,
    gather_full,
    set_deterministic_weights,
    setup,
    tiny_config,
    write_rank_result,
)

SEQ, BATCH = (
    46,
    2,
)  # 92 tokens (even: sequence parallelism splits them over TP 2); chunks of 7 and 64 do not divide it


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--vocab", type=int, default=MODEL.vocab_size)
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--chunk", type=int, default=7)
    parser.add_argument("--forget-tp-reduce", action="store_true")
    return parser.parse_args()


def build(args):
    from megatron.core import parallel_state

    from megatron_longalign.model import build_gpt_model

    config = dataclasses.replace(
        MODEL, vocab_size=args.vocab, tie_word_embeddings=args.tied, loss_chunk_tokens=args.chunk
    )
    model = build_gpt_model(
        config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        transformer_config=tiny_config(),
    )
    set_deterministic_weights(model, 7)
    return model


def run(
    model,
    impl: str,
    hidden_full: torch.Tensor,
    labels: torch.Tensor,
    g: torch.Tensor,
    sp,
    hint=False,
):
    from megatron.core import parallel_state

    model.loss_impl = impl
    # megatron's local layers do not take sequence parallelism (model/backends.py), and its
    # SP output layer has no CPU backward; the loss does. So `chunked` runs with SP on its
    # sequence share, and the reference is `standard` on the whole sequence without SP:
    # the same function of the full hidden states.
    model.config.sequence_parallel = sp
    model.zero_grad(set_to_none=True)
    hidden = hidden_full.clone()
    if sp:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        hidden = hidden.chunk(tp_size, dim=0)[tp_rank].contiguous()
    hidden.requires_grad_(True)
    nll = model._postprocess(
        hidden_states=hidden,
        input_ids=None,
        position_ids=None,
        labels=labels,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        mtp_in_postprocess=False,
        # the loss weights: the chunked loss makes its gradients in forward
        **({"loss_mask": g} if hint else {}),
    )
    (nll * g).sum().backward()
    hidden_grad = hidden.grad
    if sp:  # the full hidden-state gradient, from every rank's sequence share
        parts = [torch.empty_like(hidden_grad) for _ in range(tp_size)]
        torch.distributed.all_gather(
            parts, hidden_grad, group=parallel_state.get_tensor_model_parallel_group()
        )
        hidden_grad = torch.cat(parts, dim=0)
    weight_grads = {
        name: gather_full(param.grad.detach().clone(), param)
        for name, param in model.named_parameters()
        if param.grad is not None  # the output weight, or the tied embedding
    }
    return {"nll": nll.detach(), "hidden_grad": hidden_grad, "weight_grads": weight_grads}


def main() -> None:
    args = parse_args()
    setup(args.tp)
    if args.sp:
        # The CPU shim (parallel/cpu_mode.py) maps megatron's `device=current_device()` to
        # the CPU through a TorchFunctionMode, which autograd's backward does not run
        # under; the sequence-parallel reduce-scatter allocates there. Name the CPU itself.
        torch.cuda.current_device = lambda: torch.device("cpu")
    model = build(args)
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(SEQ, BATCH, MODEL.hidden_size, generator=generator)
    labels = torch.randint(0, args.vocab, (BATCH, SEQ), generator=generator)
    g = torch.rand(BATCH, SEQ, generator=generator)
    result = {"standard": run(model, "standard", hidden, labels, g, sp=False)}
    if args.forget_tp_reduce:
        fused_loss._all_reduce = lambda tensor, op, group: tensor  # the mutation
    result["chunked"] = run(model, "chunked", hidden, labels, g, args.sp)
    result["chunked_hinted"] = run(model, "chunked", hidden, labels, g, args.sp, hint=True)
    write_rank_result(args.out, result)


if __name__ == "__main__":
    main()
