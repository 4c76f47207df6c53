"""The dtype names of configs and command lines, and their sizes: torch-free, so the CLIs check their
arguments (and estimate memory) before importing torch. models.loading.DTYPES maps them to torch dtypes."""
from __future__ import annotations

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_NAMES = tuple(DTYPE_BYTES)
