"""GPU acceptance check behind ``tools/gpu_check.py``: one table of the figures the project promises on one CUDA
device, each next to its target and a PASS/FAIL/SKIP verdict.

Rows (real mode; the shapes are :class:`GpuCheckSettings`' defaults), one module per group; each module's docstring
says how its rows are measured and judged:

* **Throughput** (:mod:`.throughput`): bf16 tokens/s and MFU of the ``1b`` model for ``full``, ``galore`` and
  ``relora`` on the ``single`` and one-rank ``fsdp2`` backends; MFU >= 45% for ``full`` (H100/H200 only), >= 0.95x
  ``full`` for ``galore`` with a projector refresh amortised, >= 1.05x ``full`` for ``relora`` with a restart
  amortised.
* **Attention kernels** (:mod:`.attention`): logits of the ``flash`` and ``te`` backends against ``sdpa`` on the
  same weights and batch, and the kernels on their own, within twice ``sdpa``'s own bf16 error.
* **galore_8bit** (:mod:`.galore_8bit`): a few ``galore_8bit`` steps on bitsandbytes' 8-bit moments against
  ``galore`` with fp32 moments, from the same weights.
* **Memory** (:mod:`.memory`): peak memory of two ``7b`` ``galore_8bit`` steps with per-layer weight updates and
  activation checkpointing; target < 22 GB.

The rest, one job per file: the settings and targets (:mod:`.settings`), how a measured value is judged against
its target (:mod:`.verdicts`), what the groups share (:mod:`.harness`: short training runs, the seeded model,
device plumbing), running the groups in order (:mod:`.runner`), the table and the JSON record (:mod:`.report`).

Without a CUDA device the real check does not run: :func:`require_cuda` raises (the tool prints one line and exits
2), so a GPU job that lost its GPU fails. ``--dry-run`` runs the same functions on CPU with the ``debug`` model and
a few tiny steps: every row is produced the same way, targets are shown but not judged ("dry"), kernels that are
not installed are SKIP rows, the memory row is the process's peak RSS. It checks the plumbing, not the numbers. In
both modes an optional package that does not import (flash-attn; transformer-engine, detected by its
``transformer_engine.pytorch``; bitsandbytes) SKIPs only the rows that need it.
"""

from megatron_pept.bench.gpu_check.attention import attention_references, attention_rows, compare_attention_backend
from megatron_pept.bench.gpu_check.harness import _materialised  # noqa: F401  (tests build the seeded model)
from megatron_pept.bench.gpu_check.report import NO_CUDA_LINE, GpuCheckResult, format_table
from megatron_pept.bench.gpu_check.runner import require_cuda, run_gpu_check
from megatron_pept.bench.gpu_check.settings import CHECK_GROUPS, GpuCheckSettings, with_overrides
from megatron_pept.bench.gpu_check.throughput import time_refresh
from megatron_pept.bench.gpu_check.verdicts import (
    DRY,
    FAIL,
    PASS,
    SKIP,
    Row,
    Target,
    amortised_seconds,
    bf16_bound,
    exit_code,
    resolve_status,
)

__all__ = [
    "CHECK_GROUPS",
    "DRY",
    "FAIL",
    "NO_CUDA_LINE",
    "PASS",
    "SKIP",
    "GpuCheckResult",
    "GpuCheckSettings",
    "Row",
    "Target",
    "amortised_seconds",
    "attention_references",
    "attention_rows",
    "bf16_bound",
    "compare_attention_backend",
    "exit_code",
    "format_table",
    "require_cuda",
    "resolve_status",
    "run_gpu_check",
    "time_refresh",
    "with_overrides",
]
