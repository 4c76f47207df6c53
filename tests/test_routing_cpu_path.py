"""The torch (CPU) path of routed attention and selection, against the references.

`routed_attention(backend="torch")` plans its history from `sel` (one host sync): "uniform" (same
chunks for every query: one plain attention over [those cache slices | current chunk]), "blocks"
(per head: the m most selected chunks as dense blocks attended by all the head's queries, the other
(query, chunk) pairs as MoBA rows, "padded" (one call over all chunks) or "per-chunk" (one call per
chunk, exact row counts); merged with the current chunk by lse), or "none". Each layout runs on torch's
fused CPU flash kernel (inference), explicit in-place products (inference, 33-191 query rows per problem)
or explicit ops (autograd, or `_FLASH_CPU = None`). Every layout and all three must equal
`routed_attention_reference` (outputs and lse, fp32 tolerance). Also: the sort-free top-k selection
keeps the exact tie rule.
"""
from __future__ import annotations

import math

import pytest
import torch

import resampling_forcing.attention.routed_torch as R  # the torch path: its planner and kernel are patched
from resampling_forcing.attention.reference import routed_attention_reference, select_chunks_reference  # the plain twins
from resampling_forcing.attention.routing import (
    RoutingSpec,
    chunk_means,
    routed_attention,
    select_chunks,
    static_chunks,
    training_allowed,
)

TOL = dict(atol=1e-5, rtol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")




def inputs(B, Hh, N, T, D, Lq=None, Lc=None, dtype=torch.float32, spare=2, seed=0):
    """q, k_hist, v_hist, k_cur, v_cur; history as views of a larger cache (like KVCache.history)."""
    g = torch.Generator().manual_seed(seed)
    Lq = T if Lq is None else Lq
    Lc = T if Lc is None else Lc
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    cache_k, cache_v = r(B, Hh, (N + spare) * T, D), r(B, Hh, (N + spare) * T, D)
    return r(B, Hh, Lq, D), cache_k[:, :, : N * T], cache_v[:, :, : N * T], r(B, Hh, Lc, D), r(B, Hh, Lc, D)


@pytest.fixture(params=["flash", "explicit", "inplace"])
def kernel(request, monkeypatch):
    """Run the torch path on torch's fused CPU kernel, on the explicit ops (autograd's path), or on the
    in-place products CPU inference uses for 33-191 query rows (here forced for every call)."""
    if request.param == "explicit":
        monkeypatch.setattr(R, "_FLASH_CPU", None)
        yield request.param
        return
    # both "flash" and "inplace" are the fused-kernel branch of CPU inference: the pinned torch has the
    # kernel, and a skip here would silently drop two of the three variants of every layout test
    assert R._FLASH_CPU is not None, "this torch has no fused CPU flash kernel"
    if request.param == "inplace":
        monkeypatch.setattr(R, "_INPLACE_ROWS", (1, 1 << 30))
        monkeypatch.setattr(R, "_INPLACE_MIN_KV_BYTES", 0)
        calls, inplace = [], R._attend_inplace
        monkeypatch.setattr(R, "_attend_inplace", lambda *a: calls.append(1) or inplace(*a))
        yield request.param
        assert calls, "the in-place path was never used"
        return
    calls, fused = [], R._FLASH_CPU
    monkeypatch.setattr(R, "_FLASH_CPU", lambda *a, **k: calls.append(1) or fused(*a, **k))
    yield request.param
    assert calls, "the fused kernel was never used"


def force_layout(monkeypatch, layout):
    """Replace the planner's choice by (dense chunks per head, sparse layout) (None = the cost model's).
    Returns the list of plans run."""
    orig, seen = R._plan_history, []

    def plan(sel, T, D):
        p = orig(sel, T, D) if layout is None else orig(sel, T, D, force_dense=layout[0], force_layout=layout[1])
        seen.append(p)
        return p

    monkeypatch.setattr(R, "_plan_history", plan)
    return seen


def check_grads(ins, sel, T):
    """Gradients of the torch path (fp64 inputs `ins` = q, k_hist, v_hist, k_cur, v_cur) equal the
    reference's, for the loss sum(out^2) + sum(lse). Returns the torch path's out."""
    out, lse = routed_attention(*ins, sel, T, backend="torch")
    g = torch.autograd.grad(out.pow(2).sum() + lse.sum(), ins)
    ins2 = [t.detach().clone().requires_grad_() for t in ins]
    out2, lse2 = routed_attention_reference(*ins2, sel, T)
    g2 = torch.autograd.grad(out2.pow(2).sum() + lse2.sum(), ins2)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    return out


def check(q, kh, vh, kc, vc, sel, T, atol=1e-5, **kw):
    ref_o, ref_l = routed_attention_reference(q, kh, vh, kc, vc, sel, T)
    out, lse = routed_attention(q, kh, vh, kc, vc, sel, T, backend="torch", **kw)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_o.float(), atol=atol, rtol=max(atol, 1e-5))
    torch.testing.assert_close(lse, ref_l, **TOL)
    return out, lse


# (dense chunks per head, sparse layout): MoBA rows only, dense blocks + rows, every selected chunk dense
LAYOUTS = [None, (0, "padded"), (0, "per-chunk"), (1, "padded"), (2, "per-chunk"), (100, None)]


# ------------------------------------------------------------------------------------------
# every layout x both kernels, odd shapes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "auto" if x is None else "-".join(map(str, x)))
@pytest.mark.parametrize("T, N, Lq", [(7, 4, 7), (13, 5, 9)])
def test_grouped_layouts_equal_reference(kernel, monkeypatch, layout, T, N, Lq):
    seen = force_layout(monkeypatch, layout)
    B, Hh, D = 2, 3, 16
    q, kh, vh, kc, vc = inputs(B, Hh, N, T, D, Lq=Lq)
    for spec in (RoutingSpec("topk", top_k=1), RoutingSpec("topk", top_k=2, sink_chunks=1)):
        sel = select_chunks(q, chunk_means(kh, T), spec, backend="torch")
        check(q, kh, vh, kc, vc, sel, T)
    sel = torch.rand(B, Hh, Lq, N, generator=torch.Generator().manual_seed(1)) > 0.5  # per-token random
    sel[0, 0, 0] = False  # a token with no history at all
    check(q, kh, vh, kc, vc, sel, T)
    assert seen and all(p.kind == "blocks" for p in seen)


def pattern_sel(B, Hh, Lq, N, k, pattern, seed=0):
    """Selections of the patterns the planner must handle: "random" (each token its own k chunks, what
    random weights make), "coherent" (sink + the k-1 most recent chunks for almost every token, a few
    outliers: what trained models make), "mixed" (every other head coherent)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, Hh, Lq, N, generator=g)
    if pattern != "random":
        pref = torch.zeros(N)
        pref[[0] + list(range(N - (k - 1), N))] = 1.0
        heads = range(Hh) if pattern == "coherent" else range(0, Hh, 2)
        for h in heads:
            scores[:, h] += 2.0 * pref
            scores[:, h, 1::4] = torch.rand(B, len(range(1, Lq, 4)), N, generator=g)  # outlier tokens
    return scores >= scores.topk(k, dim=-1).values[..., -1:]


PATTERNS = ["random", "coherent", "mixed"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "auto" if x is None else "-".join(map(str, x)))
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k", [1, 5])
def test_patterns_equal_reference(kernel, monkeypatch, layout, pattern, k):
    """Every plan (dense blocks, padded rows, per-chunk rows, their mixtures) == the plain reference,
    outputs and lse, for the three selection patterns, odd token counts, batch 2."""
    seen = force_layout(monkeypatch, layout)
    B, Hh, N, T, D, Lq = 2, 3, 9, 13, 16, 11
    q, kh, vh, kc, vc = inputs(B, Hh, N, T, D, Lq=Lq, seed=k)
    sel = pattern_sel(B, Hh, Lq, N, k, pattern, seed=k)
    check(q, kh, vh, kc, vc, sel, T)
    assert [p.kind for p in seen] == ["blocks"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "auto" if x is None else "-".join(map(str, x)))
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k", [1, 5])
def test_patterns_gradients_equal_reference(monkeypatch, layout, pattern, k):
    force_layout(monkeypatch, layout)
    B, Hh, N, T, D, Lq = 1, 4, 7, 5, 8, 9
    ins = [t.double().requires_grad_() for t in inputs(B, Hh, N, T, D, Lq=Lq, seed=k)]
    sel = pattern_sel(B, Hh, Lq, N, k, pattern, seed=k + 1)
    out = check_grads(ins, sel, T)
    torch.testing.assert_close(out, routed_attention_reference(*[t.detach() for t in ins], sel, T)[0], atol=1e-10, rtol=1e-8)


def test_pattern_sel_makes_the_patterns():
    sel = pattern_sel(1, 2, 40, 9, 5, "mixed")
    want = torch.zeros(9, dtype=torch.bool)
    want[[0, 5, 6, 7, 8]] = True
    same = (sel == want).all(-1)  # [1, 2, 40]
    assert same[0, 0].float().mean() >= 0.7 and same[0, 1].float().mean() < 0.2
    assert (sel.sum(-1) == 5).all()


def test_heads_with_different_selections_and_batch(kernel):
    """Each head (and batch item) attends a different chunk for all its tokens: not uniform globally."""
    B, Hh, N, T, D = 2, 3, 4, 7, 8
    q, kh, vh, kc, vc = inputs(B, Hh, N, T, D)
    sel = torch.zeros(B, Hh, T, N, dtype=torch.bool)
    for b in range(B):
        for h in range(Hh):
            sel[b, h, :, (b + h) % N] = True
    assert R._plan_history(sel, T, D).kind == "blocks"
    out, _ = check(q, kh, vh, kc, vc, sel, T)
    # each head's result is attention over [its chunk | current chunk] only
    for b in range(B):
        for h in range(Hh):
            j = (b + h) % N
            K = torch.cat([kh[b, h, j * T:(j + 1) * T], kc[b, h]])
            V = torch.cat([vh[b, h, j * T:(j + 1) * T], vc[b, h]])
            want = torch.softmax(q[b, h] @ K.T / math.sqrt(D), -1) @ V
            torch.testing.assert_close(out[b, h], want, **TOL)


def test_single_history_chunk_and_nothing_selected(kernel):
    B, Hh, T, D = 2, 2, 13, 8
    q, kh, vh, kc, vc = inputs(B, Hh, 1, T, D)
    sel = torch.rand(B, Hh, T, 1) > 0.5
    check(q, kh, vh, kc, vc, sel, T)
    assert R._plan_history(torch.zeros_like(sel), T, D).kind == "none"
    out, lse = check(q, kh, vh, kc, vc, torch.zeros_like(sel), T)
    want = torch.softmax(q @ kc.transpose(-1, -2) / math.sqrt(D), -1) @ vc
    torch.testing.assert_close(out, want, **TOL)
    check(q, kh[:, :, :0], vh[:, :, :0], kc, vc, sel[..., :0], T)  # no history at all


def test_no_current_chunk_rows_without_keys(kernel):
    """Lc = 0: a token with nothing selected has no key at all -> out 0, lse -inf (like the reference)."""
    B, Hh, N, T, D = 1, 2, 3, 7, 8
    q, kh, vh, kc, vc = inputs(B, Hh, N, T, D, Lc=0)
    sel = torch.rand(B, Hh, T, N) > 0.6
    sel[0, 1, 2] = False
    out, lse = check(q, kh, vh, kc, vc, sel, T)
    assert lse[0, 1, 2] == float("-inf") and (out[0, 1, 2] == 0).all()


@pytest.mark.parametrize("spec", [RoutingSpec("topk", top_k=5),
                                  RoutingSpec("topk", top_k=1, sink_chunks=1, window_chunks=2)])
def test_k_at_least_history_equals_dense_attention(kernel, spec):
    B, Hh, N, T, D = 2, 2, 4, 7, 16
    q, kh, vh, kc, vc = inputs(B, Hh, N, T, D)
    sel = select_chunks(q, chunk_means(kh, T), spec, backend="torch")
    plan = R._plan_history(sel, T, D)
    assert sel.all() and plan.kind == "uniform" and plan.chunks == list(range(N))
    out, lse = check(q, kh, vh, kc, vc, sel, T)
    K, V = torch.cat([kh, kc], 2).double(), torch.cat([vh, vc], 2).double()
    s = q.double() @ K.transpose(-1, -2) / math.sqrt(D)
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ V, **TOL)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), **TOL)
    assert static_chunks(spec, N) == list(range(N))
    out2, lse2 = routed_attention(q, kh, vh, kc, vc, sel, T, backend="torch", chunks=static_chunks(spec, N))
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


@pytest.mark.parametrize("spec", [RoutingSpec("window", window_chunks=2),
                                  RoutingSpec("window", sink_chunks=1, window_chunks=2),
                                  RoutingSpec("window", sink_chunks=2, window_chunks=1)])
def test_window_mode_uniform_slices(kernel, monkeypatch, spec):
    B, Hh, N, T, D = 2, 2, 6, 7, 16
    q, kh, vh, kc, vc = inputs(B, Hh, N, T, D)
    sel = select_chunks(q, chunk_means(kh, T), spec, backend="torch")
    chunks = static_chunks(spec, N)
    plan = R._plan_history(sel, T, D)
    assert plan.kind == "uniform" and plan.chunks == chunks
    assert torch.equal(sel, torch.zeros_like(sel).index_fill_(3, torch.tensor(chunks), True))
    out, lse = check(q, kh, vh, kc, vc, sel, T)
    # chunks given by the caller: no plan (no host sync), same result
    monkeypatch.setattr(R, "_plan_history", lambda *a: pytest.fail("planned despite chunks="))
    out2, lse2 = routed_attention(q, kh, vh, kc, vc, sel, T, backend="torch", chunks=chunks)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    torch.testing.assert_close(lse2, lse, atol=0, rtol=0)


def test_contiguous_chunks_read_as_views():
    x = torch.randn(1, 2, 6 * 5, 4)
    runs = R._chunk_runs(x, [3, 4, 5], 5)
    assert len(runs) == 1 and runs[0]._base is x  # one run: a view, no copy
    torch.testing.assert_close(torch.cat(R._chunk_runs(x, [0, 4, 5], 5), 2), torch.cat([x[:, :, :5], x[:, :, 20:]], 2))
    assert R._chunk_runs(x, [], 5) == []


def test_static_chunks_agree_with_select_chunks():
    q = torch.randn(1, 2, 5, 8)
    specs = [None, RoutingSpec(), RoutingSpec("topk", top_k=2),
             RoutingSpec("topk", top_k=1, sink_chunks=1, window_chunks=1),
             RoutingSpec("window", window_chunks=3), RoutingSpec("window", sink_chunks=2, window_chunks=2)]
    for spec in specs:
        for N in range(0, 8):
            chunks = static_chunks(spec, N)
            if spec is not None and spec.mode == "topk" and N > spec.max_selected():
                assert chunks is None
                continue
            sel = select_chunks(q, torch.randn(1, 2, N, 8), spec or RoutingSpec(), backend="torch")
            want = torch.zeros(N, dtype=torch.bool)
            want[chunks] = True
            assert torch.equal(sel, want.expand_as(sel)), (spec, N, chunks)


def test_chunks_argument_errors():
    q, kh, vh, kc, vc = inputs(1, 1, 2, 3, 4)
    sel = torch.ones(1, 1, 3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="chunks"):
        routed_attention(q, kh, vh, kc, vc, sel, 3, backend="torch", chunks=[0, 2])


# ------------------------------------------------------------------------------------------
# dtypes and autograd
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.float64, 1e-10)])
def test_dtypes(kernel, dtype, atol):
    B, Hh, N, T, D = 1, 2, 4, 7, 16
    q, kh, vh, kc, vc = inputs(B, Hh, N, T, D, dtype=dtype)
    sel = torch.rand(B, Hh, T, N) > 0.5
    ref_o, ref_l = routed_attention_reference(q, kh, vh, kc, vc, sel, T)
    out, lse = routed_attention(q, kh, vh, kc, vc, sel, T, backend="torch")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_o.double(), atol=atol, rtol=atol)
    torch.testing.assert_close(lse.double(), ref_l.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "auto" if x is None else "-".join(map(str, x)))
def test_gradients_equal_reference(monkeypatch, layout):
    force_layout(monkeypatch, layout)
    B, Hh, N, T, D = 2, 2, 3, 5, 8
    ins = [t.double().requires_grad_() for t in inputs(B, Hh, N, T, D)]
    sel = torch.rand(B, Hh, T, N) > 0.5
    sel[..., 0] = True
    sel[0, 0, 0] = False
    for s in (sel, torch.ones_like(sel)):  # grouped; uniform
        check_grads(ins, s, T)


# ------------------------------------------------------------------------------------------
# the planning rule, both ways
# ------------------------------------------------------------------------------------------
def _topk_sel(scores, k):
    return scores >= scores.topk(k, dim=-1).values[..., -1:]


def _rows(plan, Lq, N):
    """Query rows the plan computes per head (dense blocks: all Lq; padded: N * G; per-chunk: counts)."""
    return [len(d) * Lq + (N * g if g else sum(c)) for d, g, c in zip(plan.dense, plan.rows, plan.counts)]


def test_plan_rule_chooses_by_cost():
    g = torch.Generator().manual_seed(0)
    # real shape (1560 tokens per chunk, 40 chunks), per-token random top-1 (~39 tokens per chunk): no
    # dense block; one call per chunk with its exact count (padding to the largest count would cost more)
    B, Hh, Lq, N, T, D = 1, 2, 1560, 40, 1560, 128
    sel = _topk_sel(torch.rand(B, Hh, Lq, N, generator=g), 1)
    plan = R._plan_history(sel, T, D)
    assert plan.kind == "blocks" and plan.dense == [[], []] and plan.rows == [0, 0]
    assert _rows(plan, Lq, N) == [Lq, Lq]  # exactly the pairs
    # sink + recent with a few outliers (coherent heads): work ~ the selected pairs, never all N chunks
    sel = torch.zeros(B, Hh, Lq, N, dtype=torch.bool)
    sel[..., [0, 36, 37, 38, 39]] = True
    sel[0, 0, 5, 36], sel[0, 0, 5, 7] = False, True
    plan = R._plan_history(sel, T, D)
    pairs = sel.sum((2, 3)).flatten().tolist()
    assert plan.kind == "blocks" and all(r <= 1.01 * n for r, n in zip(_rows(plan, Lq, N), pairs))
    # tiny shape (48 tokens per chunk): kernel calls dominate -> fewest calls: padded rows for random
    # picks, dense blocks (shared by the heads) for sink + recent
    B, Hh, Lq, N, T, D = 1, 4, 48, 40, 48, 32
    sel = _topk_sel(torch.rand(B, Hh, Lq, N, generator=g), 2)
    plan = R._plan_history(sel, T, D)
    assert plan.kind == "blocks" and all(plan.rows) and not any(plan.dense)
    assert plan.rows == sel.sum(2).amax(-1).flatten().tolist()
    sel = torch.zeros(B, Hh, Lq, N, dtype=torch.bool)
    sel[..., [0, 37, 38, 39]] = True
    sel[0, 1, 3, 38], sel[0, 1, 3, 12] = False, True
    plan = R._plan_history(sel, T, D)
    assert plan.kind == "blocks" and plan.dense[0] == [0, 37, 38, 39] and plan.dense[2] == plan.dense[0]
    # never more work than dense attention over the whole history (up to one kernel call's overhead)
    for p in (0.3, 0.7, 0.95):
        sel = torch.rand(B, Hh, Lq, N, generator=g) < p
        plan = R._plan_history(sel, T, D)
        assert max(_rows(plan, Lq, N)) <= N * Lq
    # uniform and empty
    B, Hh, Lq, N = 1, 2, 64, 8
    plan = R._plan_history(torch.ones(B, Hh, Lq, N, dtype=torch.bool), 64, 32)
    assert plan.kind == "uniform" and plan.chunks == list(range(N))
    assert R._plan_history(torch.zeros(B, Hh, Lq, N, dtype=torch.bool), 64, 32).kind == "none"


def test_one_host_sync_per_call(monkeypatch):
    """The torch path reads device values once (the plan's `.tolist()`); no `.item()` / `int(tensor)`."""
    calls = []
    orig_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append("tolist") or orig_tolist(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() in the torch path"))
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: pytest.fail("int(tensor) in the torch path"))
    q, kh, vh, kc, vc = inputs(1, 2, 5, 7, 8)
    sel = select_chunks(q, chunk_means(kh, 7), RoutingSpec("topk", top_k=2), backend="torch")
    assert calls == []  # selection: no sync
    routed_attention(q, kh, vh, kc, vc, sel, 7, backend="torch")
    assert calls == ["tolist"]


# ------------------------------------------------------------------------------------------
# selection: the sort-free top-k keeps the exact tie rule
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [1, 2, 3, 7])
def test_select_topk_many_exact_ties(top_k):
    B, Hh, D, N = 2, 2, 3, 7
    Lq = 2 * N + 1  # = the training sequence of N + 1 chunks of 1 token (N history chunks)
    g = torch.Generator().manual_seed(top_k)
    q = torch.randint(-1, 2, (B, Hh, Lq, D), generator=g).float()  # few distinct scores: ties everywhere
    mk = torch.randint(-1, 2, (B, Hh, N, D), generator=g).float()
    for allowed in (None, training_allowed(N + 1, 1), torch.rand(Lq, N, generator=g) > 0.3):
        for spec in (RoutingSpec("topk", top_k=top_k),
                     RoutingSpec("topk", top_k=top_k, sink_chunks=1, window_chunks=1)):
            ref = select_chunks_reference(q, mk, spec, allowed)
            assert torch.equal(select_chunks(q, mk, spec, allowed, backend="torch"), ref)


def test_inplace_products_at_real_shape(monkeypatch):
    """CPU inference takes the in-place products exactly for the per-chunk groups the fused kernel
    would read in several 32-row passes (33-191 rows) when K and V reach 2 MiB, and they equal the
    reference."""
    def use(Lq, Lk, D=128, Dv=None):
        return R._use_inplace(torch.empty(1, 1, Lq, D), torch.empty(1, 1, Lk, D), torch.empty(1, 1, Lk, Dv or D))

    assert not use(32, 4680) and use(33, 4680) and use(191, 4680) and not use(192, 4680)
    assert use(40, 2048) and not use(40, 2047) and not use(40, 1560)  # K/V 2 MiB = 2048 keys of 128 in fp32
    assert use(40, 2048, D=64, Dv=192) and not use(40, 2048, D=64, Dv=64)  # K and V sizes both count
    assert not use(191, 20000)  # a score block over 8 MiB: the fused kernel's bounded tiles
    B, Hh, N, T, D, Lq = 1, 2, 8, 2100, 128, 600  # random top-1: ~75 queries per (head, chunk), K/V 2.15 MB
    q, kh, vh, kc, vc = inputs(B, Hh, N, T, D, Lq=Lq, spare=0)
    sel = _topk_sel(torch.rand(B, Hh, Lq, N, generator=torch.Generator().manual_seed(3)), 1)
    rows, inplace = [], R._attend_inplace
    monkeypatch.setattr(R, "_attend_inplace", lambda *a: rows.append(a[0].shape[-2]) or inplace(*a))
    with torch.no_grad():
        check(q, kh, vh, kc, vc, sel, T)
    counts = sel.sum(2).flatten().tolist()
    assert sorted(rows) == sorted(c for c in counts if 33 <= c < 192) and len(rows) >= 12


def test_explicit_ops_in_small_query_blocks(monkeypatch):
    """The explicit path bounds its score memory by splitting query rows into blocks."""
    monkeypatch.setattr(R, "_FLASH_CPU", None)
    monkeypatch.setattr(R, "_SCORE_BLOCK_BYTES", 4 * 2 * 2 * 40 * 3)  # a few query rows per block
    q, kh, vh, kc, vc = inputs(2, 2, 4, 10, 8)
    check(q, kh, vh, kc, vc, torch.rand(2, 2, 10, 4) > 0.5, 10)  # grouped
    check(q, kh, vh, kc, vc, torch.ones(2, 2, 10, 4, dtype=torch.bool), 10)  # uniform


@pytest.mark.parametrize("pattern", ["random", "coherent", "uniform"])
def test_a_plan_made_ahead_serves_the_packed_history(pattern, monkeypatch):
    """plan_routed over the whole history's selection (one host read, with the caller's extra values), then
    routed_attention over only the selected chunks packed (a bounded cache's staging) with that plan: no
    host read of its own, the whole-history output bit for bit (and the reference's)."""
    from resampling_forcing.attention.routed import plan_routed

    B, Hh, N, T, D = 2, 3, 9, 5, 16
    q, kh, vh, kc, vc = inputs(B, Hh, N, T, D, seed=4)
    if pattern == "uniform":
        sel = torch.zeros(B, Hh, T, N, dtype=torch.bool)
        sel[..., [0, 4, 8]] = True
    else:
        sel = pattern_sel(B, Hh, T, N, 2, pattern, seed=4)
    sel[..., 6] = False  # a chunk nobody selects: left out of the packed history
    used = sel.flatten(0, 2).any(dim=0)
    calls, orig = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or orig(self))
    plan = plan_routed(q, sel, T, T, backend="torch", extra=used)
    ids = [j for j, u in enumerate(plan.extra) if u]
    assert len(calls) == 1 and ids == [j for j in range(N) if used[j]] and 6 not in ids
    assert plan.plan.kind == ("uniform" if pattern == "uniform" else "blocks")
    cols = lambda t: torch.cat([t[:, :, j * T:(j + 1) * T] for j in ids], dim=2)  # noqa: E731
    got, got_lse = routed_attention(q, cols(kh), cols(vh), kc, vc, sel[..., ids], T, backend="torch",
                                    packed=(ids, N), plan=plan)
    assert len(calls) == 1  # the call read nothing
    want, want_lse = routed_attention(q, kh, vh, kc, vc, sel, T, backend="torch")
    assert torch.equal(got, want) and torch.equal(got_lse, want_lse)
    ref, _ = routed_attention_reference(q, kh, vh, kc, vc, sel, T)
    torch.testing.assert_close(got, ref, **TOL)


def test_a_plan_made_ahead_decides_the_auto_path_as_the_call_would(monkeypatch):
    """Where the kernel may run ("auto"; here its interpreter, the check forced on): plan_routed reads the
    kernel's work statistics and the caller's extra values in ONE read, decides as routed_attention decides
    for the packed call by itself, and that call with the plan reads nothing more; a plan reading chunks
    the packed ids leave out is one ValueError."""
    import resampling_forcing.attention.routed as RT
    from resampling_forcing.attention.backends import kernel_is_cheaper, kernels
    from resampling_forcing.attention.routed import plan_routed, routed_work

    monkeypatch.setattr(RT, "use_routing_kernels", lambda backend, q, what, fp32=False: backend in ("auto", "triton"))
    B, Hh, N, T, D = 1, 2, 7, 9, 16
    q, kh, vh, kc, vc = inputs(B, Hh, N, T, D, seed=6)
    for pattern in ("random", "coherent"):
        sel = pattern_sel(B, Hh, T, N, 2, pattern, seed=6)
        sel[..., 3] = False
        used = sel.flatten(0, 2).any(dim=0)
        ids = [j for j in range(N) if used[j]]
        calls, orig = [], torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or orig(self))
        plan = plan_routed(q, sel, T, T, backend="auto", extra=used)
        assert len(calls) == 1 and plan.extra == used.long().tolist()
        work = routed_work(sel[..., ids], T, T, kernels().block_rows(D)).tolist()
        assert plan.use_kernel == kernel_is_cheaper(*work)  # what the packed call would decide itself
        cols = lambda t: torch.cat([t[:, :, j * T:(j + 1) * T] for j in ids], dim=2)  # noqa: E731
        calls.clear()
        got, _ = routed_attention(q, cols(kh), cols(vh), kc, vc, sel[..., ids], T, packed=(ids, N), plan=plan)
        assert calls == []
        monkeypatch.setattr(torch.Tensor, "tolist", orig)
        want, _ = routed_attention_reference(q, kh, vh, kc, vc, sel, T)
        torch.testing.assert_close(got, want, **TOL)
    uniform = torch.zeros(B, Hh, T, N, dtype=torch.bool)
    uniform[..., [0, 4, 6]] = True  # every query reads chunks 0, 4, 6: a uniform plan
    plan = plan_routed(q, uniform, T, T, backend="torch").plan
    assert plan.kind == "uniform" and R.packed_plan(plan, [0, 4, 6]).chunks == [0, 1, 2]
    with pytest.raises(ValueError, match=r"reads history chunks \[4\] that the packed ids \[0, 6\] leave out"):
        R.packed_plan(plan, [0, 6])
