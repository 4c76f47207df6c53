"""Flow matching (method.md section 2): noising, targets, timestep samplers, Euler schedule.

Convention: x_t = (1 - t) x + t eps with t in [0, 1]; t = 1 is pure noise. The velocity is
v = eps - x, so an Euler step from t to t' is x_t' = x_t + (t' - t) v.
"""
from __future__ import annotations

from typing import Union

import torch


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast t of shape [B] to like's [B, ...]."""
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))


def add_noise(x: torch.Tensor, eps: torch.Tensor, t: Union[torch.Tensor, float]) -> torch.Tensor:
    """x_t = (1 - t) x + t eps for latents x, eps [B, C, F, H, W] (any shape with the batch first). `t` is a
    number, [B], or any shape that broadcasts after the batch dim (e.g. [B, 1, F, 1, 1] per frame)."""
    if isinstance(t, torch.Tensor):
        t = _bcast(t.to(x.dtype), x)
    return (1 - t) * x + t * eps


def velocity_target(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching target v = eps - x (d x_t / dt), shaped as x [B, C, F, H, W]."""
    return eps - x


def velocity_loss(v: torch.Tensor, target: torch.Tensor, chunk_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE of velocity [B, C, F, H, W] -> (scalar loss, per-chunk loss [B, N]) in fp32."""
    err = (v.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    per_chunk = err.unflatten(1, (-1, chunk_frames)).mean(-1)
    return per_chunk.mean(), per_chunk


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - t v: the clean estimate of x_t, v [B, C, F, H, W] at t (a number, [B] or broadcastable)."""
    return x_t - _bcast(t.to(x_t.dtype), x_t) * v


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, min_t: float) -> torch.Tensor:
    """v = (x_t - x0) / t, with t clamped below at min_t (at t -> 0 the ratio is ill-posed)."""
    return (x_t - x0) / _bcast(t.to(x_t.dtype).clamp_min(min_t), x_t)


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift s*t / (1 + (s - 1) t): s > 1 pushes toward noise, s < 1 toward clean."""
    return shift * t / (1 + (shift - 1) * t)


def sample_logit_normal(shape, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                        generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """t = shift(sigmoid(N(mean, std))): the training-timestep law (per chunk) and, with
    shift = 0.6, the self-resampling strength t_s (per video; median 0.6*.5/(1-.4*.5) = 0.375)."""
    u = torch.randn(shape, generator=generator, device=device) * std + mean
    return shift_t(torch.sigmoid(u), shift)


def euler_schedule(steps: int, shift: float, t_start: float = 1.0, device=None) -> torch.Tensor:
    """Timesteps t_0 = t_start > ... > t_steps = 0 for `steps` Euler steps, shifted like Wan.

    Uniform grid on [t_start, 0] in the unshifted variable, then `shift_t`. With t_start < 1 the
    grid starts from the unshifted preimage of t_start, so the first timestep is exactly t_start.
    Returns [steps + 1] float32.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one Euler step")
    # Preimage of t_start under shift_t: u = t / (s - (s - 1) t).
    u0 = t_start / (shift - (shift - 1) * t_start)
    u = torch.linspace(u0, 0.0, steps + 1, dtype=torch.float64)
    return shift_t(u, shift).to(device=device, dtype=torch.float32)


def euler_step(x_t: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor, t_next: float | torch.Tensor) -> torch.Tensor:
    """One Euler step of dx/dt = v from t to t_next: x_t, v [B, C, F, H, W] -> x at t_next."""
    return x_t + (t_next - t) * v
