"""What the command-line tools share (torch-free): a user error is ONE line on stderr and exit code 2.

    def main(argv=None) -> int:
        return run_cli(build_parser, run, argv, BadInput, "tool")  # "tool: error: ..."
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .seeds import MAX_SEED

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "MAX_SEED", "BadInput", "OneLineParser", "doc_summary", "check_checkpoint", "check_output_dir",
           "check_output_file", "check_seed", "guarded", "report_bad_input", "run_cli"]


class BadInput(Exception):
    """A user error: one line on stderr, exit code 2."""


def doc_summary(doc: str | None) -> str:
    """The first paragraph of a module docstring as one line: a CLI's --help description."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors raise BadInput (one line) instead of printing the usage and exiting."""

    def error(self, message):
        raise BadInput(f"{message} (see --help)")


def check_seed(flag: str, seed) -> None:
    """A seed flag (None = not given): an int in [0, MAX_SEED]. BadInput otherwise."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise BadInput(f"{flag} must be in [0, {MAX_SEED}] (got {seed})")


def add_overwrite(p: argparse.ArgumentParser, what: str = "--out") -> None:
    """The one --overwrite flag of the tools that write a report (check_output_file's `overwrite`)."""
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {what} (default: refuse it)")


def check_output_file(flag: str, path, suffixes: Sequence[str] = (), overwrite: bool | None = None) -> Path:
    """An output FILE a tool writes at the end, checked before any work: not empty, not a folder, one of
    `suffixes` (when given), and its folder creatable and writable (really probed). `overwrite` False: an
    existing file is refused (a report of minutes of work is not replaced silently); None: not asked
    (benchmarks, whose results are meant to be replaced). BadInput otherwise."""
    from .io import probe_writable_dir  # numpy only; kept out of the torch-free import path of --help

    if path is None or not str(path).strip():
        raise BadInput(f"{flag} must not be empty (a file path)")
    p = Path(path)
    if p.is_dir():
        raise BadInput(f"{flag} {p} is a directory; give a file path")
    if suffixes and p.suffix.lower() not in suffixes:
        raise BadInput(f"{flag} {p}: expected a {' / '.join(suffixes)} file")
    if overwrite is False and p.exists():
        raise BadInput(f"{flag} {p} exists; pass --overwrite to replace it (or give another path)")
    problem = probe_writable_dir(p.parent)
    if problem:
        raise BadInput(f"{flag} {p}: {problem}")
    return p


def check_output_dir(flag: str, path) -> Path:
    """An output FOLDER, checked before any work: not empty, not a file, creatable and writable."""
    from .io import probe_writable_dir

    if path is None or not str(path).strip():
        raise BadInput(f"{flag} must not be empty (a folder)")
    problem = probe_writable_dir(path)
    if problem:
        raise BadInput(f"{flag} {path}: {problem}")
    return Path(path)


def check_checkpoint(flag: str, path, fix: str = ""):
    """A checkpoint a tool loads only later (after training, rendering, ...), checked before any work the
    way sample.py checks --checkpoint (pipeline.resolve_config: the folder, its config.yaml, model config
    and weight file headers; no weights are loaded) -> its Config. BadInput naming `flag` (and `fix`)."""
    from .pipeline.loading import resolve_config  # torch: kept out of the import path of --help

    try:
        return resolve_config(path)
    except ValueError as e:  # PipelineError, CheckpointError, ConfigError: one-line messages
        lines = str(e).strip().splitlines()
        name = f"{flag} {path}" if flag.startswith("-") else f"{flag}={path}"  # a flag, or a config key
        raise BadInput(f"{name}: {lines[0] if lines else type(e).__name__}" + (f" ({fix})" if fix else "")) from None


def guarded(call: Callable[[], Optional[int]], prog: Optional[str] = None, bad_input: type = BadInput) -> int:
    """Run `call()` (its exit code; None = 0): `bad_input` (an exception class) -> "[PROG: ]error: message"
    as ONE line on stderr, exit 2; Ctrl+C -> one line, exit 130 (outputs are written atomically: nothing
    half-written is left; a signals.SecondSignal gives its own message and code). The one entry guard of
    every command-line tool and bench script."""
    try:
        return call() or 0
    except bad_input as e:
        return report_bad_input(prog, e)
    except KeyboardInterrupt as e:  # Python's Ctrl+C, or a tool's signals.SecondSignal (message, exit code)
        lead = f"{prog}: " if prog else ""
        what = str(e) or "interrupted (Ctrl+C): stopped"
        print(f"{lead}{what}; files already reported as written are complete", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_INTERRUPTED)


def report_bad_input(prog: Optional[str], err: object) -> int:
    """Print ``[PROG: ]error: <err>`` (an exception or a message) as ONE line on stderr; returns the exit
    code of bad input (2)."""
    lead = f"{prog}: " if prog else ""
    print(f"{lead}error: {' '.join(str(err).split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run_cli(build_parser: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], int],
            argv: Optional[Sequence[str]], bad_input: type = BadInput, prog: Optional[str] = None) -> int:
    """Parse `argv` and run, under `guarded`."""
    return guarded(lambda: run(build_parser().parse_args(argv)), prog, bad_input)
