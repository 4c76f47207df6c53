"""History routing (torch paths): selection semantics, routed attention, LSE merge, training masks."""
from __future__ import annotations

import math

import pytest
import torch

from resampling_forcing.attention.routing import (
    RoutedTrainingMask,
    RoutingSpec,
    chunk_means,
    merge_by_lse,
    routed_attention,
    routed_attention_reference,
    routed_block_mask,
    routed_training_attention,
    routed_training_mask,
    select_chunks,
    select_chunks_reference,
    training_allowed,
)


# ------------------------------------------------------------------------------------------
# helpers (independent of the module under test)
# ------------------------------------------------------------------------------------------
def plain_attention(q, K, V, mask=None, scale=None):
    """Explicit softmax attention in fp64. mask: bool [..., Lq, Lk] (True = attend)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q.double() @ K.double().transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ V.double(), torch.logsumexp(s, -1)


def rand_attn_inputs(B, Hh, N, T, Lc, D, dtype=torch.float32, Lq=None):
    Lq = Lc if Lq is None else Lq
    q = torch.randn(B, Hh, Lq, D, dtype=dtype)
    kh = torch.randn(B, Hh, N * T, D, dtype=dtype)
    vh = torch.randn(B, Hh, N * T, D, dtype=dtype)
    kc = torch.randn(B, Hh, Lc, D, dtype=dtype)
    vc = torch.randn(B, Hh, Lc, D, dtype=dtype)
    return q, kh, vh, kc, vc


def scores_setup(score_rows):
    """q [1,1,R,2], mean_k [1,1,N,2] with q_r . mean_k_j == score_rows[r][j] exactly (integers)."""
    s = torch.tensor(score_rows, dtype=torch.float32)  # [R, N]
    R, N = s.shape
    # q_r = [1, r], mean_k_j = [s_rj - r*x_j, x_j] is row dependent -> use one row per call instead
    assert R == 1
    q = torch.tensor([[[[1.0, 0.0]]]])
    mk = torch.stack([s[0], torch.zeros(N)], dim=-1)[None, None]
    return q, mk


def both_select(q, mk, spec, allowed=None):
    ref = select_chunks_reference(q, mk, spec, allowed)
    eff = select_chunks(q, mk, spec, allowed, backend="torch")
    assert ref.dtype == torch.bool and eff.dtype == torch.bool
    assert torch.equal(ref, eff)
    return ref


def chunks_of(sel_row):
    return sorted(torch.nonzero(sel_row).flatten().tolist())


def own_chunk(r, N, T):
    """Chunk index of token r of the training sequence [H_1..H_{N-1} | Q_1..Q_N]."""
    return r // T if r < (N - 1) * T else (r - (N - 1) * T) // T


def contract_training_mask(N, T):
    """The CONTRACTS.md rule, written row by row over [H_1..H_{N-1} | Q_1..Q_N]: Q_i->Q_j iff j==i;
    Q_i->H_j iff j<i; H_i->H_j iff j<=i."""
    HT = (N - 1) * T
    L = HT + N * T
    m = torch.zeros(L, L, dtype=torch.bool)
    for r in range(L):
        r_hist, ri = r < HT, own_chunk(r, N, T)
        for c in range(L):
            c_hist, cj = c < HT, own_chunk(c, N, T)
            if r_hist:
                m[r, c] = c_hist and cj <= ri
            else:
                m[r, c] = (cj < ri) if c_hist else (cj == ri)
    return m


# ------------------------------------------------------------------------------------------
# chunk means and spec
# ------------------------------------------------------------------------------------------
def test_chunk_means_fp32_accumulation_and_shape():
    k = torch.randn(2, 3, 4 * 5, 8).half()
    m = chunk_means(k, 5)
    assert m.shape == (2, 3, 4, 8) and m.dtype == torch.float32
    expect = torch.stack([k[:, :, j * 5:(j + 1) * 5].double().mean(2) for j in range(4)], dim=2)
    torch.testing.assert_close(m.double(), expect, atol=1e-6, rtol=0)
    assert chunk_means(torch.randn(1, 2, 0, 8), 5).shape == (1, 2, 0, 8)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_means(k, 6)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(mode="sparse"), "mode"),
        (dict(mode="topk"), "top_k"),
        (dict(mode="topk", top_k=0), "top_k"),
        (dict(mode="topk", top_k=2, sink_chunks=-1), "sink_chunks"),
        (dict(mode="window", window_chunks=-2), "window_chunks"),
        (dict(mode="window"), "window_chunks"),
        (dict(mode="topk", top_k=1.5), "top_k"),
    ],
)
def test_spec_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=f"RoutingSpec.{field}"):
        RoutingSpec(**kwargs)


def test_spec_is_dense_and_defaults():
    assert RoutingSpec().is_dense
    assert RoutingSpec("dense", top_k=5).is_dense  # dense ignores top_k (config toggling)
    s = RoutingSpec("topk", top_k=5, sink_chunks=1, window_chunks=2)
    assert not s.is_dense and s.max_selected() == 8


# ------------------------------------------------------------------------------------------
# selection semantics
# ------------------------------------------------------------------------------------------
def test_topk_with_sink_and_window():
    q, mk = scores_setup([[5, 1, 7, 3, 2, 8, 4, 6]])
    sel = both_select(q, mk, RoutingSpec("topk", top_k=2, sink_chunks=1, window_chunks=2))
    # keep {0} (sink) U {6, 7} (window) U top-2 of {1..5} by score (chunk 5: 8, chunk 2: 7)
    assert chunks_of(sel[0, 0, 0]) == [0, 2, 5, 6, 7]
    sel = both_select(q, mk, RoutingSpec("topk", top_k=3))
    assert chunks_of(sel[0, 0, 0]) == [2, 5, 7]  # scores 8, 7, 6
    sel = both_select(q, mk, RoutingSpec("topk", top_k=1))
    assert chunks_of(sel[0, 0, 0]) == [5]


def test_window_mode_is_sliding_window():
    q, mk = scores_setup([[5, 1, 7, 3, 2, 8, 4, 6]])
    assert chunks_of(both_select(q, mk, RoutingSpec("window", window_chunks=2))[0, 0, 0]) == [6, 7]
    assert chunks_of(both_select(q, mk, RoutingSpec("window", sink_chunks=1, window_chunks=1))[0, 0, 0]) == [0, 7]
    assert chunks_of(both_select(q, mk, RoutingSpec("window", window_chunks=20))[0, 0, 0]) == list(range(8))


def test_ties_lower_index_wins():
    q, mk = scores_setup([[3, 5, 5, 5, 1, 5]])
    assert chunks_of(both_select(q, mk, RoutingSpec("topk", top_k=2))[0, 0, 0]) == [1, 2]
    assert chunks_of(both_select(q, mk, RoutingSpec("topk", top_k=3, sink_chunks=2))[0, 0, 0]) == [0, 1, 2, 3, 5]
    allowed = torch.tensor([[True, False, True, True, True, True]])
    assert chunks_of(both_select(q, mk, RoutingSpec("topk", top_k=2), allowed)[0, 0, 0]) == [2, 3]
    # all mean keys equal -> first chunks win
    q, mk = scores_setup([[4, 4, 4, 4, 4]])
    assert chunks_of(both_select(q, mk, RoutingSpec("topk", top_k=2))[0, 0, 0]) == [0, 1]
    assert chunks_of(both_select(q, mk, RoutingSpec("topk", top_k=2, window_chunks=1))[0, 0, 0]) == [0, 1, 4]


def test_ties_from_equal_mean_keys_random_queries():
    """Equal mean keys (integers) in many rows/heads: exact ties resolved to the lower index."""
    B, Hh, Lq, D, N = 2, 3, 11, 8, 6
    q = torch.randint(-3, 4, (B, Hh, Lq, D)).float()
    base = torch.randint(-3, 4, (B, Hh, 3, D)).float()
    mk = base[:, :, [0, 1, 0, 2, 1, 0]]  # chunks 0,2,5 equal; 1,4 equal
    sel = both_select(q, mk, RoutingSpec("topk", top_k=1))
    s = q @ mk.transpose(-1, -2)
    first_max = torch.argmax((s == s.max(-1, keepdim=True).values).int(), dim=-1)  # lowest index of the max
    assert torch.equal(sel.float().argmax(-1), first_max)
    assert torch.equal(sel.sum(-1), torch.ones(B, Hh, Lq, dtype=torch.long))


def test_allowed_relative_sink_window_topk():
    N, T = 6, 2
    allowed = training_allowed(N, T)  # [(2N-1)T, N-1], row of chunk i allows j < i
    L = (2 * N - 1) * T
    assert allowed.shape == (L, N - 1)
    q = torch.randn(2, 2, L, 8)
    mk = torch.randn(2, 2, N - 1, 8)
    spec = RoutingSpec("topk", top_k=1, sink_chunks=1, window_chunks=1)
    sel = both_select(q, mk, spec, allowed)
    for r in range(L):
        i = own_chunk(r, N, T)
        for b in range(2):
            for h in range(2):
                got = chunks_of(sel[b, h, r])
                assert set(got) <= set(range(i))
                assert len(got) == min(i, 3)
                if i >= 1:
                    assert 0 in got and i - 1 in got  # sink = first allowed, window = last allowed
                if i > 3:  # the scored one is the best of 1..i-2
                    mid = list(range(1, i - 1))
                    s = (q[b, h, r].double() @ mk[b, h].double().T)[mid]
                    assert mid[int(torch.argmax(s))] in got
    win = both_select(q, mk, RoutingSpec("window", window_chunks=2), allowed)
    for r in range(L):
        i = own_chunk(r, N, T)
        assert chunks_of(win[0, 1, r]) == list(range(max(0, i - 2), i))


def test_dense_mode_is_allowed():
    allowed = torch.rand(9, 4) > 0.5
    sel = both_select(torch.randn(2, 2, 9, 8), torch.randn(2, 2, 4, 8), RoutingSpec(), allowed)
    assert torch.equal(sel, allowed.expand(2, 2, 9, 4))


@pytest.mark.parametrize("N", [1, 5, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_select_efficient_equals_reference_random(N, dtype):
    B, Hh, Lq, D = 2, 3, 17, 16
    q = torch.randn(B, Hh, Lq, D).to(dtype)
    mk = chunk_means(torch.randn(B, Hh, N * 3, D).to(dtype), 3)
    allowed_opts = [None, torch.rand(Lq, N) > 0.4, torch.zeros(Lq, N, dtype=torch.bool)]
    specs = [
        RoutingSpec(),
        RoutingSpec("topk", top_k=1),
        RoutingSpec("topk", top_k=2, sink_chunks=1, window_chunks=1),
        RoutingSpec("topk", top_k=20),
        RoutingSpec("window", window_chunks=2),
        RoutingSpec("window", sink_chunks=1, window_chunks=1),
    ]
    for allowed in allowed_opts:
        for spec in specs:
            sel = both_select(q, mk, spec, allowed)
            if allowed is not None:
                assert not (sel & ~allowed).any()


def test_k_not_smaller_than_history_keeps_all():
    q, mk = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 3, 8)
    for spec in (RoutingSpec("topk", top_k=3), RoutingSpec("topk", top_k=1, sink_chunks=1, window_chunks=1),
                 RoutingSpec("topk", top_k=9)):
        assert both_select(q, mk, spec).all()


def test_heads_pick_different_chunks():
    D, N = 4, 3
    mk = torch.zeros(1, 2, N, D)
    for j in range(N):
        mk[0, :, j, j] = 1.0  # mean key of chunk j = e_j
    q = torch.zeros(1, 2, 1, D)
    q[0, 0, 0, 0] = 1.0  # head 0 likes chunk 0
    q[0, 1, 0, 2] = 1.0  # head 1 likes chunk 2
    sel = both_select(q, mk, RoutingSpec("topk", top_k=1))
    assert chunks_of(sel[0, 0, 0]) == [0] and chunks_of(sel[0, 1, 0]) == [2]


def test_no_gradient_through_selection():
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    k = torch.randn(1, 2, 12, 8, requires_grad=True)
    sel = select_chunks(q, chunk_means(k, 4), RoutingSpec("topk", top_k=1))
    ref = select_chunks_reference(q, chunk_means(k, 4), RoutingSpec("topk", top_k=1))
    assert not sel.requires_grad and not ref.requires_grad and sel.grad_fn is None


def test_select_input_errors():
    q, mk = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="mean_k"):
        select_chunks(q, torch.randn(1, 3, 3, 8), RoutingSpec())
    with pytest.raises(ValueError, match="allowed"):
        select_chunks(q, mk, RoutingSpec(), torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="RoutingSpec"):
        select_chunks(q, mk, "topk")
    with pytest.raises(ValueError, match="backend"):
        select_chunks(q, mk, RoutingSpec(), backend="cuda")


# ------------------------------------------------------------------------------------------
# routed attention (torch path and reference)
# ------------------------------------------------------------------------------------------
def test_reference_matches_per_row_gather():
    B, Hh, N, T, Lc, D = 2, 2, 3, 5, 4, 8
    q, kh, vh, kc, vc = rand_attn_inputs(B, Hh, N, T, Lc, D, Lq=6)
    sel = torch.rand(B, Hh, 6, N) > 0.5
    out, lse = routed_attention_reference(q, kh, vh, kc, vc, sel, T)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    for b in range(B):
        for h in range(Hh):
            for m in range(6):
                toks = [j * T + t for j in range(N) if sel[b, h, m, j] for t in range(T)]
                K = torch.cat([kh[b, h, toks], kc[b, h]])
                V = torch.cat([vh[b, h, toks], vc[b, h]])
                o, l = plain_attention(q[b, h, m:m + 1], K, V)
                torch.testing.assert_close(out[b, h, m].double(), o[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(lse[b, h, m].double(), l[0], atol=1e-5, rtol=1e-5)


def check_torch_path(q, kh, vh, kc, vc, sel, T, atol, rtol):
    ref_o, ref_l = routed_attention_reference(q, kh, vh, kc, vc, sel, T)
    out, lse = routed_attention(q, kh, vh, kc, vc, sel, T, backend="torch")
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref_o.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_l, atol=1e-5, rtol=1e-5)
    return out, lse


@pytest.mark.parametrize("T", [7, 13, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_path_matches_reference(T, dtype):
    B, Hh, N, D = 2, 2, 4, 16
    q, kh, vh, kc, vc = rand_attn_inputs(B, Hh, N, T, T, D, dtype)
    atol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: output rounding (2^-11 relative)
    for spec in (RoutingSpec("topk", top_k=1), RoutingSpec("topk", top_k=2, sink_chunks=1)):
        sel = select_chunks(q, chunk_means(kh, T), spec)
        assert (sel.sum(-1) == spec.max_selected()).all()
        check_torch_path(q, kh, vh, kc, vc, sel, T, atol, 1e-5 if dtype == torch.float32 else 2e-3)
    # union smaller than the history (gather path) and per-token random selections
    sel = torch.rand(B, Hh, T, N) > 0.5
    sel[..., 1] = False
    check_torch_path(q, kh, vh, kc, vc, sel, T, atol, 1e-5 if dtype == torch.float32 else 2e-3)


def test_torch_path_small_query_blocks(monkeypatch):
    import resampling_forcing.attention.routed_torch as R

    monkeypatch.setattr(R, "_SCORE_BLOCK_BYTES", 4 * 2 * 2 * 40 * 3)  # forces blocks of 3 query rows
    q, kh, vh, kc, vc = rand_attn_inputs(2, 2, 4, 10, 10, 8)
    sel = torch.rand(2, 2, 10, 4) > 0.5
    check_torch_path(q, kh, vh, kc, vc, sel, 10, 1e-5, 1e-5)


def test_k_larger_than_history_equals_dense_attention():
    B, Hh, N, T, D = 2, 2, 3, 7, 16
    q, kh, vh, kc, vc = rand_attn_inputs(B, Hh, N, T, T, D)
    sel = select_chunks(q, chunk_means(kh, T), RoutingSpec("topk", top_k=5))
    assert sel.all()
    out, lse = routed_attention(q, kh, vh, kc, vc, sel, T, backend="torch")
    o, l = plain_attention(q, torch.cat([kh, kc], 2), torch.cat([vh, vc], 2))
    torch.testing.assert_close(out.double(), o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), l, atol=1e-5, rtol=1e-5)


def test_single_chunk_no_history_nothing_selected():
    B, Hh, T, D = 2, 2, 7, 16
    q, kh, vh, kc, vc = rand_attn_inputs(B, Hh, 1, T, T, D)
    sel = torch.rand(B, Hh, T, 1) > 0.5
    check_torch_path(q, kh, vh, kc, vc, sel, T, 1e-5, 1e-5)
    o_cur, l_cur = plain_attention(q, kc, vc)
    # nothing selected == current chunk only
    out, lse = routed_attention(q, kh, vh, kc, vc, torch.zeros_like(sel), T, backend="torch")
    torch.testing.assert_close(out.double(), o_cur, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), l_cur, atol=1e-5, rtol=1e-5)
    # no history at all
    empty = kh[:, :, :0]
    out, lse = routed_attention(q, empty, empty, kc, vc, sel[..., :0], T, backend="torch")
    torch.testing.assert_close(out.double(), o_cur, atol=1e-5, rtol=1e-5)
    ref_o, ref_l = routed_attention_reference(q, empty, empty, kc, vc, sel[..., :0], T)
    torch.testing.assert_close(ref_o.double(), o_cur, atol=1e-5, rtol=1e-5)


def test_window_mode_attention_is_sliding_window_baseline():
    B, Hh, N, T, D = 1, 2, 5, 7, 16
    q, kh, vh, kc, vc = rand_attn_inputs(B, Hh, N, T, T, D)
    sel = select_chunks(q, chunk_means(kh, T), RoutingSpec("window", window_chunks=2))
    out, lse = routed_attention(q, kh, vh, kc, vc, sel, T, backend="torch")
    o, l = plain_attention(q, torch.cat([kh[:, :, (N - 2) * T:], kc], 2), torch.cat([vh[:, :, (N - 2) * T:], vc], 2))
    torch.testing.assert_close(out.double(), o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), l, atol=1e-5, rtol=1e-5)


def test_routed_attention_gradients_torch_path():
    B, Hh, N, T, D = 1, 2, 3, 5, 8
    ins = [t.double().requires_grad_() for t in rand_attn_inputs(B, Hh, N, T, T, D)]
    sel = torch.rand(B, Hh, T, N) > 0.5
    sel[..., 0] = False
    out, lse = routed_attention(*ins, sel, T, backend="torch")
    g = torch.autograd.grad((out.sum() + lse.sum()), ins)
    ins2 = [t.detach().clone().requires_grad_() for t in ins]
    out2, lse2 = routed_attention_reference(*ins2, sel, T)
    g2 = torch.autograd.grad((out2.sum() + lse2.sum()), ins2)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_attention_input_errors():
    q, kh, vh, kc, vc = rand_attn_inputs(1, 2, 3, 4, 4, 8)
    sel = torch.ones(1, 2, 4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="chunk_tokens"):
        routed_attention(q, kh, vh, kc, vc, sel, 5)
    with pytest.raises(ValueError, match="sel"):
        routed_attention(q, kh, vh, kc, vc, sel.float(), 4)
    with pytest.raises(TypeError, match="dtype"):
        routed_attention(q, kh.half(), vh, kc, vc, sel, 4)
    with pytest.raises(ValueError, match="backend"):
        routed_attention(q, kh, vh, kc, vc, sel, 4, backend="flash")


def test_backend_triton_without_cuda_or_interpreter_is_one_line_error(monkeypatch):
    import resampling_forcing.kernels as K

    assert K.HAS_TRITON, "triton is not installed; `make setup` installs it"
    monkeypatch.setattr(K, "is_interpreted", lambda: False)
    q, kh, vh, kc, vc = rand_attn_inputs(1, 1, 2, 4, 4, 16)
    sel = torch.ones(1, 1, 4, 2, dtype=torch.bool)
    with pytest.raises(RuntimeError) as e:
        routed_attention(q, kh, vh, kc, vc, sel, 4, backend="triton")
    msg = str(e.value)
    assert "\n" not in msg and "TRITON_INTERPRET" in msg and "backend='torch'" in msg
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        select_chunks(q, chunk_means(kh, 4), RoutingSpec("topk", top_k=1), backend="triton")
    # auto falls back to torch on CPU
    out, _ = routed_attention(q, kh, vh, kc, vc, sel, 4, backend="auto")
    assert out.shape == q.shape


# ------------------------------------------------------------------------------------------
# LSE merge
# ------------------------------------------------------------------------------------------
def test_merge_by_lse_equals_softmax_over_union():
    q = torch.randn(2, 3, 5, 8)
    K, V = torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    o1, l1 = plain_attention(q, K[:, :, :4], V[:, :, :4])
    o2, l2 = plain_attention(q, K[:, :, 4:], V[:, :, 4:])
    o, l = merge_by_lse(o1.float(), l1.float(), o2.float(), l2.float())
    ou, lu = plain_attention(q, K, V)
    torch.testing.assert_close(o.double(), ou, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(l.double(), lu, atol=1e-6, rtol=1e-6)
    # order does not matter
    o_, l_ = merge_by_lse(o2.float(), l2.float(), o1.float(), l1.float())
    torch.testing.assert_close(o_, o)


def test_merge_by_lse_empty_branches():
    o1, l1 = torch.randn(2, 4, 8), torch.randn(2, 4)
    nan_o = torch.full((2, 4, 8), float("nan"))
    ninf = torch.full((2, 4), float("-inf"))
    o, l = merge_by_lse(o1, l1, nan_o, ninf)
    assert torch.equal(o, o1) and torch.equal(l, l1)
    o, l = merge_by_lse(nan_o, ninf, o1, l1)
    assert torch.equal(o, o1) and torch.equal(l, l1)
    o, l = merge_by_lse(nan_o, ninf, nan_o, ninf)
    assert torch.equal(o, torch.zeros_like(o)) and torch.equal(l, ninf)


# ------------------------------------------------------------------------------------------
# training with routing
# ------------------------------------------------------------------------------------------
N_TR, T_TR = 5, 7  # odd sizes: 4 history + 5 noisy chunks
L_TR, HT_TR = 63, 28  # training tokens, history tokens


def test_training_dense_spec_mask_is_contract_rule():
    q = torch.randn(1, 2, L_TR, 8)
    rm = routed_training_mask(q, q, N_TR, T_TR, RoutingSpec())
    assert isinstance(rm, RoutedTrainingMask) and rm.seq_len == L_TR
    expect = contract_training_mask(N_TR, T_TR)
    assert torch.equal(rm.dense(), expect.expand(1, 2, L_TR, L_TR))


def test_training_routed_mask_semantics():
    B, Hh, D = 2, 2, 8
    L = L_TR
    q, k = torch.randn(B, Hh, L, D), torch.randn(B, Hh, L, D)
    spec = RoutingSpec("topk", top_k=1, sink_chunks=1)
    rm = routed_training_mask(q, k, N_TR, T_TR, spec)
    ref = select_chunks_reference(q, chunk_means(k[:, :, :HT_TR], T_TR), spec, training_allowed(N_TR, T_TR))
    assert torch.equal(rm.sel, ref)
    base = contract_training_mask(N_TR, T_TR)
    dense = rm.dense()
    assert not (dense & ~base).any()  # routing only removes keys
    seg = torch.arange(L) // T_TR
    assert dense[..., seg[:, None] == seg[None, :]].all()  # own chunk always attended
    for r in range(L):
        i = own_chunk(r, N_TR, T_TR)
        n_hist_chunks = dense[:, :, r, :HT_TR].sum(-1) // T_TR - int(r < HT_TR)
        assert (n_hist_chunks == min(i, 2)).all()
    # heads/tokens differ: not every row of the last chunk picked the same scored chunk
    last = rm.sel[:, :, -T_TR:, 1:-1]
    assert last.any() and not torch.equal(last, last[:1, :1, :1].expand_as(last))


def naive_masked_attention(q, k, v, mask):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("spec", [RoutingSpec("topk", top_k=1, window_chunks=1), RoutingSpec("window", window_chunks=2)])
def test_training_sdpa_forward_and_grads_match_naive(spec):
    B, Hh, D = 2, 2, 16
    L = L_TR
    q, k, v = (torch.randn(B, Hh, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = routed_training_attention(q, k, v, N_TR, T_TR, spec, backend="sdpa")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    # independent mask: contract rule AND routed history chunks from the reference selection
    sel = select_chunks_reference(q, chunk_means(k[:, :, :HT_TR], T_TR), spec, training_allowed(N_TR, T_TR))
    base = contract_training_mask(N_TR, T_TR)
    hist_col_chunk = torch.arange(HT_TR) // T_TR
    routed = sel[..., hist_col_chunk]  # [B,Hh,L,HT]
    own_hist = (torch.arange(L)[:, None] < HT_TR) & (
        (torch.arange(L)[:, None] // T_TR) == hist_col_chunk[None, :]
    )
    mask = base.clone().expand(B, Hh, L, L).clone()
    mask[..., :HT_TR] &= routed | own_hist
    ref = naive_masked_attention(q, k, v, mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_training_flex_forward_matches_sdpa():
    B, Hh, D = 2, 2, 16
    L = L_TR
    q, k, v = (torch.randn(B, Hh, L, D) for _ in range(3))
    spec = RoutingSpec("topk", top_k=2)
    with torch.no_grad():
        o_sdpa = routed_training_attention(q, k, v, N_TR, T_TR, spec, backend="sdpa")
        o_flex = routed_training_attention(q, k, v, N_TR, T_TR, spec, backend="flex", block_size=16)
    torch.testing.assert_close(o_flex, o_sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [4, 16])
def test_training_block_mask_structure(block_size):
    """BlockMask built from sel == create_block_mask(mask_mod); implied per-token mask == dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    B, Hh, D = 1, 2, 8
    L = L_TR
    q, k = torch.randn(B, Hh, L, D), torch.randn(B, Hh, L, D)
    rm = routed_training_mask(q, k, N_TR, T_TR, RoutingSpec("topk", top_k=1, sink_chunks=1))
    bm = rm.block_mask(block_size)
    ref = create_block_mask(rm.mask_mod(), B, Hh, L, L, device="cpu", BLOCK_SIZE=block_size)
    assert torch.equal(bm.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(bm.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert torch.equal(bm.to_dense(), ref.to_dense())
    if block_size == 4:
        assert bm.full_kv_num_blocks.sum() > 0  # full blocks exist and are exact
    # what the flex kernel computes: full blocks -> all True, partial blocks -> mask_mod, else False
    nb = -(-L // block_size)

    def expand(num, idx):
        dense = torch.zeros(B, Hh, nb, nb, dtype=torch.bool)
        for b in range(B):
            for h in range(Hh):
                for r in range(nb):
                    dense[b, h, r, idx[b, h, r, : num[b, h, r]].long()] = True
        return dense.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :L, :L]

    per_token = create_mask(rm.mask_mod(), B, Hh, L, L, device="cpu")
    implied = expand(bm.full_kv_num_blocks, bm.full_kv_indices) | (
        expand(bm.kv_num_blocks, bm.kv_indices) & per_token
    )
    assert torch.equal(implied, rm.dense())


def test_training_input_errors():
    q = torch.randn(1, 2, 60, 8)
    with pytest.raises(ValueError, match=r"\(2\*num_chunks-1\)\*chunk_tokens = 63 tokens"):
        routed_training_mask(q, q, N_TR, T_TR, RoutingSpec())
    with pytest.raises(ValueError, match="backend"):
        routed_training_attention(q, q, q, 5, 6, RoutingSpec(), backend="flash")


@pytest.mark.parametrize("N, T, Lc, block_size", [(3, 7, 7, 4), (4, 13, 9, 16), (0, 7, 7, 4)])
def test_inference_block_mask_structure_and_flex(N, T, Lc, block_size):
    """routed_block_mask == create_block_mask(mask_mod); flex forward with it == routed reference."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, Hh, D = 2, 2, 16
    q, kh, vh, kc, vc = rand_attn_inputs(B, Hh, N, T, Lc, D)
    sel = torch.rand(B, Hh, Lc, N) > 0.5
    if N:
        sel[0, 0, :, 0] = True  # some full blocks
    bm = routed_block_mask(sel, T, Lc, block_size)
    ref = create_block_mask(bm.mask_mod, B, Hh, Lc, N * T + Lc, device="cpu", BLOCK_SIZE=block_size)
    assert torch.equal(bm.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(bm.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert torch.equal(bm.to_dense(), ref.to_dense())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, torch.cat([kh, kc], 2), torch.cat([vh, vc], 2), block_mask=bm)
    ref_o, _ = routed_attention_reference(q, kh, vh, kc, vc, sel, T)
    torch.testing.assert_close(out, ref_o, atol=1e-5, rtol=1e-5)


def test_training_routing_of_a_one_chunk_sequence_is_plain_attention():
    """N = 1: the training sequence is Q_1 alone (its history chunk H_1 is never attended and left out);
    routing has no history to pick from, with SDPA and FlexAttention alike."""
    q, k, v = (torch.randn(1, 2, 7, 8) for _ in range(3))
    spec = RoutingSpec("topk", top_k=1)
    assert training_allowed(1, 7).shape == (7, 0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(routed_training_attention(q, k, v, 1, 7, spec, backend="sdpa"), ref)
    with torch.no_grad():
        out = routed_training_attention(q, k, v, 1, 7, spec, backend="flex", block_size=16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
