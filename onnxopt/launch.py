"""The `onnxopt` command's entry point: start-up that answers Ctrl-C in one line.

Loading onnx, ONNX Runtime and numpy takes a second or more; a Ctrl-C then
would print a traceback from deep inside an import. This module imports
nothing heavy itself, so it can catch that and exit 130 with one line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("onnxopt: interrupted while starting; nothing was done", file=sys.stderr)
        return 130
    return cli_main(argv)
