"""torchrun worker: score documents with the ScoringEngine at the layout given (TP, CP,
PP) from a checkpoint imported at TP = 1, and write rank<R>.json with every document's
key, per-token NLL (NaN as null) and attention mass (null when not probed), in the
order score() returned them.

    --spec spec.json: {"checkpoint", "model_config", "documents": [{"key", "tokens",
                       "loss_mask", "position_ids", optional "probe_query_mask",
                       "probe_segments", "num_segments"}], "tp", "cp", "pp"}
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--spec", type=Path, required=True)
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())

    from megatron_longalign.convert.hf_config import model_config_from_dict
    from megatron_longalign.parallel.distributed import initialize_distributed
    from megatron_longalign.scoring import ScoringDocument, ScoringEngine
    from tests.scoring.conftest import scoring_config

    config = scoring_config(
        model_config_from_dict(spec["model_config"]), tp=spec["tp"], cp=spec["cp"], pp=spec["pp"]
    )
    initialize_distributed(config.parallel, seed=0, cpu=True)
    documents = [
        ScoringDocument(
            d["key"],
            np.array(d["tokens"], dtype=np.int64),
            np.array(d["loss_mask"], dtype=bool),
            None if d["position_ids"] is None else np.array(d["position_ids"], dtype=np.int64),
            None if d.get("probe_query_mask") is None else np.array(d["probe_query_mask"], bool),
            None if d.get("probe_segments") is None else np.array(d["probe_segments"], np.int32),
            d.get("num_segments", 0),
        )
        for d in spec["documents"]
    ]
    engine = ScoringEngine(config, spec["checkpoint"])
    results = engine.score(documents)
    out = [
        {
            "key": r.key,
            "nll": [None if np.isnan(x) else float(x) for x in r.token_nll],
            "mass": None if r.attention_mass is None else r.attention_mass.tolist(),
        }
        for r in results
    ]
    rank = torch.distributed.get_rank()
    (args.out / f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
