"""The memory planner (megatron_pept.plan): the trainer's own start-up and steps on fake tensors, counted by torch's
MemTracker. Checked against the allocator's measured peak of the same run on this CPU (the study's measurement),
against exact invariants of sharding (FSDP2 divides weights and optimizer state by the ranks), and for what its
output must say (phases, events, fit, errors)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from megatron_pept import registry
from megatron_pept.plan import plan
from megatron_pept.plan.fit import allowance_bytes, fits, largest_micro_batch, usable_peak_bytes
from megatron_pept.plan.planner import GIB

DEBUG = ["model.name=debug", "model.vocab_size=1024", "data.seq_len=64", "train.micro_batch_size=4"]


def _cfg(*overrides: str, batch: int = 8):
    return registry.load_config("quickstart", [*DEBUG, f"train.global_batch_size={batch}", *overrides])


def _measured_peak(overrides: list[str], tmp_path, data) -> int:
    """The allocator's peak of a real run on this CPU: the trainer built and 3 steps, as planned."""
    from megatron_pept.study.memory import AllocatorPeak
    from megatron_pept.trainer import Trainer

    run = _cfg(
        *overrides,
        f"run_dir={tmp_path / 'run'}",
        f"data.path={data}",
        "checkpoint.interval=0",
        "metrics.tensorboard=false",
        "metrics.peak_tflops=1",  # the MFU reference, not measured by a matmul on this CPU
    )
    with AllocatorPeak(torch.device("cpu")) as measured, Trainer(run) as trainer:
        for _ in range(3):
            trainer.train_step()
    return measured.peak


@pytest.mark.slow  # several plans (and real runs): seconds each
@pytest.mark.parametrize(
    "overrides",
    [
        ["method.name=full"],
        ["method.name=galore", "method.rank=8"],
        ["method.name=relora", "method.rank=8", "method.base_dtype=nf4"],
    ],
    ids=["full", "galore", "relora_nf4"],
)
def test_planned_peak_is_the_allocators_measured_peak_on_cpu(overrides, quickstart_data, tmp_path):
    """A CPU run planned (train.device=cpu, fp32) against the same run measured by the allocator. The issue asks for
    10%; on one CPU process they agree to the byte (docs/benchmarks.md), so 2% catches a planner that drifts."""
    overrides = ["train.device=cpu", "train.dtype=fp32", *overrides]
    planned = plan(_cfg(*overrides)).peak_bytes
    measured = _measured_peak(overrides, tmp_path, quickstart_data)
    assert abs(planned - measured) / measured < 0.02, (planned, measured)


@pytest.mark.slow  # several plans (and real runs): seconds each
def test_fsdp2_ranks_hold_their_share_of_weights_and_optimizer_state():
    one = plan(_cfg("method.name=full", batch=4))
    four = plan(_cfg("method.name=full", "parallel.backend=fsdp2", batch=16), ranks=4)
    assert four.settings["ranks"] == 4 and "fake process group" in four.how
    # Adam's moments are sharded by rows with the weights: a rank holds 1/4 (FSDP2 pads rows to a multiple of 4)
    share = one.parts["optimizer"] / 4
    assert share <= four.parts["optimizer"] < share * 1.05, (one.parts["optimizer"], four.parts["optimizer"])
    # the weights too, but for the rotary tables (buffers, whole on every rank) and a gathered block's weights
    assert four.parts["weights"] < 0.6 * one.parts["weights"]
    # the activations of a rank's micro-batch do not shrink
    assert four.parts["activations"] + four.parts["temporaries"] > 0.5 * (
        one.parts["activations"] + one.parts["temporaries"]
    )


def test_attention_keeps_no_sequence_squared_matrix():
    """SDPA as planned (fake tensors, causal, bf16) keeps O(sequence) per head: doubling the sequence at most
    doubles what attention holds, where a materialised score matrix would quadruple it."""
    from megatron_pept.plan.fake import fake_tensors
    from megatron_pept.study.memory import step_tracker_class

    def held(seq: int) -> int:
        with fake_tensors():
            q, k, v = (torch.randn(1, 8, seq, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            tracker = step_tracker_class()()
            with tracker:
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                out.sum().backward()
            return max(tracker.get_tracker_snapshot("peak").get(torch.device("cpu"), {"Total": 0}).values())

    small, large = held(2048), held(4096)
    assert large < 2.2 * small
    assert large < 8 * 4096 * 4096 * 2  # one bf16 score matrix of 8 heads


def _seeded_rows(start: int, rows: int) -> torch.Tensor:
    from megatron_pept.seeded import draw_rows

    def draw(size, generator):
        return torch.randint(0, 2**16, size, generator=generator, dtype=torch.int32)

    out = draw_rows(start=start, rows=rows, shape=(3000, 1024), name="w", seed=0, purpose="t", draw=draw, device="cpu")
    assert out.shape == (rows, 1024) and out.dtype == torch.int32
    return out


def _q_galore_noise(start: int, rows: int) -> torch.Tensor:
    from megatron_pept.optim.galore.quantize import rounding_noise

    out = rounding_noise(7, 3, rows=(start, start + rows), cols=256, device="cpu")
    assert out.shape == (rows, 256)
    return out


@pytest.mark.parametrize(
    "draw,start,rows",
    [
        (_seeded_rows, 500, 2100),
        (_seeded_rows, 1100, 300),
        (_q_galore_noise, 70, 230),
        (_q_galore_noise, 10, 30),
    ],
    ids=["seeded-three-blocks", "seeded-one-block", "q_galore-five-blocks", "q_galore-one-block"],
)
def test_fake_block_draws_hold_the_bytes_the_blocks_hold(draw, start, rows):
    """Under fake tensors the seeded draws (initialisation, stochastic rounding: seeded.draw_rows) and Q-GaLore's
    rounding noise draw the blocks' span at once (a 7B plan would otherwise spend most of its time on per-block
    draws): their peak and result bytes are those of the real, block-by-block draw."""
    from megatron_pept.plan.fake import fake_tensors
    from megatron_pept.study.memory import step_tracker_class

    def held(fake: bool) -> tuple[int, int]:
        with fake_tensors() if fake else contextlib.nullcontext():
            tracker = step_tracker_class()()
            with tracker:
                out = draw(start, rows)
            return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"], out.untyped_storage().nbytes()

    assert held(fake=True) == held(fake=False)


def test_method_events_fall_in_their_phases():
    galore = plan(_cfg("method.name=galore", "method.rank=8"))
    assert "method.update_proj_gap=2" in galore.overrides
    assert {"optimizer step + refresh", "optimizer step", "checkpoint save"} <= set(galore.phase_peaks())
    relora = plan(_cfg("method.name=relora", "method.rank=8", "method.base_dtype=nf4"))
    assert "method.reset_every=1" in relora.overrides
    # a restart merges each adapter into its (dequantised) base and requantises: temporaries beyond the weights
    restart = relora.phase_peaks()["restart/refresh"]
    assert restart.peak_bytes > relora.phase_peaks()["checkpoint save"].peak_bytes


def test_bf16_weights_halve_the_weights():
    fp32 = plan(_cfg("method.name=full"))
    bf16 = plan(_cfg("method.name=full", "train.param_dtype=bf16"))
    assert (fp32.param_bytes_each, bf16.param_bytes_each) == (4, 2)
    # every parameter halves; the buffers (rotary tables) stay fp32
    assert fp32.parts["weights"] - bf16.parts["weights"] == fp32.trainable_grad_bytes // 2


@pytest.mark.slow  # several plans (and real runs): seconds each
def test_ddp_adds_its_gradient_buckets_and_zero_partitions():
    one = plan(_cfg("method.name=full", batch=4))
    ddp = plan(_cfg("method.name=full", "parallel.backend=ddp", batch=8), ranks=2)
    assert ddp.parts["other"] - one.parts["other"] == one.trainable_grad_bytes
    assert "computed" in ddp.how
    peaks = [
        plan(
            _cfg("method.name=full", "parallel.backend=deepspeed", f"parallel.zero_stage={s}", batch=32), ranks=8
        ).parts
        for s in (1, 2, 3)
    ]
    assert peaks[0]["gradients"] > peaks[1]["gradients"]  # ZeRO-2 partitions the gradients
    assert peaks[0]["optimizer"] == peaks[1]["optimizer"] == peaks[2]["optimizer"]  # every stage partitions it


@pytest.mark.slow  # several plans (and real runs): seconds each
def test_fit_and_largest_micro_batch():
    cfg = _cfg("method.name=full")
    first = plan(cfg)
    budget_gb = (first.peak_bytes * 3) / GIB
    gpu_gb = budget_gb * 1.1 + 1.0  # the allowance: a fixed 1 GB and 10%
    assert usable_peak_bytes(gpu_gb, ranks=1) == pytest.approx(first.peak_bytes * 3, rel=1e-6)
    assert fits(first, gpu_gb) and not fits(first, 1.0)
    assert allowance_bytes(first) >= GIB
    found = largest_micro_batch(cfg, ranks=1, gpu_gb=gpu_gb, plan_fn=plan, first=first)
    assert found.micro_batch_size > cfg.train.micro_batch_size
    assert found.plan.peak_bytes <= usable_peak_bytes(gpu_gb, ranks=1)
    # the next micro-batch would not fit (planned, or beyond the line through the planned ones)
    bigger = plan(
        registry.load_config(
            "quickstart",
            [
                *DEBUG,
                f"train.micro_batch_size={found.micro_batch_size + 1}",
                f"train.global_batch_size={2 * (found.micro_batch_size + 1)}",
                "method.name=full",
            ],
        )
    )
    assert bigger.peak_bytes > usable_peak_bytes(gpu_gb, ranks=1)


def test_cli_prints_json_and_refuses_bad_input(capsys):
    from megatron_pept.tools.plan import main

    assert main(["--config", "quickstart", *DEBUG, "train.global_batch_size=8", "--json", "--gpu-memory", "80"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fit"]["fits"] and out["peak_bytes"] > 0 and out["settings"]["model"] == "debug"
    assert {p["phase"] for p in out["phases"]} >= {"start-up", "forward", "backward", "optimizer step"}
    assert main(["--config", "quickstart", "method.name=nope"]) == 2
    assert "unknown method.name 'nope'" in capsys.readouterr().err
    assert main(["--config", "quickstart", *DEBUG, "--ranks", "2"]) == 2
    assert "parallel.backend=fsdp2" in capsys.readouterr().err
    with contextlib.suppress(SystemExit):
        main(["--help"])
