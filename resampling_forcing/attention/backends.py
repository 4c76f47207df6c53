"""One place that decides how attention is computed.

Backends (config `attention.backend`, CLI `--attention-backend`):
- sdpa:     torch scaled_dot_product_attention; masked layouts use a dense bool mask. Works
            everywhere and is the only one with a backward on CPU.
- flex:     FlexAttention with a cached BlockMask (compiled on CUDA; eager forward on CPU).
- triton:   our routed-attention kernels (resampling_forcing.kernels) for history routing;
            masked training layouts fall back to flex on CUDA, sdpa on CPU.
- xformers: memory_efficient_attention for unmasked attention (CUDA only, optional extra);
            masked layouts use it with a dense additive bias.
- auto:     flex on CUDA, whose history routing runs the Triton kernels when they import, routed
            attention choosing per call between the kernel and the torch path (`kernel_is_cheaper`);
            sdpa on CPU.

Every choice of how attention runs is made here, from the resolved backend and the device:
- dense / masked attention: `attention` (and `flex_fn`, the one compiled FlexAttention);
- history routing at inference, selection AND routed attention alike: `routing_path(backend)` gives
  the path ("torch" | "triton" | "auto") that `select_chunks` and `routed_attention` take, and
  `use_routing_kernels` decides what a path means for a tensor; on the "auto" path routed attention
  runs the kernel for bf16/fp16 only and asks `kernel_is_cheaper` per call, from the selection's statistics;
- routed training attention: `training_routing(backend, device)` (sdpa | flex, and the selection path).
The rest of the library receives the resolved name and asks these functions; it decides nothing.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from .masks import MaskSpec, block_mask, dense_mask, padded_len
from .spec import BACKENDS

log = logging.getLogger(__name__)



@functools.lru_cache(maxsize=None)
def _xformers_ops():
    try:
        import xformers.ops as xops  # noqa: F401

        return xops
    except Exception as e:  # ImportError or a CUDA/ABI mismatch at load time
        log.warning("xformers could not be loaded (%s); falling back to sdpa", str(e).splitlines()[0])
        return None


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map a configured backend to the one that will run; one-line errors for impossible choices."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {list(BACKENDS)}")
    if name == "auto":  # flex: masked layouts via FlexAttention, routing on the "auto" path
        return "flex" if device.type == "cuda" else "sdpa"
    if name == "triton" and not triton_usable(device):
        raise ValueError(
            f"attention backend 'triton' needs a CUDA device (got {device.type}); "
            "use attention.backend=sdpa on CPU (or set TRITON_INTERPRET=1 for the slow interpreter)")
    if name == "xformers":
        if device.type != "cuda":
            raise ValueError(f"attention backend 'xformers' is CUDA-only (got {device.type}); use sdpa on CPU")
        if _xformers_ops() is None:
            return "sdpa"
    return name


# Paths of the history-routing code (`attention.selection.select_chunks`, `attention.routed.routed_attention`).
ROUTING_PATHS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def kernels():
    """The Triton kernels (`resampling_forcing.kernels`, repo folder kernels/routing/), or None without Triton."""
    try:
        import resampling_forcing.kernels as kern
    except ImportError:  # a checkout used without `pip install -e .`: the package-dir mapping is missing
        return None
    return kern if kern.HAS_TRITON else None


def triton_usable(device: torch.device) -> bool:
    """True when Triton kernels can run here: CUDA, or the CPU interpreter (TRITON_INTERPRET=1)."""
    return kernels() is not None and (device.type == "cuda" or kernels().is_interpreted())


_ROUTING_PATH_OF = {"triton": "triton", "sdpa": "torch"}


def routing_path(backend: str) -> str:
    """The routing path for a resolved attention backend: our Triton kernels when triton was asked
    for, the torch path for sdpa, and "auto" (the kernels on CUDA when they import) otherwise."""
    return _ROUTING_PATH_OF.get(backend, "auto")


def use_routing_kernels(path: str, x: torch.Tensor, what: str, fp32: bool = True) -> bool:
    """Whether routing `path` runs the Triton kernels for tensors like `x` (False: the torch path).
    `fp32=False`: the "auto" path leaves fp32 tensors to the torch path (routed attention: its kernel's
    fp32 variant computes IEEE fp32 dots without tensor cores and, at head dim 128, spills registers)."""
    if path not in ROUTING_PATHS:
        raise ValueError(f"{what}: backend must be one of {list(ROUTING_PATHS)}, got {path!r}")
    if path == "torch":
        return False
    kern = kernels()
    if path == "auto":
        dtypes = (torch.float16, torch.bfloat16, torch.float32) if fp32 else (torch.float16, torch.bfloat16)
        return kern is not None and x.is_cuda and not kern.is_interpreted() and x.dtype in dtypes
    if kern is None:
        raise RuntimeError(f"{what}: backend='triton' needs the Triton kernels (the triton package and an installed "
                           "checkout, pip install -e ., which maps kernels/routing/ to resampling_forcing.kernels); use backend='torch'")
    if not x.is_cuda and not kern.is_interpreted():
        raise RuntimeError(
            f"{what}: backend='triton' needs CUDA tensors (got {x.device}) or TRITON_INTERPRET=1 set before import; "
            "use backend='torch' or 'auto' on CPU")
    return True


# Routed attention on the "auto" path, where the kernel runs (CUDA): the Triton kernel and the torch path
# compute the same thing at different costs. A kernel program owns `block_rows` queries and reads every
# history chunk ANY of them selected, so per-token picks that disagree inflate its work (up to
# block_rows-fold for uncorrelated picks, the "random" pattern); the torch path computes exactly the
# selected (token, chunk) pairs, each more slowly (planning, gathers, more and smaller calls). Counted in
# (query, key) pairs per call, the current chunk (Lq x Lc per head) the same on both:
#   kernel ~ visited (block, chunk) pairs * block_rows * T + Lq * Lc
#   torch  ~ TORCH_PATH_SLOWDOWN * (selected (token, chunk) pairs * T + Lq * Lc)
# The slowdown is a prior, not a measurement (no GPU has run bench/kernels.py yet): on CUDA the torch path
# computes in fp32 with explicit products and materialised scores (torch's fused kernels return no lse
# there), against the kernel's bf16 tensor-core tiles; peak rates put that near 8x per pair. So the
# torch path takes over only when the kernel's blocks would read ~8x the selected pairs (per-token k = 1
# or 2 of dozens of chunks). bench/kernels.py fits the value from its triton and torch rows and prints it.
TORCH_PATH_SLOWDOWN = 8.0


def kernel_is_cheaper(kernel_pairs: int, exact_pairs: int, slowdown: float | None = None) -> bool:
    """Whether the Triton kernel beats the torch path for a call whose kernel would visit
    `kernel_pairs` (query, key) pairs where the selection needs `exact_pairs` (see above)."""
    return kernel_pairs <= (TORCH_PATH_SLOWDOWN if slowdown is None else slowdown) * exact_pairs


def training_routing(backend: str, device: torch.device) -> tuple[str, str]:
    """(attention, selection path) of routed training attention: FlexAttention on CUDA for flex and
    triton (the routed kernel is forward only), else SDPA with a dense mask; selection as at inference."""
    attn = "flex" if backend in ("flex", "triton") and torch.device(device).type == "cuda" else "sdpa"
    return attn, routing_path(backend)


@functools.lru_cache(maxsize=None)
def _flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_fn(device: torch.device):
    """flex_attention, compiled on CUDA (needed for its speed and memory), eager elsewhere."""
    if torch.device(device).type == "cuda":
        return _flex_compiled()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def flex_attention(q, k, v, spec: MaskSpec) -> torch.Tensor:
    """q, k, v: [B, Hh, L, D] with L = spec.seq_len; pads to the BlockMask's length."""
    length = spec.seq_len
    pad = padded_len(length) - length
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    out = flex_fn(q.device)(q, k, v, block_mask=block_mask(spec, q.device))
    return out[:, :, :length]


def attention(q, k, v, spec: MaskSpec | None, backend: str) -> torch.Tensor:
    """Self-attention over one layout. q, k, v: [B, Hh, L, D] -> [B, Hh, L, D].

    `spec` None or kind "full" means unmasked attention; `backend` is a resolved name."""
    masked = spec is not None and spec.kind != "full"
    if backend in ("flex", "triton") and masked:
        if q.device.type == "cuda" or (not torch.is_grad_enabled()):
            return flex_attention(q, k, v, spec)
        backend = "sdpa"  # FlexAttention has no backward on CPU
    if backend == "xformers":
        xops = _xformers_ops()
        bias = None
        if masked:
            m = dense_mask(spec, q.device)
            bias = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(~m, float("-inf"))
            bias = bias.expand(q.shape[0], q.shape[1], -1, -1)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    mask = dense_mask(spec, q.device) if masked else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
