"""Issue 14: bounded-memory rollouts. A TieredKVCache keeping R chunks resident (the rest in a second
tier; here both tiers are host memory) gives bit-identical rollouts to the all-resident KVCache: dense,
CFG, window and top-k routing, context_t > 0, a prompt switch with recache, and a given history."""
import dataclasses

import pytest
import torch

from resampling_forcing.attention.routing import RoutingSpec
from resampling_forcing.cache import KVCache, TieredKVCache
from resampling_forcing.options import SamplingOptions
from resampling_forcing.sampler import Rollout, sample
from helpers import load_sample_cli, tiny_model
from train_helpers import REPO

H, W = 2, 14
# tiny tensors: threads only add overhead (and stall on a busy machine)
pytestmark = pytest.mark.usefixtures("one_thread")


def _ctx(seed, b=1):
    return torch.randn(b, 5, 8, generator=torch.Generator().manual_seed(seed))


CASES = {
    "dense": SamplingOptions(steps=2, cfg_scale=1.0),
    "cfg": SamplingOptions(steps=2, cfg_scale=3.0),
    "context_t": SamplingOptions(steps=2, cfg_scale=2.0, context_t=0.3),
    "window": SamplingOptions(steps=2, cfg_scale=1.0, routing=RoutingSpec("window", sink_chunks=1, window_chunks=2)),
    "topk": SamplingOptions(steps=2, cfg_scale=2.0, routing=RoutingSpec("topk", top_k=2, sink_chunks=1)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("resident", [1, 3])
def test_tiered_cache_is_bit_identical(case, resident):
    model = tiny_model()
    opts = CASES[case]
    ctx, neg = _ctx(1, 2), _ctx(2)
    kw = dict(neg_context=neg, seed=5, decode=False)
    hist = torch.randn(1, 4, 2 * model.cfg.chunk_frames, H, W, generator=torch.Generator().manual_seed(3))
    want = sample(model, ctx, 6, (H, W), options=opts, history=hist, **kw)
    got = sample(model, ctx, 6, (H, W), options=dataclasses.replace(opts, kv_resident_chunks=resident),
                 history=hist, **kw)
    assert torch.equal(want.latents, got.latents)
    t = got.timings
    assert t["kv_resident_chunks"] == resident
    # window routing keeps only its window chunks beyond the ring on the host (none when R >= window)
    window = opts.routing.window_chunks if case == "window" else None
    assert (t["kv_cache_total_mib"] > t["kv_cache_mib"]) == (window is None or resident < window)
    # a prompt switch with recache rewrites both tiers
    board = [(3, _ctx(4, 2))]
    a = sample(model, ctx, 6, (H, W), options=opts, storyboard=board, switch_cache="recache", **kw).latents
    b = sample(model, ctx, 6, (H, W), options=dataclasses.replace(opts, kv_resident_chunks=resident),
               storyboard=board, switch_cache="recache", **kw).latents
    assert torch.equal(a, b)


def test_tiered_cache_tiers_and_bytes():
    model = tiny_model()
    opts = SamplingOptions(steps=1, cfg_scale=1.0, kv_resident_chunks=2)
    ro = Rollout(model, _ctx(1), latent_hw=(H, W), options=opts)
    assert isinstance(ro.cache, TieredKVCache)
    resident, host = [], []
    for _ in range(7):
        ro.next_chunk()
        ro.flush()
        resident.append(ro.cache.rk[0].numel() + ro.cache.rv[0].numel())
        host.append(ro.cache.host_bytes())
    assert ro.cache.offloaded == 5 and len(ro.cache.hk[0]) == 5
    assert len(set(resident)) == 1  # the ring does not grow
    per_chunk = 2 * model.cfg.num_layers * ro.cache.chunk_tokens * model.cfg.dim * 4
    assert host == [0, 0] + [per_chunk * i for i in range(1, 6)]
    # the resident part of the cache is the last R chunks: same values as an all-resident cache
    ref = Rollout(model, _ctx(1), latent_hw=(H, W), options=dataclasses.replace(opts, kv_resident_chunks=None))
    for _ in range(7):
        ref.next_chunk()
        ref.flush()
    assert isinstance(ref.cache, KVCache) and not isinstance(ref.cache, TieredKVCache)
    for layer in range(model.cfg.num_layers):
        k, v, m = ro.cache.history(layer)
        k0, v0, m0 = ref.cache.history(layer)
        assert torch.equal(k, k0) and torch.equal(v, v0) and torch.equal(m, m0)
    with pytest.raises(ValueError, match="kv_resident_chunks"):
        SamplingOptions(kv_resident_chunks=0)


def test_cli_kv_resident_chunks_same_video(tmp_path, capsys):
    import json

    mod = load_sample_cli()
    repo = REPO
    base = ["--checkpoint", str(repo / "assets" / "tiny-pretrained"), "--prompt", "a red circle bouncing",
            "--num-chunks", "5", "--steps", "2", "--device", "cpu", "--quiet", "--top-k", "1"]
    assert mod.main(base + ["--output", str(tmp_path / "all.mp4")]) == 0
    assert mod.main(base + ["--kv-resident-chunks", "1", "--output", str(tmp_path / "bounded.mp4")]) == 0
    assert (tmp_path / "all.mp4").read_bytes() == (tmp_path / "bounded.mp4").read_bytes()
    meta = json.loads((tmp_path / "bounded.json").read_text())
    t = meta["timings"]
    assert meta["sampling"]["kv_resident_chunks"] == 1 and t["kv_resident_chunks"] == 1
    assert t["kv_cache_total_mib"] > t["kv_cache_mib"] > 0
    full = json.loads((tmp_path / "all.json").read_text())["timings"]
    assert full["kv_cache_total_mib"] == full["kv_cache_mib"] and full["kv_resident_chunks"] is None
    capsys.readouterr()
    assert mod.main(base + ["--kv-resident-chunks", "0", "--output", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--kv-resident-chunks must be >= 1" in err


def test_cli_window_bounded_cache_keeps_nothing_on_the_host(tmp_path):
    """--window with --kv-resident-chunks >= the window: the same mp4 bytes, and no K/V in host memory."""
    import json

    mod = load_sample_cli()
    base = ["--checkpoint", str(REPO / "assets" / "tiny-pretrained"), "--prompt", "a red circle bouncing",
            "--num-chunks", "7", "--steps", "2", "--device", "cpu", "--quiet", "--sink", "1", "--window", "2"]
    assert mod.main(base + ["--output", str(tmp_path / "all.mp4")]) == 0
    assert mod.main(base + ["--kv-resident-chunks", "2", "--output", str(tmp_path / "bounded.mp4")]) == 0
    assert (tmp_path / "all.mp4").read_bytes() == (tmp_path / "bounded.mp4").read_bytes()
    t = json.loads((tmp_path / "bounded.json").read_text())["timings"]
    full = json.loads((tmp_path / "all.json").read_text())["timings"]
    assert t["kv_cache_total_mib"] == t["kv_cache_mib"] < full["kv_cache_mib"]


def test_cli_memory_check_counts_what_a_bounded_routed_run_stages(monkeypatch):
    """The CLI's up-front check passes the routed modes' staged chunks (window: sink + window; top-k: at
    least k) to the estimate; dense (or a routing restricted to some layers) stages the whole history."""
    import types

    import resampling_forcing.memory as memory
    from resampling_forcing.config import load_config

    mod = load_sample_cli()
    seen = []
    real = memory.sample_memory
    monkeypatch.setattr(memory, "sample_memory", lambda *a, **k: seen.append(k.get("kv_staged_chunks")) or real(*a, **k))
    cfg = load_config(REPO / "assets" / "tiny-pretrained" / "config.yaml")
    args = types.SimpleNamespace(batch=1, max_history_chunks=None, init_video=None, init_image=None, num_chunks=8,
                                 dtype="fp32", quiet=True)
    for routing, layers in ((RoutingSpec("window", sink_chunks=1, window_chunks=2), None),
                            (RoutingSpec("topk", top_k=3), None), (None, None), (RoutingSpec("topk", top_k=3), [0]),
                            (RoutingSpec("window", sink_chunks=1, window_chunks=2), list(range(cfg.model.num_layers)))):
        opts = SamplingOptions(steps=1, kv_resident_chunks=2, routing=routing, routing_layers=layers)
        mod.check_memory(cfg, torch.device("cpu"), args, 1, opts)
    assert seen == [3, 3, None, None, 3]  # every block listed = every block routed


def test_host_tier_in_a_smaller_dtype():
    """kv_host_dtype="bf16" under an fp32 model: half the host bytes, close to (not equal to) exact;
    "fp32" (the model's dtype) is exact."""
    model = tiny_model()
    opts = SamplingOptions(steps=2, cfg_scale=2.0, kv_resident_chunks=1)
    ctx, neg = _ctx(1, 2), _ctx(2)
    kw = dict(neg_context=neg, seed=5, decode=False)
    exact = sample(model, ctx, 6, (H, W), options=opts, **kw)
    same = sample(model, ctx, 6, (H, W), options=dataclasses.replace(opts, kv_host_dtype="fp32"), **kw)
    small = sample(model, ctx, 6, (H, W), options=dataclasses.replace(opts, kv_host_dtype="bf16"), **kw)
    assert torch.equal(exact.latents, same.latents)
    assert not torch.equal(exact.latents, small.latents)
    torch.testing.assert_close(small.latents, exact.latents, rtol=5e-3, atol=5e-3)  # bf16 rounding (max seen 4e-4)
    host = lambda r: r.timings["kv_cache_total_mib"] - r.timings["kv_cache_mib"]  # noqa: E731
    assert abs(host(small) - host(exact) / 2) < 1e-9
    with pytest.raises(ValueError, match="needs kv_resident_chunks"):
        SamplingOptions(kv_host_dtype="bf16")
    with pytest.raises(ValueError, match="kv_host_dtype"):
        SamplingOptions(kv_resident_chunks=1, kv_host_dtype="int8")


def test_cli_kv_host_dtype(tmp_path, capsys):
    import json

    mod = load_sample_cli()
    repo = REPO
    base = ["--checkpoint", str(repo / "assets" / "tiny-pretrained"), "--prompt", "a red circle bouncing",
            "--num-chunks", "4", "--steps", "2", "--device", "cpu", "--quiet"]
    assert mod.main(base + ["--kv-resident-chunks", "1", "--kv-host-dtype", "bf16",
                            "--output", str(tmp_path / "b.mp4")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["sampling"]["kv_host_dtype"] == "bf16"
    capsys.readouterr()
    assert mod.main(base + ["--kv-host-dtype", "bf16", "--output", str(tmp_path / "x.mp4")]) == 2
    assert "needs --kv-resident-chunks" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Top-k in bounded mode stages only the union of the selected chunks, packed (issue 14, item 3)
# ------------------------------------------------------------------------------------------------
from resampling_forcing.attention import routed_torch as R  # noqa: E402
from resampling_forcing.attention.selection import select_chunks  # noqa: E402
from resampling_forcing.cache import CachedAttention  # noqa: E402


def _filled(cache, n, layers, b, hh, t, d, hot, seed):
    """Write n chunks of K/V into `cache`; the chunks in `hot` have keys along +e0 (queries along +e0
    pick among them), the others along -e0: top-k's union is sink + window + (part of) `hot`."""
    g = torch.Generator().manual_seed(seed)
    for j in range(n):
        for layer in range(layers):
            k = torch.randn(b, hh, t, d, generator=g) * 0.3
            k[..., 0] += 2.0 if j in hot else -2.0
            v = torch.randn(b, hh, t, d, generator=g)
            cache.put_current(layer, k, v, [])  # [] : stage no history (the ring / buffer keeps the chunk)
            cache.put_mean(layer, k)
        cache.commit()
    return cache


def _call(cache, spec, backend, q, k, v, layer=0):
    return CachedAttention(cache, backend, routing=spec)(q, k, v, layer)


LAYOUTS = {"cost": None, "pad0": (0, "padded"), "var0": (0, "per-chunk"), "pad1": (1, "padded"), "var2": (2, "per-chunk")}


# Bit-identity needs the packed chunks at the same memory alignment as in the full cache: torch's fused
# CPU attention kernel rounds differently for K/V at different 64-byte alignments (1 ulp, measured on an
# AMD EPYC host). A chunk of T*D fp32 values is a multiple of 64 bytes when D = 16 (and at every real
# shape: T*D*4 with D = 128); odd T, heads and batch stay. D = 6 (unaligned chunks) is checked to fp32
# rounding: the same plan and arithmetic, only the kernel's alignment-dependent rounding differs.
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", [(1, 3, 5, 16, 1), (2, 2, 7, 16, 3), (1, 3, 5, 6, 1)],
                         ids=["b1-T5-D16-R1", "b2-T7-D16-R3", "b1-T5-D6-R1-unaligned"])
def test_topk_stages_only_the_union_and_is_bit_identical(shape, layout, monkeypatch):
    b, hh, t, d, resident = shape
    n, layers, hot = 13, 2, {2, 3, 6, 7, 8}
    spec = RoutingSpec("topk", top_k=2, sink_chunks=1, window_chunks=1)
    if LAYOUTS[layout] is not None:
        nd, lay = LAYOUTS[layout]
        orig = R._plan_history
        monkeypatch.setattr(R, "_plan_history",
                            lambda sel, T, D, **kw: orig(sel, T, D, force_dense=nd, force_layout=lay, **kw))
    full = _filled(KVCache(layers, b, hh, d, t, "cpu", torch.float32, capacity=2), n, layers, b, hh, t, d, hot, 1)
    tier = _filled(TieredKVCache(layers, b, hh, d, t, "cpu", torch.float32, capacity=2, resident_chunks=resident),
                   n, layers, b, hh, t, d, hot, 1)
    g = torch.Generator().manual_seed(2)
    stag = []
    for layer in range(layers):
        q = torch.randn(b, hh, t, d, generator=g)
        q[..., 0] = q[..., 0].abs() + 1.0
        k, v = torch.randn(b, hh, t, d, generator=g), torch.randn(b, hh, t, d, generator=g)
        reads = tier.host_reads
        want, got = _call(full, spec, "sdpa", q, k, v, layer), _call(tier, spec, "sdpa", q, k, v, layer)
        if (t * d * 4) % 64 == 0:
            assert torch.equal(want, got)
        else:
            torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-6)
        sel = select_chunks(q, full.mean_keys(layer), spec, backend="torch")
        union = tuple(int(j) for j in sel.flatten(0, 2).any(dim=0).nonzero().flatten())
        assert tier.last_staged == union and set(union) <= {0, n - 1} | hot  # not all n chunks
        assert tier.host_reads - reads == sum(1 for j in union if j < n - resident)  # only the union moved
        stag.append(len(union))
        assert tier.stage_k.shape[2] == (max(stag) + 1) * t  # packed, sized by need, not to the history
        assert tier.mean_keys(layer).shape == (b, hh, n, d)  # selection reads every mean key, resident


@pytest.mark.parametrize("far", [False, True], ids=["absolute", "far-positions"])
def test_topk_on_a_bounded_cache_reads_the_device_once_per_call(monkeypatch, far):
    """The union to stage and the routed plan come from ONE host read per layer call (attention.routed.
    plan_routed), as on the all-resident cache (it took two: the union, then the plan); no .item() /
    int(tensor); the output equals the all-resident cache's bit for bit."""
    from resampling_forcing.attention.positions import FarPositions
    from resampling_forcing.models.wan import rope_frame_freqs

    b, hh, t, d, n = 1, 2, 5, 16, 9
    spec = RoutingSpec("topk", top_k=2, sink_chunks=1, window_chunks=1)
    full = _filled(KVCache(1, b, hh, d, t, "cpu", torch.float32, capacity=2), n, 1, b, hh, t, d, {2, 3}, 1)
    tier = _filled(TieredKVCache(1, b, hh, d, t, "cpu", torch.float32, capacity=2, resident_chunks=2),
                   n, 1, b, hh, t, d, {2, 3}, 1)
    pos = FarPositions(3, rope_frame_freqs(d, 10000.0), 1) if far else None
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, hh, t, d, generator=g) for _ in range(3))
    calls, orig = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or orig(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() in the cache / attention path"))
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: pytest.fail("int(tensor) in the cache / attention path"))
    for name in ("__bool__", "__float__", "numpy", "nonzero"):  # other reads of device values
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, **k: pytest.fail(f"{_n} in the cache path"))
    reads = tier.host_reads
    got = CachedAttention(tier, "sdpa", routing=spec, positions=pos)(q, k, v, 0)
    assert len(calls) == 1 and tier.host_reads > reads  # chunks came from the host tier
    calls.clear()
    want = CachedAttention(full, "sdpa", routing=spec, positions=pos)(q, k, v, 0)
    assert len(calls) == 1
    assert torch.equal(got, want)


@pytest.mark.parametrize("spec", [RoutingSpec("topk", top_k=2, sink_chunks=1, window_chunks=1),
                                  RoutingSpec("window", sink_chunks=1, window_chunks=2)], ids=["topk", "window"])
def test_packed_history_on_the_triton_path(spec):
    """The routed kernel (TRITON_INTERPRET=1 on CPU) over the packed history equals it over the whole."""
    from resampling_forcing.attention.backends import kernels

    kern = kernels()
    assert kern is not None and kern.is_interpreted(), "needs triton with TRITON_INTERPRET=1 (tests/conftest.py)"
    b, hh, t, d, n = 2, 2, 7, 5, 9
    full = _filled(KVCache(1, b, hh, d, t, "cpu", torch.float32), n, 1, b, hh, t, d, {2, 4, 5}, 3)
    tier = _filled(TieredKVCache(1, b, hh, d, t, "cpu", torch.float32, resident_chunks=2), n, 1, b, hh, t, d, {2, 4, 5}, 3)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(b, hh, t, d, generator=g)
    q[..., 0] = q[..., 0].abs() + 1.0
    k, v = torch.randn(b, hh, t, d, generator=g), torch.randn(b, hh, t, d, generator=g)
    assert torch.equal(_call(full, spec, "triton", q, k, v), _call(tier, spec, "triton", q, k, v))
    assert len(tier.last_staged) < n


@pytest.mark.parametrize("T,D", [(1560, 128), (128, 64), (64, 16)])
def test_packed_plan_is_the_unpacked_plan(T, D):
    """The torch path plans a packed selection (columns `ids` of an N-chunk history) exactly as the
    unpacked one: same dense blocks, padded rows and per-chunk counts (the padded layout is costed over
    N chunks: costed over the packed 12 it wins at the two small shapes and the plans would differ),
    so the bounded cache's arithmetic is the all-resident one."""
    g = torch.Generator().manual_seed(0)
    B, Hh, Lq, N = 1, 6, T, 40
    ids = sorted(torch.randperm(N - 2, generator=g)[:10].add(1).tolist() + [0, N - 1])
    pick = torch.zeros(B, Hh, Lq, N, dtype=torch.bool)
    width = torch.tensor([1, 2, 4, 8, 12, 12])  # coherent .. scattered heads
    for h in range(Hh):
        r = torch.randint(0, int(width[h]), (Lq,), generator=g)
        pick[0, h, torch.arange(Lq), torch.tensor(ids)[r]] = True
    pick[..., 0] = pick[..., N - 1] = True
    a = R._plan_history(pick, T, D)
    p = R._plan_history(pick[..., ids], T, D, full_chunks=N)
    assert a.kind == p.kind == "blocks"
    assert a.dense == [[ids[j] for j in d] for d in p.dense] and a.rows == p.rows
    assert a.counts == [[c[ids.index(j)] if j in ids else 0 for j in range(N)] for c in p.counts]


def test_bounded_topk_device_bytes_flat_with_length(monkeypatch):
    """With coherent selections (forced: sink + the last two chunks, by top-k's code path) the device
    bytes of a bounded top-k rollout, mean keys aside, do not grow with its length; dense bounded
    attention stages one layer's whole history, so its staging buffer does grow."""
    import resampling_forcing.cache as C

    def coherent(q, mean_k, spec, backend="auto"):
        B, Hh, Lq, _ = q.shape
        n = mean_k.shape[2]
        sel = torch.zeros(B, Hh, Lq, n, dtype=torch.bool)
        sel[..., [0, n - 2, n - 1]] = True
        return sel

    monkeypatch.setattr(C, "select_chunks", coherent)
    model = tiny_model()
    spec = RoutingSpec("topk", top_k=1, sink_chunks=1, window_chunks=1)

    def run(chunks, routing, resident=2):
        opts = SamplingOptions(steps=1, cfg_scale=1.0, routing=routing, kv_resident_chunks=resident)
        ro = Rollout(model, _ctx(1), latent_hw=(H, W), options=opts)
        for _ in range(chunks):
            ro.next_chunk()
            ro.flush()
        c = ro.cache
        mean = sum(m.numel() * m.element_size() for m in c.mean_k)
        return c.memory_bytes() - mean, c.stage_k.shape[2] // c.chunk_tokens, ro

    short, s_short, _ = run(6, spec)
    long, s_long, ro = run(14, spec)
    assert short == long and s_short == s_long == 4  # 3 staged + the current chunk
    assert ro.cache.last_staged == (0, 11, 12)  # the 14th chunk's history: sink + the forced two
    dense_short, d_short, _ = run(6, None)
    dense_long, d_long, _ = run(14, None)
    assert d_long > d_short >= 6 and dense_long > dense_short
    # and the forced selection gives the same latents as the all-resident cache
    kw = dict(seed=5, decode=False)
    opts = SamplingOptions(steps=2, cfg_scale=2.0, routing=spec)
    a = sample(model, _ctx(1), 9, (H, W), options=opts, neg_context=_ctx(2), **kw).latents
    b = sample(model, _ctx(1), 9, (H, W), options=dataclasses.replace(opts, kv_resident_chunks=1),
               neg_context=_ctx(2), **kw).latents
    assert torch.equal(a, b)


WINDOWS = [(1, 2), (0, 2), (2, 1), (1, 3)]  # (sink, window)


@pytest.mark.parametrize("sink,window", WINDOWS)
@pytest.mark.parametrize("resident", [1, 2, 5])
def test_window_cache_drops_unread_chunks_bit_identical(sink, window, resident):
    """Window routing on every block keeps only the sink (on the device) and the window chunks: the same
    latents as the all-resident cache, also through a recache and a given history, with both tiers flat."""
    model = tiny_model()
    spec = RoutingSpec("window", sink_chunks=sink, window_chunks=window)
    opts = SamplingOptions(steps=2, cfg_scale=2.0, context_t=0.2, routing=spec)
    kw = dict(neg_context=_ctx(2), seed=7, decode=False, storyboard=[(0, _ctx(1)), (5, _ctx(4))],
              switch_cache="recache")
    hist = torch.randn(1, 4, 2 * model.cfg.chunk_frames, H, W, generator=torch.Generator().manual_seed(3))
    want = sample(model, None, 9, (H, W), options=opts, history=hist, **kw)
    got = sample(model, None, 9, (H, W), options=dataclasses.replace(opts, kv_resident_chunks=resident),
                 history=hist, **kw)
    assert torch.equal(want.latents, got.latents)
    # bytes per chunk and layer-set: K and V of every block, both CFG branches, fp32
    per_chunk = 2 * model.cfg.num_layers * 2 * _chunk_tokens(model) * model.cfg.dim * 4
    host = (got.timings["kv_cache_total_mib"] - got.timings["kv_cache_mib"]) * 2**20
    assert host == per_chunk * max(0, window - resident)


def _chunk_tokens(model):
    return model.chunk_tokens(H, W)


def test_window_cache_is_flat_in_length():
    """Per chunk: the device bytes and the host bytes of a window-routed bounded rollout stop growing
    once the history is longer than sink + window + the ring (mean keys aside: 1/T of a chunk)."""
    model = tiny_model()
    opts = SamplingOptions(steps=1, cfg_scale=1.0, routing=RoutingSpec("window", sink_chunks=2, window_chunks=3),
                           kv_resident_chunks=1)
    ro = Rollout(model, _ctx(1), latent_hw=(H, W), options=opts)
    device, host = [], []
    for _ in range(16):
        ro.next_chunk()
        ro.flush()
        c = ro.cache
        device.append(c.memory_bytes() - sum(m.numel() * m.element_size() for m in c.mean_k))
        host.append(c.host_bytes())
    per_chunk = 2 * model.cfg.num_layers * ro.cache.chunk_tokens * model.cfg.dim * 4
    assert len(set(device[6:])) == 1 and host[6:] == [2 * per_chunk] * 10  # window 3 - ring 1 on the host
    kept = [j for j, t in enumerate(ro.cache.hk[0]) if t is not None]
    assert kept == [0, 1, 13, 14]  # the sink and the window chunks that left the ring (15 is resident)
    # reading a dropped chunk is a bug of the keep rule: refused on the host, not read stale
    with pytest.raises(RuntimeError, match="chunk 5 was dropped"):
        ro.cache.history(0, [5])
    # a rewind (a recache) frees the window copies at once: the rewrite keeps what it needs anew
    ro.cache.num_chunks = 0
    assert ro.cache.host_bytes() == 0 and [j for j, t in enumerate(ro.cache.hk[0]) if t is not None] == [0, 1]


def test_window_reads_rule():
    from resampling_forcing.attention.spec import window_reads

    spec = RoutingSpec("window", sink_chunks=1, window_chunks=4)
    assert window_reads(spec, None, 3) == (1, 4) and window_reads(spec, [2, 0, 1], 3) == (1, 4)
    assert window_reads(spec, [0, 2], 3) is None  # block 1 attends densely: it reads every chunk
    assert window_reads(RoutingSpec("topk", top_k=2), None, 3) is None and window_reads(None, None, 3) is None


def test_sample_memory_bounded_estimate():
    """The estimate's device KV: R + 1 chunks of every layer + one layer's staged chunks + the current
    one; the staging is the whole history for dense attention, `kv_staged_chunks` for routed modes."""
    from resampling_forcing.config import Config
    from resampling_forcing.memory import sample_memory

    cfg = Config()
    kv = lambda n, **kw: sample_memory(cfg, n, **kw)["parts"]["kv cache"]  # noqa: E731
    layer_chunk = kv(1) // cfg.model.num_layers
    assert kv(16, kv_resident_chunks=2) == kv(3) + 17 * layer_chunk  # dense: grows with the history
    assert kv(64, kv_resident_chunks=2, kv_staged_chunks=3) == kv(16, kv_resident_chunks=2, kv_staged_chunks=3) \
        == kv(3) + 4 * layer_chunk  # routed: flat
    assert kv(2, kv_resident_chunks=2, kv_staged_chunks=3) == kv(2) + 3 * layer_chunk
    # CFG keeps a conditional and an unconditional cache (the two halves of the cache's batch)
    assert kv(16, cfg_scale=5.0) == 2 * kv(16) and kv(16, cfg_scale=1.0) == kv(16)
    # window routing (sink 2, window 3) with R = 1: the ring, the two sink chunks and the staged five, flat;
    # on the host only the two window chunks beyond the ring
    host = lambda n, **kw: sample_memory(cfg, n, **kw)["parts"]["kv cache (host tier)"]  # noqa: E731
    win = dict(kv_resident_chunks=1, kv_staged_chunks=5, kv_keep=(2, 3))
    assert kv(500, **win) == kv(20, **win) == kv(2) + 2 * cfg.model.num_layers * layer_chunk + 6 * layer_chunk
    assert host(500, **win) == host(20, **win) == 2 * layer_chunk * cfg.model.num_layers
    assert host(500, kv_resident_chunks=1) == 499 * layer_chunk * cfg.model.num_layers


def test_streamed_video_estimate_holds_one_chunk():
    """A streamed rollout (sample/sample.py) holds one chunk's frames, or the history's, not the video."""
    from resampling_forcing.config import Config
    from resampling_forcing.memory import sample_memory

    cfg = Config()  # Wan VAE: 4 pixel frames per latent frame, 3 latent frames per chunk
    video = lambda n, **kw: sample_memory(cfg, n, **kw)["parts"]["video"]  # noqa: E731
    frame = cfg.data.height * cfg.data.width * 3
    assert video(500, streamed=True) == video(2, streamed=True) == 12 * frame
    assert video(500, streamed=True, history_chunks=4) == (1 + 4 * 11) * frame  # the history decoded at once
    assert video(500) == (1 + 4 * (3 * 500 - 1)) * frame


@pytest.mark.parametrize("case", ["window", "topk"])
def test_recorded_selection_is_the_unpacked_one(case):
    """record_selection keeps the full [.., n] selection in bounded mode (not the packed one)."""
    import numpy as np

    model = tiny_model()
    opts = dataclasses.replace(CASES[case], record_selection=True)
    kw = dict(neg_context=_ctx(2), seed=5, decode=False)
    a = sample(model, _ctx(1, 2), 7, (H, W), options=opts, **kw)
    b = sample(model, _ctx(1, 2), 7, (H, W), options=dataclasses.replace(opts, kv_resident_chunks=1), **kw)
    assert torch.equal(a.latents, b.latents)
    np.testing.assert_array_equal(a.selection, b.selection)
    assert a.selection.shape[:2] == (2, 7) and not np.isnan(a.selection[:, 6]).all()
