"""What a method's settings make it do that a parallel backend must know to run it.

A backend never reads a method's settings (``method.base_dtype``, ``method.warm_start_steps`` ...): the method
declares these traits (:meth:`megatron_pept.methods.base.Method.traits`) and the backend's ``validate`` asks them.
Each trait is None when it does not hold, or names the settings that make it hold (``method.base_dtype=nf4``,
``method.warm_start_steps > 0``), so that a backend's refusal can say what to change. Standard library only: both
``methods/`` and ``distributed/`` import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodTraits:
    changes_trainable_set: str | None = None
    """The trainable parameters change in the middle of the run (a full-rank warm start switching to adapters): the
    settings that do it, e.g. ``method.warm_start_steps > 0``."""
    quantised_base: str | None = None
    """Frozen base weights are held quantised, as buffers, not as parameters: the setting, e.g.
    ``method.base_dtype=nf4``."""
    base_dtype_changes: str | None = None
    """A frozen base changes its dtype in the middle of the run (an fp32 master during a warm start becomes a bf16
    base at the switch): the settings, e.g. ``method.base_dtype=bf16 with method.warm_start_steps > 0``."""
