"""History degradation for training (method.md section 4): what the history stream H holds.

Four objectives share one entry point, :func:`degrade_history`:

- ``teacher_forcing``: H = the ground truth (identity).
- ``resampling`` (the method, autoregressive self-resampling): one t_s per video from the
  logit-normal law with shift s (paper 0.6); chunk by chunk, with NO gradient and the current
  online weights, noise the ground-truth chunk to t_s (z = (1 - t_s) x_i + t_s eps), run
  ``steps`` Euler steps from t_s to 0 conditioned on the already degraded chunks < i (read from
  the rollout KV cache of :mod:`resampling_forcing.cache`, exactly as at inference), and write the
  result into the cache with a pass at ``context_t`` (0) before moving on (context_t > 0: the result
  is first re-noised to context_t, as the sampler's cache write does; the history returned here is the
  clean result, which the trainer re-noises to context_t for its history stream, training.py).
- ``parallel_resampling`` (ablation): the same, but every chunk conditions on the GROUND-TRUTH
  history, so errors do not accumulate. Done in one dual forward per Euler step (history = ground
  truth, noised to context_t when that is > 0, noisy = all chunks at t_s), which is exactly "each
  chunk resampled on its own".
- ``noise_augmentation`` (ablation): H = x + scale * N(0, I) (history timestep stays 0).

Euler grid from t_s to 0: ``t_k = t_s (1 - k / steps)`` per video (uniform; with one step,
x~ = z - t_s v). With t_s = 0 every objective returns the ground truth exactly.

The last history chunk H_N is never attended in the dual layout (Q_i sees H_j only for j < i), so
the resampling objectives leave it as the ground truth and skip its cost (``include_last=True``
resamples it too, e.g. for inspection).

With history routing on (the last stage) pass the stage's ``RoutingSpec`` and ``routing_layers``:
the resampling rollout then routes exactly as inference does.

Ramp from teacher forcing (``DegradeSettings.ramp`` at level ``ramp_level`` = r in [0, 1]; the trainer
sets r = min(1, (steps into the stage + 1) / ramp_steps), see ``training_utils.ramp_at``):

- ``none``: the full degradation (the hard switch; r is ignored).
- ``probability``: each video's history is the degraded one with probability r, else the ground truth
  (the mask is drawn from ``generator`` after t_s and the noise, and only when r < 1, so at r = 1 the
  draws and the result are exactly those of ``none``). Only the selected videos are degraded (the
  rollout runs on that sub-batch), so the kept ones cost nothing; their returned t_s is 0 (what
  teacher forcing is). ``always_forward`` degrades one video even when none is selected and
  discards it, so every process makes the same forwards (DeepSpeed ZeRO-3 gathers weights in each).
- ``strength``: t_s -> r * t_s for the resampling objectives (t_s = 0 is teacher forcing exactly),
  the noise std -> r * noise_scale for noise augmentation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .attention.masks import MaskSpec
from .attention.ops import MaskedAttention
from .cache import CachedAttention, KVCache
from .config import OBJECTIVES, RAMPS, RESAMPLING_OBJECTIVES, DiffusionConfig, StageConfig
from .config_checks import check_degradation
from .diffusion import add_noise, sample_logit_normal


__all__ = [
    "OBJECTIVES",
    "RESAMPLING_OBJECTIVES",
    "RAMPS",
    "DegradeSettings",
    "sample_resample_t",
    "resample_grid",
    "autoregressive_resample",
    "autoregressive_resample_reference",
    "parallel_resample",
    "noise_augment",
    "degrade_history",
]


@dataclass
class DegradeSettings:
    """Everything a degradation pass needs besides the model and the data. The defaults are the
    config's (StageConfig, DiffusionConfig); the rules shared with a config stage are
    config_checks.check_degradation's."""

    objective: str = StageConfig.objective
    steps: int = StageConfig.resample_steps  # Euler steps from t_s to 0
    shift: float = DiffusionConfig.resample_shift  # t_s law: shift(sigmoid(N(0, 1)))
    noise_scale: float = StageConfig.noise_aug_scale  # noise_augmentation std
    cfg_scale: float = StageConfig.resample_cfg  # CFG while resampling (1 = off)
    backend: str = "sdpa"  # resolved attention backend
    routing: object | None = None  # attention.routing.RoutingSpec (None / dense = no routing)
    routing_layers: Optional[list[int]] = None
    context_t: float = DiffusionConfig.context_t  # timestep of the cache-writing pass
    ramp: str = StageConfig.ramp  # ramp from teacher forcing: none | probability | strength (module docstring)
    ramp_level: float = 1.0  # r in [0, 1]: probability of a degraded history, or the t_s / noise scale
    always_forward: bool = False  # probability ramp: run the model even when no video is selected

    def __post_init__(self):
        check_degradation(self.objective, self.steps, self.ramp, cfg_scale=self.cfg_scale)
        if not 0.0 <= self.ramp_level <= 1.0:  # not a config value: the trainer derives it (ramp_at)
            raise ValueError(f"ramp_level={self.ramp_level}: must be in [0, 1]")


def sample_resample_t(batch: int, shift: float, generator: torch.Generator | None = None,
                      device=None) -> torch.Tensor:
    """One t_s per video: shift(sigmoid(N(0, 1))) with shift s (median 0.375 for s = 0.6). [B] fp32."""
    return sample_logit_normal((batch,), 0.0, 1.0, shift, generator=generator, device=device)


def resample_grid(t_s: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-video Euler grid from t_s to 0: [B, steps + 1], t_k = t_s (1 - k / steps)."""
    frac = 1.0 - torch.arange(steps + 1, device=t_s.device, dtype=torch.float32) / steps
    return t_s.float()[:, None] * frac[None, :]


def _noise(x: torch.Tensor, eps: torch.Tensor | None, generator) -> torch.Tensor:
    if eps is not None:
        return eps
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _compute_dtype(model, x: torch.Tensor) -> torch.dtype:
    """dtype of the K/V the model produces (autocast's when active, else the weights')."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return next(model.parameters()).dtype


def _bt(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.dtype).reshape(-1, 1, 1, 1, 1)


def _guided(model, z, t, kv_cond, attn_cond, kv_null, attn_null, cfg_scale, frame_offset):
    v = model(z, t, text_kv=kv_cond, attn=attn_cond, frame_offset=frame_offset)
    if kv_null is None or cfg_scale == 1.0:
        return v
    v_null = model(z, t, text_kv=kv_null, attn=attn_null, frame_offset=frame_offset)
    return v_null + cfg_scale * (v - v_null)


@torch.no_grad()
def autoregressive_resample(model, x: torch.Tensor, t_s: torch.Tensor, *, context: torch.Tensor | None = None,
                            text_kv: list | None = None, eps: torch.Tensor | None = None,
                            steps: int = StageConfig.resample_steps, backend: str = "sdpa", routing=None,
                            routing_layers=None, context_t: float = DiffusionConfig.context_t,
                            null_context: torch.Tensor | None = None, cfg_scale: float = StageConfig.resample_cfg,
                            generator: torch.Generator | None = None, include_last: bool = False,
                            on_chunk: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                            context_eps: torch.Tensor | None = None) -> torch.Tensor:
    """Autoregressive self-resampling of latents x [B, C, F, H, W] (F = N * chunk_frames).

    Chunk i: z = (1 - t_s) x_i + t_s eps_i, ``steps`` Euler steps to 0 with history = the degraded
    chunks < i from the KV cache, then a cache-writing pass of the result at ``context_t`` (for
    context_t > 0 of the result re-noised to context_t with ``context_eps`` [B, C, F, H, W], drawn from
    ``generator`` after eps when None: what the sampler's cache write does).
    ``on_chunk(i, x~_i) -> x~_i`` may replace a finished chunk before it is cached (tests).
    ``null_context`` + ``cfg_scale != 1``: classifier-free guidance with a separate unconditional
    cache. Returns the degraded latents (no graph; chunk N is x_N unless include_last)."""
    cf = model.cfg.chunk_frames
    b, _, frames, h, w = x.shape
    n = frames // cf
    if n * cf != frames:
        raise ValueError(f"{frames} latent frames are not a whole number of chunks of {cf}")
    eps = _noise(x, eps, generator)
    ctx_eps = _noise(x, context_eps, generator) if context_t > 0 else None
    grid = resample_grid(t_s.to(x.device), steps)
    kv_cond = text_kv if text_kv is not None else model.text_kv(context)
    guided = null_context is not None and cfg_scale != 1.0
    last = n if include_last else n - 1
    kv_dtype = _compute_dtype(model, x)
    cap = max(1, last - 1)  # the committed chunks (the scratch slot is extra); never grows
    cache = KVCache.for_model(model, b, (h, w), x.device, kv_dtype, capacity=cap)
    ucache = KVCache.for_model(model, b, (h, w), x.device, kv_dtype, capacity=cap) if guided else None
    kv_null = model.text_kv(null_context) if guided else None
    attn_kw = dict(routing=routing, routing_layers=routing_layers)
    out = x.clone()
    ctx_t = torch.full((b,), float(context_t), device=x.device)
    for i in range(last):
        sl = slice(i * cf, (i + 1) * cf)
        z = add_noise(x[:, :, sl], eps[:, :, sl], grid[:, 0])
        for k in range(steps):
            v = _guided(model, z, grid[:, k], kv_cond, CachedAttention(cache, backend, **attn_kw), kv_null,
                        CachedAttention(ucache, backend, **attn_kw) if guided else None, cfg_scale, i * cf)
            z = z + _bt(grid[:, k + 1] - grid[:, k], z) * v.to(z.dtype)
        if on_chunk is not None:
            z = on_chunk(i, z)
        out[:, :, sl] = z
        if i + 1 < last:  # the next chunk needs this one in the cache
            zc = z if ctx_eps is None else add_noise(z, ctx_eps[:, :, sl], ctx_t)
            for c, kv in ((cache, kv_cond), (ucache, kv_null)) if guided else ((cache, kv_cond),):
                model(zc, ctx_t, text_kv=kv, attn=CachedAttention(c, backend, commit=True, **attn_kw),
                      frame_offset=i * cf)
                c.commit()
    return out


@torch.no_grad()
def autoregressive_resample_reference(model, x, t_s, *, context, eps, steps: int = StageConfig.resample_steps,
                                      backend: str = "sdpa", context_t: float = DiffusionConfig.context_t,
                                      include_last: bool = False, context_eps: torch.Tensor | None = None) -> torch.Tensor:
    """The same rollout without a KV cache (dense attention only; slow, for tests): chunk i is denoised
    by a full forward over [x~_1..x~_{i-1}, z_i] under the block-causal mask with per-chunk timesteps
    [context_t, ..., context_t, t_k]; for context_t > 0 the history chunks are x~_j re-noised to
    context_t with context_eps (required then)."""
    cf = model.cfg.chunk_frames
    b, _, frames, h, w = x.shape
    n = frames // cf
    if context_t > 0 and context_eps is None:
        raise ValueError("autoregressive_resample_reference: context_t > 0 needs context_eps")
    grid = resample_grid(t_s.to(x.device), steps)
    out = x.clone()
    hist = x.clone()  # what the history positions hold: x~_j, re-noised to context_t when > 0
    tokens = model.chunk_tokens(h, w)
    for i in range(n if include_last else n - 1):
        sl = slice(i * cf, (i + 1) * cf)
        z = add_noise(x[:, :, sl], eps[:, :, sl], grid[:, 0])
        attn = MaskedAttention(MaskSpec("block_causal", i + 1, tokens), backend)
        for k in range(steps):
            seq = torch.cat([hist[:, :, : i * cf], z], dim=2)
            t = torch.full((b, i + 1), float(context_t), device=x.device)
            t[:, i] = grid[:, k]
            v = model(seq, t, context, attn=attn)[:, :, i * cf:]
            z = z + _bt(grid[:, k + 1] - grid[:, k], z) * v
        out[:, :, sl] = z
        hist[:, :, sl] = z if context_t == 0 else add_noise(z, context_eps[:, :, sl], context_t)
    return out


@torch.no_grad()
def parallel_resample(model, x: torch.Tensor, t_s: torch.Tensor, *, context: torch.Tensor,
                      eps: torch.Tensor | None = None, steps: int = StageConfig.resample_steps, backend: str = "sdpa",
                      routing=None, routing_layers=None, null_context: torch.Tensor | None = None,
                      cfg_scale: float = StageConfig.resample_cfg, context_t: float = 0.0,
                      context_eps: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Parallel resampling (ablation): every chunk is resampled from t_s conditioned on the
    ground-truth history (no accumulation); one dual forward per Euler step. With context_t > 0 that
    history is the ground truth noised to context_t with `context_eps` [as x], as the sampler's cache
    holds it."""
    cf = model.cfg.chunk_frames
    b, _, frames, h, w = x.shape
    n = frames // cf
    eps = _noise(x, eps, generator)
    grid = resample_grid(t_s.to(x.device), steps)
    attn = MaskedAttention(MaskSpec("dual", n, model.chunk_tokens(h, w)), backend, routing=routing,
                           routing_layers=routing_layers)
    z = add_noise(x, eps, grid[:, 0])
    history, history_t = x, None
    if context_t > 0:
        if context_eps is None:
            raise ValueError("context_t > 0 needs context_eps (the noise of the history at context_t)")
        history, history_t = add_noise(x, context_eps, context_t), x.new_full((b, n), context_t)
    guided = null_context is not None and cfg_scale != 1.0
    for k in range(steps):
        t = grid[:, k, None].expand(b, n)
        v = model.forward_dual(history, z, t, context, attn, history_t)
        if guided:
            v_null = model.forward_dual(history, z, t, null_context, attn, history_t)
            v = v_null + cfg_scale * (v - v_null)
        z = z + _bt(grid[:, k + 1] - grid[:, k], z) * v.to(z.dtype)
    return z


def noise_augment(x: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise augmentation (ablation): x + scale * N(0, I)."""
    return x + scale * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def degrade_history(model, x: torch.Tensor, context: torch.Tensor, settings: DegradeSettings, *,
                    generator: torch.Generator | None = None, null_context: torch.Tensor | None = None,
                    t_s: torch.Tensor | None = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The history stream for one training batch -> (history detached, t_s [B] or None).

    ``model`` must be the plain (unwrapped) CausalWanModel with the current online weights.
    ``t_s`` overrides the sampled strengths (e.g. zeros for a teacher-forcing check); a strength ramp
    scales it too. The returned t_s is the one each video's history was built with (0 for a video a
    probability ramp kept on the ground truth)."""
    obj = settings.objective
    if obj == "teacher_forcing":
        return x, None
    r = 1.0 if settings.ramp == "none" else float(settings.ramp_level)
    if obj == "noise_augmentation":
        scale = settings.noise_scale * r if settings.ramp == "strength" else settings.noise_scale
        hist = noise_augment(x, scale, generator)
        if settings.ramp == "probability" and r < 1.0:
            keep = _ramp_mask(x.shape[0], r, generator, x.device)
            hist = torch.where(keep[:, None, None, None, None], hist, x)
        return hist.detach(), None
    if t_s is None:
        t_s = sample_resample_t(x.shape[0], settings.shift, generator=generator, device=x.device)
    if settings.ramp == "strength" and r < 1.0:
        t_s = t_s * r
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    common = dict(steps=settings.steps, backend=settings.backend, routing=settings.routing,
                  routing_layers=settings.routing_layers, cfg_scale=settings.cfg_scale, context_t=settings.context_t)
    ctx_eps = None
    if settings.context_t > 0:  # drawn only then: the default (0) keeps every stream as before
        ctx_eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        common["context_eps"] = ctx_eps
    fn = autoregressive_resample if obj == "resampling" else parallel_resample
    if settings.ramp != "probability" or r >= 1.0:
        with eval_mode(model):
            hist = fn(model, x, t_s, context=context, eps=eps, null_context=null_context, **common)
        return hist.detach(), t_s
    # probability ramp: degrade only the selected videos (a sub-batch), the others keep the ground truth
    t_s = t_s.to(x.device)
    sel = _ramp_mask(x.shape[0], r, generator, x.device)
    idx = sel.nonzero().flatten()
    run = idx if idx.numel() or not settings.always_forward else idx.new_zeros(1)
    hist = x.clone()
    if run.numel():
        if ctx_eps is not None:
            common["context_eps"] = ctx_eps[run]
        with eval_mode(model):
            sub = fn(model, x[run], t_s[run], context=context[run], eps=eps[run],
                     null_context=None if null_context is None else null_context[run], **common)
        if idx.numel():
            hist[idx] = sub
    return hist.detach(), torch.where(sel, t_s, torch.zeros_like(t_s))


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode, as inference runs it, then back in the mode it was in: a resampled history
    is what the model would generate (no LoRA dropout, which would also draw from the global RNG); the
    trainer's probes (training.py, training_gap.py) run under it too."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _ramp_mask(batch: int, r: float, generator, device) -> torch.Tensor:
    """[B] bool: True (degraded history) with probability r per video, drawn from ``generator``."""
    return torch.rand(batch, generator=generator, device=device) < r
