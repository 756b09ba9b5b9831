#!/usr/bin/env python
"""GPU acceptance check: one table of throughput, MFU, attention-kernel, 8-bit GaLore and memory figures on one
CUDA device, each next to its target with PASS/FAIL/SKIP (exit status 1 when a row FAILs).

The tool lives in the package (:mod:`megatron_pept.tools.gpu_check`, measurements in
:mod:`megatron_pept.bench.gpu_check`); this file keeps ``python tools/gpu_check.py`` working in a checkout.
``--dry-run`` checks the plumbing on CPU; ``--help`` for every option.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import megatron_pept  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_pept.tools.gpu_check import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(prog="tools/gpu_check.py"))
