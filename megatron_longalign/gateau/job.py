"""A whole GATEAU scoring job on this process's share of the cluster: join the job
(torchrun/srun or a lone process), build models A and B from their checkpoints at the
requested TP/PP/CP layout, hand each data-parallel replica its balanced shard of the
samples, and merge the scores file on global rank 0 (runner.score_prefix).

Every checkpoint this project writes records its model config (the trainer's, or an
import's), so no model YAML is needed. Both models stay loaded for the whole run: each
batch of samples goes through A, then B, so a killed run never leaves a sample scored
by one model only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from megatron_longalign.config.data import DataConfig
from megatron_longalign.config.model import ModelConfig
from megatron_longalign.config.parallel import ParallelConfig
from megatron_longalign.config.training import LongAlignConfig, TrainConfig
from megatron_longalign.convert.hf_config import recorded_model_config
from megatron_longalign.gateau.merge import MergeSummary
from megatron_longalign.gateau.runner import GateauError, RunOptions, score_prefix
from megatron_longalign.scoring import ScoringEngine
from megatron_longalign.training.checkpoint import read_marker, resolve_checkpoint


@dataclass(frozen=True)
class ScoringJob:
    prefix: str  # the preprocessed set to score
    checkpoint_a: str  # model A: the short-context homologue
    checkpoint_b: str  # model B: the long-context one
    output_dir: str  # shards, run.json, scores.jsonl, summary.json
    seq_length: int = 65536  # tokens per packed micro-batch (a longer sample runs alone)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    probe_layers: tuple[int, ...] | None = None  # None: every layer
    seed: int = 1234
    options: RunOptions = RunOptions()


def checkpoint_model_config(checkpoint: str) -> ModelConfig:
    """The model config a checkpoint records: the trainer's own first (what it trained),
    then an import's."""
    path = resolve_checkpoint(checkpoint)
    model = recorded_model_config(read_marker(path).get("extra", {}))
    if model is None:
        raise GateauError(
            f"checkpoint {path} records no model config; score checkpoints written by this "
            "trainer or by tools/convert_hf.py import"
        )
    return model


def scoring_config(job: ScoringJob, model: ModelConfig) -> LongAlignConfig:
    return LongAlignConfig(
        model=model,
        data=DataConfig(seq_length=job.seq_length),
        parallel=ParallelConfig(
            tensor_model_parallel_size=job.tensor_parallel,
            pipeline_model_parallel_size=job.pipeline_parallel,
            context_parallel_size=job.context_parallel,
        ),
        train=TrainConfig(precision=job.precision, seed=job.seed),
    )


def _layout() -> dict[str, Any]:
    """This rank's place: its data-parallel replica, and whether it writes (one rank
    per replica: every rank of a replica gets the same results)."""
    from megatron.core import parallel_state as ps

    writer = (
        ps.get_tensor_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
        and ps.get_pipeline_model_parallel_rank() == 0
    )
    return {
        "rank": ps.get_data_parallel_rank(),
        "dp_size": ps.get_data_parallel_world_size(),
        "write": writer,
    }


def run_scoring(job: ScoringJob) -> MergeSummary | None:
    """Score `job.prefix`; returns the merge summary on global rank 0, None elsewhere.
    Collective: every process of the job calls it."""
    import torch

    from megatron_longalign.parallel.distributed import initialize_distributed

    # Configs first: a checkpoint without a record fails before any process group.
    models = [checkpoint_model_config(c) for c in (job.checkpoint_a, job.checkpoint_b)]
    configs = [scoring_config(job, model) for model in models]
    initialize_distributed(configs[0].parallel, seed=job.seed)
    engines = [
        ScoringEngine(config, checkpoint, probe_layers=job.probe_layers)
        for config, checkpoint in zip(configs, (job.checkpoint_a, job.checkpoint_b), strict=True)
    ]
    Path(job.output_dir).mkdir(parents=True, exist_ok=True)
    place = _layout()
    # One progress bar for the whole job (every rank of replica 0 has data rank 0).
    options = replace(
        job.options, progress=job.options.progress and torch.distributed.get_rank() == 0
    )
    summary = score_prefix(
        job.prefix,
        engines[0],
        engines[1],
        job.output_dir,
        options=options,
        barrier=torch.distributed.barrier,
        **place,
    )
    return summary  # score_prefix merges on data rank 0's writer: global rank 0
