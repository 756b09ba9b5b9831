"""Run several small trainings in one multi-process job (launched by torchrun) and save what rank 0 sees.

    torchrun --nproc_per_node 2 tests/distributed/worker.py RUNS.json OUT.pt

``RUNS.json`` is a list of {"name": ..., "overrides": [...]}; for each, the losses and the full (gathered)
final parameters go into ``OUT.pt`` (a dict name -> {"losses": [...], "params": {name: tensor}}). A run with
``"expect_error": true`` must be refused while being built: its error message goes into ``OUT.pt`` instead. A run
with ``"init_only": true`` is built but not trained: its initial parameters go into ``OUT.pt``, with every rank's
peak of live CPU tensor bytes while the trainer was built (torch's MemTracker) and the bytes of parameters and
buffers each rank holds then. A run
may name ``"garbage": [STEP, RANK]``: that rank's batches of optimizer step STEP (1-based) become one repeated
token (a corrupt shard); the run's result then also holds every rank's guard counters (spikes, skipped,
non-finite in a row) and, where every rank holds the whole weights (DDP), each rank's copy.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from helpers import quantised_bases
from torch.distributed.tensor import DTensor

from megatron_pept.config import load_config
from megatron_pept.errors import UserError
from megatron_pept.sharding import optimizer_protocol
from megatron_pept.trainer import Trainer


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu().clone()
    out.update(quantised_bases(model))
    return out


def feed_garbage(trainer: Trainer, *, step: int, rank: int) -> None:
    if dist.get_rank() != rank:
        return
    real, calls = trainer.loader.next_batch, {"n": 0}
    token = trainer.data_index.vocab_size - 1

    def next_batch():
        inputs, targets = real()
        calls["n"] += 1
        if (calls["n"] - 1) // trainer.grad_accum_steps + 1 == step:
            return torch.full_like(inputs, token), torch.full_like(targets, token)
        return inputs, targets

    trainer.loader.next_batch = next_batch


def every_rank(mine: torch.Tensor) -> torch.Tensor:
    """Each rank's ``mine`` (of the same shape on every rank), one row per rank."""
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return torch.stack(rows)


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers this rank holds (its shards of sharded ones)."""
    tensors = [*model.parameters(), *model.buffers()]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def built_only(overrides: list[str]) -> dict:
    """Build a trainer under torch's memory tracker (every tensor allocated meanwhile and when it is freed): the
    initial weights, and every rank's peak of live CPU tensor bytes during the build and bytes held after it."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        trainer = Trainer(load_config(None, overrides))
    peak = tracker.get_tracker_snapshot("peak")
    peak_bytes = sum(v["Total"] for k, v in peak.items() if torch.device(k).type == "cpu")
    out = {
        "params": full_params(trainer.raw_model),
        "peak_bytes": every_rank(torch.tensor([peak_bytes])).flatten(),
        "held_bytes": every_rank(torch.tensor([held_bytes(trainer.raw_model)])).flatten(),
    }
    trainer.close()
    return out


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    with open(args[0]) as f:
        runs = json.load(f)
    results = {}
    started = time.monotonic()
    for run in runs:
        print(f"worker: run {run['name']} (at {time.monotonic() - started:.1f} s)", flush=True)
        if run.get("expect_error"):  # a run that must be refused: its one-line error, on every rank
            try:
                Trainer(load_config(None, run["overrides"]))
            except UserError as err:
                results[run["name"]] = {"error": str(err)}
                continue
            raise AssertionError(f"run {run['name']} was not refused")
        if run.get("init_only"):
            results[run["name"]] = built_only(run["overrides"])
            continue
        trainer = Trainer(load_config(None, run["overrides"]))
        if "garbage" in run:
            feed_garbage(trainer, step=run["garbage"][0], rank=run["garbage"][1])
        if "stop_after" in run:  # an interrupted run: some steps, a checkpoint, no more
            for _ in range(run["stop_after"]):
                trainer.train_step()
            trainer.save_checkpoint()
            trainer.checkpointer.finish_pending()  # an asynchronous save commits here
            results[run["name"]] = {"losses": [], "params": {}, "split": torch.tensor(0), "midrow": torch.tensor(0)}
            trainer.close()  # as if the job ended: the next run in this process resumes the same run_dir
            del trainer
            continue
        result = trainer.train()
        # (an element-wise optimizer over bf16 weights keeps ZeRO's layout as flat_pieces: its state is per partition)
        protocol = optimizer_protocol(trainer.optimizer)
        layout = protocol.zero_layout or getattr(trainer.optimizer, "flat_pieces", None) or {}
        # Parameters whose ZeRO partition boundary falls inside them (this rank holds part, not all, of them).
        split = sum(f.partial for pieces in layout.values() for _, f in pieces)
        # ... and tall/square matrices (projected on the right) cut in the middle of a row
        midrow = sum(f.cuts_a_row and f.shape[0] >= f.shape[1] for pieces in layout.values() for _, f in pieces)
        zero = getattr(getattr(trainer.backend, "engine", None), "optimizer", None)  # DeepSpeed's ZeRO optimizer
        masters = getattr(zero, "single_partition_of_fp32_groups", None) or getattr(
            zero, "fp32_partitioned_groups_flat", []
        )
        results[run["name"]] = {
            "losses": result.train_losses,
            "master_dtypes": ",".join(sorted({str(t.dtype) for t in masters})),  # ZeRO's master partitions
            "val_losses": torch.tensor(list(result.val_losses.values()), dtype=torch.float64),
            "params": full_params(trainer.raw_model),
            "split": torch.tensor(split),
            "midrow": torch.tensor(midrow),
            # quantised-base tensors this rank holds only a piece of (FSDP2 shards them by rows)
            "sharded_bases": torch.tensor(
                sum(isinstance(t, DTensor) for n, t in trainer.raw_model.named_buffers() if ".base_" in n)
            ),
            # integer-coded trainable weights (q_galore's int8 codes) this rank holds only rows of
            "sharded_codes": torch.tensor(
                sum(isinstance(p, DTensor) and p.dtype == torch.uint8 for p in trainer.raw_model.parameters())
            ),
        }
        if "garbage" in run:
            state = trainer.state
            counters = torch.tensor([state.spikes, state.skipped_steps, state.bad_steps_in_a_row])
            results[run["name"]]["guard"] = every_rank(counters)
            weights = [p.detach().flatten() for p in trainer.raw_model.parameters()]
            if not any(isinstance(w, DTensor) for w in weights):  # a replica on every rank (DDP): all alike?
                results[run["name"]]["replicas"] = every_rank(torch.cat(weights))
        trainer.close()
        del trainer
    if dist.get_rank() == 0:
        torch.save(results, args[1])
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as megatron_pept.train does: no native thread can abort the interpreter's shutdown


if __name__ == "__main__":
    main()
