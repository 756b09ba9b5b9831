"""Peak memory of a training step split the way the Approximations paper's Table 3 splits it: weights, gradients,
optimizer state and activations.

Two independent measurements of the same steps:

- the split comes from PyTorch's own ``MemTracker`` (``torch.distributed._tools.mem_tracker``), which tags every
  live tensor storage as a parameter, buffer, gradient, optimizer state, activation or temporary and keeps the
  snapshot of the moment the total peaked;
- the measured peak comes from the allocator: ``torch.cuda.max_memory_allocated`` on a GPU, and on a CPU the
  largest running sum of the allocation and free events that ``torch.profiler`` records with
  ``profile_memory=True`` (started before the model exists, so everything the run allocates is counted).

The split adds up to MemTracker's peak by construction; how close that comes to the allocator's peak is the
check (``split_error``). Frozen and quantised bases count as weights (parameters and buffers alike); temporaries
count with activations, as the paper's "activations" column does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

MIB = 2**20


@dataclass(frozen=True)
class MemorySplit:
    """Bytes at the peak of the probed steps."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    other: int
    tracked_peak: int  # the sum of the above (MemTracker's peak)
    measured_peak: int  # the allocator's peak over the same steps
    # The largest each part grew to at any moment of the steps (Table 3's columns: the gradients of a full step
    # exist after backward, when the activations are gone, so these add up to more than the peak). Gradients
    # include an incoming gradient while it is accumulated into .grad; optimizer state includes the temporaries
    # of the optimizer step.
    max_weights: int = 0
    max_gradients: int = 0
    max_optimizer: int = 0
    max_activations: int = 0

    @property
    def split_error(self) -> float:
        """|tracked - measured| / measured: how far the split's total is from the allocator's peak."""
        return abs(self.tracked_peak - self.measured_peak) / max(self.measured_peak, 1)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "split_error": self.split_error}


class _NoHook:
    def remove(self) -> None:
        pass


def step_tracker_class() -> type:
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepMemTracker(MemTracker):
        """MemTracker for a training loop: the root module may run many times (gradient accumulation, several
        steps) and frozen parameters get no gradient hooks (MemTracker would register hooks on them, which
        PyTorch refuses for tensors that do not require a gradient)."""

        def __init__(self, *roots: torch.nn.Module) -> None:
            super().__init__()
            self.roots = list(roots)  # what forward calls: the model, and a wrapper around it (DDP)
            self.largest: dict[Any, dict[str, int]] = {}  # device -> part -> largest bytes seen

        def _update_peak_stats(self, peak_state: Any) -> None:
            super()._update_peak_stats(peak_state)  # runs after every operation
            for dev, snap in self._curr_mem_snap.items():
                parts, largest = group_parts(snap), self.largest.setdefault(dev, {})
                for part, nbytes in parts.items():
                    if nbytes > largest.get(part, 0):
                        largest[part] = nbytes

        def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True):
            for param in module.parameters():
                if not param.requires_grad and param not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:
            if any(module is r for r in self.roots) and module in self.memory_tracking and not self._mod_tracker.is_bw:
                del self.memory_tracking[module]  # a new micro-batch or step of the same root
            super()._pre_fw_hook(module, inputs)

    return StepMemTracker


class AllocatorPeak:
    """The allocator's peak bytes while the context is open (CUDA: max_memory_allocated; CPU: the profiler's
    allocation events). Open it before the model is built."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._profiler: Any = None
        self._base = 0

    def __enter__(self) -> AllocatorPeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._profiler.__exit__(*exc)
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in self._profiler.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        self.peak = peak


@contextlib.contextmanager
def tracked_steps(
    model: torch.nn.Module, optimizers: list[Any], device: torch.device, *, wrapper: torch.nn.Module | None = None
) -> Iterator[Callable]:
    """Track the steps run inside the block; yields a function returning (the snapshot at the tracked peak, the
    largest bytes of each part at any moment), both grouped by :func:`group_parts`. ``optimizers`` are those that
    exist already (optimizers created later, e.g. per layer, are found by MemTracker's global optimizer hook on
    their first step). ``wrapper``: what forward calls when it is not ``model`` itself (DDP's wrapper)."""
    tracker = step_tracker_class()(model, *([wrapper] if wrapper is not None else []))
    tracker.track_external(model, *[o for o in optimizers if isinstance(o, torch.optim.Optimizer)])
    with tracker:
        yield lambda: (
            group_parts(tracker.get_tracker_snapshot("peak").get(device, {})),
            dict(tracker.largest.get(device, {})),
        )


TRACKED_PARTS = ("weights", "gradients", "optimizer", "activations", "temporaries", "other")


def tracked_parts(snapshot: dict[Any, int]) -> dict[str, int]:
    """MemTracker's categories -> :data:`TRACKED_PARTS`: weights (parameters and buffers), gradients, optimizer,
    activations (made in forward), temporaries (made in backward), other (inputs and the rest). Its total is left
    out."""
    by_name = {str(k).rsplit(".", 1)[-1].upper(): int(v) for k, v in snapshot.items()}
    return {
        "weights": by_name.get("PARAM", 0) + by_name.get("BUFFER", 0),
        "gradients": by_name.get("GRAD", 0),
        "optimizer": by_name.get("OPT", 0),
        "activations": by_name.get("ACT", 0),
        "temporaries": by_name.get("TEMP", 0),
        "other": by_name.get("OTH", 0) + by_name.get("INP", 0),
    }


def group_parts(snapshot: dict[Any, int]) -> dict[str, int]:
    """:func:`tracked_parts` as the Approximations paper's Table 3 splits them: temporaries count with activations."""
    parts = tracked_parts(snapshot)
    parts["activations"] += parts.pop("temporaries")
    return parts


def split_from_snapshot(parts: dict[str, int], largest: dict[str, int], measured_peak: int) -> MemorySplit:
    return MemorySplit(
        **parts,
        tracked_peak=sum(parts.values()),
        measured_peak=measured_peak,
        **{f"max_{k}": largest.get(k, 0) for k in ("weights", "gradients", "optimizer", "activations")},
    )
