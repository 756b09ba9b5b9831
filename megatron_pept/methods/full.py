"""Full-rank training: every parameter trains with AdamW (fp32 or bf16 moments)."""

from __future__ import annotations

from megatron_pept.methods.base import Method


class FullRank(Method):
    name = "full"
