"""Fused routing step, Triton: scores q . mean(K_j) and the chunk selection, in one kernel.

Output: sel bool [B, Hh, Lq, N] (True = that query token, in that head, attends history chunk j),
identical in meaning to `resampling_forcing.attention.reference.select_chunks_reference`:

* allowed (optional bool [Lq, N]) restricts each query row to some chunks; sink/window are relative to
  the row's allowed set (sink = its first `sink` allowed chunks, window = its last `window`).
* mode 0 (dense): sel = allowed.  mode 1 (window): sel = sink U window.
* mode 2 (topk): sel = sink U window U the top_k highest-scoring remaining allowed chunks.
  Tie rule: among equal scores the LOWER chunk index wins.

Design (exact, no sort)
-----------------------
Grid (cdiv(Lq, BLOCK_M), B*Hh); one program holds a [BLOCK_M, BLOCK_NC] tile of a row block's scores
(BLOCK_NC = next power of two >= N) in registers; the scores are never written to memory.

* Scores are accumulated in fp64: q (fp16/bf16/fp32) and mean_k (fp32) are exact in fp64, their
  products are exact, and only the D-term sum rounds (~1e-16 relative). The torch paths use an fp64
  matmul, so the selections agree exactly unless two scores coincide to ~1e-16 without being equal.
  Equal mean keys give bit-identical scores here (every chunk goes through the same code), so
  constructed ties are resolved by the tie rule in both paths.
* Selection by rank: for each candidate chunk j,
      rank(j) = #{candidates j' : s(j') > s(j) or (s(j') == s(j) and j' < j)}
  and j is kept iff rank(j) < top_k. This is exactly "stable descending sort, take the first top_k",
  costs O(N^2) compares per row (N is small: tens of chunks) and works for every top_k.
* Positions inside the allowed set (for sink/window) are prefix counts computed in the same loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.selection import check_select_inputs
from ..attention.spec import RoutingSpec
from .common import check_runnable, interpreted, on_device

__all__ = ["routing_select", "MODES"]

MODES = {"dense": 0, "window": 1, "topk": 2}  # the kernel's codes of attention.spec.ROUTING_MODES


# No specialization on what changes with the history length N (see routed_attention.py): N and the
# strides of mean_k [B, Hh, N, D], allowed [Lq, N] and sel [B, Hh, Lq, N]; BLOCK_NC still steps at powers of 2.
@triton.jit(do_not_specialize=["stride_kb", "stride_kh", "stride_am", "stride_sb", "stride_sh", "stride_sm", "N"])
def _routing_select_kernel(
    Q, MK, ALLOWED, SEL,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_am, stride_an,
    stride_sb, stride_sh, stride_sm, stride_sn,
    H, LQ, N, D,
    TOP_K, SINK, WINDOW,
    MODE: tl.constexpr, HAS_ALLOWED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_NC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_NC)
    m_valid = offs_m < LQ
    c_valid = cols < N
    tile_valid = m_valid[:, None] & c_valid[None, :]

    if HAS_ALLOWED:
        allowed = tl.load(
            ALLOWED + offs_m[:, None] * stride_am + cols[None, :] * stride_an, mask=tile_valid, other=0
        ) != 0
    else:
        allowed = tile_valid
    allowed_i = allowed.to(tl.int32)

    if MODE == 0:
        sel = allowed_i
    else:
        cnt = tl.sum(allowed_i, axis=1)
        # pos[m, j] = number of allowed chunks before j in row m
        pos = tl.zeros([BLOCK_M, BLOCK_NC], dtype=tl.int32)
        for jj in range(0, N):
            a_col = tl.max(tl.where(cols[None, :] == jj, allowed_i, 0), axis=1)
            pos += tl.where(cols[None, :] > jj, a_col[:, None], 0)
        keep_i = allowed_i * ((pos < SINK) | (pos >= cnt[:, None] - WINDOW)).to(tl.int32)
        if MODE == 1:
            sel = keep_i
        else:
            offs_d = tl.arange(0, BLOCK_D)
            d_valid = offs_d < D
            q = tl.load(
                Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0,
            ).to(tl.float64)
            mk_base = MK + b * stride_kb + h * stride_kh
            scores = tl.zeros([BLOCK_M, BLOCK_NC], dtype=tl.float64)
            for j in range(0, N):
                mk = tl.load(mk_base + j * stride_kn + offs_d * stride_kd, mask=d_valid, other=0.0).to(tl.float64)
                s = tl.sum(q * mk[None, :], axis=1)
                scores = tl.where(cols[None, :] == j, s[:, None], scores)
            cand_i = allowed_i * (1 - keep_i)
            rank = tl.zeros([BLOCK_M, BLOCK_NC], dtype=tl.int32)
            for jj in range(0, N):
                is_jj = cols[None, :] == jj
                s_c = tl.max(tl.where(is_jj, scores, float("-inf")), axis=1)
                c_c = tl.max(tl.where(is_jj, cand_i, 0), axis=1)
                beats = (s_c[:, None] > scores) | ((s_c[:, None] == scores) & (cols[None, :] > jj))
                rank += tl.where(beats & (c_c[:, None] != 0), 1, 0)
            sel = keep_i | (cand_i * (rank < TOP_K).to(tl.int32))

    s_ptrs = SEL + b * stride_sb + h * stride_sh + offs_m[:, None] * stride_sm + cols[None, :] * stride_sn
    tl.store(s_ptrs, sel.to(tl.uint8), mask=tile_valid)


def routing_select(
    q: torch.Tensor,
    mean_k: torch.Tensor,
    spec: RoutingSpec,
    allowed: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Fused routing. q [B,Hh,Lq,D] (fp16/bf16/fp32), mean_k [B,Hh,N,D], allowed bool [Lq,N] or None.

    Returns sel bool [B,Hh,Lq,N]. No host synchronisation. Inputs are checked by the library's one
    check (attention.selection.check_select_inputs) plus what only this kernel needs.
    """
    check_select_inputs("routing_select", q, mean_k, spec, allowed)
    check_runnable("routing_select", _routing_select_kernel, "use select_chunks(..., backend='torch') on CPU", q, mean_k)
    B, Hh, Lq, D = q.shape
    N = mean_k.shape[2]

    sel = torch.zeros((B, Hh, Lq, N), device=q.device, dtype=torch.uint8)
    if sel.numel() == 0:
        return sel.view(torch.bool)
    BLOCK_NC = max(2, triton.next_power_of_2(N))
    BLOCK_D = max(2, triton.next_power_of_2(D))
    if block_m is None:
        block_m = 32 if interpreted(_routing_select_kernel) else (16 if BLOCK_D * BLOCK_NC >= 4096 else 32)
    al = allowed.view(torch.uint8) if allowed is not None else sel  # dummy pointer when absent
    a_strides = al.stride()[-2:] if allowed is not None else (0, 0)
    grid = (triton.cdiv(Lq, block_m), B * Hh)
    with on_device(q):
        _routing_select_kernel[grid](
            q, mean_k, al, sel,
            *q.stride(), *mean_k.stride(), *a_strides, *sel.stride(),
            Hh, Lq, N, D,
            int(spec.top_k or 0), spec.sink_chunks, spec.window_chunks,
            MODE=MODES[spec.mode], HAS_ALLOWED=allowed is not None,
            BLOCK_M=block_m, BLOCK_NC=BLOCK_NC, BLOCK_D=BLOCK_D,
            num_warps=num_warps,
        )
    return sel.view(torch.bool)
