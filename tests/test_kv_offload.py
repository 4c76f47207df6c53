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
    assert t["kv_resident_chunks"] == resident and t["kv_cache_total_mib"] > t["kv_cache_mib"]
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
