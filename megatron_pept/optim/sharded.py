"""The base of this package's optimizers that step parameter views (whole tensors, FSDP2 row shards, ZeRO flat
fragments): the :class:`~megatron_pept.sharding.ShardAwareOptimizer` protocol with ZeRO attachment and a
ZeRO-aware ``state_dict``."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from megatron_pept.sharding import ShardAwareOptimizer, ZeroLayout


class ShardedOptimizer(ShardAwareOptimizer):
    """Mixin (before ``torch.optim.Optimizer`` in the bases). Under ZeRO (:meth:`attach_zero`) the state is kept
    per model parameter, not per flat partition: ``state_dict()`` (which DeepSpeed calls for its own checkpoint)
    then covers only the flat partitions in ``param_groups``; the per-parameter state is checkpointed by
    :mod:`megatron_pept.checkpoint` beside it."""

    zero_layout: ZeroLayout | None = None

    def attach_zero(self, layout: ZeroLayout) -> None:
        """Run inside DeepSpeed ZeRO: ``layout`` maps each flat fp32 partition ZeRO gives this optimizer (by
        ``id``) to the model parameters it holds pieces of, in ZeRO's order (the same on every rank), with the
        piece this rank holds; each model parameter is then stepped on its fragments."""
        self.zero_layout = layout

    def state_dict(self) -> dict[str, Any]:
        if self.zero_layout is None:
            return super().state_dict()  # type: ignore[misc]
        in_groups = {id(p) for g in self.param_groups for p in g["params"]}  # type: ignore[attr-defined]
        kept = self.state  # type: ignore[has-type]
        self.state = defaultdict(dict, {k: v for k, v in kept.items() if id(k) in in_groups})
        try:
            return super().state_dict()  # type: ignore[misc]
        finally:
            self.state = kept
