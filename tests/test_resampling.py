"""History degradation (resampling.py): no gradient, t_s = 0 is teacher forcing, dependence on the
weights, the KV-cache rollout equals a masked forward (also routed, and guided by CFG, for both the
autoregressive and the parallel form), and autoregressive causality."""
import copy

import pytest
import torch

from resampling_forcing.attention.masks import MaskSpec
from resampling_forcing.attention.ops import MaskedAttention
from resampling_forcing.attention.routing import RoutingSpec
from resampling_forcing.resampling import (DegradeSettings, autoregressive_resample,
                                           autoregressive_resample_reference, degrade_history,
                                           noise_augment, parallel_resample, resample_grid,
                                           sample_resample_t)
from helpers import tiny_model

N = 4  # chunks


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(model, seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, N * model.cfg.chunk_frames, 4, 4, generator=g)
    ctx = torch.randn(b, 5, 8, generator=g)
    eps = torch.randn(x.shape, generator=g)
    return x, ctx, eps


def _settings(obj, **kw):
    return DegradeSettings(objective=obj, **kw)


def test_t_s_law_and_grid():
    t = sample_resample_t(20000, 0.6, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.375) < 0.01  # shift(0.5) with s = 0.6
    grid = resample_grid(torch.tensor([0.5, 0.2]), 2)
    torch.testing.assert_close(grid, torch.tensor([[0.5, 0.25, 0.0], [0.2, 0.1, 0.0]]))


@pytest.mark.parametrize("objective", ["resampling", "parallel_resampling"])
def test_t_s_zero_is_teacher_forcing(objective):
    model = tiny_model()
    x, ctx, _ = _data(model)
    hist, t_s = degrade_history(model, x, ctx, _settings(objective, steps=2), t_s=torch.zeros(2))
    assert torch.equal(hist, x)
    tf, none = degrade_history(model, x, ctx, _settings("teacher_forcing"))
    assert tf is x and none is None


@pytest.mark.parametrize("objective", ["resampling", "parallel_resampling", "noise_augmentation"])
def test_history_carries_no_gradient(objective):
    """The history is a leaf without graph, and a backward through the training forward gives the
    same gradients as training on a constant copy of it: the resampling pass is untouched."""
    model = tiny_model().train()
    x, ctx, eps = _data(model)
    g = torch.Generator().manual_seed(1)
    hist, _ = degrade_history(model, x, ctx, _settings(objective), generator=g)
    assert not hist.requires_grad and hist.grad_fn is None
    assert all(p.grad is None for p in model.parameters())
    spec = MaskSpec("dual", N, model.chunk_tokens(4, 4))
    t = torch.rand(2, N, generator=g)
    noisy = (1 - t.repeat_interleave(2, 1)[:, None, :, None, None]) * x + t.repeat_interleave(2, 1)[:, None, :, None, None] * eps

    def grads(h):
        model.zero_grad(set_to_none=True)
        v = model.forward_dual(h, noisy, t, ctx, MaskedAttention(spec, "sdpa"))
        ((v - (eps - x)) ** 2).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(hist), grads(hist.clone())):
        assert torch.equal(a, b)


@pytest.mark.parametrize("objective", ["resampling", "parallel_resampling"])
def test_differs_from_ground_truth_and_depends_on_weights(objective):
    model = tiny_model()
    x, ctx, _ = _data(model)
    t_s = torch.tensor([0.5, 0.3])
    h1, _ = degrade_history(model, x, ctx, _settings(objective), generator=torch.Generator().manual_seed(5), t_s=t_s)
    cf = model.cfg.chunk_frames
    for i in range(N - 1):  # the last history chunk is never attended: left as ground truth
        assert (h1[:, :, i * cf:(i + 1) * cf] - x[:, :, i * cf:(i + 1) * cf]).abs().max() > 1e-3
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.blocks[0].self_attn.v.weight.add_(0.2)
    h2, _ = degrade_history(other, x, ctx, _settings(objective), generator=torch.Generator().manual_seed(5), t_s=t_s)
    assert (h1 - h2)[:, :, : (N - 1) * cf].abs().max() > 1e-4
    # same weights and seed: deterministic
    h3, _ = degrade_history(model, x, ctx, _settings(objective), generator=torch.Generator().manual_seed(5), t_s=t_s)
    assert torch.equal(h1, h3)


@pytest.mark.parametrize("steps, context_t", [(1, 0.0), (3, 0.0), (2, 0.3)])
def test_cache_rollout_equals_masked_forward(steps, context_t):
    """The KV-cache rollout equals chunk-by-chunk full forwards under the block-causal mask; with
    context_t > 0 the history positions hold the finished chunks re-noised to context_t (as the
    sampler's cache write), the returned history the clean ones."""
    model = tiny_model()
    x, ctx, eps = _data(model)
    ctx_eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    t_s = torch.tensor([0.7, 0.25])
    kw = dict(context=ctx, eps=eps, steps=steps, include_last=True, context_t=context_t, context_eps=ctx_eps)
    fast = autoregressive_resample(model, x, t_s, **kw)
    ref = autoregressive_resample_reference(model, x, t_s, **kw)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    one = fast[:, :, :2]  # first chunk, one step: x~ = z - t_s v(z, t_s)
    tb = t_s.view(-1, 1, 1, 1, 1)
    if steps == 1:
        z = (1 - tb) * x[:, :, :2] + tb * eps[:, :, :2]
        with torch.no_grad():
            v = model(z, t_s, ctx, attn=MaskedAttention(MaskSpec("block_causal", 1, 4 * 2), "sdpa"))
        torch.testing.assert_close(one, z - tb * v, rtol=1e-5, atol=1e-5)
    if context_t > 0:
        clean = autoregressive_resample(model, x, t_s, **dict(kw, context_t=0.0))
        assert (clean[:, :, 2:] - fast[:, :, 2:]).abs().max() > 1e-4  # the re-noised history matters
        torch.testing.assert_close(clean[:, :, :2], fast[:, :, :2])  # the first chunk reads no history


@pytest.mark.parametrize("spec", [RoutingSpec("topk", top_k=1), RoutingSpec("topk", top_k=1, sink_chunks=1),
                                  RoutingSpec("window", window_chunks=1)])
def test_routed_resampling_equals_the_dual_forward(spec):
    """With routing that drops history chunks, the KV-cached rollout (1 Euler step) equals the routed
    dual-stream training forward over the history it produced: chunk i = z_i - t_s v_i with
    v = forward_dual(history = the degraded chunks, noisy = z, same routing). Odd chunks: 14 tokens."""
    model = tiny_model()
    n, cf = 5, model.cfg.chunk_frames
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, n * cf, 2, 14, generator=g)
    ctx, eps = torch.randn(2, 5, 8, generator=g), torch.randn(x.shape, generator=g)
    t_s = torch.tensor([0.6, 0.3])
    tb = t_s.view(-1, 1, 1, 1, 1)
    out = autoregressive_resample(model, x, t_s, context=ctx, eps=eps, routing=spec)
    z = (1 - tb) * x + tb * eps
    attn = MaskedAttention(MaskSpec("dual", n, model.chunk_tokens(2, 14)), "sdpa", routing=spec)
    with torch.no_grad():
        v = model.forward_dual(out, z, t_s[:, None].expand(2, n), ctx, attn)
    last = (n - 1) * cf  # the last chunk stays the ground truth
    torch.testing.assert_close(out[:, :, :last], (z - tb * v)[:, :, :last], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, :, last:], x[:, :, last:])
    dense = autoregressive_resample(model, x, t_s, context=ctx, eps=eps)
    assert (dense - out).abs().max() > 1e-3  # routing dropped history chunks


def test_routed_resampling_under_bf16_autocast():
    """accelerate's bf16 mixed precision: the qk-norm's fp32 weight made q, k fp32 while the KV cache
    held bf16, and routed attention raised a dtype error. Now attention runs in one dtype and the
    result stays within bf16 rounding of the fp32 one (the same picks: routing still differs from dense)."""
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4 * model.cfg.chunk_frames, 2, 14, generator=g)
    ctx, eps = torch.randn(1, 5, 8, generator=g), torch.randn(x.shape, generator=g)
    kw = dict(context=ctx, eps=eps, routing=RoutingSpec("topk", top_k=1))
    t_s = torch.tensor([0.5])
    ref = autoregressive_resample(model, x, t_s, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = autoregressive_resample(model, x, t_s, **kw)
        dense = autoregressive_resample(model, x, t_s, context=ctx, eps=eps)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-2)
    assert (dense - ref).abs().max() > 2e-2


def test_attention_ops_get_one_dtype_under_autocast():
    model = tiny_model()
    seen = []

    def op(q, k, v, layer):
        seen.append((q.dtype, k.dtype, v.dtype))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 4, 2, 2, 14), torch.rand(1, 1), torch.randn(1, 5, 8), attn=op)
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen)


def test_autoregressive_causality():
    """Perturbing degraded chunk j changes chunks > j only (chunk i conditions on degraded chunks < i)."""
    model = tiny_model()
    x, ctx, eps = _data(model)
    t_s = torch.tensor([0.5, 0.5])
    cf = model.cfg.chunk_frames
    base = autoregressive_resample(model, x, t_s, context=ctx, eps=eps, include_last=True)
    for j in range(N):
        def bump(i, z, j=j):
            return z + 0.5 if i == j else z

        out = autoregressive_resample(model, x, t_s, context=ctx, eps=eps, include_last=True, on_chunk=bump)
        for i in range(N):
            d = (out - base)[:, :, i * cf:(i + 1) * cf].abs().max().item()
            if i < j:
                assert d == 0.0, (j, i)
            elif i == j:
                assert abs(d - 0.5) < 1e-6
            else:
                assert d > 1e-4, (j, i)


@pytest.mark.parametrize("context_t", [0.0, 0.3])
def test_parallel_resampling_conditions_on_ground_truth(context_t):
    """Parallel resampling of chunk i == one denoising pass over [x_<i (ground truth; noised to
    context_t with context_eps when > 0, as the sampler's cache holds it), z_i]."""
    model = tiny_model()
    x, ctx, eps = _data(model)
    ctx_eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    t_s = torch.tensor([0.6, 0.4])
    cf, tok = model.cfg.chunk_frames, model.chunk_tokens(4, 4)
    par = parallel_resample(model, x, t_s, context=ctx, eps=eps, context_t=context_t,
                            context_eps=ctx_eps if context_t else None)
    tb = t_s.view(-1, 1, 1, 1, 1)
    hist = (1 - context_t) * x + context_t * ctx_eps
    for i in range(N):
        z = (1 - tb) * x[:, :, i * cf:(i + 1) * cf] + tb * eps[:, :, i * cf:(i + 1) * cf]
        seq = torch.cat([hist[:, :, :i * cf], z], 2)
        t = torch.full((2, i + 1), context_t)
        t[:, i] = t_s
        with torch.no_grad():
            v = model(seq, t, ctx, attn=MaskedAttention(MaskSpec("block_causal", i + 1, tok), "sdpa"))[:, :, i * cf:]
        torch.testing.assert_close(par[:, :, i * cf:(i + 1) * cf], z - tb * v, rtol=1e-5, atol=1e-5)
    # no accumulation: the AR variant differs from the parallel one beyond the first chunk
    ar = autoregressive_resample(model, x, t_s, context=ctx, eps=eps, include_last=True, context_t=context_t,
                                 context_eps=ctx_eps if context_t else None)
    torch.testing.assert_close(ar[:, :, :cf], par[:, :, :cf], rtol=1e-5, atol=1e-5)
    assert (ar[:, :, cf:] - par[:, :, cf:]).abs().max() > 1e-4


def test_noise_augmentation_scale():
    x = torch.zeros(4, 3, 8, 16, 16)
    y = noise_augment(x, 0.1, torch.Generator().manual_seed(0))
    assert abs(y.std().item() - 0.1) < 0.005


def test_routing_with_room_for_all_equals_dense():
    model = tiny_model()
    x, ctx, eps = _data(model)
    t_s = torch.tensor([0.5, 0.5])
    dense = autoregressive_resample(model, x, t_s, context=ctx, eps=eps)
    wide = autoregressive_resample(model, x, t_s, context=ctx, eps=eps, routing=RoutingSpec("topk", top_k=N))
    torch.testing.assert_close(wide, dense, rtol=1e-5, atol=1e-5)
    top1 = autoregressive_resample(model, x, t_s, context=ctx, eps=eps, routing=RoutingSpec("topk", top_k=1))
    assert top1.shape == dense.shape and torch.isfinite(top1).all()


@pytest.mark.parametrize("spec", [RoutingSpec("topk", top_k=1), RoutingSpec("topk", top_k=1, sink_chunks=1),
                                  RoutingSpec("window", window_chunks=1)])
def test_routed_parallel_resampling_equals_the_dual_forward(spec):
    """Parallel resampling with routing (1 Euler step) equals the routed dual-stream training forward over
    the ground truth: every chunk i = z_i - t_s v_i with v = forward_dual(history = x, noisy = z, same
    routing); and differs from dense parallel resampling (routing is not ignored). Odd chunks: 14 tokens."""
    model = tiny_model()
    n = 5
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, n * model.cfg.chunk_frames, 2, 14, generator=g)
    ctx, eps = torch.randn(2, 5, 8, generator=g), torch.randn(x.shape, generator=g)
    t_s = torch.tensor([0.6, 0.3])
    tb = t_s.view(-1, 1, 1, 1, 1)
    par = parallel_resample(model, x, t_s, context=ctx, eps=eps, steps=1, routing=spec)
    z = (1 - tb) * x + tb * eps
    attn = MaskedAttention(MaskSpec("dual", n, model.chunk_tokens(2, 14)), "sdpa", routing=spec)
    with torch.no_grad():
        v = model.forward_dual(x, z, t_s[:, None].expand(2, n), ctx, attn)
    torch.testing.assert_close(par, z - tb * v, rtol=1e-5, atol=1e-5)
    dense = parallel_resample(model, x, t_s, context=ctx, eps=eps, steps=1)
    assert (dense - par).abs().max() > 1e-3  # routing dropped history chunks


def _chunkwise_resample_reference(model, x, t_s, *, context, eps, steps, null_context=None, cfg_scale=1.0,
                                  parallel=False):
    """Self-resampling of every chunk of x [B, C, N * cf, H, W] written out plainly (no KV cache, no dual
    layout), for the CFG twins: chunk i takes `steps` Euler steps on resample_grid from
    z_i = (1 - t_s) x_i + t_s eps_i, each velocity the noisy part of one full forward over
    [history chunks < i (timestep 0) | z] under the block-causal mask. The history is the degraded
    chunks < i (autoregressive) or the ground truth (parallel). With null_context the velocity is
    guided, v_null + cfg_scale (v_cond - v_null), both branches full forwards: the null branch's history
    K/V come from the null text as well (a separate unconditional cache in the fast path)."""
    cf, tok = model.cfg.chunk_frames, model.chunk_tokens(x.shape[3], x.shape[4])
    b, n = x.shape[0], x.shape[2] // cf
    grid = resample_grid(t_s, steps)  # [B, steps + 1], from t_s to 0
    out = x.clone()
    with torch.no_grad():
        for i in range(n):
            sl = slice(i * cf, (i + 1) * cf)
            hist = (x if parallel else out)[:, :, : i * cf]
            t0 = grid[:, 0].view(-1, 1, 1, 1, 1)
            z = (1 - t0) * x[:, :, sl] + t0 * eps[:, :, sl]
            attn = MaskedAttention(MaskSpec("block_causal", i + 1, tok), "sdpa")
            for k in range(steps):
                seq = torch.cat([hist, z], dim=2)
                t = torch.zeros(b, i + 1)
                t[:, i] = grid[:, k]
                v = model(seq, t, context, attn=attn)[:, :, i * cf:]
                if null_context is not None:
                    v_null = model(seq, t, null_context, attn=attn)[:, :, i * cf:]
                    v = v_null + cfg_scale * (v - v_null)
                z = z + (grid[:, k + 1] - grid[:, k]).view(-1, 1, 1, 1, 1) * v
            out[:, :, sl] = z
    return out


@pytest.mark.parametrize("parallel", [False, True], ids=["autoregressive", "parallel"])
def test_resampling_cfg_equals_guided_chunkwise_forwards(parallel):
    """Self-resampling with CFG (the stage's resample_cfg; here 3, 2 Euler steps) equals the plain guided
    reference, chunk by chunk: autoregressive (its conditional and unconditional KV caches, each written
    under its own text) and parallel (one guided dual forward per step). The guidance matters: the
    unguided reference is far from it. Odd chunks: 14 tokens."""
    model = tiny_model()
    n = 4
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 4, n * model.cfg.chunk_frames, 2, 14, generator=g)
    ctx, null = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    eps = torch.randn(x.shape, generator=g)
    t_s = torch.tensor([0.6, 0.35])
    kw = dict(context=ctx, eps=eps, steps=2)
    if parallel:
        got = parallel_resample(model, x, t_s, null_context=null, cfg_scale=3.0, **kw)
    else:
        got = autoregressive_resample(model, x, t_s, include_last=True, null_context=null, cfg_scale=3.0, **kw)
    want = _chunkwise_resample_reference(model, x, t_s, null_context=null, cfg_scale=3.0, parallel=parallel, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unguided = _chunkwise_resample_reference(model, x, t_s, parallel=parallel, **kw)
    assert (want - unguided).abs().max() > 1e-2


def test_resampling_cfg():
    model = tiny_model()
    x, ctx, eps = _data(model)
    t_s = torch.tensor([0.5, 0.5])
    plain = autoregressive_resample(model, x, t_s, context=ctx, eps=eps)
    same = autoregressive_resample(model, x, t_s, context=ctx, eps=eps, null_context=torch.zeros_like(ctx), cfg_scale=1.0)
    assert torch.equal(plain, same)
    guided = autoregressive_resample(model, x, t_s, context=ctx, eps=eps, null_context=torch.zeros_like(ctx), cfg_scale=3.0)
    assert (guided - plain).abs().max() > 1e-4


# ----------------------------------------------------------------------------- ramp from teacher forcing


def _old_degrade(model, x, ctx, obj, seed, steps=1, shift=0.6, noise_scale=0.1):
    """degrade_history as it was before the ramp existed (the hard switch), written out by hand."""
    g = torch.Generator().manual_seed(seed)
    if obj == "noise_augmentation":
        return noise_augment(x, noise_scale, g), None, g
    t_s = sample_resample_t(x.shape[0], shift, generator=g)
    eps = torch.randn(x.shape, generator=g)
    if obj == "resampling":
        return autoregressive_resample(model, x, t_s, context=ctx, eps=eps, steps=steps), t_s, g
    return parallel_resample(model, x, t_s, context=ctx, eps=eps, steps=steps), t_s, g


@pytest.mark.parametrize("objective", ["resampling", "parallel_resampling", "noise_augmentation"])
def test_ramp_none_and_full_level_are_the_old_hard_switch(objective):
    """ramp none (any level), and either ramp at r = 1, give bit for bit the history, t_s and
    generator state of the code before the ramp (so a hard-switch run is unchanged)."""
    model = tiny_model()
    x, ctx, _ = _data(model, b=3)
    ref, ref_t, ref_g = _old_degrade(model, x, ctx, objective, seed=7, steps=2)
    after = torch.rand(4, generator=ref_g)
    for ramp, level in (("none", 1.0), ("none", 0.2), ("probability", 1.0), ("strength", 1.0)):
        g = torch.Generator().manual_seed(7)
        hist, t_s = degrade_history(model, x, ctx, _settings(objective, steps=2, ramp=ramp, ramp_level=level),
                                    generator=g)
        assert torch.equal(hist, ref), (ramp, level)
        assert (t_s is None and ref_t is None) or torch.equal(t_s, ref_t)
        assert torch.equal(torch.rand(4, generator=g), after)  # same draws consumed


class _CountingModel:
    """Wraps a model and records the batch size of every forward (attributes pass through)."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def __call__(self, x, *a, **kw):
        self.batches.append(x.shape[0])
        return self.model(x, *a, **kw)

    def forward_dual(self, history, *a, **kw):
        self.batches.append(history.shape[0])
        return self.model.forward_dual(history, *a, **kw)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("objective", ["resampling", "parallel_resampling"])
def test_probability_ramp_ends_and_selected_subbatch(objective):
    """r = 0: every history is the ground truth (t_s 0) and the model never runs; r = 1: the full
    degradation; in between each video is either the ground truth exactly or its full degradation, and
    the model runs on the selected videos only."""
    model = tiny_model()
    x, ctx, _ = _data(model, b=8)
    full, full_t = degrade_history(model, x, ctx, _settings(objective), generator=torch.Generator().manual_seed(3))
    counting = _CountingModel(model)
    zero, t0 = degrade_history(counting, x, ctx, _settings(objective, ramp="probability", ramp_level=0.0),
                               generator=torch.Generator().manual_seed(3))
    assert torch.equal(zero, x) and torch.equal(t0, torch.zeros(8)) and counting.batches == []
    one, t1 = degrade_history(model, x, ctx, _settings(objective, ramp="probability", ramp_level=1.0),
                              generator=torch.Generator().manual_seed(3))
    assert torch.equal(one, full) and torch.equal(t1, full_t)
    counting = _CountingModel(model)
    half, th = degrade_history(counting, x, ctx, _settings(objective, ramp="probability", ramp_level=0.5),
                               generator=torch.Generator().manual_seed(3))
    sel = th > 0
    assert 0 < int(sel.sum()) < 8  # this seed selects some, not all
    assert set(counting.batches) == {int(sel.sum())}  # only the selected sub-batch was degraded
    assert torch.equal(half[~sel], x[~sel]) and torch.equal(th[sel], full_t[sel])
    torch.testing.assert_close(half[sel], full[sel], rtol=1e-5, atol=1e-5)  # same t_s and noise per video
    assert (half[sel] - x[sel])[:, :, :-2].abs().amax(dim=(1, 2, 3, 4)).min() > 1e-4
    # always_forward (DeepSpeed ZeRO-3): the model runs on one video even when none is selected
    counting = _CountingModel(model)
    zero_f, _ = degrade_history(counting, x, ctx, _settings(objective, ramp="probability", ramp_level=0.0,
                                                            always_forward=True),
                                generator=torch.Generator().manual_seed(3))
    assert torch.equal(zero_f, x) and set(counting.batches) == {1}


@pytest.mark.parametrize("objective", ["resampling", "noise_augmentation"])
def test_probability_ramp_fraction(objective):
    """At r = 0.3 the fraction of degraded histories over 2000 videos is 0.3 within 0.04 (about four
    binomial standard deviations, sqrt(0.3 * 0.7 / 2000) = 0.010)."""
    model = tiny_model()
    b = 2000
    g = torch.Generator().manual_seed(11)
    x = torch.randn(b, 4, N * model.cfg.chunk_frames, 4, 4, generator=g)
    ctx = torch.randn(b, 5, 8, generator=g)
    hist, _ = degrade_history(model, x, ctx, _settings(objective, ramp="probability", ramp_level=0.3),
                              generator=torch.Generator().manual_seed(12))
    changed = (hist != x).flatten(1).any(1).float().mean().item()
    assert abs(changed - 0.3) < 0.04, changed


@pytest.mark.parametrize("objective", ["resampling", "parallel_resampling"])
def test_strength_ramp_scales_t_s(objective):
    """ramp strength at level r == the degradation at t_s * r with the same noise, for every video."""
    model = tiny_model()
    x, ctx, _ = _data(model, b=3)
    r = 0.4
    g = torch.Generator().manual_seed(5)
    t_s = sample_resample_t(3, 0.6, generator=g)
    eps = torch.randn(x.shape, generator=g)
    fn = autoregressive_resample if objective == "resampling" else parallel_resample
    ref = fn(model, x, t_s * r, context=ctx, eps=eps, steps=2)
    hist, got_t = degrade_history(model, x, ctx, _settings(objective, steps=2, ramp="strength", ramp_level=r),
                                  generator=torch.Generator().manual_seed(5))
    assert torch.equal(got_t, t_s * r) and torch.equal(hist, ref)
    # an explicit t_s is scaled as well; level 0 is teacher forcing exactly
    zero, _ = degrade_history(model, x, ctx, _settings(objective, ramp="strength", ramp_level=0.0),
                              t_s=torch.tensor([0.5, 0.7, 0.9]), generator=torch.Generator().manual_seed(5))
    assert torch.equal(zero, x)


def test_noise_augmentation_strength_ramp_scales_the_std():
    x = torch.zeros(4, 3, 8, 16, 16)
    y, _ = degrade_history(None, x, None, _settings("noise_augmentation", noise_scale=0.1, ramp="strength",
                                                    ramp_level=0.5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, noise_augment(x, 0.05, torch.Generator().manual_seed(0)))


def test_ramp_names_match_the_config():
    import typing

    from resampling_forcing.config import StageConfig
    from resampling_forcing.resampling import RAMPS

    assert typing.get_args(typing.get_type_hints(StageConfig)["ramp"]) == RAMPS
    with pytest.raises(ValueError, match="ramp 'linear' is unknown"):
        _settings("resampling", ramp="linear")
    with pytest.raises(ValueError, match="ramp_level"):
        _settings("resampling", ramp="strength", ramp_level=1.5)
