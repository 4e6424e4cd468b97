"""Validation (Trainer.validate) of the same weights at several layouts, one after the
other in one launch (starting ranks costs more than validating); every rank writes
rank<R>.json with each layout's validation metrics.

    torchrun --nproc-per-node 2 valid_run.py --out DIR --data PREFIXES.json \
        [--layouts tp2,pp2,cp2,dp2] [--valid-fraction 0.25] [--mode sequence]

The weights are tests/parallel's layout-independent initialisation (every tensor drawn
at its full shape from a generator seeded by its global name), so every layout holds the
same model. Between layouts only megatron's model-parallel groups are rebuilt; the
default process group stays.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

from tests.helpers.tiny_training import tiny_training_config

warnings.filterwarnings("ignore")

# name -> (tp, pp, cp) on two processes; what is left is DP.
LAYOUTS = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "cp2": (1, 1, 2), "dp2": (1, 1, 1)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="JSON: name -> prefix")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--valid-fraction", type=float, default=0.25)
    parser.add_argument("--mode", default="sequence")
    return parser.parse_args()


def layout_independent_weights(chunks: list[torch.nn.Module]) -> None:
    from tests.helpers.tiny_gpt import set_deterministic_weights

    for chunk in chunks:
        set_deterministic_weights(chunk, seed=7)


def validation_config(prefixes: dict[str, str], tp: int, pp: int, cp: int, args):
    """The config the pytest side also validates in-process on one rank."""
    config = tiny_training_config(
        prefixes,
        max_steps=1,
        global_batch_size=4,
        micro_batch_size=1,
        loss_reduction=args.mode,
        tp=tp,
        pp=pp,
    )
    config.data.valid_fraction = args.valid_fraction
    config.parallel.context_parallel_size = cp
    if cp > 1:  # every document in 2 x CP chunks: padded documents, other packs
        config.data.pad_documents_to_multiple_of = 2 * cp
        config.data.pad_to_multiple_of = 2 * cp
    return config


def validate(prefixes: dict[str, str], name: str, args) -> dict:
    from megatron.core import parallel_state

    from megatron_longalign.training.trainer import Trainer

    tp, pp, cp = LAYOUTS[name]
    trainer = Trainer(
        validation_config(prefixes, tp, pp, cp, args), init_weights=layout_independent_weights
    )
    metrics = trainer.validate()
    result = {
        "metrics": metrics,
        "dp_size": parallel_state.get_data_parallel_world_size(),
        "layout": [
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size(),
        ],
        "batches": len(trainer.validator.data.batches),
        "micro_batches": trainer.validator.data.data.planner.micro_batches_per_rank,
    }
    parallel_state.destroy_model_parallel()  # the next layout builds its own groups
    return result


def main() -> None:
    args = parse_args()
    prefixes = json.loads(args.data.read_text())
    results = {name: validate(prefixes, name, args) for name in args.layouts.split(",")}
    rank = torch.distributed.get_rank()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, **results}))
    from megatron_longalign.parallel.distributed import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main()
