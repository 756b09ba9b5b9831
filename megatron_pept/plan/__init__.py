"""The memory planner: how much each rank of a run holds, phase by phase, before any GPU is booked.

:func:`plan` runs the trainer's own start-up and steps on fake tensors (:mod:`.planner`, :mod:`.fake`);
DeepSpeed ZeRO is computed from a one-process plan (:mod:`.zero`); :mod:`.fit` says whether a plan fits a GPU and
the largest micro-batch that does. The command line: ``megatron-pept-plan`` (:mod:`megatron_pept.tools.plan`).
"""

from megatron_pept.plan.planner import PLAN_STEPS, PhasePeak, Plan, plan

__all__ = ["PLAN_STEPS", "PhasePeak", "Plan", "plan"]
