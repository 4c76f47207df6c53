"""Command-line pieces the bench scripts share: dtype names, the threads/device/dtype setup, and the
attention-shape flags of the two attention benches (kernels.py, routed_attention.py).

Torch-free at import: bench/kernels.py parses its flags before importing torch (``--smoke`` must set
TRITON_INTERPRET before any kernel is defined). Timing and memory helpers: resampling_forcing.timing.
"""
from __future__ import annotations

import argparse

from resampling_forcing.dtypes import DTYPE_NAMES  # noqa: F401 (re-exported for the benches)


def torch_dtype(name: str):
    """"fp32" | "bf16" | "fp16" -> the torch dtype (models.loading.DTYPES)."""
    from resampling_forcing.models.loading import DTYPES

    return DTYPES[name]


def add_attention_shape_args(p: argparse.ArgumentParser, *, history_flag: str, history: str, topk_flag: str,
                             heads: int, head_dim: int = 128) -> None:
    """History lengths and top-k values (comma lists, kept as strings) and the heads x head-dim shape."""
    p.add_argument(history_flag, default=history, help="history lengths in chunks (comma list)")
    p.add_argument(topk_flag, default="1,5", help="top-k values (comma list)")
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--head-dim", type=int, default=head_dim)


def setup_device(args: argparse.Namespace):
    """Apply ``--threads`` (when set) and parse ``--device`` / ``--dtype`` -> (torch.device, torch.dtype)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device), torch_dtype(args.dtype)
