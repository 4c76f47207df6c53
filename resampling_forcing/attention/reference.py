"""Plain references of history routing, for tests: obviously correct dense tensor math (MoBA keeps
`moba_naive.py` beside `moba_efficient.py`). Memory O(B*Hh*Lq*N^2) and O(Lq*Lk): small checks only.

select_chunks_reference     twin of selection.select_chunks (torch path bit for bit, Triton kernel); its
                            sink/window rule and scores are written apart from the fast path's
routed_attention_reference  twin of routed.routed_attention (torch path, Triton kernel) and, with the
                            training mask, of routed_training.routed_training_attention
"""
from __future__ import annotations

import math

import torch

from .routed import check_attention_inputs
from .selection import NEG_INF, check_select_inputs, work_dtype
from .spec import RoutingSpec


@torch.no_grad()
def select_chunks_reference(
    q: torch.Tensor, mean_k: torch.Tensor, spec: RoutingSpec, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference selection: bool [B,Hh,Lq,N], True where query token (per head) attends history chunk j.

    sel = sink U window U top_k(rest) (topk), sink U window (window), allowed (dense); sink/window are
    the first/last chunks of each row's allowed set. Top-k by explicit rank:
    rank(j) = #{candidates j' : s_j' > s_j or (s_j' == s_j and j' < j)} -> lower index wins ties.
    Memory O(B*Hh*Lq*N^2): for tests and small checks.
    """
    check_select_inputs("select_chunks_reference", q, mean_k, spec, allowed)
    B, Hh, Lq, _ = q.shape
    N = mean_k.shape[2]
    # written apart from the fast path's rule (selection.keep_and_allowed): counts of allowed chunks
    # before / after each chunk by explicit triangular products, not running sums
    al = allowed if allowed is not None else torch.ones((Lq, N), dtype=torch.bool, device=q.device)
    j = torch.arange(N, device=q.device)
    before = al.double() @ (j[:, None] < j[None, :]).double()  # [Lq, N]: allowed chunks j' < j
    after = al.double() @ (j[:, None] > j[None, :]).double()  # allowed chunks j' > j
    keep = al & ((before < spec.sink_chunks) | (after < spec.window_chunks))
    if spec.mode == "dense":
        return al.expand(B, Hh, Lq, N).clone()
    if spec.mode == "window":
        return keep.expand(B, Hh, Lq, N).clone()
    cand = (al & ~keep).expand(B, Hh, Lq, N)
    s = q.double() @ mean_k.double().transpose(-1, -2)  # exact products (the scale does not change a rank)
    sa, sb = s.unsqueeze(-1), s.unsqueeze(-2)  # [.., a, 1], [.., 1, b]
    idx = torch.arange(N, device=q.device)
    a_before_b = idx[:, None] < idx[None, :]
    beats = cand.unsqueeze(-1) & ((sa > sb) | ((sa == sb) & a_before_b))  # candidate a outranks b
    rank = beats.sum(dim=-2)  # over a
    top = cand & (rank < spec.top_k)
    return keep.expand(B, Hh, Lq, N) | top


def routed_attention_reference(
    q: torch.Tensor,
    k_hist: torch.Tensor,
    v_hist: torch.Tensor,
    k_cur: torch.Tensor,
    v_cur: torch.Tensor,
    sel: torch.Tensor,
    chunk_tokens: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One dense softmax over [history | current]; unselected history chunks get -inf.

    Returns (out [B,Hh,Lq,D] in q.dtype, lse [B,Hh,Lq] fp32, natural log). fp32 accumulation.
    A row with no key at all gets out 0 and lse -inf.
    """
    check_attention_inputs("routed_attention_reference", q, k_hist, v_hist, k_cur, v_cur, sel, chunk_tokens)
    B, Hh, Lq, D = q.shape
    Lc = k_cur.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    wd = work_dtype(q)
    K = torch.cat([k_hist, k_cur], dim=2).to(wd)
    V = torch.cat([v_hist, v_cur], dim=2).to(wd)
    s = torch.matmul(q.to(wd), K.transpose(-1, -2)) * scale
    mask = torch.cat(
        [sel.repeat_interleave(chunk_tokens, dim=-1), torch.ones((B, Hh, Lq, Lc), dtype=torch.bool, device=q.device)],
        dim=-1,
    )
    s = s.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(lse == NEG_INF, torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.matmul(p, V)
    return out.to(q.dtype), lse.to(torch.float32)

