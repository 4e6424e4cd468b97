"""Model tests: megatron-core on CPU in this one process (gloo, world size 1), set up once
(tests/helpers/megatron_session.py)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

from megatron_longalign.config.model import ModelConfig
from megatron_longalign.model.config import to_transformer_config
from tests.helpers import flash_standin
from tests.helpers.megatron_session import megatron_on_cpu
from tests.helpers.tiny_model import tiny_model_config

SEED = 1234


@pytest.fixture(scope="package", autouse=True)
def megatron_cpu() -> Iterator[None]:
    """CPU shim + gloo process group + megatron model-parallel state (TP = PP = 1), once
    for all model tests. Package scope (not session) so that the groups it created are
    torn down before other test packages set up their own."""
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    with megatron_on_cpu(SEED):
        yield


@pytest.fixture
def flash_standin_installed() -> Iterator[None]:
    """The `flash` backend usable here: tests/helpers/flash_standin.py's CPU reference of
    `flash_attn_varlen_func` behind the real import seam (model/backends.py)."""
    with flash_standin.installed():
        yield


def tiny_config(**changes) -> ModelConfig:
    """conf/model/tiny.yaml's shape with a large init std, so attention is far from
    uniform and position or mask mistakes show up in the outputs (with std 0.02 the
    q.k logits of a random model are ~0 and nearly any attention pattern looks alike)."""
    return tiny_model_config(**{"vocab_size": 256, "init_method_std": 0.3, **changes})


def build(config: ModelConfig, backend: str | None = None, seed: int = SEED, **overrides):
    """A model with deterministic fp32 CPU-initialised weights."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longalign.model.gpt import build_gpt_model

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    transformer_config = to_transformer_config(config, use_cpu_initialization=True, **overrides)
    return build_gpt_model(config, backend=backend, transformer_config=transformer_config)


def pack(lengths: list[int], vocab: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random documents back to back: tokens/labels/position_ids [1, T], cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (1, sum(lengths)), generator=gen)
    labels = torch.randint(0, vocab, (1, sum(lengths)), generator=gen)
    cu = torch.tensor([0, *torch.cumsum(torch.tensor(lengths), 0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"tokens": tokens, "labels": labels, "position_ids": positions, "cu_seqlens": cu}


def doc_slices(cu_seqlens: torch.Tensor) -> list[slice]:
    bounds = cu_seqlens.tolist()
    return [slice(s, e) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
