"""Hugging Face checkpoint directory -> this trainer's checkpoint (torch_dist, any
TP/PP layout on load).

Output layout (a CheckpointManager root, so `train.init_from=<output>` takes it):

    <output>/latest, <output>/step_00000000/    the checkpoint (model only)
    <output>/conf/model/<name>.yaml             Hydra model config
    <output>/hf_source.json                     where it came from (also in the marker)

Collective: every rank of the current megatron layout calls `import_hf_checkpoint`;
each builds its own pipeline stage (uninitialised), fills only its TP slice of every
parameter with `HFCheckpointReader.read(rows, cols)` (safetensors `get_slice`, or a
memory-mapped .bin), and CheckpointManager.save writes the ShardedTensors with global
shapes and offsets. Peak memory per rank: its parameters in `dtype` plus one HF slice
(at most one whole HF tensor, in the file's dtype).

Vocab padding: megatron pads the vocab to padded_vocab_size(TP) rows. Those rows are
zero in both the embedding and the output layer. Zero output rows give padded logits
of exactly 0: the real vocab's logits equal HF's, but megatron's cross entropy runs
over all padded_vocab columns, so the loss is logsumexp([z, 0 x P]) - z_label >= HF's
(see docs/HF_CONVERSION.md). Zero is also what megatron loads into rows a checkpoint
does not have (allow_shape_mismatch), so every TP layout agrees.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_longalign.config.model import ModelConfig
from megatron_longalign.convert.errors import ConversionError
from megatron_longalign.convert.hf_config import config_from_hf, model_type_of, model_yaml
from megatron_longalign.convert.hf_names import (
    IGNORABLE_SUFFIXES,
    TensorMap,
    hf_tensor_shapes,
    local_ranges,
    tensor_maps,
)
from megatron_longalign.convert.hf_reader import HFCheckpointReader
from megatron_longalign.convert.model_io import (
    DTYPES,
    agree_on_error,
    atomic_directory,
    build_stage_model,
    check_output_free,
    error_of,
    global_parameters,
    is_rank0,
    tp_rank_size,
)
from megatron_longalign.parallel.distributed import rank0_then_broadcast

SOURCE_FILE = "hf_source.json"
# Files copied on export when present next to the weights (tokenizer and generation).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class ImportPlan:
    """What an import will do, checked before anything is written."""

    hf_dir: Path
    hf_config: dict[str, Any]
    model_type: str
    model_config: ModelConfig
    dtype: torch.dtype
    ignored: list[str] = field(default_factory=list)  # tensors present but not imported


@dataclass
class ImportResult:
    output: Path
    checkpoint: Path
    yaml_path: Path
    model_config: ModelConfig
    dtype: torch.dtype
    parameters: int  # number of model parameters (real vocab, not padding)
    ignored: list[str]
    seconds: float


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} is missing: not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from err


def default_name(hf_dir: Path) -> str:
    slug = "".join(c if c.isalnum() else "_" for c in hf_dir.resolve().name.lower()).strip("_")
    return slug or "imported"


def resolve_import_dtype(dtype: str, hf_config: dict[str, Any]) -> torch.dtype:
    """auto: fp32 for fp32 (and fp16: bf16 would lose mantissa bits) checkpoints, else
    bf16."""
    if dtype != "auto":
        return DTYPES[dtype]
    saved = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16")
    return torch.float32 if saved in ("float32", "float16") else torch.bfloat16


def plan_import(
    hf_dir: str | Path,
    reader: HFCheckpointReader,
    dtype: str = "auto",
    name: str | None = None,
    make_vocab_size_divisible_by: int = 128,
    ignore_extra: bool = False,
) -> ImportPlan:
    """Validate `hf_dir` against its config.json: every expected tensor present with
    the expected shape, and nothing unexpected. ConversionError names the first
    problem (and counts the others)."""
    hf_dir = Path(hf_dir)
    hf_config = read_hf_config(hf_dir)
    model_type = model_type_of(hf_config)
    name = name or default_name(hf_dir)
    if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ConversionError(f"--name {name!r}: use letters, digits, '_', '-' or '.' only")
    config = config_from_hf(hf_config, name)
    config.make_vocab_size_divisible_by = make_vocab_size_divisible_by
    expected = hf_tensor_shapes(config)
    where = reader.index_file or ", ".join(reader.files)

    missing = [n for n in expected if n not in reader.weight_map]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"tensor {missing[0]!r} is missing from {hf_dir} ({where}){more}")
    for tensor, shape in expected.items():
        if reader.shape(tensor) != shape:
            raise ConversionError(
                f"tensor {tensor!r} in {reader.file_of(tensor)} has shape "
                f"{list(reader.shape(tensor))}, but config.json implies {list(shape)}"
            )
    ignored, unexpected = [], []
    for tensor in reader.names():
        if tensor in expected:
            continue
        tied_copy = tensor == "lm_head.weight" and config.tie_word_embeddings
        if tied_copy or tensor.endswith(IGNORABLE_SUFFIXES):
            ignored.append(tensor)  # transformers ignores these as well
        elif ignore_extra:
            ignored.append(tensor)
        else:
            unexpected.append(tensor)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(
            f"unexpected tensor {unexpected[0]!r} in {reader.file_of(unexpected[0])}{more}: "
            f"a {model_type} model of this config.json has no such weight (pass "
            "--ignore-extra to skip it)"
        )
    return ImportPlan(
        hf_dir, hf_config, model_type, config, resolve_import_dtype(dtype, hf_config), ignored
    )


def fill_parameter(
    param: torch.Tensor,
    tmap: TensorMap,
    reader: HFCheckpointReader,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> None:
    """Copy TP rank `tp_rank`'s slice of `tmap` from the HF files into `param`; rows
    without a source (vocab padding) become zero."""
    expected = list(tmap.shape)
    if tmap.split_dim is not None:
        expected[tmap.split_dim] //= tp_size
    if list(param.shape) != expected:
        raise RuntimeError(f"{tmap.name}: model has {list(param.shape)}, mapping says {expected}")
    with torch.no_grad():
        param.zero_()
        if tmap.split_dim == 1:
            (cols,) = local_ranges(tmap.shape[1], tp_rank, tp_size)
            for piece in tmap.pieces:
                rows = (piece.hf_start, piece.hf_stop)
                param[piece.start : piece.stop].copy_(reader.read(piece.hf_name, rows, cols))
            return
        if tmap.split_dim == 0:
            ranges = local_ranges(tmap.shape[0], tp_rank, tp_size, tmap.stride)
        else:
            ranges = [(0, tmap.shape[0])]
        offset = 0
        for start, stop in ranges:
            for piece in tmap.pieces:
                lo, hi = max(start, piece.start), min(stop, piece.stop)
                if lo >= hi:
                    continue
                hf_lo = piece.hf_start + lo - piece.start
                rows = reader.read(piece.hf_name, (hf_lo, hf_lo + hi - lo))
                param[offset + lo - start : offset + hi - start].copy_(rows)
            offset += stop - start


def _fill_model(model, plan: ImportPlan, reader: HFCheckpointReader, progress: bool) -> None:
    from megatron.core import parallel_state as ps

    maps = tensor_maps(
        plan.model_config,
        plan.model_config.padded_vocab_size(ps.get_tensor_model_parallel_world_size()),
    )
    tp_rank, tp_size = tp_rank_size()
    params = list(global_parameters(model))
    bar = _progress(params, "import", progress and is_rank0())
    for name, param in bar:
        if name not in maps:
            raise RuntimeError(f"no HF mapping for megatron parameter {name}")
        fill_parameter(param, maps[name], reader, tp_rank, tp_size)


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor")


def source_record(plan: ImportPlan, output: Path) -> dict[str, Any]:
    """What the import came from, for export and for people (JSON-able)."""
    hf_dir = plan.hf_dir.resolve()
    return {
        "hf_dir": str(hf_dir),
        "model_type": plan.model_type,
        "dtype": {torch.bfloat16: "bf16", torch.float32: "fp32"}[plan.dtype],
        "tokenizer_files": [f for f in TOKENIZER_FILES if (hf_dir / f).is_file()],
        "hf_config": plan.hf_config,
        "model_config": dataclasses.asdict(plan.model_config),
        "output": str(output.resolve()),
    }


def import_hf_checkpoint(
    hf_dir: str | Path,
    output: str | Path,
    dtype: str = "auto",
    name: str | None = None,
    make_vocab_size_divisible_by: int = 128,
    ignore_extra: bool = False,
    progress: bool = True,
) -> ImportResult:
    """Convert `hf_dir` into a checkpoint root at `output` (which must not exist).
    Collective over the current megatron layout (initialize_distributed first). On any
    error `output` is not created."""
    from megatron_longalign.data.planner import PlanPosition
    from megatron_longalign.training.checkpoint import CheckpointManager, TrainingState

    started = time.monotonic()
    output = Path(output).absolute()
    error = rank0_then_broadcast(lambda: error_of(check_output_free, output))
    agree_on_error(error)
    with HFCheckpointReader(hf_dir) as reader:
        plan = plan_import(hf_dir, reader, dtype, name, make_vocab_size_divisible_by, ignore_extra)
        config = plan.model_config
        model = build_stage_model(config, plan.dtype)
        # Any failure (a corrupt file on one rank's slice) must stop every rank.
        failed = error_of(_fill_model, model, plan, reader, progress, catch=(Exception,))
        agree_on_error(failed)
    record = source_record(plan, output)
    with atomic_directory(output) as temp:
        state = TrainingState(0, 0, PlanPosition(), {"name": config.name, "hf_import": record})
        step_dir = CheckpointManager(temp, keep_last=None).save(state, [model], None, None)
        yaml_rel = Path("conf") / "model" / f"{config.name}.yaml"
        if is_rank0():
            _write_beside(temp, yaml_rel, record, config, output)
    parameters = _count_parameters(config)
    return ImportResult(
        output=output,
        checkpoint=output / step_dir.name,
        yaml_path=output / yaml_rel,
        model_config=config,
        dtype=plan.dtype,
        parameters=parameters,
        ignored=plan.ignored,
        seconds=time.monotonic() - started,
    )


def _write_beside(
    temp: Path, yaml_rel: Path, record: dict[str, Any], config: ModelConfig, output: Path
) -> None:
    name = config.name
    header = (
        f"Imported from {record['hf_dir']} ({record['model_type']}) by tools/convert_hf.py.\n"
        "Train from these weights with:\n"
        f"  python -m megatron_longalign.train 'hydra.searchpath=[file://{output}/conf]' "
        f"model={name} train.init_from={output}"
    )
    (temp / yaml_rel).parent.mkdir(parents=True)
    (temp / yaml_rel).write_text(model_yaml(config, header))
    (temp / SOURCE_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _count_parameters(config: ModelConfig) -> int:
    total = 0
    for shape in hf_tensor_shapes(config).values():
        count = 1
        for dim in shape:
            count *= dim
        total += count
    return total
