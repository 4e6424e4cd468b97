"""Backend selection and the errors for missing optional packages."""

from __future__ import annotations

import pytest
import torch

from megatron_longalign.model import backends
from megatron_longalign.model.backends import (
    BackendUnavailableError,
    resolve_attention_backend,
    unavailable_reason,
)
from megatron_longalign.model.config import to_transformer_config
from tests.model.conftest import tiny_config

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only choice")


@NO_CUDA
def test_auto_on_a_cpu_machine_is_sdpa():
    """flex is importable here and runs forward on CPU, but torch has no flex backward
    on CPU, so auto cannot pick it for training: sdpa."""
    assert unavailable_reason("flex") is None
    assert resolve_attention_backend("auto") == "sdpa"


def test_auto_order_follows_availability(monkeypatch):
    """te > flash > flex > sdpa, by what is importable and whether CUDA exists."""
    available: set[str] = set()
    monkeypatch.setattr(
        backends, "unavailable_reason", lambda name: None if name in available else "missing"
    )
    monkeypatch.setattr(backends, "_cuda_available", lambda: True)
    for present, expected in [
        ({"te", "flash", "flex", "sdpa"}, "te"),
        ({"flash", "flex", "sdpa"}, "flash"),
        ({"flex", "sdpa"}, "flex"),
        ({"sdpa"}, "sdpa"),
    ]:
        available.clear()
        available.update(present)
        assert resolve_attention_backend("auto") == expected
    monkeypatch.setattr(backends, "_cuda_available", lambda: False)
    available.update({"flex"})
    assert resolve_attention_backend("auto") == "sdpa"


@pytest.mark.parametrize("name", ["sdpa", "flex"])
def test_named_torch_backends_resolve_to_themselves(name):
    assert resolve_attention_backend(name) == name


@pytest.mark.parametrize("name,package", [("te", "transformer_engine"), ("flash", "flash_attn")])
def test_missing_gpu_packages_raise_a_clear_error(name, package):
    if unavailable_reason(name) is None:
        pytest.skip(f"{package} is installed and usable here")
    with pytest.raises(BackendUnavailableError, match=package):
        resolve_attention_backend(name)


def test_gpu_backend_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(backends, "_try_import", lambda module: (object(), ""))
    monkeypatch.setattr(backends, "_cuda_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        resolve_attention_backend("flash")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_attention_backend("xformers")


@pytest.mark.parametrize("name,package", [("te", "transformer_engine"), ("flash", "flash_attn")])
def test_building_a_model_with_a_missing_backend_fails_before_building(name, package):
    from megatron_longalign.model.gpt import build_gpt_model

    if unavailable_reason(name) is None:
        pytest.skip(f"{package} is installed and usable here")
    with pytest.raises(BackendUnavailableError, match=package):
        build_gpt_model(tiny_config(attention_backend=name))


def test_sequence_parallel_needs_te():
    from megatron_longalign.model.gpt import build_gpt_model

    config = tiny_config()
    with pytest.raises(ValueError, match="sequence_parallel needs the 'te'"):
        build_gpt_model(
            config,
            transformer_config=to_transformer_config(
                config, tensor_model_parallel_size=2, sequence_parallel=True
            ),
        )
