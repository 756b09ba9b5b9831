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


def test_cuda_memory_is_logged_as_allocated_and_reserved(monkeypatch: pytest.MonkeyPatch) -> None:
    """mem/allocated_gb and mem/reserved_gb (the CUDA allocator, read here from stand-ins: no CUDA) beside the
    existing scalars, mem/peak_gb kept; none on a CPU."""
    from megatron_pept.metrics import device_memory_gb, log_step
    from megatron_pept.metrics.timing import StepRates

    assert device_memory_gb(torch.device("cpu")) == {}
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3_000_000_000 if device == cuda else 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5_500_000_000 if device == cuda else 0)
    memory = device_memory_gb(cuda)
    assert memory == {"mem/allocated_gb": 3.0, "mem/reserved_gb": 5.5}

    class Writer:
        def __init__(self) -> None:
            self.logged: dict[str, float] = {}

        def scalars(self, step: int, values: dict[str, float]) -> None:
            self.logged.update(values)

    writer = Writer()
    rates = StepRates(1.0, 10.0, 0.1, 10.0, 0.1, 5.0)
    log_step(writer, step=1, total_steps=2, loss=1.0, lr=0.1, grad_norm=1.0, rates=rates, mem_gb=7.0, console=False,
             memory=memory)  # fmt: skip
    assert writer.logged["mem/allocated_gb"] == 3.0 and writer.logged["mem/reserved_gb"] == 5.5
    assert writer.logged["mem/peak_gb"] == 7.0 and "train/loss" in writer.logged


def profile_steps(profiler, steps: range) -> None:
    """Run ``steps`` through ``profiler`` as the trainer does, each step some work to record."""
    x = torch.randn(64, 64)
    for step in steps:
        profiler.step_starts(step)
        (x @ x).sum()
        profiler.step_ended(step)


def test_profiled_steps_are_one_trace_with_a_span_per_step(tmp_path) -> None:
    """Steps 2 to 3 of 1..4: one Chrome-trace file in TensorBoard's profiler layout, ProfilerStep#2 and #3 in it."""
    import json

    from megatron_pept.metrics.profile import StepProfiler

    with StepProfiler((2, 3), folder=tmp_path / "profile", device=torch.device("cpu"), rank=0) as profiler:
        profile_steps(profiler, range(1, 5))
    (trace,) = profiler.trace_files
    assert trace.name.startswith("rank0.") and trace.name.endswith(".pt.trace.json")
    spans = {e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name", "").startswith("Prof")}
    assert spans == {"ProfilerStep#2", "ProfilerStep#3"}


def test_a_run_ending_inside_the_range_writes_what_it_recorded(tmp_path) -> None:
    from megatron_pept.metrics.profile import StepProfiler

    with StepProfiler((2, 9), folder=tmp_path, device=torch.device("cpu"), rank=0) as profiler:
        profile_steps(profiler, range(1, 4))
        assert profiler.trace_files == []  # still recording
    assert len(profiler.trace_files) == 1


def test_only_rank_0_profiles(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank runs the same steps: one trace per run, from rank 0; the others never start the profiler."""
    from megatron_pept.metrics.profile import StepProfiler

    def refuse(*args, **kwargs):
        raise AssertionError("rank 1 started torch.profiler")

    monkeypatch.setattr(torch.profiler, "profile", refuse)
    with StepProfiler((1, 2), folder=tmp_path / "profile", device=torch.device("cpu"), rank=1) as profiler:
        profile_steps(profiler, range(1, 4))
    assert not (tmp_path / "profile").exists()


def test_a_run_with_profile_steps_writes_a_trace_of_those_steps(quickstart_data, tmp_path) -> None:
    """train.profile_steps=2:3 in a 4-step run: run_dir/profile holds one trace whose step spans are steps 2 and 3
    (each with the model's forward in it); the saved config.yaml keeps the setting as written and reads back."""
    import json

    from test_trainer import tiny

    from megatron_pept.config import load_config
    from megatron_pept.trainer import Trainer

    run_dir = tmp_path / "run"
    Trainer(tiny(quickstart_data, run_dir, "train.steps=4", "train.profile_steps=2:3")).train()
    (trace,) = (run_dir / "profile").glob("*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    steps = [e for e in events if e.get("name", "").startswith("ProfilerStep#")]
    assert sorted(e["name"] for e in steps) == ["ProfilerStep#2", "ProfilerStep#3"]
    matmuls = [e for e in events if e.get("name") in ("aten::mm", "aten::addmm", "aten::linear")]
    for span in steps:  # the step's work is inside its span
        start, end = span["ts"], span["ts"] + span["dur"]
        assert any(start <= e["ts"] <= end for e in matmuls), span["name"]
    assert load_config(run_dir / "config.yaml", []).train.profile_steps == "2:3"
