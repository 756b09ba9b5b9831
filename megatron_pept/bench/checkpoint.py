"""Checkpoint speed (``tools/bench.py --suite checkpoint``): one process trains a named model a step, then saves
and loads its full checkpoint (model, AdamW moments, train state) several times:

* ``save_s``: a synchronous save, commit included (checksums of every file, rename, ``latest``);
* ``async_blocking_s``: how long an asynchronous save holds the training loop (staging to CPU memory);
* ``load_s``: loading it back into the running trainer (model, optimizer, method, loader, RNG);
* ``torch_save_s``: the baseline, ``torch.save`` of the same model and optimizer state dicts to one file.

Ratios are against the baseline measured in the same process, rounds interleaved (these machines are noisy).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class CheckpointBenchSettings:
    model: str = "130m"
    rounds: int = 3
    data: str = "data/generated/quickstart"


def run_checkpoint_benchmark(s: CheckpointBenchSettings) -> dict[str, Any]:
    from megatron_pept.config import load_config
    from megatron_pept.trainer import Trainer

    times: dict[str, list[float]] = {
        "save_s": [],
        "async_blocking_s": [],
        "async_total_s": [],
        "load_s": [],
        "torch_save_s": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def trainer(run_dir: Path, *extra: str) -> Trainer:
            return Trainer(
                load_config(
                    None,
                    [
                        f"run_dir={run_dir}",
                        f"model.name={s.model}",
                        f"data.path={s.data}",
                        "data.builtin=quickstart",
                        "data.seq_len=64",
                        "train.steps=1000",
                        "train.global_batch_size=1",
                        "train.micro_batch_size=1",
                        "train.eval_interval=0",
                        "train.eval_at_start=false",
                        "metrics.tensorboard=false",
                        "metrics.peak_tflops=1",
                        "checkpoint.keep_last=1",
                        *extra,
                    ],
                )
            )

        sync = trainer(root / "sync")
        sync.train_step()  # optimizer state exists
        asynchronous = trainer(root / "async", "checkpoint.async_save=true")
        asynchronous.train_step()
        nbytes = 0
        for _ in range(s.rounds):
            start = time.perf_counter()
            sync.save_checkpoint()
            times["save_s"].append(time.perf_counter() - start)

            start = time.perf_counter()
            asynchronous.save_checkpoint()
            times["async_blocking_s"].append(time.perf_counter() - start)
            asynchronous.checkpointer.finish_pending()
            times["async_total_s"].append(time.perf_counter() - start)

            start = time.perf_counter()
            state = {"model": sync.raw_model.state_dict(), "optim": sync.optimizer.state_dict()}
            torch.save(state, root / "baseline.pt")
            times["torch_save_s"].append(time.perf_counter() - start)
            nbytes = (root / "baseline.pt").stat().st_size

            latest = sync.checkpointer.root / (sync.checkpointer.root / "latest").read_text().strip()
            start = time.perf_counter()
            sync._load_checkpoint(latest)
            times["load_s"].append(time.perf_counter() - start)
            sync.state.step += 1  # the next save is a new step
            asynchronous.state.step += 1
        shutil.rmtree(root / "sync", ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "settings": asdict(s),
        "checkpoint_mb": nbytes / 1e6,
        "median_s": med,
        "save_vs_torch_save": med["save_s"] / med["torch_save_s"],
        "async_blocking_vs_sync_save": med["async_blocking_s"] / med["save_s"],
        "save_mb_per_s": nbytes / 1e6 / med["save_s"],
        "all_s": times,
    }
