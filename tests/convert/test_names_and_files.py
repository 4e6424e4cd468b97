"""The name/layout mapping (fused QKV per group, SwiGLU, TP slices), the streaming reader
over every file layout, and the streaming safetensors writer. No megatron model here."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_longalign.config.model import ModelConfig
from megatron_longalign.convert.hf_import import fill_parameter
from megatron_longalign.convert.hf_names import (
    export_sources,
    hf_tensor_shapes,
    local_ranges,
    tensor_maps,
)
from megatron_longalign.convert.hf_reader import HFCheckpointReader
from megatron_longalign.convert.safetensors_writer import SafetensorsStreamWriter
from tests.convert.conftest import CASES, make_hf_model, save_hf

CONFIGS = {
    "mha": ModelConfig(vocab_size=300, num_attention_heads=4, num_query_groups=None),
    "gqa_bias_tied": ModelConfig(
        vocab_size=300, num_query_groups=2, qkv_bias=True, tie_word_embeddings=True
    ),
    "mqa_head_dim": ModelConfig(vocab_size=256, num_query_groups=1, kv_channels=8),
}


class DictReader:
    """HFCheckpointReader's read() over in-memory tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def read(self, name, rows=None, cols=None):
        t = self.tensors[name]
        t = t if rows is None else t[rows[0] : rows[1]]
        return t if cols is None else t[:, cols[0] : cols[1]]


def random_hf(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) for n, s in hf_tensor_shapes(config).items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pieces_tile_every_tensor_exactly_once(name):
    config = CONFIGS[name]
    padded = config.padded_vocab_size(1)
    sources = export_sources(config, padded)
    shapes = hf_tensor_shapes(config)
    assert set(sources) == set(shapes)
    for hf_name, pieces in sources.items():
        row = 0
        for _, piece in pieces:
            assert piece.hf_start == row
            row = piece.hf_stop
        assert row == shapes[hf_name][0], hf_name
    for tmap in tensor_maps(config, padded).values():
        covered = sorted((p.start, p.stop) for p in tmap.pieces)
        rows = sum(stop - start for start, stop in covered)
        is_vocab = tmap.name in ("embedding.word_embeddings.weight", "output_layer.weight")
        assert rows == (config.vocab_size if is_vocab else tmap.shape[0]), tmap.name
        assert all(a[1] <= b[0] for a, b in zip(covered, covered[1:], strict=False))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_qkv_is_grouped_per_kv_head(name):
    """Independent formula: view the fused weight as [groups, heads/group + 2, d, H]."""
    config = CONFIGS[name]
    hf = random_hf(config)
    tmap = tensor_maps(config, config.padded_vocab_size(1))[
        "decoder.layers.1.self_attention.linear_qkv.weight"
    ]
    fused = torch.empty(tmap.shape)
    fill_parameter(fused, tmap, DictReader(hf))
    g, d, h = config.query_groups, config.head_dim, config.hidden_size
    per = config.num_attention_heads // g
    p = "model.layers.1.self_attn."
    expected = torch.cat(
        [
            hf[p + "q_proj.weight"].view(g, per, d, h),
            hf[p + "k_proj.weight"].view(g, 1, d, h),
            hf[p + "v_proj.weight"].view(g, 1, d, h),
        ],
        dim=1,
    ).reshape(-1, h)
    assert torch.equal(fused, expected)


def _megatron_shard(full: torch.Tensor, split_dim, stride: int, rank: int, tp: int) -> torch.Tensor:
    """The TP shard as megatron lays it out (cf. tests/helpers/tiny_gpt.shard)."""
    if split_dim is None:
        return full
    pieces = torch.chunk(full, tp * stride, dim=split_dim)
    return torch.cat(pieces[rank::tp], dim=split_dim)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_slices_are_megatrons_shards_of_the_full_tensor(tp):
    config = dataclasses.replace(CONFIGS["gqa_bias_tied"], num_query_groups=4)
    hf = random_hf(config)
    reader = DictReader(hf)
    for tmap in tensor_maps(config, config.padded_vocab_size(tp)).values():
        full = torch.empty(tmap.shape)
        fill_parameter(full, tmap, reader)
        for rank in range(tp):
            shape = list(tmap.shape)
            if tmap.split_dim is not None:
                shape[tmap.split_dim] //= tp
            local = torch.full(shape, float("nan"))
            fill_parameter(local, tmap, reader, rank, tp)
            expected = _megatron_shard(full, tmap.split_dim, tmap.stride, rank, tp)
            assert torch.equal(local, expected), (tmap.name, rank)


def test_local_ranges():
    assert local_ranges(8, 0, 2) == [(0, 4)]
    assert local_ranges(8, 1, 2, stride=2) == [(2, 4), (6, 8)]
    with pytest.raises(ValueError):
        local_ranges(6, 0, 4)


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "bin_sharded"])
def test_reader_reads_every_layout_and_slices(tmp_path, layout):
    model = make_hf_model(CASES["llama_gqa"])
    directory = save_hf(model, tmp_path / layout, layout)
    state = model.state_dict()
    with HFCheckpointReader(directory) as reader:
        assert reader.format == ("bin" if layout.startswith("bin") else "safetensors")
        sharded = layout in ("sharded", "bin_sharded")
        assert (reader.index_file is not None) == sharded
        assert set(reader.names()) == set(state)
        assert (len(reader.files) > 1) == sharded
        for name, value in state.items():
            assert reader.shape(name) == tuple(value.shape)
            assert torch.equal(reader.read(name), value)
        q = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(reader.read(q, (16, 32)), state[q][16:32])
        assert torch.equal(reader.read(q, (16, 32), (8, 24)), state[q][16:32, 8:24])
        bias_free = "model.norm.weight"
        assert torch.equal(reader.read(bias_free, (3, 9)), state[bias_free][3:9])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_writer_round_trips_through_safe_open(tmp_path, dtype):
    from safetensors import safe_open

    gen = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(3, 5, generator=gen), "a": torch.randn(7, generator=gen)}
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    path = tmp_path / "x.safetensors"
    layout = [(k, tuple(v.shape), dtype) for k, v in tensors.items()]
    writer = SafetensorsStreamWriter(path, layout, {"format": "pt"})
    for name, value in tensors.items():
        writer.add(name, value)
    writer.close()
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0
    assert json.loads(path.read_bytes()[8 : 8 + header_len])["__metadata__"] == {"format": "pt"}
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["a", "b"]
        for name, value in tensors.items():
            assert torch.equal(f.get_tensor(name), value)


def test_stream_writer_refuses_out_of_order_or_incomplete(tmp_path):
    layout = [("a", (2,), torch.float32), ("b", (2,), torch.float32)]
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", layout)
    with pytest.raises(ValueError, match="expected a"):
        writer.add("b", torch.zeros(2))
    writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="before b was written"):
        writer.close()
