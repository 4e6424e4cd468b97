"""Packed THD micro-batches through megatron's pipeline schedule, and every document
alone, on the tiny LongAlignGPTModel (sdpa backend, 4 layers).

PP = 2 (two ranks, the layout under test), per rank:
- `packed`: the packed micro-batches through `get_forward_backward_func` with
  forward_only=False, so activations go forward and their gradients go back across
  the stage boundary. The last stage writes each document's per-token losses; TP rank
  0 of each stage writes main_grad, the gradient of the summed token losses.
- `alone_pp`: the same schedule, but every document is its own micro-batch
  (cu_seqlens [0, L]).
- `leaky`: forward only, the packed micro-batches with cu_seqlens [0, T], i.e. one
  causal sequence per pack. The test requires it to miss the reference by far more
  than its tolerance, so a tolerance or weight change cannot quietly make the
  comparison blind to a boundary leak.

PP = 1 (one rank, the independent reference): every document alone, one plain
autograd forward/backward each on a single-stage model, with no schedule, no p2p and
no DDP; `.grad` accumulates the gradient of the summed token losses.

Loss path (as in fwd_bwd.py, the package's own code): calculate_per_token_loss=True with
the trainer's 3-tuple `loss_func` at weight 1 per token (the summed token losses), and
the trainer's DDP wrapping (SUM, `finalize_grads_as_sum`), so main_grad is exactly
d(sum of every token loss of every micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_longalign.model.config import to_transformer_config
from megatron_longalign.model.gpt import build_gpt_model, packed_seq_params_from
from megatron_longalign.training.loss import loss_func
from tests.helpers.tiny_gpt import (
    build_ddp_model,
    full_tensors,
    parse_args,
    set_deterministic_weights,
    setup,
    write_rank_result,
)
from tests.helpers.tiny_model import tiny_model_config

WEIGHT_SEED = 11
DATA_SEED = 5

MODEL = tiny_model_config(
    name="tiny-pp",
    num_layers=4,  # 2 layers per stage at PP = 2
    vocab_size=512,
    make_vocab_size_divisible_by=64,
    max_position_embeddings=256,
)


def _skip(*segments: tuple[int, int]) -> list[int]:
    """SkipAlign positions: contiguous inside each [start, end) segment, jumps between."""
    return [p for start, end in segments for p in range(start, end)]


# Each pack is one micro-batch; the packs differ in length, so the stages exchange
# shapes (variable_seq_lengths). A document is (name, position ids); its length is the
# number of positions. Odd lengths, 1- and 2-token documents (a 1-token document
# attends only to itself, so any leak from the previous document shows at once), a
# 1-token document first and last in a pack, and positions that are not 0..L-1.
PACKS: list[list[tuple[str, list[int]]]] = [
    [
        ("a7", list(range(7))),
        ("b1", [0]),
        ("c13", list(range(13))),
        ("d2", [0, 1]),
    ],
    [
        ("e1", [0]),
        ("skip21", _skip((0, 10), (40, 51))),  # SkipAlign: 0..9 then 40..50
        ("f5", list(range(5))),
    ],
    [
        ("g3", list(range(3))),
        ("shift9", list(range(17, 26))),  # a PoSE-style offset segment
        ("skip11", _skip((0, 3), (8, 12), (30, 34))),
        ("h1", [0]),
    ],
]


@dataclass
class Document:
    name: str
    tokens: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64: the next token, as in SFT data
    positions: torch.Tensor  # [L] int64


@dataclass
class MicroBatch:
    documents: list[Document]
    cu_seqlens: list[int]  # what the model is told; [0, L_1, ...] unless leaky

    def inputs(self) -> dict:
        """Model keyword arguments, THD: [1, T] rows and packed_seq_params. A fresh
        PackedSeqParams per call (the attention backend caches per-object state)."""

        def row(key: str) -> torch.Tensor:
            return torch.cat([getattr(doc, key) for doc in self.documents])[None]

        cu = torch.tensor(self.cu_seqlens, dtype=torch.int32)
        return {
            "input_ids": row("tokens"),
            "position_ids": row("positions"),
            "labels": row("labels"),
            "packed_seq_params": packed_seq_params_from(cu, int((cu[1:] - cu[:-1]).max())),
        }

    @property
    def num_tokens(self) -> int:
        return sum(doc.tokens.numel() for doc in self.documents)


def make_documents() -> list[list[Document]]:
    """PACKS with random token ids: a document of length L is L + 1 random ids, tokens
    the first L and labels the last L."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    packs = []
    for pack in PACKS:
        documents = []
        for name, positions in pack:
            ids = torch.randint(0, MODEL.vocab_size, (len(positions) + 1,), generator=generator)
            documents.append(Document(name, ids[:-1], ids[1:], torch.tensor(positions)))
        packs.append(documents)
    return packs


def packed(documents: list[Document]) -> MicroBatch:
    lengths = [doc.tokens.numel() for doc in documents]
    return MicroBatch(documents, [0, *torch.tensor(lengths).cumsum(0).tolist()])


def leaky(documents: list[Document]) -> MicroBatch:
    """The pack with its document boundaries dropped: what a boundary bug looks like."""
    total = sum(doc.tokens.numel() for doc in documents)
    return MicroBatch(documents, [0, total])


def document_losses(micro_batch: MicroBatch, token_losses: torch.Tensor) -> dict[str, list]:
    """Per-token losses [1, T] of a micro-batch, split by its real documents."""
    result, start = {}, 0
    for doc in micro_batch.documents:
        end = start + doc.tokens.numel()
        result[doc.name] = token_losses[0, start:end].tolist()
        start = end
    return result


# ---------------------------------------------------------------- PP = 1 reference


def plain_reference(packs: list[list[Document]]) -> dict:
    """Every document alone through a single-stage model with plain autograd."""
    model = build_gpt_model(
        MODEL, transformer_config=to_transformer_config(MODEL, use_cpu_initialization=True)
    )
    set_deterministic_weights(model, WEIGHT_SEED)
    losses = {}
    for documents in packs:
        for doc in documents:
            micro_batch = packed([doc])  # cu_seqlens [0, L]
            token_losses = model(**micro_batch.inputs())
            token_losses.sum().backward()  # .grad accumulates over documents
            losses.update(document_losses(micro_batch, token_losses.detach()))
    return {"alone_plain": losses, "grads": full_tensors(model, "grad")}


# ---------------------------------------------------------------- PP = 2 runs


def forward_step(data_iterator, model):
    micro_batch = next(data_iterator)
    token_losses = model(**micro_batch.inputs())

    def summed_loss(output: torch.Tensor):
        loss, num_tokens, report = loss_func(torch.ones_like(output), output)
        return loss, num_tokens, {**report, "losses": document_losses(micro_batch, output.detach())}

    return token_losses, summed_loss


def run_schedule(model, micro_batches: list[MicroBatch], forward_only: bool) -> dict:
    """Per-document token losses (last stage only; {} elsewhere) of one schedule run."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        # Only a placeholder with variable_seq_lengths: the stages send shapes first.
        seq_length=max(mb.num_tokens for mb in micro_batches),
        micro_batch_size=1,  # THD: one packed row per micro-batch
        forward_only=forward_only,
    )
    losses = {}
    for report in reports:
        losses.update(report["losses"])
    return losses


def pipeline_runs(packs: list[list[Document]]) -> dict:
    from megatron.core import parallel_state

    config = to_transformer_config(
        MODEL,
        use_cpu_initialization=True,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        # The trainer's overrides for PP (training/trainer.py build_transformer_config).
        calculate_per_token_loss=True,
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,  # the dtype of what the stages send each other
    )
    model = build_ddp_model(config, WEIGHT_SEED, model_config=MODEL)

    result = {}
    # Each document alone first, so the packed gradient is the one left in main_grad.
    alone = [packed([doc]) for documents in packs for doc in documents]
    result["alone_pp"] = run_schedule(model, alone, forward_only=False)
    alone_grads = full_tensors(model.module, "main_grad")
    result["leaky"] = run_schedule(model, [leaky(d) for d in packs], forward_only=True)
    result["packed"] = run_schedule(model, [packed(d) for d in packs], forward_only=False)
    grads = full_tensors(model.module, "main_grad")
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        result.update(grads=grads, alone_pp_grads=alone_grads)
    return result


def main() -> None:
    args = parse_args()
    setup(args.tp, args.pp)
    packs = make_documents()
    # One rank: the independent reference; two: the pipeline under test.
    result = plain_reference(packs) if args.pp == 1 else pipeline_runs(packs)
    result["documents"] = [[doc.name for doc in documents] for documents in packs]
    write_rank_result(args.out, result)


if __name__ == "__main__":
    main()
