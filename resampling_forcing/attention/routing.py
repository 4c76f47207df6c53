"""History routing for attention (method.md section 6; conventions in docs/CONTRACTS.md).

Each query token (per head) scores every history chunk j by q . mean(K_j) and attends to a subset of
them (sink U window U top-k of the rest; or sink U window for the sliding-window baseline; or all
for dense) plus, always and fully, its own chunk. The selection is parameter free and carries no
gradient.

Inference (queries of the current chunk, history in the KV cache):
    mean_k = chunk_means(k_hist, T)                        # cache this per chunk
    sel = select_chunks(q, mean_k, spec)                   # bool [B,Hh,Lq,N]
    out, lse = routed_attention(q, k_hist, v_hist, k_cur, v_cur, sel, T)

Training (sequence [H_1..H_N | Q_1..Q_N], base mask of CONTRACTS.md, routing over H_j, j < i):
    out = routed_training_attention(q, k, v, N, T, spec, backend="sdpa" | "flex")

Backends
--------
* Reference functions (`*_reference`): plain dense tensor math, obviously correct, for tests.
* torch: `select_chunks` takes the top-k by a threshold + lowest-index tie break (exactly the
  reference tie rule, no sort, no host sync). `routed_attention` is planned from `sel` with ONE
  host sync (none when the caller passes `chunks=static_chunks(spec, N)`): same chunks for every
  query (window mode, k >= history) -> one plain attention over [those chunks | current] (no mask);
  otherwise, per head, chunks most of its tokens select as dense blocks (all the head's queries, K/V
  in place; "sink + recent" heads) and the other (query, chunk) pairs grouped by chunk (MoBA style),
  chosen by a cost model (cost ~ the selected pairs * T * D: proportional to k, not to the history
  length; never more than dense attention), merged with the current chunk by log-sum-exp. On CPU
  inference all use torch's fused flash kernel; with autograd, explicit differentiable ops.
* triton (CUDA, or CPU under TRITON_INTERPRET=1): `resampling_forcing.kernels` — a fused routing
  kernel and a routed attention kernel that reads history chunks in place. No host syncs.

Scores are computed in fp64 everywhere (products of fp32/fp16/bf16 inputs are exact; only the D-term
sum rounds, ~1e-16 relative). The torch paths share one score function, so `select_chunks(backend=
"torch")` equals the reference bit for bit; the Triton kernel sums in its own order and can differ only
when two scores agree to ~1e-16 without being equal. Exact ties (equal mean keys) are resolved
identically everywhere: the lower chunk index wins.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .spec import ROUTING_MODES, RoutingSpec, routing_spec  # noqa: F401  (re-exported)

__all__ = [
    "ROUTING_MODES",
    "RoutingSpec",
    "routing_spec",
    "chunk_means",
    "routing_scores",
    "select_chunks_reference",
    "select_chunks",
    "routed_attention_reference",
    "routed_attention",
    "static_chunks",
    "merge_by_lse",
    "routed_block_mask",
    "training_allowed",
    "RoutedTrainingMask",
    "routed_training_mask",
    "routed_training_attention",
]

_BACKENDS = ("auto", "torch", "triton")
_NEG_INF = float("-inf")
# Upper bound (bytes) on one fp32 score block in the torch attention path.
_SCORE_BLOCK_BYTES = 1 << 28


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
_KERNELS_MODULE: object = False  # False = not looked up yet


def _load_kernels_module():
    """Import `resampling_forcing.kernels` (repo folder kernels/, mapped by pyproject package-dir).

    In a checkout that is on PYTHONPATH but not pip-installed that mapping does not exist: load the
    folder next to the package by hand so the Triton path is not silently lost. None if unavailable.
    """
    import sys

    try:
        import resampling_forcing.kernels as kernels

        return kernels
    except ImportError:
        pass
    import importlib.util
    from pathlib import Path

    import resampling_forcing

    init = Path(resampling_forcing.__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.is_file():
        return None
    spec = importlib.util.spec_from_file_location(
        "resampling_forcing.kernels", init, submodule_search_locations=[str(init.parent)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception:  # pragma: no cover
        del sys.modules[spec.name]
        return None
    resampling_forcing.kernels = mod
    return mod


def _kernels():
    """The Triton kernels module, or None when triton (or the kernels folder) is unavailable."""
    global _KERNELS_MODULE
    if _KERNELS_MODULE is False:
        try:
            _KERNELS_MODULE = _load_kernels_module()
        except Exception:  # pragma: no cover - broken triton install
            _KERNELS_MODULE = None
    k = _KERNELS_MODULE
    return k if k is not None and getattr(k, "HAS_TRITON", False) else None


def _use_triton(backend: str, x: torch.Tensor, what: str) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"{what}: backend must be one of {list(_BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return False
    kern = _kernels()
    if backend == "auto":
        return (
            kern is not None
            and x.is_cuda
            and not kern.is_interpreted()
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        )
    if kern is None:
        raise RuntimeError(f"{what}: backend='triton' needs the triton package, which is not importable; use backend='torch'")
    if not x.is_cuda and not kern.is_interpreted():
        raise RuntimeError(
            f"{what}: backend='triton' needs CUDA tensors (got {x.device}) or TRITON_INTERPRET=1 set before import; "
            "use backend='torch' or 'auto' on CPU"
        )
    return True


def _work_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _check_4d(what: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what}: {name} must be a 4-D tensor [B, Hh, L, D] (heads second), got {got}")


# --------------------------------------------------------------------------------------------
# Chunk means and scores
# --------------------------------------------------------------------------------------------
def chunk_means(k: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Mean key of each chunk: k [B,Hh,N*T,D] -> [B,Hh,N,D] in fp32 (fp32 accumulation, no copy of k)."""
    _check_4d("chunk_means", "k", k)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_means: chunk_tokens must be a positive int, got {chunk_tokens!r}")
    L = k.shape[2]
    if L % chunk_tokens:
        raise ValueError(
            f"chunk_means: k has {L} tokens, not a multiple of chunk_tokens={chunk_tokens}; "
            "pass whole chunks only"
        )
    dt = torch.float64 if k.dtype == torch.float64 else torch.float32
    return k.unflatten(2, (L // chunk_tokens, chunk_tokens)).mean(dim=3, dtype=dt)


def routing_scores(q: torch.Tensor, mean_k: torch.Tensor, *, block_rows: int = 8192) -> torch.Tensor:
    """Scores q . mean_k per head and token, [B,Hh,Lq,N], computed in fp64 (exact products).

    The scale 1/sqrt(D) is omitted: it does not change the ranking.
    """
    mk = mean_k.detach().to(torch.float64)
    q = q.detach()
    Lq = q.shape[2]
    if Lq <= block_rows:
        return torch.matmul(q.to(torch.float64), mk.transpose(-1, -2))
    return torch.cat(
        [torch.matmul(q[:, :, s: s + block_rows].to(torch.float64), mk.transpose(-1, -2)) for s in range(0, Lq, block_rows)],
        dim=2,
    )


def _check_select_inputs(what, q, mean_k, spec, allowed):
    _check_4d(what, "q", q)
    _check_4d(what, "mean_k", mean_k)
    if not isinstance(spec, RoutingSpec):
        raise TypeError(f"{what}: spec must be a RoutingSpec, got {type(spec).__name__}")
    B, Hh, Lq, D = q.shape
    if mean_k.shape[0] != B or mean_k.shape[1] != Hh or mean_k.shape[3] != D:
        raise ValueError(f"{what}: mean_k {tuple(mean_k.shape)} must be [B,Hh,N,D] matching q {tuple(q.shape)}")
    N = mean_k.shape[2]
    if allowed is not None:
        if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool or tuple(allowed.shape) != (Lq, N):
            got = (allowed.dtype, tuple(allowed.shape)) if isinstance(allowed, torch.Tensor) else type(allowed).__name__
            raise ValueError(f"{what}: allowed must be a bool tensor [Lq, N] = [{Lq}, {N}], got {got}")
        if allowed.device != q.device:
            raise ValueError(f"{what}: allowed is on {allowed.device} but q is on {q.device}")
    if mean_k.device != q.device:
        raise ValueError(f"{what}: mean_k is on {mean_k.device} but q is on {q.device}")


def _keep_and_allowed(spec: RoutingSpec, allowed: torch.Tensor | None, Lq: int, N: int, device):
    """(allowed [Lq,N], keep [Lq,N]) where keep = sink U window relative to each row's allowed set."""
    al = allowed if allowed is not None else torch.ones((Lq, N), dtype=torch.bool, device=device)
    pos = torch.cumsum(al.to(torch.int64), dim=-1) - 1  # position of each allowed chunk in its row
    cnt = al.sum(dim=-1, keepdim=True)
    keep = al & ((pos < spec.sink_chunks) | (pos >= cnt - spec.window_chunks))
    return al, keep


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------
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
    _check_select_inputs("select_chunks_reference", q, mean_k, spec, allowed)
    B, Hh, Lq, _ = q.shape
    N = mean_k.shape[2]
    al, keep = _keep_and_allowed(spec, allowed, Lq, N, q.device)
    if spec.mode == "dense":
        return al.expand(B, Hh, Lq, N).clone()
    if spec.mode == "window":
        return keep.expand(B, Hh, Lq, N).clone()
    cand = (al & ~keep).expand(B, Hh, Lq, N)
    s = routing_scores(q, mean_k)
    sa, sb = s.unsqueeze(-1), s.unsqueeze(-2)  # [.., a, 1], [.., 1, b]
    idx = torch.arange(N, device=q.device)
    a_before_b = idx[:, None] < idx[None, :]
    beats = cand.unsqueeze(-1) & ((sa > sb) | ((sa == sb) & a_before_b))  # candidate a outranks b
    rank = beats.sum(dim=-2)  # over a
    top = cand & (rank < spec.top_k)
    return keep.expand(B, Hh, Lq, N) | top


@torch.no_grad()
def _select_torch(q, mean_k, spec, allowed):
    B, Hh, Lq, _ = q.shape
    N = mean_k.shape[2]
    if spec.mode == "dense" or N <= spec.max_selected():  # every allowed chunk is kept (host rule)
        al = allowed if allowed is not None else torch.ones((Lq, N), dtype=torch.bool, device=q.device)
        return al.expand(B, Hh, Lq, N).contiguous()
    al, keep = _keep_and_allowed(spec, allowed, Lq, N, q.device)
    if spec.mode == "window" or N == 0:
        return keep.expand(B, Hh, Lq, N).contiguous()
    cand = al & ~keep
    s = torch.where(cand, routing_scores(q, mean_k), _NEG_INF)
    k = min(int(spec.top_k), N)
    # Exactly "stable descending sort, first k" without a sort: kth = the k-th largest score (topk
    # values do not depend on how ties are ordered); keep every candidate above it, and of those equal
    # to it the first (lowest index) k - #above.
    kth = s.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above = s > kth
    tie = (s == kth) & cand
    top = above | (tie & (tie.cumsum(dim=-1) <= k - above.sum(dim=-1, keepdim=True)))
    return (top & cand) | keep


def select_chunks(
    q: torch.Tensor,
    mean_k: torch.Tensor,
    spec: RoutingSpec,
    allowed: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Efficient selection, exactly equal to `select_chunks_reference`. bool [B,Hh,Lq,N].

    backend: "auto" (Triton fused kernel on CUDA when available, else torch), "torch", "triton".
    No gradient flows (inputs are detached); no host syncs.
    """
    _check_select_inputs("select_chunks", q, mean_k, spec, allowed)
    if _use_triton(backend, q, "select_chunks"):
        with torch.no_grad():
            return _kernels().routing_select(
                q.detach(), mean_k.detach(), spec.mode, spec.top_k, spec.sink_chunks, spec.window_chunks,
                allowed=allowed,
            )
    return _select_torch(q.detach(), mean_k.detach(), spec, allowed)


# --------------------------------------------------------------------------------------------
# Routed attention
# --------------------------------------------------------------------------------------------
def _check_attention_inputs(what, q, k_hist, v_hist, k_cur, v_cur, sel, chunk_tokens):
    for name, t in (("q", q), ("k_hist", k_hist), ("v_hist", v_hist), ("k_cur", k_cur), ("v_cur", v_cur)):
        _check_4d(what, name, t)
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
    _check_attention_inputs("routed_attention_reference", q, k_hist, v_hist, k_cur, v_cur, sel, chunk_tokens)
    B, Hh, Lq, D = q.shape
    Lc = k_cur.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    wd = _work_dtype(q)
    K = torch.cat([k_hist, k_cur], dim=2).to(wd)
    V = torch.cat([v_hist, v_cur], dim=2).to(wd)
    s = torch.matmul(q.to(wd), K.transpose(-1, -2)) * scale
    mask = torch.cat(
        [sel.repeat_interleave(chunk_tokens, dim=-1), torch.ones((B, Hh, Lq, Lc), dtype=torch.bool, device=q.device)],
        dim=-1,
    )
    s = s.masked_fill(~mask, _NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(lse == _NEG_INF, torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.matmul(p, V)
    return out.to(q.dtype), lse.to(torch.float32)


def merge_by_lse(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two attention results over disjoint key sets.

    o = (e^l1 o1 + e^l2 o2) / (e^l1 + e^l2), lse = log(e^l1 + e^l2). A branch with lse = -inf (no keys)
    contributes nothing, whatever its o holds (even NaN); both -inf gives o = 0, lse = -inf.
    Computed in fp32 (fp64 if any input is fp64); o returned in o1.dtype, lse in fp32 (or fp64).
    """
    if o1.shape != o2.shape or lse1.shape != lse2.shape or o1.shape[:-1] != lse1.shape:
        raise ValueError(
            f"merge_by_lse: shapes must be o [..., D], lse [...]: got {tuple(o1.shape)}, {tuple(lse1.shape)}, "
            f"{tuple(o2.shape)}, {tuple(lse2.shape)}"
        )
    wd = _work_dtype(o1, o2, lse1, lse2)
    l1, l2 = lse1.to(wd), lse2.to(wd)
    m = torch.maximum(l1, l2)
    m_safe = torch.where(m == _NEG_INF, torch.zeros_like(m), m)
    w1 = torch.exp(l1 - m_safe)
    w2 = torch.exp(l2 - m_safe)
    tot = w1 + w2
    lse = m_safe + torch.log(tot)  # tot == 0 -> -inf
    tot_safe = torch.where(tot > 0, tot, torch.ones_like(tot))
    a1 = (w1 / tot_safe).unsqueeze(-1)
    a2 = (w2 / tot_safe).unsqueeze(-1)
    zero = torch.zeros((), dtype=wd, device=o1.device)
    o = torch.where(a1 > 0, o1.to(wd) * a1, zero) + torch.where(a2 > 0, o2.to(wd) * a2, zero)
    lse_dtype = torch.float64 if wd == torch.float64 else torch.float32
    return o.to(o1.dtype), lse.to(lse_dtype)


def _attend_with_lse(q, k, v, scale):
    """Unmasked softmax attention with lse, in query blocks of bounded memory (explicit torch ops).

    Returns (out, lse) in the working dtype (fp32, or fp64 for fp64 inputs); no keys -> 0, -inf.
    """
    B, Hh, Lq, D = q.shape
    Lk = k.shape[2]
    wd = _work_dtype(q)
    if Lk == 0 or Lq == 0:
        out = torch.zeros((B, Hh, Lq, v.shape[3]), dtype=wd, device=q.device)
        return out, torch.full((B, Hh, Lq), _NEG_INF, dtype=wd, device=q.device)
    kf = k.to(wd)
    vf = v.to(wd)
    el = torch.finfo(wd).bits // 8
    rows = max(1, min(Lq, _SCORE_BLOCK_BYTES // max(1, B * Hh * Lk * el)))
    outs, lses = [], []
    for s0 in range(0, Lq, rows):
        s = torch.matmul(q[:, :, s0: s0 + rows].to(wd), kf.transpose(-1, -2)) * scale
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse.unsqueeze(-1)), vf))
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


# torch's fused CPU flash-attention kernel returns the lse too. Private op: its lse carries no gradient
# and it rejects empty inputs, so autograd, other devices and empty shapes use `_attend_with_lse`.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attn_lse(q, k, v, scale):
    """Unmasked attention -> (out, lse) in the working dtype; the fused kernel for CPU inference."""
    if (
        _FLASH_CPU is not None and q.device.type == "cpu" and q.numel() > 0 and k.numel() > 0
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    ):
        wd = _work_dtype(q)
        out, lse = _FLASH_CPU(q.to(wd), k.to(wd), v.to(wd), scale=scale)
        return out, lse.to(wd)
    return _attend_with_lse(q, k, v, scale)


# History branch of the torch path. Per (batch, head) the history chunks are split by how many of the
# head's query tokens select them (counts c_j, from `sel`):
#   dense blocks: the m most selected chunks are attended by ALL the head's queries in place (query view
#     expanded over a run of consecutive chunks, the run's K/V a view of the cache: no copies), and the
#     pairs a token did not select are dropped at the merge (their lse set to -inf). Cost ~ m * Lq * T,
#     at the kernel's full speed: what "sink + recent" selections (coherent heads) need.
#   sparse rows: the remaining (query, chunk) pairs, MoBA style: each chunk's queries gathered into rows
#     and attended against the chunk's keys in place. Two layouts: "padded" (every chunk of the head
#     gets G rows, G = the largest remaining count; one call for all N chunks, [heads, N, T, D] view of
#     the cache, heads batched when padding them to one G adds at most 1/4 rows) and "per-chunk" (exactly
#     c_j rows, one call per non-empty chunk: no padding, and chunks nobody picked are never read).
#     Cost ~ (pairs + padding) * T: what per-token picks (random heads) need.
# m and the layout are chosen per head from a cost model in "query rows at the kernel's full speed": a
# problem of G query rows over one chunk's T keys costs like _problem_rows(G) = G + 32 + 0.8 * min(G, 128)
# rows (fitted to the fused CPU kernel at T = 1560, D = 128, 1 thread: reading a chunk's K/V costs ~32
# rows, problems of < ~128 rows run at ~55% speed), plus `call` rows per kernel call (host overhead):
#   cost(m) = m * _problem_rows(Lq) + call + min(N * _problem_rows(G_m) + call,             [padded]
#                                                sum_{i>=m, c_(i)>0} (_problem_rows(c_(i)) + call))  [per-chunk]
# with c_(i) the counts in descending order and G_m = c_(m). m = all selected chunks is an exact "dense
# attention over the selected history" (never more work than dense SDPA over all history: the fallback
# when routing cannot win); m = 0 is the pure MoBA layout. All branches (current chunk, dense blocks,
# sparse rows) are merged exactly by lse, in one pass.
_PAD_SLACK = 1.25
_CALL_SECONDS = 4e-5  # host + dispatch cost of one kernel call ...
_ROW_FLOPS_PER_S = 5e10  # ... in rows at the fused kernel's full speed (~50 GFLOP/s per core)
_LAST_PLAN: list = ["-"]


def _problem_rows(g: torch.Tensor) -> torch.Tensor:
    return g + 32.0 + 0.8 * g.clamp(max=128.0)


def last_plan_summary() -> str:
    """A short description of the torch path's most recent history plan (for benchmarks)."""
    return _LAST_PLAN[0]


@dataclass
class _HistoryPlan:
    kind: str  # "none" | "uniform" | "blocks"
    chunks: list[int] | None = None  # uniform: the chunks every query selects
    dense: list[list[int]] | None = None  # blocks: dense chunks per (batch, head), ascending
    rows: list[int] | None = None  # blocks: padded sparse rows per chunk (G) per (batch, head); 0 = none
    counts: list[list[int]] | None = None  # blocks, heads with rows 0: sparse pairs per chunk (one call each)
    dense_mask: torch.Tensor | None = None  # blocks: bool [B*Hh, N] on sel's device

    def summary(self) -> str:
        if self.kind != "blocks":
            return self.kind if self.kind == "none" else f"uniform {len(self.chunks)}"
        nd = sum(len(d) for d in self.dense) / len(self.dense)
        pad = [g for g in self.rows if g]
        var = sum(1 for g, c in zip(self.rows, self.counts) if not g and any(c))
        s = f"dense {nd:.1f}/head"
        if pad:
            s += f", padded G {min(pad)}-{max(pad)} x{len(pad)}"
        if var:
            s += f", per-chunk x{var}"
        return s


def _plan_history(sel: torch.Tensor, T: int, D: int, force_dense: int | None = None,
                  force_layout: str | None = None) -> _HistoryPlan:
    """Host-side plan of the torch path's history branch from `sel` [B,Hh,Lq,N] (ONE host sync).

    force_dense / force_layout ("padded" | "per-chunk") are for tests: make the min(force_dense, N) most
    selected chunks of every head dense blocks / use that sparse layout, instead of the cost model's."""
    B, Hh, Lq, N = sel.shape
    BH, dev = B * Hh, sel.device
    counts = sel.sum(dim=2).view(BH, N)  # queries per (batch*head, chunk)
    cs, order = counts.sort(dim=1, descending=True, stable=True)
    g_m = torch.cat([cs, cs.new_zeros(BH, 1)], dim=1).double()  # G when the m most selected chunks are dense
    m = torch.arange(N + 1, device=dev)
    call = _CALL_SECONDS * _ROW_FLOPS_PER_S / (4.0 * T * D)  # one kernel call, in rows
    per_chunk = (_problem_rows(g_m) + call) * (g_m > 0)
    var_cost = per_chunk.flip(1).cumsum(1).flip(1)  # one call per remaining non-empty chunk
    pad_cost = (N * _problem_rows(g_m) + call) * (g_m > 0)  # one call, every chunk padded to G_m rows
    use_var = var_cost < pad_cost
    if force_layout is not None:
        use_var = torch.full_like(use_var, force_layout == "per-chunk")
    # dense blocks: heads with the same dense chunks share their calls (one per run of chunks): ~1 call
    dense_cost = m * _problem_rows(torch.tensor(float(Lq), dtype=torch.float64)) + call * (m > 0)
    cost = dense_cost + torch.where(use_var, var_cost, pad_cost)
    best = cost.argmin(dim=1)  # first minimum: the fewest dense blocks among equal costs
    if force_dense is not None:
        best = torch.full_like(best, min(force_dense, N))
    var = use_var.gather(1, best[:, None]).squeeze(1)
    rows = g_m.gather(1, best[:, None]).squeeze(1).long().masked_fill(var, 0)
    rank = torch.empty_like(order).scatter_(1, order, m[:N].expand(BH, N).contiguous())
    dense_mask = rank < best[:, None]
    row0 = sel[0, 0, 0]
    uniform = (sel == row0).all()
    sparse_counts = counts.masked_fill(dense_mask, 0)
    vals = torch.cat([row0.long(), uniform.long().view(1), rows, dense_mask.long().flatten(),
                      sparse_counts.flatten()]).tolist()  # the one host sync of this path
    rows_l = vals[N + 1: N + 1 + BH]
    flat = vals[N + 1 + BH: N + 1 + BH + BH * N]
    cnt = vals[N + 1 + BH + BH * N:]
    if not any(flat) and not any(cnt):
        return _HistoryPlan("none")
    if vals[N]:
        return _HistoryPlan("uniform", chunks=[j for j in range(N) if vals[j]])
    dense = [[j for j in range(N) if flat[i * N + j]] for i in range(BH)]
    counts_l = [cnt[i * N: (i + 1) * N] for i in range(BH)]
    return _HistoryPlan("blocks", dense=dense, rows=rows_l, counts=counts_l, dense_mask=dense_mask)


def _runs(chunks: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive chunk indices of an ascending list."""
    out = []
    for j in chunks:
        if out and out[-1][1] == j:
            out[-1][1] = j + 1
        else:
            out.append([j, j + 1])
    return [tuple(r) for r in out]


def _head_groups(plan: _HistoryPlan):
    """(dense groups, padded sparse groups): consecutive heads that share one kernel call.

    dense: (h0, h1, chunks) for runs of heads with the same dense chunks; padded: (h0, h1, G) for runs of
    heads with padded sparse rows whose padding to the run's largest G stays within _PAD_SLACK."""
    dense, sparse = [], []
    for h, d in enumerate(plan.dense):
        if d and dense and dense[-1][1] == h and dense[-1][2] == d:
            dense[-1][1] = h + 1
        elif d:
            dense.append([h, h + 1, d])
    for h, g in enumerate(plan.rows):
        if g and sparse and sparse[-1][1] == h:
            gs = sparse[-1][2]
            if max(gs + [g]) * (len(gs) + 1) <= _PAD_SLACK * (sum(gs) + g):
                sparse[-1][1] = h + 1
                gs.append(g)
                continue
        if g:
            sparse.append([h, h + 1, [g]])
    return [tuple(x) for x in dense], [(h0, h1, max(gs)) for h0, h1, gs in sparse]


def _blocks_history(q, k_hist, v_hist, sel, T, scale, plan: _HistoryPlan):
    """History branch of a "blocks" plan. Returns (dense parts [(h0, h1, out [n,r,Lq,D], lse [n,r,Lq])],
    sparse parts [(out [n,D], lse [n], query row [n])]); query row B*Hh*Lq marks padding rows."""
    B, Hh, Lq, D = q.shape
    N = sel.shape[-1]
    BH, M, dev = B * Hh, B * Hh * Lq, q.device
    wd = _work_dtype(q)
    qf = q.reshape(BH, Lq, D).to(wd)
    kh = k_hist.unflatten(2, (N, T)).flatten(0, 1)  # [BH, N, T, D], a view of the cache
    vh = v_hist.unflatten(2, (N, T)).flatten(0, 1)
    sel_h = sel.reshape(BH, Lq, N)
    dense_groups, pad_groups = _head_groups(plan)
    dense_parts = []
    for h0, h1, chunks in dense_groups:
        for j0, j1 in _runs(chunks):
            qe = qf[h0:h1, None].expand(h1 - h0, j1 - j0, Lq, D)
            o, lse = _attn_lse(qe, kh[h0:h1, j0:j1], vh[h0:h1, j0:j1], scale)
            lse = lse.masked_fill(~sel_h[h0:h1, :, j0:j1].transpose(1, 2), _NEG_INF)  # pairs not selected
            dense_parts.append((h0, h1, o, lse))
    # sparse rows: pair (token t, chunk j) of head h -> row first[h][j] + (its rank among j's tokens);
    # padded heads give every chunk G rows (one call per group of heads, K/V in place), the others
    # exactly their count (one call per non-empty chunk, K/V in place)
    first = [[0] * N for _ in range(BH)]
    calls = []  # (row offset, rows, h0, h1, j0, j1, G)
    off = 0
    pad_of = {}
    for h0, h1, g in pad_groups:
        for h in range(h0, h1):
            pad_of[h] = (h0, h1, g)
    h = 0
    while h < BH:
        if h in pad_of:
            h0, h1, g = pad_of[h]
            for hh in range(h0, h1):
                first[hh] = [off + ((hh - h0) * N + j) * g for j in range(N)]
            calls.append((off, (h1 - h0) * N * g, h0, h1, 0, N, g))
            off += (h1 - h0) * N * g
            h = h1
            continue
        for j, c in enumerate(plan.counts[h]):
            first[h][j] = off
            if c:
                calls.append((off, c, h, h + 1, j, j + 1, c))
                off += c
        h += 1
    if not calls:
        return dense_parts, []
    R = off
    sp = sel_h.transpose(1, 2) & ~plan.dense_mask[:, :, None]  # [BH, N, Lq] sparse pairs
    first_t = torch.tensor(first, dtype=torch.int64, device=dev)
    slot = (torch.cumsum(sp, dim=2) - 1 + first_t[:, :, None]).masked_fill_(~sp, R)
    qrow = torch.arange(M, device=dev).view(BH, 1, Lq).expand(BH, N, Lq)
    dest = torch.full((R + 1,), M, dtype=torch.int64, device=dev).scatter_(0, slot.flatten(), qrow.flatten())[:R]
    q_rows = torch.cat([qf.reshape(M, D), qf.new_zeros(1, D)]).index_select(0, dest)  # padding: q = 0
    parts = []
    for o0, n, h0, h1, j0, j1, g in calls:
        o, lse = _attn_lse(q_rows[o0: o0 + n].view(h1 - h0, j1 - j0, g, D), kh[h0:h1, j0:j1], vh[h0:h1, j0:j1], scale)
        parts.append((o.reshape(n, D), lse.reshape(n), dest[o0: o0 + n]))
    return dense_parts, parts


def _merge_blocks(out_c, lse_c, dense_parts, sparse_parts):
    """Exact lse merge of the current-chunk branch (out_c [BH,Lq,D], lse_c [BH,Lq]) with the dense blocks
    and sparse rows of `_blocks_history`. Same formula as `merge_by_lse`, over all branches at once."""
    BH, Lq, D = out_c.shape
    M = BH * Lq
    grad = torch.is_grad_enabled() and (out_c.requires_grad or any(p[2].requires_grad for p in dense_parts)
                                        or any(p[0].requires_grad for p in sparse_parts))
    if grad and len(sparse_parts) > 1:  # autograd: one out-of-place index_add instead of one per part
        sparse_parts = [tuple(torch.cat(x) for x in zip(*sparse_parts))]
    with torch.no_grad():  # per-query max over all branches: a stabiliser only, no gradient needed
        m = lse_c.clone()
        for h0, h1, _, lse in dense_parts:
            m[h0:h1] = torch.maximum(m[h0:h1], lse.amax(dim=1))
        if sparse_parts:
            mf = torch.cat([m.reshape(M), m.new_full((1,), _NEG_INF)])
            for _, lse, dest in sparse_parts:
                mf.scatter_reduce_(0, dest, lse, "amax")
            m = mf[:M].view(BH, Lq)
        m = torch.where(m == _NEG_INF, torch.zeros_like(m), m)
    w = torch.exp(lse_c - m)
    acc = out_c * w[..., None]
    tot = w.clone()
    for h0, h1, o, lse in dense_parts:
        wb = torch.exp(lse - m[h0:h1, None])  # 0 for pairs not selected
        acc[h0:h1] += (o * wb[..., None]).sum(dim=1)
        tot[h0:h1] += wb.sum(dim=1)
    if sparse_parts:
        m_rows = torch.cat([m.reshape(M), m.new_zeros(1)])
        acc = torch.cat([acc.reshape(M, D), acc.new_zeros(1, D)])
        tot = torch.cat([tot.reshape(M), tot.new_zeros(1)])
        for o_rows, lse_rows, dest in sparse_parts:
            w_rows = torch.exp(lse_rows - m_rows[dest])
            if grad:
                acc = acc.index_add(0, dest, o_rows * w_rows[:, None])
                tot = tot.index_add(0, dest, w_rows)
            else:
                acc.index_add_(0, dest, o_rows * w_rows[:, None])
                tot.index_add_(0, dest, w_rows)
        acc, tot = acc[:M].view(BH, Lq, D), tot[:M].view(BH, Lq)
    tot_safe = torch.where(tot > 0, tot, torch.ones_like(tot))
    return acc / tot_safe[..., None], m + torch.log(tot)


def _chunk_runs(x: torch.Tensor, chunks: list[int], T: int) -> list[torch.Tensor]:
    """Views of x [B,Hh,N*T,D] covering the given ascending chunks, one per contiguous run."""
    return [x[:, :, a * T: b * T] for a, b in _runs(chunks)]


def _routed_attention_torch(q, k_hist, v_hist, k_cur, v_cur, sel, T, scale, chunks=None):
    N = sel.shape[-1]
    if chunks is not None:
        plan = _HistoryPlan("uniform", chunks=chunks) if chunks else _HistoryPlan("none")
    else:
        plan = _plan_history(sel, T, q.shape[-1]) if N > 0 and q.numel() > 0 else _HistoryPlan("none")
    _LAST_PLAN[0] = plan.summary()
    if plan.kind == "blocks":  # current chunk + dense blocks + sparse rows, merged by lse
        B, Hh, Lq, D = q.shape
        out_c, lse_c = _attn_lse(q, k_cur, v_cur, scale)
        dense_parts, sparse = _blocks_history(q, k_hist, v_hist, sel, T, scale, plan)
        out, lse = _merge_blocks(out_c.reshape(B * Hh, Lq, D), lse_c.reshape(B * Hh, Lq), dense_parts, sparse)
        out, lse = out.view(B, Hh, Lq, D), lse.view(B, Hh, Lq)
    elif plan.kind == "uniform":  # same chunks for every query: one plain attention over [them | current]
        k = torch.cat(_chunk_runs(k_hist, plan.chunks, T) + [k_cur], dim=2)
        v = torch.cat(_chunk_runs(v_hist, plan.chunks, T) + [v_cur], dim=2)
        out, lse = _attn_lse(q, k, v, scale)
    else:
        out, lse = _attn_lse(q, k_cur, v_cur, scale)
    return out.to(q.dtype), lse.to(torch.float32)


def static_chunks(spec: RoutingSpec | None, num_chunks: int) -> list[int] | None:
    """History chunks EVERY query attends when that is known on the host without scores (inference,
    no `allowed`): all of them for dense or when the history is not longer than what is kept; sink U
    window for window mode. None when the selection depends on the scores (topk over a longer history).
    Pass it as `routed_attention(..., chunks=...)` to skip the torch path's host sync."""
    N = num_chunks
    if spec is None or spec.is_dense or N <= (spec.max_selected() or 0):
        return list(range(N))
    if spec.mode == "window":
        return sorted(set(range(min(spec.sink_chunks, N))) | set(range(max(0, N - spec.window_chunks), N)))
    return None


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed attention of current-chunk queries: own chunk (full) + selected history chunks (per token).

    q [B,Hh,Lq,D]; k_hist/v_hist [B,Hh,N*T,D]; k_cur/v_cur [B,Hh,Lc,D]; sel bool [B,Hh,Lq,N].
    Returns (out [B,Hh,Lq,D] in q.dtype, lse [B,Hh,Lq] fp32).

    backend "triton" (or "auto" on CUDA): one kernel, history read in place, no host sync.
    backend "torch" (or "auto" elsewhere): planned from `sel` with ONE host sync. If every query
    selects the same chunks (window mode, k >= history): one plain attention over [those chunks |
    current chunk], no mask. Otherwise the current chunk and the history planned per head (dense
    blocks for chunks most tokens select, MoBA-style (query, chunk) rows for the rest; cost ~ the
    selected pairs * T * D: proportional to k, not to the history; see `_plan_history`) merged by lse. On CPU without autograd it runs torch's fused flash kernel;
    with autograd, explicit differentiable ops ("auto" picks torch whenever gradients are needed:
    the Triton kernel is forward only).
    chunks: optional host list of the history chunks every query selects (`static_chunks`; must agree
    with `sel`): the torch path then reads those slices directly, with no host sync.
    """
    _check_attention_inputs("routed_attention", q, k_hist, v_hist, k_cur, v_cur, sel, chunk_tokens)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_hist, v_hist, k_cur, v_cur))
    if needs_grad and backend == "auto":
        backend = "torch"  # the Triton kernel is forward only
    if _use_triton(backend, q, "routed_attention"):
        if needs_grad:
            raise RuntimeError(
                "routed_attention: backend='triton' is forward only but inputs require grad; "
                "run under torch.no_grad() or use backend='torch'"
            )
        return _kernels().routed_attention_fwd(q, k_hist, v_hist, k_cur, v_cur, sel, chunk_tokens, scale)
    if chunks is not None and any(not 0 <= j < sel.shape[-1] for j in chunks):
        raise ValueError(f"routed_attention: chunks {list(chunks)} must be history chunk indices < {sel.shape[-1]}")
    return _routed_attention_torch(q, k_hist, v_hist, k_cur, v_cur, sel, chunk_tokens, scale,
                                   sorted(chunks) if chunks is not None else None)


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


def routed_block_mask(sel: torch.Tensor, chunk_tokens: int, cur_tokens: int, block_size: int = 128):
    """FlexAttention BlockMask for inference keys [history (N*T) | current (cur_tokens)].

    The mask_mod reads `sel` (exact per token); block sparsity is computed from `sel` at block
    granularity (never materialises Lq x Lk): a block is full when all its pairs may attend, partial
    when some may. Same classification as `create_block_mask(mask_mod, ...)`.
    """
    from torch.nn.attention.flex_attention import BlockMask

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
    full = cnt == float(block_size * block_size)
    partial = (cnt > 0) & ~full
    kv_num, kv_idx = _dense_to_ordered(partial)
    full_num, full_idx = _dense_to_ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx,
        BLOCK_SIZE=block_size, mask_mod=_make_inference_mask_mod(sel, T), seq_lengths=(Lq, Lk),
    )


# --------------------------------------------------------------------------------------------
# Training with routing: sequence [H_1..H_N | Q_1..Q_N]
# --------------------------------------------------------------------------------------------
def training_allowed(num_chunks: int, chunk_tokens: int, device=None) -> torch.Tensor:
    """bool [2*N*T, N]: history chunks each training token may be routed to (H_i, Q_i -> H_j, j < i).

    Its own chunk is attended separately (always) and is not part of this set.
    """
    N, T = num_chunks, chunk_tokens
    r = torch.arange(2 * N * T, device=device)
    own = torch.where(r < N * T, r, r - N * T) // T
    return torch.arange(N, device=device)[None, :] < own[:, None]


def _make_training_mask_mod(sel: torch.Tensor, num_chunks: int, chunk_tokens: int) -> Callable:
    N, T = num_chunks, chunk_tokens
    NT = N * T
    L = 2 * NT

    def mask_mod(b, h, q_idx, kv_idx):
        own = (q_idx // T) == (kv_idx // T)  # same stream and same chunk (segments of T tokens)
        kv_chunk = (kv_idx // T).clamp(max=N - 1)  # only read when kv_idx < NT
        routed = (kv_idx < NT) & sel[b, h, q_idx.clamp(max=L - 1), kv_chunk]
        return own | routed

    return mask_mod


def _dense_to_ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = blocks.to(torch.int32)
    num = blocks.sum(dim=-1).to(torch.int32).contiguous()
    idx = torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32).contiguous()
    return num, idx


@dataclass
class RoutedTrainingMask:
    """Routing of a training sequence [H_1..H_N | Q_1..Q_N] (L = 2*N*T tokens).

    sel: bool [B, Hh, L, N]: token (per head) attends history chunk H_j (only j < own chunk index).
    The own chunk (same stream) is always attended. Everything else is masked (CONTRACTS.md rule).
    """

    sel: torch.Tensor
    num_chunks: int
    chunk_tokens: int

    @property
    def seq_len(self) -> int:
        return 2 * self.num_chunks * self.chunk_tokens

    def dense(self) -> torch.Tensor:
        """bool [B, Hh, L, L] mask for scaled_dot_product_attention (True = may attend)."""
        N, T, L = self.num_chunks, self.chunk_tokens, self.seq_len
        B, Hh = self.sel.shape[:2]
        seg = torch.arange(L, device=self.sel.device) // T
        own = seg[:, None] == seg[None, :]
        routed = self.sel.repeat_interleave(T, dim=-1)  # [B,Hh,L,N*T]
        routed = F.pad(routed, (0, L - N * T))
        return routed | own

    def mask_mod(self) -> Callable:
        """FlexAttention mask_mod reading `sel` (exact per token)."""
        return _make_training_mask_mod(self.sel, self.num_chunks, self.chunk_tokens)

    def block_mask(self, block_size: int = 128):
        """FlexAttention BlockMask, built from `sel` at block granularity (never materialises L x L).

        Block (qb, kb) is FULL when every (query, key) pair in it may attend, PARTIAL (mask_mod applied)
        when some may, absent otherwise; same classification as `create_block_mask(self.mask_mod())`.
        """
        from torch.nn.attention.flex_attention import BlockMask

        N, T, L = self.num_chunks, self.chunk_tokens, self.seq_len
        B, Hh = self.sel.shape[:2]
        dev = self.sel.device
        nb = -(-L // block_size)
        pad = nb * block_size - L
        tok = torch.arange(nb * block_size, device=dev)
        seg = (tok // T).clamp(max=2 * N - 1)
        # overlap[blk, s] = number of tokens of block blk in segment s (H_0..H_{N-1}, Q_0..Q_{N-1})
        onehot = F.one_hot(seg, 2 * N).to(torch.float32) * (tok < L).to(torch.float32)[:, None]
        overlap = onehot.view(nb, block_size, 2 * N).sum(dim=1)  # [nb, 2N], integers <= block_size
        own_cnt = overlap @ overlap.T  # [nb, nb] own-chunk pairs
        sel_cnt = F.pad(self.sel.to(torch.float32), (0, 0, 0, pad)).view(B, Hh, nb, block_size, N).sum(dim=3)
        routed_cnt = sel_cnt @ overlap[:, :N].T  # [B,Hh,nb,nb] routed pairs (disjoint from own)
        cnt = own_cnt + routed_cnt  # exact: integers < 2^24
        full = cnt == float(block_size * block_size)
        partial = (cnt > 0) & ~full
        kv_num, kv_idx = _dense_to_ordered(partial)
        full_num, full_idx = _dense_to_ordered(full)
        return BlockMask.from_kv_blocks(
            kv_num, kv_idx, full_num, full_idx,
            BLOCK_SIZE=block_size, mask_mod=self.mask_mod(), seq_lengths=(L, L),
        )


def routed_training_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    num_chunks: int,
    chunk_tokens: int,
    spec: RoutingSpec,
    *,
    backend: str = "auto",
) -> RoutedTrainingMask:
    """Per-token routing over history chunks for a training sequence [H_1..H_N | Q_1..Q_N].

    q, k: [B, Hh, 2*N*T, D]. Scores use mean keys of the history stream H_j; candidates for a token of
    chunk i (either stream) are H_j with j < i; sink/window are relative to that set. No gradient.
    """
    _check_4d("routed_training_mask", "q", q)
    _check_4d("routed_training_mask", "k", k)
    if not isinstance(spec, RoutingSpec):
        raise TypeError(f"routed_training_mask: spec must be a RoutingSpec, got {type(spec).__name__}")
    N, T = num_chunks, chunk_tokens
    if isinstance(N, bool) or not isinstance(N, int) or N < 1 or isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"routed_training_mask: num_chunks and chunk_tokens must be positive ints, got {N!r}, {T!r}")
    B, Hh, L, _ = q.shape
    if L != 2 * N * T or k.shape[2] != L:
        raise ValueError(
            f"routed_training_mask: q/k must have 2*num_chunks*chunk_tokens = {2 * N * T} tokens "
            f"([H_1..H_N | Q_1..Q_N]), got {L} and {k.shape[2]}"
        )
    allowed = training_allowed(N, T, q.device)
    if spec.is_dense:
        sel = allowed.expand(B, Hh, L, N).contiguous()
    else:
        with torch.no_grad():
            mean_k = chunk_means(k.detach()[:, :, : N * T], T)
            sel = select_chunks(q.detach(), mean_k, spec, allowed=allowed, backend=backend)
    return RoutedTrainingMask(sel, N, T)


_COMPILED_FLEX = None


def _flex_attention_fn(device: torch.device):
    """Compiled flex_attention on CUDA (needed for speed and memory); eager elsewhere."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def routed_training_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_chunks: int,
    chunk_tokens: int,
    spec: RoutingSpec,
    backend: str = "sdpa",
    scale: float | None = None,
    *,
    block_size: int = 128,
) -> torch.Tensor:
    """Training attention over [H_1..H_N | Q_1..Q_N] with the CONTRACTS.md mask and history routing.

    backend "sdpa": scaled_dot_product_attention with a dense bool [B,Hh,L,L] mask (CPU, small L; has
    backward everywhere). backend "flex": FlexAttention with a BlockMask whose mask_mod reads the
    selection (exact per token; compiled on CUDA; on CPU forward only - no flex backward there).
    Gradients flow to q, k, v through attention, never through the selection.
    """
    if backend not in ("sdpa", "flex"):
        raise ValueError(f"routed_training_attention: backend must be 'sdpa' or 'flex', got {backend!r}")
    _check_4d("routed_training_attention", "v", v)
    rm = routed_training_mask(q, k, num_chunks, chunk_tokens, spec)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=rm.dense(), scale=scale)
    flex = _flex_attention_fn(q.device)
    block_mask = rm.block_mask(block_size)
    if q.device.type == "cuda":
        return flex(q, k, v, block_mask=block_mask, scale=scale)
    with warnings.catch_warnings():  # eager flex on CPU is expected here (tests, small sizes)
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex(q, k, v, block_mask=block_mask, scale=scale)
