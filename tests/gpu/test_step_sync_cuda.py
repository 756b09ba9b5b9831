"""On a CUDA device, the optimizer step of every method (global and per-layer) and its ``on_step_end`` make no
synchronising CUDA call: CUDA's own sync debug mode (``torch.cuda.set_sync_debug_mode("error")``) raises on any
(``.item()``, a device-to-host copy, a blocking host-to-device copy, a stream synchronisation), so this checks for
real what tests/unit/test_step_sync.py checks on the CPU with a guard (docs/architecture.md, "The step never waits
for the device"). Skipped without CUDA; a few seconds per method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_pept.config import load_config
from megatron_pept.methods import METHODS
from megatron_pept.optim.per_layer import PerLayerOptimizer
from megatron_pept.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

VARIANTS = [(name, per_layer) for name in METHODS for per_layer in (False, True)]


@pytest.mark.parametrize("name,per_layer", VARIANTS, ids=[f"{n}-{'per_layer' if p else 'global'}" for n, p in VARIANTS])
def test_the_step_makes_no_synchronising_cuda_call(name: str, per_layer: bool, quickstart_data: Path, tmp_path: Path):
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path}",
            f"data.path={quickstart_data}",
            "data.seq_len=32",
            "train.steps=3",
            "train.global_batch_size=8",
            "train.micro_batch_size=4",
            "train.eval_interval=0",
            "train.eval_at_start=false",
            "metrics.tensorboard=true",
            "metrics.peak_tflops=1.0",
            f"method.name={name}",
            *(["method.rank=4"] if "rank" in METHODS[name].config_keys else []),
            f"optim.per_layer={str(per_layer).lower()}",
        ],
    )
    trainer = Trainer(cfg)
    assert trainer.device.type == "cuda"
    checked = []

    def strict(fn):
        def call(*args, **kwargs):
            if trainer.state.step != 1:  # step 0 makes the state and the first projectors
                return fn(*args, **kwargs)
            torch.cuda.synchronize()  # nothing queued before counts
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                checked.append(fn)

        return call

    opt = trainer.optimizer
    for stepper in opt.optimizers.values() if isinstance(opt, PerLayerOptimizer) else [opt]:
        stepper.step = strict(stepper.step)
    trainer.method.on_step_end = strict(trainer.method.on_step_end)
    with trainer:
        trainer.train()
    assert checked  # the step under the debug mode ran
