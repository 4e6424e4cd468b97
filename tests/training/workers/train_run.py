"""A few Trainer steps on any (DP, TP, PP) layout; every rank writes rank<R>.json with
the per-step loss, token-mean loss, grad norm and lr for each loss reduction mode.

    torchrun --nproc-per-node N train_run.py --out DIR --data PREFIXES.json \
        [--tp 2] [--pp 2] [--cp 2] [--pad-documents 4] [--modes sequence,token] [--steps 4]

The weights come from tests/parallel's layout-independent initialisation (every tensor
drawn at its full shape from a generator seeded by its global name), so runs on
different TP/PP layouts start from the same model; DP ranks would agree anyway.
Global batch 4 units, micro-batch 1: DP=1 accumulates 4 micro-batches, DP=2 two each.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

from tests.helpers.tiny_training import tiny_training_config

warnings.filterwarnings("ignore")

GLOBAL_BATCH = 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="JSON: name -> prefix")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument(
        "--pad-documents", type=int, default=1, help="data.pad_documents_to_multiple_of"
    )
    parser.add_argument("--modes", default="sequence,token")
    parser.add_argument("--steps", type=int, default=4)
    return parser.parse_args()


def layout_independent_weights(chunks: list[torch.nn.Module]) -> None:
    from tests.helpers.tiny_gpt import set_deterministic_weights

    for chunk in chunks:
        set_deterministic_weights(chunk, seed=7)


def run(args: argparse.Namespace, prefixes: dict[str, str], mode: str) -> dict:
    from megatron_longalign.training.trainer import Trainer

    config = tiny_training_config(
        prefixes,
        max_steps=args.steps,
        global_batch_size=GLOBAL_BATCH,
        micro_batch_size=1,
        loss_reduction=mode,
        tp=args.tp,
        pp=args.pp,
    )
    config.parallel.context_parallel_size = args.cp
    config.data.pad_documents_to_multiple_of = args.pad_documents
    config.data.pad_to_multiple_of = max(args.pad_documents, 2 * args.cp if args.cp > 1 else 1)
    trainer = Trainer(config, init_weights=layout_independent_weights)
    history = trainer.train()
    return {
        "losses": [r.loss for r in history],
        "token_mean_losses": [r.token_mean_loss for r in history],
        "grad_norms": [r.grad_norm for r in history],
        "lrs": [r.lr for r in history],
        "skipped": [r.skipped for r in history],
        "micro_batches": trainer.data.planner.micro_batches_per_rank,
        # The last logged window (log_interval 1: the last step), all ranks reduced.
        "loss_by_len": {
            k: v for k, v in trainer.last_metrics.items() if k.startswith("loss_by_len/")
        },
        "real_tokens": [r.real_tokens for r in history],
        "target_tokens": [r.target_tokens for r in history],
    }


def main() -> None:
    args = parse_args()
    prefixes = json.loads(args.data.read_text())
    # Both modes in one launch: starting the ranks costs more than the steps.
    result = {mode: run(args, prefixes, mode) for mode in args.modes.split(",")}
    from megatron.core import parallel_state

    result.update(
        rank=torch.distributed.get_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        cp_size=parallel_state.get_context_parallel_world_size(),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{result['rank']}.json").write_text(json.dumps(result))
    from megatron_longalign.parallel.distributed import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main()
