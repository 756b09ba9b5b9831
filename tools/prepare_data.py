#!/usr/bin/env python
"""Tokenize a text corpus into a shard folder for training (data.path).

The tool lives in the package (:mod:`megatron_pept.tools.prepare_data`) and is installed as the console script
``megatron-pept-prepare-data``; this file keeps ``python tools/prepare_data.py``
working in a checkout (same flags, output and exit codes). ``--help`` for every option.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import megatron_pept  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_pept.tools.prepare_data import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(prog="prepare_data.py"))
