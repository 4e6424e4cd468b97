"""megatron-core GPTModel for packed THD micro-batches, with RoPE from explicit
position ids.

Model inputs for one micro-batch (see docs/DATA_PIPELINE.md):
    model(input_ids[1, T], position_ids[1, T], packed_seq_params=..., labels=labels[1, T])
returns the per-token cross entropy [1, T] (or logits [1, T, V] without labels). With
`model.loss_impl=chunked` (the default) the training loss never materialises the logits:
the last hidden states go straight into the chunked, vocabulary-parallel fused linear
cross entropy (model/fused_loss.py) instead of megatron's output layer and loss.
`packed_seq_params_from(cu_seqlens, max_seqlen)` builds the PackedSeqParams.
position_ids must be given on every pipeline stage: every layer applies RoPE.

RoPE from position ids. megatron-core's default THD RoPE restarts positions at 0 per
document (it slices a [max_seqlen] table per document), which cannot express SkipAlign's
positions. `LongAlignGPTModel` instead computes the rotary angles of each token from its
position id, `freqs[t] = position_ids[t] * inv_freq`, as a [T, 1, 1, dim] tensor. In THD
mode megatron's unfused `_apply_rotary_pos_emb_thd` recognises a table with exactly
cu_seqlens[-1] rows as "all positions across all sequences" and reads document i's rows
at offset cu_seqlens[i], i.e. token t gets row t: the explicit position. So no rotary
code of our own is applied; `apply_rope_fusion` must stay False (TE's fused THD kernel
ignores the table's layout). In bshd mode the table is [S, B, 1, dim], which
`_apply_rotary_pos_emb_bshd` broadcasts per sequence.

With context parallelism (TE backend) each rank holds chunks r and 2*CP-1-r of every
document, and megatron reads those chunks' rows from a full-length table; the local
angles are scattered into exactly those rows (`_place_for_context_parallel`).

Vocabulary padding. megatron pads the embedding/output vocabulary to a multiple of
make_vocab_size_divisible_by x TP. Those padded logits would enter the softmax of the
loss, so the loss would depend on TP and differ from the unpadded (e.g. Hugging Face)
model. The standard loss masks them to -inf and the chunked loss never computes them:
only the real vocabulary counts, on every layout.
Logits returned without labels keep the padded columns (they are never labels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import Tensor

from megatron_longalign import megatron_compat
from megatron_longalign.config.model import ModelConfig, RopeScalingConfig
from megatron_longalign.model.attention import CORE_ATTENTION_MODULES, packed_seq_params_from
from megatron_longalign.model.backends import (
    import_te_layer_spec_fn,
    resolve_attention_backend,
    sequence_parallel_problems,
)
from megatron_longalign.model.config import to_transformer_config
from megatron_longalign.model.fused_loss import chunked_linear_cross_entropy
from megatron_longalign.parallel.context_parallel import context_parallel_token_index

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = [
    "LongAlignGPTModel",
    "build_gpt_model",
    "gpt_layer_spec",
    "llama3_scaled_inv_freq",
    "model_inputs",
    "packed_seq_params_from",
    "rope_freqs",
]


def rope_freqs(inv_freq: Tensor, position_ids: Tensor) -> Tensor:
    """Rotary angles [..., dim] for integer positions [...] in megatron's non-interleaved
    layout (angles repeated for both halves), computed exactly as megatron's
    RotaryEmbedding does (fp32 position x inv_freq), so default positions match bit for
    bit."""
    inv_freq = inv_freq.to(device=position_ids.device, dtype=torch.float32)
    angles = position_ids.to(torch.float32)[..., None] * inv_freq
    return torch.cat([angles, angles], dim=-1)


def llama3_scaled_inv_freq(inv_freq: Tensor, scaling: RopeScalingConfig) -> Tensor:
    """Llama-3.1 RoPE scaling of the inverse frequencies, via megatron-core's
    `RotaryEmbedding._apply_scaling` (an adaptation of HF's `_compute_llama3_parameters`,
    identical to Meta's reference `apply_scaling`). With wavelength w = 2 pi / f,
    old = original_max_position_embeddings:
        w < old / high_freq_factor:  f                      (high frequencies kept)
        w > old / low_freq_factor:   f / factor             (low frequencies scaled)
        otherwise, s = (old / w - low_freq_factor) / (high_freq_factor - low_freq_factor):
                                     (1 - s) * f / factor + s * f
    megatron's GPTModel only exposes `factor` (the rest fixed at 1, 4, 8192), so we call
    its method with all four values (megatron_compat.py, section 3)."""
    return megatron_compat.llama3_scale_inv_freq(
        inv_freq,
        factor=scaling.factor,
        low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings,
    )


class LongAlignGPTModel(GPTModel):
    """GPTModel whose rotary embedding comes from `position_ids` (see module docstring).
    Everything else (embedding, decoder, output layer, loss) is megatron's."""

    attention_backend: str = ""
    # The unpadded vocabulary (ModelConfig.vocab_size); columns past it are padding.
    real_vocab_size: int | None = None

    # model.loss_impl and model.loss_chunk_tokens (null: auto).
    loss_impl: str = "standard"
    loss_chunk_tokens: int | None = None

    def _postprocess(self, hidden_states: Tensor, labels: Tensor | None = None, **kwargs: Any):
        """With labels in training, the chunked loss replaces megatron's output layer and
        cross entropy (model/fused_loss.py): per-token NLL [b, s], never the logits. Logits
        (no labels), inference and multi-token prediction go through megatron as is.
        (megatron_compat section 7: megatron calls `_postprocess` with keywords.)

        `loss_mask` [b, s], when given, is the loss weights w_t of the trainer's loss
        sum_t w_t nll_t (megatron's per-token loss mask, generalised to weights): the
        chunked loss then computes its gradients in forward (fused_loss `grad_hint`)."""
        fused = (
            self.loss_impl == "chunked"
            and labels is not None
            and self.post_process
            and kwargs.get("inference_context") is None
            and not kwargs.get("mtp_in_postprocess")
            and self.config.mtp_num_layers is None
        )
        if not fused:
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        return self._chunked_loss(hidden_states, labels, kwargs.get("loss_mask"))

    def _chunked_loss(
        self, hidden_states: Tensor, labels: Tensor, loss_weights: Tensor | None = None
    ) -> Tensor:
        """Per-token NLL [b, s] from hidden states [s(/TP under SP), b, h], with the same
        TP mapping as megatron's ColumnParallelLinear output layer: the sequence-parallel
        all-gather (reduce-scatter back), or a copy whose gradient is all-reduced."""
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        tp = self.pg_collection.tp
        tp_size = tp.size() if tp is not None else 1
        if self.config.sequence_parallel and tp_size > 1:
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True, group=tp
            )
        elif tp_size > 1:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp)
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.output_layer.weight
        seq, batch, hidden = hidden_states.shape
        local = weight.size(0)
        vocab_start = (tp.rank() if tp_size > 1 else 0) * local
        real = self.real_vocab_size if self.real_vocab_size is not None else self.vocab_size
        nll = chunked_linear_cross_entropy(
            hidden_states.reshape(seq * batch, hidden),
            weight,
            labels.transpose(0, 1).reshape(-1),
            vocab_start=vocab_start,
            valid_columns=min(max(real - vocab_start, 0), local),
            chunk_tokens=self.loss_chunk_tokens,
            group=tp if tp_size > 1 else None,
            grad_hint=None if loss_weights is None else loss_weights.transpose(0, 1).reshape(-1),
        )
        return nll.view(seq, batch).transpose(0, 1).contiguous()

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        return super().compute_language_model_loss(labels, self._mask_padded_vocab(logits))

    def _mask_padded_vocab(self, logits: Tensor) -> Tensor:
        """-inf on this TP rank's padded vocabulary columns (logits [s, b, V / TP])."""
        if self.real_vocab_size is None or self.real_vocab_size >= self.vocab_size:
            return logits
        local = logits.size(-1)
        first_padded = self.real_vocab_size - self.pg_collection.tp.rank() * local
        if first_padded >= local:
            return logits
        padded = torch.arange(local, device=logits.device) >= max(first_padded, 0)
        # In place: the output layer's fresh logits are not needed by any backward.
        return logits.masked_fill_(padded, float("-inf"))

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        # Only to make attention_mask optional: packed THD input has no mask.
        return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)

    def _preprocess(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        decoder_input: Tensor | None = None,
        inference_context: Any = None,
        packed_seq_params: PackedSeqParams | None = None,
        padding_mask: Tensor | None = None,
    ) -> tuple:
        output = super()._preprocess(
            input_ids=input_ids,
            position_ids=position_ids,
            decoder_input=decoder_input,
            inference_context=inference_context,
            packed_seq_params=packed_seq_params,
            padding_mask=padding_mask,
        )
        # Inference keeps megatron's own (KV-cache aware) rotary handling.
        rotary = megatron_compat.preprocess_rotary_pos_emb(output)
        if rotary is None or inference_context is not None:
            return output
        if position_ids is None:
            # megatron would silently restart positions per document, dropping SkipAlign's.
            raise ValueError(
                "position_ids are required: RoPE is computed from them (pass them on every "
                "pipeline stage, not only the first)"
            )
        rotary = self._rotary_from_positions(position_ids, packed_seq_params)
        return megatron_compat.with_preprocess_rotary_pos_emb(output, rotary)

    def _rotary_from_positions(
        self, position_ids: Tensor, packed_seq_params: PackedSeqParams | None
    ) -> Tensor:
        freqs = rope_freqs(self.rotary_pos_emb.inv_freq, position_ids)  # [B, S, dim]
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return freqs.transpose(0, 1)[:, :, None, :]  # [S, B, 1, dim]
        if position_ids.size(0) != 1:
            raise ValueError(
                f"THD input needs position_ids [1, T], got {tuple(position_ids.shape)}"
            )
        freqs = freqs[0][:, None, None, :]  # [T, 1, 1, dim]
        cu_seqlens = packed_seq_params.cu_seqlens_q_padded
        if cu_seqlens is None:
            cu_seqlens = packed_seq_params.cu_seqlens_q
        cp_group = self.pg_collection.cp
        cp_size = cp_group.size() if cp_group is not None else 1
        if cp_size > 1:
            return _place_for_context_parallel(freqs, cu_seqlens, cp_size, cp_group.rank())
        if freqs.size(0) != int(cu_seqlens[-1]):
            # megatron would silently fall back to per-document positions from 0.
            raise ValueError(
                f"position_ids cover {freqs.size(0)} tokens but cu_seqlens ends at "
                f"{int(cu_seqlens[-1])}"
            )
        return freqs


def _place_for_context_parallel(
    local: Tensor, cu_seqlens: Tensor, cp_size: int, cp_rank: int
) -> Tensor:
    """A [cu_seqlens[-1], ...] table whose rows megatron's THD RoPE reads on this CP rank
    hold this rank's local angles. Megatron reads the rows of the rank's two chunks of
    every (padded) document, back to back, document after document: TE's load-balanced
    layout (`context_parallel_token_index`)."""
    rows = context_parallel_token_index(cu_seqlens, cp_size, cp_rank)
    if rows.numel() != local.size(0):
        raise ValueError(
            f"{local.size(0)} local position ids, but cu_seqlens / CP {cp_size} give {rows.numel()}"
        )
    table = local.new_zeros(int(cu_seqlens[-1]), *local.shape[1:])
    table[rows.to(local.device)] = local
    return table


def gpt_layer_spec(backend: str) -> ModuleSpec:
    """Transformer layer spec for a resolved backend: megatron's TE spec for `te`; for
    the others, megatron's local spec (RMSNorm) with our core attention plugged in."""
    if backend == "te":
        return import_te_layer_spec_fn()(qk_layernorm=False)
    if backend not in CORE_ATTENTION_MODULES:
        raise ValueError(f"no layer spec for attention backend {backend!r}")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = CORE_ATTENTION_MODULES[backend]
    return spec


def build_gpt_model(
    model_config: ModelConfig,
    pre_process: bool = True,
    post_process: bool = True,
    *,
    transformer_config: TransformerConfig | None = None,
    backend: str | None = None,
    vp_stage: int | None = None,
    pg_collection: Any = None,
) -> LongAlignGPTModel:
    """Build the model for one pipeline stage.

    `transformer_config` defaults to `to_transformer_config(model_config)`; the trainer
    passes its own with parallelism/precision overrides. `backend` overrides
    `model_config.attention_backend`; the resolved name is `model.attention_backend`.
    """
    backend = resolve_attention_backend(backend or model_config.attention_backend)
    config = transformer_config or to_transformer_config(model_config)
    _check_transformer_config(config, backend)
    model = LongAlignGPTModel(
        config=config,
        transformer_layer_spec=gpt_layer_spec(backend),
        vocab_size=model_config.padded_vocab_size(config.tensor_model_parallel_size),
        max_sequence_length=model_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model_config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=model_config.rope_theta,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    if model_config.rope_scaling is not None:
        rope = model.rotary_pos_emb
        rope.inv_freq = llama3_scaled_inv_freq(rope.inv_freq, model_config.rope_scaling)
        model.rotary_scaling = True
    model.attention_backend = backend
    model.real_vocab_size = model_config.vocab_size
    model.loss_impl = model_config.loss_impl
    model.loss_chunk_tokens = model_config.loss_chunk_tokens
    return model


def _check_transformer_config(config: TransformerConfig, backend: str) -> None:
    problems = sequence_parallel_problems(backend, config.sequence_parallel)
    if problems:
        raise ValueError(problems[0])


def model_inputs(microbatch: Any, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Model keyword arguments for a data-pipeline MicroBatch (numpy THD arrays):
    input_ids/position_ids/labels as [1, T] int64 (this CP rank's tokens when sharded),
    and packed_seq_params (the whole micro-batch's document boundaries)."""

    def row(array) -> Tensor:
        return torch.as_tensor(array, dtype=torch.int64, device=device)[None]

    def int32(array) -> Tensor | None:
        return None if array is None else torch.as_tensor(array, dtype=torch.int32, device=device)

    return {
        "input_ids": row(microbatch.tokens),
        "position_ids": row(microbatch.position_ids),
        "labels": row(microbatch.labels),
        "packed_seq_params": packed_seq_params_from(
            int32(microbatch.cu_seqlens),
            microbatch.max_seqlen,
            cu_seqlens_padded=int32(microbatch.cu_seqlens_padded),
        ),
    }
