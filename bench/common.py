"""Command-line pieces the bench scripts share: dtype names, the threads/device/dtype setup, the
attention-shape flags of the two attention benches (kernels.py, routed_attention.py), and the rule
every bench follows for bad input (resampling_forcing.cli): ONE line on stderr, ``<prog>: error:
<what is wrong and the fix>``, exit code 2, before any expensive work; outputs written atomically.

    def _main(argv):
        p = OneLineParser(prog="bench/x.py", description="what it does")
        p.add_argument("--chunks", type=positive_int, default=8)
        args = p.parse_args(argv)            # argparse errors -> BadInput (one line, names the flag)
        check_out("--out", args.out)          # before any work
        ...
        atomic_write_json(args.out, result)

    def main(argv=None) -> int:
        return run_main(_main, "bench/x.py", argv)

Torch-free at import: bench/kernels.py parses its flags before importing torch (``--smoke`` must set
TRITON_INTERPRET before any kernel is defined). Timing and memory helpers: resampling_forcing.timing.
"""
from __future__ import annotations

import argparse
import math
import re
from typing import Callable, Iterable, Optional, Sequence

from resampling_forcing.cli import (MAX_SEED, BadInput, OneLineParser, check_output_file, doc_summary,  # noqa: F401
                                    guarded, report_bad_input)
from resampling_forcing.dtypes import DTYPE_NAMES  # noqa: F401 (re-exported for the benches)

__all__ = ["DTYPE_NAMES", "BadInput", "OneLineParser", "doc_summary", "wan13b_shape", "add_attention_shape_args", "check_checkpoint", "check_device",
           "check_out", "choice_list", "device_name", "finite_float", "given_flags", "int_list", "nonneg_int",
           "positive_int", "report_bad_input", "run_main", "seed_range", "setup_device", "torch_dtype"]


# ----------------------------------------------------------------------------- parser and entry point

def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]], prog: str,
             argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)`` under the tools' entry guard (resampling_forcing.cli.guarded): BadInput -> one
    line ``<prog>: error: ...`` on stderr and exit code 2; Ctrl+C -> one line, 130."""
    return guarded(lambda: main(argv), prog)


def given_flags(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> set[str]:
    """The `dest`s of the options given explicitly on the command line (abbreviations included)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for a, d in saved:
            a.default = d


# ----------------------------------------------------------------------------- argparse `type=` functions
# argparse reports an ArgumentTypeError as "argument --flag: <message>", so every error names its flag.

def _int(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def check(text: str) -> int:
        v = _int(text)
        if v < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low} ({what}), got {text!r}")
        return v

    check.__name__ = f"int_at_least_{low}"
    return check


positive_int = _int_at_least(1, "a positive count")
nonneg_int = _int_at_least(0, "0 or more")


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def _items(text: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"an empty list ({text!r}); give comma-separated values")
    return items


def int_list(low: int = 1, high: Optional[int] = None) -> Callable[[str], str]:
    """A comma list of integers in [low, high]; returns the list as a normalised string ("6,10,20")
    (the scripts split it themselves, and record the string as given)."""
    def check(text: str) -> str:
        items = _items(text)
        for x in items:
            v = _int(x)
            if v < low or (high is not None and v > high):
                rng = f">= {low}" if high is None else f"in [{low}, {high}]"
                where = "" if len(items) == 1 else f" in {text!r}"
                raise argparse.ArgumentTypeError(f"{x!r}{where}: each value must be an integer {rng}")
        return ",".join(items)

    check.__name__ = "int_list"
    return check


def choice_list(choices: Iterable[str]) -> Callable[[str], str]:
    """A comma list of names from `choices`; returns it as a normalised string ("random,coherent")."""
    choices = list(choices)

    def check(text: str) -> str:
        items = _items(text)
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, bad))}; choose from {', '.join(choices)}")
        return ",".join(items)

    check.__name__ = "choice_list"
    return check


def seed_range(text: str) -> str:
    """Seeds as "a-b" (inclusive, a <= b) or "a,b,c", each in [0, 2^63-1]; returned as given."""
    if "-" in text and "," not in text:
        lo, _, hi = text.partition("-")
        a, b = _int(lo.strip()), _int(hi.strip())
        if not 0 <= a <= b <= MAX_SEED:
            raise argparse.ArgumentTypeError(f"{text!r}: a range a-b needs 0 <= a <= b <= {MAX_SEED}")
        return text
    int_list(0, MAX_SEED)(text)
    if any(not x.strip() for x in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty entry; e.g. 0-7 or 0,1,2")
    return text


_DEVICE = re.compile(r"(cpu|cuda(:\d+)?|mps)")


def device_name(text: str) -> str:
    """A torch device name (torch-free check): cpu, cuda, cuda:N or mps. Availability: check_device."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda, cuda:N or mps")
    return text


# ----------------------------------------------------------------------------- checks before any work

def check_out(flag: str, path, suffixes: Sequence[str] = ()) -> None:
    """An output file given with `flag` (None = not asked for): not empty, not a folder, its folder
    creatable and writable (probed; nothing is left behind). BadInput otherwise."""
    if path is not None:
        check_output_file(flag, path, suffixes)


def check_device(flag: str, name: str):
    """`name` (already a device_name) as a torch.device, or BadInput when it is not on this machine
    (CUDA/MPS not available, a CUDA index past the last device). Imports torch."""
    from resampling_forcing.pipeline.loading import resolve_device

    try:
        return resolve_device(name, what=flag)
    except ValueError as e:
        raise BadInput(str(e)) from None


def check_checkpoint(flag: str, path) -> None:
    """A checkpoint folder (run dir, checkpoints/step_* or a Wan2.1 folder) that exists and is complete."""
    from resampling_forcing.checkpoint import resolve_checkpoint

    if path is None or not str(path).strip():
        raise BadInput(f"{flag} must not be empty (a checkpoint folder)")
    try:
        resolve_checkpoint(path)
    except ValueError as e:
        raise BadInput(f"{flag}: {e}") from None


# ----------------------------------------------------------------------------- shared flags and setup

def torch_dtype(name: str):
    """"fp32" | "bf16" | "fp16" -> the torch dtype (models.loading.DTYPES)."""
    from resampling_forcing.models.loading import DTYPES

    return DTYPES[name]


def wan13b_shape(chunk_frames: int = 1) -> tuple[int, int, int]:
    """(heads, head dim, tokens per chunk) of Wan2.1-T2V-1.3B at 480x832 (a 60x104 latent) with chunks of
    `chunk_frames` latent frames: the attention shape the benchmarks measure at, from the model preset."""
    import dataclasses

    from resampling_forcing.config import MODEL_PRESETS, ModelConfig

    m = dataclasses.replace(ModelConfig(**MODEL_PRESETS["wan2.1-t2v-1.3b"]), chunk_frames=chunk_frames)
    return m.num_heads, m.head_dim, m.chunk_tokens(60, 104)


def add_attention_shape_args(p: argparse.ArgumentParser, *, history_flag: str, history: str, topk_flag: str,
                             heads: int | None = None) -> None:
    """History lengths and top-k values (comma lists, kept as strings) and the heads x head-dim shape
    (default Wan2.1-T2V-1.3B's; `heads` a smaller default for a CPU benchmark)."""
    wan_heads, head_dim, _ = wan13b_shape()
    heads = wan_heads if heads is None else heads
    p.add_argument(history_flag, type=int_list(1), default=history, help="history lengths in chunks (comma list)")
    p.add_argument(topk_flag, type=int_list(1), default="1,5", help="top-k values (comma list)")
    p.add_argument("--heads", type=positive_int, default=heads, help=f"attention heads (default {heads}; "
                   f"Wan2.1-1.3B has {wan_heads})")
    p.add_argument("--head-dim", type=positive_int, default=head_dim, help=f"head dim (default {head_dim})")


def setup_device(args: argparse.Namespace):
    """Check ``--device`` is here (BadInput), apply ``--threads`` (when set) and parse ``--dtype``
    -> (torch.device, torch.dtype)."""
    import torch

    device = check_device("--device", args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device, torch_dtype(args.dtype)
