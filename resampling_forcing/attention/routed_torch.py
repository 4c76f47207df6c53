"""History routing, step 2 on the torch path: routed attention planned from the selection (CPU, and
the autograd path of training). The Triton kernel (resampling_forcing.kernels) is the GPU twin; both
equal `reference.routed_attention_reference` (tests/test_routing_cpu_path.py, tests/test_kernels.py).

`routed_attention_torch` plans from `sel` with ONE host sync (none when the caller passes
`chunks=static_chunks(spec, N)`): same chunks for every query (window mode, k >= history) -> one plain
attention over [those chunks | current] (no mask); otherwise, per head, chunks most of its tokens select
as dense blocks (all the head's queries, K/V in place; "sink + recent" heads) and the other (query,
chunk) pairs grouped by chunk (MoBA style), chosen by a cost model (cost ~ the selected pairs * T * D:
proportional to k, not to the history length; never more than dense attention), merged with the current
chunk by log-sum-exp. On CPU inference all use torch's fused flash kernel, except problems of 33-191
queries over large chunks (explicit in-place products: `_attend_inplace`); with autograd, explicit
differentiable ops.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .selection import NEG_INF, index_runs, work_dtype

# Upper bound (bytes) on one fp32 score block of the explicit (autograd) path.
_SCORE_BLOCK_BYTES = 1 << 28


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
    wd = work_dtype(o1, o2, lse1, lse2)
    l1, l2 = lse1.to(wd), lse2.to(wd)
    m = torch.maximum(l1, l2)
    m_safe = torch.where(m == NEG_INF, torch.zeros_like(m), m)
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
    wd = work_dtype(q)
    if Lk == 0 or Lq == 0:
        out = torch.zeros((B, Hh, Lq, v.shape[3]), dtype=wd, device=q.device)
        return out, torch.full((B, Hh, Lq), NEG_INF, dtype=wd, device=q.device)
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

# The fused kernel cuts a problem's queries into blocks of 32 rows when it has fewer than 192 (aten's
# FlashAttentionKernel.cpp) and streams all of K/V once per block, so a per-chunk group of 33-191 rows
# reads its chunk 2-6 times. Two explicit in-place products read it once but cost ~20 us more per call
# in eager ops: measured per problem (D = 128, one core, paired with the fused kernel), 0.79-0.82x its
# time at 4680 keys, a wash at 1560 (0.92-1.07x), so only problems whose K and V (in the working dtype)
# reach 2 MiB, i.e. 2048 keys or more at D = 128 in fp32, take them (docs/benchmarks.md 3b).
_INPLACE_ROWS = (33, 192)  # [first, end) query rows per problem that take the in-place path ...
_INPLACE_MIN_KV_BYTES = 1 << 21  # ... when one problem's K and V together are at least this large ...
_INPLACE_MAX_SCORE_BYTES = 1 << 23  # ... and its score block at most this large


def _use_inplace(q, k, v) -> bool:
    Lq, Lk = q.shape[-2], k.shape[-2]
    el = torch.finfo(work_dtype(q)).bits // 8
    return (_INPLACE_ROWS[0] <= Lq < _INPLACE_ROWS[1]
            and Lk * (k.shape[-1] + v.shape[-1]) * el >= _INPLACE_MIN_KV_BYTES
            and Lq * Lk * el <= _INPLACE_MAX_SCORE_BYTES and q.shape[:-2] == k.shape[:-2] == v.shape[:-2])


def _attend_inplace(q, k, v, scale):
    """Inference-only explicit attention with lse: per problem (leading index), two matrix products on
    views of q/k/v (no copies of K/V in the working dtype) and the softmax in place on one score block.
    Same (out, lse) as `_attend_with_lse`, in the working dtype."""
    wd = work_dtype(q)
    lead = q.shape[:-2]
    q, k, v = q.to(wd), k.to(wd), v.to(wd)
    outs, lses = [], []
    for idx in itertools.product(*(range(n) for n in lead)):
        s = torch.mm(q[idx] * scale, k[idx].t())  # [Lq, Lk]
        m = s.amax(dim=1, keepdim=True)
        tot = s.sub_(m).exp_().sum(dim=1, keepdim=True)
        outs.append(torch.mm(s, v[idx]).div_(tot))
        lses.append(m.add_(tot.log_()).squeeze(1))
    if len(outs) == 1:  # the per-chunk calls: no copy into a stacked result
        return outs[0].view(*lead, *outs[0].shape), lses[0].view(*lead, -1)
    return torch.stack(outs).view(*lead, *outs[0].shape), torch.stack(lses).view(*lead, -1)


def _attn_lse(q, k, v, scale):
    """Unmasked attention -> (out, lse) in the working dtype; for CPU inference the fused kernel, or
    explicit in-place products for the query-row counts it runs in several passes over K/V."""
    if (
        _FLASH_CPU is not None and q.device.type == "cpu" and q.numel() > 0 and k.numel() > 0
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    ):
        if _use_inplace(q, k, v):
            return _attend_inplace(q, k, v, scale)
        wd = work_dtype(q)
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
# rows, problems of < ~128 rows run at ~55% speed; where the in-place products take over, for larger
# chunks, they cost somewhat less, which the model does not distinguish), plus `call` rows per kernel
# call (host overhead):
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
    extra: list[int] | None = None  # the caller's `extra` values, read in the same host sync

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
                  force_layout: str | None = None, full_chunks: int | None = None,
                  extra: torch.Tensor | None = None) -> _HistoryPlan:
    """Host-side plan of the torch path's history branch from `sel` [B,Hh,Lq,N] (ONE host sync).

    force_dense / force_layout ("padded" | "per-chunk") are for tests: make the min(force_dense, N) most
    selected chunks of every head dense blocks / use that sparse layout, instead of the cost model's.
    full_chunks: `sel` holds the columns of a packed subset of a history this long (a bounded cache);
    the layouts are costed as over the whole history, so the plan is the unpacked one (columns nobody
    selects change no other term: their counts are 0).
    extra: int64 [E] on sel's device, read to the host in the same sync (plan.extra): for a caller
    that decides from device statistics whether to use the plan at all (attention.routed)."""
    B, Hh, Lq, N = sel.shape
    BH, dev = B * Hh, sel.device
    counts = sel.sum(dim=2).view(BH, N)  # queries per (batch*head, chunk)
    cs, order = counts.sort(dim=1, descending=True, stable=True)
    g_m = torch.cat([cs, cs.new_zeros(BH, 1)], dim=1).double()  # G when the m most selected chunks are dense
    m = torch.arange(N + 1, device=dev)
    call = _CALL_SECONDS * _ROW_FLOPS_PER_S / (4.0 * T * D)  # one kernel call, in rows
    per_chunk = (_problem_rows(g_m) + call) * (g_m > 0)
    var_cost = per_chunk.flip(1).cumsum(1).flip(1)  # one call per remaining non-empty chunk
    n_pad = N if full_chunks is None else full_chunks
    pad_cost = (n_pad * _problem_rows(g_m) + call) * (g_m > 0)  # one call, every chunk padded to G_m rows
    use_var = var_cost < pad_cost
    if force_layout is not None:
        use_var = torch.full_like(use_var, force_layout == "per-chunk")
    # dense blocks: heads with the same dense chunks share their calls (one per run of chunks): ~1 call
    dense_cost = m * _problem_rows(torch.tensor(float(Lq), dtype=torch.float64)) + call * (m > 0)
    cost = dense_cost + torch.where(use_var, var_cost, pad_cost)
    best = cost.argmin(dim=1)  # first minimum: the fewest dense blocks among equal costs
    if force_dense is not None:  # at most the chunks each head selects (a chunk nobody selects is never dense)
        best = torch.minimum(torch.full_like(best, min(force_dense, N)), (counts > 0).sum(dim=1))
    var = use_var.gather(1, best[:, None]).squeeze(1)
    rows = g_m.gather(1, best[:, None]).squeeze(1).long().masked_fill(var, 0)
    rank = torch.empty_like(order).scatter_(1, order, m[:N].expand(BH, N).contiguous())
    dense_mask = rank < best[:, None]
    row0 = sel[0, 0, 0]
    uniform = (sel == row0).all()
    sparse_counts = counts.masked_fill(dense_mask, 0)
    n_extra = 0 if extra is None else extra.numel()
    parts = [row0.long(), uniform.long().view(1), rows, dense_mask.long().flatten(), sparse_counts.flatten()]
    vals = torch.cat(parts + ([extra.long().flatten()] if n_extra else [])).tolist()  # the one host sync
    extra_l = None if extra is None else vals[len(vals) - n_extra:]
    rows_l = vals[N + 1: N + 1 + BH]
    flat = vals[N + 1 + BH: N + 1 + BH + BH * N]
    cnt = vals[N + 1 + BH + BH * N: len(vals) - n_extra]
    if not any(flat) and not any(cnt):
        return _HistoryPlan("none", extra=extra_l)
    if vals[N]:
        return _HistoryPlan("uniform", chunks=[j for j in range(N) if vals[j]], extra=extra_l)
    dense = [[j for j in range(N) if flat[i * N + j]] for i in range(BH)]
    counts_l = [cnt[i * N: (i + 1) * N] for i in range(BH)]
    return _HistoryPlan("blocks", dense=dense, rows=rows_l, counts=counts_l, dense_mask=dense_mask, extra=extra_l)


def packed_plan(plan: _HistoryPlan, ids: list[int]) -> _HistoryPlan:
    """`plan` (made over a whole history's selection) for the packed history holding only the chunks `ids`
    (ascending; every chunk any query selects is among them, so no dense or uniform chunk is left out): the
    same calls, the same output bit for bit as `_plan_history(packed sel, full_chunks=n)` would plan. No
    host sync (the dense mask's columns are picked on the device)."""
    if plan.kind == "none":
        return plan
    pos = {c: j for j, c in enumerate(ids)}
    needed = set(plan.chunks) if plan.kind == "uniform" else {c for d in plan.dense for c in d}
    if not needed <= set(pos) or (plan.kind == "blocks" and len(plan.counts[0]) <= max(ids, default=-1)):
        raise ValueError(f"routed_attention: the plan reads history chunks {sorted(needed - set(pos))} that the "
                         f"packed ids {list(ids)} leave out (plan over the whole history: plan_routed)")
    if plan.kind == "uniform":
        return _HistoryPlan("uniform", chunks=[pos[c] for c in plan.chunks], extra=plan.extra)
    mask = plan.dense_mask.index_select(1, _to_device(list(ids), plan.dense_mask.device))
    return _HistoryPlan("blocks", dense=[[pos[c] for c in d] for d in plan.dense], rows=plan.rows,
                        counts=[[cnt[c] for c in ids] for cnt in plan.counts], dense_mask=mask, extra=plan.extra)


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


def _to_device(values: list, dev: torch.device) -> torch.Tensor:
    """int64 tensor of host values on `dev` without a host sync (pinned, non-blocking copy on CUDA)."""
    t = torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t.to(dev)


def _runs(chunks: list[int], ids: list[int] | None) -> list[tuple[int, int]]:
    """Runs of consecutive columns among ascending `chunks`, split where the history indices `ids` of
    a packed history are not consecutive: the runs of the unpacked history (`_merge_blocks` sums a
    run's chunks in one reduction, so other runs would round differently)."""
    if ids is None:
        return index_runs(chunks)
    out: list[tuple[int, int]] = []
    for j in chunks:
        if out and out[-1][1] == j and ids[j - 1] + 1 == ids[j]:
            out[-1] = (out[-1][0], j + 1)
        else:
            out.append((j, j + 1))
    return out


def _blocks_history(q, k_hist, v_hist, sel, T, scale, plan: _HistoryPlan, ids: list[int] | None = None,
                    far=None):
    """History branch of a "blocks" plan. Returns (dense parts [(h0, h1, out [n,r,Lq,D], lse [n,r,Lq])],
    sparse parts [(out [n,D], lse [n], query row [n])]); query row B*Hh*Lq marks padding rows.
    ids: history index of each column of a packed history (dense runs as unpacked), None = unpacked.
    far: (FarPositions, shift per column) or None: a query reading a far column is turned back by its
    shift (no key is copied; attention.positions)."""
    B, Hh, Lq, D = q.shape
    N = sel.shape[-1]
    BH, M, dev = B * Hh, B * Hh * Lq, q.device
    wd = work_dtype(q)
    qf = q.reshape(BH, Lq, D).to(wd)
    kh = k_hist.unflatten(2, (N, T)).flatten(0, 1)  # [BH, N, T, D], a view of the cache
    vh = v_hist.unflatten(2, (N, T)).flatten(0, 1)
    sel_h = sel.reshape(BH, Lq, N)
    dense_groups, pad_groups = _head_groups(plan)
    dense_parts = []
    for h0, h1, chunks in dense_groups:
        for j0, j1 in _runs(chunks, ids):
            qe = qf[h0:h1, None].expand(h1 - h0, j1 - j0, Lq, D)
            if far is not None and any(far[1][j0:j1]):
                qe = qe.clone()
                far[0].turn_(qe, -_to_device(far[1][j0:j1], dev).double().view(-1, 1))
            o, lse = _attn_lse(qe, kh[h0:h1, j0:j1], vh[h0:h1, j0:j1], scale)
            lse = lse.masked_fill(~sel_h[h0:h1, :, j0:j1].transpose(1, 2), NEG_INF)  # pairs not selected
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
    first_t = _to_device(first, dev)
    slot = (torch.cumsum(sp, dim=2) - 1 + first_t[:, :, None]).masked_fill_(~sp, R)
    qrow = torch.arange(M, device=dev).view(BH, 1, Lq).expand(BH, N, Lq)
    dest = torch.full((R + 1,), M, dtype=torch.int64, device=dev).scatter_(0, slot.flatten(), qrow.flatten())[:R]
    q_rows = torch.cat([qf.reshape(M, D), qf.new_zeros(1, D)]).index_select(0, dest)  # padding: q = 0
    if far is not None:  # each row turned back by its column's shift (padding rows: column N, shift 0)
        col = torch.arange(N, device=dev).view(1, N, 1).expand(BH, N, Lq)
        col = torch.full((R + 1,), N, dtype=torch.int64, device=dev).scatter_(0, slot.flatten(), col.flatten())[:R]
        far[0].turn_(q_rows, -_to_device(far[1] + [0], dev).double()[col])
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
            mf = torch.cat([m.reshape(M), m.new_full((1,), NEG_INF)])
            for _, lse, dest in sparse_parts:
                mf.scatter_reduce_(0, dest, lse, "amax")
            m = mf[:M].view(BH, Lq)
        m = torch.where(m == NEG_INF, torch.zeros_like(m), m)
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
    return [x[:, :, a * T: b * T] for a, b in index_runs(chunks)]


def routed_attention_torch(q, k_hist, v_hist, k_cur, v_cur, sel, T, scale, chunks=None, packed=None, plan=None,
                           far=None):
    """The torch path of routed.routed_attention (its arguments and shapes: q [B,Hh,Lq,D], k_hist/v_hist
    [B,Hh,N*T,D], k_cur/v_cur [B,Hh,Lc,D], sel bool [B,Hh,Lq,N] -> (out [B,Hh,Lq,D], lse [B,Hh,Lq] fp32)).
    packed: (ids, n) when k_hist / sel hold only the history chunks `ids` (ascending) of an n-chunk
    history: planned and merged exactly as over the whole history (bit-identical output; the padded
    layout's calls then read only the packed chunks: rows of the others would all be padding).
    plan: `_plan_history(sel, ...)` already made by the caller (its one host sync), else planned here.
    far: (FarPositions, shift per column of k_hist) or None: far columns are read at their shifted
    positions, rotating only what is read (the uniform plan's gathered keys, the queries of the others)."""
    N = sel.shape[-1]
    ids = None if packed is None else list(packed[0])
    if plan is not None:
        pass  # planned by the caller
    elif chunks is not None:
        plan = _HistoryPlan("uniform", chunks=chunks) if chunks else _HistoryPlan("none")
    elif N == 0 or q.numel() == 0:
        plan = _HistoryPlan("none")
    else:
        D = q.shape[-1]
        plan = _plan_history(sel, T, D) if ids is None else _plan_history(sel, T, D, full_chunks=packed[1])
    _LAST_PLAN[0] = plan.summary()
    if plan.kind == "blocks":  # current chunk + dense blocks + sparse rows, merged by lse
        B, Hh, Lq, D = q.shape
        out_c, lse_c = _attn_lse(q, k_cur, v_cur, scale)
        dense_parts, sparse = _blocks_history(q, k_hist, v_hist, sel, T, scale, plan, ids, far)
        out, lse = _merge_blocks(out_c.reshape(B * Hh, Lq, D), lse_c.reshape(B * Hh, Lq), dense_parts, sparse)
        out, lse = out.view(B, Hh, Lq, D), lse.view(B, Hh, Lq)
    elif plan.kind == "uniform":  # same chunks for every query: one plain attention over [them | current]
        k = torch.cat(_chunk_runs(k_hist, plan.chunks, T) + [k_cur], dim=2)
        shifts = [] if far is None else [far[1][j] for j in plan.chunks]
        m = max((i + 1 for i, c in enumerate(shifts) if c), default=0)  # far columns lead the ascending copy
        if m:
            far[0].turn_(k[:, :, :m * T].unflatten(2, (m, T)),
                         _to_device(shifts[:m], k.device).double().view(-1, 1))
        v = torch.cat(_chunk_runs(v_hist, plan.chunks, T) + [v_cur], dim=2)
        out, lse = _attn_lse(q, k, v, scale)
    else:
        out, lse = _attn_lse(q, k_cur, v_cur, scale)
    return out.to(q.dtype), lse.to(torch.float32)

