"""GaLore optimizers: AdamW, 8-bit AdamW and Adafactor whose states live in a low-rank projection of the gradient.

One job per module:

* :mod:`~megatron_pept.optim.galore.base`: :class:`GaLoreOptimizer`, the projecting base optimizer (projection,
  refresh schedule, error feedback, the galore / apollo / fira update rules, the step under every sharding);
* :mod:`~megatron_pept.optim.galore.adamw`, :mod:`~megatron_pept.optim.galore.adamw8bit`,
  :mod:`~megatron_pept.optim.galore.adafactor`: the inner optimizers (:class:`GaLoreAdamW`,
  :class:`GaLoreAdamW8bit`, :class:`GaLoreAdafactor`);
* :mod:`~megatron_pept.optim.galore.q_galore`: :class:`QGaLoreAdamW8bit` (int4 projector, adaptive gap, 8-bit
  moments, int8 weights by stochastic rounding), with its pure functions in :mod:`~megatron_pept.optim.galore.
  quantize`;
* :mod:`~megatron_pept.optim.galore.views`: how the optimizer sees the part of a parameter it steps (the whole
  tensor, an FSDP2 row shard, a ZeRO flat fragment).
"""

from megatron_pept.optim.galore.adafactor import GaLoreAdafactor
from megatron_pept.optim.galore.adamw import GaLoreAdamW
from megatron_pept.optim.galore.adamw8bit import GaLoreAdamW8bit
from megatron_pept.optim.galore.base import GALORE_GROUP_DEFAULTS, PROJECTORS, UPDATE_RULES, GaLoreOptimizer
from megatron_pept.optim.galore.q_galore import Q_GALORE_GROUP_DEFAULTS, QGaLoreAdamW8bit
from megatron_pept.optim.galore.views import _ZeroView

__all__ = [
    "GALORE_GROUP_DEFAULTS",
    "PROJECTORS",
    "UPDATE_RULES",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreOptimizer",
    "QGaLoreAdamW8bit",
    "Q_GALORE_GROUP_DEFAULTS",
    "_ZeroView",
]
