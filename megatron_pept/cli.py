"""Shared plumbing of the command-line entry points: user mistakes become one line and exit code 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from megatron_pept.errors import UserError


def run_cli(main: Callable[[], int | None], *, prog: str) -> int:
    """Run ``main``; a :class:`UserError` prints ``prog: error: ...`` on stderr and returns 2."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return main() or 0
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
