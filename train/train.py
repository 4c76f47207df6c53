#!/usr/bin/env python
"""Train a causal video DiT with Resampling Forcing.

    accelerate launch [--config_file configs/accelerate/X.yaml] train/train.py --config configs/tiny.yaml [key=value ...]
    python train/train.py --config configs/tiny.yaml train.run_dir=runs/tiny   # single process

Thin script: the flags, the exit codes and the one-line errors are resampling_forcing.training_cli, the
training resampling_forcing.training.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resampling_forcing.training_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
