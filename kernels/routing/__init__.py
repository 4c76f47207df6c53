"""Triton kernels (import name `resampling_forcing.kernels`; the repo folder is `kernels/routing/`, see kernels/README.md).

* `routed_attention_fwd`: routed attention forward for inference (history chunks read in place,
  per-token selection, current chunk always attended; returns out and lse); `block_rows(D)`, its
  query rows per program.
* `routing_select`: fused routing step (scores q . mean(K_j) + sink/window/top-k selection).

Triton is optional: without it (or without CUDA and without TRITON_INTERPRET=1) the torch paths in
`resampling_forcing.attention` (attention/backends.py decides) are used. Kernels are defined at import; set
TRITON_INTERPRET=1 BEFORE importing this package to run them on CPU tensors (tests do).
"""
from __future__ import annotations

try:  # pragma: no cover - depends on the platform
    import triton  # noqa: F401

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = None
except ImportError:  # not installed: the torch paths are used
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = None
except Exception as e:  # installed but broken: say so once, then use the torch paths
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"
    import logging

    logging.getLogger("resampling_forcing.kernels").warning(
        "triton is installed but failed to import (%s); using the torch attention paths", TRITON_IMPORT_ERROR)

if HAS_TRITON:
    from .routed_attention import block_rows, is_interpreted, routed_attention_fwd
    from .routing_select import routing_select
else:  # pragma: no cover
    def is_interpreted() -> bool:
        return False

    def _missing(*_args, **_kwargs):
        why = f"failed to import ({TRITON_IMPORT_ERROR})" if TRITON_IMPORT_ERROR else "is not installed"
        raise RuntimeError(f"Triton {why}; use backend='torch' (pip install triton on Linux for the kernels)")

    block_rows = routed_attention_fwd = routing_select = _missing

__all__ = ["HAS_TRITON", "block_rows", "is_interpreted", "routed_attention_fwd", "routing_select"]
