"""Enumerate the TP/PP/CP/DP layouts (x recompute options) that can run a model on a
number of GPUs, estimate each one's per-GPU memory and step time, and rank them.

The step-time model only ranks layouts; it does not promise absolute times
(docs/PLANNING.md, "Step time"):

    compute   = model FLOPs x recompute factor / (GPUs x peak x MFU)
    bubble    = compute x (PP - 1) / micro-batches                 (1F1B)
    tp_comm   = SP all-gathers/reduce-scatters of every layer       / TP group bandwidth
    cp_comm   = ring-attention K/V exchange, minus the attention compute it hides behind
    dp_comm   = gradient reduce-scatter + parameter all-gather      / DPxCP group bandwidth
    pp_comm   = activations between stages                          / PP bandwidth

A group whose ranks span more than one node (megatron orders ranks TP, CP, DP, PP from
the fastest) gets the inter-node bandwidth. TP never crosses a node: such layouts are
not proposed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from megatron_longalign.config.model import ModelConfig
from megatron_longalign.model.config import model_problems
from megatron_longalign.planning.memory import (
    GB,
    GPU_BF16,
    RECOMPUTE_OPTIONS,
    DeviceProfile,
    Layout,
    MemoryEstimate,
    Workload,
    estimate_memory,
    num_microbatches,
    stage_parameters,
)
from megatron_longalign.training.metrics import (
    attention_flops_coefficient,
    matmul_params,
    peak_flops,
)


@dataclass(frozen=True)
class Cluster:
    """The GPUs to plan for and the assumptions of the step-time model."""

    gpus: int
    gpu_memory_gb: float = 80.0
    gpus_per_node: int = 8
    accelerator: str = "h100_sxm"  # a key of metrics.PEAK_FLOPS (or a GPU name)
    dtype: str = "bf16"
    mfu: float = 0.4  # fraction of peak the matmuls reach
    intra_node_gb_s: float = 300.0  # achieved per-GPU NVLink bandwidth, GB/s
    inter_node_gb_s: float = 40.0  # achieved per-GPU network bandwidth (400 Gb/s NIC)
    # A layout fits when its estimate stays below (1 - headroom) of the GPU memory: the
    # estimate is an estimate (docs/PLANNING.md states its error), and a plan at 99% of
    # memory fails on the first longer-than-usual document or allocator spike.
    headroom: float = 0.1

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise ValueError("gpus and gpus_per_node must be >= 1")
        if self.gpu_memory_gb <= 0:
            raise ValueError("gpu_memory_gb must be > 0")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"headroom must be in [0, 1), got {self.headroom}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu}")

    @property
    def peak(self) -> float:
        value = peak_flops(self.accelerator, self.dtype)
        if value is None:
            raise ValueError(
                f"no peak FLOP/s known for accelerator {self.accelerator!r} in {self.dtype}; "
                "use one of training.metrics.PEAK_FLOPS"
            )
        return value

    def bandwidth(self, span: int) -> float:
        """Bytes/s of a group whose ranks cover `span` consecutive global ranks."""
        fast = span <= self.gpus_per_node
        return (self.intra_node_gb_s if fast else self.inter_node_gb_s) * GB


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: MemoryEstimate
    fits: bool
    step_time_s: float
    time_parts: dict[str, float] = field(default_factory=dict)


class NoLayoutFits(ValueError):
    """No layout fits in GPU memory; the message says what would."""


# ---- constraints ---------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problems(
    model: ModelConfig, workload: Workload, layout: Layout, gpus: int, gpus_per_node: int
) -> list[str]:
    """Why `layout` cannot run (empty when it can)."""
    problems = []
    if layout.gpus != gpus:
        problems.append(f"TP*PP*CP*DP = {layout.gpus}, not the {gpus} GPUs")
    problems += model_problems(model, layout.tp)  # TP divides heads, KV heads and the MLP width
    if layout.tp > gpus_per_node:
        problems.append(f"TP {layout.tp} would cross a node of {gpus_per_node} GPUs")
    if model.num_layers % layout.pp:
        problems.append(f"PP {layout.pp} does not divide num_layers {model.num_layers}")
    seq = workload.seq_length
    if seq % (2 * layout.cp):
        problems.append(f"seq_length {seq} is not divisible by 2*CP = {2 * layout.cp}")
    elif layout.sequence_parallel and (seq // layout.cp) % layout.tp:
        problems.append(f"seq_length/CP = {seq // layout.cp} is not divisible by TP {layout.tp}")
    if workload.global_batch_size % layout.dp:
        problems.append(
            f"global batch {workload.global_batch_size} is not divisible by DP {layout.dp}"
        )
    return problems


def candidate_layouts(
    model: ModelConfig,
    workload: Workload,
    gpus: int,
    gpus_per_node: int = 8,
    recompute: tuple[str, ...] = RECOMPUTE_OPTIONS,
) -> Iterator[Layout]:
    """Every valid layout on `gpus` GPUs, each with every recompute option; sequence
    parallel whenever TP > 1 (it only saves memory, at no extra communication)."""
    for tp in _divisors(gpus):
        for pp in _divisors(gpus // tp):
            for cp in _divisors(gpus // (tp * pp)):
                dp = gpus // (tp * pp * cp)
                for option in recompute:
                    layout = Layout(tp, pp, cp, dp, tp > 1, option)
                    if not layout_problems(model, workload, layout, gpus, gpus_per_node):
                        yield layout


# ---- step time -------------------------------------------------------------------------


def estimate_step_time(
    model: ModelConfig,
    layout: Layout,
    workload: Workload,
    cluster: Cluster,
    profile: DeviceProfile = GPU_BF16,
    distributed_optimizer: bool = True,
) -> tuple[float, dict[str, float]]:
    """(seconds, parts) of one optimizer step; see the module doc."""
    b = profile.activation_bytes
    docs = workload.pack_documents()
    tokens = workload.seq_length * workload.global_batch_size
    squares = sum(length * length for length in docs) * workload.global_batch_size
    linear = 6.0 * matmul_params(model) * tokens
    attention = float(attention_flops_coefficient(model)) * squares
    # Recompute repeats forward passes: forward is 1/3 of forward + backward.
    if layout.recompute == "full":
        extra = (linear + attention) / 3
    elif layout.recompute == "selective":
        extra = attention / 3
    else:
        extra = 0.0
    rate = cluster.peak * cluster.mfu
    compute = (linear + attention + extra) / (cluster.gpus * rate)
    m = num_microbatches(layout, workload)
    bubble = compute * (layout.pp - 1) / m

    layers = model.num_layers // layout.pp
    local_tokens = workload.seq_length / layout.cp
    hidden = model.hidden_size
    tp_comm = 0.0
    if layout.tp > 1:
        # Per layer and micro-batch: 2 all-gathers + 2 reduce-scatters forward, the same
        # backward (+ forward again under full recompute); each moves (t-1)/t of the
        # gathered [s/CP, h] tensor per GPU.
        collectives = 12 if layout.recompute == "full" else 8
        volume = collectives * (layout.tp - 1) / layout.tp * local_tokens * hidden * b
        tp_comm = m * layers * volume / cluster.bandwidth(layout.tp)
    cp_comm = 0.0
    if layout.cp > 1:
        # Ring attention: K and V of the local chunk pass CP-1 hops forward; backward
        # sends K, V and their gradients (2x). Overlapped with the attention compute.
        kv = 2 * model.query_groups * model.head_dim / layout.tp * local_tokens * b
        hops = 3 * (layout.cp - 1) * kv
        send = m * layers * hops / cluster.bandwidth(layout.tp * layout.cp)
        hidden_by = attention / (cluster.gpus * rate)
        cp_comm = max(0.0, send - hidden_by)
    params = max(stage_parameters(model, layout.tp, layout.pp))
    group = layout.dp * layout.cp
    dp_comm = 0.0
    if group > 1:
        per_param = 4 + 2 if distributed_optimizer else 2 * 4  # RS fp32 + AG bf16 | AR fp32
        volume = (group - 1) / group * params * per_param
        dp_comm = volume / cluster.bandwidth(layout.tp * layout.cp * layout.dp)
    pp_comm = 0.0
    if layout.pp > 1:
        sp_div = layout.tp if layout.sequence_parallel else 1
        boundary = 2 * local_tokens * hidden / sp_div * b  # activation forward, grad back
        pp_comm = m * boundary / cluster.bandwidth(cluster.gpus)
    parts = {
        "compute": compute,
        "bubble": bubble,
        "tp_comm": tp_comm,
        "cp_comm": cp_comm,
        "dp_comm": dp_comm,
        "pp_comm": pp_comm,
    }
    return sum(parts.values()), parts


# ---- planning --------------------------------------------------------------------------


def evaluate(
    model: ModelConfig,
    layout: Layout,
    workload: Workload,
    cluster: Cluster,
    profile: DeviceProfile = GPU_BF16,
    *,
    distributed_optimizer: bool = True,
    overhead_bytes: float | None = None,
) -> Plan:
    memory = estimate_memory(
        model,
        layout,
        workload,
        profile,
        distributed_optimizer=distributed_optimizer,
        overhead_bytes=overhead_bytes,
    )
    seconds, parts = estimate_step_time(
        model, layout, workload, cluster, profile, distributed_optimizer
    )
    fits = memory.total <= (1 - cluster.headroom) * cluster.gpu_memory_gb * GB
    return Plan(layout, memory, fits, seconds, parts)


def rank_layouts(
    model: ModelConfig,
    workload: Workload,
    cluster: Cluster,
    profile: DeviceProfile = GPU_BF16,
    **kwargs,
) -> list[Plan]:
    """Every candidate layout, fitting ones first by estimated step time, then the rest
    by memory. Raises ValueError if no layout satisfies the constraints at all."""
    plans = [
        evaluate(model, layout, workload, cluster, profile, **kwargs)
        for layout in candidate_layouts(model, workload, cluster.gpus, cluster.gpus_per_node)
    ]
    if not plans:
        raise ValueError(
            f"no TP/PP/CP/DP layout of {cluster.gpus} GPUs satisfies the constraints for "
            f"this model at seq_length {workload.seq_length} and global batch "
            f"{workload.global_batch_size} (TP must divide the heads and KV heads and stay "
            "within a node, PP must divide num_layers, DP must divide the global batch, "
            "seq_length must divide by 2*CP); change the GPU count or the global batch"
        )
    return sorted(
        plans,
        key=lambda p: (not p.fits, p.step_time_s if p.fits else p.memory.total),
    )


def recommend(
    model: ModelConfig,
    workload: Workload,
    cluster: Cluster,
    profile: DeviceProfile = GPU_BF16,
    *,
    max_scale: int = 64,
    **kwargs,
) -> tuple[Plan, list[Plan]]:
    """(the fastest fitting plan, all ranked plans). Raises NoLayoutFits saying the
    smallest GPU count (multiples of the requested one, up to `max_scale` x) that
    would fit, and with which layout."""
    plans = rank_layouts(model, workload, cluster, profile, **kwargs)
    if plans[0].fits:
        return plans[0], plans
    smallest = plans[0]
    need = smallest.memory.total / GB
    message = (
        f"no layout fits in {cluster.gpu_memory_gb:g} GB on {cluster.gpus} GPUs: the "
        f"smallest needs {need:.1f} GB per GPU ({smallest.layout.label()}, recompute "
        f"{smallest.layout.recompute})"
    )
    scale = 2
    while scale <= max_scale:
        bigger = Cluster(**{**cluster.__dict__, "gpus": cluster.gpus * scale})
        try:
            fitting = [p for p in rank_layouts(model, workload, bigger, profile, **kwargs)]
        except ValueError:
            fitting = []
        fitting = [p for p in fitting if p.fits]
        if fitting:
            best = fitting[0]
            message += (
                f"; {bigger.gpus} GPUs would fit ({best.layout.label()}, recompute "
                f"{best.layout.recompute}, {best.memory.total / GB:.1f} GB)"
            )
            break
        scale *= 2
    else:
        message += f"; nothing fits up to {cluster.gpus * max_scale} GPUs either"
    message += ", or use GPUs with more memory, a shorter seq_length or a smaller model"
    raise NoLayoutFits(message)
