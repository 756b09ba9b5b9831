"""Per-layer weight updates: each parameter is stepped inside backward, as soon as its gradient is complete, and
its gradient is freed at once, so the full set of gradients never exists at the same time (GaLore section 4.3;
LOMO).

:class:`PerLayerOptimizer` wraps any optimizer built for the whole model: it splits it into one optimizer per
parameter (same class, same hyper-parameters, same group dictionaries, so learning-rate changes made through
``param_groups`` reach them) and registers a post-accumulate-grad hook on each parameter.

* **Gradient accumulation.** The hooks act only while :attr:`armed`; the trainer arms them for the last
  micro-batch of a step, so parameters are stepped once per optimizer step with the fully accumulated gradient.
* **Learning-rate schedule.** Counted in optimizer steps (the trainer sets the rate once per step), never in
  micro-batches.
* **Gradient norm.** Each hook adds its gradient's squared norm into an on-device accumulator, so the logged
  ``train/grad_norm`` is the real global norm of the step's gradient (before clipping).
* **Clipping.** A global norm is only known once every gradient has been consumed, too late to scale them. With
  ``train.max_grad_norm > 0`` the gradients of step ``t`` are multiplied by ``min(1, max_norm / (norm_{t-1} +
  1e-6))``, the coefficient global clipping would have used with the previous step's norm (one step stale; the
  first step is not clipped). With clipping off, per-layer updates equal the global step exactly (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn

from megatron_pept.sharding import ShardAwareOptimizer, merge_step_stats, optimizer_protocol


def split_per_parameter(optimizer: torch.optim.Optimizer) -> dict[nn.Parameter, torch.optim.Optimizer]:
    """One optimizer per parameter: a copy of ``optimizer`` (sharing its configuration attributes) whose single
    group is the original group's settings with that parameter alone."""
    index = getattr(optimizer, "param_index", None)
    subs: dict[nn.Parameter, torch.optim.Optimizer] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            # Optimizer.__getstate__ keeps only defaults/state/groups, so copy.copy would drop the subclass's own
            # attributes (state dtype, quantisation maps, ...): copy the instance dictionary instead.
            sub = object.__new__(type(optimizer))
            sub.__dict__.update(optimizer.__dict__)
            torch.optim.Optimizer.__init__(sub, [{**group, "params": [p]}], optimizer.defaults)
            if p in optimizer.state:
                sub.state[p] = optimizer.state[p]  # e.g. moments carried over by a warm-start switch
            if index is not None:
                sub.param_index = {p: index[p]}
            if hasattr(optimizer, "_group_index"):
                sub._group_index = {id(p): 0}  # its one group
            subs[p] = sub
    return subs


class PerLayerOptimizer(ShardAwareOptimizer):
    """Looks like an optimizer to the trainer and the methods; does its work in backward hooks."""

    steps_in_backward = True

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, grad_reduce: Callable[[torch.Tensor], None] | None = None
    ) -> None:
        self.inner_type = type(optimizer)
        self.grad_reduce = grad_reduce  # e.g. an all-reduce over data-parallel ranks (DDP without its wrapper)
        self.optimizers = split_per_parameter(optimizer)
        self.param_groups = [g for sub in self.optimizers.values() for g in sub.param_groups]
        self.armed = False
        self.clip_coef = 1.0
        self._grad_sq: torch.Tensor | None = None
        self._stepped: list[torch.optim.Optimizer] = []
        self._last_stepped: list[torch.optim.Optimizer] = []
        self._handles: list[Any] = []
        self._layers: list[Any] = []
        for p, sub in self.optimizers.items():
            layer = getattr(sub, "int8_layers", {}).get(p)
            if layer is None:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
            else:  # a weight held in int8 (Q-GaLore): no .grad; its layer's backward leaves weight_grad
                layer.on_weight_grad = partial(self._layer_hook, p, layer)
                self._layers.append(layer)

    def _hook(self, p: torch.Tensor) -> None:
        if not self.armed or p.grad is None:
            return
        grad = p.grad
        if self.grad_reduce is not None:
            self.grad_reduce(grad)
        self._step(p, grad)
        p.grad = None

    def _layer_hook(self, p: torch.Tensor, layer: Any) -> None:
        if not self.armed:
            return  # an earlier micro-batch: the layer accumulates
        # As in a global step, an int8 weight's gradient is neither in the norm nor clipped (docs/methods.md, Q-GaLore)
        self._step(p, layer.weight_grad, counted=False)
        layer.weight_grad = None

    def _step(self, p: torch.Tensor, grad: torch.Tensor, *, counted: bool = True) -> None:
        if counted:
            sq = grad.detach().float().square().sum()
            self._grad_sq = sq if self._grad_sq is None else self._grad_sq + sq
            if self.clip_coef != 1.0:
                grad.mul_(self.clip_coef)
        sub = self.optimizers[p]
        sub.step()
        self._stepped.append(sub)

    # -- driven by the trainer ---------------------------------------------------------------------------------

    def arm(self, *, clip_coef: float = 1.0) -> None:
        """Step parameters in the coming backward (the last micro-batch of an optimizer step)."""
        self.armed, self.clip_coef = True, clip_coef
        self._grad_sq, self._stepped = None, []

    def disarm(self) -> torch.Tensor:
        """End the step; returns the global gradient norm (before clipping) of the parameters stepped."""
        self.armed = False
        self._last_stepped = self._stepped
        if self._grad_sq is None:
            return torch.zeros(())
        return self._grad_sq.sqrt()

    def release(self) -> None:
        """Remove the backward hooks (the optimizer is being replaced)."""
        for handle in self._handles:
            handle.remove()
        for layer in self._layers:
            layer.on_weight_grad = None
        self._handles, self._layers = [], []

    # -- the shard-aware protocol: delegated to the optimizer of each parameter ---------------------------------

    def owner(self, p: torch.Tensor) -> torch.optim.Optimizer:
        return self.optimizers[p]

    def state_layout(self, p: torch.Tensor, key: str) -> str | None:
        return optimizer_protocol(self.optimizers[p]).state_layout(p, key)

    def restore_loaded_state(self, p: torch.Tensor) -> None:
        optimizer_protocol(self.optimizers[p]).restore_loaded_state(p)

    def step_stats(self) -> dict[str, Any]:
        """The statistics of the optimizers stepped in the last step, merged."""
        return merge_step_stats([optimizer_protocol(o).step_stats() for o in self._last_stepped])

    # -- the optimizer surface methods and checkpoints use ------------------------------------------------------

    def step(self, closure: Any = None) -> None:
        """Nothing to do: every parameter was stepped in backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.optimizers:
            p.grad = None

    @property
    def state(self) -> dict[nn.Parameter, dict[str, Any]]:
        return {p: sub.state[p] for p, sub in self.optimizers.items() if p in sub.state}

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.optimizers)

    def state_dict(self) -> dict[str, Any]:
        return {"per_parameter": [sub.state_dict() for sub in self.optimizers.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        subs = list(self.optimizers.values())
        if len(state["per_parameter"]) != len(subs):
            raise ValueError(
                f"the checkpoint holds {len(state['per_parameter'])} per-layer optimizers, this model {len(subs)}"
            )
        for sub, sub_state in zip(subs, state["per_parameter"]):
            sub.load_state_dict(sub_state)
