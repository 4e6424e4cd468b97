"""What import and export share: the model of this rank's stage built without random
init, its parameters under their global names, the distributed helpers, and atomic
output directories."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from megatron_longalign.config.model import ModelConfig
from megatron_longalign.convert.errors import ConversionError
from megatron_longalign.model.config import to_transformer_config
from megatron_longalign.parallel.distributed import rank0_then_broadcast

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def build_stage_model(config: ModelConfig, dtype: torch.dtype):
    """This rank's pipeline stage of the model, on CPU, in `dtype`, in the current
    megatron TP/PP layout. Weights are left uninitialised (perform_initialization=False):
    the converter overwrites or loads every one of them, and random init of a 70B model
    would cost minutes for nothing."""
    from megatron.core import parallel_state as ps

    from megatron_longalign.model.gpt import build_gpt_model

    transformer_config = to_transformer_config(
        config,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=False,
    )
    # sdpa: the local spec needs no GPU package; its checkpoint keys are the TE spec's
    # (megatron maps them), so the checkpoint loads under any backend.
    model = build_gpt_model(
        config,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        transformer_config=transformer_config,
        backend="sdpa",
    )
    # megatron's local norms ignore params_dtype (fp32); the trainer's Float16Module casts
    # the whole model, so store every tensor in `dtype` as the trainer holds it.
    return model.to(dtype)


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def global_parameters(model) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(name with the global layer index, parameter) for this stage's parameters."""
    layers = model.decoder.layers
    for name, param in model.named_parameters():
        match = _LAYER.fullmatch(name)
        if match:
            layer = layers[int(match.group(1))]
            name = f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"
        yield name, param


def tp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def is_rank0() -> bool:
    return torch.distributed.get_rank() == 0


def agree_on_error(error: str | None) -> None:
    """Collective: raise ConversionError on every rank if any rank failed, so no rank
    goes on into a collective save that the failed one never joins."""
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if failed:
        raise ConversionError(failed[0])


def check_output_free(output: Path) -> None:
    """`output` must be new; its parent directories are created (as `mkdir -p` would),
    so `--output ckpt/model` works in a fresh tree."""
    if output.exists() or output.is_symlink():
        raise ConversionError(f"output {output} already exists; choose a new directory")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConversionError(f"cannot create the parent of output {output}: {err}") from err


@contextmanager
def atomic_directory(output: Path, collective: bool = True) -> Iterator[Path]:
    """A temp directory next to `output` (same file system) that becomes `output` by
    one rename when the block succeeds, and is deleted when it fails, so `output` is
    either complete or absent. With `collective`, rank 0 chooses the name and renames;
    every rank gets the same path."""
    make = lambda: str(output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:12]}")  # noqa: E731
    temp = Path(rank0_then_broadcast(make) if collective else make())
    try:
        yield temp
        if collective:
            torch.distributed.barrier()  # every rank's files are in `temp`
            # Every rank returns only after the rename, and learns if it failed.
            agree_on_error(rank0_then_broadcast(lambda: error_of(_publish, temp, output)))
        else:
            _publish(temp, output)
    except BaseException:
        if not collective or is_rank0():
            shutil.rmtree(temp, ignore_errors=True)
        raise


def _publish(temp: Path, output: Path) -> None:
    check_output_free(output)  # a concurrent run may have taken it meanwhile
    os.rename(temp, output)


def error_of(
    fn: Callable[..., Any],
    *args: Any,
    catch: tuple[type[BaseException], ...] = (ConversionError, OSError),
) -> str | None:
    """`fn(*args)`'s error message, or None: for `agree_on_error`, so that a failure on
    one rank stops all of them instead of leaving the others in a collective."""
    try:
        fn(*args)
    except catch as err:
        return str(err) if isinstance(err, ConversionError) else f"{type(err).__name__}: {err}"
    return None
