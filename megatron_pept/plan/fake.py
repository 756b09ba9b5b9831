"""Running the real training code without allocating anything: fake tensors, a fake process group of N ranks,
and answers for the few host reads a step makes.

* :func:`fake_tensors`: PyTorch's ``FakeTensorMode`` (tensors carry shapes, dtypes and devices, no data), plus
  :class:`HostReads` for ``tensor.item()`` and friends. A fake tensor made from a Python number keeps its value
  (FakeTensorMode's constants: a step counter ``torch.tensor(0)`` incremented in place stays known), and a read of
  one returns it; any other read (a loss, a gradient norm) has no value, and gets a neutral one (1, 1.0, True),
  counted in :attr:`HostReads.guessed`. Nothing a planned step decides from such a value changes what it allocates:
  the guard sees a finite loss, clipping a norm of 1.
* :func:`fake_world`: ``torch.distributed``'s fake backend for N ranks (collectives return at once, nothing is
  sent), with the launcher's environment set for rank 0, so :func:`megatron_pept.distributed.build_backend` builds
  the same mesh and backend a real run of N ranks does. Every rank of a data-parallel run holds the same bytes (up
  to FSDP2's padding of the last rows), so rank 0 stands for all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


class HostReads(TorchDispatchMode):
    """Answers ``aten._local_scalar_dense`` (``item()``, ``int(t)``, ``bool(t)``) under fake tensors: the value
    where FakeTensorMode knows it (a constant), else 1, 1.0 or True (counted in :attr:`guessed`)."""

    def __init__(self) -> None:
        super().__init__()
        self.guessed = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        kwargs = kwargs or {}
        if func is not torch.ops.aten._local_scalar_dense.default:
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)  # a constant's value
        except Exception:  # noqa: BLE001 (DataDependentOutputException and kin: the value is not known)
            self.guessed += 1
            dtype = args[0].dtype
            if dtype == torch.bool:
                return True
            return 1.0 if dtype.is_floating_point or dtype.is_complex else 1


@contextlib.contextmanager
def fake_tensors() -> Iterator[HostReads]:
    """Fake tensors for everything made inside (real tensors passed in are converted, not copied)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    reads = HostReads()
    with FakeTensorMode(allow_non_fake_inputs=True), reads:
        yield reads


@contextlib.contextmanager
def fake_world(ranks: int) -> Iterator[None]:
    """A process group of ``ranks`` ranks in which this process is rank 0 and every collective is a no-op; the
    launcher's environment variables are set for it and restored after."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process; plan in a fresh process")
    saved = {k: os.environ.get(k) for k in LAUNCH_ENV}
    os.environ.update(
        WORLD_SIZE=str(ranks),
        RANK="0",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE=str(ranks),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29500",
    )
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
