"""Training metrics: model FLOPs and MFU, throughput, peak memory, loss by document
length, and the stable per-step metric dict (names listed in docs/TRAINING.md "Resume and
logging" and docs/PERFORMANCE.md; this module owns them).

FLOPs of one training step (forward + backward), over the real documents only:

    6 * matmul_params * sum_i L_i  +  6 * n_layers * (n_heads * head_dim) * sum_i L_i^2

`n_heads * head_dim` is `hidden_size` for every supported family (docs/PERFORMANCE.md
writes it as hidden). The first term is the weight matmuls (2 FLOPs per multiply-add forward,
twice that backward); the second is causal attention per document: QK^T and AV cost
2 * d * L^2 each forward without a mask, causality halves that, backward doubles it
(4 * d * L^2 -> 2 * d * L^2 causal -> x3 for fwd+bwd = 6 * d * L^2 per layer). A pack
of documents costs sum L_i^2, never T^2. These are model FLOPs: activation
recomputation and flash-attention's backward recompute are not counted, as in the
usual MFU definition (PaLM, appendix B). See docs/PERFORMANCE.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from megatron_longalign.data.preprocess_stats import HISTOGRAM_EDGES
from megatron_longalign.utils.memory import peak_rss_bytes

if TYPE_CHECKING:
    from megatron_longalign.config.model import ModelConfig
    from megatron_longalign.data.microbatch import MicroBatch
    from megatron_longalign.data.planner import GlobalBatch

# The metric names (docs/PERFORMANCE.md "Reported metrics", docs/TRAINING.md "Metrics"):
# this module owns them; the trainer and the console line (training/logger.py) use these.
LOSS = "train/loss"
LR = "train/lr"
GRAD_NORM = "train/grad_norm"
TOKENS_PER_SEC = "perf/tokens_per_sec"
TFLOPS_PER_GPU = "perf/tflops_per_gpu"
MFU = "perf/mfu"
STEP_TIME = "perf/step_time_s"
PACKING_EFFICIENCY = "data/packing_efficiency"
RANK_IMBALANCE = "data/rank_imbalance"
PEAK_MEMORY = "mem/peak_gb"
# The trainer's additions to a logged step, and StepResult.metrics()'s.
TOKEN_MEAN_LOSS = "train/token_mean_loss"
EPOCH = "train/epoch"
CONSUMED_SAMPLES = "train/consumed_samples"
SKIPPED_STEPS = "train/skipped_steps"
SKIPPED = "train/skipped"

# The per-step metric dict's keys, in order: also the console line's order. `perf/mfu`
# is left out of a step's dict when the accelerator's peak is unknown;
# `loss_by_len/<bucket>` keys follow for the buckets that saw a document.
METRIC_KEYS = (
    LOSS,
    LR,
    GRAD_NORM,
    TOKENS_PER_SEC,
    TFLOPS_PER_GPU,
    MFU,
    STEP_TIME,
    PACKING_EFFICIENCY,
    RANK_IMBALANCE,
    PEAK_MEMORY,
)
LOSS_BY_LEN_PREFIX = "loss_by_len/"
# Validation (training/validation.py, docs/TRAINING.md "Validation"): the configured loss
# reduction over the validation set, the token mean, and loss by length.
VALID_PREFIX = "valid/"
VALID_LOSS = "valid/loss"
VALID_TOKEN_LOSS = "valid/token_loss"
VALID_SEQUENCES = "valid/sequences"
VALID_TARGET_TOKENS = "valid/target_tokens"
VALID_KEYS = (VALID_LOSS, VALID_TOKEN_LOSS, VALID_SEQUENCES, VALID_TARGET_TOKENS)

# ---- model FLOPs --------------------------------------------------------------------


def _as_numpy_int(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64)


def matmul_params(config: ModelConfig) -> int:
    """Weights that take part in a matmul for every token: Q/K/V (GQA: K and V have
    `query_groups` heads), the attention output projection, the SwiGLU MLP (gate, up,
    down) per layer, and the LM head. The embedding lookup is a gather, not a matmul, so
    it is left out; the LM head is counted even when tied to the embedding, because the
    output projection is a full matmul either way. Norm weights and Qwen's QKV bias are
    elementwise, not matmuls. Uses the true vocabulary: megatron's padded rows are never
    labels, so like padding tokens they are not useful work."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_width = config.num_attention_heads * head_dim
    kv_width = 2 * config.query_groups * head_dim
    qkv = hidden * (q_width + kv_width)
    attention_out = q_width * hidden
    mlp = 3 * hidden * config.ffn_hidden_size
    lm_head = config.vocab_size * hidden
    return config.num_layers * (qkv + attention_out + mlp) + lm_head


def attention_flops_coefficient(config: ModelConfig) -> int:
    """c in `c * sum_i L_i^2`: causal attention FLOPs (fwd + bwd) per squared document
    length, summed over layers."""
    return 6 * config.num_layers * config.num_attention_heads * config.head_dim


def training_flops(config: ModelConfig, document_lengths: Iterable[int] | np.ndarray) -> float:
    """Model FLOPs of forward + backward over these real documents (see module doc).
    Pass real lengths only: pad documents and naive padding are not useful work."""
    lengths = _as_numpy_int(
        document_lengths if isinstance(document_lengths, np.ndarray) else list(document_lengths)
    )
    if lengths.size and int(lengths.min()) < 0:
        raise ValueError("document lengths must be >= 0")
    # Python ints: 6 * params * tokens overflows int64 at realistic sizes, and float64
    # sums of squares would round; the products stay exact until the final float().
    tokens = int(lengths.sum())
    squares = int((lengths * lengths).sum())
    linear = 6 * matmul_params(config) * tokens
    attention = attention_flops_coefficient(config) * squares
    return float(linear + attention)


def document_lengths_from(
    microbatch: MicroBatch, sample_lengths: np.ndarray | None = None
) -> np.ndarray:
    """Real document lengths of a micro-batch, in document order, pad documents left out.

    The real documents are the first `len(sample_ids)` entries of `cu_seqlens` (the
    builder appends pad documents after them). Naive batching pads inside each document,
    so their spans overstate the real lengths; that is detected (spans sum to more than
    `num_real_tokens`) and then `sample_lengths` (e.g. `planner.lengths`, indexed by
    global sample id) is required."""
    sample_ids = np.asarray(microbatch.sample_ids, dtype=np.int64)
    if sample_lengths is not None:
        return np.asarray(sample_lengths, dtype=np.int64)[sample_ids]
    cu_seqlens = np.asarray(microbatch.cu_seqlens, dtype=np.int64)
    spans = np.diff(cu_seqlens[: sample_ids.size + 1])
    if int(spans.sum()) != int(microbatch.num_real_tokens):
        raise ValueError(
            f"the micro-batch's documents hold {int(spans.sum())} tokens but only "
            f"{microbatch.num_real_tokens} are real (naive batching pads inside documents); "
            "pass sample_lengths=planner.lengths to get the real lengths"
        )
    return spans


def batch_document_lengths(batch: GlobalBatch, sample_lengths: np.ndarray) -> np.ndarray:
    """Real lengths of every document of a global batch, over all ranks and micro-batches.
    Every rank has the whole plan, so the step's global FLOPs need no communication."""
    ids = [plan.samples for rank in batch.micro_batches for plan in rank]
    if not ids:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(sample_lengths, dtype=np.int64)[np.concatenate(ids).astype(np.int64)]


def packing_efficiency(
    real_tokens: int, num_micro_batches: int, micro_batch_size: int, seq_length: int
) -> float:
    """Real tokens / token budget (micro-batches x micro_batch_size x seq_length): the
    `fill` of data/pack_stats.py. Padding, pad documents and empty micro-batches lower it."""
    budget = num_micro_batches * micro_batch_size * seq_length
    return real_tokens / budget if budget else 0.0


def batch_packing_efficiency(batch: GlobalBatch, micro_batch_size: int, seq_length: int) -> float:
    """`packing_efficiency` of one global batch, all data-parallel ranks together."""
    micro_batches = sum(len(rank) for rank in batch.micro_batches)
    return packing_efficiency(batch.real_tokens, micro_batches, micro_batch_size, seq_length)


# ---- accelerator peaks --------------------------------------------------------------

_T = 1e12
# Dense (no 2:4 sparsity) tensor-core peaks per GPU, FLOP/s; plain fp32 is the non-tensor
# core rate. Sources, halving the datasheets' "with sparsity" figures:
# - H100 SXM5 and PCIe: NVIDIA H100 Tensor Core GPU Architecture whitepaper (table 3):
#   SXM5 BF16/FP16 989.4, TF32 494.7, FP8 1978.9, FP32 66.9 TFLOPS;
#   PCIe BF16/FP16 756, TF32 378, FP8 1513, FP32 51.2 TFLOPS.
# - H100 NVL and H200 NVL: NVIDIA H100 / H200 datasheets, NVL column: BF16 1,671*,
#   TF32 835*, FP8 3,341* (*sparse), FP32 60 TFLOPS.
# - H200 SXM: NVIDIA H200 datasheet: BF16 1,979*, TF32 989*, FP8 3,958*, FP32 67 TFLOPS
#   (the H100 SXM5 compute; only the memory differs). GH200: same GPU compute (GH200
#   datasheet FP8 3,958*, BF16 1,979*).
# - A100 40GB and 80GB, SXM4 and PCIe: NVIDIA A100 datasheet: BF16/FP16 312,
#   TF32 156, FP32 19.5 TFLOPS; no FP8.
_H100_SXM = {"bf16": 989.4 * _T, "tf32": 494.7 * _T, "fp8": 1978.9 * _T, "fp32": 66.9 * _T}
_NVL = {"bf16": 835.5 * _T, "tf32": 417.5 * _T, "fp8": 1670.5 * _T, "fp32": 60.0 * _T}
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h100_sxm": _H100_SXM,
    "h100_pcie": {"bf16": 756.0 * _T, "tf32": 378.0 * _T, "fp8": 1513.0 * _T, "fp32": 51.2 * _T},
    "h100_nvl": _NVL,
    "h200_sxm": _H100_SXM,
    "h200_nvl": _NVL,
    "gh200": _H100_SXM,
    "a100": {"bf16": 312.0 * _T, "tf32": 156.0 * _T, "fp32": 19.5 * _T},
}
_DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "bf16",  # same tensor-core rate as bf16 on all of these
    "float16": "bf16",
    "half": "bf16",
    "tf32": "tf32",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "fp8": "fp8",
}


def accelerator_kind(device_name_or_kind: str | None) -> str | None:
    """Key of PEAK_FLOPS for a CUDA device name ("NVIDIA H100 80GB HBM3",
    "NVIDIA A100-SXM4-40GB", "NVIDIA H200"), a machine kind ("nvidia-h200") or a key
    itself; None when unknown (CPU, other GPUs)."""
    if not device_name_or_kind:
        return None
    name = device_name_or_kind.lower()
    if name in PEAK_FLOPS:
        return name
    if "gh200" in name:
        return "gh200"
    if "h200" in name:
        return "h200_nvl" if "nvl" in name else "h200_sxm"
    if "h100" in name:
        if "pcie" in name:
            return "h100_pcie"
        # "NVIDIA H100 80GB HBM3" is how torch names the SXM5 part.
        return "h100_nvl" if "nvl" in name else "h100_sxm"
    if "a100" in name:
        return "a100"
    return None


def peak_flops(device_name_or_kind: str | None, dtype: str) -> float | None:
    """Dense peak FLOP/s of one accelerator for matmuls in `dtype` (bf16, fp16, tf32,
    fp32, fp8); None when the device is unknown or has no such rate, so that MFU is
    not reported rather than made up."""
    key = _DTYPE_ALIASES.get(dtype.lower())
    if key is None:
        raise ValueError(f"dtype {dtype!r}; choose one of {sorted(set(_DTYPE_ALIASES))}")
    kind = accelerator_kind(device_name_or_kind)
    return PEAK_FLOPS[kind].get(key) if kind else None


def matmul_dtype(params_dtype: torch.dtype) -> str:
    """The dtype whose peak applies: fp32 matmuls run on TF32 tensor cores only when
    torch allows it."""
    if params_dtype == torch.bfloat16:
        return "bf16"
    if params_dtype == torch.float16:
        return "fp16"
    if params_dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    raise ValueError(f"no peak FLOPs entry for {params_dtype}")


def detect_device_name() -> str | None:
    """This process's CUDA device name, or None on CPU."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


# ---- time, throughput, memory -------------------------------------------------------


def cuda_synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer:
    """Wall time of a step. CUDA kernels run asynchronously, so queued work is drained
    at both ends; otherwise the timer would measure kernel launches, not the step.
    `clock` and `synchronize` are injectable for tests."""

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        synchronize: Callable[[], None] = cuda_synchronize,
    ) -> None:
        self._clock = clock
        self._synchronize = synchronize
        self._start: float | None = None
        self.elapsed = 0.0

    def start(self) -> None:
        self._synchronize()
        self._start = self._clock()

    def stop(self) -> float:
        if self._start is None:
            raise RuntimeError("StepTimer.stop() without start()")
        self._synchronize()
        self.elapsed = self._clock() - self._start
        self._start = None
        return self.elapsed

    def __enter__(self) -> StepTimer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass(frozen=True)
class Throughput:
    """Averages over the steps of one logging window."""

    steps: int
    seconds: float
    tokens: int
    flops: float
    tokens_per_sec: float  # real tokens per second, whole job (all GPUs)
    tflops_per_gpu: float  # achieved model TFLOP/s per GPU
    mfu: float | None  # achieved / peak per GPU; None when the peak is unknown
    step_time_s: float  # mean wall time of a step


class ThroughputMeter:
    """Sums real tokens, model FLOPs and wall time over steps (each step's global
    values: all data-parallel ranks), and reports them per GPU over `num_gpus`, every GPU
    of the job (TP x PP x CP x DP), because they all work on those FLOPs."""

    def __init__(self, num_gpus: int, peak_flops_per_gpu: float | None) -> None:
        if num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
        self.num_gpus = num_gpus
        self.peak_flops_per_gpu = peak_flops_per_gpu
        self.reset()

    def reset(self) -> None:
        self.steps, self.seconds, self.tokens, self.flops = 0, 0.0, 0, 0.0

    def update(self, tokens: int, flops: float, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"step time must be >= 0, got {seconds}")
        self.steps += 1
        self.tokens += int(tokens)
        self.flops += float(flops)
        self.seconds += float(seconds)

    def summary(self) -> Throughput:
        seconds = self.seconds
        per_gpu = self.flops / seconds / self.num_gpus if seconds > 0 else 0.0
        mfu = per_gpu / self.peak_flops_per_gpu if self.peak_flops_per_gpu else None
        return Throughput(
            steps=self.steps,
            seconds=seconds,
            tokens=self.tokens,
            flops=self.flops,
            tokens_per_sec=self.tokens / seconds if seconds > 0 else 0.0,
            tflops_per_gpu=per_gpu / 1e12,
            mfu=mfu if seconds > 0 else None,
            step_time_s=seconds / self.steps if self.steps else 0.0,
        )


def peak_memory_source() -> str:
    """What `peak_memory_gb` measures here; put it next to the number."""
    if torch.cuda.is_available():
        return "cuda max_memory_allocated"
    return "cpu peak RSS"


def peak_memory_gb() -> float:
    """Peak memory in GiB (2^30 bytes). On GPU: torch.cuda.max_memory_allocated (tensors
    only, not the allocator's cache). On CPU: the process's peak resident set size
    (utils/memory.py), which also counts the interpreter and libraries; see
    `peak_memory_source`."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss_bytes() / 2**30


# ---- loss by document length --------------------------------------------------------


def _short(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 else str(n)


def bucket_labels(edges: Sequence[int] = HISTOGRAM_EDGES) -> list[str]:
    """ "0-512", "512-1k", ..., "64k-128k", "128k+": short, chart-friendly names for the
    preprocessing histogram's buckets [0, 512), [512, 1k), ..., [128k, inf)."""
    labels = [f"{_short(lo)}-{_short(hi)}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return [*labels, f"{_short(edges[-1])}+"]


class LossByLength:
    """Mean over documents of each document's mean target-token loss, per length bucket.

    A document's loss is the plain mean of its token losses where `loss_weights > 0`
    (documents with no target, such as pad documents, are skipped). Sums stay on the
    losses' device, so `add` never waits for the GPU; `means()` reads them back.
    Under context parallelism each rank holds part of every document: `add` then takes
    the CP group and sums the per-document parts over it before taking means."""

    def __init__(self, edges: Sequence[int] = HISTOGRAM_EDGES) -> None:
        self.edges = np.asarray(edges, dtype=np.int64)
        self.labels = bucket_labels(edges)
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(len(self.labels), dtype=torch.float64)
        self._counts = torch.zeros(len(self.labels), dtype=torch.float64)

    def bucket_of(self, lengths) -> np.ndarray:
        """Bucket index of each length (same rule as the preprocessing histogram)."""
        return np.searchsorted(self.edges, _as_numpy_int(lengths), side="right") - 1

    def add(
        self, token_losses, loss_weights, cu_seqlens, document_lengths=None, cp_group=None
    ) -> None:
        """One micro-batch (THD): token losses and weights (T,), cu_seqlens (D + 1,).
        `document_lengths` (real lengths of the first documents) buckets by real length
        when naive padding makes the spans longer; otherwise spans are used. With
        `cp_group` the arrays are this rank's shares (cu_seqlens in local tokens), and
        the call is collective over the group."""
        losses = torch.as_tensor(token_losses).detach().reshape(-1).to(torch.float64)
        weights = torch.as_tensor(loss_weights, device=losses.device).reshape(-1)
        bounds = _as_numpy_int(cu_seqlens)
        if weights.numel() != losses.numel() or bounds[-1] > losses.numel():
            raise ValueError("token_losses, loss_weights and cu_seqlens disagree on T")
        lengths = np.diff(bounds)
        if document_lengths is not None:
            real = _as_numpy_int(document_lengths)
            lengths[: real.size] = real
        sums, counts = self._per_document(losses, weights > 0, bounds)
        if cp_group is not None:
            both = torch.stack([sums, counts])
            torch.distributed.all_reduce(both, group=cp_group)
            sums, counts = both[0], both[1]
        has_target = counts > 0
        means = torch.where(has_target, sums / counts.clamp(min=1), torch.zeros_like(sums))
        buckets = torch.as_tensor(self.bucket_of(lengths), device=losses.device)
        self._move_to(losses.device)
        self._sums.index_add_(0, buckets, means)
        self._counts.index_add_(0, buckets, has_target.to(torch.float64))

    def add_microbatch(
        self, microbatch: MicroBatch, token_losses, sample_lengths=None, cp_group=None
    ) -> None:
        """`add` for a MicroBatch (a CP shard needs its `cp_group`); real lengths as in
        `document_lengths_from`."""
        if microbatch.cp_size > 1 and cp_group is None:
            raise ValueError("a context-parallel shard needs cp_group to sum documents over")
        self.add(
            token_losses,
            microbatch.loss_weights,
            microbatch.local_document_bounds,
            document_lengths_from(microbatch, sample_lengths),
            cp_group=cp_group if microbatch.cp_size > 1 else None,
        )

    @staticmethod
    def _per_document(losses: torch.Tensor, targets: torch.Tensor, bounds: np.ndarray):
        # Prefix sums read at the document boundaries: per-document sums in two gathers.
        zero = losses.new_zeros(1)
        loss_prefix = torch.cat([zero, torch.cumsum(losses * targets, 0)])
        count_prefix = torch.cat([zero, torch.cumsum(targets.to(torch.float64), 0)])
        index = torch.as_tensor(bounds, device=losses.device)
        sums = loss_prefix[index[1:]] - loss_prefix[index[:-1]]
        counts = count_prefix[index[1:]] - count_prefix[index[:-1]]
        return sums, counts

    def _move_to(self, device: torch.device) -> None:
        if self._sums.device != device:
            self._sums, self._counts = self._sums.to(device), self._counts.to(device)

    def all_reduce(self, group=None) -> None:
        """Sum the buckets over `group` (the data-parallel group), so rank 0 logs every
        rank's documents. Collective: every rank of the group must call it."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_backend(group) == "nccl":
            self._move_to(torch.device("cuda", torch.cuda.current_device()))
        both = torch.stack([self._sums, self._counts])
        dist.all_reduce(both, group=group)
        self._sums, self._counts = both[0].clone(), both[1].clone()

    def merge(self, other: LossByLength) -> None:
        """Add the documents of `other` (same buckets), e.g. one step's into a window."""
        if other.labels != self.labels:
            raise ValueError(f"buckets differ: {other.labels} vs {self.labels}")
        self._move_to(other._sums.device)
        self._sums += other._sums
        self._counts += other._counts

    def means(self) -> dict[str, float]:
        """`loss_by_len/<bucket>` -> mean document loss, for buckets with a document."""
        sums, counts = self._sums.cpu().numpy(), self._counts.cpu().numpy()
        return {
            f"{LOSS_BY_LEN_PREFIX}{label}": float(s / c)
            for label, s, c in zip(self.labels, sums, counts, strict=True)
            if c > 0
        }


# ---- the per-step metric dict -------------------------------------------------------


def step_metrics(
    *,
    loss: float,
    lr: float,
    grad_norm: float,
    throughput: Throughput,
    packing_efficiency: float,
    rank_imbalance: float,
    peak_memory_gb: float,
    loss_by_len: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The stable metric dict of one logged step: METRIC_KEYS in order (`perf/mfu` only
    when the peak is known), then `loss_by_len/*`. Tensors are read with float()."""
    values = {
        LOSS: float(loss),
        LR: float(lr),
        GRAD_NORM: float(grad_norm),
        TOKENS_PER_SEC: throughput.tokens_per_sec,
        TFLOPS_PER_GPU: throughput.tflops_per_gpu,
        MFU: throughput.mfu,
        STEP_TIME: throughput.step_time_s,
        PACKING_EFFICIENCY: float(packing_efficiency),
        RANK_IMBALANCE: float(rank_imbalance),
        PEAK_MEMORY: float(peak_memory_gb),
    }
    metrics = {key: values[key] for key in METRIC_KEYS if values[key] is not None}
    for key, value in (loss_by_len or {}).items():
        if not key.startswith(LOSS_BY_LEN_PREFIX):
            raise ValueError(f"loss_by_len key {key!r} must start with {LOSS_BY_LEN_PREFIX!r}")
        metrics[key] = float(value)
    return metrics


def validation_metrics(
    *,
    loss: float,
    nll_sum: float,
    num_targets: float,
    num_sequences: int,
    loss_by_len: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The metric dict of one validation: VALID_KEYS in order, then
    `valid/loss_by_len/*`. `loss` is sum_t w_t * nll_t with the validation set's weights
    (the configured reduction over the set), `nll_sum / num_targets` the token mean."""
    metrics = {
        VALID_LOSS: float(loss),
        VALID_TOKEN_LOSS: float(nll_sum) / max(float(num_targets), 1.0),
        VALID_SEQUENCES: float(num_sequences),
        VALID_TARGET_TOKENS: float(num_targets),
    }
    for key, value in (loss_by_len or {}).items():
        if not key.startswith(LOSS_BY_LEN_PREFIX):
            raise ValueError(f"loss_by_len key {key!r} must start with {LOSS_BY_LEN_PREFIX!r}")
        metrics[VALID_PREFIX + key] = float(value)
    return metrics
