"""HF conversion tests: tiny random transformers models of every supported family, saved
in every supported file layout, and megatron-core on CPU in this process (TP = PP = 1).

The models' weights are redrawn with a large spread (and random norms and biases), so
attention is far from uniform and a wrong head order, RoPE layout or bias mapping
changes the logits visibly (with transformers' std 0.02 init nearly anything matches).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.helpers.megatron_session import megatron_on_cpu

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

SEED = 1234
TOL = 1e-4  # max abs logit difference, fp32
DOC_LENGTHS = (7, 12)  # the packed THD micro-batch: two documents back to back
PLAIN_LENGTH = 16


@dataclass(frozen=True)
class Case:
    family: str  # llama | mistral | qwen2
    layout: str  # safetensors | sharded | bin | bin_sharded
    config: dict = field(default_factory=dict)


COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
CASES = {
    # GQA 4:2, vocab 300: padded to 384 at TP=1 and 512 at TP=2.
    "llama_gqa": Case("llama", "safetensors", dict(num_key_value_heads=2, vocab_size=300)),
    # Llama-3.1 RoPE scaling with a small original context, so all three frequency
    # bands (kept, interpolated, divided) occur at head_dim 16. Sharded with an index.
    "llama3": Case(
        "llama",
        "sharded",
        dict(
            num_key_value_heads=2,
            vocab_size=512,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    # MHA, no sliding window (v0.3 style), a pytorch_model.bin.
    "mistral": Case(
        "mistral",
        "bin",
        dict(num_key_value_heads=4, vocab_size=384, sliding_window=None, rope_theta=1e6),
    ),
    # Qwen2.5-0.5B style: Q/K/V bias, tied embeddings, vocab 300.
    "qwen2_tied": Case(
        "qwen2",
        "safetensors",
        dict(num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True),
    ),
}


def hf_classes(family: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    return {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]


def make_hf_model(case: Case, seed: int = SEED):
    config_cls, model_cls = hf_classes(case.family)
    config = config_cls(**COMMON, **case.config)
    model = model_cls(config).eval().to(torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.5 * noise)
            else:
                param.copy_(0.2 * noise)
    return model


def save_hf(model, directory: Path, layout: str) -> Path:
    """Save in one of the layouts the reader supports (transformers 5 writes only
    safetensors; the .bin layouts are written as transformers 4 did)."""
    import json

    if layout in ("safetensors", "sharded"):
        shard = "20KB" if layout == "sharded" else "50GB"
        model.save_pretrained(directory, max_shard_size=shard)
        return directory
    model.save_pretrained(directory)  # config.json and generation_config.json
    for stale in directory.glob("model*.safetensors*"):
        stale.unlink()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if layout == "bin":
        torch.save(state, directory / "pytorch_model.bin")
        return directory
    names = list(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return directory


def write_tokenizer_files(directory: Path) -> None:
    """Stand-ins for tokenizer files (export copies them; their content is opaque)."""
    (directory / "tokenizer.json").write_text('{"fake": true}\n')
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')


# ---------------------------------------------------------------- inputs and logits


def batch(vocab: int, seed: int = 5) -> dict[str, torch.Tensor]:
    """Token ids of a plain sequence and of a packed micro-batch of two documents."""
    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=generator) for n in DOC_LENGTHS]
    return {
        "plain": torch.randint(0, vocab, (PLAIN_LENGTH,), generator=generator),
        "docs": docs,
    }


def hf_reference_logits(model, inputs: dict) -> dict[str, torch.Tensor]:
    """HF logits [T, V]: the plain sequence, and each document run alone (concatenated)."""
    with torch.no_grad():
        plain = model(inputs["plain"][None]).logits[0]
        docs = torch.cat([model(doc[None]).logits[0] for doc in inputs["docs"]])
    return {"plain": plain.float(), "packed": docs.float()}


def megatron_logits(model, inputs: dict) -> dict[str, torch.Tensor]:
    """Our model's logits [T, padded_vocab_local]: the plain sequence (bshd), and the
    two documents as one packed THD micro-batch with per-document positions."""
    from megatron_longalign.model.attention import packed_seq_params_from

    plain = inputs["plain"]
    tokens = torch.cat(inputs["docs"])[None]
    positions = torch.cat([torch.arange(len(d)) for d in inputs["docs"]])[None]
    cu = torch.tensor([0, *torch.cumsum(torch.tensor(DOC_LENGTHS), 0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        plain_logits = model(plain[None], torch.arange(len(plain))[None])
        packed = model(
            tokens, positions, packed_seq_params=packed_seq_params_from(cu, max(DOC_LENGTHS))
        )
    return {
        "plain": plain_logits.reshape(len(plain), -1),
        "packed": packed.reshape(tokens.shape[1], -1),
    }


def load_checkpoint(root: Path, config, dtype=torch.float32):
    """The checkpoint under `root` (or the one `latest` names) loaded into a fresh
    model of the current layout."""
    from megatron_longalign.convert.model_io import build_stage_model
    from megatron_longalign.training.checkpoint import CheckpointManager, resolve_checkpoint

    path = resolve_checkpoint(root)
    model = build_stage_model(config, dtype)
    CheckpointManager(path.parent).load(path, [model], None, None)
    return model.eval()


def checkpoint_tensors(root: Path, config, dtype=torch.float32) -> dict[str, torch.Tensor]:
    from megatron_longalign.convert.model_io import global_parameters

    model = load_checkpoint(root, config, dtype)
    return {name: p.detach().clone() for name, p in global_parameters(model)}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="package", autouse=True)
def megatron_cpu() -> Iterator[None]:
    """CPU shim + gloo group + megatron state (TP = PP = 1) for this package, torn down
    at its end (as tests/model does) so other packages can set up their own."""
    with megatron_on_cpu(SEED):
        yield


@pytest.fixture(scope="package")
def hf_models() -> dict:
    return {name: make_hf_model(case) for name, case in CASES.items()}


@pytest.fixture(scope="package")
def hf_dirs(tmp_path_factory, hf_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name, case in CASES.items():
        dirs[name] = save_hf(hf_models[name], root / name, case.layout)
        write_tokenizer_files(dirs[name])
    return dirs


@pytest.fixture(scope="package")
def imported(tmp_path_factory, hf_dirs) -> dict:
    """Every case imported at TP = 1 in fp32: name -> ImportResult."""
    from megatron_longalign.convert.hf_import import import_hf_checkpoint

    root = tmp_path_factory.mktemp("imported")
    return {
        name: import_hf_checkpoint(path, root / name, dtype="fp32", progress=False)
        for name, path in hf_dirs.items()
    }
