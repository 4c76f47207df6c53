"""History routing, step 1: which history chunks each query token attends (method.md section 6).

Each query token (per head) scores every history chunk j by q . mean(K_j) and keeps sink U window U
top-k of the rest (topk mode), sink U window (window mode) or all (dense); see attention/spec.py.

    mean_k = chunk_means(k_hist, T)          # [B,Hh,N,D], kept per chunk in the KV cache
    sel = select_chunks(q, mean_k, spec)     # bool [B,Hh,Lq,N]

Scores are computed in fp64 (products of fp32/fp16/bf16 inputs are exact; only the D-term sum rounds,
~1e-16 relative), so the torch path equals `reference.select_chunks_reference` bit for bit; the Triton
kernel sums in its own order and can differ only when two scores agree to ~1e-16 without being equal.
Exact ties (equal mean keys) are resolved identically everywhere: the lower chunk index wins.
"""
from __future__ import annotations

import torch

from .backends import kernels, use_routing_kernels
from .spec import RoutingSpec

NEG_INF = float("-inf")


def work_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def check_4d(what: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what}: {name} must be a 4-D tensor [B, Hh, L, D] (heads second), got {got}")


def index_runs(idx: list[int]) -> list[tuple[int, int]]:
    """Ascending ints -> maximal runs [a, b) of consecutive values (chunk slices read in one piece)."""
    out: list[tuple[int, int]] = []
    for j in idx:
        if out and out[-1][1] == j:
            out[-1] = (out[-1][0], j + 1)
        else:
            out.append((j, j + 1))
    return out


def chunk_means(k: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Mean key of each chunk: k [B,Hh,N*T,D] -> [B,Hh,N,D] in fp32 (fp32 accumulation, no copy of k)."""
    check_4d("chunk_means", "k", k)
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


def check_select_inputs(what, q, mean_k, spec, allowed):
    check_4d(what, "q", q)
    check_4d(what, "mean_k", mean_k)
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


def keep_and_allowed(spec: RoutingSpec, allowed: torch.Tensor | None, Lq: int, N: int, device):
    """(allowed [Lq,N], keep [Lq,N]) where keep = sink U window relative to each row's allowed set."""
    al = allowed if allowed is not None else torch.ones((Lq, N), dtype=torch.bool, device=device)
    pos = torch.cumsum(al.to(torch.int64), dim=-1) - 1  # position of each allowed chunk in its row
    cnt = al.sum(dim=-1, keepdim=True)
    keep = al & ((pos < spec.sink_chunks) | (pos >= cnt - spec.window_chunks))
    return al, keep


@torch.no_grad()
def _select_torch(q, mean_k, spec, allowed):
    B, Hh, Lq, _ = q.shape
    N = mean_k.shape[2]
    if spec.mode == "dense" or N <= spec.max_selected():  # every allowed chunk is kept (host rule)
        al = allowed if allowed is not None else torch.ones((Lq, N), dtype=torch.bool, device=q.device)
        return al.expand(B, Hh, Lq, N).contiguous()
    al, keep = keep_and_allowed(spec, allowed, Lq, N, q.device)
    if spec.mode == "window" or N == 0:
        return keep.expand(B, Hh, Lq, N).contiguous()
    cand = al & ~keep
    s = torch.where(cand, routing_scores(q, mean_k), NEG_INF)
    k = min(int(spec.top_k), N)
    # Exactly "stable descending sort, first k" without a sort: kth = the k-th largest score (topk
    # values do not depend on how ties are ordered); keep every candidate above it, and of those equal
    # to it the first (lowest index) k - #above.
    if k == 1:  # the common case, several times cheaper than topk
        kth = s.amax(dim=-1, keepdim=True)
    else:
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

    backend: the routing path (attention.backends.routing_path): "auto" (Triton fused kernel on CUDA
    when available, else torch), "torch", "triton". No gradient flows (inputs are detached); no host syncs.
    """
    check_select_inputs("select_chunks", q, mean_k, spec, allowed)
    if use_routing_kernels(backend, q, "select_chunks"):
        with torch.no_grad():
            return kernels().routing_select(q.detach(), mean_k.detach(), spec, allowed=allowed)
    return _select_torch(q.detach(), mean_k.detach(), spec, allowed)



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

