"""The ``gqsa`` command (``python -m gqsa.cli``, the ``gqsa`` script): :mod:`gqsa.commands` holds it."""
from __future__ import annotations

import sys

from .commands import CLIError, build_parser, main
from .commands.compress import ALLOCATIONS, METHODS

__all__ = ["ALLOCATIONS", "CLIError", "METHODS", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
