"""A guard against host synchronisation and per-call host-to-device copies in code that runs every step.

    from sync_guard import HostSyncError, no_host_sync

    with no_host_sync(host_tensors=lambda: {...}):
        optimizer.step()

Inside the block, a :class:`~torch.overrides.TorchFunctionMode` raises :class:`HostSyncError` on any call that makes
the host wait for the device: reading a tensor's value into Python (``item``, ``float``/``int``/``bool``/``index``,
``if tensor``, ``tolist``, ``cpu``, ``numpy``, printing), a comparison answered as a Python bool (``torch.equal``,
``allclose``, ``is_nonzero``) or an op whose output size depends on values (``nonzero``, ``masked_select``,
``unique``, indexing with a boolean mask); and on any call that copies host data to the device each time it runs
(``torch.tensor``/``as_tensor`` from Python data, ``.to(device)``, ``.cuda()``) made by the stack's own code (or a
test's; not by an installed package's).

On a CPU-only machine every tensor is a host tensor, so the guard cannot tell a device read from a host read by
where the tensor lives: it flags every read except of the tensors ``host_tensors()`` names (the 0-d counters an
optimizer keeps on the host by design, as torch's AdamW keeps its ``step``: reading them costs no synchronisation on
a GPU either), and every ``.to(device)`` by the stack's code even where the copy is a no-op on the CPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Calls that return a tensor's values to Python, or a Python answer computed from them: the host waits.
READS = frozenset(
    {
        "item",
        "__float__",
        "__int__",
        "__bool__",
        "__index__",
        "__complex__",
        "__format__",
        "__array__",
        "__repr__",
        "__str__",
        "tolist",
        "cpu",
        "numpy",
        "equal",
        "allclose",
        "is_nonzero",
    }
)
# Ops whose output size depends on the values: the host waits for them to know it.
VALUE_SIZED = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"})
# Tensors made from host data (a host-to-device copy on every call when they land on a GPU).
FROM_HOST = frozenset({"tensor", "as_tensor", "asarray", "from_numpy", "scalar_tensor"})

PACKAGE = Path(__import__("megatron_pept").__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent
INSTALLED = {"site-packages", "dist-packages"}


class HostSyncError(AssertionError):
    """A host synchronisation or a per-call host-to-device copy inside a guarded block."""


def _name(func: Any) -> str:
    return getattr(func, "__name__", "") or str(func)


def _site() -> tuple[str, Path | None]:
    """Where the call came from: the first frame outside torch and this file (``file:line``, and the file)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if path != Path(__file__).resolve() and not path.is_relative_to(TORCH):
            return f"{path.name}:{frame.f_lineno} ({frame.f_code.co_name})", path
        frame = frame.f_back
    return "?", None


def _names_a_device(args: tuple, kwargs: dict) -> bool:
    """``Tensor.to`` is asked to move the tensor (a device, a device string or index, or another tensor's place)."""
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str, torch.Tensor)) or type(a) is int for a in args[1:])


def _bool_mask_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


class _Guard(TorchFunctionMode):
    def __init__(self, host_tensors: Callable[[], Iterable[torch.Tensor]], copies: bool) -> None:
        super().__init__()
        self.host_tensors = host_tensors
        self.copies = copies
        self.seen: list[str] = []  # every violation, also those some code catches and hides

    def _fail(self, what: str) -> None:
        site, _ = _site()
        message = f"{what} at {site}"
        self.seen.append(message)
        raise HostSyncError(message)

    def _is_host_tensor(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and any(t is h for h in self.host_tensors())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = _name(func)
        if name in READS and args and not self._is_host_tensor(args[0]):
            self._fail(f"host synchronisation: Tensor.{name}")
        elif name in VALUE_SIZED:
            self._fail(f"host synchronisation: {name} (output size depends on values)")
        elif name in ("__getitem__", "__setitem__") and len(args) > 1 and _bool_mask_index(args[1]):
            self._fail(f"host synchronisation: {name} with a boolean mask")
        elif self.copies:
            if name in FROM_HOST and func is getattr(torch, name, None) and self._from_the_stack():
                self._fail(f"host-to-device copy: torch.{name} of host data")
            elif (name == "cuda" or (name == "to" and _names_a_device(args, kwargs))) and self._from_the_stack():
                self._fail(f"host-to-device copy: Tensor.{name}(device)")
        return func(*args, **kwargs)

    @staticmethod
    def _from_the_stack() -> bool:
        """The call comes from the stack's code (or a test's), not from an installed package (bitsandbytes moves a
        code table it is given to the input's device: a no-op when the stack keeps it there)."""
        _, path = _site()
        return path is not None and (path.is_relative_to(PACKAGE) or not set(path.parts) & INSTALLED)


@contextmanager
def no_host_sync(
    *, host_tensors: Callable[[], Iterable[torch.Tensor]] = tuple, copies: bool = True
) -> Iterator[list[str]]:
    """Fail (:class:`HostSyncError`) on a host synchronisation or, with ``copies``, a host-to-device copy made by
    the stack's code inside the block. ``host_tensors``: the tensors kept on the host by design, whose reads are
    allowed (called at each read). Yields the list of violations seen (for code that swallows the error)."""
    guard = _Guard(host_tensors, copies)
    with guard:
        yield guard.seen
