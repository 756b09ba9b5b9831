"""What the GPU check's row groups share: device synchronisation and freeing, autocast, whether an optional
package is installed, the overrides and trainer of a short training run, the seeded model, byte counts, and an
error described in one line (its traceback on stderr)."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from megatron_pept.bench.gpu_check.settings import GpuCheckSettings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def unavailable(module: str) -> str | None:
    """None when ``module`` imports (the module the stack itself imports: ``transformer_engine.pytorch``, not the
    top-level package, which a transformer-engine install without its PyTorch part also provides), else why not, in
    a few words: ``not installed`` when its top-level package is not there at all, else the import's error. A row
    that needs the module is then SKIPped with this reason, and no other row is affected."""
    top = module.partition(".")[0]
    try:
        found = sys.modules.get(top) is not None or importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):  # a parent that raises on import, a module without a spec
        found = False
    if not found:
        return "not installed"
    try:
        importlib.import_module(module)
    except Exception as err:  # transformer-engine raises RuntimeError, not ImportError, without CUDA
        lines = str(err).strip().splitlines()
        return f"{module} does not import ({type(err).__name__}: {lines[0] if lines else 'no message'})"[:200]
    return None


def skip_unless_importable(row: Any, module: str, *, install: str) -> bool:
    """SKIP ``row`` when ``module`` does not import (:func:`unavailable`), saying why and ``install`` (how to get
    it); True when it was skipped."""
    why = unavailable(module)
    if why is None:
        return False
    installed = why != "not installed"
    row.skipped = f"{why} ({install})" if installed else f"{module} not installed ({install})"
    row.measured = "does not import" if installed else "not installed"
    return True


def _data_path(s: GpuCheckSettings) -> Path:
    return Path(s.data).resolve()  # a relative path is relative to the current directory, as for every tool


def _trainer_overrides(
    s: GpuCheckSettings,
    *,
    run_dir: Path,
    model: str,
    method: str,
    backend: str,
    steps: int,
    batch: int,
    seq_len: int,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """A short run: one micro-batch per step, no validation, no checkpoints, no TensorBoard."""
    return [
        f"run_dir={run_dir}",
        f"model.name={model}",
        f"model.vocab_size={s.vocab_size}",
        f"data.path={_data_path(s)}",
        f"data.seq_len={seq_len}",
        f"train.steps={steps}",
        f"train.global_batch_size={batch}",
        f"train.micro_batch_size={batch}",
        f"train.dtype={s.dtype}",
        f"train.device={s.device}",
        "train.eval_interval=0",
        "train.eval_at_start=false",
        "train.eval_batches=1",
        "metrics.tensorboard=false",
        "checkpoint.interval=0",
        "checkpoint.save_on_signal=false",
        f"method.name={method}",
        f"parallel.backend={backend}",
        *extra,
    ]


def _build_trainer(overrides: list[str]) -> Any:
    from megatron_pept.config import load_config
    from megatron_pept.trainer import Trainer

    return Trainer(load_config(None, overrides))


def _materialised(model_name: str, *, vocab_size: int, max_seq_len: int, device: torch.device) -> Any:
    from megatron_pept.config import ModelConfig
    from megatron_pept.models import build_model, llama_args

    model = build_model(llama_args(ModelConfig(name=model_name), vocab_size=vocab_size, max_seq_len=max_seq_len))
    model.to_empty(device=device)
    model.init_weights(seed=0)
    return model


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _describe_error(err: BaseException) -> str:
    traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    message = str(err).strip().splitlines()[0] if str(err).strip() else "no message"
    return f"{type(err).__name__}: {message}"[:300]
