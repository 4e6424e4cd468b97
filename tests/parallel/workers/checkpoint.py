"""Save and load the tiny GPT's sharded state dict with checkpoint_io.

--action save: build the model (weight seed 7), save it, then load the checkpoint into
    a second model built with other weights (seed 8) in the same layout. Writes the full
    saved and loaded weights.
--action load: build a model with seed-8 weights in this layout, load the checkpoint
    (resharding if the layout differs) and write the full loaded weights.
"""

from __future__ import annotations

from pathlib import Path

from megatron_longalign.training.checkpoint_io import load_sharded, save_sharded
from tests.helpers.tiny_gpt import (
    build_model,
    full_tensors,
    parse_args,
    setup,
    tiny_config,
    write_rank_result,
)

SAVED_SEED = 7
OTHER_SEED = 8


def load_into_fresh_model(directory: Path):
    model = build_model(tiny_config(), weight_seed=OTHER_SEED)
    state = load_sharded(model.sharded_state_dict(), directory)
    model.load_state_dict(state)
    return model


def main() -> None:
    args = parse_args({"action": str, "ckpt": Path})
    setup(args.tp, args.pp)
    result = {}
    if args.action == "save":
        model = build_model(tiny_config(), weight_seed=SAVED_SEED)
        save_sharded(model.sharded_state_dict(), args.ckpt)
        result["saved"] = full_tensors(model)
    result["loaded"] = full_tensors(load_into_fresh_model(args.ckpt))
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_rank() != 0:
        result = {}  # TP rank 0 holds the gathered full tensors of its stage
    write_rank_result(args.out, result)


if __name__ == "__main__":
    main()
