"""Triton kernels (routed attention, fused routing) under TRITON_INTERPRET=1 (fp32 and fp16, tiny sizes).

bf16 is not tested here: tl.dot in bf16 is wrong in the interpreter (bench/kernels.py checks it on GPU).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resampling_forcing import kernels as K
from resampling_forcing.kernels import routed_attention as kernel_module
from resampling_forcing.attention.reference import routed_attention_reference, select_chunks_reference  # the plain twins
from resampling_forcing.attention.routing import (
    RoutingSpec,
    chunk_means,
    routed_attention,
    select_chunks,
    training_allowed,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_runs_here():
    """Triton is a dependency: the kernels must run (CUDA, or the interpreter that conftest sets)."""
    assert K.HAS_TRITON, "triton is not installed; `make setup` installs it"
    assert DEVICE == "cuda" or K.is_interpreted(), "set TRITON_INTERPRET=1 before importing (tests/conftest.py)"

REPO = Path(__file__).resolve().parents[1]

# fp16: probabilities are cast to fp16 for P@V and the output is rounded to fp16, both 2^-11 relative
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
# lse: fp32 accumulation of exact products in both dtypes; measured max error 9.5e-7 (2 fp32 ulps at
# |lse| ~ 5), at most ~11% of this allowance
LSE_TOL = dict(atol=3e-6, rtol=1e-6)


def rand_inputs(B, Hh, N, T, Lc, D, dtype, Lq=None):
    Lq = Lc if Lq is None else Lq
    g = lambda L: torch.randn(B, Hh, L, D, device=DEVICE).to(dtype)  # noqa: E731
    return g(Lq), g(N * T), g(N * T), g(Lc), g(Lc)


def plain_attention(q, K_, V_):
    s = q.double() @ K_.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1) @ V_.double(), torch.logsumexp(s, -1)


def check_kernel(q, kh, vh, kc, vc, sel, T, **kw):
    out, lse = K.routed_attention_fwd(q, kh, vh, kc, vc, sel, T, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and out.shape == q.shape
    ref_o, ref_l = routed_attention_reference(q, kh, vh, kc if kc is not None else q[:, :, :0],
                                              vc if vc is not None else q[:, :, :0], sel, T)
    torch.testing.assert_close(out.float(), ref_o.float(), **TOL[q.dtype])
    torch.testing.assert_close(lse, ref_l, **LSE_TOL)
    return out, lse


# ------------------------------------------------------------------------------------------
# routed attention kernel
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T, N, D", [(7, 3, 16), (13, 2, 32), (100, 2, 16),
                                     # head dims below 16 or not a power of two: the kernel pads D up to
                                     # BLOCK_D = max(16, next_pow2(D)) and only its head-dim masks keep the
                                     # padding out of the scores (hence lse) and the output
                                     (7, 3, 5), (7, 2, 24), (5, 2, 40), (7, 2, 80)])
def test_kernel_matches_reference_random_per_token_selection(T, N, D, dtype):
    """Output and lse (check_kernel) equal the reference for random per-token selections, with the
    special rows below."""
    B, Hh = 2, 2
    q, kh, vh, kc, vc = rand_inputs(B, Hh, N, T, T, D, dtype)
    sel = torch.rand(B, Hh, T, N, device=DEVICE) > 0.5
    sel[0, 0, :, 0] = False  # a (batch, head) that skips chunk 0 entirely (block-level skip)
    sel[1, 1, 0] = False  # a row with no history
    sel[1, 0, 1] = True  # a row with all history
    check_kernel(q, kh, vh, kc, vc, sel, T)


def test_kernel_block_sizes_not_dividing_chunks():
    q, kh, vh, kc, vc = rand_inputs(1, 2, 3, 13, 11, 16, torch.float32, Lq=19)
    sel = torch.rand(1, 2, 19, 3, device=DEVICE) > 0.3
    check_kernel(q, kh, vh, kc, vc, sel, 13, block_m=16, block_n=16)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_at_the_gpu_tile_sizes(D, dtype):
    """The tiles the kernel uses on a GPU (not the interpreter's 32 x 32), at Wan's head dims: two row blocks
    (Lq = 150 > BLOCK_M = 128 or 64) and key tiles straddling chunk boundaries (T = 150, Lc = 70): the
    masks of a partial last block of rows and of key columns inside a tile are the ones a GPU runs."""
    bm, bn, nw, ns = kernel_module._default_config(D, interpreted=False, fp32=dtype == torch.float32)
    assert (bm, bn) != kernel_module._default_config(D, interpreted=True)[:2]
    q, kh, vh, kc, vc = rand_inputs(1, 2, 3, 150, 70, D, dtype, Lq=150)
    sel = torch.rand(1, 2, 150, 3, device=DEVICE) > 0.5
    sel[0, 1, 3] = False  # a row with no history
    check_kernel(q, kh, vh, kc, vc, sel, 150, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)


def test_kernel_head_dim_64_fp16():
    q, kh, vh, kc, vc = rand_inputs(1, 2, 2, 9, 9, 64, torch.float16)
    sel = torch.rand(1, 2, 9, 2, device=DEVICE) > 0.5
    check_kernel(q, kh, vh, kc, vc, sel, 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_topk1_and_k_larger_than_history(dtype):
    B, Hh, N, T, D = 2, 2, 3, 7, 16
    q, kh, vh, kc, vc = rand_inputs(B, Hh, N, T, T, D, dtype)
    mk = chunk_means(kh, T)
    sel1 = select_chunks(q, mk, RoutingSpec("topk", top_k=1), backend="triton")
    assert torch.equal(sel1, select_chunks_reference(q, mk, RoutingSpec("topk", top_k=1)))
    assert (sel1.sum(-1) == 1).all()
    check_kernel(q, kh, vh, kc, vc, sel1, T)
    sel_all = select_chunks(q, mk, RoutingSpec("topk", top_k=N + 2), backend="triton")
    assert sel_all.all()
    out, lse = routed_attention(q, kh, vh, kc, vc, sel_all, T, backend="triton")
    o, l = plain_attention(q, torch.cat([kh, kc], 2), torch.cat([vh, vc], 2))
    torch.testing.assert_close(out.double(), o, **TOL[dtype])
    torch.testing.assert_close(lse.double(), l, **LSE_TOL)


def test_kernel_heads_pick_different_chunks():
    B, Hh, N, T, D = 1, 2, 3, 7, 16
    q, kh, vh, kc, vc = rand_inputs(B, Hh, N, T, T, D, torch.float32)
    kh = kh * 0.1
    kh[0, 0, 0:T, 0] += 3.0  # chunk 0 mean key points along e_0 in head 0
    kh[0, 1, 2 * T:3 * T, 1] += 3.0  # chunk 2 mean key points along e_1 in head 1
    q[0, 0, :, 0] = q[0, 0, :, 0].abs() + 2.0
    q[0, 1, :, 1] = q[0, 1, :, 1].abs() + 2.0
    sel = select_chunks(q, chunk_means(kh, T), RoutingSpec("topk", top_k=1), backend="triton")
    assert sel[0, 0, :, 0].all() and sel[0, 1, :, 2].all()
    assert not torch.equal(sel[0, 0], sel[0, 1])
    out, _ = check_kernel(q, kh, vh, kc, vc, sel, T)
    # and the two heads really attended different chunks: swapping the selection changes the output
    out_sw, _ = K.routed_attention_fwd(q, kh, vh, kc, vc, sel.flip(1), T)
    assert (out - out_sw).abs().max() > 1e-3


def test_kernel_single_chunk_no_history_no_current():
    B, Hh, T, D = 2, 2, 7, 16
    q, kh, vh, kc, vc = rand_inputs(B, Hh, 1, T, T, D, torch.float32)
    check_kernel(q, kh, vh, kc, vc, torch.rand(B, Hh, T, 1, device=DEVICE) > 0.5, T)
    empty = kh[:, :, :0]
    out, lse = check_kernel(q, empty, empty, kc, vc, torch.zeros(B, Hh, T, 0, dtype=torch.bool, device=DEVICE), T)
    o, l = plain_attention(q, kc, vc)
    torch.testing.assert_close(out.double(), o, **TOL[torch.float32])
    # history only (no current chunk): rows that selected nothing give out 0 and lse -inf
    sel = torch.rand(B, Hh, T, 1, device=DEVICE) > 0.5
    sel[0, 0, 0] = False
    out, lse = check_kernel(q, kh, vh, None, None, sel, T)
    assert lse[0, 0, 0] == float("-inf") and (out[0, 0, 0] == 0).all()


def test_kernel_reads_strided_kv_cache_in_place():
    """History as views of a pre-allocated cache: capacity slice, and a [B, L, Hh, D] layout."""
    B, Hh, N, T, D, cap = 1, 2, 3, 7, 16, 40
    q, _, _, kc, vc = rand_inputs(B, Hh, N, T, T, D, torch.float32)
    cache_k = torch.randn(B, Hh, cap, D, device=DEVICE)
    cache_v = torch.randn(B, cap, Hh, D, device=DEVICE).transpose(1, 2)  # heads-second view, non-contiguous
    kh, vh = cache_k[:, :, : N * T], cache_v[:, :, : N * T]
    assert not kh.is_contiguous() or not vh.is_contiguous()
    sel = torch.rand(B, Hh, T, N, device=DEVICE) > 0.5
    out, lse = check_kernel(q, kh, vh, kc, vc, sel, T)
    out_c, lse_c = K.routed_attention_fwd(q, kh.contiguous(), vh.contiguous(), kc, vc, sel, T)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


def test_routed_attention_backend_triton_matches_torch_backend():
    B, Hh, N, T, D = 2, 2, 4, 7, 16
    q, kh, vh, kc, vc = rand_inputs(B, Hh, N, T, T, D, torch.float16)
    spec = RoutingSpec("topk", top_k=2, sink_chunks=1)
    mk = chunk_means(kh, T)
    sel = select_chunks(q, mk, spec, backend="triton")
    assert torch.equal(sel, select_chunks(q, mk, spec, backend="torch"))
    o_t, l_t = routed_attention(q, kh, vh, kc, vc, sel, T, backend="triton")
    o_p, l_p = routed_attention(q, kh, vh, kc, vc, sel, T, backend="torch")
    torch.testing.assert_close(o_t.float(), o_p.float(), **TOL[torch.float16])
    torch.testing.assert_close(l_t, l_p, **LSE_TOL)


def test_triton_backend_is_forward_only():
    q, kh, vh, kc, vc = rand_inputs(1, 2, 2, 5, 5, 16, torch.float32)
    sel = torch.ones(1, 2, 5, 2, dtype=torch.bool, device=DEVICE)
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="forward only"):
        routed_attention(q, kh, vh, kc, vc, sel, 5, backend="triton")
    out, _ = routed_attention(q, kh, vh, kc, vc, sel, 5, backend="auto")  # torch path, differentiable
    out.sum().backward()
    assert q.grad is not None
    with torch.no_grad():
        routed_attention(q, kh, vh, kc, vc, sel, 5, backend="triton")


def test_kernel_input_errors():
    q, kh, vh, kc, vc = rand_inputs(1, 2, 3, 4, 4, 16, torch.float32)
    sel = torch.ones(1, 2, 4, 3, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="chunk_tokens"):
        K.routed_attention_fwd(q, kh, vh, kc, vc, sel, 5)
    with pytest.raises(ValueError, match="sel must be a bool tensor"):
        K.routed_attention_fwd(q, kh, vh, kc, vc, sel.int(), 4)
    with pytest.raises(ValueError, match="sel must be a bool tensor"):
        K.routed_attention_fwd(q, kh, vh, kc, vc, sel[:, :1], 4)
    with pytest.raises(TypeError, match="dtype"):
        K.routed_attention_fwd(q, kh.half(), vh, kc, vc, sel, 4)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        K.routed_attention_fwd(q.double(), kh.double(), vh.double(), kc.double(), vc.double(), sel, 4)
    with pytest.raises(ValueError, match="k_cur"):
        K.routed_attention_fwd(q, kh, vh, kc, None, sel, 4)
    with pytest.raises(ValueError, match="allowed"):
        K.routing_select(q, chunk_means(kh, 4), RoutingSpec("topk", top_k=1),
                         allowed=torch.ones(4, 2, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="RoutingSpec"):
        K.routing_select(q, chunk_means(kh, 4), "topk")  # the spec carries mode and top_k, checked once


# ------------------------------------------------------------------------------------------
# fused routing kernel
# ------------------------------------------------------------------------------------------
SPECS = [
    RoutingSpec(),
    RoutingSpec("topk", top_k=1),
    RoutingSpec("topk", top_k=2, sink_chunks=1, window_chunks=1),
    RoutingSpec("topk", top_k=3, window_chunks=2),
    RoutingSpec("topk", top_k=50),
    RoutingSpec("window", window_chunks=2),
    RoutingSpec("window", sink_chunks=1, window_chunks=1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N", [1, 5, 9])
def test_routing_select_kernel_exact(N, dtype):
    B, Hh, Lq, D = 2, 2, 37, 16
    q = torch.randn(B, Hh, Lq, D, device=DEVICE).to(dtype)
    mk = chunk_means(torch.randn(B, Hh, N * 3, D, device=DEVICE).to(dtype), 3)
    allowed_opts = [None, torch.rand(Lq, N, device=DEVICE) > 0.4]
    for allowed in allowed_opts:
        for spec in SPECS:
            got = select_chunks(q, mk, spec, allowed, backend="triton")
            ref = select_chunks_reference(q, mk, spec, allowed)
            assert got.dtype == torch.bool and got.shape == ref.shape
            assert torch.equal(got, ref), (spec, allowed is None)


def test_routing_select_kernel_training_allowed_and_ties():
    N, T, D = 6, 3, 8  # 5 history + 6 noisy chunks
    L = (2 * N - 1) * T
    q = torch.randint(-3, 4, (2, 2, L, D), device=DEVICE).float()
    base = torch.randint(-3, 4, (2, 2, 2, D), device=DEVICE).float()
    mk = base[:, :, [0, 1, 0, 1, 0]]  # many exact ties
    allowed = training_allowed(N, T, DEVICE)
    assert allowed.shape == (L, 5)
    for spec in SPECS:
        got = select_chunks(q, mk, spec, allowed, backend="triton")
        assert torch.equal(got, select_chunks_reference(q, mk, spec, allowed)), spec
    # explicit tie check: all mean keys equal -> lowest indices
    mk_eq = base[:, :, [0, 0, 0, 0, 0]]
    got = select_chunks(q, mk_eq, RoutingSpec("topk", top_k=2), backend="triton")
    assert torch.equal(got[..., :2], torch.ones_like(got[..., :2])) and not got[..., 2:].any()


def test_routing_select_kernel_empty_history():
    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    sel = select_chunks(q, torch.zeros(1, 2, 0, 16, device=DEVICE), RoutingSpec("topk", top_k=1), backend="triton")
    assert sel.shape == (1, 2, 5, 0) and sel.dtype == torch.bool


# ------------------------------------------------------------------------------------------
# benchmark script, smoke mode (interpreter, tiny shapes)
# ------------------------------------------------------------------------------------------
def test_bench_smoke(tmp_path):
    """The prepared GPU run (bench/gpu_session.sh) in its CPU smoke mode: every step's flags still parse
    and run; bench/kernels.py's checks pass and its JSON holds what the GPU session needs."""
    env = dict(os.environ, TRITON_INTERPRET="1", SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("routed_attention", "rollout"):
        assert json.loads((tmp_path / f"{name}.json").read_text()), name
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back from $OUT
    import tarfile

    with tarfile.open(tmp_path / "logs.tar.gz") as tar:  # the whole logs, one file
        log = tar.extractfile("./kernels.log").read().decode()
    assert "===== kernels exit 0" in (tmp_path / "session.log").read_text()
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert data["checks"] and all(c["ok"] for c in data["checks"]), data["checks"]
    methods = {row["method"] for row in data["timings"]}
    assert {"triton", "dense_sdpa", "flex", "gather_sdpa", "torch", "auto"} <= methods
    assert {row["pattern"] for row in data["timings"]} == {"coherent", "random"}  # one GPU run times both
    fit = data["choice_fit"]  # the per-call choice's constant, fitted from every case timed both ways
    assert fit["n"] == sum(row["method"] == "triton" for row in data["timings"]) > 0
    assert all(c["breakeven_slowdown"] > 0 and c["inflation"] >= 1 for c in fit["cases"])
    assert "| method |" in log and "TORCH_PATH_SLOWDOWN" in log


# ------------------------------------------------------------------------------------------
# the "auto" path's per-call choice between the kernel and the torch path
# ------------------------------------------------------------------------------------------
def test_routed_work_counts_kernel_blocks_and_exact_pairs():
    """routed_work == a count by hand: per block of `rows` queries, the chunks any of them selected
    (the whole block pays for each, padding rows too), against each token's own picks."""
    from resampling_forcing.attention.routed import routed_work

    g = torch.Generator().manual_seed(3)
    B, Hh, Lq, N, T, Lc, rows = 2, 3, 11, 6, 7, 9, 4
    sel = torch.rand(B, Hh, Lq, N, generator=g) < 0.3
    kernel = exact = 0
    for b in range(B):
        for h in range(Hh):
            for s0 in range(0, Lq, rows):
                union = {j for t in range(s0, min(s0 + rows, Lq)) for j in range(N) if sel[b, h, t, j]}
                kernel += len(union) * rows * T
            exact += int(sel[b, h].sum()) * T
    cur = B * Hh * Lq * Lc
    assert routed_work(sel, T, Lc, rows).tolist() == [kernel + cur, exact + cur]


def test_auto_path_chooses_per_call_with_one_host_sync(monkeypatch):
    """Where the kernel runs (CUDA; here the interpreter, patched in), the auto path runs the kernel for
    coherent picks and the torch path for per-token picks that disagree (a block would visit ~every
    chunk), reading its statistics in the torch plan's one host sync; both equal the reference."""
    import resampling_forcing.attention.backends as BK
    import resampling_forcing.attention.routed as RT

    monkeypatch.setattr(RT, "use_routing_kernels", lambda path, x, what, **kw: path in ("auto", "triton"))
    monkeypatch.setattr(BK, "TORCH_PATH_SLOWDOWN", 4.0)  # coherent: kernel ~1.3x the exact pairs; random ~12x
    syncs = []
    orig_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: syncs.append(1) or orig_tolist(self))
    B, Hh, N, T, D = 1, 2, 40, 5, 16
    Lq = 2 * K.block_rows(D) + 9  # blocks of the kernel's size on this device (a partial one too)
    q, kh, vh, kc, vc = rand_inputs(B, Hh, N, T, T, D, torch.float32, Lq=Lq)
    coherent = torch.zeros(B, Hh, Lq, N, dtype=torch.bool, device=DEVICE)
    coherent[..., 3] = True
    random = torch.nn.functional.one_hot(torch.randint(0, N, (B, Hh, Lq), generator=torch.Generator().manual_seed(0)),
                                         N).bool().to(DEVICE)
    for sel, path in ((coherent, "triton"), (random, "torch")):
        syncs.clear()
        out, lse = routed_attention(q, kh, vh, kc, vc, sel, T, backend="auto")
        assert RT.last_routed_path() == path and len(syncs) == 1
        ref_o, ref_l = routed_attention_reference(q, kh, vh, kc, vc, sel, T)
        torch.testing.assert_close(out, ref_o.float(), **TOL[torch.float32])
        torch.testing.assert_close(lse, ref_l, **LSE_TOL)
    monkeypatch.setattr(BK, "TORCH_PATH_SLOWDOWN", 1e9)  # the torch path never pays: the kernel always
    routed_attention(q, kh, vh, kc, vc, random, T, backend="auto")
    assert RT.last_routed_path() == "triton"
    RT._LAST_PATH[0] = "-"
    syncs.clear()
    routed_attention(q, kh, vh, kc, vc, random, T, backend="triton")  # forced: no choice, no sync
    assert RT.last_routed_path() == "triton" and syncs == []


def test_auto_path_leaves_fp32_routed_attention_to_torch(monkeypatch):
    """On CUDA the auto path runs the routed-attention kernel for bf16/fp16 only (its fp32 variant has no
    tensor cores and spills registers at head dim 128); selection runs the kernel in every dtype; an
    explicit triton backend keeps the kernel for fp32 too."""
    from types import SimpleNamespace

    import resampling_forcing.attention.backends as BK

    monkeypatch.setattr(BK, "kernels", lambda: SimpleNamespace(is_interpreted=lambda: False))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = SimpleNamespace(is_cuda=True, dtype=dtype)
        assert BK.use_routing_kernels("auto", x, "select_chunks")
        assert BK.use_routing_kernels("auto", x, "routed_attention", fp32=False) == (dtype != torch.float32)
        assert BK.use_routing_kernels("triton", x, "routed_attention", fp32=False)
        assert not BK.use_routing_kernels("auto", SimpleNamespace(is_cuda=False, dtype=dtype), "routed_attention")


# Triton compiles a kernel variant per specialization of its integer arguments ("== 1", "divisible by
# 16"); the history length N and the strides of sel change with every chunk of a rollout. Computed with
# Triton's own binder (compiled kernels, no GPU needed: meta tensors, the launch is intercepted).
_SPECIALIZATIONS = r"""
import inspect, json, sys, torch
from triton.backends.compiler import BaseBackend
from triton.runtime import jit
from resampling_forcing import kernels as K
from resampling_forcing.kernels import routed_attention as kernel_module
from resampling_forcing.attention.spec import RoutingSpec
import importlib
RA = importlib.import_module("resampling_forcing.kernels.routed_attention")
RS = importlib.import_module("resampling_forcing.kernels.routing_select")
seen = {}
def intercept(name, kern):
    binder = jit.create_function_from_signature(inspect.signature(kern.fn), kern.params, BaseBackend)
    def run(*args, grid, warmup, **kwargs):
        _, spec, options = binder(*args, **kwargs)
        seen.setdefault(name, set()).add(repr((spec, sorted(options.items()))))
    kern.run = run
intercept("routed", RA._routed_attn_fwd_kernel)
intercept("select", RS._routing_select_kernel)
RA.check_runnable = RS.check_runnable = lambda *a, **k: None  # CPU/meta tensors: nothing is launched
B, H, L, T, D = 1, 12, 4680, 4680, 128  # Wan2.1-1.3B at 480p, 3-frame chunks: 4680 = 8 * 585
blocks = set()
for n in range(2, 41):
    q = torch.empty(B, H, L, D, device="meta", dtype=torch.bfloat16)
    kh = torch.empty(B, H, n * T, D, device="meta", dtype=torch.bfloat16)
    sel = torch.empty(B, H, L, n, device="meta", dtype=torch.bool)
    K.routed_attention_fwd(q, kh, kh, q, q, sel, T)
    K.routing_select(q, torch.empty(B, H, n, D, device="meta", dtype=torch.bfloat16), RoutingSpec(mode="topk", top_k=5))
    blocks.add(max(2, 1 << (n - 1).bit_length()))
print(json.dumps({"routed": len(seen["routed"]), "select": len(seen["select"]), "block_nc": len(blocks)}))
"""


def test_kernels_compile_one_variant_per_history_length_range(tmp_path):
    """Over history lengths 2..40 at the 1.3B shape the routed kernel binds ONE specialization and the
    selection kernel one per power-of-two block of chunks (it was 4 and 13 more: a compile of 1-3 s each in
    the middle of a rollout on a fresh machine)."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", _SPECIALIZATIONS], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert counts["routed"] == 1 and counts["select"] == counts["block_nc"], counts


def test_auto_backend_routes_on_the_auto_path():
    """backend auto resolves to flex on CUDA (its routing takes the per-call choice), sdpa on CPU;
    an explicit triton keeps the kernel for every call."""
    from resampling_forcing.attention.backends import resolve_backend, routing_path

    assert resolve_backend("auto", "cpu") == "sdpa" and routing_path("sdpa") == "torch"
    assert resolve_backend("auto", "cuda") == "flex" and routing_path("flex") == "auto"
    assert routing_path("triton") == "triton"
