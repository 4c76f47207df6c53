"""History routing, step 2 at inference: routed attention of the current chunk's queries over the
selected history chunks (per head, per token) plus, always and fully, their own chunk.

    out, lse = routed_attention(q, k_hist, v_hist, k_cur, v_cur, sel, T)

Paths (chosen by attention.backends): the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1; history
read in place, no host sync) or the torch path (attention/routed_torch.py); on the "auto" path, where
the kernel runs, per call whichever `backends.kernel_is_cheaper` says from `routed_work`.
`routed_block_mask` is the FlexAttention form of the same rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .backends import kernel_is_cheaper, kernels, use_routing_kernels
from .masks import FLEX_BLOCK, block_mask_from_counts
from .positions import FarPositions
from . import routed_torch as _torch_path  # its planner looked up at call time (tests force its layouts)
from .routed_torch import _HistoryPlan, packed_plan, routed_attention_torch
from .selection import check_4d


def check_attention_inputs(what, q, k_hist, v_hist, k_cur, v_cur, sel, chunk_tokens):
    for name, t in (("q", q), ("k_hist", k_hist), ("v_hist", v_hist), ("k_cur", k_cur), ("v_cur", v_cur)):
        check_4d(what, name, t)
    B, Hh, Lq, D = q.shape
    for name, t in (("k_hist", k_hist), ("v_hist", v_hist), ("k_cur", k_cur), ("v_cur", v_cur)):
        if t.shape[0] != B or t.shape[1] != Hh or t.shape[3] != D:
            raise ValueError(f"{what}: {name} {tuple(t.shape)} does not match q {tuple(q.shape)} in B, Hh or D")
        if t.device != q.device:
            raise ValueError(f"{what}: {name} is on {t.device} but q is on {q.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{what}: {name}.dtype {t.dtype} differs from q.dtype {q.dtype}; cast them to one dtype")
    if k_hist.shape[2] != v_hist.shape[2] or k_cur.shape[2] != v_cur.shape[2]:
        raise ValueError(f"{what}: keys and values must have the same length")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"{what}: chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if not isinstance(sel, torch.Tensor) or sel.dtype != torch.bool or sel.dim() != 4 or tuple(sel.shape[:3]) != (B, Hh, Lq):
        got = (sel.dtype, tuple(sel.shape)) if isinstance(sel, torch.Tensor) else type(sel).__name__
        raise ValueError(f"{what}: sel must be a bool tensor [B,Hh,Lq,N] = [{B},{Hh},{Lq},N], got {got}")
    N = sel.shape[3]
    if k_hist.shape[2] != N * chunk_tokens:
        raise ValueError(
            f"{what}: k_hist has {k_hist.shape[2]} tokens but sel has N={N} chunks of chunk_tokens={chunk_tokens} "
            f"(= {N * chunk_tokens} tokens)"
        )
    if sel.device != q.device:
        raise ValueError(f"{what}: sel is on {sel.device} but q is on {q.device}")


def routed_work(sel: torch.Tensor, chunk_tokens: int, cur_tokens: int, block_rows: int) -> torch.Tensor:
    """(query, key) pairs a routed call attends, on sel's device (no host sync): int64 [2] =
    (the kernel's: every chunk any of a block of `block_rows` queries selected, for the whole block;
    the exact: each token's selected chunks), both plus the current chunk (Lq x cur_tokens per head).
    sel: bool [B,Hh,Lq,N]."""
    B, Hh, Lq, N = sel.shape
    pad = -Lq % block_rows
    blocks = torch.cat([sel, sel.new_zeros(B, Hh, pad, N)], dim=2) if pad else sel
    visited = blocks.view(B, Hh, -1, block_rows, N).any(dim=3).sum()
    cur = B * Hh * Lq * cur_tokens
    return torch.stack([visited * (block_rows * chunk_tokens) + cur, sel.sum() * chunk_tokens + cur])


@dataclass
class RoutedPlan:
    """A routed call planned before its history is given (`plan_routed`): which path runs, the torch path's
    plan over the whole history (None on the kernel's), and the caller's `extra` values, all read in ONE
    host sync."""

    use_kernel: bool
    plan: _HistoryPlan | None
    extra: list[int]


def plan_routed(q: torch.Tensor, sel: torch.Tensor, chunk_tokens: int, cur_tokens: int, backend: str = "auto",
                extra: torch.Tensor | None = None, full_chunks: int | None = None) -> RoutedPlan:
    """Plan a routed call of the current chunk's queries q [B,Hh,Lq,D] from the selection over the WHOLE
    history sel [B,Hh,Lq,N] (inference), reading `extra` (int [E] on sel's device) in the same host sync:
    for a caller that must learn something of the selection before it can give the history, e.g. a bounded
    cache the union to stage. Pass the result to `routed_attention(..., plan=...)` with the history packed
    or not: the call makes no sync of its own. (routed_attention plans its own calls here too, `sel` then
    the packed columns of a `full_chunks`-chunk history.)"""
    extra = sel.new_zeros(0, dtype=torch.int64) if extra is None else extra.long().flatten()
    use_kernel = use_routing_kernels(backend, q, "routed_attention", fp32=False)
    B, Hh, Lq, N = sel.shape
    if use_kernel and backend != "auto":  # the kernel plans nothing: the extra values alone
        return RoutedPlan(True, None, extra.tolist())
    if N == 0 or q.numel() == 0:
        return RoutedPlan(use_kernel, _HistoryPlan("none"), extra.tolist())
    work = None
    if use_kernel:  # "auto" where the kernel runs: the statistics it decides by, in the same read
        work = routed_work(sel, chunk_tokens, cur_tokens, kernels().block_rows(q.shape[-1]))
        extra = torch.cat([work, extra])
    plan = _torch_path._plan_history(sel, chunk_tokens, q.shape[-1], full_chunks=full_chunks, extra=extra)
    values = plan.extra
    if work is not None:
        use_kernel, values = kernel_is_cheaper(*values[:2]), values[2:]
    return RoutedPlan(use_kernel, plan, values)


_LAST_PATH: list = ["-"]


def last_routed_path() -> str:
    """The path ("triton" | "torch") the most recent `routed_attention` call took (for benchmarks)."""
    return _LAST_PATH[0]


def routed_attention(
    q: torch.Tensor,
    k_hist: torch.Tensor,
    v_hist: torch.Tensor,
    k_cur: torch.Tensor,
    v_cur: torch.Tensor,
    sel: torch.Tensor,
    chunk_tokens: int,
    scale: float | None = None,
    backend: str = "auto",
    *,
    chunks: list[int] | None = None,
    packed: tuple[list[int], int] | None = None,
    positions: FarPositions | None = None,
    plan: RoutedPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed attention of current-chunk queries: own chunk (full) + selected history chunks (per token).

    q [B,Hh,Lq,D]; k_hist/v_hist [B,Hh,N*T,D]; k_cur/v_cur [B,Hh,Lc,D]; sel bool [B,Hh,Lq,N].
    Returns (out [B,Hh,Lq,D] in q.dtype, lse [B,Hh,Lq] fp32).

    backend "triton": one kernel, history read in place, no host sync.
    backend "auto" where the kernel runs (CUDA, bf16/fp16, no autograd): the torch path's plan is made (its ONE
    host sync, which also reads `routed_work`) and the kernel runs instead when
    `backends.kernel_is_cheaper` (coherent picks; per-token picks that disagree go to the torch path).
    backend "torch" (or "auto" elsewhere): planned from `sel` with ONE host sync. If every query
    selects the same chunks (window mode, k >= history): one plain attention over [those chunks |
    current chunk], no mask. Otherwise the current chunk and the history planned per head (dense
    blocks for chunks most tokens select, MoBA-style (query, chunk) rows for the rest; cost ~ the
    selected pairs * T * D: proportional to k, not to the history; see `routed_torch`) merged by lse. On CPU without autograd it runs torch's fused flash
    kernel; with autograd, explicit differentiable ops ("auto" picks torch whenever gradients are needed:
    the Triton kernel is forward only).
    chunks: optional host list of the history chunks every query selects (`static_chunks`; must agree
    with `sel`): the torch path then reads those slices directly, with no host sync.
    packed: (ids, n) when k_hist / v_hist / sel hold only the history chunks `ids` (ascending host
    list, len N) of an n-chunk history (a bounded cache's staging buffer): same output, bit for bit, as
    over the whole history with `sel` zero elsewhere (the kernel skips unselected chunks; the torch path
    plans as unpacked).
    positions: far-history positions (attention.positions): the history chunks beyond its horizon are
    read at its distance, the same output as `positions.keys(k_hist, ...)` passed instead (the kernel is
    given that rotated copy; the torch path rotates only what it reads: the gathered keys of a uniform
    plan, else the queries that read a far chunk, turned back).
    plan: `plan_routed` over the whole history's selection (its one host sync made before the call): the
    call plans nothing (with `packed`, the plan is restricted to the packed chunks).
    """
    check_attention_inputs("routed_attention", q, k_hist, v_hist, k_cur, v_cur, sel, chunk_tokens)
    if packed is not None and (len(packed[0]) != sel.shape[-1] or any(not 0 <= j < packed[1] for j in packed[0])):
        raise ValueError(f"routed_attention: packed ids {list(packed[0])} must be {sel.shape[-1]} "
                         f"chunk indices < {packed[1]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_hist, v_hist, k_cur, v_cur))
    if needs_grad and backend == "auto":
        backend = "torch"  # the Triton kernel is forward only
    if chunks is not None and any(not 0 <= j < sel.shape[-1] for j in chunks):
        raise ValueError(f"routed_attention: chunks {list(chunks)} must be history chunk indices < {sel.shape[-1]}")
    use_kernel = use_routing_kernels(backend, q, "routed_attention", fp32=False)
    hist_plan = None
    if plan is not None:  # planned by the caller, over the whole history
        if needs_grad or chunks is not None:
            raise ValueError("routed_attention: plan= is for inference calls without chunks= (plan_routed)")
        use_kernel = plan.use_kernel
        if plan.plan is not None and not use_kernel:  # (the kernel plans nothing)
            hist_plan = packed_plan(plan.plan, list(packed[0])) if packed is not None else plan.plan
    elif use_kernel and backend == "auto" and chunks is None and sel.shape[-1] > 0 and q.numel() > 0:
        own = plan_routed(q, sel, chunk_tokens, k_cur.shape[2], backend, full_chunks=None if packed is None else packed[1])
        use_kernel, hist_plan = own.use_kernel, own.plan
    _LAST_PATH[0] = "triton" if use_kernel else "torch"
    n = sel.shape[-1] if packed is None else packed[1]  # the current chunk's index
    ids = None if packed is None else list(packed[0])
    shifts = None if positions is None else positions.column_shifts(n, ids, sel.shape[-1])
    if use_kernel:
        if shifts is not None:
            k_hist = positions.keys(k_hist, chunk_tokens, n, ids)
        if needs_grad:
            raise RuntimeError(
                "routed_attention: backend='triton' is forward only but inputs require grad; "
                "run under torch.no_grad() or use backend='torch'"
            )
        return kernels().routed_attention_fwd(q, k_hist, v_hist, k_cur, v_cur, sel, chunk_tokens, scale)
    return routed_attention_torch(q, k_hist, v_hist, k_cur, v_cur, sel, chunk_tokens, scale,
                                   sorted(chunks) if chunks is not None else None, packed, hist_plan,
                                   None if shifts is None else (positions, shifts))


def _make_inference_mask_mod(sel: torch.Tensor, chunk_tokens: int) -> Callable:
    Lq, N = sel.shape[2], sel.shape[3]
    T = chunk_tokens
    NT = N * T
    if N == 0:
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx >= 0
        return mask_mod

    def mask_mod(b, h, q_idx, kv_idx):
        chunk = (kv_idx // T).clamp(max=N - 1)  # only read when kv_idx < NT
        return (kv_idx >= NT) | sel[b, h, q_idx.clamp(max=Lq - 1), chunk]

    return mask_mod


def routed_block_mask(sel: torch.Tensor, chunk_tokens: int, cur_tokens: int, block_size: int = FLEX_BLOCK):
    """FlexAttention BlockMask for inference keys [history (N*T) | current (cur_tokens)].

    The mask_mod reads `sel` (exact per token); block sparsity is computed from `sel` at block
    granularity (never materialises Lq x Lk): a block is full when all its pairs may attend, partial
    when some may. Same classification as `create_block_mask(mask_mod, ...)`.
    """
    if not isinstance(sel, torch.Tensor) or sel.dtype != torch.bool or sel.dim() != 4:
        raise ValueError("routed_block_mask: sel must be a bool tensor [B,Hh,Lq,N]")
    B, Hh, Lq, N = sel.shape
    T, Lc = chunk_tokens, cur_tokens
    NT = N * T
    Lk = NT + Lc
    dev = sel.device
    nq, nk = -(-Lq // block_size), -(-Lk // block_size)
    tok = torch.arange(nk * block_size, device=dev)
    seg = torch.where(tok < NT, tok // T, torch.full_like(tok, N))  # N = the current chunk
    onehot = F.one_hot(seg.clamp(max=N), N + 1).to(torch.float32) * (tok < Lk).to(torch.float32)[:, None]
    overlap = onehot.view(nk, block_size, N + 1).sum(dim=1)  # [nk, N+1]
    qtok = torch.arange(nq * block_size, device=dev)
    q_cnt = (qtok < Lq).to(torch.float32).view(nq, block_size).sum(dim=1)  # valid queries per block
    cur_cnt = q_cnt[:, None] * overlap[None, :, N]  # [nq, nk]
    sel_cnt = F.pad(sel.to(torch.float32), (0, 0, 0, nq * block_size - Lq)).view(B, Hh, nq, block_size, N).sum(3)
    cnt = sel_cnt @ overlap[:, :N].T + cur_cnt  # exact integers < 2^24
    return block_mask_from_counts(cnt, block_size, _make_inference_mask_mod(sel, T), (Lq, Lk))

