import math

import torch

from resampling_forcing import diffusion as D


def test_noising_and_targets_closed_form():
    x, eps = torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5)
    t = torch.tensor([0.0, 0.5, 1.0])
    xt = D.add_noise(x, eps, t)
    torch.testing.assert_close(xt[0], x[0])
    torch.testing.assert_close(xt[2], eps[2])
    torch.testing.assert_close(xt[1], 0.5 * x[1] + 0.5 * eps[1])
    v = D.velocity_target(x, eps)
    # x0 recovered from the true velocity, and the true velocity from x0
    torch.testing.assert_close(D.x0_from_velocity(xt, v, t), x)
    torch.testing.assert_close(D.velocity_from_x0(xt[1:2], x[1:2], t[1:2], 0.05), v[1:2])
    # one exact Euler step along the straight path lands on x
    torch.testing.assert_close(D.euler_step(xt[1], v[1], 0.5, 0.0), x[1])


def test_resample_t_median_and_law():
    """t_s = shift(sigmoid(N(0,1)), 0.6): median 0.6*0.5/(1-0.4*0.5) = 0.375; CDF at 0.5 known."""
    g = torch.Generator().manual_seed(0)
    ts = D.sample_logit_normal((400_000,), shift=0.6, generator=g)
    assert abs(ts.median().item() - 0.375) < 0.003
    # P(t_s <= 0.5): invert the shift, 0.5 -> u = 0.5/(0.6+0.4*0.5) = 0.625, then P(sigmoid(z) <= u)
    u = 0.5 / (0.6 + 0.4 * 0.5)
    want = 0.5 * (1 + math.erf(math.log(u / (1 - u)) / math.sqrt(2)))
    assert abs((ts <= 0.5).float().mean().item() - want) < 0.003
    assert ts.min() > 0 and ts.max() < 1


def test_shift_properties():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(D.shift_t(t, 1.0), t)
    s = D.shift_t(t, 5.0)
    assert s[0] == 0 and abs(s[-1].item() - 1) < 1e-7 and torch.all(s >= t)
    assert abs(D.shift_t(torch.tensor(0.5), 5.0).item() - 5 / 6) < 1e-7


def test_euler_schedule():
    ts = D.euler_schedule(32, 5.0)
    assert ts.shape == (33,) and ts[0] == 1 and ts[-1] == 0 and torch.all(ts[1:] < ts[:-1])
    # shift 5 spends more steps at high noise: the midpoint of the grid is 5/6
    assert abs(ts[16].item() - 5 / 6) < 1e-6
    part = D.euler_schedule(4, 3.0, t_start=0.4)
    assert abs(part[0].item() - 0.4) < 1e-6 and part[-1] == 0
