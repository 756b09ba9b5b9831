"""The CUDA code paths checked on a CPU: the dtype a run computes in, FSDP2's mixed-precision policy, and the
floors of the optional packages those paths use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_pept.config import ModelConfig, TrainConfig, load_config
from megatron_pept.distributed import FSDP2Backend, ParallelDims, compute_dtype, fsdp2_mixed_precision
from megatron_pept.models import build_model, llama_args

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize(
    "dtype,device,expected",
    [
        ("auto", CUDA, torch.bfloat16),
        ("auto", CPU, torch.float32),
        ("fp32", CUDA, torch.float32),
        ("fp32", CPU, torch.float32),
        ("bf16", CUDA, torch.bfloat16),
        ("bf16", CPU, torch.bfloat16),
    ],
)
def test_the_compute_dtype_follows_train_dtype(dtype: str, device: torch.device, expected: torch.dtype) -> None:
    assert compute_dtype(TrainConfig(dtype=dtype), device) == expected


def test_the_fsdp2_policy_follows_the_compute_dtype() -> None:
    policy = fsdp2_mixed_precision(torch.bfloat16, device_type="cuda")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert policy.cast_forward_inputs is False  # the rotary tables stay fp32 (the test of a real wrap below)
    assert fsdp2_mixed_precision(torch.float32, device_type="cuda") is None  # fp32 asked: fp32 computed
    assert fsdp2_mixed_precision(torch.bfloat16, device_type="cpu") is None  # the trainer's autocast does it
    assert fsdp2_mixed_precision(torch.float32, device_type="cpu") is None


def debug_model() -> torch.nn.Module:
    model = build_model(llama_args(ModelConfig(name="debug"), vocab_size=97, max_seq_len=16))
    model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("dtype,expected", [("fp32", None), ("bf16", torch.bfloat16), ("auto", torch.bfloat16)])
def test_the_fsdp2_backend_on_cuda_shards_with_the_policy_of_train_dtype(
    dtype: str, expected: torch.dtype | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the backend hands fully_shard on a CUDA device (recorded, not run: no CUDA here). It used to pass a
    bf16 policy whatever train.dtype said, so an fp32 run computed in bf16."""
    import torch.distributed.fsdp

    calls = []
    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", lambda module, **kw: calls.append(kw))
    cfg = load_config(None, ["data.path=x", "parallel.backend=fsdp2", f"train.dtype={dtype}"])
    backend = FSDP2Backend(cfg, ParallelDims(backend="fsdp2"), CUDA)
    backend.wrap(debug_model(), grad_accum_steps=1)
    assert len(calls) == 2 + 1  # each block, then the root
    for kw in calls:
        policy = kw.get("mp_policy")
        assert (policy.param_dtype if policy is not None else None) == expected
        assert policy is None or policy.reduce_dtype == torch.float32


@pytest.fixture
def one_gloo_rank():
    """A process group of this process alone (an in-memory store: no port, no other process)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_real_fsdp2_wrap_computes_with_the_policy_dtype_and_fp32_rope(one_gloo_rank, dtype: torch.dtype) -> None:
    """The policies above on a real FSDP2 wrap (one gloo rank): the weights the forward sees are bf16 under the
    bf16 policy and fp32 without one, the rotary tables reach each block in fp32 either way (FSDP2 casts a
    block's floating inputs to the parameter dtype unless told not to), and the logits are exactly those of the
    model whose parameters alone were cast; the sharded parameters stay fp32."""
    from torch.distributed.fsdp import fully_shard

    model, reference = debug_model(), debug_model()
    with torch.no_grad():
        for p in reference.parameters():
            p.data = p.data.to(dtype)
    policy = fsdp2_mixed_precision(dtype, device_type="cuda")
    kwargs = {"mesh": one_gloo_rank, **({"mp_policy": policy} if policy is not None else {})}
    for layer in model.model.layers.values():
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    seen = []
    attention = model.model.layers["0"].self_attn
    attention.register_forward_pre_hook(lambda module, args: seen.append([module.q_proj.weight.dtype, *args]))
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids)
        expected = reference(ids)
    ((weight, x, cos, sin),) = seen
    assert weight == x.dtype == logits.dtype == dtype
    assert cos.dtype == sin.dtype == torch.float32
    assert torch.equal(logits, expected)
    model.reshard()  # the root keeps its gathered (cast) parameters after forward, for backward
    assert all(p.dtype == torch.float32 for p in model.parameters())


# The DeepSpeed APIs megatron_pept/distributed/deepspeed_backend.py and checkpoint/hf_export.py use, each with the
# first release that has it as used (from DeepSpeed's history; the older ones date from before 0.14).
DEEPSPEED_APIS = {
    "runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3._get_param_partition_group": "0.19.3",
    "runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3._get_param_partition_rank": "0.19.3",
    "runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3._get_fp32_opt_state_partition(release_swap_buffers)": "0.16.9",
    "runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state": "0.14.0",
    "utils.safe_get_full_fp32_param": "0.14.0",
    "utils.safe_set_full_fp32_param": "0.14.0",
    "utils.safe_get_full_optimizer_state": "0.14.0",
    "utils.safe_set_full_optimizer_state": "0.14.0",
    "utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint": "0.14.0",
    "utils.zero_to_fp32.get_model_state_files": "0.14.0",
    "utils.tensor_fragment.fragment_address": "0.14.0",
    "runtime.fp16.loss_scaler.DynamicLossScaler": "0.14.0",
    "runtime.zero.config.ZeroStageEnum": "0.14.0",
}


def floor(package: str) -> tuple[int, ...]:
    """The version floor pyproject.toml gives ``package`` (in whichever extra names it)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    found = re.findall(rf'"{package}(?:\[[\w,]+\])?>=([\d.]+)"', text)
    assert len(found) == 1, found
    return tuple(int(x) for x in found[0].split("."))


def test_the_deepspeed_floor_has_every_api_the_backend_uses() -> None:
    """pyproject's deepspeed floor is at least the newest first release of the APIs used (it was 0.15, which has
    neither ZeRO-3 partition accessor); and each API is there in the installed DeepSpeed, as used."""
    newest = max(tuple(int(x) for x in v.split(".")) for v in DEEPSPEED_APIS.values())
    assert floor("deepspeed") >= newest
    pytest.importorskip("deepspeed")
    import importlib
    import inspect

    for api in DEEPSPEED_APIS:
        path, _, arg = api.partition("(")
        parts = path.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix, then attributes
            try:
                obj = importlib.import_module("deepspeed." + ".".join(parts[:cut]))
            except ImportError:
                continue
            for name in parts[cut:]:
                obj = getattr(obj, name)
            break
        else:
            raise AssertionError(f"no module of deepspeed.{path} imports")
        if arg:
            assert arg.rstrip(")") in inspect.signature(obj).parameters, api


# -- settings this machine cannot run: refused when the config is read or the run starts, never at a forward -------


@pytest.mark.parametrize("attention", ["flash", "te"])
@pytest.mark.parametrize("setting,message", [("train.dtype=fp32", "computes in bf16 only"), ("train.device=cpu", "")])
def test_gpu_attention_with_fp32_or_cpu_written_in_the_config_is_refused_on_reading(
    attention: str, setting: str, message: str
) -> None:
    from megatron_pept.errors import ConfigError
    from megatron_pept.registry import load_config as load

    expected = message or "runs on CUDA GPUs only"
    with pytest.raises(ConfigError, match=expected) as err:
        load(None, ["data.path=x", f"model.attention={attention}", setting])
    assert "\n" not in str(err.value) and "model.attention=sdpa" in str(err.value)
    load(None, ["data.path=x", f"model.attention={attention}"])  # auto: decided where the run starts
    load(None, ["data.path=x", f"model.attention={attention}", "train.dtype=bf16", "train.device=cuda"])
    load(None, ["data.path=x", "model.attention=sdpa", setting])


@pytest.mark.parametrize("attention", ["flash", "te"])
def test_gpu_attention_is_checked_against_this_machine_when_the_run_starts(
    attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.device=auto and train.dtype=auto resolve on the machine: without CUDA they mean the CPU in fp32,
    which flash-attn and transformer-engine cannot run; with CUDA (faked here) bf16, and then the package must
    import (a stand-in module here)."""
    import sys
    import types

    from megatron_pept.errors import ConfigError
    from megatron_pept.registry import check_runtime
    from megatron_pept.registry import load_config as load

    cfg = load(None, ["data.path=x", f"model.attention={attention}"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.device=auto and no CUDA device is visible"):
        check_runtime(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    module = {"flash": "flash_attn", "te": "transformer_engine.pytorch"}[attention]
    monkeypatch.setitem(sys.modules, module, None)  # not installed
    with pytest.raises(ConfigError, match=r"needs the .* package.*megatron_pept\[gpu\]"):
        check_runtime(cfg)
    monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
    check_runtime(cfg)  # CUDA, bf16, the package: accepted
    with pytest.raises(ConfigError, match="computes in bf16 only"):
        check_runtime(load(None, ["data.path=x", f"model.attention={attention}", "train.dtype=fp32"]))
    check_runtime(load(None, ["data.path=x", "model.attention=sdpa", "train.dtype=fp32"]))


def test_a_refused_attention_writes_nothing_and_is_one_line(tmp_path, capsys, monkeypatch: pytest.MonkeyPatch):
    """`python -m megatron_pept.train --config configs/quickstart.yaml model.attention=flash` on a CPU machine:
    one line, exit 2, nothing written (the quickstart's data is not generated, run_dir not made). It used to
    generate the data and stop at building the model, naming the package rather than the CPU."""
    from megatron_pept.train import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
    code = main(["--config", config, "model.attention=flash"])  # run_dir and data.path relative: under tmp_path
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "model.attention=flash runs on CUDA GPUs only" in err, err
    assert list(tmp_path.iterdir()) == []
