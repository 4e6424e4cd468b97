"""Which rows of which Hugging Face tensor make up each megatron parameter.

Every megatron parameter (named with its GLOBAL layer index, in its unsharded TP=1
layout) is described as row blocks copied from HF tensors (`Piece`s). The same
description drives import (fill a parameter, or only this TP rank's slice of it, from
the HF files) and export (assemble each HF tensor from the megatron parameters), so the
two cannot disagree.

Layouts (HF weights are [out, in], like megatron's):
- linear_qkv: megatron fuses Q, K and V per query group: for KV head g the rows are
  [the heads_per_group query heads of g; k_g; v_g], each head head_dim rows. HF keeps
  q_proj [heads * d], k_proj and v_proj [groups * d], heads contiguous. Qwen2's biases
  follow the same row order. TP ranks hold whole groups (contiguous row blocks).
- linear_fc1 (SwiGLU): [gate; up] at TP=1; TP rank r holds [gate_r; up_r] (stride 2).
- linear_proj and linear_fc2 are split over input columns (dim 1) under TP.
- embedding and output layer: megatron pads the vocab to padded_vocab_size(TP); the
  extra rows have no HF source (zeros on import, dropped on export). With tied
  embeddings HF has no lm_head.weight; a pipeline's last stage still holds a copy of
  the embedding, filled from embed_tokens.
- RMSNorm weights are the same vectors under both names.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_longalign.config.model import ModelConfig

# Buffers older transformers versions saved in checkpoints; recomputed from the config.
IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Piece:
    """Rows [hf_start, hf_stop) of HF tensor `hf_name` are rows [start, stop) of the
    megatron tensor (all columns)."""

    hf_name: str
    hf_start: int
    hf_stop: int
    start: int
    stop: int


@dataclass(frozen=True)
class TensorMap:
    """One megatron parameter: full (TP=1) shape, its HF sources, and how TP splits
    it: split_dim None (replicated), 0 (rows) or 1 (columns), `stride` row blocks per
    rank (2 for SwiGLU's [gate_r; up_r])."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    split_dim: int | None = None
    stride: int = 1


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of `config` holds, name -> shape, in HF's order."""
    hidden, ffn, d = config.hidden_size, config.ffn_hidden_size, config.head_dim
    q_rows, kv_rows = config.num_attention_heads * d, config.query_groups * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        for proj, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (rows, hidden)
            if config.qkv_bias:
                shapes[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_rows)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (ffn, hidden)
        shapes[p + "mlp.up_proj.weight"] = (ffn, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, ffn)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def _whole(
    name: str, hf_name: str, shape: tuple[int, ...], split_dim: int | None = None
) -> TensorMap:
    return TensorMap(name, shape, (Piece(hf_name, 0, shape[0], 0, shape[0]),), split_dim)


def _qkv(config: ModelConfig, prefix: str, hf_prefix: str, suffix: str) -> TensorMap:
    d, groups = config.head_dim, config.query_groups
    per_group = config.num_attention_heads // groups
    block = (per_group + 2) * d  # rows of one query group in megatron's fused layout
    pieces = []
    for g in range(groups):
        base = g * block
        q = (g * per_group * d, (g + 1) * per_group * d)
        pieces.append(Piece(f"{hf_prefix}q_proj.{suffix}", *q, base, base + per_group * d))
        base += per_group * d
        pieces.append(Piece(f"{hf_prefix}k_proj.{suffix}", g * d, (g + 1) * d, base, base + d))
        pieces.append(
            Piece(f"{hf_prefix}v_proj.{suffix}", g * d, (g + 1) * d, base + d, base + 2 * d)
        )
    cols = (config.hidden_size,) if suffix == "weight" else ()
    return TensorMap(f"{prefix}linear_qkv.{suffix}", (groups * block, *cols), tuple(pieces), 0)


def _vocab(name: str, hf_name: str, config: ModelConfig, padded_vocab: int) -> TensorMap:
    piece = Piece(hf_name, 0, config.vocab_size, 0, config.vocab_size)
    return TensorMap(name, (padded_vocab, config.hidden_size), (piece,), 0)


def tensor_maps(config: ModelConfig, padded_vocab: int) -> dict[str, TensorMap]:
    """Megatron parameter name (global layer index) -> TensorMap, for a model whose
    vocab is padded to `padded_vocab` rows. With tied embeddings `output_layer.weight`
    maps to embed_tokens too (only a pipeline's last stage has that parameter)."""
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    q_rows = config.num_attention_heads * config.head_dim
    maps = [
        _vocab(
            "embedding.word_embeddings.weight", "model.embed_tokens.weight", config, padded_vocab
        )
    ]
    for i in range(config.num_layers):
        mg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        maps.append(_whole(mg + "input_layernorm.weight", hf + "input_layernorm.weight", (hidden,)))
        maps.append(_qkv(config, mg + "self_attention.", hf + "self_attn.", "weight"))
        if config.qkv_bias:
            maps.append(_qkv(config, mg + "self_attention.", hf + "self_attn.", "bias"))
        maps.append(
            _whole(
                mg + "self_attention.linear_proj.weight",
                hf + "self_attn.o_proj.weight",
                (hidden, q_rows),
                split_dim=1,
            )
        )
        maps.append(
            _whole(
                mg + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight", (hidden,)
            )
        )
        fc1 = (
            Piece(hf + "mlp.gate_proj.weight", 0, ffn, 0, ffn),
            Piece(hf + "mlp.up_proj.weight", 0, ffn, ffn, 2 * ffn),
        )
        maps.append(TensorMap(mg + "mlp.linear_fc1.weight", (2 * ffn, hidden), fc1, 0, stride=2))
        maps.append(
            _whole(mg + "mlp.linear_fc2.weight", hf + "mlp.down_proj.weight", (hidden, ffn), 1)
        )
    maps.append(_whole("decoder.final_layernorm.weight", "model.norm.weight", (hidden,)))
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    maps.append(_vocab("output_layer.weight", head, config, padded_vocab))
    return {m.name: m for m in maps}


def local_ranges(size: int, tp_rank: int, tp_size: int, stride: int = 1) -> list[tuple[int, int]]:
    """The [start, stop) ranges of a dimension of `size` that TP rank `tp_rank` holds,
    in the order they are concatenated locally: the dimension is cut into
    tp_size * stride equal blocks and the rank keeps blocks rank, rank + tp_size, ..."""
    if size % (tp_size * stride):
        raise ValueError(f"dimension {size} does not split into {tp_size} x {stride} blocks")
    block = size // (tp_size * stride)
    return [
        ((k * tp_size + tp_rank) * block, (k * tp_size + tp_rank + 1) * block)
        for k in range(stride)
    ]


def export_sources(config: ModelConfig, padded_vocab: int) -> dict[str, list[tuple[str, Piece]]]:
    """HF tensor name -> [(megatron name, piece)] ordered by HF rows, from the
    parameters a TP=1, PP=1 model has (a tied output layer is not a separate one)."""
    sources: dict[str, list[tuple[str, Piece]]] = {name: [] for name in hf_tensor_shapes(config)}
    for tmap in tensor_maps(config, padded_vocab).values():
        if tmap.name == "output_layer.weight" and config.tie_word_embeddings:
            continue
        for piece in tmap.pieces:
            sources[piece.hf_name].append((tmap.name, piece))
    for pieces in sources.values():
        pieces.sort(key=lambda item: item[1].hf_start)
    return sources
