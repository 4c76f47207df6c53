"""Exposure-gap diagnostic (resampling_forcing/diagnose.py): known answers on tiny models.

- teacher forcing degrades nothing: exactly 0;
- noise augmentation with std sigma: the per-chunk error is a mean of M squared N(0, sigma^2)
  draws, so E = sigma^2 and std = sigma^2 sqrt(2 / M); we allow 5 std (a false failure has
  probability < 1e-6 per chunk; the draws are seeded, so the test is deterministic anyway);
- a model whose samples are the truth (an oracle) has zero one-step and rollout error, and the
  one-pass one-step error equals separate rollouts from the true history with the same noise;
- the shift sweep is monotone in s with common random numbers; recommend_shift's rule;
- the CLI on a tiny checkpoint; the trainer's gap logging leaves training bit-identical.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import save_checkpoint_for_tests, tiny_model
from resampling_forcing.diagnose import (GapReport, ShiftRecommendation, chunk_mse, degradation_error,
                                         exposure_gap, main, one_step_error, recommend_shift, rollout_error,
                                         sweep_shift)
from resampling_forcing.resampling import DegradeSettings
from resampling_forcing.sampler import Rollout, SamplingOptions

CF = 2  # tiny_model's chunk_frames


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _data(b=2, chunks=4, hw=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, chunks * CF, hw, hw, generator=g),
            torch.randn(b, 5, 8, generator=g))


class Oracle(torch.nn.Module):
    """A model whose samples are the truth: it runs the real model (so the KV cache fills as usual)
    and replaces the denoising velocity by (x_t - truth) / t, whose Euler steps land on the true
    chunk at `frame_offset` (exactly at t = 0). `shift` chunks of offset make a deliberately wrong one."""

    def __init__(self, model, truth, shift=0):
        super().__init__()
        self.inner, self.cfg, self.truth, self.shift = model, model.cfg, truth, shift

    def text_kv(self, context):
        return self.inner.text_kv(context)

    def chunk_tokens(self, h, w):
        return self.inner.chunk_tokens(h, w)

    def forward(self, x, t, context=None, *, attn, frame_offset=0, text_kv=None):
        v = self.inner(x, t, context, attn=attn, frame_offset=frame_offset, text_kv=text_kv)
        t = t.reshape(-1).float()
        if bool((t == 0).all()):  # the cache-writing pass
            return v
        start = frame_offset + self.shift * CF
        truth = self.truth[:, :, start:start + x.shape[2]].repeat(x.shape[0] // self.truth.shape[0], 1, 1, 1, 1)
        return (x - truth) / t.reshape(-1, 1, 1, 1, 1)


def test_teacher_forcing_degradation_is_exactly_zero():
    model = tiny_model()
    x, ctx = _data()
    err = degradation_error(model, x, ctx, DegradeSettings("teacher_forcing"))
    assert err.dtype == torch.float32 and torch.equal(err, torch.zeros(4))


def test_noise_augmentation_error_is_sigma_squared():
    model = tiny_model()
    sigma = 0.3
    x, ctx = _data(b=4, hw=16)
    m = x[:, :, :CF].numel()  # 8192 elements per chunk
    tol = 5 * sigma**2 * math.sqrt(2 / m)  # 5 standard deviations of a mean of m sigma^2 chi^2_1 draws
    err = degradation_error(model, x, ctx, DegradeSettings("noise_augmentation", noise_scale=sigma), seed=3)
    assert err.shape == (4,) and torch.isfinite(err).all()
    assert (err - sigma**2).abs().max() < tol, (err, tol)
    # a mean over all chunks has 4x the elements: half the tolerance
    assert abs(float(err.mean()) - sigma**2) < tol / 2
    # seeded: same seed, same numbers; another seed, other numbers
    again = degradation_error(model, x, ctx, DegradeSettings("noise_augmentation", noise_scale=sigma), seed=3)
    other = degradation_error(model, x, ctx, DegradeSettings("noise_augmentation", noise_scale=sigma), seed=4)
    assert torch.equal(err, again) and not torch.equal(err, other)


def test_resampling_leaves_the_last_chunk_nan():
    model = tiny_model()
    x, ctx = _data()
    err = degradation_error(model, x, ctx, DegradeSettings("resampling", shift=2.0))
    assert math.isnan(err[-1]) and torch.isfinite(err[:-1]).all() and (err[:-1] > 0).all()
    par = degradation_error(model, x, ctx, DegradeSettings("parallel_resampling", shift=2.0))
    assert torch.isfinite(par).all() and (par > 0).all()  # parallel resampling degrades every chunk
    # chunk 0 has no history: autoregressive and parallel resampling agree on it (same draws)
    assert torch.allclose(err[0], par[0], rtol=1e-5)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_oracle_has_zero_one_step_and_rollout_error(cfg_scale):
    x, ctx = _data()
    oracle = Oracle(tiny_model(), x).eval()
    opts = SamplingOptions(steps=3, shift=3.0, cfg_scale=cfg_scale)
    neg = torch.zeros(1, 5, 8)
    one = one_step_error(oracle, x, ctx, opts, neg_context=neg)
    roll = rollout_error(oracle, x, ctx, opts, context_chunks=2, neg_context=neg)
    assert math.isnan(one[0]) and (one[1:] < 1e-10).all(), one
    assert torch.isnan(roll[:2]).all() and (roll[2:] < 1e-10).all(), roll
    # the check can fail: an oracle one chunk off has a large error
    wrong = Oracle(tiny_model(), torch.cat([x, x], dim=2), shift=1).eval()
    assert (one_step_error(wrong, x, ctx, opts, neg_context=neg)[1:] > 0.5).all()


def test_one_step_error_equals_separate_rollouts_from_the_true_history():
    model = tiny_model()
    x, ctx = _data()
    opts = SamplingOptions(steps=2, shift=3.0, cfg_scale=1.0)
    one = one_step_error(model, x, ctx, opts, seed=5)
    for i in range(1, 4):
        ro = Rollout(model, ctx, latent_hw=(8, 8), options=opts, seed=5)
        ro.prefill(x[:, :, :i * CF])
        for _ in range(i - 1):  # chunk i uses the i-th noise draw of each sample, as in one pass
            ro.noise(ro.chunk_shape, ro.device)
        ref = chunk_mse(ro.next_chunk(), x[:, :, i * CF:(i + 1) * CF], CF)[0]
        assert torch.allclose(one[i], ref, rtol=1e-5, atol=0), (i, one[i], ref)
    # chunk 1 of the one-step pass and of a rollout from chunk 0 are the same sample
    roll = rollout_error(model, x, ctx, opts, context_chunks=1, seed=5)
    assert torch.allclose(one[1], roll[1], rtol=1e-5) and (roll[2:] > 0).all()


def test_rollout_error_nan_before_context_and_range_checks():
    model = tiny_model()
    x, ctx = _data(chunks=5)
    opts = SamplingOptions(steps=2, shift=3.0, cfg_scale=1.0)
    roll = rollout_error(model, x, ctx, opts, context_chunks=3)
    assert torch.isnan(roll[:3]).all() and torch.isfinite(roll[3:]).all()
    for bad in (0, 5):
        with pytest.raises(ValueError, match="context_chunks"):
            rollout_error(model, x, ctx, opts, context_chunks=bad)


def test_exposure_gap_report_ratio_rule_and_horizon():
    model = tiny_model()
    x, ctx = _data(chunks=5)
    opts = SamplingOptions(steps=2, shift=3.0, cfg_scale=1.0)
    rep = exposure_gap(model, x, ctx, DegradeSettings("resampling", shift=2.0), opts, context_chunks=1, horizon=4)
    assert rep.chunks == [1, 2]  # generated chunks that are history within a 4-chunk rollout
    assert len(rep.degradation) == len(rep.one_step) == len(rep.rollout) == 5
    assert all(math.isfinite(v) for v in rep.degradation[:4]) and math.isnan(rep.degradation[4])
    assert all(math.isnan(v) for v in rep.rollout[4:] + rep.one_step[4:] + rep.rollout[:1])  # past the horizon
    assert rep.ratio == pytest.approx((rep.degradation[1] + rep.degradation[2]) / (rep.rollout[1] + rep.rollout[2]))
    d = rep.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["rollout"][0] is None and d["ratio"] == pytest.approx(rep.ratio)
    assert len(rep.table().splitlines()) == 1 + 5 + 2
    for c, h in ((1, 2), (0, 4), (2, 6)):
        with pytest.raises(ValueError, match="horizon"):
            exposure_gap(model, x, ctx, DegradeSettings(), opts, context_chunks=c, horizon=h)
    # the rule by hand
    hand = GapReport([1, 2, 3, 4, math.nan], [math.nan] * 5, [math.nan, 4, 8, 8, 16], 1, 5)
    assert hand.chunks == [1, 2, 3] and hand.ratio == pytest.approx(3 / (20 / 3))
    assert math.isnan(GapReport([0.0] * 3, [0.0] * 3, [math.nan, 0.0, 0.0], 1, 3).ratio)  # exact rollout


def test_sweep_is_monotone_with_common_random_numbers():
    model = tiny_model()
    x, ctx = _data()
    settings = DegradeSettings("resampling")
    shifts = [0.3, 0.6, 1.0, 2.0, 4.0, 8.0, 16.0]
    sweep = sweep_shift(model, x, ctx, settings, shifts, seed=7)
    values = [sweep[s] for s in shifts]
    assert list(sweep) == shifts and all(a < b for a, b in zip(values, values[1:])), values
    # each value is the degradation error at that shift with the same seed, over chunks 0..N-2
    one = degradation_error(model, x, ctx, DegradeSettings("resampling", shift=2.0), seed=7)
    assert sweep[2.0] == pytest.approx(float(one[:3].mean()), rel=1e-6)
    # teacher forcing / noise augmentation settings sweep the self-resampling degradation
    assert sweep_shift(model, x, ctx, DegradeSettings("noise_augmentation"), [2.0], seed=7) == {2.0: sweep[2.0]}
    assert sweep_shift(model, x, ctx, settings, [2.0], seed=7, chunks=[1])[2.0] == pytest.approx(float(one[1]))


def test_recommend_shift_rule():
    sweep = {1.0: 0.01, 2.0: 0.04, 4.0: 0.09, 8.0: math.nan}
    exact = recommend_shift(sweep, 0.04)
    assert isinstance(exact, ShiftRecommendation) and isinstance(exact, float)
    assert exact == 2.0 and exact.reached
    mid = recommend_shift(sweep, 0.02)  # log 0.02 is halfway between log 0.01 and log 0.04
    assert mid == pytest.approx(math.sqrt(2.0)) and mid.reached and "interpolated" in mid.rule
    assert mid * 2 == pytest.approx(2 * math.sqrt(2.0)) and mid.to_dict()["shift"] == float(mid)
    high = recommend_shift(sweep, 1.0)
    assert high == 4.0 and not high.reached and "NOT reached" in high.rule
    low = recommend_shift(sweep, 0.001)
    assert low == 1.0 and not low.reached
    # the rule (report.json's text) names the error it matched: the one-step target said "rollout error"
    assert "= rollout error 0.02" in mid.rule
    one = recommend_shift(sweep, 0.02, "one-step error")
    assert one == mid and "= one-step error 0.02" in one.rule and "rollout" not in one.rule
    assert "above the one-step error" in recommend_shift(sweep, 0.001, "one-step error").rule
    with pytest.raises(ValueError):
        recommend_shift(sweep, 0.0)
    with pytest.raises(ValueError):
        recommend_shift({1.0: math.nan}, 0.1)


# ----------------------------------------------------------------------------- CLI


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    run = save_checkpoint_for_tests(tmp_path / "run")
    out = tmp_path / "report.json"
    code = main(["--checkpoint", str(run), "--clips", "2", "--shifts", "0.6,2", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "degradation" in text and "ratio degradation / rollout over chunks 1-4" in text
    assert "shift sweep" in text and "recommended resampling shift s = " in text and "upper bound s = " in text
    rep = json.loads(out.read_text())
    assert rep["chunks"] == 6 and len(rep["report"]["rollout"]) == 6 and rep["report"]["rollout"][0] is None
    assert [p["shift"] for p in rep["sweep"]["shifts"]] == [0.6, 2.0]
    # the recommendation matches the one-step error, the upper bound the rollout error (docs/results.md#ablation)
    assert "one-step error" in rep["recommendation"]["rule"] and "rollout error" in rep["upper_bound"]["rule"]
    printed = float(text.split("recommended resampling shift s = ")[1].split()[0])
    assert printed == pytest.approx(rep["recommendation"]["shift"], rel=1e-2)
    # --resample-cfg: the resampling rollout's guidance, in the degradation measured and said
    assert rep["degradation"]["cfg_scale"] == 1.0 and "Euler step(s), cfg" not in text
    code = main(["--checkpoint", str(run), "--clips", "2", "--shifts", "2", "--resample-cfg", "2", "--out", str(out),
                 "--overwrite"])  # replaces the report above
    guided, text = json.loads(out.read_text()), capsys.readouterr().out
    assert code == 0 and guided["degradation"]["cfg_scale"] == 2.0 and "1 Euler step(s), cfg 2" in text
    assert guided["report"]["degradation_mean"] != rep["report"]["degradation_mean"]
    assert main(["--checkpoint", str(run), "--resample-cfg", "-1"]) == 2
    assert "--resample-cfg must be in [0, 100]" in capsys.readouterr().err


def test_cli_reads_a_synthetic_dir(tmp_path, capsys):
    from resampling_forcing.data.synthetic_dataset import make_dataset

    run = save_checkpoint_for_tests(tmp_path / "run")
    make_dataset(tmp_path / "syn", num_videos=2, frames=12, size=8, fps=4.0)
    code = main(["--checkpoint", str(run), "--data", str(tmp_path / "syn"), "--clips", "2", "--shifts", "1",
                 "--horizon", "4", "--batch", "1"])
    text = capsys.readouterr().out
    assert code == 0 and "over chunks 1-2" in text


@pytest.mark.parametrize("args", [
    ["--checkpoint", "/nonexistent/run"],
    ["--shifts", "1,x"],
    ["--horizon", "2"],
    ["--clips", "0"],
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args):
    if args[0] != "--checkpoint":
        args = ["--checkpoint", str(save_checkpoint_for_tests(tmp_path / "run")), "--clips", "1"] + args
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("diagnose: error: "), err


# ----------------------------------------------------------------------------- trainer logging


def test_trainer_logs_the_gap_and_stays_bit_identical(tmp_path):
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from resampling_forcing.config import load_config
    from resampling_forcing.models.loading import load_model
    from resampling_forcing.training import train
    from train_helpers import TINY_YAML, read_log, small_overrides

    def run(name, *extra):
        cfg = load_config(TINY_YAML, small_overrides(tmp_path / name, tmp_path / "syn", steps_tf=2, steps_rf=2,
                                                     **{"train.save_every": 100}) + list(extra))
        try:
            train(cfg)
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            PartialState._reset_state()
        return read_log(tmp_path / name), load_model(tmp_path / name / "checkpoints" / "step_0000004").state_dict()

    off_log, off = run("off")
    on_log, on = run("on", "train.gap_every=2", "train.gap_clips=3", "train.gap_sample_steps=2")
    keys = ("gap_degradation", "gap_one_step", "gap_rollout", "gap_ratio")
    assert [all(k in r for k in keys) for r in on_log] == [False, True, False, True]
    assert not any(k in r for r in off_log for k in keys)
    tf, rf = on_log[1], on_log[3]
    assert tf["gap_degradation"] == 0.0 and tf["gap_ratio"] == 0.0  # teacher forcing degrades nothing
    assert tf["gap_next_stage"] == "rf" and tf["gap_next_degradation"] > 0 and "gap_next_ratio" in tf
    assert "gap_next_stage" not in rf
    for r in (tf, rf):
        assert r["gap_rollout"] > 0 and r["gap_one_step"] > 0
        assert r["gap_ratio"] == pytest.approx(r["gap_degradation"] / r["gap_rollout"])
    assert rf["gap_degradation"] > 0
    # the diagnostic changes nothing in the training: same losses, bit-identical weights
    assert [r["loss"] for r in on_log] == [r["loss"] for r in off_log]
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
