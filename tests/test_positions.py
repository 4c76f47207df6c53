"""Far-history positions (attention/positions.py): a history chunk more than H chunks back is read as if
H chunks back. Checked against plain twins that rotate pre-RoPE keys at the remapped positions with the
model's own RoPE (models.wan.rope_cos_sin) and attend with the reference selection and attention."""
import dataclasses
import json

import pytest
import torch

from resampling_forcing.attention.positions import FarPositions
from resampling_forcing.attention.reference import routed_attention_reference, select_chunks_reference
from resampling_forcing.attention.routed import routed_attention
from resampling_forcing.attention.spec import RoutingSpec
from resampling_forcing.cache import CachedAttention, KVCache, SelectionRecorder, TieredKVCache
from resampling_forcing.models.wan import apply_rope, rope_cos_sin, rope_frame_freqs
from resampling_forcing.options import SamplingOptions, training_horizon
from resampling_forcing.pipeline import Pipeline
from resampling_forcing.sampler import sample
from helpers import load_sample_cli, load_script, tiny_model, tiny_run_config
from train_helpers import REPO

pytestmark = pytest.mark.usefixtures("one_thread")
THETA = 10000.0


def _positions(n, horizon, cf, at=None):
    """Frame positions [n*cf] of history chunks 0..n-1 as read from chunk n: the plain rule."""
    at = horizon if at is None else at
    return torch.tensor([(c if n - c <= horizon else n - at) * cf + f for c in range(n) for f in range(cf)])


def _rope(x, frames, rows, cols):
    """Pre-RoPE x [B, Hh, len(frames)*rows*cols, D] rotated at frame positions `frames`."""
    cos, sin = rope_cos_sin(frames, rows, cols, x.shape[-1], THETA)
    return apply_rope(x, cos, sin)


@pytest.mark.parametrize("n, horizon, at, cf, rows, cols, d, chunks", [
    (7, 2, None, 3, 1, 5, 12, None),          # 5 tokens per chunk, 2 frame pairs
    (9, 3, None, 1, 3, 3, 18, [0, 2, 3, 6, 7]),  # packed, two far runs and near chunks
    (5, 1, None, 2, 2, 1, 24, [1, 4]),
    (4, 6, None, 2, 1, 3, 12, None),          # horizon beyond the history: nothing moves
    (9, 3, 1, 1, 3, 3, 18, [0, 2, 3, 6, 7]),  # far read nearer than the horizon
    (8, 2, 5, 3, 1, 5, 12, None),             # ... and farther (some far chunks move back)
])
def test_keys_are_the_keys_at_the_remapped_positions(n, horizon, at, cf, rows, cols, d, chunks):
    g = torch.Generator().manual_seed(n)
    T = cf * rows * cols
    listed = list(range(n)) if chunks is None else chunks
    x = torch.randn(2, 3, n * T, d, generator=g)
    absolute = _rope(x, torch.arange(n * cf), rows, cols)
    want = _rope(x, _positions(n, horizon, cf, at), rows, cols)
    pick = lambda t: torch.cat([t[:, :, c * T:(c + 1) * T] for c in listed], dim=2)  # noqa: E731
    cur = torch.randn(2, 3, T, d, generator=g)  # the current chunk's keys ride along untouched
    pos = FarPositions(horizon, rope_frame_freqs(d, THETA), cf, at)
    got = pos.keys(torch.cat([pick(absolute), cur], dim=2), T, n, chunks)
    torch.testing.assert_close(got, torch.cat([pick(want), cur], dim=2), rtol=1e-5, atol=1e-5)
    if n <= horizon:
        assert torch.equal(got, torch.cat([pick(absolute), cur], dim=2))
    else:  # not vacuous: the far keys did move
        assert not torch.allclose(pick(want), pick(absolute), atol=1e-3)
    means = pos.mean_keys(absolute.unflatten(2, (n, T)).mean(dim=3), n)
    torch.testing.assert_close(means, want.unflatten(2, (n, T)).mean(dim=3), rtol=1e-5, atol=1e-5)


def test_bf16_keys_are_as_accurate_as_rope_applied_directly():
    """In bf16 the keys are rounded twice (cached at their absolute position, then rotated) instead of
    once: the error stays within 2x that of RoPE applied at the remapped positions directly in bf16 (both
    against fp32; a wrong shift is off by ~7)."""
    n, h, cf, rows, cols, d = 9, 2, 2, 3, 5, 24
    x = torch.randn(2, 3, n * cf * rows * cols, d, generator=torch.Generator().manual_seed(1))
    truth = _rope(x, _positions(n, h, cf, 12), rows, cols)
    direct = _rope(x.bfloat16(), _positions(n, h, cf, 12), rows, cols)
    got = FarPositions(h, rope_frame_freqs(d, THETA), cf, 12).keys(
        _rope(x.bfloat16(), torch.arange(n * cf), rows, cols), cf * rows * cols, n)
    assert got.dtype == torch.bfloat16
    err_got, err_direct = (got.float() - truth).abs().max(), (direct.float() - truth).abs().max()
    assert err_got <= 2 * err_direct, (err_got, err_direct)


def test_for_model_uses_the_models_rope_with_temporal_patching():
    """FarPositions.for_model moves a key exactly as the model's own RoPE would place it (pt = 2)."""
    model = tiny_model(patch_size=[2, 1, 1], chunk_frames=4, dim=36, num_heads=2)  # 2 patched frames/chunk
    n, h = 6, 2
    x = torch.randn(1, 2, n * 2 * 3 * 5, 18, generator=torch.Generator().manual_seed(0))
    cos, sin = model.rope(torch.arange(n * 4), 3, 5)
    absolute = apply_rope(x, cos, sin)
    remapped = torch.cat([torch.arange(c * 4, c * 4 + 4) if n - c <= h else torch.arange((n - h) * 4, (n - h) * 4 + 4)
                          for c in range(n)])
    cos2, sin2 = model.rope(remapped, 3, 5)
    got = FarPositions.for_model(model, h).keys(absolute, 2 * 3 * 5, n)
    torch.testing.assert_close(got, apply_rope(x, cos2, sin2), rtol=1e-5, atol=1e-5)
    assert FarPositions.for_model(model, None) is None


SPECS = {"dense": None, "window": RoutingSpec("window", sink_chunks=1, window_chunks=2),
         "topk": RoutingSpec("topk", top_k=2, sink_chunks=1, window_chunks=1)}


@pytest.mark.parametrize("mode", list(SPECS))
@pytest.mark.parametrize("resident", [None, 2])
@pytest.mark.parametrize("b, hh, cf, rows, cols, d, n, horizon, at", [(2, 2, 1, 1, 5, 12, 9, 3, None),
                                                                     (1, 3, 2, 1, 3, 18, 7, 1, None),
                                                                     (1, 2, 1, 1, 5, 12, 9, 3, 7)])
def test_cached_attention_equals_the_plain_twin(mode, resident, b, hh, cf, rows, cols, d, n, horizon, at):
    spec, T = SPECS[mode], cf * rows * cols
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, hh, n * T, d, generator=g)  # history keys before RoPE
    v = torch.randn(b, hh, n * T, d, generator=g)
    absolute = _rope(x, torch.arange(n * cf), rows, cols)
    cache = (KVCache(1, b, hh, d, T, "cpu", torch.float32, capacity=2) if resident is None else
             TieredKVCache(1, b, hh, d, T, "cpu", torch.float32, capacity=2, resident_chunks=resident))
    for c in range(n):
        kc = absolute[:, :, c * T:(c + 1) * T]
        cache.put_current(0, kc, v[:, :, c * T:(c + 1) * T], [])
        cache.put_mean(0, kc)
        cache.commit()
    frames_now = torch.arange(n * cf, (n + 1) * cf)
    q = _rope(torch.randn(b, hh, T, d, generator=g), frames_now, rows, cols)
    k_cur = _rope(torch.randn(b, hh, T, d, generator=g), frames_now, rows, cols)
    v_cur = torch.randn(b, hh, T, d, generator=g)
    rec = SelectionRecorder()
    op = CachedAttention(cache, "sdpa", commit=True, routing=spec, recorder=rec,
                         positions=FarPositions(horizon, rope_frame_freqs(d, THETA), cf, at))
    got = op(q, k_cur, v_cur, 0)
    # the twin: keys at the remapped positions, reference selection over their means, one dense softmax
    k_ref = _rope(x, _positions(n, horizon, cf, at), rows, cols)
    if spec is None:
        sel = torch.ones(b, hh, T, n, dtype=torch.bool)
    else:
        sel = select_chunks_reference(q, k_ref.unflatten(2, (n, T)).mean(dim=3), spec)
        assert torch.equal(rec.entries[-1][2], sel)
    want, _ = routed_attention_reference(q, k_ref, v, k_cur, v_cur, sel, T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # not vacuous: absolute positions give another answer
    plain = CachedAttention(cache, "sdpa", routing=spec)(q, k_cur, v_cur, 0)
    assert not torch.allclose(plain, got, atol=1e-4)


H, W = 2, 14


def _ctx(seed, b=1):
    return torch.randn(b, 5, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("routing, layers", [(None, None), (RoutingSpec("window", sink_chunks=1, window_chunks=2), None),
                                             (RoutingSpec("topk", top_k=1, sink_chunks=1), None),
                                             (RoutingSpec("topk", top_k=1), [1])],
                         ids=["dense", "window", "topk", "topk-layer1"])
def test_rollouts_with_a_horizon(routing, layers):
    model = tiny_model()
    opts = SamplingOptions(steps=2, cfg_scale=2.0, routing=routing, routing_layers=layers)
    kw = dict(neg_context=_ctx(2), seed=5, decode=False)
    absolute = sample(model, _ctx(1), 6, (H, W), options=opts, **kw).latents
    # a horizon no rollout reaches changes nothing, bit for bit
    wide = sample(model, _ctx(1), 6, (H, W), options=dataclasses.replace(opts, rope_horizon=6), **kw).latents
    assert torch.equal(wide, absolute)
    near = dataclasses.replace(opts, rope_horizon=2)
    got = sample(model, _ctx(1), 6, (H, W), options=near, **kw).latents
    # the first 3 chunks see no chunk beyond 2 back: the same; later ones differ
    cf = model.cfg.chunk_frames
    assert torch.equal(got[:, :, :3 * cf], absolute[:, :, :3 * cf])
    assert not torch.allclose(got[:, :, 3 * cf:], absolute[:, :, 3 * cf:], atol=1e-4)
    # the bounded cache reads the same repositioned keys: bit for bit
    bounded = sample(model, _ctx(1), 6, (H, W), options=dataclasses.replace(near, kv_resident_chunks=1), **kw)
    assert torch.equal(bounded.latents, got)


def test_horizon_settings_and_errors():
    cfg = tiny_run_config(data=dict(num_frames=12))  # 6 chunks of 2 frames: distances up to 5 chunks
    assert SamplingOptions.from_config(cfg, rope_horizon="train").rope_horizon == 5
    assert SamplingOptions.from_config(cfg).rope_horizon is None
    wan = tiny_run_config(data=dict(num_frames=81, height=16, width=16), encoders=dict(vae="wan"),
                          model=dict(in_channels=16, out_channels=16, chunk_frames=3))
    assert training_horizon(wan) == 6  # 81 frames = 21 latent frames (Wan VAE) = 7 chunks of 3
    assert SamplingOptions.from_config(tiny_run_config(attention=dict(rope_horizon=3))).rope_horizon == 3
    for bad in (0, -1, True, 2.5, "far"):
        with pytest.raises(ValueError, match=r"^rope_horizon must be an int >= 1"):
            SamplingOptions(rope_horizon=bad)
        with pytest.raises(ValueError, match=r"^rope_far_at must be an int >= 1"):
            SamplingOptions(rope_horizon=2, rope_far_at=bad)
    with pytest.raises(ValueError, match=r"^rope_far_at needs rope_horizon"):
        SamplingOptions(rope_far_at=3)
    assert SamplingOptions.from_config(cfg, rope_horizon=4, rope_far_at=1).rope_far_at == 1
    from resampling_forcing.config import ConfigError

    with pytest.raises(ConfigError, match=r"^attention.rope_horizon must be an int >= 1"):
        tiny_run_config(attention=dict(rope_horizon=0))
    with pytest.raises(ConfigError, match=r"^attention.rope_far_at needs attention.rope_horizon"):
        tiny_run_config(attention=dict(rope_far_at=2))


def test_cli_rope_horizon(tmp_path, capsys):
    mod = load_sample_cli()
    base = ["--checkpoint", str(REPO / "assets" / "tiny-pretrained"), "--prompt", "a red circle bouncing",
            "--num-chunks", "3", "--steps", "1", "--device", "cpu", "--quiet"]
    assert mod.main(base + ["--rope-horizon", "train", "--output", str(tmp_path / "a.mp4")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["sampling"]["rope_horizon"] == training_horizon(
        Pipeline.from_pretrained(REPO / "assets" / "tiny-pretrained").config)
    assert mod.main(base + ["--rope-horizon", "1", "--rope-far-at", "3", "--output", str(tmp_path / "b.mp4")]) == 0
    rec = json.loads((tmp_path / "b.json").read_text())["sampling"]
    assert (rec["rope_horizon"], rec["rope_far_at"]) == (1, 3)
    capsys.readouterr()
    for bad, says in ((["--rope-horizon", "0"], "--rope-horizon must be an int >= 1"),
                      (["--rope-horizon", "far"], "--rope-horizon must be an int >= 1"),
                      (["--rope-far-at", "2"], "--rope-far-at needs --rope-horizon")):
        assert mod.main(base + bad + ["--output", str(tmp_path / "x.mp4")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert not (tmp_path / "x.mp4").exists()


def test_bench_far_positions_runs(tmp_path):
    """bench/far_positions.py at a tiny shape: every (history, routing) row, both timings."""
    mod = load_script("bench/far_positions.py", "far_positions")
    out = tmp_path / "fp.json"
    assert mod.main(["--tokens", "10", "--heads", "2", "--head-dim", "12", "--histories", "4,7", "--horizon", "2",
                     "--top-k", "1", "--reps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["history"], r["mode"]) for r in rows] == [(n, m) for n in (4, 7) for m in ("dense", "window", "top1")]
    assert all(r["absolute_s"] > 0 and r["horizon_s"] > 0 for r in rows)


def test_bench_sink_attention_counterfactual_at_the_true_distance(tmp_path):
    """bench/sink_attention.py: reading the sink at its own distance reproduces the rollout's share."""
    mod = load_script("bench/sink_attention.py", "sink_attention")
    out = tmp_path / "s.json"
    assert mod.main(["--clips", "1", "--chunk", "6", "--distances", "2,6", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["absolute_distance"] == 6
    assert res["share"]["6"] == pytest.approx(res["absolute_share"], abs=1e-5)
    assert res["share"]["2"] != pytest.approx(res["absolute_share"], abs=1e-3)


def test_bench_rope_period_pairs_runs_per_clip(tmp_path):
    """bench/rope_period.py: a horizon beyond the rollout reproduces the absolute run, so every paired
    difference is exactly 0 (p 1); a near one differs."""
    mod = load_script("bench/rope_period.py", "rope_period")
    out = tmp_path / "r.json"
    assert mod.main(["--routing", "sink1_window4", "--rope-horizon", "none,40,4:12", "--frames", "36", "--clips", "2",
                     "--split", "validation", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["split"] == "validation"
    same, moved = res["routing"]["sink1_window4@horizon_40"], res["routing"]["sink1_window4@horizon_4_at_12"]
    assert same["vs_absolute"]["mean"] == 0 and same["vs_absolute"]["p"] == 1
    assert all(d["mean"] == 0 for d in same["metrics_vs_absolute"].values())
    assert moved["fidelity_per_clip"] != res["routing"]["sink1_window4"]["fidelity_per_clip"]


def _far_plan(monkeypatch, layout):
    """Force the torch path's plan: (dense chunks per head, sparse layout), or None (the cost model's)."""
    import resampling_forcing.attention.routed_torch as R

    orig, seen = R._plan_history, []

    def plan(sel, T, D, **kw):
        p = orig(sel, T, D, **kw) if layout is None else orig(sel, T, D, force_dense=layout[0],
                                                                force_layout=layout[1], **kw)
        seen.append(p.kind)
        return p

    monkeypatch.setattr(R, "_plan_history", plan)
    return seen


def _far_sel(b, hh, lq, n, k, pattern, g):
    """Top-k picks: "random" (each token its own), "coherent" (sink + most recent for most tokens)."""
    scores = torch.rand(b, hh, lq, n, generator=g)
    if pattern == "coherent":
        scores[..., [0] + list(range(n - k + 1, n))] += 2.0
        scores[:, :, 1::4] = torch.rand(b, hh, len(range(1, lq, 4)), n, generator=g)  # outliers
    return scores >= scores.topk(k, dim=-1).values[..., -1:]


# the torch path under each plan (dense chunks per head, sparse layout; None: the cost model's), and the
# kernel (which has no plan)
FAR_CASES = [("torch", None), ("torch", (0, "padded")), ("torch", (0, "per-chunk")), ("torch", (1, "padded")),
             ("torch", (2, "per-chunk")), ("torch", (100, None)), ("triton", None)]


@pytest.mark.parametrize("backend, layout", FAR_CASES, ids=lambda x: x if isinstance(x, str) else
                         "auto" if x is None else "-".join(map(str, x)))
@pytest.mark.parametrize("pattern, k", [("random", 1), ("random", 3), ("coherent", 3)])
@pytest.mark.parametrize("packed", [False, True])
def test_routed_attention_reads_far_chunks_at_their_positions(monkeypatch, backend, layout, pattern, k, packed):
    """routed_attention(positions=...) == the reference over keys RoPE'd at the remapped positions,
    for every torch-path plan (dense blocks, padded / per-chunk rows: the queries turned back) and the
    kernel (a rotated copy), packed (a bounded cache's staged chunks) or not; horizon 3 read at 5
    (shifts of both signs and 0 among the far chunks), odd shapes."""
    seen = _far_plan(monkeypatch, layout)
    b, hh, cf, rows, cols, d, n, horizon, at = 2, 3, 1, 1, 7, 16, 9, 3, 5
    T = cf * rows * cols
    g = torch.Generator().manual_seed(k + 10 * packed)
    x = torch.randn(b, hh, n * T, d, generator=g)
    v = torch.randn(b, hh, n * T, d, generator=g)
    absolute = _rope(x, torch.arange(n * cf), rows, cols)
    want_k = _rope(x, _positions(n, horizon, cf, at), rows, cols)
    frames_now = torch.arange(n * cf, (n + 1) * cf)
    q = _rope(torch.randn(b, hh, T, d, generator=g), frames_now, rows, cols)
    k_cur = _rope(torch.randn(b, hh, 5, d, generator=g), frames_now[:1], 1, 5)
    v_cur = torch.randn(b, hh, 5, d, generator=g)
    sel = _far_sel(b, hh, T, n, k, pattern, g)
    pos = FarPositions(horizon, rope_frame_freqs(d, THETA), cf, at)
    ids = [0, 1, 3, 4, 7, 8] if packed else list(range(n))
    cols_of = lambda t: torch.cat([t[:, :, i * T:(i + 1) * T] for i in ids], dim=2)  # noqa: E731
    sel_p = sel[..., ids]
    got, got_lse = routed_attention(q, cols_of(absolute), cols_of(v), k_cur, v_cur, sel_p, T, backend=backend,
                                    packed=(ids, n) if packed else None, positions=pos)
    want, want_lse = routed_attention_reference(q, cols_of(want_k), cols_of(v), k_cur, v_cur, sel_p, T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5)
    if backend == "torch":
        assert seen == ["blocks"]
    # not vacuous: absolute positions give another answer
    plain, _ = routed_attention_reference(q, cols_of(absolute), cols_of(v), k_cur, v_cur, sel_p, T)
    assert not torch.allclose(plain, got, atol=1e-4)


@pytest.mark.parametrize("layout", [(0, "padded"), (0, "per-chunk"), (2, "per-chunk")],
                         ids=lambda x: "-".join(map(str, x)))
def test_far_chunks_gradients_equal_the_rotated_twin(monkeypatch, layout):
    """Outputs and gradients (q, keys, values) of the torch path with positions == the reference over
    `positions.keys(...)` (fp64)."""
    _far_plan(monkeypatch, layout)
    b, hh, n, T, d = 1, 2, 7, 5, 12
    g = torch.Generator().manual_seed(3)
    ins = [torch.randn(b, hh, L, d, generator=g, dtype=torch.float64).requires_grad_()
           for L in (T, n * T, n * T, T, T)]
    sel = _far_sel(b, hh, T, n, 2, "random", g)
    pos = FarPositions(2, rope_frame_freqs(d, THETA), 1, 4)
    out, lse = routed_attention(*ins, sel, T, backend="torch", positions=pos)
    grads = torch.autograd.grad(out.pow(2).sum() + lse.sum(), ins)
    ref_in = [t.detach().clone().requires_grad_() for t in ins]
    k_ref = pos.keys(ref_in[1], T, n)
    ref, ref_lse = routed_attention_reference(ref_in[0], k_ref, *ref_in[2:], sel, T)
    ref_grads = torch.autograd.grad(ref.pow(2).sum() + ref_lse.sum(), ref_in)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-8)


def test_window_chunks_given_read_far_chunks_at_their_positions():
    """The uniform plan (chunks every query reads, given by the caller) turns the far ones in its gathered copy."""
    b, hh, n, T, d = 1, 2, 8, 6, 16
    g = torch.Generator().manual_seed(4)
    q, kh, vh, kc, vc = (torch.randn(b, hh, L, d, generator=g) for L in (T, n * T, n * T, T, T))
    pos = FarPositions(3, rope_frame_freqs(d, THETA), 1)
    chunks = [0, 1, 6, 7]
    sel = torch.zeros(b, hh, T, n, dtype=torch.bool)
    sel[..., chunks] = True
    got, _ = routed_attention(q, kh, vh, kc, vc, sel, T, backend="torch", chunks=chunks, positions=pos)
    want, _ = routed_attention_reference(q, pos.keys(kh, T, n), vh, kc, vc, sel, T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, routed_attention_reference(q, kh, vh, kc, vc, sel, T)[0], atol=1e-4)
