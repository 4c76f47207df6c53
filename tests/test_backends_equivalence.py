"""Attention backends give the same results, through the public APIs.

1. `sampler.sample` with SamplingOptions(backend="sdpa" | "triton") gives the same latents (fp32
   tolerance), dense, top-k and sliding-window routing. On CPU the Triton kernels run under TRITON_INTERPRET=1
   (tests/conftest.py); the test checks that the routed Triton kernel really ran. "flex" on CPU runs
   SDPA and the torch routing path (its kernels are CUDA's; the flex masks are section 2's): checked as
   the path it takes, not as an equivalence with itself. Options without a backend resolve "auto".
2. Training with routing on (`MaskedAttention(..., routing=RoutingSpec("topk", top_k=1))`): loss and
   the gradients of every parameter equal an independent reference attention op (explicit softmax
   with a mask built here from the CONTRACTS.md rule), and differ from dense attention; also with
   routing in some blocks only (`routing_layers`). The FlexAttention training forward at its default
   block size equals the SDPA one (CPU: forward only).
"""
from __future__ import annotations

import math

import pytest
import torch

from resampling_forcing.attention.backends import kernels, resolve_backend
from resampling_forcing.attention.masks import MaskSpec, dense_mask
from resampling_forcing.attention.ops import MaskedAttention
from resampling_forcing.attention.routing import RoutingSpec, routed_training_mask
from resampling_forcing.attention.routed_training import RoutedTrainingMask, routed_training_attention
from resampling_forcing.sampler import SamplingOptions, sample
from helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 2, 14  # 1 x 7 tokens per latent frame (patch 2)




# ------------------------------------------------------------------------------------------
# 1. sampler: sdpa == triton; flex on CPU is sdpa's path
# ------------------------------------------------------------------------------------------
def _rollout(model, backend, routing, chunks=3):
    g = torch.Generator().manual_seed(7)
    ctx, neg = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    opts = SamplingOptions(steps=2, cfg_scale=2.0, routing=routing, backend=resolve_backend(backend, "cpu"))
    return sample(model, ctx, chunks, (H, W), neg_context=neg, options=opts, seed=3).latents


def _triton_kernels():
    kern = kernels()
    assert kern is not None and kern.is_interpreted(), "needs triton with TRITON_INTERPRET=1 (tests/conftest.py)"
    return kern


@pytest.mark.parametrize("routing", [None, RoutingSpec("topk", top_k=1), RoutingSpec("window", window_chunks=1)],
                         ids=["dense", "topk1", "window1"])
def test_sampler_same_latents_for_all_backends(routing, monkeypatch):
    kern = _triton_kernels()
    calls = []
    fwd = kern.routed_attention_fwd
    monkeypatch.setattr(kern, "routed_attention_fwd", lambda *a, **k: calls.append(1) or fwd(*a, **k))
    model = tiny_model()  # 2 frames per chunk: T = 14; batch 2 in the cache (CFG halves)
    lat = {b: _rollout(model, b, routing) for b in ("sdpa", "triton")}
    assert lat["sdpa"].shape == (1, 4, 3 * 2, H, W) and torch.isfinite(lat["sdpa"]).all()
    # fp32: measured max error 6e-7, ~6% of this tolerance
    torch.testing.assert_close(lat["triton"], lat["sdpa"], rtol=1e-5, atol=1e-5)
    if routing is None:
        assert not calls
    else:
        assert calls, "backend='triton' did not run the routed Triton kernel"
        # routing is really on: the result differs from dense attention (chunk 3 drops a history chunk)
        assert (lat["sdpa"] - _rollout(model, "sdpa", None)).abs().max() > 1e-3


def test_flex_and_auto_on_cpu_take_the_sdpa_and_torch_paths(monkeypatch):
    """On CPU "flex" (and options without a backend, "auto") run SDPA and the torch routing path, never the
    kernel: the same latents as sdpa, bit for bit, because they are the same code here."""
    from resampling_forcing.attention.routed import last_routed_path

    kern = _triton_kernels()
    monkeypatch.setattr(kern, "routed_attention_fwd", lambda *a, **k: pytest.fail("the kernel ran on CPU flex/auto"))
    model, topk = tiny_model(), RoutingSpec("topk", top_k=1)
    want = _rollout(model, "sdpa", topk)
    assert torch.equal(_rollout(model, "flex", topk), want) and last_routed_path() == "torch"
    g = torch.Generator().manual_seed(7)
    ctx, neg = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    auto = sample(model, ctx, 3, (H, W), neg_context=neg, seed=3,
                  options=SamplingOptions(steps=2, cfg_scale=2.0, routing=topk)).latents
    assert torch.equal(auto, want)
    with pytest.raises(ValueError, match="backend 'flsh' is unknown"):
        SamplingOptions(backend="flsh")


# ------------------------------------------------------------------------------------------
# 2. training with routing: fast path == independent reference (loss and all gradients)
# ------------------------------------------------------------------------------------------
class ReferenceRoutedTop1:
    """Attention op for the dual layout [H_1..H_{N-1} | Q_1..Q_N] with top-1 routing, written from
    method.md section 6 / CONTRACTS.md: token of chunk i (either stream) attends its own chunk (same
    stream) and the ONE history chunk H_j, j < i, maximising q . mean(K_j) (lowest j on ties)."""

    def __init__(self, N, T):
        self.N, self.T = N, T
        self.masks = []

    def mask(self, q, k):
        N, T = self.N, self.T
        Nh = N - 1  # history chunks: H_N is left out of the layout
        L = (Nh + N) * T
        with torch.no_grad():
            mk = k[:, :, : Nh * T].float().unflatten(2, (Nh, T)).mean(3).double()  # [B,Hh,Nh,D]
            s = q.double() @ mk.transpose(-1, -2)  # [B,Hh,L,Nh]
            r = torch.arange(L)
            own = torch.where(r < Nh * T, r, r - Nh * T) // T  # chunk index of each token
            allowed = torch.arange(Nh)[None, :] < own[:, None]  # [L, Nh]: H_j with j < i
            s = s.masked_fill(~allowed, float("-inf"))
            best = torch.argmax(s, dim=-1)  # first maximum = lowest index on ties
            has = allowed.any(-1)  # chunk 0 has no history
            c = torch.arange(L)
            same = (c[None, :] // T) == (r[:, None] // T)  # same stream and same chunk
            routed = (c < Nh * T) & ((c // T) == best[..., None]) & has[:, None]  # [B,Hh,L,L]
            return same | routed  # [B,Hh,L,L]

    def __call__(self, q, k, v, layer):
        m = self.mask(q, k)
        self.masks.append(m)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1) @ v


def _loss_and_grads(model, attn, data):
    hist, noisy, t, ctx, target = data
    v = model.forward_dual(hist, noisy, t, ctx, attn=attn)
    loss = ((v - target) ** 2).mean()
    params = [p for p in model.parameters()]
    return loss.detach(), torch.autograd.grad(loss, params)


def _training_data(N, seed=11):
    """(history, noisy, t, context, target) of a 2-video batch of N one-frame chunks."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, N, H, W, generator=g), torch.randn(2, 4, N, H, W, generator=g),
            torch.rand(2, N, generator=g), torch.randn(2, 5, 8, generator=g), torch.randn(2, 4, N, H, W, generator=g))


# fp32 loss / gradients, fast path vs reference op. Measured: loss equal; gradients (up to ~0.2) off by at
# most 1.5e-8 (3e-8 with routing_layers), ~12% of GRAD_TOL's allowance, i.e. a margin of about 10x
LOSS_TOL = dict(rtol=1e-5, atol=1e-7)
GRAD_TOL = dict(rtol=1e-6, atol=1e-7)


def test_training_routing_fast_path_equals_reference_loss_and_grads():
    N = 4
    model = tiny_model(chunk_frames=1).train().requires_grad_(True)  # T = 7 (odd)
    T = model.chunk_tokens(H, W)
    assert T % 2 == 1
    data = _training_data(N)
    spec = RoutingSpec("topk", top_k=1)
    fast = MaskedAttention(MaskSpec("dual", N, T), "sdpa", routing=spec)
    ref = ReferenceRoutedTop1(N, T)
    loss_f, grads_f = _loss_and_grads(model, fast, data)
    loss_r, grads_r = _loss_and_grads(model, ref, data)
    torch.testing.assert_close(loss_f, loss_r, **LOSS_TOL)
    names = [n for n, _ in model.named_parameters()]
    assert len(grads_f) == len(names) and any(gr.abs().sum() > 0 for gr in grads_f)
    for n, a, b in zip(names, grads_f, grads_r):
        torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m: f"grad of {n}: {m}")

    # the library's mask is the reference mask (per layer, on the reference run's q, k)
    def capture(q, k, v, layer):
        m = routed_training_mask(q, k, N, T, spec).dense()
        assert torch.equal(m, ref.mask(q, k)), f"layer {layer}"
        return ref(q, k, v, layer)

    with torch.no_grad():
        model.forward_dual(*data[:4], attn=capture)

    # routing changes the result: dense attention gives another loss and other gradients
    loss_d, grads_d = _loss_and_grads(model, MaskedAttention(MaskSpec("dual", N, T), "sdpa"), data)
    assert abs(float(loss_d - loss_f)) > 1e-5
    assert max(float((a - b).abs().max()) for a, b in zip(grads_f, grads_d)) > 1e-4
    # the routed mask is a strict subset of the dense dual mask: some tokens drop history chunks
    base = dense_mask(MaskSpec("dual", N, T), "cpu")
    for m in ref.masks:
        assert not (m & ~base).any() and (base & ~m).any()


def test_training_routing_layers_route_only_the_listed_blocks():
    """attention.routing.layers = [1] in training (MaskedAttention(..., routing_layers=[1])): block 1 routes
    (top-1) and block 0 attends under the plain dual mask. Loss and every gradient equal a reference op
    doing exactly that (ReferenceRoutedTop1 in block 1, explicit softmax under the dual mask in block 0),
    and differ from routing in every block and from no routing at all."""
    N = 4
    model = tiny_model(chunk_frames=1).train().requires_grad_(True)  # T = 7, 2 blocks
    assert model.cfg.num_layers == 2
    T = model.chunk_tokens(H, W)
    data = _training_data(N)
    spec = RoutingSpec("topk", top_k=1)
    routed = ReferenceRoutedTop1(N, T)
    base = dense_mask(MaskSpec("dual", N, T), "cpu")  # [L, L]

    def ref(q, k, v, layer):
        if layer == 1:
            return routed(q, k, v, layer)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return torch.softmax(s.masked_fill(~base, float("-inf")), dim=-1) @ v

    fast = MaskedAttention(MaskSpec("dual", N, T), "sdpa", routing=spec, routing_layers=[1])
    loss_f, grads_f = _loss_and_grads(model, fast, data)
    loss_r, grads_r = _loss_and_grads(model, ref, data)
    assert len(routed.masks) == 1  # the reference routed one block of one forward
    torch.testing.assert_close(loss_f, loss_r, **LOSS_TOL)
    for (n, _), a, b in zip(model.named_parameters(), grads_f, grads_r):
        torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m: f"grad of {n}: {m}")
    # the layer list matters: routing in both blocks, or in none, gives other gradients
    for other in (MaskedAttention(MaskSpec("dual", N, T), "sdpa", routing=spec),
                  MaskedAttention(MaskSpec("dual", N, T), "sdpa")):
        loss_o, grads_o = _loss_and_grads(model, other, data)
        assert abs(float(loss_o - loss_f)) > 1e-5
        assert max(float((a - b).abs().max()) for a, b in zip(grads_f, grads_o)) > 1e-4


@pytest.mark.parametrize("N, T", [(4, 7), (5, 37), (7, 50)], ids=["L49", "L333", "L650"])
def test_routed_training_flex_at_default_block_size_equals_sdpa(N, T, monkeypatch):
    """routed_training_attention(backend="flex") at its default BlockMask block size (128: what training
    runs on CUDA; the other tests use 4 or 16) equals the SDPA forward with the dense mask: L = (2N-1) T
    of one partial block (49), and of several blocks spanning several chunks with a partial last one
    (333, 650). Forward only: FlexAttention has no backward on CPU. Its BlockMask, built from pair
    counts, also classifies every tile as create_block_mask does: a miscount that leaves a tile partial
    (mask_mod applied) keeps the output exact, and an off-by-one-chunk count passed the output check."""
    from torch.nn.attention.flex_attention import create_block_mask

    sizes = []
    orig = RoutedTrainingMask.block_mask
    monkeypatch.setattr(RoutedTrainingMask, "block_mask",
                        lambda self, block_size: sizes.append(block_size) or orig(self, block_size))
    L = (2 * N - 1) * T
    g = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(2, 2, L, 16, generator=g) for _ in range(3))  # [B, Hh, L, D]
    spec = RoutingSpec("topk", top_k=1, sink_chunks=1)
    with torch.no_grad():
        want = routed_training_attention(q, k, v, N, T, spec, backend="sdpa")
        got = routed_training_attention(q, k, v, N, T, spec, backend="flex")
    assert sizes == [128]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rm = routed_training_mask(q, k, N, T, spec)
    # routing drops history here (the last chunk keeps sink + top-1 of its N - 1 >= 3 candidates)
    assert not rm.sel[..., (2 * N - 2) * T:, :].all()
    bm = rm.block_mask(sizes[0])
    ref = create_block_mask(rm.mask_mod(), 2, 2, L, L, device="cpu", BLOCK_SIZE=sizes[0])
    assert torch.equal(bm.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(bm.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert torch.equal(bm.to_dense(), ref.to_dense())


# ------------------------------------------------------------------------------------------
# 3. one dispatch: selection follows the configured backend, at inference and in training
# ------------------------------------------------------------------------------------------
EXPECTED_PATH = {"sdpa": "torch", "flex": "auto", "triton": "triton"}


@pytest.mark.parametrize("backend", sorted(EXPECTED_PATH))
def test_rollout_selection_and_attention_take_the_configured_path(backend, monkeypatch):
    """Issue 15's bug: with attention.backend=sdpa the cache's selection ran with the default path
    ("auto": the Triton kernel on CUDA). Now selection and routed attention get the same path from
    attention.backends, and the Triton selection kernel runs exactly when the backend asks for it."""
    import resampling_forcing.cache as cache_mod

    kern = _triton_kernels()
    seen = {"select": set(), "attend": set()}
    kernel_calls = []
    sel_fn, att_fn, kern_sel = cache_mod.select_chunks, cache_mod.routed_attention, kern.routing_select
    monkeypatch.setattr(cache_mod, "select_chunks",
                        lambda *a, backend, **k: seen["select"].add(backend) or sel_fn(*a, backend=backend, **k))
    monkeypatch.setattr(cache_mod, "routed_attention",
                        lambda *a, backend, **k: seen["attend"].add(backend) or att_fn(*a, backend=backend, **k))
    monkeypatch.setattr(kern, "routing_select", lambda *a, **k: kernel_calls.append(1) or kern_sel(*a, **k))
    lat = _rollout(tiny_model(), backend, RoutingSpec("topk", top_k=1), chunks=4)
    assert torch.isfinite(lat).all()
    assert seen["select"] == seen["attend"] == {EXPECTED_PATH[backend]}
    assert bool(kernel_calls) == (backend == "triton")


@pytest.mark.parametrize("backend", sorted(EXPECTED_PATH))
def test_training_selection_takes_the_configured_path(backend, monkeypatch):
    import resampling_forcing.attention.routed_training as rt

    seen = []
    orig = rt.select_chunks
    monkeypatch.setattr(rt, "select_chunks", lambda *a, backend, **k: seen.append(backend) or orig(*a, backend=backend, **k))
    N, model = 3, tiny_model(chunk_frames=1)
    T = model.chunk_tokens(H, W)
    g = torch.Generator().manual_seed(5)
    hist, noisy = torch.randn(1, 4, N, H, W, generator=g), torch.randn(1, 4, N, H, W, generator=g)
    op = MaskedAttention(MaskSpec("dual", N, T), resolve_backend(backend, "cpu"), routing=RoutingSpec("topk", top_k=1))
    with torch.no_grad():
        out = model.forward_dual(hist, noisy, torch.rand(1, N, generator=g), torch.randn(1, 5, 8, generator=g), attn=op)
    assert torch.isfinite(out).all()
    assert seen and set(seen) == {EXPECTED_PATH[backend]}
