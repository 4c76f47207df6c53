"""Routed attention forward kernel (inference), Triton.

What it computes
----------------
Queries of the current chunk, q [B, Hh, Lq, D], attend to

* their own (current) chunk k_cur / v_cur [B, Hh, Lc, D], always and fully (no causal mask), and
* per head and PER QUERY TOKEN, the history chunks j with sel[b, h, m, j] == True, where history
  chunk j is the token range [j*T, (j+1)*T) of k_hist / v_hist [B, Hh, N*T, D].

in ONE softmax (online, flash-attention style), and returns out [B, Hh, Lq, D] (input dtype) and the
natural-log log-sum-exp lse [B, Hh, Lq] (fp32). A row that attends to nothing (Lc == 0 and no chunk
selected) gets out = 0 and lse = -inf, so it merges correctly with `merge_by_lse`.

Design
------
* Grid: (cdiv(Lq, BLOCK_M), B * Hh). One program owns BLOCK_M query rows of one (batch, head).
* History is read IN PLACE through strides (no gather, no copy): k_hist / v_hist may be views of a
  larger pre-allocated KV cache. Base offsets are computed in int64.
* Loop over history chunks j = 0..N-1. The program loads the `sel` column for its BLOCK_M rows. If no
  row of the block selected chunk j the whole chunk is skipped (block-level sparsity: the work done is
  proportional to the union of the block's selections). Otherwise the chunk's keys are visited in
  BLOCK_N tiles (tiles never straddle chunks; the last tile of a chunk is masked, so T need not be a
  multiple of BLOCK_N) and each score tile is masked per row with that row's own sel bit: routing is
  exact per token.
* Then the current chunk, in BLOCK_N tiles, masked only at its end.
* Online softmax in base 2 (scores pre-multiplied by scale*log2(e)), fp32 accumulators, -inf-safe
  updates (a row that has seen only masked keys keeps m = -inf without producing NaN).
* Probabilities are cast to the value dtype for the P@V product (standard flash-attention practice:
  fp16/bf16 tensor cores); fp32 inputs use IEEE fp32 dots (no TF32) so fp32 results are exact to fp32
  rounding.
* Head dim: any D (padded to the next power of two >= 16, masked); 64 and 128 are the tuned cases.
* No host synchronisation: the wrapper reads only shapes/strides.

Cost model: per program, (number of chunks selected by at least one of its rows) * T + Lc keys. With
per-token routing, neighbouring tokens tend to pick the same chunks, so the block union stays small.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..attention.routed import check_attention_inputs
from .common import check_runnable, interpreted, on_device

__all__ = ["routed_attention_fwd", "is_interpreted", "block_rows"]

_LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(qk, m_i, l_i, acc, v, DOT_PRECISION: tl.constexpr):
    """One tile of the online softmax. qk: [BM, BN] base-2 scores (-inf = masked)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# Triton specializes integer arguments on "== 1" and "divisible by 16" and compiles a variant per
# combination; the history length and the strides of `sel` [B, Hh, Lq, N] change with every chunk, which
# would compile new variants (1-3 s each) at ever more history lengths in the middle of a rollout.
@triton.jit(do_not_specialize=["stride_sb", "stride_sh", "stride_sm", "N_HIST"])
def _routed_attn_fwd_kernel(
    Q, KH, VH, KC, VC, SEL, OUT, LSE,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_khb, stride_khh, stride_khn, stride_khd,
    stride_vhb, stride_vhh, stride_vhn, stride_vhd,
    stride_kcb, stride_kch, stride_kcn, stride_kcd,
    stride_vcb, stride_vch, stride_vcn, stride_vcd,
    stride_sb, stride_sh, stride_sm, stride_sj,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    H, LQ, N_HIST, T, LC, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < LQ
    d_valid = offs_d < D

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    kh_base = KH + b * stride_khb + h * stride_khh
    vh_base = VH + b * stride_vhb + h * stride_vhh
    sel_ptrs = SEL + b * stride_sb + h * stride_sh + offs_m * stride_sm

    # ---- history: chunk by chunk, skipped when no row of this block selected it ----
    for j in range(0, N_HIST):
        s_col = tl.load(sel_ptrs + j * stride_sj, mask=m_valid, other=0).to(tl.int32)
        if tl.max(s_col, axis=0) > 0:
            row_on = s_col != 0
            for start in range(0, T, BLOCK_N):
                n_idx = start + offs_n
                n_valid = n_idx < T
                tok = (j * T + n_idx).to(tl.int64)
                k = tl.load(
                    kh_base + tok[None, :] * stride_khn + offs_d[:, None] * stride_khd,
                    mask=n_valid[None, :] & d_valid[:, None], other=0.0,
                )
                qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
                qk = tl.where(row_on[:, None] & n_valid[None, :], qk, float("-inf"))
                v = tl.load(
                    vh_base + tok[:, None] * stride_vhn + offs_d[None, :] * stride_vhd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0,
                )
                m_i, l_i, acc = _online_softmax_step(qk, m_i, l_i, acc, v, DOT_PRECISION)

    # ---- current chunk: always, fully ----
    kc_base = KC + b * stride_kcb + h * stride_kch
    vc_base = VC + b * stride_vcb + h * stride_vch
    for start in range(0, LC, BLOCK_N):
        n_idx = start + offs_n
        n_valid = n_idx < LC
        k = tl.load(
            kc_base + n_idx[None, :] * stride_kcn + offs_d[:, None] * stride_kcd,
            mask=n_valid[None, :] & d_valid[:, None], other=0.0,
        )
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(n_valid[None, :], qk, float("-inf"))
        v = tl.load(
            vc_base + n_idx[:, None] * stride_vcn + offs_d[None, :] * stride_vcd,
            mask=n_valid[:, None] & d_valid[None, :], other=0.0,
        )
        m_i, l_i, acc = _online_softmax_step(qk, m_i, l_i, acc, v, DOT_PRECISION)

    # ---- finalize ----
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))

    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    l_ptrs = LSE + b * stride_lb + h * stride_lh + offs_m * stride_lm
    tl.store(l_ptrs, lse, mask=m_valid)


def is_interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return interpreted(_routed_attn_fwd_kernel)


def _default_config(D: int, interpreted: bool, fp32: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if interpreted:
        # the interpreter runs each program in numpy: fewer, larger tiles are faster
        return 32, 32, 4, 1
    if fp32 and D > 64:
        # IEEE fp32 dots are FMA loops, not tensor-core tiles: (128, 64) at D = 128 uses ~225 KB of shared
        # memory and spills ~68 KB per thread on sm_90 (ptxas, a review); smaller tiles spill far less.
        # The "auto" path leaves fp32 to the torch path anyway (attention.backends.use_routing_kernels).
        return 64, 32, 4, 2
    if D <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3


def block_rows(D: int) -> int:
    """Query rows per program (BLOCK_M) of the default configuration for head dim D: a program reads
    every history chunk that ANY of its rows selected, so this is the unit of the kernel's work."""
    return _default_config(D, is_interpreted())[0]


def routed_attention_fwd(
    q: torch.Tensor,
    k_hist: torch.Tensor,
    v_hist: torch.Tensor,
    k_cur: torch.Tensor | None,
    v_cur: torch.Tensor | None,
    sel: torch.Tensor,
    chunk_tokens: int,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed attention forward. Returns (out [B,Hh,Lq,D] in q.dtype, lse [B,Hh,Lq] fp32).

    q [B,Hh,Lq,D]; k_hist/v_hist [B,Hh,N*T,D] (read in place, any strides); k_cur/v_cur [B,Hh,Lc,D]
    or None (history only); sel bool [B,Hh,Lq,N]; chunk_tokens = T. Inputs are checked by the
    library's one check (attention.routed.check_attention_inputs) plus what only this kernel needs.
    """
    if (k_cur is None) != (v_cur is None):
        raise ValueError("routed_attention_fwd: pass both k_cur and v_cur, or neither (history only)")
    if k_cur is None and isinstance(q, torch.Tensor) and q.dim() == 4:
        k_cur = v_cur = q.new_empty((q.shape[0], q.shape[1], 0, q.shape[3]))
    check_attention_inputs("routed_attention_fwd", q, k_hist, v_hist, k_cur, v_cur, sel, chunk_tokens)
    check_runnable("routed_attention_fwd", _routed_attn_fwd_kernel, "use backend='torch' on CPU", q)
    B, Hh, Lq, D = q.shape
    N = sel.shape[3]

    Lc = k_cur.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    interpreted = is_interpreted()
    bm, bn, nw, ns = _default_config(D, interpreted, fp32=q.dtype == torch.float32)
    bm = block_m or bm
    bn = block_n or bn
    nw = num_warps or nw
    ns = num_stages or ns
    BLOCK_D = max(16, triton.next_power_of_2(D))

    out = torch.empty((B, Hh, Lq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hh, Lq), device=q.device, dtype=torch.float32)
    if B * Hh * Lq == 0:
        return out, lse
    sel_u8 = sel.view(torch.uint8)
    if N == 0:  # keep valid pointers/strides for the (never executed) history loop
        sel_u8 = torch.zeros((B, Hh, Lq, 1), device=q.device, dtype=torch.uint8)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"

    grid = (triton.cdiv(Lq, bm), B * Hh)
    with on_device(q):
        _routed_attn_fwd_kernel[grid](
            q, k_hist, v_hist, k_cur, v_cur, sel_u8, out, lse,
            float(scale) * _LOG2E,
            *q.stride(), *k_hist.stride(), *v_hist.stride(), *k_cur.stride(), *v_cur.stride(),
            *sel_u8.stride(), *out.stride(), *lse.stride(),
            Hh, Lq, N, chunk_tokens, Lc, D,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BLOCK_D, DOT_PRECISION=precision,
            num_warps=nw, num_stages=ns,
        )
    return out, lse
