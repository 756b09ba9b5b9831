#!/usr/bin/env python
"""The memory a run needs per rank, planned on fake tensors (no GPU, nothing allocated).

The tool lives in the package (:mod:`megatron_pept.tools.plan`) and is installed as the console script
``megatron-pept-plan``; this file keeps ``python tools/plan.py``
working in a checkout (same flags, output and exit codes). ``--help`` for every option.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import megatron_pept  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_pept.tools.plan import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(prog="plan.py"))
