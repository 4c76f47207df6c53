"""training_step.py: the update under an fp16 loss scaler, and the step's metrics over processes
(the 2-process launch with bad videos is in test_train_launch.py)."""
from __future__ import annotations

import pytest
import torch

from resampling_forcing.training_step import merge_ts_stats, metrics_vector, optimizer_step, step_metrics, ts_stats
from train_helpers import fresh_accelerate_state  # noqa: F401 (fixture)


class GatherFromRanks:
    """A stand-in accelerator for `step_metrics`: this process plus the vectors the other ranks send."""

    def __init__(self, others):
        self.others, self.num_processes = others, 1 + len(others)

    def gather(self, vec):
        assert all(o.shape == vec.shape for o in self.others), "gather needs equal sizes on every rank"
        return torch.cat([vec, *self.others])


@pytest.mark.parametrize("sizes", [[(3, 2), (1,), ()], [(4,), (4,)], [(1,), ()], [(), ()]])
def test_step_metrics_equal_the_statistics_of_all_values(sizes):
    """Ranks with different numbers of t_s values (a micro-batch lost a bad video; none in teacher
    forcing) -> one fixed-size gather; mean / unbiased std / min / max equal those of all values at once,
    losses are averaged over ranks."""
    g = torch.Generator().manual_seed(0)
    ranks = []
    for r, micro in enumerate(sizes):
        ts = [torch.rand(n, generator=g, dtype=torch.float32) for n in micro]
        losses = [torch.rand((), generator=g) for _ in range(2)]
        chunks = [torch.rand(4, generator=g) for _ in range(2)]
        ranks.append((losses, chunks, ts))
    others = [metrics_vector(*r) for r in ranks[1:]]
    rec = step_metrics(GatherFromRanks(others), *ranks[0])
    every = [t for _, _, ts in ranks for t in ts]
    values = torch.cat(every).double() if every else torch.zeros(0, dtype=torch.float64)
    if values.numel() == 0:
        assert not any(k.startswith("t_s") for k in rec)
    else:
        assert rec["t_s_mean"] == pytest.approx(float(values.mean()), rel=1e-12)
        assert rec["t_s_std"] == pytest.approx(float(values.std()) if values.numel() > 1 else 0.0, rel=1e-9, abs=1e-12)
        assert (rec["t_s_min"], rec["t_s_max"]) == (float(values.min()), float(values.max()))
    per_rank_loss = torch.stack([torch.stack(r[0]).double().mean() for r in ranks])
    assert rec["loss"] == pytest.approx(float(per_rank_loss.mean()), rel=1e-12)
    per_rank_chunk = torch.stack([torch.stack(r[1]).double().mean(0) for r in ranks])
    assert rec["loss_chunk"] == pytest.approx(per_rank_chunk.mean(0).tolist(), rel=1e-12)


def test_ts_stats_of_no_value_merge_to_none():
    assert merge_ts_stats(torch.stack([ts_stats([], "cpu"), ts_stats([], "cpu")])) is None
    one = merge_ts_stats(ts_stats([torch.tensor([0.25])], "cpu")[None])
    assert one == {"t_s_mean": 0.25, "t_s_std": 0.0, "t_s_min": 0.25, "t_s_max": 0.25}


def _fp16_scaled_accelerator():
    """accelerate with a GradScaler as on a GPU under `mixed_precision: fp16` (accelerate builds none on
    CPU; torch's CPU GradScaler has the same step/update/unscale_ contract). A small initial scale: the
    prepared model runs under fp16 autocast, whose gradients overflow above 65504."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    return acc


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_update_after_an_fp16_overflow(clip):
    """A step whose scaled gradients overflow is skipped and lowers the scale; the next step updates
    (it raised "unscale_() has already been called" when the scaler's step/update were left out), and
    the norm returned is that of the unscaled gradients."""
    acc = _fp16_scaled_accelerator()
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(4, 5)
    before = [p.detach().clone() for p in model.parameters()]

    acc.backward(model(x).sum() * 1e35)  # overflows fp16 (the model runs under fp16 autocast)
    norm = optimizer_step(acc, opt, model.parameters(), clip)
    assert not torch.isfinite(torch.tensor(norm))
    assert acc.scaler.get_scale() == 2.0 ** 7
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())

    acc.backward(model(x).sum())
    grads = [p.grad.detach() / 2.0 ** 7 for p in model.parameters()]  # what unscaling must give
    expected_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    expected = [p.detach() - 0.1 * g * min(1.0, clip / (expected_norm + 1e-6) if clip > 0 else 1.0)
                for p, g in zip(model.parameters(), grads)]
    norm = optimizer_step(acc, opt, model.parameters(), clip)
    assert norm == pytest.approx(expected_norm, rel=1e-6)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
    assert acc.scaler.get_scale() == 2.0 ** 7  # no growth before growth_interval good steps


def test_update_without_a_scaler_skips_a_non_finite_norm():
    """Without a loss scaler a non-finite norm means no update at all (grads cleared)."""

    class NoScaler:
        scaler = None

        def unscale_gradients(self):
            pass

        def clip_grad_norm_(self, params, clip):
            return torch.nn.utils.clip_grad_norm_(params, clip)

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.ones(1, 3)).sum() * float("inf")).backward()
    for clip in (1.0, 0.0):
        if clip == 0.0:
            (model(torch.ones(1, 3)).sum() * float("nan")).backward()
        assert not torch.isfinite(torch.tensor(optimizer_step(NoScaler(), opt, model.parameters(), clip)))
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert all(p.grad is None for p in model.parameters())

