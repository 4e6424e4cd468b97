"""Per-GPU memory of one training rank: weights, gradients, optimizer state, activations
(under each recompute option), the logits buffer and a fixed overhead.

The derivation, the sources and the measured error are in docs/PLANNING.md. In short:

- parameters per rank: matrices split over TP, norms replicated, layers split over PP;
  the embedding sits on the first stage, the final norm and output layer on the last
  (a tied output weight still has its own copy on the last stage when PP > 1);
- bytes per parameter (`DeviceProfile`): weights, the fp32 `main_grad` buffer
  (`grad_reduce_in_fp32=True`), and optimizer state, which megatron's distributed
  optimizer shards over the data-parallel group *including* context parallel;
- activations: the tensors autograd keeps per layer and per token (Korthikanti et al.
  2022, section 4, redone for RMSNorm + GQA + SwiGLU + flash attention), times the
  micro-batches that 1F1B keeps in flight on a stage, plus one layer's working set;
- the last stage also holds the output layer and loss of one micro-batch, after
  `model.loss_impl`: `standard` holds the logits of the whole micro-batch (and the fp32
  softmax megatron's vocab-parallel cross entropy saves); `chunked` (model/fused_loss.py)
  holds the logits of one chunk of `model.loss_chunk_tokens` tokens at a time and an
  fp32 accumulator of the output-weight gradient.

Every number is in bytes; `GB` converts. Nothing here imports megatron; the chunked
loss's automatic chunk size comes from model/fused_loss.py (which imports torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_longalign.config.model import ModelConfig
from megatron_longalign.model.fused_loss import (
    AUTO_CHUNK_MULTIPLE,
    GPU_MIN_CHUNK_TOKENS,
    auto_chunk_tokens,
)

GB = 1e9  # decimal gigabytes, as GPU memory is sold ("80 GB")
RECOMPUTE_OPTIONS = ("none", "selective", "full")


@dataclass(frozen=True)
class DeviceProfile:
    """How the trainer stores things on one kind of device."""

    name: str
    weight_bytes: int  # model parameters (bf16 on GPU through Float16Module, fp32 on CPU)
    grad_bytes: int  # DDP main_grad buffer: fp32 because grad_reduce_in_fp32=True
    # Adam state per parameter with the fp32 master copy where there is one: bf16
    # params -> master 4 + m 4 + v 4; fp32 params -> m 4 + v 4 (megatron's optimizers
    # step the fp32 params themselves, see docs/PLANNING.md).
    optimizer_bytes: int
    activation_bytes: int  # dtype of saved activations
    # "flash": fused attention saves q, k, v, out (+ a per-row logsumexp) only.
    # "sdpa-math": torch's CPU SDPA math path (our sdpa backend loops over documents)
    # saves scaled q, repeated k and v, and the fp32 attention probabilities
    # heads x L_i^2 of every document.
    attention: str
    # Per-token elements an RMSNorm keeps, in units of hidden: TE's fused
    # LayerNorm+Linear keeps input and normalised output (2); torch's RMSNorm keeps
    # input, x * rstd and the output that the next linear saves (3).
    norm_saves: int
    overhead_bytes: float  # context, communication buffers, allocator fragmentation
    # Fewest tokens per automatic loss chunk (fused_loss: GPU_MIN_CHUNK_TOKENS on a GPU).
    min_loss_chunk_tokens: int = AUTO_CHUNK_MULTIPLE

    @property
    def fp32_params(self) -> bool:
        return self.weight_bytes == 4


GPU_BF16 = DeviceProfile(
    name="gpu-bf16",
    weight_bytes=2,
    grad_bytes=4,
    optimizer_bytes=12,
    activation_bytes=2,
    attention="flash",
    norm_saves=2,
    overhead_bytes=4 * GB,
    min_loss_chunk_tokens=GPU_MIN_CHUNK_TOKENS,
)
CPU_FP32 = DeviceProfile(
    name="cpu-fp32",
    weight_bytes=4,
    grad_bytes=4,
    optimizer_bytes=8,
    activation_bytes=4,
    attention="sdpa-math",
    norm_saves=3,
    overhead_bytes=0.0,
)
PROFILES = {p.name: p for p in (GPU_BF16, CPU_FP32)}


@dataclass(frozen=True)
class Layout:
    """One parallel layout and recompute choice. DP is what the GPU count leaves."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"  # none | selective (core_attn) | full (uniform, 1 layer)

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.cp, self.dp) < 1:
            raise ValueError(f"parallel sizes must be >= 1: {self}")
        if self.recompute not in RECOMPUTE_OPTIONS:
            raise ValueError(f"recompute={self.recompute!r}; choose one of {RECOMPUTE_OPTIONS}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tp > 1")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def label(self) -> str:
        sp = "+SP" if self.sequence_parallel else ""
        return f"TP{self.tp}{sp} PP{self.pp} CP{self.cp} DP{self.dp}"


@dataclass(frozen=True)
class Workload:
    """What one optimizer step processes: `global_batch_size` packed THD rows of
    `seq_length` tokens (micro_batch_size 1), each filled with documents of
    `document_length` tokens (None: one document filling the row, the worst case for
    attention) and a shorter last one for the remainder."""

    seq_length: int
    global_batch_size: int = 16
    document_length: int | None = None

    def __post_init__(self) -> None:
        if self.seq_length < 1 or self.global_batch_size < 1:
            raise ValueError("seq_length and global_batch_size must be >= 1")
        if self.document_length is not None and self.document_length < 1:
            raise ValueError("document_length must be >= 1")

    def pack_documents(self) -> list[int]:
        """Document lengths of one packed row."""
        length = min(self.document_length or self.seq_length, self.seq_length)
        full, rest = divmod(self.seq_length, length)
        return [length] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the busiest pipeline stage (`stage`) of one rank."""

    weights: float
    grads: float
    optimizer: float
    activations: float  # saved activations of the in-flight micro-batches + working set
    logits: float  # output layer + loss peak (`loss_impl`); 0 unless the last stage
    overhead: float
    stage: int = 0
    parameters: int = 0  # parameters held by this rank
    in_flight: int = 1  # micro-batches whose activations this stage holds
    loss_impl: str = "standard"  # model.loss_impl the logits term follows
    loss_chunk_tokens: int | None = None  # chunked: tokens per chunk (auto resolved)

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.grads
            + self.optimizer
            + self.activations
            + self.logits
            + self.overhead
        )

    def as_gb(self) -> dict[str, float]:
        parts = ("weights", "grads", "optimizer", "activations", "logits", "overhead")
        out = {name: getattr(self, name) / GB for name in parts}
        out["total"] = self.total / GB
        return out


# ---- parameters ----------------------------------------------------------------------


def layer_parameters(model: ModelConfig, tp: int = 1) -> int:
    """Parameters of one transformer layer on one TP rank: QKV (GQA), output projection
    and SwiGLU (gate, up, down) split over TP; the two RMSNorm weights replicated."""
    hidden, head_dim = model.hidden_size, model.head_dim
    qkv_width = (model.num_attention_heads + 2 * model.query_groups) * head_dim
    qkv = hidden * qkv_width + (qkv_width if model.qkv_bias else 0)
    proj = model.num_attention_heads * head_dim * hidden
    mlp = 3 * hidden * model.ffn_hidden_size
    return (qkv + proj + mlp) // tp + 2 * hidden


def stage_parameters(model: ModelConfig, tp: int = 1, pp: int = 1) -> list[int]:
    """Parameters of one TP rank on each pipeline stage (megatron's padded vocabulary).
    Layers are split evenly (`pp` must divide num_layers)."""
    if model.num_layers % pp:
        raise ValueError(f"pipeline size {pp} must divide num_layers ({model.num_layers})")
    per_stage = model.num_layers // pp * layer_parameters(model, tp)
    vocab_rows = model.padded_vocab_size(tp) // tp
    embedding = vocab_rows * model.hidden_size
    stages = [per_stage] * pp
    stages[0] += embedding
    # Final norm and output layer. Tied weights share the embedding on a single stage;
    # with PP > 1 megatron keeps a copy on the last stage and syncs its gradient.
    stages[-1] += model.hidden_size
    if not model.tie_word_embeddings or pp > 1:
        stages[-1] += embedding
    return stages


def total_parameters(model: ModelConfig) -> int:
    """The model's parameter count with the true (unpadded) vocabulary, as published
    (Llama-2-7B 6.74B, Llama-3-8B 8.03B)."""
    embedding = model.vocab_size * model.hidden_size
    output = 0 if model.tie_word_embeddings else embedding
    return model.num_layers * layer_parameters(model) + model.hidden_size + embedding + output


# ---- activations ---------------------------------------------------------------------


def _local_tokens(workload: Workload, layout: Layout) -> float:
    return workload.seq_length / layout.cp


def _attention_square_elements(model: ModelConfig, workload: Workload, layout: Layout) -> float:
    """heads x sum_i L_i^2 of one micro-batch on one rank: the attention probabilities
    the CPU math path keeps (heads split over TP, documents split over CP)."""
    heads = model.num_attention_heads / layout.tp
    squares = sum(length * length for length in workload.pack_documents())
    return heads * squares / layout.cp  # CP splits rows; kept for completeness


def layer_activation_bytes(
    model: ModelConfig, layout: Layout, workload: Workload, profile: DeviceProfile
) -> float:
    """Bytes one layer keeps for backward for one micro-batch on one rank, under
    `layout.recompute` (full: only the layer input)."""
    tokens = _local_tokens(workload, layout)
    t, b = layout.tp, profile.activation_bytes
    hidden = model.hidden_size
    sp_div = t if layout.sequence_parallel else 1  # norms and residual split only with SP
    if layout.recompute == "full":
        return tokens * hidden / sp_div * b
    q_width = model.num_attention_heads * model.head_dim
    kv_width = model.query_groups * model.head_dim
    norms = 2 * profile.norm_saves * hidden / sp_div
    mlp = 4 * model.ffn_hidden_size / t  # fc1 out (gate|up), silu(gate), product
    if profile.attention == "flash" or layout.recompute == "selective":
        # q, k, v after RoPE and the attention output (input of the projection);
        # selective core_attn recompute keeps exactly the checkpoint's inputs + output.
        attention = (2 * q_width + 2 * kv_width) / t
        squares = 0.0
    else:
        # sdpa math: scaled q, repeated k, repeated v, the concatenated output and the
        # fp32 probabilities of every document.
        attention = 4 * q_width / t
        squares = _attention_square_elements(model, workload, layout)
    return tokens * (norms + attention + mlp) * b + squares * b


def layer_working_bytes(
    model: ModelConfig, layout: Layout, workload: Workload, profile: DeviceProfile
) -> float:
    """Transient memory of one layer's backward on top of what is stored.

    Gradient temporaries are taken as one layer's no-recompute activations without the
    attention probabilities (the gradients of fc1's output, of the SwiGLU product, of
    q/k/v, ... have the same shapes as the saved tensors), plus, on the sdpa math path,
    the gradients of the longest document's probabilities and scores (2 x heads x L^2).
    Recompute adds what it rebuilds before that backward: full recompute the whole
    layer, selective core_attn the attention probabilities (math path only)."""
    none = Layout(layout.tp, layout.pp, layout.cp, layout.dp, layout.sequence_parallel, "none")
    b = profile.activation_bytes
    full_layer = layer_activation_bytes(model, none, workload, profile)
    squares = 0.0
    if profile.attention == "sdpa-math":
        squares = _attention_square_elements(model, workload, none) * b
    heads = model.num_attention_heads / layout.tp
    longest = max(workload.pack_documents())
    gradients = full_layer - squares
    if profile.attention == "sdpa-math":
        gradients += 2 * heads * longest * longest / layout.cp * b
    if layout.recompute == "full":
        return full_layer + gradients
    if layout.recompute == "selective":
        return squares + gradients
    return gradients


def logits_bytes(model: ModelConfig, layout: Layout, workload: Workload, profile: DeviceProfile):
    """Peak of the output layer + megatron's vocab-parallel cross entropy for one
    micro-batch (`model.loss_impl=standard`): logits in the activation dtype plus their
    fp32 copy (exp'd in place and saved as the softmax). With fp32 activations
    `.float()` is a no-op: one buffer."""
    tokens = _local_tokens(workload, layout)
    vocab = model.padded_vocab_size(layout.tp) / layout.tp
    per_element = 4 + (profile.activation_bytes if profile.activation_bytes != 4 else 0)
    return tokens * vocab * per_element


def loss_chunk_tokens(model: ModelConfig, layout: Layout, profile: DeviceProfile = GPU_BF16) -> int:
    """Tokens per chunk of the chunked loss on `layout`: `model.loss_chunk_tokens`, or
    when null what the model uses on `profile`'s device, `fused_loss.auto_chunk_tokens`
    of one TP rank's padded vocabulary (fp32 chunk logits of about 256 MiB, at least
    2048 tokens on a GPU: Llama-3's 128,256 gets 2048 tokens at TP 1 and 2, 4096 at TP 8;
    on the CPU 512 at TP 1)."""
    if model.loss_chunk_tokens is not None:
        return model.loss_chunk_tokens
    vocab = model.padded_vocab_size(layout.tp) // layout.tp
    return auto_chunk_tokens(vocab, min_tokens=profile.min_loss_chunk_tokens)


# fp32: the chunked loss accumulates the LSE and the weight gradient in fp32 whatever
# the logits' dtype (fused_loss._accumulation_dtype; fp64 is for reference tests only).
_ACCUMULATION_BYTES = 4
# Per token, kept from the chunked loss's forward to its backward: the LSE (fp32), the
# local labels (int64) and the label-ownership mask (bool).
_CHUNKED_SAVED_PER_TOKEN = 4 + 8 + 1


def chunked_loss_bytes(
    model: ModelConfig, layout: Layout, workload: Workload, profile: DeviceProfile
) -> float:
    """Peak of model/fused_loss.py's chunked linear cross entropy for one micro-batch on
    one TP rank (`model.loss_impl=chunked`), read off the code line by line and checked
    against the profiler (tests/planning/test_loss_memory.py). T = seq/CP tokens (the
    whole TP group's: sequence parallelism gathers them), V = V_pad/TP, h hidden, chunks
    of c = min(chunk tokens, T) tokens, `a` the activation dtype's bytes, `w` the
    weights', 4 the fp32 accumulation, `low` = a when a < 4 (a matmul output before its
    fp32 copy), else 0. One chunk's buffers exist at a time:

    - kept from forward to backward: per-token LSE, labels and mask (13 T), and with
      sequence parallelism the gathered hidden states (T h a: megatron's output layer
      keeps its input un-gathered instead);
    - forward: a chunk's matmul output and its fp32 copy, c (low + 4) V;
    - backward: the weight gradient (w V h), the hidden-state gradient (T h a) and, unless
      everything is fp32 (then it accumulates in the gradient itself), an fp32
      accumulator (4 V h) all along; plus the larger of a chunk's logits and their fp32
      gradient, c (low + 4) V, and, with low < 4, the chunk's gradient in `a` bytes with
      one block of the weight-gradient GEMM (rows of 2 c V / 3 h, in `a` bytes and fp32).

    Before the first layer's backward, like the standard logits."""
    tokens = _local_tokens(workload, layout)
    vocab = model.padded_vocab_size(layout.tp) / layout.tp
    hidden = model.hidden_size
    acc = _ACCUMULATION_BYTES
    act = profile.activation_bytes
    low = act if act != acc else 0
    chunk = min(loss_chunk_tokens(model, layout, profile), tokens)
    weight = vocab * hidden

    saved = tokens * _CHUNKED_SAVED_PER_TOKEN
    if layout.sequence_parallel:
        saved += tokens * hidden * act
    forward = chunk * (low + acc) * vocab
    all_fp32 = act == acc and profile.weight_bytes == acc
    kept = profile.weight_bytes * weight + tokens * hidden * act + (0 if all_fp32 else acc * weight)
    phases = [chunk * (low + acc) * vocab]
    if low:
        block_rows = min(vocab, max(1, 2 * chunk * vocab // (3 * hidden)))
        phases.append(chunk * low * vocab + block_rows * hidden * (low + acc))
    return saved + max(forward, kept + max(phases))


def loss_bytes(model: ModelConfig, layout: Layout, workload: Workload, profile: DeviceProfile):
    """The last stage's output layer + loss peak for `model.loss_impl`."""
    if model.loss_impl == "chunked":
        return chunked_loss_bytes(model, layout, workload, profile)
    return logits_bytes(model, layout, workload, profile)


def in_flight_microbatches(layout: Layout, num_microbatches: int, stage: int) -> int:
    """1F1B: stage i runs PP - i warm-up forwards before its first backward, so it holds
    that many micro-batches' activations (never more than there are)."""
    return max(1, min(layout.pp - stage, num_microbatches))


def num_microbatches(layout: Layout, workload: Workload) -> int:
    """Micro-batches per data-parallel rank per step (micro_batch_size 1)."""
    return max(1, math.ceil(workload.global_batch_size / layout.dp))


# ---- the estimate ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Stage:
    index: int
    parameters: int
    layers: int


def estimate_memory(
    model: ModelConfig,
    layout: Layout,
    workload: Workload,
    profile: DeviceProfile = GPU_BF16,
    *,
    distributed_optimizer: bool = True,
    overhead_bytes: float | None = None,
) -> MemoryEstimate:
    """Peak bytes of one rank on the busiest pipeline stage."""
    stages = stage_parameters(model, layout.tp, layout.pp)
    layers = model.num_layers // layout.pp
    shards = layout.dp * layout.cp if distributed_optimizer else 1
    per_layer = layer_activation_bytes(model, layout, workload, profile)
    working = layer_working_bytes(model, layout, workload, profile)
    microbatches = num_microbatches(layout, workload)
    overhead = profile.overhead_bytes if overhead_bytes is None else overhead_bytes
    chunk_tokens = (
        loss_chunk_tokens(model, layout, profile) if model.loss_impl == "chunked" else None
    )
    best: MemoryEstimate | None = None
    for index, params in enumerate(stages):
        in_flight = in_flight_microbatches(layout, microbatches, index)
        stored = in_flight * layers * per_layer
        logits = 0.0
        if index == layout.pp - 1:
            # Final norm and output-layer input of the one micro-batch in its backward.
            sp_div = layout.tp if layout.sequence_parallel else 1
            tokens = _local_tokens(workload, layout)
            head = profile.norm_saves * model.hidden_size / sp_div
            stored += tokens * head * profile.activation_bytes
            logits = loss_bytes(model, layout, workload, profile)
        # The loss peak (its forward, or its backward, the first) comes before the first
        # layer backward: the larger of the two transients counts, not both.
        extra_working = max(0.0, working - logits)
        estimate = MemoryEstimate(
            weights=params * profile.weight_bytes,
            grads=params * profile.grad_bytes,
            optimizer=params * profile.optimizer_bytes / shards,
            activations=stored + extra_working,
            logits=logits,
            overhead=overhead,
            stage=index,
            parameters=params,
            in_flight=in_flight,
            loss_impl=model.loss_impl,
            loss_chunk_tokens=chunk_tokens,
        )
        if best is None or estimate.total > best.total:
            best = estimate
    assert best is not None
    return best


def estimate_all_recompute(
    model: ModelConfig,
    layout: Layout,
    workload: Workload,
    profile: DeviceProfile = GPU_BF16,
    options: Sequence[str] = RECOMPUTE_OPTIONS,
    **kwargs,
) -> dict[str, MemoryEstimate]:
    """`estimate_memory` for each recompute option of `layout`'s parallel sizes."""
    out = {}
    for option in options:
        variant = Layout(
            layout.tp, layout.pp, layout.cp, layout.dp, layout.sequence_parallel, option
        )
        out[option] = estimate_memory(model, variant, workload, profile, **kwargs)
    return out
