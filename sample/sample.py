#!/usr/bin/env python
"""Sample videos from a run, a checkpoint or a raw Wan checkpoint (Wan2.1 T2V, Wan2.2-TI2V-5B) into mp4 files.

    python sample/sample.py --checkpoint runs/tiny --prompt "a red circle moves left" \\
        --num-chunks 8 --output outputs/red.mp4
    python sample/sample.py --help

Thin script: the flags and their checks are resampling_forcing.sampling_cli, the run sampling_run.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resampling_forcing.sampling_cli import build_parser, check_memory, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
