#!/usr/bin/env python
"""Export a megatron_pept checkpoint to a Hugging Face LlamaForCausalLM folder.

The tool lives in the package (:mod:`megatron_pept.tools.convert_to_hf`) and is installed as the console script
``megatron-pept-convert-to-hf``; this file keeps ``python tools/convert_to_hf.py``
working in a checkout (same flags, output and exit codes). ``--help`` for every option.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import megatron_pept  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_pept.tools.convert_to_hf import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(prog="convert_to_hf.py"))
