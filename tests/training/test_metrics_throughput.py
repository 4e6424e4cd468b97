"""Accelerator peaks, step timing with an injected clock, MFU and peak memory."""

from __future__ import annotations

import pytest
import torch

from megatron_longalign.training.metrics import (
    StepTimer,
    ThroughputMeter,
    accelerator_kind,
    matmul_dtype,
    peak_flops,
    peak_memory_gb,
    peak_memory_source,
)

T = 1e12


@pytest.mark.parametrize(
    ("device", "kind"),
    [
        ("NVIDIA H100 80GB HBM3", "h100_sxm"),  # torch's name for the SXM5 part
        ("NVIDIA H100 PCIe", "h100_pcie"),
        ("NVIDIA H100 NVL", "h100_nvl"),
        ("NVIDIA H200", "h200_sxm"),
        ("NVIDIA H200 NVL", "h200_nvl"),
        ("NVIDIA GH200 480GB", "gh200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("nvidia-h100-x1", "h100_sxm"),  # machine kinds
        ("nvidia-h200", "h200_sxm"),
        ("h100_pcie", "h100_pcie"),  # table keys
        ("NVIDIA A10", None),  # not an A100
        ("NVIDIA H800", None),
        ("Tesla V100-SXM2-16GB", None),
        ("cpu", None),
        ("", None),
        (None, None),
    ],
)
def test_accelerator_kind(device, kind):
    assert accelerator_kind(device) == kind


@pytest.mark.parametrize(
    ("device", "dtype", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4 * T),
        ("NVIDIA H100 80GB HBM3", "fp16", 989.4 * T),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7 * T),
        ("NVIDIA H100 80GB HBM3", "fp32", 66.9 * T),
        ("NVIDIA H100 80GB HBM3", "fp8", 1978.9 * T),
        ("NVIDIA H100 PCIe", "bf16", 756.0 * T),
        ("NVIDIA H100 PCIe", "tf32", 378.0 * T),
        ("NVIDIA H200", "bfloat16", 989.4 * T),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0 * T),
        ("NVIDIA A100-SXM4-40GB", "bf16", 312.0 * T),
        ("NVIDIA A100-SXM4-40GB", "tf32", 156.0 * T),
        ("NVIDIA A100-SXM4-40GB", "float32", 19.5 * T),
        ("NVIDIA A100-SXM4-40GB", "fp8", None),  # A100 has no FP8 tensor cores
        ("cpu", "bf16", None),
        (None, "bf16", None),
    ],
)
def test_peak_flops(device, dtype, peak):
    assert peak_flops(device, dtype) == peak


def test_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="dtype 'int8'"):
        peak_flops("NVIDIA H100 80GB HBM3", "int8")


def test_matmul_dtype_follows_tf32_switch():
    assert matmul_dtype(torch.bfloat16) == "bf16"
    # torch.backends.cuda.matmul is a property object: set and restore by hand.
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert matmul_dtype(torch.float32) == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = False
        assert matmul_dtype(torch.float32) == "fp32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


class FakeClock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def test_step_timer_uses_the_clock_and_synchronises_at_both_ends():
    syncs = []
    timer = StepTimer(clock=FakeClock(10.0, 12.5), synchronize=lambda: syncs.append(1))
    with timer:
        assert len(syncs) == 1  # queued work drained before the start time is read
    assert timer.elapsed == 2.5
    assert len(syncs) == 2
    with pytest.raises(RuntimeError):
        timer.stop()


def test_mfu_is_achieved_over_peak_on_a_synthetic_timing():
    # 8 GPUs at a 989.4 TFLOP/s peak; two steps of 2 s and 3 s. Make the FLOPs exactly
    # 40% of what 8 GPUs could do in 5 s: 0.4 * 8 * 989.4e12 * 5 = 1.58304e16.
    peak = peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    meter = ThroughputMeter(num_gpus=8, peak_flops_per_gpu=peak)
    timer = StepTimer(clock=FakeClock(0.0, 2.0, 2.0, 5.0), synchronize=lambda: None)
    total = 0.4 * 8 * peak * 5
    for tokens, share in ((600_000, 0.4), (400_000, 0.6)):
        with timer:
            pass
        meter.update(tokens, total * share, timer.elapsed)
    result = meter.summary()
    assert result.steps == 2 and result.seconds == 5.0
    assert result.tokens_per_sec == 1_000_000 / 5
    assert result.step_time_s == 2.5
    achieved = total / 5 / 8
    assert result.tflops_per_gpu == pytest.approx(achieved / 1e12)
    assert result.mfu == pytest.approx(achieved / peak) == pytest.approx(0.4)
    meter.reset()
    assert meter.summary().steps == 0 and meter.summary().mfu is None


def test_no_mfu_without_a_known_peak():
    meter = ThroughputMeter(num_gpus=1, peak_flops_per_gpu=peak_flops("cpu", "fp32"))
    meter.update(100, 1e9, 0.5)
    result = meter.summary()
    assert result.mfu is None
    assert result.tflops_per_gpu == pytest.approx(2e9 / 1e12)


def test_meter_rejects_bad_input():
    with pytest.raises(ValueError):
        ThroughputMeter(num_gpus=0, peak_flops_per_gpu=None)
    with pytest.raises(ValueError):
        ThroughputMeter(num_gpus=1, peak_flops_per_gpu=None).update(1, 1.0, -1.0)


def test_peak_memory_on_cpu_is_the_labelled_process_rss():
    if torch.cuda.is_available():
        pytest.skip("CPU path")
    before = peak_memory_gb()
    block = torch.ones(64 * 2**20 // 4)  # touch 64 MiB
    block += 1
    after = peak_memory_gb()
    assert peak_memory_source() == "cpu peak RSS"
    # Peak RSS never decreases and now covers at least the 64 MiB block.
    assert 64 / 1024 <= after < 1024
    assert after >= before
