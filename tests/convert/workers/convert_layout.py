"""torchrun worker (TP=2, or PP=2 with --pp 2): load checkpoints imported at TP=1 into a
TP=2 model and compute logits; import HF directories directly in this layout (each rank
reads only its slices / its stage's layers) and, at PP=1, compute logits from those too.
Writes rank<R>.json with the max |diff| against the HF reference logits the pytest side
saved.

    --spec spec.json: {"load": [{"name", "root", "model_config", "reference"}],
                       "import": [{"name", "hf_dir", "output", "reference"}]}
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def gathered_logits(model, inputs: dict, vocab: int) -> dict[str, torch.Tensor]:
    """Logits over the real vocab: the TP ranks' vocab shards, concatenated."""
    from megatron.core import parallel_state as ps

    from tests.convert.conftest import megatron_logits

    group = ps.get_tensor_model_parallel_group()
    out = {}
    for kind, local in megatron_logits(model, inputs).items():
        parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(parts, local.contiguous(), group=group)
        full = torch.cat(parts, dim=-1)
        out[kind] = full
        out[kind + "_padding_nonzero"] = torch.count_nonzero(full[:, vocab:])
        out[kind] = full[:, :vocab]
    return out


def compare(model, reference_path: str, vocab: int) -> dict[str, float]:
    reference = torch.load(reference_path, weights_only=True)
    ours = gathered_logits(model, reference["inputs"], vocab)
    return {
        "plain": (ours["plain"] - reference["plain"]).abs().max().item(),
        "packed": (ours["packed"] - reference["packed"]).abs().max().item(),
        "padding_nonzero": int(ours["plain_padding_nonzero"] + ours["packed_padding_nonzero"]),
        "padded_vocab": int(ours["plain"].shape[-1] + 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())

    from megatron_longalign.config.parallel import ParallelConfig
    from megatron_longalign.convert.hf_config import model_config_from_dict
    from megatron_longalign.convert.hf_import import import_hf_checkpoint
    from megatron_longalign.parallel.distributed import initialize_distributed
    from tests.convert.conftest import load_checkpoint

    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp
    )
    initialize_distributed(parallel, seed=0, cpu=True)
    results = {}
    for item in spec["load"]:
        config = model_config_from_dict(item["model_config"])
        model = load_checkpoint(Path(item["root"]), config)
        results["load/" + item["name"]] = compare(model, item["reference"], config.vocab_size)
    for item in spec["import"]:
        result = import_hf_checkpoint(item["hf_dir"], item["output"], dtype="fp32", progress=False)
        config = result.model_config
        if args.pp == 1:  # logits of a pipeline need the schedule; PP compares tensors
            model = load_checkpoint(result.output, config)
            results["import/" + item["name"]] = compare(model, item["reference"], config.vocab_size)
    rank = torch.distributed.get_rank()
    (args.out / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
