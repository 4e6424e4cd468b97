"""This trainer's checkpoint (saved in any layout) -> Hugging Face model directory.

The checkpoint is loaded into a TP=1, PP=1 model on CPU (megatron reshards on load, and
cuts or zero-fills the vocab padding: allow_shape_mismatch). Then every HF tensor is
assembled from the model's parameters (hf_names.export_sources) and appended to its
safetensors shard (SafetensorsStreamWriter), one tensor at a time. Peak memory: the
model in the checkpoint's stored dtype, plus one HF tensor in the output dtype.

Written into a temp directory that is renamed to the output at the end:
    config.json, model.safetensors | model-0000i-of-0000n.safetensors +
    model.safetensors.index.json, tokenizer files and generation_config.json (from
    --tokenizer, or the directory the checkpoint was imported from), with the training
    chat template as `chat_template` in tokenizer_config.json and its name in
    longalign.json (convert/export_template.py).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_longalign.config.model import ModelConfig
from megatron_longalign.convert.errors import ConversionError
from megatron_longalign.convert.export_template import resolve_template, write_chat_template
from megatron_longalign.convert.hf_config import (
    default_model_type,
    hf_config_from,
    recorded_model_config,
)
from megatron_longalign.convert.hf_import import TOKENIZER_FILES
from megatron_longalign.convert.hf_names import export_sources, hf_tensor_shapes
from megatron_longalign.convert.model_io import (
    DTYPES,
    HF_DTYPE_NAMES,
    atomic_directory,
    build_stage_model,
    check_output_free,
    global_parameters,
)
from megatron_longalign.convert.safetensors_writer import SafetensorsStreamWriter, tensor_nbytes

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_EMBEDDING_KEY = "embedding.word_embeddings.weight"
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(i?)B?\s*", re.IGNORECASE)


@dataclass
class ExportResult:
    output: Path
    files: list[str]
    tensors: int
    total_bytes: int
    dtype: torch.dtype
    model_type: str
    copied: list[str] = field(default_factory=list)  # tokenizer/generation files
    template: str | None = None  # the chat template written (None: no tokenizer or none known)
    seconds: float = 0.0


def parse_size(text: str | int) -> int:
    """'5GB' -> 5 * 10**9 (transformers' convention), '500MiB' -> 500 * 2**20, bytes as int."""
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(text)
    if not match:
        raise ConversionError(f"max shard size {text!r}: expected e.g. 5GB, 500MB, 2GiB or bytes")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMG".index(unit.upper() or " "))


def stored_tensor_meta(checkpoint: Path, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """dtype and global shape of a tensor in a torch_dist checkpoint, from its metadata
    (no data read)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    if key not in metadata:
        raise ConversionError(
            f"{checkpoint} holds no {key!r}: not a model checkpoint of this trainer"
        )
    entry = metadata[key]
    return entry.properties.dtype, tuple(entry.size)


def shard_plan(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_shard_bytes: int
) -> list[list[str]]:
    """HF tensors grouped, in order, into shards of at most `max_shard_bytes` (a
    tensor larger than that gets a shard of its own, as transformers does)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = tensor_nbytes(shape, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    dtype: str = "auto",
    model_config: ModelConfig | None = None,
    model_type: str | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
    template: str | None = None,
    data_prefix: str | Path | None = None,
) -> ExportResult:
    """Write the HF directory `output` (must not exist) for `checkpoint` (a checkpoint
    directory or a root with `latest`). `model_config` defaults to the one an import
    recorded in the checkpoint. The chat template: `template`, else the one the
    checkpoint records, else the one `data_prefix`'s P.json names (export_template.py).
    Runs in one process (world size 1, TP = PP = 1)."""
    from megatron_longalign.training.checkpoint import read_marker

    started = time.monotonic()
    _check_single_process()
    output = Path(output).absolute()
    check_output_free(output)
    max_bytes = parse_size(max_shard_size)
    path = _resolve(checkpoint)
    extra = read_marker(path).get("extra", {})
    record = extra.get("hf_import") or {}
    if model_config is None:
        model_config = _recorded_model_config(path, extra)
    model_type = model_type or record.get("model_type") or default_model_type(model_config)
    stored_dtype, out_dtype = _dtypes(path, model_config, dtype)
    base = record.get("hf_config") if record.get("model_type") == model_type else None
    hf_config = hf_config_from(model_config, model_type, HF_DTYPE_NAMES[out_dtype], base)

    # Load in the stored dtype, so the parameters are exactly what was saved.
    params = dict(global_parameters(_load_model(path, model_config, stored_dtype)))
    shapes = hf_tensor_shapes(model_config)
    sources = export_sources(model_config, model_config.padded_vocab_size(1))
    _check_sources(sources, shapes, params)
    shards = shard_plan(shapes, out_dtype, max_bytes)
    names = shard_file_names(len(shards))
    copy_from = _tokenizer_source(tokenizer_dir, record)
    chat_template = resolve_template(template, extra, data_prefix)
    if chat_template is None:
        logger.warning("no chat template known (pass --template): none exported")

    with atomic_directory(output, collective=False) as temp:
        temp.mkdir()
        tensors = _Tensors(shapes, out_dtype, sources, params)
        _write_shards(temp, names, shards, tensors, progress)
        total = sum(tensor_nbytes(s, out_dtype) for s in shapes.values())
        if len(names) > 1:
            weight_map = {n: f for f, members in zip(names, shards, strict=True) for n in members}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _write_json(temp / INDEX_FILE, index)
        _write_json(temp / "config.json", hf_config)
        copied = _copy_tokenizer(copy_from, temp)
        has_tokenizer = bool(set(copied) - {"generation_config.json"})
        if chat_template is not None and has_tokenizer:
            write_chat_template(temp, chat_template, {"checkpoint": str(path)})
    return ExportResult(
        output=output,
        files=names,
        tensors=len(shapes),
        total_bytes=total,
        dtype=out_dtype,
        model_type=model_type,
        copied=copied,
        template=chat_template if has_tokenizer else None,
        seconds=time.monotonic() - started,
    )


def _check_single_process() -> None:
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() > 1:
        raise ConversionError("export runs at TP=1, PP=1 (one process); the checkpoint reshards")


def _resolve(checkpoint: str | Path) -> Path:
    """The checkpoint directory (`checkpoint.resolve_checkpoint`), as a ConversionError."""
    from megatron_longalign.training.checkpoint import CheckpointError, resolve_checkpoint

    try:
        return resolve_checkpoint(checkpoint)
    except CheckpointError as err:
        raise ConversionError(str(err)) from err


def _recorded_model_config(path: Path, extra: dict[str, Any]) -> ModelConfig:
    recorded = recorded_model_config(extra)
    if recorded is None:
        raise ConversionError(
            f"{path} records no model config (neither the trainer nor an import wrote "
            "one): pass --model-config with the model YAML it was trained with"
        )
    return recorded


def _dtypes(path: Path, model_config: ModelConfig, dtype: str) -> tuple[torch.dtype, torch.dtype]:
    """(stored dtype, output dtype); the stored embedding must fit the model config."""
    stored_dtype, stored_shape = stored_tensor_meta(path, _EMBEDDING_KEY)
    if stored_shape[0] < model_config.vocab_size or stored_shape[1] != model_config.hidden_size:
        raise ConversionError(
            f"{path}: {_EMBEDDING_KEY} is {list(stored_shape)}, but the model config has "
            f"vocab_size {model_config.vocab_size}, hidden_size {model_config.hidden_size}"
        )
    out_dtype = stored_dtype if dtype == "auto" else DTYPES[dtype]
    if out_dtype not in HF_DTYPE_NAMES:
        raise ConversionError(f"stored dtype {stored_dtype}: pass --dtype bf16 or fp32")
    return stored_dtype, out_dtype


def _load_model(path: Path, model_config: ModelConfig, stored_dtype: torch.dtype):
    """The checkpoint's weights in a TP=1, PP=1 model (megatron reshards on load)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_longalign.training.checkpoint import CheckpointManager

    model = build_stage_model(model_config, stored_dtype)
    try:
        CheckpointManager(path.parent).load(path, [model], None, None)
    # megatron's shape/key errors; torch's CheckpointException is a BaseException and
    # carries every rank's traceback: keep its last line.
    except (Exception, CheckpointException) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ConversionError(
            f"cannot load {path} with this model config: {lines[-1] if lines else type(err).__name__}"
        ) from err
    return model


@dataclass
class _Tensors:
    """What every HF tensor is assembled from (`_assemble`)."""

    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    sources: dict[str, list]
    params: dict[str, torch.Tensor]


def _write_shards(
    temp: Path, names: list[str], shards: list[list[str]], tensors: _Tensors, progress: bool
) -> None:
    """Every shard file, one HF tensor at a time."""
    bar = _progress(len(tensors.shapes), progress)
    for file, members in zip(names, shards, strict=True):
        layout = [(n, tensors.shapes[n], tensors.dtype) for n in members]
        writer = SafetensorsStreamWriter(temp / file, layout, {"format": "pt"})
        try:
            for name in members:
                shape = tensors.shapes[name]
                writer.add(
                    name, _assemble(name, shape, tensors.dtype, tensors.sources, tensors.params)
                )
                if bar is not None:
                    bar.update(1)
        finally:
            writer.close()
    if bar is not None:
        bar.close()


def _assemble(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    sources: dict[str, list],
    params: dict[str, torch.Tensor],
) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)
    with torch.no_grad():
        for param_name, piece in sources[name]:
            out[piece.hf_start : piece.hf_stop].copy_(params[param_name][piece.start : piece.stop])
    return out


def _check_sources(sources: dict[str, list], shapes: dict[str, tuple], params: dict) -> None:
    """Every HF tensor is tiled by rows of existing parameters, and every parameter is
    used: a mismatch is a bug in the mapping, never something to write."""
    used = set()
    for name, pieces in sources.items():
        row = 0
        for param_name, piece in pieces:
            if param_name not in params or piece.hf_start != row:
                raise RuntimeError(f"export mapping for {name} is broken at row {row}")
            row = piece.hf_stop
            used.add(param_name)
        if row != shapes[name][0]:
            raise RuntimeError(f"export mapping for {name} covers {row} of {shapes[name][0]} rows")
    unused = set(params) - used
    if unused:
        raise RuntimeError(f"model parameters not exported: {sorted(unused)}")


def _tokenizer_source(tokenizer_dir: str | Path | None, record: dict[str, Any]) -> Path | None:
    if tokenizer_dir is not None:
        path = Path(tokenizer_dir)
        if not path.is_dir():
            raise ConversionError(f"--tokenizer {path} is not a directory")
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise ConversionError(f"--tokenizer {path} holds none of {list(TOKENIZER_FILES)}")
        return path
    source = record.get("hf_dir")
    if source and Path(source).is_dir():
        return Path(source)
    if source:
        logger.warning("the imported source %s is gone: no tokenizer files exported", source)
    return None


def _copy_tokenizer(source: Path | None, temp: Path) -> list[str]:
    if source is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, temp / name)
            copied.append(name)
    return copied


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="export", unit="tensor")
