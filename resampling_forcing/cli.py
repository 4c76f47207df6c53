"""What the command-line tools share (torch-free): a user error is ONE line on stderr and exit code 2.

    def main(argv=None) -> int:
        return run_cli(build_parser, run, argv, BadInput, "error")
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "BadInput", "OneLineParser", "run_cli"]


class BadInput(Exception):
    """A user error: one line on stderr, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors raise BadInput (one line) instead of printing the usage and exiting."""

    def error(self, message):
        raise BadInput(f"{message} (see --help)")


def run_cli(build_parser: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], int],
            argv: Optional[Sequence[str]], bad_input: type = BadInput, prefix: str = "error") -> int:
    """Parse `argv` and run; `bad_input` (an exception class) -> "PREFIX: message" on stderr, exit 2;
    Ctrl+C -> one line, exit 130 (outputs are written atomically: nothing half-written is left)."""
    try:
        return run(build_parser().parse_args(argv))
    except bad_input as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted (Ctrl+C): stopped; files already reported as written are complete", file=sys.stderr)
        return EXIT_INTERRUPTED
