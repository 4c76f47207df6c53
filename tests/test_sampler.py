"""The sampler (resampling_forcing/sampler.py) through its own code path:

1. cached rollout velocity == training forward on [history | noisy], every chunk (fp32), also with
   CFG (two halves of one batch), with routing (in all or some layers), with the cache written at
   context_t > 0, and for a rollout 10x the training length (RoPE);
2. a full rollout is deterministic for a seed and independent of batch composition;
3. CFG scale 1 equals the conditional branch alone (and skips the unconditional one).
"""
import math

import numpy as np
import pytest
import torch

from resampling_forcing.attention.masks import MaskSpec
from resampling_forcing.attention.ops import MaskedAttention
from resampling_forcing.attention.routing import RoutingSpec
from resampling_forcing.encoders import PixelShuffleVAE
from resampling_forcing.options import SamplingOptions
from resampling_forcing.sampler import Rollout, SampleNoise, sample, sample_seed
from helpers import tiny_model

H, W = 2, 14  # latent size: 1 x 7 tokens per frame with patch 2


def _data(model, n, b=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    cf = model.cfg.chunk_frames
    hist = torch.randn(b, 4, n * cf, H, W, generator=g)
    noisy = torch.randn(b, 4, n * cf, H, W, generator=g)
    t = torch.rand(b, n, generator=g)
    ctx = torch.randn(b, 5, 8, generator=g)
    neg = torch.randn(1, 5, 8, generator=g)
    return hist, noisy, t, ctx, neg


def _dual(model, hist, noisy, t, ctx, routing=None, history_t=None, routing_layers=None):
    spec = MaskSpec("dual", t.shape[1], model.chunk_tokens(H, W))
    attn = MaskedAttention(spec, "sdpa", routing=routing, routing_layers=routing_layers)
    return model.forward_dual(hist, noisy, t, ctx, attn, history_t)


def _renoised_history(model, hist, context_t, seed=0):
    """What the rollout's cache-writing passes see at context_t > 0, written out by hand: chunk i of
    `hist` [B, C, n * cf, H, W] re-noised, (1 - ct) x + ct eps, with the i-th draw of each sample's own
    generator (SampleNoise(seed, 0..B-1); in `_check_parity` only the write passes draw noise)."""
    cf, b = model.cfg.chunk_frames, hist.shape[0]
    noise = SampleNoise(seed, range(b))
    eps = torch.cat([noise((hist.shape[1], cf, H, W), "cpu") for _ in range(hist.shape[2] // cf)], dim=2)
    return (1 - context_t) * hist + context_t * eps


def _check_parity(model, n, opts, b=2, capacity=1):
    """Rollout.velocity on chunk i given history chunks < i (written by Rollout.write_chunk)
    equals the training forward, guided exactly as the sampler guides. With context_t > 0 the
    training forward's history stream holds the chunks re-noised to context_t, at timestep context_t
    (forward_dual's history_t): what the cache-writing pass computes the cached K/V from."""
    hist, noisy, t, ctx, neg = _data(model, n, b)
    cf, ct = model.cfg.chunk_frames, opts.context_t
    hist_in, hist_t = hist, None
    if ct > 0:
        hist_in, hist_t = _renoised_history(model, hist, ct), torch.full((b, n), ct)
    with torch.no_grad():
        want = _dual(model, hist_in, noisy, t, ctx, opts.routing, hist_t, opts.routing_layers)
        if opts.cfg_scale != 1.0:
            unc = _dual(model, hist_in, noisy, t, neg.expand(b, -1, -1), opts.routing, hist_t, opts.routing_layers)
            want = unc + opts.cfg_scale * (want - unc)
    ro = Rollout(model, ctx, latent_hw=(H, W), neg_context=neg, options=opts, capacity=capacity)
    offsets = []
    for i in range(n):
        sl = slice(i * cf, (i + 1) * cf)
        offsets.append(ro.frame_offset)
        # the sampler uses one t for the whole batch; check each sample's own t separately
        for j in range(b):
            v = ro.velocity(noisy[:, :, sl], float(t[j, i]))
            torch.testing.assert_close(v[j], want[j, :, sl], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"chunk {i} sample {j}: {m}")
        ro.write_chunk(hist[:, :, sl])
    assert offsets == [i * cf for i in range(n)]  # absolute RoPE positions, never wrapped
    assert ro.cached_chunks == n
    # the inputs of the write passes (what `recache` replays) are the history the twin used
    torch.testing.assert_close(torch.cat(ro.written, dim=2), hist_in)


def test_cached_rollout_equals_training_forward_dense():
    _check_parity(tiny_model(), 5, SamplingOptions(cfg_scale=1.0))


def test_cached_rollout_equals_training_forward_cfg_two_halves():
    _check_parity(tiny_model(), 4, SamplingOptions(cfg_scale=3.0))


@pytest.mark.parametrize("spec", [RoutingSpec("topk", top_k=1, sink_chunks=1),
                                  RoutingSpec("window", window_chunks=2)])
def test_cached_rollout_equals_training_forward_routed(spec):
    _check_parity(tiny_model(), 5, SamplingOptions(cfg_scale=1.0, routing=spec), b=1)


def test_cached_rollout_equals_training_forward_routing_layers():
    """routing_layers=[1]: the rollout routes in block 1 only (block 0 attends its whole history), as the
    training forward with the same routing_layers does."""
    spec = RoutingSpec("topk", top_k=1, sink_chunks=1)
    _check_parity(tiny_model(), 5, SamplingOptions(cfg_scale=1.0, routing=spec, routing_layers=[1]), b=1)


@pytest.mark.parametrize("opts", [SamplingOptions(cfg_scale=1.0, context_t=0.3),
                                  SamplingOptions(cfg_scale=3.0, context_t=0.3,
                                                  routing=RoutingSpec("topk", top_k=1, sink_chunks=1))],
                         ids=["dense", "cfg3-topk1"])
def test_cached_rollout_equals_training_forward_context_t(opts):
    """The cache-writing pass at context_t > 0 (`--context-t`): every chunk's velocity equals the training
    forward whose history stream is the chunks re-noised to context_t with the samples' own noise, run at
    timestep context_t (the write pass run at t = 0 on the re-noised input differs by ~1e-2)."""
    _check_parity(tiny_model(), 4, opts)


def test_rollout_10x_training_length_positions():
    """Training length 3 chunks; a 30-chunk rollout uses absolute positions 0..59 (no table, no
    wrap): every chunk still equals the training forward over the whole 30-chunk sequence."""
    model = tiny_model()
    _check_parity(model, 30, SamplingOptions(cfg_scale=1.0), b=1)


def test_rope_positions_are_not_wrapped():
    """The RoPE angles of a far chunk are those of its absolute position, not of a wrapped one."""
    model = tiny_model()
    pos = torch.arange(58, 60)
    cos, _ = model.rope(pos, H, W)
    cos0, _ = model.rope(torch.arange(0, 2), H, W)
    assert not torch.allclose(cos, cos0)
    f = torch.tensor([59.0], dtype=torch.float64)
    d = model.rope(torch.tensor([59]), H, W)[0][0, 0]
    torch.testing.assert_close(d, torch.cos(f).float()[0])  # first frame-axis frequency is 1


def _ctx(prompts_seed, b):
    g = torch.Generator().manual_seed(prompts_seed)
    return torch.randn(b, 5, 8, generator=g)


def test_full_rollout_deterministic_and_batch_independent():
    model = tiny_model()
    opts = SamplingOptions(steps=3, cfg_scale=2.0)
    ctx = _ctx(1, 3)
    neg = torch.zeros(1, 5, 8)
    a = sample(model, ctx, 3, (H, W), neg_context=neg, options=opts, seed=7).latents
    b = sample(model, ctx, 3, (H, W), neg_context=neg, options=opts, seed=7).latents
    assert torch.equal(a, b)
    c = sample(model, ctx, 3, (H, W), neg_context=neg, options=opts, seed=8).latents
    assert not torch.allclose(a, c)
    for j in range(3):  # sample j alone == sample j in the batch
        alone = sample(model, ctx[j:j + 1], 3, (H, W), neg_context=neg, options=opts, seed=7, indices=[j]).latents
        torch.testing.assert_close(alone[0], a[j], rtol=1e-5, atol=1e-5)
    # a different batch composition (reordered, sample 2 first) keeps each sample
    perm = sample(model, ctx[[2, 0]], 3, (H, W), neg_context=neg, options=opts, seed=7, indices=[2, 0]).latents
    torch.testing.assert_close(perm[0], a[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(perm[1], a[0], rtol=1e-5, atol=1e-5)


def test_sample_seed_is_stable():
    assert sample_seed(0, 0) != sample_seed(0, 1) != sample_seed(1, 0)
    assert sample_seed(5, 3) == sample_seed(5, 3) < 2**63
    with pytest.raises(ValueError):
        sample_seed(-1, 0)


def test_cfg_scale_one_is_conditional_branch(monkeypatch):
    model = tiny_model()
    ctx = _ctx(2, 2)
    neg = torch.randn(1, 5, 8)
    batches = []
    orig = type(model).forward

    def spy(self, x, *a, **k):
        batches.append(x.shape[0])
        return orig(self, x, *a, **k)

    monkeypatch.setattr(type(model), "forward", spy)
    opts = SamplingOptions(steps=3, cfg_scale=1.0)
    auto = sample(model, ctx, 2, (H, W), neg_context=neg, options=opts, seed=4).latents
    assert set(batches) == {2}  # the unconditional branch never ran
    no_neg = sample(model, ctx, 2, (H, W), options=opts, seed=4).latents  # no negative prompt needed
    assert torch.equal(auto, no_neg)
    batches.clear()
    both = sample(model, ctx, 2, (H, W), neg_context=neg, options=opts, seed=4, uncond=True).latents
    assert set(batches) == {4}  # forced: both halves ran, weighted 1 * cond + 0 * uncond
    torch.testing.assert_close(auto, both, rtol=1e-5, atol=1e-5)
    # and a rollout with another negative prompt is unchanged at scale 1
    other = sample(model, ctx, 2, (H, W), neg_context=torch.randn(1, 5, 8), options=opts, seed=4).latents
    assert torch.equal(auto, other)
    # while a scale != 1 changes the result
    guided = sample(model, ctx, 2, (H, W), neg_context=neg, options=SamplingOptions(steps=3, cfg_scale=4.0), seed=4)
    assert not torch.allclose(guided.latents, auto)


def test_euler_loop_and_lazy_write():
    """next_chunk integrates with the shifted grid; the finished chunk enters the cache when the
    next one starts (and with flush())."""
    model = tiny_model()
    ctx = _ctx(3, 1)
    opts = SamplingOptions(steps=4, shift=3.0, cfg_scale=1.0)
    ro = Rollout(model, ctx, latent_hw=(H, W), options=opts, seed=1)
    x0 = ro.next_chunk()
    assert ro.cached_chunks == 0 and ro.num_chunks == 1
    # manual Euler with the same noise and velocities
    ref = Rollout(model, ctx, latent_hw=(H, W), options=opts, seed=1)
    x = ref.noise(ref.chunk_shape, "cpu")
    ts = ref.timesteps
    assert ts[0] == 1.0 and ts[-1] == 0.0 and len(ts) == 5
    for i in range(4):
        x = x + (ts[i + 1] - ts[i]) * ref.velocity(x, ts[i])
    torch.testing.assert_close(x0, x)
    ro.next_chunk()
    assert ro.cached_chunks == 1 and ro.num_chunks == 2
    ro.flush()
    assert ro.cached_chunks == 2


def test_an_x0_model_lands_on_its_prediction_below_the_training_clamp():
    """An x0 model's velocity divides by max(t, x0_min_t); with steps below x0_min_t (50 steps, shift 1:
    t = 0.04, 0.02) an Euler step stopped short (the last kept 60% of x - x0). It must give the model's x0."""
    model = tiny_model(prediction="x0")
    opts = SamplingOptions(steps=50, shift=1.0, cfg_scale=1.0)
    ro = Rollout(model, _ctx(3, 1), latent_hw=(H, W), options=opts, seed=1)
    got = ro.next_chunk()
    ref = Rollout(model, _ctx(3, 1), latent_hw=(H, W), options=opts, seed=1)
    x, ts = ref.noise(ref.chunk_shape, "cpu"), ref.timesteps
    m = model.cfg.x0_min_t
    assert 0 < ts[-2] < m
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = ref.velocity(x, t)
        if t >= m:  # above the clamp the plain Euler step is the exact one
            x = x + (t_next - t) * v
        else:  # in x0 terms: the network's prediction, and the path to it
            x0 = x - m * v
            x = x0 + (t_next / t) * (x - x0)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, x0, rtol=1e-5, atol=1e-5)  # the last step lands on the prediction


def test_context_t_renoises_written_chunk():
    model = tiny_model()
    ctx = _ctx(3, 1)
    a = sample(model, ctx, 2, (H, W), options=SamplingOptions(steps=2, cfg_scale=1.0), seed=0).latents
    b = sample(model, ctx, 2, (H, W), options=SamplingOptions(steps=2, cfg_scale=1.0, context_t=0.1), seed=0).latents
    cf = model.cfg.chunk_frames
    assert torch.equal(a[:, :, :cf], b[:, :, :cf])  # chunk 0 does not see the cache
    assert not torch.allclose(a[:, :, cf:], b[:, :, cf:])


def test_prefill_history_and_streaming_callback():
    """Continuing given history == writing those chunks; the callback gets decoded frames per chunk,
    and concatenated frames equal decoding the whole latent video."""
    model = tiny_model(in_channels=12, out_channels=12)  # PixelShuffleVAE(2): 12 channels
    vae = PixelShuffleVAE(factor=2)
    cf = model.cfg.chunk_frames
    g = torch.Generator().manual_seed(0)
    hist = torch.randn(1, 12, 2 * cf, H, W, generator=g).clamp(-1, 1)
    ctx = _ctx(4, 2)
    opts = SamplingOptions(steps=2, cfg_scale=1.0)
    seen = []
    res = sample(model, ctx, 3, (H, W), options=opts, history=hist, vae=vae, seed=2,
                 callback=lambda c: seen.append((c.index, c.generated, tuple(c.frames.shape))))
    assert [s[:2] for s in seen] == [(2, 0), (3, 1), (4, 2)]
    assert all(s[2] == (2, 3, cf, 2 * H, 2 * W) for s in seen)
    assert res.history_chunks == 2 and res.history_frames == 2 * cf
    assert res.latents.shape == (2, 12, 5 * cf, H, W)
    torch.testing.assert_close(res.latents[:, :, :2 * cf], hist.expand(2, -1, -1, -1, -1))
    full = vae.decode(res.latents)
    want = ((full + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert torch.equal(res.video, want)
    # the same rollout by hand: write the history chunks, then generate
    ro = Rollout(model, ctx, latent_hw=(H, W), options=opts, seed=2)
    for i in range(2):
        ro.write_chunk(hist[:, :, i * cf:(i + 1) * cf].expand(2, -1, -1, -1, -1))
    assert ro.frame_offset == 2 * cf
    first = ro.next_chunk()
    torch.testing.assert_close(first, res.latents[:, :, 2 * cf:3 * cf])
    t = res.timings
    assert len(t["per_chunk_s"]) == 3 and t["first_chunk_latency_s"] > 0 and t["generated_frames"] == 3 * cf
    assert t["fps_with_decode"] > 0 and t["fps_without_decode"] >= t["fps_with_decode"]
    # stop early from the callback
    short = sample(model, ctx, 3, (H, W), options=opts, vae=vae, seed=2, callback=lambda c: c.generated < 1 and None)
    assert short.latents.shape[2] == 2 * cf


def test_history_must_be_whole_chunks():
    model = tiny_model()
    with pytest.raises(ValueError, match="whole number"):
        sample(model, _ctx(0, 1), 1, (H, W), options=SamplingOptions(steps=1, cfg_scale=1.0),
               history=torch.randn(1, 4, 3, H, W))


def test_selection_recording_shape_and_values():
    model = tiny_model(num_layers=2)
    spec = RoutingSpec("topk", top_k=1, sink_chunks=1)
    opts = SamplingOptions(steps=1, cfg_scale=2.0, routing=spec, record_selection=True, routing_layers=[1])
    res = sample(model, _ctx(5, 2), 5, (H, W), neg_context=torch.zeros(1, 5, 8), options=opts, seed=0)
    assert res.selection.shape == (2, 5, 2, 2, 4)  # [batch, chunks, layers, heads, history]
    for sel in res.selection:
        assert np.isnan(sel[0]).all() and np.isnan(sel[:, 0]).all()  # chunk 0: no history; layer 0 dense
        for c in range(1, 5):
            row = sel[c, 1]  # [heads, history]
            assert np.isnan(row[:, c:]).all()
            assert np.all((row[:, :c] >= 0) & (row[:, :c] <= 1))
            np.testing.assert_allclose(row[:, 0], 1.0)  # the sink chunk is always kept
            # sink + top-1: each token keeps min(c, 2) chunks
            np.testing.assert_allclose(row[:, :c].sum(-1), min(c, 2), rtol=1e-6)


@pytest.mark.parametrize("record", [False, True])
def test_cache_is_allocated_once_for_the_rollout(monkeypatch, record):
    """The rollout sizes its cache for every chunk once; recording selections also writes the last chunk
    into the cache (its cache-writing pass), which must not regrow it (a second copy of the whole cache at
    the end: ~2.5x its size at peak)."""
    from resampling_forcing.cache import KVCache

    grows = []
    original = KVCache._grow
    monkeypatch.setattr(KVCache, "_grow", lambda self, cap: grows.append(cap) or original(self, cap))
    model = tiny_model(num_layers=2)
    opts = SamplingOptions(steps=1, cfg_scale=1.0, routing=RoutingSpec("topk", top_k=1), record_selection=record)
    sample(model, _ctx(6, 1), 6, (H, W), options=opts, seed=0)
    assert grows == [6], grows


def test_selection_is_recorded_per_sample():
    """record_selection with a batch: each sample's own picks (they were averaged over the batch, so every
    video of a batch got the same .selection.npy), the same as the sample rolled out alone."""
    model = tiny_model(num_layers=2)
    ctx = torch.cat([torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    opts = SamplingOptions(steps=1, cfg_scale=1.0, routing=RoutingSpec("topk", top_k=1), record_selection=True)
    both = sample(model, ctx, 5, (H, W), options=opts, seed=0)
    assert both.selection.shape == (2, 5, 2, 2, 4)
    assert np.nanmax(np.abs(both.selection[0] - both.selection[1])) > 0.1  # different prompts, different picks
    for b in range(2):
        alone = sample(model, ctx[b:b + 1], 5, (H, W), options=opts, seed=0, indices=[b])
        np.testing.assert_array_equal(both.selection[b], alone.selection[0])


def test_sampling_option_errors():
    with pytest.raises(ValueError, match="steps"):
        SamplingOptions(steps=0)
    with pytest.raises(ValueError, match="context_t"):
        SamplingOptions(context_t=1.0)
    model = tiny_model()
    with pytest.raises(ValueError, match="neg_context"):
        Rollout(model, _ctx(0, 1), latent_hw=(H, W), options=SamplingOptions(cfg_scale=5.0))
    with pytest.raises(ValueError, match="patch"):
        Rollout(model, _ctx(0, 1), latent_hw=(3, W), options=SamplingOptions(cfg_scale=1.0))
    with pytest.raises(ValueError, match="num_chunks"):
        sample(model, _ctx(0, 1), 0, (H, W), options=SamplingOptions(cfg_scale=1.0))
    topk = RoutingSpec(mode="topk", top_k=1)
    past = model.cfg.num_layers  # options built without a config: the model is what knows its depth
    with pytest.raises(ValueError, match=f"routing_layers=\\[0, {past}\\]: .*< {past} \\(the model's blocks\\)"):
        Rollout(model, _ctx(0, 1), latent_hw=(H, W), options=SamplingOptions(cfg_scale=1.0, routing=topk,
                                                                             routing_layers=[0, past]))
    assert math.isfinite(SamplingOptions().shift)


def test_bench_rollout_smoke(tmp_path):
    """bench/rollout.py runs end to end at a toy size and writes its JSON (not a timing test)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "rollout.py"
    spec = importlib.util.spec_from_file_location("bench_rollout", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "b.json"
    assert mod.main(["--presets", "tiny", "--latent", "4x4", "--chunks", "3", "--chunk-frames", "1",
                     "--modes", "dense,topk1,window1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    modes = res["presets"]["tiny"]["modes"]
    assert set(modes) == {"dense", "topk1", "window1"}
    assert len(modes["dense"]["per_chunk_attn_s"]) == 3 and modes["topk1"]["fps_with_decode"] > 0
    assert "| tiny" in res["markdown"]


def test_bench_replay_applies_recorded_selections():
    """bench/replay.py: the large rollout's top-k picks ARE the recorded ones, mapped by relative token
    position and head (what its rows in docs/benchmarks.md time)."""
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.replay import _token_map, record_selections, replaying, token_grid
    from train_helpers import REPO

    assert _token_map((2, 4, 4), (2, 4, 4)).tolist() == list(range(32))
    assert _token_map((1, 2, 2), (1, 4, 4)).view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    rec = record_selections(str(REPO / "assets" / "ablation" / "ar_0.6"), chunks=5, top_k=1, steps=1)
    assert rec["grid"] == (2, 4, 4) and rec["heads"] == 4 and 0 < rec["coherence"] <= 1
    assert set(rec["sel"]) >= {(n, layer) for n in range(2, 5) for layer in range(rec["layers"])}
    model = tiny_model()  # 2 heads, other width and depth: heads h -> h % 4, layers l -> l % 4
    hw = (4, 4)
    with replaying(rec, token_grid(model, hw), model.cfg.num_heads) as wrap:
        res = sample(model, _ctx(0, 1), 5, hw, options=SamplingOptions(
            steps=1, cfg_scale=1.0, routing=RoutingSpec("topk", top_k=1), record_selection=True), attn_wrapper=wrap)
    tok = _token_map(rec["grid"], token_grid(model, hw))
    for n in range(2, 5):
        for layer in range(model.cfg.num_layers):
            want = rec["sel"][(n, layer % rec["layers"])][: model.cfg.num_heads][:, tok].float().mean(dim=1)
            np.testing.assert_array_equal(res.selection[0, n, layer, :, :n], want.numpy())


@pytest.mark.parametrize("ct", [0.0, 0.3])
def test_a_rollout_without_recache_keeps_no_inputs(ct, monkeypatch):
    """Only a rollout that may re-cache keeps its cache-writing inputs (they grow with its length): the same
    latents without them; sample() keeps them for a storyboard with switch_cache='recache' only."""
    model = tiny_model()
    opts = SamplingOptions(steps=2, cfg_scale=1.0, context_t=ct)
    runs = {}
    for keep in (True, False):
        ro = Rollout(model, _ctx(1, 1), latent_hw=(H, W), options=opts, keep_written=keep)
        runs[keep] = torch.cat([ro.next_chunk() for _ in range(4)], dim=2)
        ro.flush()
        assert len(ro.written) == (4 if keep else 0)
    assert torch.equal(runs[True], runs[False])
    with pytest.raises(RuntimeError, match="keeps no cache-writing inputs"):
        ro.recache()
    kept = []
    real = Rollout.__init__
    monkeypatch.setattr(Rollout, "__init__", lambda self, *a, **k: kept.append(k["keep_written"]) or real(self, *a, **k))
    board = [(0, _ctx(1, 1)), (2, _ctx(2, 1))]
    for board_, mode in ((None, "keep"), (board, "keep"), (board, "recache")):
        sample(model, None if board_ else _ctx(1, 1), 3, (H, W), options=opts, decode=False, storyboard=board_,
               switch_cache=mode)
    assert kept == [False, False, True]


@pytest.mark.parametrize("layers,num_layers,ok", [
    (None, 4, True), ([0, 3], 4, True), ((2,), None, True), ([7], None, True),
    ([], 4, False), ([1, 1], 4, False), ([-1], 4, False), ([True], 4, False), ("0", 4, False),
    ([0, 4], 4, False), ([0.0], None, False)])
def test_routing_layers_one_rule(layers, num_layers, ok):
    """attention.routing.layers, SamplingOptions.routing_layers and the Rollout share one rule."""
    from resampling_forcing.attention.spec import routing_layers_problem

    problem = routing_layers_problem(layers, num_layers)
    assert (problem is None) == ok
    if num_layers is None:  # what SamplingOptions itself can check, before a model is known
        if ok:
            SamplingOptions(routing_layers=layers)
        else:
            with pytest.raises(ValueError, match="routing_layers=.*must be a non-empty list of distinct block indices"):
                SamplingOptions(routing_layers=layers)
