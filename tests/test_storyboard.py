"""Issue 14: prompt switching (storyboards) on the sampler, the pipeline and the CLI.

- a one-entry storyboard is the plain call, bit for bit;
- a switch at chunk s leaves chunks < s bit-identical to the no-switch rollout and changes the
  chunks from s on;
- "recache" re-writes the cached history under the new text: it equals a fresh rollout on the new
  text prefilled with the same history latents (same noise from then on), and re-caching under
  the SAME text changes nothing.
"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from resampling_forcing.sampler import Rollout, SamplingOptions, check_storyboard, sample
from helpers import tiny_model

H, W = 2, 14
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny-pretrained"


def _ctx(seed, b=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 5, 8, generator=g)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_sampler_storyboard_one_entry_and_switch(cfg_scale):
    model = tiny_model()
    opts = SamplingOptions(steps=2, cfg_scale=cfg_scale)
    a, b, neg = _ctx(1), _ctx(2), _ctx(3)
    kw = dict(neg_context=neg, options=opts, seed=4, decode=False)
    plain = sample(model, a, 5, (H, W), **kw).latents
    one = sample(model, None, 5, (H, W), storyboard=[(0, a)], **kw).latents
    assert torch.equal(plain, one)
    cf = model.cfg.chunk_frames
    for mode in ("keep", "recache"):
        sw = sample(model, a, 5, (H, W), storyboard=[(3, b)], switch_cache=mode, **kw).latents
        assert torch.equal(sw[:, :, :3 * cf], plain[:, :, :3 * cf]), mode
        for c in range(3, 5):
            assert not torch.equal(sw[:, :, c * cf:(c + 1) * cf], plain[:, :, c * cf:(c + 1) * cf]), (mode, c)
    keep = sample(model, a, 5, (H, W), storyboard=[(3, b)], **kw).latents
    rec = sample(model, a, 5, (H, W), storyboard=[(3, b)], switch_cache="recache", **kw).latents
    assert not torch.equal(keep[:, :, 3 * cf:], rec[:, :, 3 * cf:])
    # re-caching under the same text is a no-op
    same = sample(model, a, 5, (H, W), storyboard=[(2, a)], switch_cache="recache", **kw).latents
    assert torch.equal(same, plain)


@pytest.mark.parametrize("context_t", [0.0, 0.3])
def test_recache_equals_fresh_rollout_on_the_new_text(context_t):
    model = tiny_model()
    opts = SamplingOptions(steps=2, cfg_scale=2.0, context_t=context_t)
    a, b, neg = _ctx(1, 2), _ctx(2, 2), _ctx(3)
    ro = Rollout(model, a, latent_hw=(H, W), neg_context=neg, options=opts, seed=7)
    chunks = [ro.next_chunk() for _ in range(3)]
    ro.flush()
    written = list(ro.written)
    noise_state = [g.get_state() for g in ro.noise.generators]
    ro.set_context(b, recache=True)
    got = ro.next_chunk()

    fresh = Rollout(model, b, latent_hw=(H, W), neg_context=neg, options=opts, seed=7)
    for x in written:  # the same model inputs (re-noised ones for context_t > 0)
        _write_exact(fresh, x)
    for g, st in zip(fresh.noise.generators, noise_state):
        g.set_state(st)
    want = fresh.next_chunk()
    assert torch.equal(got, want)
    assert len(chunks) == 3


def _write_exact(ro, x):
    """Write a chunk whose (already re-noised) model input is x: no re-noising, t = context_t."""
    opts, t_of = ro.options, ro._t
    ro.options = dataclasses.replace(opts, context_t=0.0)
    ro._t = lambda _t: t_of(opts.context_t)
    try:
        ro.write_chunk(x)
    finally:
        ro.options, ro._t = opts, t_of


def test_set_context_checks_shape():
    model = tiny_model()
    ro = Rollout(model, _ctx(1), latent_hw=(H, W), options=SamplingOptions(steps=1, cfg_scale=1.0))
    with pytest.raises(ValueError, match="context must be"):
        ro.set_context(_ctx(1, 2))


def test_check_storyboard_errors():
    assert check_storyboard([(8, "b"), (0, "a")], 10) == [(0, "a"), (8, "b")]
    with pytest.raises(ValueError, match="only 4 chunks"):
        check_storyboard([(0, "a"), (4, "b")], 4)
    with pytest.raises(ValueError, match="two entries for chunk 2"):
        check_storyboard([(2, "a"), (2, "b")])
    with pytest.raises(ValueError, match="int >= 0"):
        check_storyboard([(-1, "a")])
    with pytest.raises(ValueError, match="empty"):
        check_storyboard([])
