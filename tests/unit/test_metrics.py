"""MFU's reference peak: on a CPU an upper bound made from cores, clock and vector width, never a number a training
step can exceed."""

from __future__ import annotations

import pytest
import torch

from megatron_pept.metrics import cpu_peak_tflops, peak_tflops

X86 = """processor\t: 0
model name\t: Some Xeon
cpu MHz\t\t: 2100.000
flags\t\t: fpu sse sse2 avx fma avx2 {extra}
processor\t: 1
cpu MHz\t\t: 3400.000
flags\t\t: fpu sse sse2 avx fma avx2 {extra}
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm
"""


@pytest.mark.parametrize(
    "extra,per_cycle,name", [("avx512f avx512bw", 64, "avx512f"), ("", 32, "avx2")], ids=["avx512", "avx2"]
)
def test_cpu_peak_is_cores_times_clock_times_vector_flops(extra: str, per_cycle: int, name: str) -> None:
    peak, how = cpu_peak_tflops(X86.format(extra=extra), threads=4)
    assert peak == pytest.approx(4 * 3.4e9 * per_cycle / 1e12)  # the highest clock listed
    assert name in how and "4 cores" in how
    # cpufreq's maximum wins when it is higher than the clocks cpuinfo lists (they are current, not maximal).
    faster, _ = cpu_peak_tflops(X86.format(extra=extra), threads=4, max_freq_khz=3_900_000)
    assert faster == pytest.approx(4 * 3.9e9 * per_cycle / 1e12)


def test_cpu_peak_needs_a_clock() -> None:
    assert cpu_peak_tflops(ARM, threads=8) is None  # Arm's cpuinfo lists no clock
    peak, how = cpu_peak_tflops(ARM, threads=8, max_freq_khz=3_000_000)
    assert peak == pytest.approx(8 * 3.0e9 * 16 / 1e12) and "asimd" in how


def test_cpu_reference_is_the_larger_of_the_bound_and_a_measured_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    """A turbo clock the OS does not report can lift real speed above the computed bound: then the measured matmul
    (the fastest thing a training step does) is the reference, so MFU still stays below 100%."""
    import megatron_pept.metrics as metrics

    cpu = torch.device("cpu")
    bound = cpu_peak_tflops(X86.format(extra="avx512f"), threads=torch.get_num_threads())[0]
    monkeypatch.setattr(metrics, "_read", lambda path: X86.format(extra="avx512f") if "cpuinfo" in path else None)
    for measured in (bound / 3, bound * 2):
        monkeypatch.setattr(metrics, "measure_matmul_tflops", lambda *, device, m=measured: m)
        assert peak_tflops(cpu) == max(bound, measured)
    assert peak_tflops(cpu, override=123.0) == 123.0
